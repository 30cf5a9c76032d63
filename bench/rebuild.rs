//! Searches and writes during a full index rebuild (issue #12 item 4): a [`SharedIndex`] of N PDQ
//! frames (engine `mih`, the server's default) or of N embedding vectors, several search threads
//! running continuously and one writer inserting references, then a full rebuild made due by
//! withdrawing a quarter of the references, as the server's withdrawals make it due.
//!
//! ```text
//! cargo bench --bench rebuild -- [--sizes 1M,10M] [--runs 3] [--modes background,inserts,locked]
//!     [--searchers 2] [--before-secs 5] [--after-secs 2] [--write-every-ms 5]
//!     [--vectors 50k] [--dimension 512] [--pdq-only | --vectors-only]
//! ```
//!
//! Modes:
//! - `inserts` (PDQ only): references are inserted until mih's main tables are outgrown (an
//!   eighth of them added since their build), which makes the same background rebuild due; the
//!   engine used to run that full build inside the insert, under the write lock.
//! - `background`: the last withdrawal goes through [`SharedIndex::withdraw`], which starts the
//!   background rebuild the server uses (chunked copy under read locks, build unlocked, swap under
//!   a short write lock); the bench thread waits for it to end.
//! - `locked`: the old behaviour for comparison, the whole rebuild done under the write lock
//!   (`SharedIndex::write().rebuild_now(..)`), as `FrameIndex::withdraw` did before.
//!
//! Per run it reports, for the searches that started before the rebuild ("before": the
//! `--before-secs` seconds after a 0.5 s warm-up) and those that overlapped it ("during"), the
//! count, searches/s, p50, p99, p99.9 and max single-search latency (the read lock's wait
//! included), and the same for the writer's `insert_reference` calls; then the rebuild's total
//! time and its longest write- and read-lock holds ([`framematch::index::RebuildReport`]; in
//! `locked` mode the write lock is held for the whole rebuild). The last table gives the medians
//! over the runs. `VmHWM` is the process's peak RSS.
//!
//! Data: seeded random 256-bit hashes in references of 100 frames (as `bench/index.rs`), queries
//! half near-duplicates of stored frames (8-24 bits flipped), half random, radius 31. Vectors:
//! seeded random unit vectors in references of 10, queries stored vectors with noise, k = 32.
//! The writer inserts a fresh reference (30 frames or 10 vectors) every `--write-every-ms`.

#![allow(clippy::print_stdout, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use framematch::hash::PdqHash;
use framematch::index::{
    EngineKind, FrameIndex, HnswParams, Match, RebuildReport, SharedIndex, Signal, SignalIndex,
    VectorMatch, VectorParams,
};
use framematch::model::{
    BankId, FrameEmbedding, FrameSignal, IndexedEmbedding, IndexedFrame, Metric, ReferenceId,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FRAMES_PER_REFERENCE: usize = 100;
const VECTORS_PER_REFERENCE: usize = 10;
const WRITER_FRAMES: usize = 30;
const QUERIES: usize = 4096;
const RADIUS: u32 = 31;
const SPACE: &str = "bench";
const K: usize = 32;
/// Share of the references withdrawn: the rebuild is due at 25 % of the entries tombstoned.
const WITHDRAWN_SHARE: f64 = 0.25;
const WARM_UP: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Background,
    Locked,
    Inserts,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Background => "background",
            Mode::Locked => "locked",
            Mode::Inserts => "inserts",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Pdq,
    Vectors,
}

#[derive(Debug)]
struct Options {
    sizes: Vec<usize>,
    vectors: Vec<usize>,
    dimension: usize,
    runs: usize,
    modes: Vec<Mode>,
    searchers: usize,
    before: Duration,
    after: Duration,
    write_every: Duration,
}

