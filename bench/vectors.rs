//! Vector index benchmark (issue #11 item 7): `VectorIndex` (int8 codes, hnsw_rs-built graph
//! flattened to CSR) at 100k and 1M 512-d SSCD descriptors of real frames plus distractors, on the
//! files of `bench/vectors_data.py` (run it first). Per N and graph setting: build time (load:
//! quantise + graph on all cores), bytes per frame (`VectorIndex::memory_bytes` and the process
//! RSS delta), and per `ef_search`: recall@10 against the exact flat scan of the same index
//! (`search_exact`, int8 codes) and against the exact f32 top 10 (the file's truth, as faiss's
//! IndexFlatIP gives), epsilon-recall (answers within 0.001 of the f32 10th best score), how often the query's original is in the top 10, and queries/s on one core
//! (one thread, median of `--runs` passes over every query). `bench/compare_faiss_vectors.py`
//! measures faiss on the same files and prints both.
//!
//! ```text
//! cargo bench --bench vectors -- [--sizes 100k,1M] [--m 16,32] [--ef-construction 128]
//!     [--ef-search 16,32,64,128,256] [--runs 3] [--builds 1] [--exact-queries 200]
//!     [--data target/vectors-bench] [--json PATH]
//! ```
//!
//! Environment: `FRAMEMATCH_VECTORS_SIZES` and `FRAMEMATCH_VECTORS_M` stand in for `--sizes` and
//! `--m`. `--builds` repeats the build (median reported; the last one is searched). The flat
//! scan's queries/s is timed on the first `--exact-queries` queries (it takes ~50 ms a query at
//! 1M); its answers for every query are computed once on all cores.

#![allow(clippy::print_stdout, clippy::print_stderr, missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use framematch::index::{VectorIndex, VectorMatch, VectorParams};
use framematch::model::{BankId, FrameEmbedding, Metric, ReferenceId};
use serde::Serialize;

const DIM: usize = 512;
const K: usize = 10;
const FRAMES_PER_REFERENCE: usize = 100;
/// Cosine tolerance of [`epsilon_recall`].
const EPSILON: f32 = 1e-3;

#[derive(Debug)]
struct Options {
    sizes: Vec<usize>,
    m: Vec<usize>,
    ef_construction: usize,
    ef_search: Vec<usize>,
    runs: usize,
    builds: usize,
    exact_queries: usize,
    data: PathBuf,
    json: Option<String>,
}

fn parse_size(text: &str) -> usize {
    let t = text.trim().to_lowercase();
    let (digits, unit) = if let Some(d) = t.strip_suffix('k') {
        (d, 1_000)
    } else if let Some(d) = t.strip_suffix('m') {
        (d, 1_000_000)
    } else {
        (t.as_str(), 1)
    };
    digits
        .parse::<usize>()
        .expect("a size like 100k, 1M or 250000")
        * unit
}

fn list(text: &str) -> Vec<usize> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(parse_size)
        .collect()
}

fn options() -> Options {
    let mut o = Options {
        sizes: std::env::var("FRAMEMATCH_VECTORS_SIZES")
            .map(|s| list(&s))
            .unwrap_or_else(|_| vec![100_000, 1_000_000]),
        m: std::env::var("FRAMEMATCH_VECTORS_M")
            .map(|s| list(&s))
            .unwrap_or_else(|_| vec![16]),
        ef_construction: VectorParams::default().ef_construction,
        ef_search: vec![10, 16, 24, 32, 48, 64, 96, 128, 192, 256],
        runs: 3,
        builds: 1,
        exact_queries: 200,
        data: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/vectors-bench"),
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match arg.as_str() {
            "--sizes" => o.sizes = list(&value()),
            "--m" => o.m = list(&value()),
            "--ef-construction" => o.ef_construction = parse_size(&value()),
            "--ef-search" => o.ef_search = list(&value()),
            "--runs" => o.runs = parse_size(&value()).max(1),
            "--builds" => o.builds = parse_size(&value()).max(1),
            "--exact-queries" => o.exact_queries = parse_size(&value()).max(1),
            "--data" => o.data = PathBuf::from(value()),
            "--json" => o.json = Some(value()),
            // cargo bench passes --bench to harness-less benches.
            "--bench" => {}
            other => panic!("unknown argument {other:?}; see bench/vectors.rs"),
        }
    }
    o
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run python3 bench/vectors_data.py first",
            path.display()
        )
    });
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn read_i32(path: &Path) -> Vec<i32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Resident set size and its peak (VmHWM), bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

