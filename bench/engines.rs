//! Index engine benchmark (issue #6 item 3): for each engine at each N, on the dataset of
//! `bench/dataset.rs` (real rendered frames plus random distractors; real transformed queries and
//! non-matches): queries/s per core at 1 and 2 threads, p50/p99 latency per query, recall against
//! `exact`, build (load) time, memory per frame (`FrameIndex::memory_bytes` and the process RSS
//! delta). Prints a markdown table; `--json PATH` also writes the rows for
//! `bench/compare_faiss.py`.
//!
//! ```text
//! cargo bench --bench engines -- [--sizes 100000,1000000] [--engines exact,mih,hnsw]
//!     [--runs 5] [--json PATH] [--generate-only] [--hnsw-all-sizes] [--mih-tables 11,13,16]
//! ```
//!
//! `--mih-tables` adds rows for the bare `mih` engine (no `FrameIndex` around it) with a fixed
//! table count, to compare table counts against the size rule (`mih::tables_for`).
//!
//! Throughput figures are medians over `--runs` passes over the whole query set; latencies are
//! percentiles over every query of every single-thread pass. hnsw runs only at N <= 100k unless
//! `--hnsw-all-sizes` (its build takes minutes per 100k frames on 2 cores).

#![allow(clippy::print_stdout, missing_docs)]

#[path = "dataset.rs"]
mod dataset;

use std::collections::BTreeMap;
use std::time::Instant;

use dataset::{Dataset, Query, QueryKind, RADIUS};
use framematch::index::mih::MihEngine;
use framematch::index::{Engine, EngineKind, FrameIndex, HnswParams};
use serde::Serialize;

#[derive(Debug)]
struct Options {
    sizes: Vec<usize>,
    engines: Vec<EngineKind>,
    runs: usize,
    json: Option<String>,
    generate_only: bool,
    hnsw_all_sizes: bool,
    mih_tables: Vec<usize>,
}

fn options() -> Options {
    let mut o = Options {
        sizes: vec![100_000, 1_000_000],
        engines: EngineKind::ALL.to_vec(),
        runs: 5,
        json: None,
        generate_only: false,
        hnsw_all_sizes: false,
        mih_tables: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--sizes" => {
                o.sizes = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|s| parse_size(s.trim()))
                    .collect();
            }
            "--engines" => {
                o.engines = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|e| e.trim().parse().expect("engine: exact, mih or hnsw"))
                    .collect();
            }
            "--runs" => o.runs = args.next().and_then(|r| r.parse().ok()).unwrap_or(5).max(1),
            "--json" => o.json = args.next(),
            "--generate-only" => o.generate_only = true,
            "--hnsw-all-sizes" => o.hnsw_all_sizes = true,
            "--mih-tables" => {
                o.mih_tables = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|t| t.trim().parse().expect("table count"))
                    .collect();
            }
            // cargo bench passes --bench; anything else is ignored too.
            _ => {}
        }
    }
    o
}

/// `100000`, `100k`, `1M`, `10m`.
fn parse_size(text: &str) -> usize {
    let lower = text.to_ascii_lowercase();
    let (digits, factor) = match lower.strip_suffix('k') {
        Some(d) => (d, 1_000),
        None => match lower.strip_suffix('m') {
            Some(d) => (d, 1_000_000),
            None => (lower.as_str(), 1),
        },
    };
    digits.parse::<usize>().expect("size") * factor
}

/// Resident set size of this process, from /proc/self/statm (4 KiB pages).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Debug, Serialize)]
struct Row {
    n: usize,
    engine: String,
    build_s: f64,
    memory_bytes: u64,
    memory_bytes_per_frame: f64,
    rss_delta_bytes_per_frame: f64,
    qps_1t: f64,
    qps_2t_per_core: f64,
    p50_us: f64,
    p99_us: f64,
    recall: f64,
    identical_to_exact: bool,
    queries: usize,
    true_pairs: usize,
}

/// One pass over every query on one thread; returns (queries/s, per-query seconds).
fn pass_1t(index: &FrameIndex, queries: &[Query]) -> (f64, Vec<f64>) {
    let mut out = Vec::new();
    let mut latencies = Vec::with_capacity(queries.len());
    let started = Instant::now();
    for q in queries {
        let t = Instant::now();
        index.search(&q.hash, RADIUS, &|_| true, &mut out);
        std::hint::black_box(out.len());
        latencies.push(t.elapsed().as_secs_f64());
    }
    (
        queries.len() as f64 / started.elapsed().as_secs_f64(),
        latencies,
    )
}

