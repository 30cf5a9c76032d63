use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

fn gaussian(rng: &mut StdRng) -> f32 {
    // Box-Muller.
    let (u, v): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random_range(0.0..1.0));
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// Unit vector `centre + noise` with noise of about `spread` per unit of the centre.
fn near(rng: &mut StdRng, centre: &[f32], spread: f32) -> Vec<f32> {
    let d = centre.len() as f32;
    let mut v: Vec<f32> = centre
        .iter()
        .map(|c| c + gaussian(rng) * spread / d.sqrt())
        .collect();
    normalise(&mut v);
    v
}

fn random_unit(rng: &mut StdRng, d: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..d).map(|_| gaussian(rng)).collect();
    normalise(&mut v);
    v
}

fn embedding(frame: u32, space: &str, vector: Vec<f32>) -> FrameEmbedding {
    FrameEmbedding {
        frame_index: frame,
        timestamp_ms: u64::from(frame) * 1000,
        space: space.to_string(),
        vector,
    }
}

/// A seeded clustered set: `refs` references of 1..=8 frames, each frame near one of `clusters`
/// centres (copies of one scene with edits), a quarter of the frames random (distractors).
pub(crate) fn clustered(
    rng: &mut StdRng,
    d: usize,
    refs: i64,
    clusters: usize,
) -> Vec<(ReferenceId, BankId, Vec<FrameEmbedding>)> {
    let centres: Vec<Vec<f32>> = (0..clusters).map(|_| random_unit(rng, d)).collect();
    (0..refs)
        .map(|r| {
            let n = rng.random_range(1..=8u32);
            let frames = (0..n)
                .map(|i| {
                    let v = if rng.random_bool(0.25) {
                        random_unit(rng, d)
                    } else {
                        let c = &centres[rng.random_range(0..clusters)];
                        let spread = rng.random_range(0.2..0.8);
                        near(rng, c, spread)
                    };
                    embedding(i, "s", v)
                })
                .collect();
            (ReferenceId(1 + r), BankId(r % 3), frames)
        })
        .collect()
}

fn load(index: &mut VectorIndex, set: &[(ReferenceId, BankId, Vec<FrameEmbedding>)]) {
    let rows: Vec<(ReferenceId, BankId, &FrameEmbedding)> = set
        .iter()
        .flat_map(|(r, b, es)| es.iter().map(move |e| (*r, *b, e)))
        .collect();
    index.load(rows);
}

/// The exact top `k` by f32 dot product over the original vectors: (reference, frame).
fn exact_top(
    set: &[(ReferenceId, BankId, Vec<FrameEmbedding>)],
    query: &[f32],
    k: usize,
) -> Vec<(ReferenceId, u32)> {
    let mut all: Vec<(f32, ReferenceId, u32)> = set
        .iter()
        .flat_map(|(r, _, es)| {
            es.iter().map(move |e| {
                let s: f32 = e.vector.iter().zip(query).map(|(a, b)| a * b).sum();
                (s, *r, e.frame_index)
            })
        })
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    all.into_iter().take(k).map(|(_, r, f)| (r, f)).collect()
}

#[test]
fn params_text_round_trips_and_errors_name_the_problem() {
    let params = VectorParams::default();
    assert_eq!(params.to_string().parse::<VectorParams>(), Ok(params));
    let custom: VectorParams = "ef_search=200, m=32".parse().expect("parses");
    assert_eq!(custom.ef_search, 200);
    assert_eq!(custom.max_connections, 32);
    assert_eq!(custom.ef_construction, params.ef_construction);
    assert_eq!("".parse::<VectorParams>(), Ok(params));
    for (text, needle) in [
        ("m=1", "m must be 2 to 256"),
        ("m=x", "whole number"),
        ("ef=3", "unknown key"),
        ("m", "not key=value"),
        ("ef_search=0", "at least 1"),
    ] {
        let error = text.parse::<VectorParams>().expect_err(text).to_string();
        assert!(error.contains(needle), "{text}: {error}");
    }
}

