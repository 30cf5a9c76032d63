use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::hash::PdqHash;
use crate::index::{EngineKind, HnswParams};

fn random_hash(rng: &mut StdRng) -> PdqHash {
    PdqHash::from_words(rng.random())
}

fn flip(rng: &mut StdRng, hash: &PdqHash, bits: usize) -> PdqHash {
    let mut words = hash.words();
    for k in rand::seq::index::sample(rng, 256, bits) {
        words[k / 64] ^= 1 << (k % 64);
    }
    PdqHash::from_words(words)
}

fn unit(rng: &mut StdRng, d: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

const D: usize = 16;

/// One reference: PDQ frames near a few bases and a vector per frame in space "s".
fn reference(
    rng: &mut StdRng,
    id: i64,
    bases: &[PdqHash],
) -> (ReferenceId, BankId, Vec<FrameSignal>, Vec<FrameEmbedding>) {
    let n = rng.random_range(1..=6u32);
    let frames: Vec<FrameSignal> = (0..n)
        .map(|i| {
            let base = bases[rng.random_range(0..bases.len())];
            let bits = rng.random_range(0..30);
            FrameSignal {
                frame_index: i,
                timestamp_ms: u64::from(i) * 1000,
                hash: flip(rng, &base, bits),
                quality: 90,
            }
        })
        .collect();
    let embeddings = (0..n)
        .map(|i| FrameEmbedding {
            frame_index: i,
            timestamp_ms: u64::from(i) * 1000,
            space: "s".to_string(),
            vector: unit(rng, D),
        })
        .collect();
    (ReferenceId(id), BankId(id % 2), frames, embeddings)
}

type Ref = (ReferenceId, BankId, Vec<FrameSignal>, Vec<FrameEmbedding>);

fn pdq_ids(index: &SignalIndex, query: &PdqHash) -> Vec<(i64, u32, u32)> {
    let mut out = Vec::new();
    index.pdq().search(query, 31, &|_| true, &mut out);
    out.iter()
        .map(|m| (m.reference.0, m.frame.frame_index, m.distance))
        .collect()
}

/// An index built from scratch over `live` with exact engines: the oracle.
fn oracle(live: &[Ref]) -> SignalIndex {
    let mut index = SignalIndex::new(
        FrameIndex::new(EngineKind::Exact, HnswParams::default()),
        VectorParams {
            graph_min: usize::MAX,
            ..VectorParams::default()
        },
    );
    index
        .ensure_space("s", D, Metric::Cosine)
        .expect("new space");
    for (r, b, f, e) in live {
        assert!(index.insert_reference(*r, *b, f, e));
    }
    index
}

#[test]
fn spaces_are_declared_once_per_name() {
    let mut index = SignalIndex::new(
        FrameIndex::new(EngineKind::Exact, HnswParams::default()),
        VectorParams::default(),
    );
    assert_eq!(index.ensure_space("sscd", 512, Metric::Cosine), Ok(true));
    assert_eq!(index.ensure_space("sscd", 512, Metric::Cosine), Ok(false));
    let conflict = index
        .ensure_space("sscd", 256, Metric::Dot)
        .expect_err("conflict");
    let text = conflict.to_string();
    assert!(
        text.contains("512") && text.contains("256") && text.contains("sscd"),
        "{text}"
    );
    assert_eq!(index.space("sscd").map(VectorIndex::dimension), Some(512));
    assert!(index.space("other").is_none());
    assert_eq!(index.spaces().count(), 1);
}

#[test]
fn insert_withdraw_and_load_reach_every_signal() {
    let mut rng = StdRng::seed_from_u64(51);
    let bases: Vec<PdqHash> = (0..3).map(|_| random_hash(&mut rng)).collect();
    let refs: Vec<Ref> = (0..40).map(|i| reference(&mut rng, i, &bases)).collect();
    let shared = SharedIndex::new(SignalIndex::new(
        FrameIndex::new(EngineKind::Mih, HnswParams::default()),
        VectorParams::default(),
    ));
    shared.ensure_space("s", D, Metric::Cosine).expect("space");
    let frames: Vec<IndexedFrame> = refs[..20]
        .iter()
        .flat_map(|(r, b, f, _)| {
            f.iter().map(move |frame| IndexedFrame {
                reference: *r,
                bank: *b,
                frame: *frame,
            })
        })
        .collect();
    let mut embeddings: Vec<IndexedEmbedding> = refs[..20]
        .iter()
        .flat_map(|(r, b, _, e)| {
            e.iter().map(move |embedding| IndexedEmbedding {
                reference: *r,
                bank: *b,
                embedding: embedding.clone(),
            })
        })
        .collect();
    // A reference with vectors only, and vectors of an undeclared space.
    let (vr, vb, _, ve) = &refs[20];
    embeddings.extend(ve.iter().map(|e| IndexedEmbedding {
        reference: *vr,
        bank: *vb,
        embedding: e.clone(),
    }));
    embeddings.push(IndexedEmbedding {
        reference: refs[0].0,
        bank: refs[0].1,
        embedding: FrameEmbedding {
            space: "unknown".to_string(),
            ..refs[0].3[0].clone()
        },
    });
    shared.load(frames, embeddings);
    for (r, b, f, e) in &refs[21..] {
        assert!(shared.insert_reference(*r, *b, f, e));
    }
    assert!(!shared.insert_reference(refs[0].0, refs[0].1, &refs[0].2, &refs[0].3));
    let total_frames: usize = refs.iter().filter(|r| r.0 != *vr).map(|r| r.2.len()).sum();
    let total_vectors: usize = refs.iter().map(|r| r.3.len()).sum();
    {
        let index = shared.read();
        assert_eq!(index.pdq().live_frames(), total_frames);
        assert_eq!(index.pdq().live_references(), refs.len());
        assert_eq!(
            index.space("s").map(VectorIndex::live_vectors),
            Some(total_vectors)
        );
        assert!(index.memory_bytes() > index.pdq().memory_bytes());
    }
    assert!(shared.withdraw(refs[3].0));
    assert!(!shared.withdraw(refs[3].0));
    assert!(!shared.insert_reference(refs[3].0, refs[3].1, &refs[3].2, &refs[3].3));
    let index = shared.read();
    let space = index.space("s").expect("space");
    let mut out = Vec::new();
    space.search(&refs[3].3[0].vector, -1.0, 1000, &|_| true, &mut out);
    assert_eq!(out.len(), total_vectors - refs[3].3.len());
    assert!(out.iter().all(|m| m.reference != refs[3].0));
    assert!(pdq_ids(&index, &refs[3].2[0].hash).iter().all(|m| m.0 != 3));
}

/// The no-pause rebuild: while PDQ (mih) and the vector space are rebuilt on one thread, other
/// threads insert, withdraw and search; searches never see a reference withdrawn before they
/// started, and afterwards every result equals that of an index built from scratch over the
/// live set with exact engines.
#[test]
fn background_rebuild_with_concurrent_writes_equals_the_oracle() {
    let mut rng = StdRng::seed_from_u64(52);
    let bases: Vec<PdqHash> = (0..4).map(|_| random_hash(&mut rng)).collect();
    let initial: Vec<Ref> = (0..1500).map(|i| reference(&mut rng, i, &bases)).collect();
    let later: Vec<Ref> = (1500..1800)
        .map(|i| reference(&mut rng, i, &bases))
        .collect();
    let mut pdq = FrameIndex::new(EngineKind::Mih, HnswParams::default());
    pdq.set_rebuild_min_tombstones(64);
    let params = VectorParams {
        graph_min: 200,
        // A beam as wide as the set: the graph's answers are then the scan's.
        ef_search: 16_384,
        ..VectorParams::default()
    };
    let mut index = SignalIndex::new(pdq, params);
    index.ensure_space("s", D, Metric::Cosine).expect("space");
    for (r, b, f, e) in &initial {
        assert!(index.insert_reference(*r, *b, f, e));
    }
    index.rebuild_now(&Signal::Space("s".to_string()));
    assert_eq!(
        index.space("s").map(VectorIndex::engine_name),
        Some("graph")
    );
    if let Some(space) = index.spaces.get_mut("s") {
        space.set_rebuild_min_tombstones(64);
    }
    let shared = SharedIndex::new(index);
    // A third withdrawn before the rebuild starts, so that both are due.
    let mut withdrawn: HashSet<i64> = HashSet::new();
    {
        let mut index = shared.write();
        for (r, _, _, _) in initial.iter().step_by(3) {
            assert!(index.withdraw(*r));
            withdrawn.insert(r.0);
        }
        let due = index.rebuilds_due();
        assert_eq!(due, [Signal::Pdq, Signal::Space("s".to_string())]);
    }
    let done_withdrawals = Arc::new(Mutex::new(withdrawn.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let queries: Vec<(PdqHash, Vec<f32>)> = (0..20)
        .map(|i| (flip(&mut rng, &bases[i % 4], 4), unit(&mut rng, D)))
        .collect();
    std::thread::scope(|scope| {
        // Searchers: a reference withdrawn before a search started is never in its results.
        for t in 0..2 {
            let (shared, done, stop, queries) = (&shared, &done_withdrawals, &stop, &queries);
            scope.spawn(move || {
                let mut searches = 0;
                while !stop.load(Ordering::Relaxed) || searches < 50 {
                    let gone = done.lock().clone();
                    let (hash, vector) = &queries[(searches + t) % queries.len()];
                    let index = shared.read();
                    for (r, _, _) in pdq_ids(&index, hash) {
                        assert!(!gone.contains(&r), "withdrawn {r} returned by pdq");
                    }
                    let mut out = Vec::new();
                    if let Some(space) = index.space("s") {
                        space.search(vector, -1.0, 50, &|_| true, &mut out);
                    }
                    assert!(out.iter().all(|m| !gone.contains(&m.reference.0)));
                    searches += 1;
                }
            });
        }
        // Writer: inserts the later references and withdraws more, during the rebuilds.
        let writer = {
            let (shared, done, later, initial) = (&shared, &done_withdrawals, &later, &initial);
            scope.spawn(move || {
                for (i, (r, b, f, e)) in later.iter().enumerate() {
                    assert!(shared.write().insert_reference(*r, *b, f, e));
                    if i % 2 == 0 {
                        let victim = initial[3 * i + 1].0;
                        assert!(shared.write().withdraw(victim));
                        done.lock().insert(victim.0);
                    }
                    if i % 10 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        };
        let pdq = shared.rebuild_here(&Signal::Pdq).expect("pdq rebuilt");
        let space = shared
            .rebuild_here(&Signal::Space("s".to_string()))
            .expect("space rebuilt");
        assert_eq!(pdq.signal, Signal::Pdq);
        assert!(pdq.tombstones_dropped > 0 && space.tombstones_dropped > 0);
        writer.join().expect("writer");
        stop.store(true, Ordering::Relaxed);
    });
    let gone = done_withdrawals.lock().clone();
    let live: Vec<Ref> = initial
        .iter()
        .chain(&later)
        .filter(|r| !gone.contains(&r.0.0))
        .cloned()
        .collect();
    let expected = oracle(&live);
    let index = shared.read();
    assert_eq!(index.pdq().live_frames(), expected.pdq().live_frames());
    assert_eq!(index.pdq().live_references(), live.len());
    let (space, oracle_space) = (
        index.space("s").expect("s"),
        expected.space("s").expect("s"),
    );
    assert_eq!(space.live_vectors(), oracle_space.live_vectors());
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for (hash, vector) in &queries {
        assert_eq!(pdq_ids(&index, hash), pdq_ids(&expected, hash));
        space.search(vector, -1.0, 30, &|_| true, &mut got);
        oracle_space.search_exact(vector, -1.0, 30, &|_| true, &mut want);
        assert_eq!(got, want);
    }
    for (r, _, _, _) in initial.iter().filter(|r| gone.contains(&r.0.0)).take(5) {
        assert_eq!(
            index.pdq().reference_frame_count(*r, 0),
            None,
            "{r} is withdrawn"
        );
    }
    drop(index);
    for id in gone.iter().take(5) {
        let r = &initial[*id as usize];
        assert!(
            !shared.insert_reference(r.0, r.1, &r.2, &r.3),
            "withdrawn stays refused"
        );
    }
}

#[test]
fn writes_start_the_background_rebuild() {
    let mut rng = StdRng::seed_from_u64(53);
    let bases: Vec<PdqHash> = (0..2).map(|_| random_hash(&mut rng)).collect();
    let mut pdq = FrameIndex::new(EngineKind::Exact, HnswParams::default());
    pdq.set_rebuild_min_tombstones(8);
    let shared = SharedIndex::new(SignalIndex::new(pdq, VectorParams::default()));
    let refs: Vec<Ref> = (0..60).map(|i| reference(&mut rng, i, &bases)).collect();
    for (r, b, f, e) in &refs {
        assert!(shared.insert_reference(*r, *b, f, e));
    }
    for (r, _, _, _) in refs.iter().take(30) {
        assert!(shared.withdraw(*r));
    }
    shared.wait_for_rebuilds();
    let reports = shared.rebuild_reports();
    assert!(!reports.is_empty(), "a rebuild ran");
    assert!(reports.iter().all(|r| r.signal == Signal::Pdq));
    let index = shared.read();
    assert!(index.pdq().tombstones() < 8 || !index.rebuilds_due().is_empty());
    let live: usize = refs[30..].iter().map(|r| r.2.len()).sum();
    assert_eq!(index.pdq().live_frames(), live);
}

#[test]
fn inserts_that_outgrow_mih_start_a_background_rebuild() {
    // mih's full build (4.3 s at 10M) is not run inside the insert that makes it due: the insert
    // starts the background rebuild, which builds a fresh engine off the lock.
    let mut rng = StdRng::seed_from_u64(59);
    let shared = SharedIndex::new(SignalIndex::new(
        FrameIndex::new(EngineKind::Mih, HnswParams::default()),
        VectorParams::default(),
    ));
    let loaded: Vec<IndexedFrame> = (0..20_000)
        .map(|i| IndexedFrame {
            reference: ReferenceId(i / 100 + 1),
            bank: BankId(0),
            frame: FrameSignal {
                frame_index: (i % 100) as u32,
                timestamp_ms: 0,
                hash: random_hash(&mut rng),
                quality: 90,
            },
        })
        .collect();
    shared.load(loaded, Vec::new());
    assert!(shared.read().rebuilds_due().is_empty());
    let mut inserted = Vec::new();
    for id in 1_000..1_120 {
        let frames: Vec<FrameSignal> = (0..50)
            .map(|i| FrameSignal {
                frame_index: i,
                timestamp_ms: 0,
                hash: random_hash(&mut rng),
                quality: 90,
            })
            .collect();
        assert!(shared.insert_reference(ReferenceId(id), BankId(0), &frames, &[]));
        inserted.push((id, frames));
    }
    shared.wait_for_rebuilds();
    let reports = shared.rebuild_reports();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].signal, Signal::Pdq);
    assert_eq!(reports[0].tombstones_dropped, 0);
    let index = shared.read();
    assert!(index.rebuilds_due().is_empty());
    assert_eq!(index.pdq().live_frames(), 20_000 + 120 * 50);
    for (id, frames) in inserted.iter().step_by(7) {
        for frame in frames.iter().step_by(11) {
            let hits = pdq_ids(&index, &frame.hash);
            assert!(hits.contains(&(*id, frame.frame_index, 0)), "{id} {hits:?}");
        }
    }
}
