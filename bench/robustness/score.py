"""Scores the robustness run: PDQ verdicts from the real server, SSCD video-level matches.

Embedding rule: a query video matches reference r when at least K of its sampled frames each
have a descriptor within cosine >= T of some descriptor of r's sampled frames. A known video is
detected when it matches its own reference; an innocent video is a false positive when it matches
any reference. T is chosen from the innocent videos (all transforms, originals included): the
smallest multiple of 0.01 above their highest score plus MARGIN.

Usage: score.py OUT_DIR MODEL_TAG...   (prints Markdown)
"""

import math
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

MARGIN = 0.02
KS = (1, 2, 3)
CHOSEN_K = 2
VARIANTS = {
    "whole+content": (0, 1),  # what the server embeds: the frame, and its content area in bars
    "+band": (0, 1, 2),  # ... and, for portrait frames, the centred 16:9 band
}


def load_manifest(out):
    rows = [line.rstrip("\n").split("\t") for line in open(out / "manifest.tsv")][1:]
    return [dict(zip(("video", "side", "source", "transform", "path"), r)) for r in rows]


def pdq_results(out, rows, tag=""):
    """(video, transform) -> set of matched reference videos, from the server's verdicts."""
    ref_video = {}
    for line in open(out / f"pdq-refs{tag}.tsv"):
        rid, path = line.rstrip("\n").split("\t")
        ref_video[rid] = Path(path).name[: -len(".mp4")]
    by_path = {str(out / r["path"]): (r["video"], r["transform"]) for r in rows}
    scanned_file = out / f"pdq-scanned{tag}.txt"
    lines = [line.rstrip("\n").split("\t") for line in open(out / f"pdq-scan{tag}.tsv")]
    if scanned_file.exists():
        order = [by_path[p.strip()] for p in open(scanned_file) if p.strip()]
    else:
        order = [(r["video"], r["transform"]) for r in rows]
    if tag in os.environ.get("PDQ_PARTIAL", "-").split(",") and lines:
        # PDQ_PARTIAL=-rest: that scan was stopped early; count the videos up to the last one
        # that printed a verdict.
        last = order.index(by_path[lines[-1][0]])
        order = order[: last + 1]
    scanned = set(order)
    matched = defaultdict(set)
    matched["scanned"] = scanned
    for line in open(out / f"pdq-scan{tag}.tsv"):
        path, rid, _bank, _q, _r, verdict = line.rstrip("\n").split("\t")
        if verdict == "match":
            matched[by_path[path]].add(ref_video[rid])
    return matched


def video_scores(emb, rows, variant):
    """(video, transform) -> {reference video: [K-th best frame score for K in KS]}."""
    refs = [r["video"] for r in rows if r["side"] == "known" and r["transform"] == "original"]
    ref_desc = []
    for v in refs:
        e, kind = emb[f"{v}|original|emb"], emb[f"{v}|original|kind"]
        ref_desc.append(e[np.isin(kind, (0, 1))])
    owner = np.concatenate([np.full(len(d), i) for i, d in enumerate(ref_desc)])
    bank = np.concatenate(ref_desc)
    scores = {}
    for r in rows:
        key = f"{r['video']}|{r['transform']}"
        e, kind, frame = emb[key + "|emb"], emb[key + "|kind"], emb[key + "|frame"]
        keep = np.isin(kind, variant)
        e, frame = e[keep], frame[keep]
        sims = e @ bank.T  # [descriptors, reference descriptors]
        per = {}
        n_frames = int(frame.max()) + 1 if len(frame) else 0
        for i, v in enumerate(refs):
            best = sims[:, owner == i].max(axis=1)  # per query descriptor
            per_frame = np.full(n_frames, -1.0)
            np.maximum.at(per_frame, frame, best)
            s = np.sort(per_frame)[::-1]
            per[v] = [float(s[k - 1]) if len(s) >= k else -1.0 for k in KS]
        scores[(r["video"], r["transform"])] = per
    return scores


def threshold(x):
    return math.ceil((x + MARGIN) * 100) / 100


def pct(n, d):
    return f"{100 * n / d:.0f} %" if d else "-"