#[test]
fn graph_recall_at_10_is_at_least_0_99_against_the_exact_scan() {
    let mut rng = StdRng::seed_from_u64(41);
    let d = 96;
    let set = clustered(&mut rng, d, 1500, 400);
    // Near-duplicate queries reach 0.999 at the default beam (64); random queries, far from
    // every cluster, need a wider one (0.914 at 64, 0.984 at 128, 1.0 at 256 on this set).
    let params = VectorParams {
        graph_min: 1000,
        ef_search: 256,
        ..VectorParams::default()
    };
    let mut index = VectorIndex::new(d, Metric::Cosine, params);
    load(&mut index, &set);
    let total: usize = set.iter().map(|(_, _, e)| e.len()).sum();
    assert_eq!(index.live_vectors(), total);
    assert_eq!(index.engine_name(), "graph");
    assert_eq!(index.graph_len(), total);
    let (mut found, mut wanted, mut agree) = (0usize, 0usize, 0usize);
    let (mut got, mut oracle) = (Vec::new(), Vec::new());
    for q in 0..300 {
        // Edited copies of stored frames, and fresh random queries.
        let query = if q % 3 == 2 {
            random_unit(&mut rng, d)
        } else {
            let (_, _, es) = &set[rng.random_range(0..set.len())];
            let frame = rng.random_range(0..es.len());
            near(&mut rng, &es[frame].vector, 0.3)
        };
        index.search(&query, -1.0, 10, &|_| true, &mut got);
        index.search_exact(&query, -1.0, 10, &|_| true, &mut oracle);
        assert_eq!(got.len(), 10);
        assert!(got.windows(2).all(|w| w[0].score >= w[1].score));
        let truth = exact_top(&set, &query, 10);
        let got_ids: Vec<(ReferenceId, u32)> =
            got.iter().map(|m| (m.reference, m.frame_index)).collect();
        found += truth.iter().filter(|t| got_ids.contains(t)).count();
        wanted += truth.len();
        agree += oracle
            .iter()
            .filter(|m| got_ids.contains(&(m.reference, m.frame_index)))
            .count();
    }
    let recall = found as f64 / wanted as f64;
    let recall_int8 = agree as f64 / wanted as f64;
    assert!(recall >= 0.99, "recall@10 vs f32 exact {recall:.4}");
    assert!(
        recall_int8 >= 0.99,
        "recall@10 vs the int8 scan {recall_int8:.4}"
    );
    // 96 + 4 bytes of code, 16 of metadata, the links: well under the f32 vector alone plus.
    let per_vector = index.memory_bytes() as f64 / total as f64;
    assert!(per_vector < 4.0 * d as f64, "{per_vector} bytes per vector");
}

#[test]
fn tombstones_banks_thresholds_and_bad_queries() {
    let mut rng = StdRng::seed_from_u64(42);
    let d = 32;
    let set = clustered(&mut rng, d, 300, 20);
    for graph_min in [usize::MAX, 100] {
        let params = VectorParams {
            graph_min,
            ef_search: 4096,
            ..VectorParams::default()
        };
        let mut index = VectorIndex::new(d, Metric::Cosine, params);
        load(&mut index, &set);
        assert_eq!(
            index.engine_name(),
            if graph_min == 100 { "graph" } else { "flat" }
        );
        let (first, bank, frames) = &set[0];
        let refs: Vec<&FrameEmbedding> = frames.iter().collect();
        assert!(!index.insert_reference(*first, *bank, &refs), "idempotent");
        let query = frames[0].vector.clone();
        let mut out = Vec::new();
        index.search(&query, 0.999, 5, &|_| true, &mut out);
        assert!(
            out.iter()
                .any(|m| m.reference == *first && m.frame_index == 0)
        );
        assert!(out.iter().all(|m| m.score >= 0.999));
        assert!(index.withdraw(*first));
        assert!(!index.withdraw(*first));
        assert!(
            !index.insert_reference(*first, *bank, &refs),
            "withdrawn stays out"
        );
        index.search(&query, -1.0, 10_000, &|_| true, &mut out);
        assert!(out.iter().all(|m| m.reference != *first));
        assert_eq!(out.len(), index.live_vectors());
        let not_0 = |b: BankId| b != BankId(0);
        index.search(&query, -1.0, 50, &not_0, &mut out);
        assert_eq!(out.len(), 50);
        assert!(out.iter().all(|m| m.bank != BankId(0)));
        let mut oracle = Vec::new();
        index.search_exact(&query, -1.0, 50, &not_0, &mut oracle);
        assert_eq!(out, oracle, "a beam as wide as the set is exact");
        index.search(&query[1..], -1.0, 10, &|_| true, &mut out);
        assert!(out.is_empty(), "wrong length finds nothing");
        index.search(&query, -1.0, 0, &|_| true, &mut out);
        assert!(out.is_empty());
    }
}

