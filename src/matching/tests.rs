use super::*;

fn frame(index: u32, hash: PdqHash, quality: u8) -> FrameSignal {
    FrameSignal {
        frame_index: index,
        timestamp_ms: u64::from(index) * 1000,
        hash,
        quality,
    }
}

fn hash_with_bits(bits: &[usize]) -> PdqHash {
    PdqHash::from_bit_fn(|k| bits.contains(&k))
}

fn hit(reference: i64, reference_frame: u32, distance: u32) -> FrameHit {
    FrameHit {
        reference: ReferenceId(reference),
        bank: BankId(1),
        reference_frame: frame(reference_frame, PdqHash::default(), 100),
        distance,
        dihedral: Dihedral::Original,
        content_area: false,
        window: None,
        signal: HitSignal::Pdq,
    }
}

fn q(signal: FrameSignal) -> QueryFrame {
    QueryFrame::pdq(signal)
}

fn totals(reference: ReferenceId) -> Option<u32> {
    match reference.0 {
        7 => Some(4),
        8 => Some(1),
        _ => Some(100),
    }
}

fn no_runs() -> MatchParams {
    MatchParams {
        min_run_ms: 0,
        ..MatchParams::default()
    }
}

#[test]
fn percentages_follow_vpdq_dedup_and_quality_rules() {
    let mut session = Session::new(no_runs());
    let a = hash_with_bits(&[1]);
    let b = hash_with_bits(&[2]);
    let c = hash_with_bits(&[3]);
    let low = hash_with_bits(&[4]);
    session.record(&q(frame(0, a, 100)), &[hit(7, 0, 0)], &totals);
    // The same hash again: reported, but counted once.
    session.record(&q(frame(1, a, 100)), &[hit(7, 0, 0)], &totals);
    session.record(&q(frame(2, b, 90)), &[hit(7, 1, 3), hit(8, 0, 20)], &totals);
    session.record(&q(frame(3, c, 90)), &[], &totals);
    session.record(&q(frame(4, low, 10)), &[], &totals);
    let summary = session.summary();
    assert_eq!(summary.frames_received, 5);
    assert_eq!(summary.frames_low_quality, 1);
    assert_eq!(summary.frames_matched, 3);
    assert_eq!(summary.distinct_frames, 3);

    let verdicts = session.finish(&|_| true);
    assert_eq!(verdicts.len(), 2);
    let seven = &verdicts[0];
    assert_eq!(seven.reference, ReferenceId(7));
    assert_eq!(
        (seven.query_frames_matched, seven.query_frames_total),
        (2, 3)
    );
    assert_eq!(
        (seven.reference_frames_matched, seven.reference_frames_total),
        (2, 4)
    );
    assert!((seven.query_match_pct - 200.0 / 3.0).abs() < 1e-9);
    assert!((seven.reference_match_pct - 50.0).abs() < 1e-9);
    assert!(
        !seven.is_match,
        "66.7% of the upload is under the 80% default"
    );
    assert!(seven.is_final);
    let eight = &verdicts[1];
    assert_eq!(eight.reference_match_pct, 100.0);
}

#[test]
fn the_first_occurrence_of_a_hash_decides_its_quality() {
    let mut session = Session::new(no_runs());
    let a = hash_with_bits(&[1]);
    session.record(&q(frame(0, a, 10)), &[], &totals);
    session.record(&q(frame(1, a, 100)), &[hit(7, 0, 0)], &totals);
    assert_eq!(session.summary().distinct_frames, 0);
    assert_eq!(session.finish(&|_| true)[0].query_frames_matched, 0);
}

#[test]
fn a_verdict_is_a_match_when_both_thresholds_are_met() {
    let params = MatchParams {
        query_threshold_pct: 50.0,
        reference_threshold_pct: 100.0,
        ..no_runs()
    };
    let mut full = Session::new(params.clone());
    full.record(
        &q(frame(0, hash_with_bits(&[1]), 100)),
        &[hit(8, 0, 0)],
        &totals,
    );
    full.record(&q(frame(1, hash_with_bits(&[2]), 100)), &[], &totals);
    assert!(full.finish(&|_| true)[0].is_match);
    let mut partial = Session::new(params);
    partial.record(
        &q(frame(0, hash_with_bits(&[1]), 100)),
        &[hit(7, 0, 0)],
        &totals,
    );
    partial.record(&q(frame(1, hash_with_bits(&[2]), 100)), &[], &totals);
    assert!(!partial.finish(&|_| true)[0].is_match);
}

