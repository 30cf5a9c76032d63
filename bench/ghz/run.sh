#!/usr/bin/env bash
# ghz load test of a real framematch server on loopback (README "Load testing with ghz").
#
#   bench/ghz/run.sh                    full run: release build, 100k-frame index, each scenario
#                                       for 60 s (--duration 30s to change)
#   bench/ghz/run.sh --smoke            CI's check: small index, a few calls per scenario
#   bench/ghz/run.sh --only match-image one scenario (repeatable)
#
# Steps: build (or take FRAMEMATCH_BIN), make a 720p test clip with ffmpeg, start
# `framematch serve` on 127.0.0.1 (free ports) with a fresh data dir, seed a bank through the real
# CLI (`framematch bank create`, `framematch ref add` of the clip and of random-hash references),
# then run each ghz config in bench/ghz/ (server reflection, no proto files) with `-O json`.
# ghz exits 0 even when every call fails, so check_report.py reads each report and this script
# exits 1 if any call failed (by ghz's report or by the server's own per-status RPC counter, which
# also catches the bidi errors ghz sometimes reports as OK), none ran, or nothing matched the
# seeded bank.
#
# Output in --out (default target/ghz): data/ (payloads), <scenario>.json (ghz reports),
# <scenario>.metrics.{before,after} (the server's /metrics), summary.txt, server.log.
#
# Environment: FRAMEMATCH_BIN (skip the build), GHZ (the ghz binary; default: PATH, then
# $(go env GOPATH)/bin/ghz), CARGO_TARGET_DIR (where cargo builds).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

mode=full
duration=60s
out="$root/target/ghz"
only=()
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) mode=smoke ;;
        --duration) duration="$2"; shift ;;
        --duration=*) duration="${1#*=}" ;;
        --out) out="$2"; shift ;;
        --out=*) out="${1#*=}" ;;
        --only) only+=("$2"); shift ;;
        --only=*) only+=("${1#*=}") ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done
case "$duration" in
    *[0-9]s|*[0-9]m) ;;
    *) echo "run.sh: --duration wants a ghz duration such as 60s or 2m, not $duration" >&2; exit 64 ;;
esac