#[test]
fn invalid_vectors_are_skipped_and_empty_space_is_flat() {
    let mut index = VectorIndex::new(4, Metric::Dot, VectorParams::default());
    let mut out = Vec::new();
    index.search(&[1.0, 0.0, 0.0, 0.0], -1.0, 3, &|_| true, &mut out);
    assert!(out.is_empty());
    let good = embedding(0, "s", vec![0.5, 0.5, 0.5, 0.5]);
    let short = embedding(1, "s", vec![1.0]);
    let nan = embedding(2, "s", vec![f32::NAN, 0.0, 0.0, 0.0]);
    assert!(index.insert_reference(ReferenceId(1), BankId(1), &[&good, &short, &nan]));
    assert_eq!(index.live_vectors(), 1);
    index.search(&[1.0, 0.0, 0.0, 0.0], -1.0, 3, &|_| true, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].reference, out[0].frame_index, out[0].timestamp_ms),
        (ReferenceId(1), 0, 0)
    );
    assert!((out[0].score - 0.5).abs() < 0.01);
    assert_eq!(index.engine_name(), "flat");
    assert!(!index.rebuild_due());
}

/// Rebuilds through the trait's steps keep results equal to the scan over the live set, and
/// tombstones and tail make them due.
#[test]
fn rebuild_drops_tombstones_and_builds_the_graph() {
    let mut rng = StdRng::seed_from_u64(43);
    let d = 24;
    let set = clustered(&mut rng, d, 400, 30);
    let params = VectorParams {
        graph_min: 500,
        ef_search: 4096,
        ..VectorParams::default()
    };
    let mut index = VectorIndex::new(d, Metric::Cosine, params);
    index.set_rebuild_min_tombstones(16);
    // Inserted one by one: no graph until a rebuild.
    for (r, b, es) in &set {
        let refs: Vec<&FrameEmbedding> = es.iter().collect();
        assert!(index.insert_reference(*r, *b, &refs));
    }
    assert_eq!(index.engine_name(), "flat");
    assert!(index.rebuild_due(), "graph_min reached");
    super::super::rebuild_in_place(&mut index);
    assert_eq!(index.engine_name(), "graph");
    assert!(!index.rebuild_due());
    let mut withdrawn = 0;
    for (r, _, _) in set.iter().step_by(2) {
        assert!(index.withdraw(*r));
        withdrawn += 1;
    }
    assert!(index.rebuild_due(), "{withdrawn} withdrawn");
    let live_before = index.live_vectors();
    super::super::rebuild_in_place(&mut index);
    assert_eq!(index.tombstones(), 0);
    assert_eq!(index.live_vectors(), live_before);
    assert_eq!(index.graph_len(), live_before);
    assert_eq!(index.live_references(), set.len() - withdrawn);
    let (mut got, mut oracle) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let query = random_unit(&mut rng, d);
        index.search(&query, -1.0, 20, &|_| true, &mut got);
        index.search_exact(&query, -1.0, 20, &|_| true, &mut oracle);
        assert_eq!(got, oracle);
        assert!(
            got.iter().all(|m| m.reference.0 % 2 == 0),
            "odd ids were withdrawn"
        );
    }
    // A withdrawn id is still refused after the rebuild.
    let (r, b, es) = &set[0];
    let refs: Vec<&FrameEmbedding> = es.iter().collect();
    assert!(!index.insert_reference(*r, *b, &refs));
}