fn options() -> Options {
    let mut o = Options {
        sizes: vec![1_000_000, 10_000_000],
        vectors: vec![50_000],
        dimension: 512,
        runs: 3,
        modes: vec![Mode::Background, Mode::Inserts, Mode::Locked],
        searchers: 2,
        before: Duration::from_secs(5),
        after: Duration::from_secs(2),
        write_every: Duration::from_millis(5),
    };
    let mut args = std::env::args().skip(1);
    let secs =
        |v: Option<String>| Duration::from_secs_f64(v.and_then(|s| s.parse().ok()).unwrap_or(1.0));
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--sizes" => o.sizes = sizes(&args.next().unwrap_or_default()),
            "--vectors" => o.vectors = sizes(&args.next().unwrap_or_default()),
            "--pdq-only" => o.vectors.clear(),
            "--vectors-only" => o.sizes.clear(),
            "--dimension" => o.dimension = args.next().and_then(|d| d.parse().ok()).unwrap_or(512),
            "--runs" => o.runs = args.next().and_then(|r| r.parse().ok()).unwrap_or(3).max(1),
            "--modes" => {
                o.modes = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|m| match m.trim() {
                        "background" => Mode::Background,
                        "locked" => Mode::Locked,
                        "inserts" => Mode::Inserts,
                        other => panic!("mode {other:?}: background, locked or inserts"),
                    })
                    .collect();
            }
            "--searchers" => {
                o.searchers = args.next().and_then(|s| s.parse().ok()).unwrap_or(2).max(1);
            }
            "--before-secs" => o.before = secs(args.next()),
            "--after-secs" => o.after = secs(args.next()),
            "--write-every-ms" => {
                o.write_every =
                    Duration::from_millis(args.next().and_then(|s| s.parse().ok()).unwrap_or(5));
            }
            // cargo bench passes --bench; anything else is ignored too.
            _ => {}
        }
    }
    o
}

/// `100000`, `100k`, `1M`, `10m`, comma-separated; empty gives none.
fn sizes(text: &str) -> Vec<usize> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let lower = s.trim().to_ascii_lowercase();
            let (digits, factor) = match lower.strip_suffix('k') {
                Some(d) => (d.to_string(), 1_000),
                None => match lower.strip_suffix('m') {
                    Some(d) => (d.to_string(), 1_000_000),
                    None => (lower.clone(), 1),
                },
            };
            digits.parse::<usize>().expect("size") * factor
        })
        .collect()
}

/// Peak resident set size of this process (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn random_hash(rng: &mut StdRng) -> PdqHash {
    PdqHash::from_words(rng.random())
}

fn near(hash: &PdqHash, rng: &mut StdRng) -> PdqHash {
    let mut words = hash.words();
    for _ in 0..rng.random_range(8..=24) {
        let bit: usize = rng.random_range(0..256);
        words[bit / 64] ^= 1 << (bit % 64);
    }
    PdqHash::from_words(words)
}

fn unit_vector(rng: &mut StdRng, dimension: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..dimension)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

fn noisy(v: &[f32], rng: &mut StdRng) -> Vec<f32> {
    let mut q: Vec<f32> = v
        .iter()
        .map(|x| x + rng.random_range(-0.02f32..0.02))
        .collect();
    let norm = q
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    q.iter_mut().for_each(|x| *x /= norm);
    q
}

fn frame(index: usize, hash: PdqHash) -> FrameSignal {
    FrameSignal {
        frame_index: index as u32,
        timestamp_ms: index as u64 * 1000,
        hash,
        quality: 100,
    }
}

fn embedding(index: usize, vector: Vec<f32>) -> FrameEmbedding {
    FrameEmbedding {
        frame_index: index as u32,
        timestamp_ms: index as u64 * 1000,
        space: SPACE.to_string(),
        vector,
    }
}

/// What the searchers ask.
enum Queries {
    Pdq(Vec<PdqHash>),
    Vectors(Vec<Vec<f32>>),
}