struct Data {
    base: Vec<f32>,
    queries: Vec<f32>,
    /// Per query, the f32 top 10 rows.
    truth: Vec<Vec<u32>>,
    /// Per query, the f32 score of its 10th best row.
    tenth: Vec<f32>,
    /// Per query, the database row of its original.
    originals: Vec<u32>,
}

fn load_data(dir: &Path, n: usize) -> Data {
    let base = read_f32(&dir.join(format!("base-{n}.f32")));
    assert_eq!(
        base.len(),
        n * DIM,
        "base-{n}.f32 holds {} values",
        base.len()
    );
    let queries = read_f32(&dir.join("queries.f32"));
    let q = queries.len() / DIM;
    let truth_ids = read_i32(&dir.join(format!("truth-{n}.i32")));
    let truth_k = truth_ids.len() / q;
    let truth = truth_ids
        .chunks_exact(truth_k)
        .map(|row| row.iter().take(K).map(|&i| i as u32).collect())
        .collect();
    let truth_scores = read_f32(&dir.join(format!("truth-{n}.f32")));
    let tenth = truth_scores
        .chunks_exact(truth_k)
        .map(|row| row[K - 1])
        .collect();
    let real_of = read_i32(&dir.join(format!("base-{n}.real.i32")));
    let mut position = vec![u32::MAX; real_of.iter().map(|&r| r + 1).max().unwrap_or(0) as usize];
    for (row, &r) in real_of.iter().enumerate() {
        if r >= 0 {
            position[r as usize] = row as u32;
        }
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("queries.json")).expect("queries.json"))
            .expect("queries.json parses");
    let originals = meta
        .as_array()
        .expect("a list")
        .iter()
        .map(|row| position[row["original"].as_u64().expect("original") as usize])
        .collect();
    Data {
        base,
        queries,
        truth,
        tenth,
        originals,
    }
}

impl Data {
    fn query(&self, i: usize) -> &[f32] {
        &self.queries[i * DIM..(i + 1) * DIM]
    }

    /// `query · row` in f32, as the truth was computed.
    fn score(&self, query: usize, row: u32) -> f32 {
        let v = &self.base[row as usize * DIM..(row as usize + 1) * DIM];
        v.iter().zip(self.query(query)).map(|(a, b)| a * b).sum()
    }

    fn query_count(&self) -> usize {
        self.queries.len() / DIM
    }
}

/// Row of a match: references hold `FRAMES_PER_REFERENCE` consecutive rows.
fn row(m: &VectorMatch) -> u32 {
    (m.reference.0 as u32 - 1) * FRAMES_PER_REFERENCE as u32 + m.frame_index
}

fn build(data: &Data, params: VectorParams) -> (VectorIndex, f64, u64, u64) {
    let (rss_before, _) = rss();
    let embeddings: Vec<FrameEmbedding> = data
        .base
        .chunks_exact(DIM)
        .enumerate()
        .map(|(i, v)| FrameEmbedding {
            frame_index: (i % FRAMES_PER_REFERENCE) as u32,
            timestamp_ms: (i % FRAMES_PER_REFERENCE) as u64 * 1000,
            space: String::new(),
            vector: v.to_vec(),
        })
        .collect();
    let rows: Vec<(ReferenceId, BankId, &FrameEmbedding)> = embeddings
        .iter()
        .enumerate()
        .map(|(i, e)| {
            (
                ReferenceId((i / FRAMES_PER_REFERENCE) as i64 + 1),
                BankId(1),
                e,
            )
        })
        .collect();
    let mut index = VectorIndex::new(DIM, Metric::Cosine, params);
    let started = Instant::now();
    index.load(rows);
    let seconds = started.elapsed().as_secs_f64();
    drop(embeddings);
    let (rss_after, peak) = rss();
    (
        index,
        seconds,
        rss_after.saturating_sub(rss_before),
        peak.saturating_sub(rss_before),
    )
}

#[derive(Serialize, Clone)]
struct Row {
    n: usize,
    engine: String,
    m: usize,
    ef_construction: usize,
    ef_search: usize,
    build_s: f64,
    build_s_all: Vec<f64>,
    build_threads: usize,
    memory_bytes_per_frame: f64,
    rss_delta_bytes_per_frame: f64,
    rss_peak_delta_bytes_per_frame: f64,
    recall_vs_flat: f64,
    recall_vs_f32: f64,
    epsilon_recall: f64,
    original_in_top10: f64,
    qps_1t: f64,
    qps_1t_all: Vec<f64>,
    queries: usize,
}