/// Two threads, each running every query (starting half-way apart); returns queries/s per core.
fn pass_2t(index: &FrameIndex, queries: &[Query]) -> f64 {
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..2 {
            scope.spawn(move || {
                let mut out = Vec::new();
                let offset = t * queries.len() / 2;
                for i in 0..queries.len() {
                    let q = &queries[(i + offset) % queries.len()];
                    index.search(&q.hash, RADIUS, &|_| true, &mut out);
                    std::hint::black_box(out.len());
                }
            });
        }
    });
    2.0 * queries.len() as f64 / started.elapsed().as_secs_f64() / 2.0
}

fn recall(ds: &Dataset, found: &[Vec<(u32, u32)>]) -> (f64, bool) {
    let mut hit = 0usize;
    let mut identical = true;
    for (q, got) in found.iter().enumerate() {
        let truth = ds.truth.ids(q);
        let got_ids: Vec<u32> = got.iter().map(|&(id, _)| id).collect();
        identical &= got_ids == truth;
        hit += truth
            .iter()
            .filter(|id| got_ids.binary_search(id).is_ok())
            .count();
    }
    let total = ds.truth.pairs();
    let recall = if total == 0 {
        1.0
    } else {
        hit as f64 / total as f64
    };
    (recall, identical)
}

/// How well PDQ itself matches each transform at radius 31 (from the ground truth), and how many
/// known non-matches matched anything.
fn print_query_quality(ds: &Dataset) {
    let mut by_kind: BTreeMap<QueryKind, (usize, usize, usize)> = BTreeMap::new();
    for (q, query) in ds.queries.iter().enumerate() {
        let truth = ds.truth.ids(q);
        let entry = by_kind.entry(query.kind).or_default();
        entry.0 += 1;
        let matched = match query.source {
            Some(source) => truth.binary_search(&source).is_ok(),
            None => !truth.is_empty(),
        };
        entry.1 += usize::from(matched);
        entry.2 += truth.len();
    }
    println!("\nQueries at N={} (radius {RADIUS}):\n", ds.refs.len());
    println!(
        "| query kind | queries | found their source frame (or: matched anything) | reference frames within radius (mean) |"
    );
    println!("| --- | ---: | ---: | ---: |");
    for (kind, (count, matched, pairs)) in by_kind {
        println!(
            "| {} | {count} | {matched} ({:.1}%) | {:.1} |",
            kind.as_str(),
            100.0 * matched as f64 / count as f64,
            pairs as f64 / count as f64
        );
    }
}

fn bench_engine(ds: &Dataset, kind: EngineKind, runs: usize) -> Row {
    let n = ds.refs.len();
    let rss_before = rss_bytes();
    let frames = dataset::indexed_frames(ds);
    let started = Instant::now();
    let mut index = FrameIndex::new(kind, HnswParams::default());
    index.load(frames);
    let build_s = started.elapsed().as_secs_f64();
    let rss_after = rss_bytes();
    let memory = index.memory_bytes() as u64;
    eprintln!("  {kind} at {n}: built in {build_s:.2} s");

    let found = dataset::run_all(&index, &ds.queries, 2);
    let (recall, identical) = recall(ds, &found);

    let mut qps1 = Vec::new();
    let mut latencies = Vec::new();
    let mut qps2 = Vec::new();
    for _ in 0..runs {
        let (qps, lat) = pass_1t(&index, &ds.queries);
        qps1.push(qps);
        latencies.extend(lat);
        qps2.push(pass_2t(&index, &ds.queries));
    }
    latencies.sort_by(f64::total_cmp);
    let row = Row {
        n,
        engine: kind.as_str().to_string(),
        build_s,
        memory_bytes: memory,
        memory_bytes_per_frame: memory as f64 / n as f64,
        rss_delta_bytes_per_frame: rss_after.saturating_sub(rss_before) as f64 / n as f64,
        qps_1t: median(&mut qps1),
        qps_2t_per_core: median(&mut qps2),
        p50_us: percentile(&latencies, 50.0) * 1e6,
        p99_us: percentile(&latencies, 99.0) * 1e6,
        recall,
        identical_to_exact: identical,
        queries: ds.queries.len(),
        true_pairs: ds.truth.pairs(),
    };
    drop(index);
    row
}