/// A loaded index, its reference count and its queries.
fn build(
    kind: Kind,
    n: usize,
    dimension: usize,
    seed: u64,
) -> (SharedIndex, i64, Queries, Duration) {
    let mut rng = StdRng::seed_from_u64(seed);
    let shared = SharedIndex::new(SignalIndex::new(
        FrameIndex::new(EngineKind::Mih, HnswParams::default()),
        VectorParams::default(),
    ));
    match kind {
        Kind::Pdq => {
            let frames: Vec<IndexedFrame> = (0..n)
                .map(|i| IndexedFrame {
                    reference: ReferenceId((i / FRAMES_PER_REFERENCE) as i64 + 1),
                    bank: BankId(1),
                    frame: frame(i % FRAMES_PER_REFERENCE, random_hash(&mut rng)),
                })
                .collect();
            let queries = (0..QUERIES)
                .map(|q| {
                    if q % 2 == 0 {
                        near(&frames[rng.random_range(0..n)].frame.hash, &mut rng)
                    } else {
                        random_hash(&mut rng)
                    }
                })
                .collect();
            let started = Instant::now();
            shared.load(frames, Vec::new());
            let loaded = started.elapsed();
            (
                shared,
                n.div_ceil(FRAMES_PER_REFERENCE) as i64,
                Queries::Pdq(queries),
                loaded,
            )
        }
        Kind::Vectors => {
            shared
                .ensure_space(SPACE, dimension, Metric::Cosine)
                .expect("a new space");
            let vectors: Vec<IndexedEmbedding> = (0..n)
                .map(|i| IndexedEmbedding {
                    reference: ReferenceId((i / VECTORS_PER_REFERENCE) as i64 + 1),
                    bank: BankId(1),
                    embedding: embedding(
                        i % VECTORS_PER_REFERENCE,
                        unit_vector(&mut rng, dimension),
                    ),
                })
                .collect();
            let queries = (0..QUERIES.min(1024))
                .map(|_| noisy(&vectors[rng.random_range(0..n)].embedding.vector, &mut rng))
                .collect();
            let started = Instant::now();
            shared.load(Vec::new(), vectors);
            let loaded = started.elapsed();
            (
                shared,
                n.div_ceil(VECTORS_PER_REFERENCE) as i64,
                Queries::Vectors(queries),
                loaded,
            )
        }
    }
}

/// One timed call: its start (since the run's epoch) and its length, in nanoseconds.
type Sample = (u64, u64);

fn searcher(
    shared: SharedIndex,
    queries: Arc<Queries>,
    offset: usize,
    epoch: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let mut samples = Vec::with_capacity(1 << 20);
    let mut hits: Vec<Match> = Vec::new();
    let mut vector_hits: Vec<VectorMatch> = Vec::new();
    let mut next = offset;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        match &*queries {
            Queries::Pdq(q) => {
                let index = shared.read();
                index
                    .pdq()
                    .search(&q[next % q.len()], RADIUS, &|_| true, &mut hits);
            }
            Queries::Vectors(q) => {
                let index = shared.read();
                if let Some(space) = index.space(SPACE) {
                    space.search(&q[next % q.len()], 0.0, K, &|_| true, &mut vector_hits);
                }
            }
        }
        let took = started.elapsed();
        std::hint::black_box((hits.len(), vector_hits.len()));
        samples.push((
            started.duration_since(epoch).as_nanos() as u64,
            took.as_nanos() as u64,
        ));
        next += 1;
    }
    samples
}

fn writer(
    shared: SharedIndex,
    kind: Kind,
    dimension: usize,
    first_id: i64,
    every: Duration,
    epoch: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let mut rng = StdRng::seed_from_u64(first_id as u64);
    let mut samples = Vec::new();
    let mut id = first_id;
    let mut due = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let (frames, vectors): (Vec<FrameSignal>, Vec<FrameEmbedding>) = match kind {
            Kind::Pdq => (
                (0..WRITER_FRAMES)
                    .map(|i| frame(i, random_hash(&mut rng)))
                    .collect(),
                Vec::new(),
            ),
            Kind::Vectors => (
                Vec::new(),
                (0..VECTORS_PER_REFERENCE)
                    .map(|i| embedding(i, unit_vector(&mut rng, dimension)))
                    .collect(),
            ),
        };
        let started = Instant::now();
        let inserted = shared.insert_reference(ReferenceId(id), BankId(1), &frames, &vectors);
        let took = started.elapsed();
        assert!(inserted, "a fresh reference is inserted");
        samples.push((
            started.duration_since(epoch).as_nanos() as u64,
            took.as_nanos() as u64,
        ));
        id += 1;
        due += every;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    samples
}

/// Latency figures of the calls of one phase, in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    count: usize,
    per_second: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