def main():
    out = Path(sys.argv[1]).resolve()
    tags = sys.argv[2:]
    rows = load_manifest(out)
    transforms = list(dict.fromkeys(r["transform"] for r in rows))
    known = [r for r in rows if r["side"] == "known"]
    innocent = [r for r in rows if r["side"] == "innocent"]
    n_known = len({r["video"] for r in known})
    n_innocent = len({r["video"] for r in innocent})
    print(f"Data: {n_known} known videos (references), {n_innocent} innocent videos, "
          f"{len(transforms)} versions each (original + {len(transforms) - 1} transforms): "
          f"{len(rows)} videos.\n")
    # This build's scans: run.sh's default tag and any PDQ_TAG=-rest run (a second subset).
    new = None
    for tag in ("", "-rest"):
        if (out / f"pdq-scan{tag}.tsv").exists():
            part = pdq_results(out, rows, tag)
            if new is None:
                new = part
            else:
                for key, value in part.items():
                    new[key] = new[key] | value
    before = pdq_results(out, rows, "-before") if (out / "pdq-scan-before.tsv").exists() else None
    # The PDQ column: this branch's build where it scanned a version, else the baseline build
    # (marked *), whose border rule differs only for bars (16:9 in 9:16, blurred backdrops).
    pdq, from_before = defaultdict(set), set()
    for r in rows:
        key = (r["video"], r["transform"])
        if new is not None and key in new["scanned"]:
            pdq[key] = new[key]
        elif before is not None and key in before["scanned"]:
            pdq[key] = before[key]
            from_before.add(r["transform"])
    if new is None and before is None:
        pdq = None
    scanned = None if pdq is None else ((new["scanned"] if new else set())
                                        | (before["scanned"] if before else set()))
    if pdq is not None:
        print("## PDQ alone (the real server, vPDQ verdicts)\n")
        print("| transform | this build: detected / FP | baseline build (main, before the border fix): detected / FP |")
        print("|---|---|---|")
        for t in transforms:
            kn = [r for r in known if r["transform"] == t]
            inn = [r for r in innocent if r["transform"] == t]
            cells = []
            for res in (new, before):
                if res is None or not any((r["video"], t) in res["scanned"] for r in kn):
                    cells.append("not run")
                    continue
                kn_s = [r for r in kn if (r["video"], t) in res["scanned"]]
                inn_s = [r for r in inn if (r["video"], t) in res["scanned"]]
                cells.append(f"{pct(sum(r['video'] in res[(r['video'], t)] for r in kn_s), len(kn_s))}"
                             f" of {len(kn_s)} / {sum(bool(res[(r['video'], t)]) for r in inn_s)} of {len(inn_s)}")
            print(f"| {t} | {cells[0]} | {cells[1]} |")
        print()

    for tag in tags:
        path = out / f"emb-{tag}.npz"
        if not path.exists():
            continue
        emb = np.load(path)
        for vname, variant in VARIANTS.items():
            sc = video_scores(emb, rows, variant)
            print(f"## SSCD {tag}, descriptors: {vname}\n")
            # Score distributions.
            inn_max = {k: max(max(s[k_i] for s in sc[(r['video'], r['transform'])].values())
                              for r in innocent) for k_i, k in enumerate(KS)}
            print("Video score = the K-th best sampled frame's cosine to one reference. Innocent: "
                  "the highest over all references; genuine: against its own reference.\n")
            print("| transform | innocent max (K=1/2/3) | genuine min (K=1/2/3) | genuine p10, K=2 | genuine median, K=2 |")
            print("|---|---|---|---|---|")
            for t in transforms:
                inn = [[max(s[i] for s in sc[(r["video"], t)].values()) for i in range(len(KS))]
                       for r in innocent if r["transform"] == t]
                gen = [sc[(r["video"], t)][r["video"]] for r in known if r["transform"] == t]
                g2 = np.array([g[1] for g in gen])
                print(f"| {t} | " + "/".join(f"{max(x[i] for x in inn):.3f}" for i in range(len(KS)))
                      + " | " + "/".join(f"{min(x[i] for x in gen):.3f}" for i in range(len(KS)))
                      + f" | {np.percentile(g2, 10):.3f} | {np.median(g2):.3f} |")
            print()
            print("| K | max innocent score | threshold T (+%.2f) | known detected, all transforms |" % MARGIN)
            print("|---|---|---|---|")
            for k_i, k in enumerate(KS):
                t_k = threshold(inn_max[k])
                det = sum(sc[(r["video"], r["transform"])][r["video"]][k_i] >= t_k for r in known)
                print(f"| {k} | {inn_max[k]:.3f} | {t_k:.2f} | {pct(det, len(known))} |")
            print()
            k_i = KS.index(CHOSEN_K)
            t_k = threshold(inn_max[CHOSEN_K])
            print(f"Detection at K={CHOSEN_K}, T={t_k:.2f} (false positives: innocent videos "
                  f"matching any reference, of {n_innocent}):\n")
            if from_before:
                print("(* PDQ from the baseline build, see the PDQ table.)\n")
            print("(PDQ: of the videos scanned, see the PDQ table; both: unscanned count as PDQ misses.)\n")
            print("| transform | PDQ | SSCD | both | FP PDQ | FP SSCD | FP both |")
            print("|---|---|---|---|---|---|---|")
            for t in transforms:
                kn = [r for r in known if r["transform"] == t]
                inn = [r for r in innocent if r["transform"] == t]

                def emb_hit(r):
                    return sc[(r["video"], t)][r["video"]][k_i] >= t_k

                def emb_fp(r):
                    return any(s[k_i] >= t_k for s in sc[(r["video"], t)].values())

                def pdq_hit(r):
                    return pdq is not None and r["video"] in pdq[(r["video"], t)]

                def pdq_fp(r):
                    return pdq is not None and bool(pdq[(r["video"], t)])

                star = "*" if t in from_before else ""
                kn_s = [r for r in kn if scanned is None or (r["video"], t) in scanned]
                print(f"| {t}{star} | {pct(sum(map(pdq_hit, kn_s)), len(kn_s))} | "
                      f"{pct(sum(map(emb_hit, kn)), len(kn))} | "
                      f"{pct(sum(pdq_hit(r) or emb_hit(r) for r in kn), len(kn))} | "
                      f"{sum(map(pdq_fp, inn))} | {sum(map(emb_fp, inn))} | "
                      f"{sum(pdq_fp(r) or emb_fp(r) for r in inn)} |")
            print()
            # Histogram of the K=2 scores: innocent (best reference) against genuine (own).
            bins = np.arange(0.0, 1.05, 0.1)
            inn_all = [max(s[k_i] for s in sc[(r["video"], r["transform"])].values()) for r in innocent]
            gen_all = [sc[(r["video"], r["transform"])][r["video"]][k_i] for r in known]
            hi, _ = np.histogram(np.clip(inn_all, 0, 1), bins)
            hg, _ = np.histogram(np.clip(gen_all, 0, 1), bins)
            print(f"Histogram of K={CHOSEN_K} video scores, all transforms:\n")
            print("| cosine | innocent (best ref) | genuine (own ref) |")
            print("|---|---|---|")
            for lo, a, b in zip(bins[:-1], hi, hg):
                print(f"| {lo:.1f}-{lo + 0.1:.1f} | {a} | {b} |")
            print()


if __name__ == "__main__":
    main()
