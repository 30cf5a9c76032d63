#!/usr/bin/env python3
"""framematch's engines beside faiss on the very same data, in the same run (issue #6 item 5).

    python3 bench/compare_faiss.py [--sizes 100k,1M] [--runs 3] [--hnsw-max-n 100000]

1. Creates bench/.venv (gitignored) with faiss-cpu 1.15 and numpy from PyPI, and re-runs itself
   there.
2. Runs `cargo bench --bench engines` (bench/engines.rs) for our exact and mih engines (and hnsw
   up to --hnsw-max-n), which writes the dataset files to bench/data (bench/dataset.rs) and our
   figures as JSON.
3. Loads the same files (refs-N.u8, queries.u8, truth-N.bin) into faiss IndexBinaryFlat,
   IndexBinaryMultiHash (16 tables x 16 bits with nflip=1 as HMA uses, and 11 x 23 bits with
   nflip=2: both exact for radius 31 by the pigeonhole principle) and IndexBinaryHNSW (M=32,
   efSearch=256; kNN with k=64, kept within the radius, as it has no range search), and measures
   them the same way: queries/s at 1 thread (median of --runs batch calls), per core at 2 threads,
   p50/p99 of single-query calls (these include ~10 us of Python call overhead), recall against
   the ground truth of our `exact` engine, build time, RSS delta per code.
4. Prints one table per N and the ratios of our best exact engine to faiss's best exact index.

Range searches use radius 32, which faiss treats as exclusive: distance <= 31, as ours.
The machine is shared: compare ratios within one run, not absolute figures across runs.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import venv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.path.join(HERE, ".venv")
VENV_PYTHON = os.path.join(VENV, "bin", "python")
DATA = os.path.join(HERE, "data")
RADIUS = 31
PACKAGES = ["faiss-cpu==1.15.*", "numpy"]


def ensure_venv():
    """Creates the venv on first use and re-executes this script inside it."""
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    if not os.path.exists(VENV_PYTHON):
        print(f"creating {VENV} with {' '.join(PACKAGES)}", file=sys.stderr)
        venv.create(VENV, with_pip=True)
        subprocess.run([VENV_PYTHON, "-m", "pip", "install", "-q", *PACKAGES], check=True)
    os.execv(VENV_PYTHON, [VENV_PYTHON, os.path.abspath(__file__), *sys.argv[1:]])


def parse_size(text):
    text = text.strip().lower()
    if text.endswith("k"):
        return int(text[:-1]) * 1000
    if text.endswith("m"):
        return int(text[:-1]) * 1_000_000
    return int(text)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def run_ours(sizes, runs, hnsw_max_n):
    """Our engines through bench/engines.rs; returns its JSON rows."""
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", os.path.join(ROOT, "target", "rel"))
    rows = []
    for n in sizes:
        engines = "exact,mih,hnsw" if n <= hnsw_max_n else "exact,mih"
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = ["cargo", "bench", "--bench", "engines", "--", "--sizes", str(n),
                   "--engines", engines, "--runs", str(runs), "--json", out.name]
            if n > 100_000 and n <= hnsw_max_n:
                cmd.append("--hnsw-all-sizes")
            print("$", " ".join(cmd), file=sys.stderr, flush=True)
            subprocess.run(cmd, cwd=ROOT, env=env, check=True)
            with open(out.name) as f:
                rows.extend(json.load(f))
    return rows


def load(n):
    import numpy as np

    refs = np.fromfile(os.path.join(DATA, f"refs-{n}.u8"), dtype=np.uint8).reshape(-1, 32)
    queries = np.fromfile(os.path.join(DATA, "queries.u8"), dtype=np.uint8).reshape(-1, 32)
    raw = open(os.path.join(DATA, f"truth-{n}.bin"), "rb").read()
    q = int(np.frombuffer(raw, dtype="<u8", count=1)[0])
    lims = np.frombuffer(raw, dtype="<u8", count=q + 1, offset=8)
    total = int(lims[-1])
    ids = np.frombuffer(raw, dtype="<u4", count=total, offset=8 + (q + 1) * 8)
    assert q == len(queries) and len(refs) == n
    truth = [set(ids[lims[i]:lims[i + 1]].tolist()) for i in range(q)]
    return refs, queries, truth


def recall(found, truth):
    total = sum(len(t) for t in truth)
    hit = sum(len(f & t) for f, t in zip(found, truth))
    identical = all(f == t for f, t in zip(found, truth))
    return (hit / total if total else 1.0), identical


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def measure(name, index, queries, truth, n, search, runs, build_s, rss_delta):
    """search(batch) -> list of sets of ids within the radius."""
    import faiss
    import numpy as np

    faiss.omp_set_num_threads(1)
    found = search(queries)
    rec, identical = recall(found, truth)
    qps1 = []
    for _ in range(runs):
        t = time.perf_counter()
        search(queries)
        qps1.append(len(queries) / (time.perf_counter() - t))
    latencies = []
    for i in range(len(queries)):
        t = time.perf_counter()
        search(queries[i:i + 1])
        latencies.append(time.perf_counter() - t)
    latencies.sort()
    faiss.omp_set_num_threads(2)
    qps2 = []
    for _ in range(runs):
        # Twice the queries so both threads have a full set each, as in bench/engines.rs.
        both = np.concatenate([queries, queries])
        t = time.perf_counter()
        search(both)
        qps2.append(len(both) / (time.perf_counter() - t) / 2)
    faiss.omp_set_num_threads(1)
    pct = lambda p: latencies[min(len(latencies) - 1, max(0, int(p / 100 * len(latencies) + 0.999) - 1))]
    return {
        "n": n, "engine": name, "build_s": build_s, "qps_1t": median(qps1),
        "qps_2t_per_core": median(qps2), "p50_us": pct(50) * 1e6, "p99_us": pct(99) * 1e6,
        "recall": rec, "identical_to_exact": identical,
        "rss_delta_bytes_per_frame": rss_delta / n, "memory_bytes_per_frame": None,
    }


def range_searcher(index):
    import numpy as np

    def search(q):
        lims, _dist, ids = index.range_search(np.ascontiguousarray(q), RADIUS + 1)
        return [set(ids[lims[i]:lims[i + 1]].tolist()) for i in range(len(q))]

    return search


def knn_searcher(index, k):
    def search(q):
        dist, ids = index.search(q, k)
        return [set(int(i) for i, d in zip(row_i, row_d) if i >= 0 and d <= RADIUS)
                for row_i, row_d in zip(ids, dist)]

    return search


def run_faiss(n, runs, hnsw_max_n):
    import faiss

    refs, queries, truth = load(n)
    rows = []

    def build(make, threads=1):
        faiss.omp_set_num_threads(threads)
        before = rss_bytes()
        t = time.perf_counter()
        index = make()
        index.add(refs)
        build_s = time.perf_counter() - t
        faiss.omp_set_num_threads(1)
        return index, build_s, rss_bytes() - before

    index, build_s, rss = build(lambda: faiss.IndexBinaryFlat(256))
    rows.append(measure("faiss-flat", index, queries, truth, n, range_searcher(index), runs, build_s, rss))
    del index
    print(f"  faiss flat at {n} done", file=sys.stderr, flush=True)
    for nhash, bits, nflip in [(16, 16, 1), (11, 23, 2)]:
        def make(nhash=nhash, bits=bits, nflip=nflip):
            index = faiss.IndexBinaryMultiHash(256, nhash, bits)
            index.nflip = nflip
            return index

        index, build_s, rss = build(make)
        name = f"faiss-multihash-{nhash}x{bits}-nflip{nflip}"
        rows.append(measure(name, index, queries, truth, n, range_searcher(index), runs, build_s, rss))
        del index
        print(f"  {name} at {n} done", file=sys.stderr, flush=True)
    if n <= hnsw_max_n:
        def make_hnsw():
            index = faiss.IndexBinaryHNSW(256, 32)
            index.hnsw.efConstruction = 40
            return index

        # Built on both cores (a single-threaded build takes too long here); searched on one.
        index, build_s, rss = build(make_hnsw, threads=2)
        index.hnsw.efSearch = 256
        rows.append(measure("faiss-hnsw-M32-ef256", index, queries, truth, n, knn_searcher(index, 64),
                            runs, build_s, rss))
        del index
        print(f"  faiss hnsw at {n} done", file=sys.stderr, flush=True)
    return rows


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100k,1M")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hnsw-max-n", type=parse_size, default=100_000,
                        help="largest N at which hnsw (ours and faiss) is built; builds take minutes")
    parser.add_argument("--json", help="also write every row here")
    args = parser.parse_args()
    ensure_venv()
    import faiss

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    ours = run_ours(sizes, args.runs, args.hnsw_max_n)
    all_rows = list(ours)
    for n in sizes:
        theirs = run_faiss(n, args.runs, args.hnsw_max_n)
        all_rows.extend(theirs)
        rows = [r for r in ours if r["n"] == n] + theirs
        print(f"\n### N = {n:,} (faiss {faiss.__version__}, radius {RADIUS}, {args.runs} runs, medians)\n")
        print("| engine | queries/s (1 thread) | per core (2 threads) | p50 µs | p99 µs | recall | exact | build s | RSS bytes/code |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
        for r in rows:
            print(f"| {r['engine']} | {r['qps_1t']:.0f} | {r['qps_2t_per_core']:.0f} | {r['p50_us']:.1f} | "
                  f"{r['p99_us']:.1f} | {r['recall']:.4f} | {'yes' if r['identical_to_exact'] else 'no'} | "
                  f"{r['build_s']:.2f} | {fmt(r['rss_delta_bytes_per_frame'], '.0f')} |")
        exact_ours = [r for r in rows if not r["engine"].startswith("faiss") and r["identical_to_exact"]]
        exact_theirs = [r for r in theirs if r["identical_to_exact"]]
        best_ours = max(exact_ours, key=lambda r: r["qps_1t"])
        best_theirs = max(exact_theirs, key=lambda r: r["qps_1t"])
        print(f"\nRatio at N={n:,}: our best exact ({best_ours['engine']}) / faiss's best exact "
              f"({best_theirs['engine']}): {best_ours['qps_1t'] / best_theirs['qps_1t']:.2f}x queries/s at 1 thread, "
              f"{best_ours['qps_2t_per_core'] / best_theirs['qps_2t_per_core']:.2f}x per core at 2 threads "
              f"(target: >= 3x).")
        for r in theirs:
            print(f"  {best_ours['engine']} / {r['engine']}: {best_ours['qps_1t'] / r['qps_1t']:.2f}x")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=2)


if __name__ == "__main__":
    main()