fn stats(samples: &[Sample], from: u64, to: u64) -> Stats {
    // A call belongs to the window when it overlaps it.
    let mut ms: Vec<f64> = samples
        .iter()
        .filter(|(start, took)| *start < to && start + took > from)
        .map(|(_, took)| *took as f64 / 1e6)
        .collect();
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| {
        if ms.is_empty() {
            f64::NAN
        } else {
            ms[((ms.len() as f64 * p) as usize).min(ms.len() - 1)]
        }
    };
    let seconds = (to.saturating_sub(from)) as f64 / 1e9;
    Stats {
        count: ms.len(),
        per_second: ms.len() as f64 / seconds.max(1e-9),
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: ms.last().copied().unwrap_or(f64::NAN),
    }
}

#[derive(Clone, Debug)]
struct Run {
    kind: Kind,
    n: usize,
    mode: Mode,
    load_s: f64,
    before: Stats,
    during: Stats,
    writes_before: Stats,
    writes_during: Stats,
    rebuild_s: f64,
    write_lock_ms: f64,
    read_lock_ms: f64,
    entries: usize,
    tombstones_dropped: usize,
    memory_bytes: usize,
    peak_rss_mib: f64,
}

fn run_once(o: &Options, kind: Kind, n: usize, mode: Mode, seed: u64) -> Run {
    let (shared, references, queries, loaded) = build(kind, n, o.dimension, seed);
    let signal = match kind {
        Kind::Pdq => Signal::Pdq,
        Kind::Vectors => Signal::Space(SPACE.to_string()),
    };
    // Withdraw a quarter of the references but two through the plain write lock, which starts
    // nothing; the rest (with what the writer adds meanwhile) are withdrawn when the rebuild is
    // to start.
    let per_reference = match kind {
        Kind::Pdq => FRAMES_PER_REFERENCE,
        Kind::Vectors => VECTORS_PER_REFERENCE,
    };
    let writer_refs = ((o.before + WARM_UP).as_secs_f64() / o.write_every.as_secs_f64()) as usize;
    let writer_share = WRITER_FRAMES * writer_refs;
    let to_withdraw = ((n as f64 * WITHDRAWN_SHARE) as usize / per_reference)
        .saturating_sub(2)
        .min(references as usize / 2) as i64;
    // Whether a quarter of the signal's entries are tombstoned (a rebuild is then due, or running).
    let quarter_gone = |index: &SignalIndex| -> bool {
        let (tombstones, live) = match kind {
            Kind::Pdq => (index.pdq().tombstones(), index.pdq().live_frames()),
            Kind::Vectors => index
                .space(SPACE)
                .map_or((0, 0), |s| (s.tombstones(), s.live_vectors())),
        };
        tombstones as f64 >= WITHDRAWN_SHARE * (tombstones + live) as f64
    };
    // Inserts mode: instead, insert (in references of 1,000 frames) up to 20,000 frames short of
    // what makes mih's full build due (an eighth of the main tables, less what the writer adds).
    let mut bulk_id = 1i64 << 41;
    let main_share = (n / 8).saturating_sub(writer_share + 20_000);
    {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let mut index = shared.write();
        match mode {
            Mode::Inserts => {
                let mut added = 0;
                while added < main_share {
                    let frames: Vec<FrameSignal> =
                        (0..1000).map(|i| frame(i, random_hash(&mut rng))).collect();
                    assert!(index.insert_reference(ReferenceId(bulk_id), BankId(1), &frames, &[]));
                    bulk_id += 1;
                    added += frames.len();
                }
            }
            Mode::Background | Mode::Locked => {
                for id in 1..to_withdraw {
                    index.withdraw(ReferenceId(id));
                }
            }
        }
        assert!(index.rebuilds_due().is_empty(), "no rebuild due yet");
    }
    let queries = Arc::new(queries);
    let stop = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let searchers: Vec<_> = (0..o.searchers)
        .map(|t| {
            let (shared, queries, stop) = (shared.clone(), Arc::clone(&queries), Arc::clone(&stop));
            thread::spawn(move || searcher(shared, queries, t * 977, epoch, stop))
        })
        .collect();
    let writes = {
        let (shared, stop) = (shared.clone(), Arc::clone(&stop));
        let (dimension, every) = (o.dimension, o.write_every);
        thread::spawn(move || writer(shared, kind, dimension, 1 << 40, every, epoch, stop))
    };
    thread::sleep(WARM_UP + o.before);
    let triggered = epoch.elapsed();
    let report: RebuildReport = match mode {
        Mode::Background => {
            let before = shared.rebuild_reports().len();
            // The server's path: the withdrawal that makes the rebuild due starts it.
            let mut id = to_withdraw;
            while !quarter_gone(&shared.read()) {
                shared.withdraw(ReferenceId(id));
                id += 1;
            }
            shared.wait_for_rebuilds();
            let reports = shared.rebuild_reports();
            assert!(reports.len() > before, "the withdrawal started a rebuild");
            reports[before].clone()
        }
        Mode::Inserts => {
            let before = shared.rebuild_reports().len();
            // Enough frames in one reference to pass an eighth of the main tables.
            let entries = {
                let index = shared.read();
                index.pdq().live_frames() + index.pdq().tombstones()
            };
            let short = (n / 8 + 1).saturating_sub(entries - n) + 2_000;
            let mut rng = StdRng::seed_from_u64(seed ^ 0x7e57);
            let frames: Vec<FrameSignal> = (0..short)
                .map(|i| frame(i, random_hash(&mut rng)))
                .collect();
            let started = Instant::now();
            assert!(shared.insert_reference(ReferenceId(bulk_id), BankId(1), &frames, &[]));
            eprintln!(
                "trigger insert of {short} frames: {:.2} ms",
                started.elapsed().as_secs_f64() * 1e3
            );
            shared.wait_for_rebuilds();
            let reports = shared.rebuild_reports();
            assert!(reports.len() > before, "the insert started a rebuild");
            reports[before].clone()
        }
        Mode::Locked => {
            let mut index = shared.write();
            let mut id = to_withdraw;
            while !quarter_gone(&index) {
                index.withdraw(ReferenceId(id));
                id += 1;
            }
            let held = Instant::now();
            let tombstones = match kind {
                Kind::Pdq => index.pdq().tombstones(),
                Kind::Vectors => index.space(SPACE).map_or(0, |s| s.tombstones()),
            };
            index.rebuild_now(&signal);
            let elapsed = held.elapsed();
            let entries = match kind {
                Kind::Pdq => index.pdq().live_frames(),
                Kind::Vectors => index.space(SPACE).map_or(0, |s| s.live_vectors()),
            };
            RebuildReport {
                signal: signal.clone(),
                entries,
                tombstones_dropped: tombstones,
                elapsed,
                longest_write_lock: elapsed,
                longest_read_lock: Duration::ZERO,
                memory_bytes: index.memory_bytes(),
            }
        }
    };
    let done = epoch.elapsed();
    thread::sleep(o.after);
    stop.store(true, Ordering::Relaxed);
    let samples: Vec<Sample> = searchers
        .into_iter()
        .flat_map(|s| s.join().expect("searcher"))
        .collect();
    let write_samples = writes.join().expect("writer");
    let (warm, t0, t1) = (
        WARM_UP.as_nanos() as u64,
        triggered.as_nanos() as u64,
        done.as_nanos() as u64,
    );
    Run {
        kind,
        n,
        mode,
        load_s: loaded.as_secs_f64(),
        before: stats(&samples, warm, t0),
        during: stats(&samples, t0, t1),
        writes_before: stats(&write_samples, warm, t0),
        writes_during: stats(&write_samples, t0, t1),
        rebuild_s: report.elapsed.as_secs_f64(),
        write_lock_ms: report.longest_write_lock.as_secs_f64() * 1e3,
        read_lock_ms: report.longest_read_lock.as_secs_f64() * 1e3,
        entries: report.entries,
        tombstones_dropped: report.tombstones_dropped,
        memory_bytes: report.memory_bytes,
        peak_rss_mib: peak_rss_mib(),
    }
}

