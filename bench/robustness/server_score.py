"""Scores the server run of run.sh (step `server`): the real server's own verdicts.

The server ran with the distilled SSCD model; bank `pdq-only` holds the known originals with PDQ
alone, and bank `emb-T` the same originals with the embedding space at cosine threshold T. One
scan of every video searched all banks, so per bank the verdicts are those of a server whose only
bank is that one. A known video is detected under a bank when that bank's copy of its own original
gets a `match` verdict; an innocent video is a false positive when any reference of the bank does.
In an `emb-T` bank a frame matches by PDQ or by its embedding, so its column is "both signals".

Usage: server_score.py OUT_DIR [TAG]   (reads server-scan$TAG.tsv; prints Markdown)
"""

import sys
from collections import defaultdict
from pathlib import Path

from score import load_manifest


def main():
    out = Path(sys.argv[1]).resolve()
    rows = load_manifest(out)
    ref = {}  # (bank, reference id) -> known video name
    banks = []
    for line in open(out / "server-refs.tsv"):
        bank, rid, path = line.rstrip("\n").split("\t")
        ref[(bank, rid)] = Path(path).name[: -len(".mp4")]
        if bank not in banks:
            banks.append(bank)
    matched = defaultdict(set)  # (path, bank) -> matched known videos
    scanned = set()
    tag = sys.argv[2] if len(sys.argv) > 2 else ""
    for line in open(out / f"server-scan{tag}.tsv"):
        path, rid, bank, _q, _r, verdict = line.rstrip("\n").split("\t")
        scanned.add(path)
        if verdict == "match":
            matched[(path, bank)].add(ref[(bank, rid)])
    transforms = []
    for r in rows:
        if r["transform"] not in transforms:
            transforms.append(r["transform"])
    known = [r for r in rows if r["side"] == "known"]
    innocent = [r for r in rows if r["side"] == "innocent"]
    print(f"Videos with any candidate reference: {len(scanned)} of {len(rows)} scanned.\n")
    print("Detected (of %d known) / false positives (of %d innocent), per bank:\n"
          % (len({r["video"] for r in known}), len({r["video"] for r in innocent})))
    print("| transform | " + " | ".join(banks) + " |")
    print("|---|" + "---|" * len(banks))
    totals = defaultdict(lambda: [0, 0, 0])
    for t in transforms:
        cells = []
        for bank in banks:
            k = [r for r in known if r["transform"] == t]
            i = [r for r in innocent if r["transform"] == t]
            hit = sum(1 for r in k if r["video"] in matched[(str(out / r["path"]), bank)])
            fp = sum(1 for r in i if matched[(str(out / r["path"]), bank)])
            totals[bank][0] += hit
            totals[bank][1] += len(k)
            totals[bank][2] += fp
            cells.append(f"{100 * hit / max(len(k), 1):.0f} % / {fp}")
        print(f"| {t} | " + " | ".join(cells) + " |")
    print("| **all** | " + " | ".join(
        f"{100 * totals[b][0] / max(totals[b][1], 1):.0f} % / {totals[b][2]}" for b in banks) + " |")


if __name__ == "__main__":
    main()