/// The bare `mih` engine with `tables` tables: same measurements as [`bench_engine`], except
/// recall, which counts entry ids against the ground truth.
fn bench_mih_tables(ds: &Dataset, tables: usize, runs: usize) -> Row {
    let n = ds.refs.len();
    let rss_before = rss_bytes();
    let started = Instant::now();
    let mut engine = MihEngine::with_tables(tables);
    engine.add_batch(0, &ds.refs);
    let build_s = started.elapsed().as_secs_f64();
    let rss_after = rss_bytes();
    let memory = engine.memory_bytes() as u64;
    let search = |q: &Query, out: &mut Vec<(u32, u32)>| {
        out.clear();
        engine.search_radius(&q.hash, RADIUS, out);
    };
    let found: Vec<Vec<(u32, u32)>> = ds
        .queries
        .iter()
        .map(|q| {
            let mut out = Vec::new();
            search(q, &mut out);
            out.sort_unstable();
            out
        })
        .collect();
    let (recall, identical) = recall(ds, &found);
    let (mut qps1, mut qps2, mut latencies) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut out = Vec::new();
        let started = Instant::now();
        for q in &ds.queries {
            let t = Instant::now();
            search(q, &mut out);
            std::hint::black_box(out.len());
            latencies.push(t.elapsed().as_secs_f64());
        }
        qps1.push(ds.queries.len() as f64 / started.elapsed().as_secs_f64());
        let started = Instant::now();
        std::thread::scope(|scope| {
            for t in 0..2 {
                scope.spawn(move || {
                    let mut out = Vec::new();
                    let offset = t * ds.queries.len() / 2;
                    for i in 0..ds.queries.len() {
                        search(&ds.queries[(i + offset) % ds.queries.len()], &mut out);
                        std::hint::black_box(out.len());
                    }
                });
            }
        });
        qps2.push(ds.queries.len() as f64 / started.elapsed().as_secs_f64());
    }
    latencies.sort_by(f64::total_cmp);
    Row {
        n,
        engine: format!("mih engine, {tables} tables"),
        build_s,
        memory_bytes: memory,
        memory_bytes_per_frame: memory as f64 / n as f64,
        rss_delta_bytes_per_frame: rss_after.saturating_sub(rss_before) as f64 / n as f64,
        qps_1t: median(&mut qps1),
        qps_2t_per_core: median(&mut qps2),
        p50_us: percentile(&latencies, 50.0) * 1e6,
        p99_us: percentile(&latencies, 99.0) * 1e6,
        recall,
        identical_to_exact: identical,
        queries: ds.queries.len(),
        true_pairs: ds.truth.pairs(),
    }
}

fn main() {
    let o = options();
    let mut rows = Vec::new();
    for &n in &o.sizes {
        let ds = dataset::dataset(n);
        if o.generate_only {
            continue;
        }
        print_query_quality(&ds);
        for &kind in &o.engines {
            if kind == EngineKind::Hnsw && n > 100_000 && !o.hnsw_all_sizes {
                eprintln!("  skipping hnsw at {n} (use --hnsw-all-sizes)");
                continue;
            }
            rows.push(bench_engine(&ds, kind, o.runs));
        }
        for &tables in &o.mih_tables {
            rows.push(bench_mih_tables(&ds, tables, o.runs));
        }
    }
    if o.generate_only {
        return;
    }
    println!(
        "\nEngines, radius {RADIUS}, {} passes (medians); p50/p99 over all single-thread queries:\n",
        o.runs
    );
    println!(
        "| N | engine | queries/s (1 thread) | queries/s per core (2 threads) | p50 µs | p99 µs | recall | same as exact | build s | index bytes/frame | RSS bytes/frame |"
    );
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.4} | {} | {:.2} | {:.1} | {:.1} |",
            r.n,
            r.engine,
            r.qps_1t,
            r.qps_2t_per_core,
            r.p50_us,
            r.p99_us,
            r.recall,
            if r.identical_to_exact { "yes" } else { "no" },
            r.build_s,
            r.memory_bytes_per_frame,
            r.rss_delta_bytes_per_frame
        );
    }
    if let Some(path) = o.json {
        let text = serde_json::to_string_pretty(&rows).expect("rows to json");
        std::fs::write(&path, text).expect("write --json file");
    }
}