fn header() {
    println!(
        "| index | N | mode | run | searches before / during | search p50 before / during ms | p99 before / during | p99.9 before / during | max before / during | writes during | write p99 / max during ms | rebuild s | longest write lock ms | longest read lock ms | entries after | tombstones dropped | index MiB | peak RSS MiB |"
    );
    println!(
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
}

fn row(r: &Run, label: &str) {
    let kind = match r.kind {
        Kind::Pdq => "pdq mih",
        Kind::Vectors => "vectors",
    };
    println!(
        "| {kind} | {} | {} | {label} | {} / {} | {:.3} / {:.3} | {:.3} / {:.3} | {:.3} / {:.3} | {:.2} / {:.2} | {} | {:.3} / {:.2} | {:.2} | {:.3} | {:.3} | {} | {} | {:.0} | {:.0} |",
        r.n,
        r.mode.name(),
        r.before.count,
        r.during.count,
        r.before.p50,
        r.during.p50,
        r.before.p99,
        r.during.p99,
        r.before.p999,
        r.during.p999,
        r.before.max,
        r.during.max,
        r.writes_during.count,
        r.writes_during.p99,
        r.writes_during.max,
        r.rebuild_s,
        r.write_lock_ms,
        r.read_lock_ms,
        r.entries,
        r.tombstones_dropped,
        r.memory_bytes as f64 / (1 << 20) as f64,
        r.peak_rss_mib,
    );
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn median_run(runs: &[Run]) -> Run {
    let m = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f));
    let ms = |f: &dyn Fn(&Run) -> Stats| Stats {
        count: m(&|r| f(r).count as f64) as usize,
        per_second: m(&|r| f(r).per_second),
        p50: m(&|r| f(r).p50),
        p99: m(&|r| f(r).p99),
        p999: m(&|r| f(r).p999),
        max: m(&|r| f(r).max),
    };
    Run {
        kind: runs[0].kind,
        n: runs[0].n,
        mode: runs[0].mode,
        load_s: m(&|r| r.load_s),
        before: ms(&|r| r.before),
        during: ms(&|r| r.during),
        writes_before: ms(&|r| r.writes_before),
        writes_during: ms(&|r| r.writes_during),
        rebuild_s: m(&|r| r.rebuild_s),
        write_lock_ms: m(&|r| r.write_lock_ms),
        read_lock_ms: m(&|r| r.read_lock_ms),
        entries: m(&|r| r.entries as f64) as usize,
        tombstones_dropped: m(&|r| r.tombstones_dropped as f64) as usize,
        memory_bytes: m(&|r| r.memory_bytes as f64) as usize,
        peak_rss_mib: m(&|r| r.peak_rss_mib),
    }
}