say() { printf '== %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null || { echo "run.sh: $1 is required ($2)" >&2; exit 1; }; }
need ffmpeg "apt-get install ffmpeg: it makes the 720p test clip"
need python3 "it writes the payloads and reads ghz's JSON report"
need curl "it scrapes the server's /metrics"

ghz="${GHZ:-}"
if [ -z "$ghz" ]; then
    if command -v ghz >/dev/null; then
        ghz="$(command -v ghz)"
    elif command -v go >/dev/null && [ -x "$(go env GOPATH)/bin/ghz" ]; then
        ghz="$(go env GOPATH)/bin/ghz"
    else
        echo "run.sh: ghz not found: go install github.com/bojand/ghz/cmd/ghz@v0.121.0" >&2
        exit 1
    fi
fi

# --- sizes ---------------------------------------------------------------------------------------
if [ "$mode" = smoke ]; then
    clip_seconds=4        # 120 frames at 30 fps: the hash stream's length
    jpeg_frames=4
    noise_refs=4
    noise_frames=250      # 1k noise frames
    # Each scenario: a fixed number of calls, no duration.
    declare -A bound=([match-video-hashes]="--total 16" [match-video-jpeg]="--total 8" [match-image]="--total 40")
else
    clip_seconds=20       # 600 frames
    jpeg_frames=10
    noise_refs=100
    noise_frames=1000     # 100k noise frames
    # Each scenario runs for --duration; ghz's --total is then ignored.
    declare -A bound=([match-video-hashes]="--duration $duration" [match-video-jpeg]="--duration $duration" [match-image]="--duration $duration")
fi
scenarios=(match-video-hashes match-video-jpeg match-image)
if [ ${#only[@]} -gt 0 ]; then
    for s in "${only[@]}"; do
        [ -n "${bound[$s]:-}" ] || { echo "run.sh: no scenario $s (${scenarios[*]})" >&2; exit 64; }
    done
    scenarios=("${only[@]}")
fi

# --- binary --------------------------------------------------------------------------------------
bin="${FRAMEMATCH_BIN:-}"
if [ -z "$bin" ]; then
    target="${CARGO_TARGET_DIR:-$root/target}"
    if [ "$mode" = smoke ]; then
        say "building framematch (debug)"
        cargo build --locked --quiet --bin framematch
        bin="$target/debug/framematch"
    else
        say "building framematch (release)"
        cargo build --locked --release --quiet --bin framematch
        bin="$target/release/framematch"
    fi
fi
[ -x "$bin" ] || { echo "run.sh: no framematch binary at $bin" >&2; exit 1; }

mkdir -p "$out"
out="$(cd "$out" && pwd)"
data="$out/data"
work="$(mktemp -d "${TMPDIR:-/tmp}/framematch-ghz.XXXXXX")"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        # Bounded: the server's shutdown grace is 2 s below.
        for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
rm -f "$out"/summary.txt "$out"/match-*.json "$out"/match-*.metrics.*

# --- payloads ------------------------------------------------------------------------------------
say "making a ${clip_seconds}s 720p clip and its payloads (mode $mode)"
mkdir -p "$data" "$work/frames"
# The reference: ffmpeg's testsrc2 pattern at 1280x720, 30 fps.
ffmpeg -nostdin -loglevel error -y -f lavfi -i "testsrc2=size=1280x720:rate=30" \
    -t "$clip_seconds" -c:v libx264 -preset veryfast -crf 18 -pix_fmt yuv420p "$work/reference.mp4"
# The upload: the same footage, brightened and re-encoded at a lower quality, as a re-upload is.
ffmpeg -nostdin -loglevel error -y -i "$work/reference.mp4" -vf "eq=brightness=0.04:contrast=1.05" \
    -c:v libx264 -preset veryfast -crf 30 -pix_fmt yuv420p "$work/upload.mp4"
# Its frames as 720p JPEGs, one per second (what `scan --send-images` would send).
ffmpeg -nostdin -loglevel error -y -i "$work/upload.mp4" -vf fps=1 -q:v 3 "$work/frames/%04d.jpg"
# Its hashes, every frame, by the real CLI (vPDQ lines).
"$bin" hash --every-frame "$work/upload.mp4" >"$work/upload.vpdq"
python3 "$here/prepare.py" --hashes "$work/upload.vpdq" --frames "$work/frames" --out "$data" \
    --jpeg-frames "$jpeg_frames" --noise-refs "$noise_refs" --noise-frames "$noise_frames" >/dev/null
method() { case "$1" in match-image) echo MatchImage ;; *) echo MatchVideo ;; esac; }
frames_per_call() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$data/payloads.json" "$1"; }

# --- server --------------------------------------------------------------------------------------
say "starting framematch serve on 127.0.0.1"
# A fresh store: the server makes this the bootstrap admin key; the CLI and ghz send it.
api_key="fmk_ghz_$(python3 -c 'import secrets; print(secrets.token_hex(24))')"
export FRAMEMATCH_API_KEY="$api_key"
FRAMEMATCH_BOOTSTRAP_ADMIN_KEY="$api_key" "$bin" serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --data-dir "$work/store" \
    --shutdown-grace-ms 2000 >"$work/server.out" 2>"$out/server.log" &
server_pid=$!
grpc_addr=""
metrics_addr=""
for _ in $(seq 300); do  # at most 30 s
    grpc_addr="$(sed -n 's/^listening on //p' "$work/server.out" | head -n 1)"
    metrics_addr="$(sed -n 's/^metrics on //p' "$work/server.out" | head -n 1)"
    [ -n "$grpc_addr" ] && [ -n "$metrics_addr" ] && break
    kill -0 "$server_pid" 2>/dev/null || { echo "run.sh: the server exited:" >&2; tail -n 20 "$out/server.log" >&2; exit 1; }
    sleep 0.1
done
[ -n "$grpc_addr" ] && [ -n "$metrics_addr" ] || { echo "run.sh: the server did not print its addresses" >&2; exit 1; }
export FRAMEMATCH_SERVER="http://$grpc_addr"
# Ready once the index is loaded (UNAVAILABLE before): the first client call that works.
for i in $(seq 300); do
    "$bin" stats >/dev/null 2>&1 && break
    [ "$i" = 300 ] && { echo "run.sh: the server never became ready" >&2; exit 1; }
    sleep 0.1
done

say "seeding bank ghz: the reference clip (every frame) and $noise_refs x $noise_frames noise frames"
"$bin" bank create ghz --category graphic_violence --description "ghz load test" >/dev/null
"$bin" ref add ghz --every-frame --note "ghz reference clip" "$work/reference.mp4" >/dev/null
# Noise in batches of 20 files per call, to keep command lines short.
find "$data/noise" -name 'noise-*.txt' | sort | xargs -n 20 "$bin" ref add ghz --note noise >/dev/null
"$bin" stats | sed 's/^/   /' >&2

# --- ghz -----------------------------------------------------------------------------------------
status=0
for scenario in "${scenarios[@]}"; do
    # shellcheck disable=SC2086 # bound holds flags
    set -- ${bound[$scenario]}
    say "ghz $scenario ($*)"
    curl -fsS "http://$metrics_addr/metrics" >"$out/$scenario.metrics.before"
    # The config gives the call and concurrency; the command line wins for the rest.
    "$ghz" --config "$here/$scenario.json" --data-file "$data/$scenario.json" \
        "$@" --metadata "{\"authorization\":\"Bearer $api_key\"}" --format json --output "$out/$scenario.json" "$grpc_addr" \
        || { echo "run.sh: ghz failed to run $scenario" >&2; status=1; continue; }
    curl -fsS "http://$metrics_addr/metrics" >"$out/$scenario.metrics.after"
    python3 "$here/check_report.py" --name "$scenario" --report "$out/$scenario.json" \
        --frames-per-call "$(frames_per_call "$scenario")" --expect-matches \
        --method "$(method "$scenario")" \
        --metrics-before "$out/$scenario.metrics.before" \
        --metrics-after "$out/$scenario.metrics.after" --summary "$out/summary.txt" || status=1
done

if [ "$status" = 0 ]; then
    say "ghz $mode run passed: every call OK (reports in $out)"
else
    say "ghz $mode run FAILED (reports in $out, server log $out/server.log)"
fi
exit "$status"