#[test]
fn withdrawn_references_get_no_verdict() {
    let mut session = Session::new(no_runs());
    session.record(
        &q(frame(0, hash_with_bits(&[1]), 100)),
        &[hit(1, 0, 0)],
        &totals,
    );
    assert!(session.finish(&|_| false).is_empty());
    let mut gone = Session::new(no_runs());
    gone.record(
        &q(frame(0, hash_with_bits(&[1]), 100)),
        &[hit(1, 0, 0)],
        &|_| None,
    );
    assert!(gone.finish(&|_| true).is_empty());
}

#[test]
fn provisional_verdicts_follow_the_decision_as_it_flips() {
    let mut session = Session::new(no_runs());
    let first = session.record(
        &q(frame(0, hash_with_bits(&[1]), 100)),
        &[hit(7, 0, 0)],
        &totals,
    );
    assert_eq!(first.len(), 1);
    assert!(
        first[0].is_match && !first[0].is_final,
        "100% so far, provisional"
    );
    // An unmatched frame drops the upload share to 50%: the decision flips.
    let second = session.record(&q(frame(1, hash_with_bits(&[2]), 100)), &[], &totals);
    assert_eq!(second.len(), 1);
    assert!(!second[0].is_match && !second[0].is_final);
    // Nothing changes: nothing is sent.
    let third = session.record(&q(frame(2, hash_with_bits(&[3]), 100)), &[], &totals);
    assert!(third.is_empty());
}

#[test]
fn a_declared_frame_count_makes_verdicts_final_early() {
    let params = MatchParams {
        expected_frames: Some(10),
        ..no_runs()
    };
    let mut session = Session::new(params);
    let mut finals = Vec::new();
    for i in 0..10u32 {
        let hits = if i < 9 {
            vec![hit(7, i, 0)]
        } else {
            Vec::new()
        };
        let changed = session.record(
            &q(frame(i, hash_with_bits(&[i as usize]), 100)),
            &hits,
            &totals,
        );
        finals.extend(changed.into_iter().filter(|v| v.is_final).map(|_| i));
    }
    // After 8 matched frames of 10, even two unmatched ones leave 80%: certain at frame 7.
    assert_eq!(finals, vec![7]);
}

#[test]
fn an_in_order_run_is_a_match_even_when_the_shares_are_small() {
    let mut session = Session::new(MatchParams::default());
    let mut bits = 0usize;
    let mut next = |session: &mut Session, t: u64, hits: &[FrameHit]| {
        bits += 1;
        let signal = FrameSignal {
            frame_index: bits as u32,
            timestamp_ms: t,
            hash: hash_with_bits(&[bits]),
            quality: 100,
        };
        session.record(&q(signal), hits, &totals)
    };
    // 30 s of unrelated upload, then 8 s of reference 9 from its 100 s mark, at 1.1x speed,
    // with one missed frame, then 30 s unrelated again.
    for t in 0..30 {
        next(&mut session, t * 1000, &[]);
    }
    let mut early = Vec::new();
    for k in 0..9u64 {
        if k == 4 {
            next(&mut session, (30 + k) * 1000, &[]);
            continue;
        }
        let reference_ms = 100_000 + k * 1100;
        let h = FrameHit {
            reference: ReferenceId(9),
            bank: BankId(1),
            reference_frame: FrameSignal {
                frame_index: (100 + k) as u32,
                timestamp_ms: reference_ms,
                hash: PdqHash::default(),
                quality: 100,
            },
            distance: 5,
            dihedral: Dihedral::Original,
            content_area: false,
            window: None,
            signal: HitSignal::Pdq,
        };
        early.extend(next(&mut session, (30 + k) * 1000, &[h]));
    }
    for t in 39..69 {
        next(&mut session, t * 1000, &[]);
    }
    let verdict = session.finish(&|_| true).remove(0);
    assert!(verdict.query_match_pct < 15.0);
    assert!(!verdict.percentage_match);
    assert!(verdict.run_match && verdict.is_match);
    let run = verdict.run.expect("run");
    assert_eq!((run.query_start_ms, run.query_end_ms), (30_000, 38_000));
    assert_eq!(
        (run.reference_start_ms, run.reference_end_ms),
        (100_000, 108_800)
    );
    assert_eq!(run.frames, 8);
    // Final as soon as the run reached 5 s: the upload service can stop early.
    assert!(early.iter().any(|v| v.is_final && v.run_match));
}