fn main() {
    let o = options();
    println!(
        "{} search threads, one writer (a reference every {} ms), {} s before the rebuild, {} run(s) each; {} cores",
        o.searchers,
        o.write_every.as_millis(),
        o.before.as_secs_f64(),
        o.runs,
        thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let cases: Vec<(Kind, usize)> = o
        .sizes
        .iter()
        .map(|&n| (Kind::Pdq, n))
        .chain(o.vectors.iter().map(|&n| (Kind::Vectors, n)))
        .collect();
    let mut medians = Vec::new();
    header();
    for &(kind, n) in &cases {
        for &mode in &o.modes {
            // Vector spaces have no insert-driven rebuild to trigger here (their graph rebuilds
            // are due by size, as the withdrawals' are).
            if kind == Kind::Vectors && mode == Mode::Inserts {
                continue;
            }
            let mut runs = Vec::new();
            for run in 0..o.runs {
                let r = run_once(&o, kind, n, mode, 42 + run as u64);
                eprintln!(
                    "{:?} {n} {} run {}: loaded in {:.2} s, writes before {} (p99 {:.3} ms, max {:.2} ms)",
                    kind,
                    mode.name(),
                    run + 1,
                    r.load_s,
                    r.writes_before.count,
                    r.writes_before.p99,
                    r.writes_before.max
                );
                row(&r, &(run + 1).to_string());
                runs.push(r);
            }
            medians.push(median_run(&runs));
        }
    }
    println!();
    println!("Medians over the runs:");
    println!();
    header();
    for r in &medians {
        row(r, "median");
    }
}