fn recall(found: &[Vec<u32>], truth: &[Vec<u32>]) -> f64 {
    let hits: usize = found
        .iter()
        .zip(truth)
        .map(|(f, t)| f.iter().filter(|id| t.contains(id)).count())
        .sum();
    hits as f64 / (truth.len() * K) as f64
}

/// Share of the answers (10 per query) whose f32 score is within `EPSILON` of the 10th best f32
/// score: the recall ann-benchmarks calls epsilon-recall, insensitive to near-ties that int8 codes
/// may swap.
fn epsilon_recall(found: &[Vec<u32>], data: &Data) -> f64 {
    let hits: usize = found
        .iter()
        .enumerate()
        .map(|(q, f)| {
            f.iter()
                .filter(|&&row| data.score(q, row) >= data.tenth[q] - EPSILON)
                .count()
        })
        .sum();
    hits as f64 / (found.len() * K) as f64
}

fn originals(found: &[Vec<u32>], data: &Data) -> f64 {
    let hit = found
        .iter()
        .zip(&data.originals)
        .filter(|(f, o)| f.contains(o))
        .count();
    hit as f64 / found.len() as f64
}

/// The first `answers` queries through `search` once (their answers), then `runs` timed passes
/// over the first `queries` on one thread.
fn measure(
    data: &Data,
    answers: usize,
    queries: usize,
    runs: usize,
    search: &dyn Fn(&[f32], &mut Vec<VectorMatch>),
) -> (Vec<Vec<u32>>, Vec<f64>) {
    let mut out = Vec::new();
    let found = (0..answers.min(data.query_count()))
        .map(|i| {
            search(data.query(i), &mut out);
            out.iter().map(row).collect()
        })
        .collect();
    let qps = (0..runs)
        .map(|_| {
            let started = Instant::now();
            for i in 0..queries {
                search(data.query(i), &mut out);
                std::hint::black_box(out.len());
            }
            queries as f64 / started.elapsed().as_secs_f64()
        })
        .collect();
    (found, qps)
}

fn exact_answers(index: &VectorIndex, data: &Data) -> Vec<Vec<u32>> {
    let q = data.query_count();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = q.div_ceil(threads);
    let mut answers = vec![Vec::new(); q];
    std::thread::scope(|scope| {
        for (t, part) in answers.chunks_mut(chunk).enumerate() {
            scope.spawn(move || {
                let mut out = Vec::new();
                for (j, slot) in part.iter_mut().enumerate() {
                    index.search_exact(data.query(t * chunk + j), f32::MIN, K, &|_| true, &mut out);
                    *slot = out.iter().map(row).collect();
                }
            });
        }
    });
    answers
}