#[test]
fn scattered_hits_do_not_make_a_run() {
    let mut session = Session::new(MatchParams::default());
    for k in 0..20u64 {
        // Reference times jump around: no in-order stretch.
        let reference_ms = (k * 7919) % 60 * 1000;
        let h = FrameHit {
            reference: ReferenceId(9),
            bank: BankId(1),
            reference_frame: FrameSignal {
                frame_index: k as u32,
                timestamp_ms: reference_ms,
                hash: PdqHash::default(),
                quality: 100,
            },
            distance: 5,
            dihedral: Dihedral::Original,
            content_area: false,
            window: None,
            signal: HitSignal::Pdq,
        };
        let signal = frame(k as u32, hash_with_bits(&[k as usize]), 100);
        let signal = FrameSignal {
            timestamp_ms: k * 1000,
            ..signal
        };
        session.record(
            &q(signal),
            if k % 5 == 0 {
                std::slice::from_ref(&h)
            } else {
                &[]
            },
            &totals,
        );
    }
    let verdict = session.finish(&|_| true).remove(0);
    assert!(!verdict.run_match, "{:?}", verdict.run);
}

#[test]
fn percent_of_nothing_is_zero() {
    assert_eq!(percent(0, 0), 0.0);
    assert_eq!(percent(1, 4), 25.0);
}

/// An index of reference frames known by PDQ and by a vector in space "sscd": a scan over a
/// handful of vectors, enough to test the matcher's rules.
struct TwoSignals {
    pdq: FrameIndex,
    vectors: Vec<(ReferenceId, BankId, u32, Vec<f32>)>,
}

impl SignalSearch for TwoSignals {
    fn search_pdq(
        &self,
        query: &PdqHash,
        max_distance: u32,
        bank_filter: &dyn Fn(BankId) -> bool,
        out: &mut Vec<Match>,
    ) {
        self.pdq.search(query, max_distance, bank_filter, out);
    }

    fn search_space(
        &self,
        space: &str,
        query: &[f32],
        min_score: f32,
        k: usize,
        bank_filter: &dyn Fn(BankId) -> bool,
        out: &mut Vec<VectorMatch>,
    ) {
        out.clear();
        if space != "sscd" {
            return;
        }
        for (reference, bank, frame_index, vector) in &self.vectors {
            let score: f32 = vector.iter().zip(query).map(|(a, b)| a * b).sum();
            if score >= min_score && bank_filter(*bank) {
                out.push(VectorMatch {
                    reference: *reference,
                    bank: *bank,
                    frame_index: *frame_index,
                    timestamp_ms: 0,
                    score,
                });
            }
        }
        out.sort_by(|a, b| b.score.total_cmp(&a.score));
        out.truncate(k);
    }

    fn reference_frame(&self, reference: ReferenceId, frame_index: u32) -> Option<FrameSignal> {
        self.pdq.reference_frame(reference, frame_index)
    }
}

fn unit(angle: f32) -> Vec<f32> {
    vec![angle.cos(), angle.sin()]
}

/// References 1 (bank 1, threshold 0.9) and 2 (bank 2, threshold 0.99), one frame each with
/// hashes far apart, vectors at angles 0 and 0.3 rad; reference 3 (bank 1) has a low-quality
/// frame whose vector is at angle 0 too.
fn two_signals() -> (TwoSignals, MatchParams) {
    let mut pdq = FrameIndex::new(crate::index::EngineKind::Exact, Default::default());
    pdq.insert_reference(
        ReferenceId(1),
        BankId(1),
        &[frame(0, hash_with_bits(&[1]), 100)],
    );
    pdq.insert_reference(
        ReferenceId(2),
        BankId(2),
        &[frame(0, PdqHash::from_bit_fn(|k| k >= 128), 100)],
    );
    pdq.insert_reference(
        ReferenceId(3),
        BankId(1),
        &[frame(0, PdqHash::from_bit_fn(|k| k % 2 == 0), 10)],
    );
    let index = TwoSignals {
        pdq,
        vectors: vec![
            (ReferenceId(1), BankId(1), 0, unit(0.0)),
            (ReferenceId(2), BankId(2), 0, unit(0.3)),
            (ReferenceId(3), BankId(1), 0, unit(0.0)),
        ],
    };
    let params = MatchParams {
        spaces: vec![SpaceScope {
            space: Arc::from("sscd"),
            dimension: 2,
            metric: crate::model::Metric::Cosine,
            thresholds: HashMap::from([(BankId(1), 0.9), (BankId(2), 0.99)]),
        }],
        ..no_runs()
    };
    (index, params)
}

