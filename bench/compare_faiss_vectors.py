#!/usr/bin/env python3
"""framematch's vector index beside faiss on the very same files, in the same run (issue #11 item 7).

    python3 bench/compare_faiss_vectors.py [--sizes 100k,1M] [--runs 3]
        [--m 16,32] [--ours-m 16] [--ef-construction 128] [--ef-search 16,32,...]
        [--data target/vectors-bench] [--ours-json PATH] [--skip-ours] [--json PATH]

1. Unless --skip-ours or --ours-json, runs `cargo bench --bench vectors` (bench/vectors.rs) on the
   files that bench/vectors_data.py wrote (run that first) and reads its JSON rows.
2. Loads the same base-N.f32 / queries.f32 / truth-N.i32 into faiss IndexFlatIP (exact, the f32
   truth) and IndexHNSWFlat (inner product, M from --m, efConstruction as ours, built on all
   cores as ours is) and measures them the same way: recall@10 against the exact f32 top 10,
   original in the top 10, queries/s on one thread (median of --runs batch calls over every query;
   a batch call at one thread searches the queries one after the other, without Python between
   them), build time, RSS delta and the index's own bytes per frame.
3. Prints one table per N and, per engine, the cheapest efSearch that reaches recall@10 >= 0.99,
   with the ratio of our queries/s to faiss's there.

The machine is shared (2 cores): compare within one run, not across runs.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DIM = 512
K = 10
TARGET = 0.99


def parse_size(text):
    text = text.strip().lower()
    if text.endswith("k"):
        return int(text[:-1]) * 1000
    if text.endswith("m"):
        return int(text[:-1]) * 1_000_000
    return int(text)


def ints(text):
    return [parse_size(s) for s in text.split(",") if s.strip()]


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def run_ours(args, sizes):
    env = dict(os.environ)
    rows = []
    for n in sizes:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = ["cargo", "bench", "--bench", "vectors", "--", "--sizes", str(n), "--m", args.ours_m,
                   "--runs", str(args.runs), "--ef-construction", str(args.ef_construction),
                   "--ef-search", args.ef_search, "--data", args.data, "--json", out.name]
            print("$", " ".join(cmd), file=sys.stderr, flush=True)
            subprocess.run(cmd, cwd=ROOT, env=env, check=True)
            with open(out.name) as f:
                rows.extend(json.load(f))
    return rows


def load(data, n):
    base = np.fromfile(os.path.join(data, f"base-{n}.f32"), dtype="<f4").reshape(-1, DIM)
    queries = np.fromfile(os.path.join(data, "queries.f32"), dtype="<f4").reshape(-1, DIM)
    truth = np.fromfile(os.path.join(data, f"truth-{n}.i32"), dtype="<i4").reshape(len(queries), -1)[:, :K]
    tenth = np.fromfile(os.path.join(data, f"truth-{n}.f32"), dtype="<f4").reshape(len(queries), -1)[:, K - 1]
    real_of = np.fromfile(os.path.join(data, f"base-{n}.real.i32"), dtype="<i4")
    position = np.full(real_of.max() + 1, -1, np.int64)
    position[real_of[real_of >= 0]] = np.nonzero(real_of >= 0)[0]
    with open(os.path.join(data, "queries.json")) as f:
        originals = position[[r["original"] for r in json.load(f)]]
    assert len(base) == n
    return base, queries, truth, tenth, originals


def recall(ids, truth):
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, truth)]) / K)


EPSILON = 1e-3


def epsilon_recall(ids, base, queries, tenth):
    """Share of answers whose f32 score is within EPSILON of the 10th best (as bench/vectors.rs)."""
    scores = np.einsum("qkd,qd->qk", base[ids], queries)
    return float(np.mean(scores >= tenth[:, None] - EPSILON))


def in_top(ids, originals):
    return float(np.mean([o in row for o, row in zip(originals, ids)]))


def timed(search, queries, runs):
    qps = []
    for _ in range(runs):
        t = time.perf_counter()
        search(queries)
        qps.append(len(queries) / (time.perf_counter() - t))
    return qps


def run_faiss(args, n):
    import faiss

    base, queries, truth, tenth, originals = load(args.data, n)
    threads = os.cpu_count() or 1
    rows = []
    common = {"n": n, "queries": len(queries), "build_threads": threads}

    faiss.omp_set_num_threads(1)
    before = rss_bytes()
    t = time.perf_counter()
    flat = faiss.IndexFlatIP(DIM)
    flat.add(base)
    build_s = time.perf_counter() - t
    rss = rss_bytes() - before
    # Slow (about 1 query/s per million rows on this machine's faiss wheel): the first
    # --exact-queries only, for its answers as for its speed.
    part = queries[:args.exact_queries]
    _, ids = flat.search(part, K)
    p = len(part)
    qps = timed(lambda q: flat.search(q, K), part, args.runs)
    rows.append({**common, "engine": "faiss-flat-ip", "m": 0, "ef_search": 0, "build_s": build_s,
                 "build_s_all": [build_s], "memory_bytes_per_frame": DIM * 4.0,
                 "rss_delta_bytes_per_frame": rss / n, "recall_vs_f32": recall(ids, truth[:p]),
                 "epsilon_recall": epsilon_recall(ids, base, part, tenth[:p]), "recall_vs_flat": None,
                 "original_in_top10": in_top(ids, originals[:p]),
                 "qps_1t": median(qps), "qps_1t_all": qps, "queries": len(part)})
    print(f"  faiss flat at {n}: {median(qps):.1f} q/s, recall {rows[-1]['recall_vs_f32']:.4f}",
          file=sys.stderr, flush=True)
    del flat
    if n > args.hnsw_max_n:
        return rows

    for m in ints(args.m):
        faiss.omp_set_num_threads(threads)
        before = rss_bytes()
        t = time.perf_counter()
        index = faiss.IndexHNSWFlat(DIM, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = args.ef_construction
        index.add(base)
        build_s = time.perf_counter() - t
        rss = rss_bytes() - before
        faiss.omp_set_num_threads(1)
        hnsw = index.hnsw
        graph_bytes = hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8 + hnsw.levels.size() * 4
        memory = (n * DIM * 4 + graph_bytes) / n
        print(f"  faiss hnsw M={m} at {n}: built in {build_s:.1f} s, {memory:.0f} bytes/frame",
              file=sys.stderr, flush=True)
        for ef in ints(args.ef_search):
            hnsw.efSearch = ef
            _, ids = index.search(queries, K)
            qps = timed(lambda q: index.search(q, K), queries, args.runs)
            rows.append({**common, "engine": f"faiss-hnsw-M{m}", "m": m, "ef_search": ef,
                         "ef_construction": args.ef_construction, "build_s": build_s,
                         "build_s_all": [build_s], "memory_bytes_per_frame": memory,
                         "rss_delta_bytes_per_frame": rss / n, "recall_vs_f32": recall(ids, truth),
                         "epsilon_recall": epsilon_recall(ids, base, queries, tenth), "recall_vs_flat": None,
                         "original_in_top10": in_top(ids, originals),
                         "qps_1t": median(qps), "qps_1t_all": qps})
            print(f"    ef={ef}: recall {rows[-1]['recall_vs_f32']:.4f}, {median(qps):.0f} q/s",
                  file=sys.stderr, flush=True)
        del index
    return rows


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def cheapest(rows, engine, key):
    ok = [r for r in rows if r["engine"] == engine and r.get(key) is not None and r[key] >= TARGET]
    return min(ok, key=lambda r: r["ef_search"]) if ok else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100k,1M")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--m", default="16,32", help="faiss IndexHNSWFlat M values")
    parser.add_argument("--ours-m", default="16", help="our graph's M values")
    parser.add_argument("--ef-construction", type=int, default=128)
    parser.add_argument("--ef-search", default="10,16,24,32,48,64,96,128,192,256")
    parser.add_argument("--exact-queries", type=int, default=200)
    parser.add_argument("--hnsw-max-n", type=parse_size, default=1_000_000,
                        help="largest N at which faiss HNSW is built (a build takes minutes)")
    parser.add_argument("--data", default=os.path.join(ROOT, "target", "vectors-bench"))
    parser.add_argument("--ours-json", help="our rows from an earlier `cargo bench --bench vectors --json`")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--json", help="also write every row here")
    args = parser.parse_args()
    import faiss

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.ours_json:
        with open(args.ours_json) as f:
            ours = json.load(f)
    elif args.skip_ours:
        ours = []
    else:
        ours = run_ours(args, sizes)
    all_rows = list(ours)
    for n in sizes:
        theirs = run_faiss(args, n)
        all_rows.extend(theirs)
        rows = [r for r in ours if r["n"] == n] + theirs
        print(f"\n### N = {n:,} (faiss {faiss.__version__}, k = {K}, {args.runs} runs, medians; "
              f"queries/s on one thread)\n")
        print("| engine | M | ef_search | recall@10 vs f32 exact | vs our flat int8 | ε-recall@10 | original in top 10 | "
              "queries/s | build s | index bytes/frame | RSS delta bytes/frame |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['engine']} | {r['m'] or '-'} | {r['ef_search'] or '-'} | {r['recall_vs_f32']:.4f} | "
                  f"{fmt(r.get('recall_vs_flat'), '.4f')} | {r['epsilon_recall']:.4f} | {r['original_in_top10']:.4f} | {r['qps_1t']:.0f} | "
                  f"{r['build_s']:.1f} | {r['memory_bytes_per_frame']:.0f} | "
                  f"{fmt(r.get('rss_delta_bytes_per_frame'), '.0f')} |")
        print(f"\nCheapest ef_search reaching recall@10 >= {TARGET} at N={n:,}:")
        engines = sorted({r["engine"] for r in rows if "hnsw" in r["engine"]})
        best = {}
        for engine in engines:
            for key in ("recall_vs_f32", "recall_vs_flat", "epsilon_recall"):
                r = cheapest(rows, engine, key)
                if r is not None:
                    best[(engine, key)] = r
                    print(f"  {engine} ({key}): ef_search={r['ef_search']}, recall {r[key]:.4f}, "
                          f"{r['qps_1t']:.0f} q/s")
                elif any(x["engine"] == engine and x.get(key) is not None for x in rows):
                    print(f"  {engine} ({key}): not reached (best "
                          f"{max(x[key] for x in rows if x['engine'] == engine):.4f})")
        # Each index against its own exact scan (ours: the int8 flat scan; faiss: f32), and both
        # against the f32 truth and by epsilon-recall.
        for key, theirs_key in (("recall_vs_flat", "recall_vs_f32"), ("recall_vs_f32", "recall_vs_f32"),
                                ("epsilon_recall", "epsilon_recall")):
            faiss_best = [v for (e, k), v in best.items() if e.startswith("faiss") and k == theirs_key]
            if not faiss_best:
                continue
            fb = max(faiss_best, key=lambda r: r["qps_1t"])
            for (engine, k), r in best.items():
                if not engine.startswith("faiss") and k == key:
                    print(f"  ratio {engine} ({key}) / {fb['engine']} ef={fb['ef_search']} ({theirs_key}): "
                          f"{r['qps_1t'] / fb['qps_1t']:.2f}x queries/s")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=2)


if __name__ == "__main__":
    main()