fn main() {
    let o = options();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows: Vec<Row> = Vec::new();
    for &n in &o.sizes {
        let data = load_data(&o.data, n);
        let q = data.query_count();
        eprintln!("N={n}: {q} queries");
        let mut flat_done = false;
        for &m in &o.m {
            // `--m 0`: no graph, the flat scan alone (a 1M graph build takes many minutes here).
            let params = VectorParams {
                max_connections: m.max(2),
                ef_construction: o.ef_construction,
                graph_min: if m == 0 { usize::MAX } else { 1 },
                ..VectorParams::default()
            };
            let mut build_s = Vec::new();
            let mut built = None;
            for b in 0..o.builds {
                // The previous build is dropped first, so that the RSS delta is this one's.
                drop(built.take());
                let (index, seconds, rss_delta, peak_delta) = build(&data, params);
                eprintln!(
                    "  M={m} build {}/{}: {seconds:.1} s, {} bytes/frame, RSS +{} bytes/frame (peak +{})",
                    b + 1,
                    o.builds,
                    index.memory_bytes() / n,
                    rss_delta / n as u64,
                    peak_delta / n as u64
                );
                build_s.push(seconds);
                built = Some((index, rss_delta, peak_delta));
            }
            let Some((mut index, rss_delta, peak_delta)) = built else {
                continue;
            };
            let memory = index.memory_bytes() as f64 / n as f64;
            let template = Row {
                n,
                engine: String::new(),
                m,
                ef_construction: o.ef_construction,
                ef_search: 0,
                build_s: median(build_s.clone()),
                build_s_all: build_s.clone(),
                build_threads: threads,
                memory_bytes_per_frame: memory,
                rss_delta_bytes_per_frame: rss_delta as f64 / n as f64,
                rss_peak_delta_bytes_per_frame: peak_delta as f64 / n as f64,
                recall_vs_flat: 0.0,
                recall_vs_f32: 0.0,
                epsilon_recall: 0.0,
                original_in_top10: 0.0,
                qps_1t: 0.0,
                qps_1t_all: Vec::new(),
                queries: q,
            };
            if m == 0 {
                let timed = o.exact_queries.min(q);
                let (found, qps) = measure(&data, timed, timed, o.runs, &|query, out| {
                    index.search_exact(query, f32::MIN, K, &|_| true, out);
                });
                let found = &found[..];
                let truth = &data.truth[..timed];
                rows.push(Row {
                    engine: "ours-flat-int8".into(),
                    m: 0,
                    ef_construction: 0,
                    build_s: median(build_s),
                    recall_vs_flat: 1.0,
                    recall_vs_f32: recall(found, truth),
                    epsilon_recall: epsilon_recall(found, &data),
                    original_in_top10: originals(found, &data),
                    qps_1t: median(qps.clone()),
                    qps_1t_all: qps,
                    queries: timed,
                    ..template.clone()
                });
                eprintln!(
                    "  flat alone: recall vs f32 {:.4}, {:.1} q/s",
                    rows.last().map_or(0.0, |r| r.recall_vs_f32),
                    rows.last().map_or(0.0, |r| r.qps_1t)
                );
                continue;
            }
            let flat = exact_answers(&index, &data);
            if !flat_done {
                flat_done = true;
                let timed = o.exact_queries.min(q);
                let (_, qps) = measure(&data, 0, timed, o.runs, &|query, out| {
                    index.search_exact(query, f32::MIN, K, &|_| true, out);
                });
                rows.push(Row {
                    engine: "ours-flat-int8".into(),
                    m: 0,
                    ef_construction: 0,
                    build_s: 0.0,
                    build_s_all: Vec::new(),
                    recall_vs_flat: 1.0,
                    recall_vs_f32: recall(&flat, &data.truth),
                    epsilon_recall: epsilon_recall(&flat, &data),
                    original_in_top10: originals(&flat, &data),
                    qps_1t: median(qps.clone()),
                    qps_1t_all: qps,
                    queries: timed,
                    ..template.clone()
                });
                eprintln!(
                    "  flat: recall vs f32 {:.4}, {:.1} q/s",
                    rows.last().map_or(0.0, |r| r.recall_vs_f32),
                    rows.last().map_or(0.0, |r| r.qps_1t)
                );
            }
            for &ef in &o.ef_search {
                index.set_ef_search(ef);
                let (found, qps) = measure(&data, q, q, o.runs, &|query, out| {
                    index.search(query, f32::MIN, K, &|_| true, out);
                });
                let row = Row {
                    engine: format!("ours-hnsw-M{m}"),
                    ef_search: ef,
                    recall_vs_flat: recall(&found, &flat),
                    recall_vs_f32: recall(&found, &data.truth),
                    epsilon_recall: epsilon_recall(&found, &data),
                    original_in_top10: originals(&found, &data),
                    qps_1t: median(qps.clone()),
                    qps_1t_all: qps,
                    ..template.clone()
                };
                eprintln!(
                    "  M={m} ef={ef}: recall@10 {:.4} vs flat, {:.4} vs f32, {:.0} q/s",
                    row.recall_vs_flat, row.recall_vs_f32, row.qps_1t
                );
                rows.push(row);
            }
        }
        drop(data);
    }
    println!(
        "\n| N | engine | M | ef_search | recall@10 vs flat int8 | vs f32 | ε-recall@10 | original in top 10 | queries/s (1 core) | build s ({threads} threads) | memory_bytes/frame | RSS delta/frame |"
    );
    println!(
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.0} | {:.1} | {:.0} | {:.0} |",
            r.n,
            r.engine,
            r.m,
            r.ef_search,
            r.recall_vs_flat,
            r.recall_vs_f32,
            r.epsilon_recall,
            r.original_in_top10,
            r.qps_1t,
            r.build_s,
            r.memory_bytes_per_frame,
            r.rss_delta_bytes_per_frame
        );
    }
    if let Some(path) = &o.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&rows).expect("serialises"),
        )
        .expect("writes the JSON");
    }
}