fn with_vector(signal: FrameSignal, angle: f32) -> QueryFrame {
    QueryFrame {
        embeddings: vec![QueryEmbedding {
            space: Arc::from("sscd"),
            vector: unit(angle),
            content_area: false,
            window: None,
        }],
        ..QueryFrame::pdq(signal)
    }
}

#[test]
fn a_vector_matches_at_its_banks_threshold_and_says_so() {
    let (index, params) = two_signals();
    // Far from every hash; cosine 0.995 to reference 1, 0.98 to reference 2.
    let query = with_vector(frame(0, hash_with_bits(&[200, 201, 202]), 100), 0.1);
    let query = QueryFrame {
        signal: FrameSignal {
            hash: PdqHash::from_bit_fn(|k| k % 3 == 0),
            ..query.signal
        },
        ..query
    };
    let hits = search_frame(&index, &query, &params, &|_| true);
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0].reference, ReferenceId(1));
    match &hits[0].signal {
        HitSignal::Embedding { space, score } => {
            assert_eq!(&**space, "sscd");
            assert!((score - 0.1f32.cos()).abs() < 1e-6);
        }
        HitSignal::Pdq => panic!("expected an embedding hit"),
    }
    // Reference 2's bank asks for 0.99: at 0.18 rad from it (0.984) it does not match ...
    let near_two = with_vector(query.signal, 0.12);
    let hits = search_frame(&index, &near_two, &params, &|_| true);
    assert!(
        hits.iter().all(|h| h.reference != ReferenceId(2)),
        "{hits:?}"
    );
    // ... at 0.02 rad it does; the bank filter still applies.
    let on_two = with_vector(query.signal, 0.3);
    let hits = search_frame(&index, &on_two, &params, &|_| true);
    assert!(
        hits.iter().any(|h| h.reference == ReferenceId(2)),
        "{hits:?}"
    );
    let hits = search_frame(&index, &on_two, &params, &|bank| bank != BankId(2));
    assert!(
        hits.iter().all(|h| h.reference != ReferenceId(2)),
        "{hits:?}"
    );
}

#[test]
fn low_quality_frames_match_by_no_signal_on_either_side() {
    let (index, params) = two_signals();
    // A low-quality upload frame is not searched, even with a perfect vector.
    let dark = with_vector(frame(0, hash_with_bits(&[1]), 10), 0.0);
    assert!(search_frame(&index, &dark, &params, &|_| true).is_empty());
    // Reference 3's only frame has quality 10: its vector never counts.
    let query = with_vector(frame(0, PdqHash::from_bit_fn(|k| k % 3 == 0), 100), 0.0);
    let hits = search_frame(&index, &query, &params, &|_| true);
    assert!(
        hits.iter().all(|h| h.reference != ReferenceId(3)),
        "{hits:?}"
    );
}

#[test]
fn pdq_and_vector_hits_combine_and_vectors_alone_are_never_deduplicated() {
    let (index, params) = two_signals();
    // PDQ hit on reference 1 and a vector hit on it too: both reported, PDQ first.
    let both = with_vector(frame(0, hash_with_bits(&[1, 2]), 100), 0.0);
    let hits = search_frame(&index, &both, &params, &|_| true);
    assert_eq!(hits[0].signal, HitSignal::Pdq);
    assert_eq!(hits[0].distance, 1);
    assert!(matches!(hits[1].signal, HitSignal::Embedding { .. }));
    // A stream of frames that carry vectors only: each counts, and they match by vectors.
    let mut session = Session::new(params.clone());
    for i in 0..4 {
        let only_vector = QueryFrame {
            has_pdq: false,
            ..with_vector(
                frame(i, PdqHash::default(), 0),
                if i < 3 { 0.0 } else { 2.0 },
            )
        };
        let hits = search_frame(&index, &only_vector, &params, &|_| true);
        session.record(&only_vector, &hits, &|r| {
            index.pdq.reference_frame_count(r, 50)
        });
    }
    let summary = session.summary();
    assert_eq!(
        (
            summary.distinct_frames,
            summary.frames_matched,
            summary.frames_low_quality
        ),
        (4, 3, 0)
    );
    let verdicts = session.finish(&|_| true);
    let one = verdicts
        .iter()
        .find(|v| v.reference == ReferenceId(1))
        .expect("ref 1");
    assert_eq!(one.query_match_pct, 75.0);
    assert_eq!(one.reference_match_pct, 100.0);
}
