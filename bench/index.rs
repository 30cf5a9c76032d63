//! Index search speed: one PDQ query at radius 31 against N reference frames, per engine.
//!
//! Run: `cargo bench --bench index` (all sizes) or `cargo bench --bench index -- exact/1000000`.
//! Criterion reports the time per query (median and spread) and queries/s ("elem/s"), one core.
//!
//! Data: seeded random 256-bit hashes (unrelated PDQ hashes sit ~128 bits apart, as random ones
//! do); queries are half near-duplicates of stored frames (8 to 24 bits flipped, so each has at
//! least one true match) and half random (no match). `FRAMEMATCH_BENCH_SIZES=100000,1000000`
//! overrides the sizes and `FRAMEMATCH_BENCH_ENGINES=exact,mih` the engines (building hnsw at
//! 100k takes minutes on 2 cores).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use framematch::hash::PdqHash;
use framematch::index::{EngineKind, FrameIndex, HnswParams, Match};
use framematch::model::{BankId, FrameSignal, IndexedFrame, ReferenceId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FRAMES_PER_REFERENCE: usize = 100;
const QUERIES: usize = 1000;

fn random_hash(rng: &mut StdRng) -> PdqHash {
    let mut bytes = [0u8; 32];
    rng.fill(&mut bytes);
    PdqHash::from_bytes(bytes)
}

fn near(hash: &PdqHash, rng: &mut StdRng) -> PdqHash {
    let flips = rng.random_range(8..=24);
    let mut bytes = *hash.as_bytes();
    for _ in 0..flips {
        let bit: usize = rng.random_range(0..256);
        bytes[bit / 8] ^= 1 << (bit % 8);
    }
    PdqHash::from_bytes(bytes)
}

fn dataset(n: usize, seed: u64) -> (Vec<IndexedFrame>, Vec<PdqHash>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let frames: Vec<IndexedFrame> = (0..n)
        .map(|i| IndexedFrame {
            reference: ReferenceId((i / FRAMES_PER_REFERENCE) as i64 + 1),
            bank: BankId(1),
            frame: FrameSignal {
                frame_index: (i % FRAMES_PER_REFERENCE) as u32,
                timestamp_ms: (i % FRAMES_PER_REFERENCE) as u64 * 1000,
                hash: random_hash(&mut rng),
                quality: 100,
            },
        })
        .collect();
    let queries = (0..QUERIES)
        .map(|q| {
            if q % 2 == 0 {
                let target = rng.random_range(0..n);
                near(&frames[target].frame.hash, &mut rng)
            } else {
                random_hash(&mut rng)
            }
        })
        .collect();
    (frames, queries)
}

fn sizes() -> Vec<usize> {
    std::env::var("FRAMEMATCH_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100_000, 1_000_000])
}

/// Engines to measure: `FRAMEMATCH_BENCH_ENGINES=exact,mih` (default: all three).
fn engines() -> Vec<EngineKind> {
    std::env::var("FRAMEMATCH_BENCH_ENGINES")
        .ok()
        .map(|s| s.split(',').filter_map(|e| e.trim().parse().ok()).collect())
        .unwrap_or_else(|| EngineKind::ALL.to_vec())
}

fn search(c: &mut Criterion) {
    for n in sizes() {
        let (frames, queries) = dataset(n, 42);
        for kind in engines() {
            // Building hnsw at 1M takes many minutes on 2 cores (DESIGN.md §5): 100k only here.
            if kind == EngineKind::Hnsw && n > 100_000 {
                continue;
            }
            let mut index = FrameIndex::new(kind, HnswParams::default());
            index.load(frames.clone());
            let mut group = c.benchmark_group(kind.as_str());
            group.throughput(Throughput::Elements(1));
            group.sample_size(30);
            group.measurement_time(Duration::from_secs(8));
            let mut out: Vec<Match> = Vec::new();
            let mut next = 0usize;
            group.bench_function(n.to_string(), |b| {
                b.iter(|| {
                    let query = &queries[next % queries.len()];
                    next += 1;
                    index.search(black_box(query), 31, &|_| true, &mut out);
                    black_box(out.len())
                });
            });
            group.finish();
        }
    }
}

criterion_group!(benches, search);
criterion_main!(benches);
