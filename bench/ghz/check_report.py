#!/usr/bin/env python3
"""Reads one ghz JSON report and decides: exit 1 if any call failed or none ran.

ghz exits 0 even when every call fails (DESIGN.md section 8), so its report is the verdict:
  count                    calls made (a MatchVideo call is one whole stream)
  statusCodeDistribution   calls per gRPC status; anything but OK is a failure here
  errorDistribution        calls per error message
  rps, latencyDistribution calls per second and per-call latency percentiles (nanoseconds)

ghz times whole streams, not frames, so the per-frame view comes from the server's own metrics:
the `framematch_match_duration_seconds` histogram and `framematch_frames_matched_total` scraped
before and after the scenario (--metrics-before/--metrics-after), differenced here.

The server's `framematch_rpc_requests_total{method,code}` is checked too (--method): ghz can
count a bidi stream that the server ended with an error as OK (seen with ghz v0.121.0 when the
error arrives while ghz is still sending), so any non-OK status the server counted for the
method during the run is a failure even when ghz's report shows none.
Standard library only.
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(path: Path | None) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format, samples only."""
    if path is None or not path.exists():
        return []
    samples = []
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        if not match:
            continue
        labels = dict(LABEL.findall(match.group(3) or ""))
        try:
            value = float(match.group(4))
        except ValueError:
            continue
        samples.append((match.group(1), labels, value))
    return samples


def total(samples, name: str, **want: str) -> float:
    return sum(
        value
        for sample, labels, value in samples
        if sample == name and all(labels.get(k) == v for k, v in want.items())
    )


def buckets(samples, name: str) -> dict[float, float]:
    """Cumulative bucket counts by upper bound, summed over every series of `name`."""
    out: dict[float, float] = {}
    for sample, labels, value in samples:
        if sample == f"{name}_bucket" and "le" in labels:
            bound = math.inf if labels["le"] == "+Inf" else float(labels["le"])
            out[bound] = out.get(bound, 0.0) + value
    return out


def quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket that holds the rank."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return None


def ms(nanoseconds: float) -> str:
    return f"{nanoseconds / 1e6:.2f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, required=True, help="ghz -O json output")
    parser.add_argument("--name", required=True)
    parser.add_argument("--frames-per-call", type=int, default=1)
    parser.add_argument("--method", help="RPC name in framematch_rpc_requests_total (MatchVideo)")
    parser.add_argument("--metrics-before", type=Path)
    parser.add_argument("--metrics-after", type=Path)
    parser.add_argument(
        "--expect-matches", action="store_true", help="fail unless some frame matched"
    )
    parser.add_argument("--summary", type=Path, help="append the summary here too")
    args = parser.parse_args()

    try:
        report = json.loads(args.report.read_text())
    except (OSError, ValueError) as error:
        print(f"{args.name}: cannot read ghz report {args.report}: {error}", file=sys.stderr)
        return 1

    count = int(report.get("count") or 0)
    statuses = report.get("statusCodeDistribution") or {}
    errors = report.get("errorDistribution") or {}
    failed = sum(n for code, n in statuses.items() if code != "OK")
    failed = max(failed, sum(errors.values()))
    rps = float(report.get("rps") or 0.0)
    percentiles = {
        int(p["percentage"]): p["latency"] for p in report.get("latencyDistribution") or []
    }
    lines = [
        f"== {args.name}: {count} calls in {report.get('total', 0) / 1e9:.1f} s, "
        f"{failed} failed, {rps:.1f} calls/s"
        + (
            f" = {rps * args.frames_per_call:.1f} frames/s ({args.frames_per_call} frames per stream)"
            if args.frames_per_call > 1
            else ""
        ),
    ]
    if percentiles:
        lines.append(
            "   per call: "
            + ", ".join(f"p{p} {ms(percentiles[p])}" for p in (50, 95, 99) if p in percentiles)
            + f", mean {ms(report.get('average', 0))}, slowest {ms(report.get('slowest', 0))}"
        )

    before, after = parse_metrics(args.metrics_before), parse_metrics(args.metrics_after)
    matched = None
    if after:
        frames = {
            outcome: total(after, "framematch_frames_matched_total", outcome=outcome)
            - total(before, "framematch_frames_matched_total", outcome=outcome)
            for outcome in ("matched", "unmatched", "low_quality")
        }
        matched = frames["matched"]
        histogram_after = buckets(after, "framematch_match_duration_seconds")
        histogram_before = buckets(before, "framematch_match_duration_seconds")
        delta = {b: c - histogram_before.get(b, 0.0) for b, c in histogram_after.items()}
        per_frame = [quantile(q, delta) for q in (0.5, 0.95, 0.99)]
        lines.append(
            "   server, per frame: "
            + ", ".join(f"{k} {int(v)}" for k, v in frames.items())
            + (
                "; match latency p50 {:.2f} ms, p95 {:.2f} ms, p99 {:.2f} ms"
                " (interpolated within histogram buckets)".format(
                    *(v * 1e3 for v in per_frame)
                )
                if all(v is not None for v in per_frame)
                else ""
            )
        )
    server_failed = 0
    if after and args.method:
        codes = {
            labels.get("code", "")
            for name, labels, _ in after
            if name == "framematch_rpc_requests_total" and labels.get("method") == args.method
        }
        by_code = {
            code: total(after, "framematch_rpc_requests_total", method=args.method, code=code)
            - total(before, "framematch_rpc_requests_total", method=args.method, code=code)
            for code in codes
        }
        server_failed = int(sum(n for code, n in by_code.items() if code != "OK"))
        lines.append(
            f"   server, {args.method} calls: "
            + ", ".join(f"{code} {int(n)}" for code, n in sorted(by_code.items()) if n)
        )
    for code, n in sorted(statuses.items()):
        if code != "OK":
            lines.append(f"   status {code}: {n}")
    for message, n in sorted(errors.items(), key=lambda item: -item[1])[:10]:
        lines.append(f"   error x{n}: {message}")

    text = "\n".join(lines)
    print(text)
    if args.summary:
        with args.summary.open("a") as out:
            out.write(text + "\n")

    if count == 0:
        print(f"{args.name}: FAILED: ghz made no calls", file=sys.stderr)
        return 1
    if failed:
        print(f"{args.name}: FAILED: {failed} of {count} calls failed", file=sys.stderr)
        return 1
    if server_failed:
        print(
            f"{args.name}: FAILED: the server ended {server_failed} {args.method} calls with an "
            "error (ghz's report missed some)",
            file=sys.stderr,
        )
        return 1
    if args.expect_matches and matched is not None and matched <= 0:
        print(f"{args.name}: FAILED: no frame matched the seeded bank", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
