//! The match path end to end: a real server on a loopback port, real gRPC, real conformance
//! images and vPDQ hash files.

use framematch::hash::PdqHash;
use framematch::pb;
use tonic::Code;

use crate::support::{self, TestServer};

/// Expected full-resolution hashes from ../shared/conformance/pdq/expected.tsv.
fn expected_hashes() -> Option<Vec<(String, PdqHash, u32)>> {
    let dir = support::conformance_dir()?;
    let text = std::fs::read_to_string(dir.join("pdq/expected.tsv")).expect("expected.tsv");
    Some(
        text.lines()
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                (
                    fields[0].to_string(),
                    fields[1].parse().expect("hash"),
                    fields[2].parse().expect("quality"),
                )
            })
            .collect(),
    )
}

async fn add_image(server: &TestServer, bank: &str, file: &str) -> i64 {
    let bytes = support::conformance_file(&format!("pdq/{file}")).expect("conformance file");
    support::add_reference(server, bank, vec![support::image_frame(bytes)])
        .await
        .expect("add reference")
        .reference
        .expect("reference")
        .id
}

async fn match_file(server: &TestServer, file: &str) -> pb::FrameResult {
    let bytes = support::conformance_file(&format!("pdq/{file}")).expect("conformance file");
    support::match_image(server, support::image_frame(bytes), None)
        .await
        .unwrap_or_else(|status| panic!("matching {file}: {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_variants_match_the_original_and_unrelated_images_do_not() {
    let Some(expected) = expected_hashes() else {
        return;
    };
    let server = TestServer::start().await;
    support::create_bank(&server, "violent").await;
    let bridge = add_image(&server, "violent", "bridge-1-original.jpg").await;
    let (_, bridge_hash, _) = expected
        .iter()
        .find(|(f, _, _)| f == "bridge-1-original.jpg")
        .expect("bridge-1 in expected.tsv")
        .clone();

    // Which files should match is decided by the reference hashes (data nobody here wrote), not
    // by our own output: expected distance to bridge-1 <= 31 and quality >= 50 must match.
    let mut matched = 0;
    let mut unmatched = 0;
    for (file, hash, quality) in &expected {
        if file == "bridge-1-original.jpg" {
            continue;
        }
        let result = match_file(&server, file).await;
        let should_match = hash.distance(&bridge_hash) <= 31 && *quality >= 50;
        let did_match = result
            .matches
            .iter()
            .any(|m| m.source.as_ref().map(|s| s.reference_id) == Some(bridge));
        assert_eq!(
            did_match,
            should_match,
            "{file}: expected distance {} to bridge-1, got matches {:?}",
            hash.distance(&bridge_hash),
            result.matches
        );
        if should_match {
            matched += 1;
            let m = &result.matches[0];
            let source = m.source.as_ref().expect("source");
            assert_eq!(source.bank, "violent");
            assert_eq!(source.category, pb::Category::GraphicViolence as i32);
            assert_eq!(source.owner, "local");
            assert!(m.distance <= 31);
            assert_eq!(m.dihedral, pb::Dihedral::Original as i32);
        } else {
            unmatched += 1;
        }
    }
    assert!(
        matched >= 15,
        "bridge-mods and modes should match, got {matched}"
    );
    assert!(
        unmatched >= 8,
        "unrelated images should not match, got {unmatched}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_quality_frames_are_flagged_and_never_match() {
    if support::conformance_dir().is_none() {
        return;
    }
    let server = TestServer::start().await;
    support::create_bank(&server, "b").await;
    // The reference is small.jpg itself (quality 0): even an identical upload must not match.
    let added = support::add_reference(
        &server,
        "b",
        vec![support::image_frame(
            support::conformance_file("pdq/small.jpg").expect("small.jpg"),
        )],
    )
    .await
    .expect("add");
    assert_eq!(added.frames_low_quality, 1);
    let result = match_file(&server, "small.jpg").await;
    assert!(
        result.low_quality,
        "small.jpg has quality {}",
        result.quality
    );
    assert!(result.quality < 50);
    assert!(result.matches.is_empty());
    // Even with the minimum lowered for the upload, the reference side has quality 0 < 1.
    let options = pb::MatchOptions {
        min_quality: Some(1),
        ..Default::default()
    };
    let bytes = support::conformance_file("pdq/small.jpg").expect("small.jpg");
    let result = support::match_image(&server, support::image_frame(bytes), Some(options))
        .await
        .expect("match");
    assert!(result.matches.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_reference_stops_matching() {
    if support::conformance_dir().is_none() {
        return;
    }
    let server = TestServer::start().await;
    support::create_bank(&server, "b").await;
    let id = add_image(&server, "b", "bridge-1-original.jpg").await;
    assert_eq!(match_file(&server, "blur-a-lot.jpg").await.matches.len(), 1);

    let mut banks = server.banks().await;
    let withdrawn = banks
        .withdraw_reference(pb::WithdrawReferenceRequest {
            reference_id: id,
            reason: "false positive".into(),
        })
        .await
        .expect("withdraw")
        .into_inner();
    assert_eq!(withdrawn.state, pb::ReferenceState::Withdrawn as i32);
    assert_eq!(withdrawn.withdrawn_reason, "false positive");
    assert!(
        match_file(&server, "blur-a-lot.jpg")
            .await
            .matches
            .is_empty()
    );

    let again = banks
        .withdraw_reference(pb::WithdrawReferenceRequest {
            reference_id: id,
            reason: "twice".into(),
        })
        .await
        .expect_err("second withdrawal");
    assert_eq!(again.code(), Code::FailedPrecondition);
    let unknown = banks
        .withdraw_reference(pb::WithdrawReferenceRequest {
            reference_id: 999_999,
            reason: "x".into(),
        })
        .await
        .expect_err("unknown reference");
    assert_eq!(unknown.code(), Code::NotFound);
    let no_reason = banks
        .withdraw_reference(pb::WithdrawReferenceRequest {
            reference_id: id,
            reason: " ".into(),
        })
        .await
        .expect_err("no reason");
    assert_eq!(no_reason.code(), Code::InvalidArgument);

    let stats = banks
        .stats(pb::StatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.withdrawn_references, 1);
    assert_eq!(stats.active_references, 0);
    assert_eq!(stats.indexed_frames, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dihedral_matching_finds_rotated_and_mirrored_uploads() {
    if support::conformance_dir().is_none() {
        return;
    }
    let server = TestServer::start().await;
    support::create_bank(&server, "b").await;
    add_image(&server, "b", "bridge-1-original.jpg").await;
    let cases = [
        ("bridge-2-rotate-90.jpg", pb::Dihedral::Rot90),
        ("bridge-4-rotate-270.jpg", pb::Dihedral::Rot270),
        ("bridge-5-flipx.jpg", pb::Dihedral::Flipx),
        ("bridge-7-flip-plus-1.jpg", pb::Dihedral::Flipplus1),
    ];
    for (file, variant) in cases {
        // Without the option the transformed upload is ~128 bits away: no match.
        assert!(match_file(&server, file).await.matches.is_empty(), "{file}");
        let bytes = support::conformance_file(&format!("pdq/{file}")).expect("file");
        let options = pb::MatchOptions {
            dihedral: true,
            ..Default::default()
        };
        let result = support::match_image(&server, support::image_frame(bytes), Some(options))
            .await
            .expect("match");
        let best = result
            .matches
            .first()
            .unwrap_or_else(|| panic!("{file} did not match"));
        // The upload's variant that matches the original undoes the upload's transform.
        let undo = match variant {
            pb::Dihedral::Rot90 => pb::Dihedral::Rot270,
            pb::Dihedral::Rot270 => pb::Dihedral::Rot90,
            other => other,
        };
        assert_eq!(best.dihedral, undo as i32, "{file}: {best:?}");
        assert!(best.distance <= 10, "{file}: {best:?}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_filter_limits_the_search_and_unknown_banks_are_not_found() {
    if support::conformance_dir().is_none() {
        return;
    }
    let server = TestServer::start().await;
    support::create_bank(&server, "one").await;
    support::create_bank(&server, "two").await;
    add_image(&server, "one", "bridge-1-original.jpg").await;
    let bytes = support::conformance_file("pdq/blur-a-lot.jpg").expect("file");
    let only = |bank: &str| pb::MatchOptions {
        banks: vec![bank.into()],
        ..Default::default()
    };
    let in_one = support::match_image(
        &server,
        support::image_frame(bytes.clone()),
        Some(only("one")),
    )
    .await
    .expect("match");
    assert_eq!(in_one.matches.len(), 1);
    let in_two = support::match_image(
        &server,
        support::image_frame(bytes.clone()),
        Some(only("two")),
    )
    .await
    .expect("match");
    assert!(in_two.matches.is_empty());
    let missing = support::match_image(&server, support::image_frame(bytes), Some(only("three")))
        .await
        .expect_err("unknown bank");
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("three"), "{}", missing.message());

    let duplicate = server
        .banks()
        .await
        .create_bank(pb::CreateBankRequest {
            embedding_spaces: Vec::new(),
            name: "one".into(),
            category: pb::Category::Terrorism as i32,
            description: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("duplicate bank");
    assert_eq!(duplicate.code(), Code::AlreadyExists);
    let no_category = server
        .banks()
        .await
        .create_bank(pb::CreateBankRequest {
            embedding_spaces: Vec::new(),
            name: "four".into(),
            category: 0,
            description: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("no category");
    assert_eq!(no_category.code(), Code::InvalidArgument);
    server.stop().await;
}

fn expected_vpdq_row(query: &str, compared: &str) -> Option<(f64, f64)> {
    let dir = support::conformance_dir()?;
    let text =
        std::fs::read_to_string(dir.join("vpdq/vpdq-match-expected.tsv")).expect("expected tsv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split('\t').collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("column {name} in {header:?}"))
    };
    let (q, c) = (column("query_file"), column("compared_file"));
    let (qp, cp) = (
        column("pytx_query_match_pct"),
        column("pytx_compared_match_pct"),
    );
    lines
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .find_map(|f| {
            (f[q] == format!("{query}.txt") && f[c] == format!("{compared}.txt"))
                .then(|| (f[qp].parse().expect("pct"), f[cp].parse().expect("pct")))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_verdicts_reproduce_python_threatexchange_percentages() {
    let Some(dir) = support::conformance_dir() else {
        return;
    };
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(format!("vpdq/{name}.txt"))).expect("vpdq file")
    };
    let server = TestServer::start().await;
    support::create_bank(&server, "videos").await;
    let references = [
        "chair-orig-22-sd-bar",
        "chair-22-with-small-logo-bar",
        "pattern-hd-no-bar",
    ];
    let mut ids = Vec::new();
    for name in references {
        let added = support::add_reference(&server, "videos", support::vpdq_frames(&read(name)))
            .await
            .expect("add video");
        ids.push((added.reference.expect("reference").id, name));
    }
    for query in [
        "chair-19-sd-bar",
        "pattern-sd-grey-bar",
        "chair-22-sd-sepia-bar",
    ] {
        let frames = support::vpdq_frames(&read(query));
        let frame_count = frames.len();
        let requests = frames
            .into_iter()
            .map(|frame| pb::MatchRequest {
                options: None,
                frame: Some(frame),
            })
            .collect();
        let responses = support::match_video(&server, requests)
            .await
            .expect("stream");
        let frames_answered = responses
            .iter()
            .filter(|r| matches!(r.result, Some(pb::match_response::Result::Frame(_))))
            .count();
        assert_eq!(frames_answered, frame_count);
        // The closing verdicts follow the last frame answer; earlier ones were provisional.
        let last_frame = responses
            .iter()
            .rposition(|r| matches!(r.result, Some(pb::match_response::Result::Frame(_))))
            .expect("frame answers");
        let verdicts: Vec<&pb::Verdict> = responses[last_frame..]
            .iter()
            .filter_map(|r| match &r.result {
                Some(pb::match_response::Result::Verdict(v)) => Some(v),
                _ => None,
            })
            .collect();
        assert!(matches!(
            responses.last().and_then(|r| r.result.as_ref()),
            Some(pb::match_response::Result::Summary(_))
        ));
        for (id, name) in &ids {
            let (query_pct, compared_pct) =
                expected_vpdq_row(query, name).expect("pair in vpdq-match-expected.tsv");
            let verdict = verdicts
                .iter()
                .find(|v| v.source.as_ref().map(|s| s.reference_id) == Some(*id));
            match verdict {
                Some(v) => {
                    assert_eq!(
                        format!("{:.2}", v.query_match_pct),
                        format!("{query_pct:.2}"),
                        "{query} vs {name}: query %"
                    );
                    assert_eq!(
                        format!("{:.2}", v.reference_match_pct),
                        format!("{compared_pct:.2}"),
                        "{query} vs {name}: compared %"
                    );
                    assert_eq!(v.percentage_match, query_pct >= 80.0);
                    assert_eq!(v.status, pb::VerdictStatus::Final as i32);
                }
                None => assert_eq!(
                    (query_pct, compared_pct),
                    (0.0, 0.0),
                    "{query} vs {name}: no verdict but the reference says it matches"
                ),
            }
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_video_stream_gets_only_a_summary() {
    let server = TestServer::start().await;
    let responses = support::match_video(&server, Vec::new())
        .await
        .expect("stream");
    assert_eq!(responses.len(), 1);
    match &responses[0].result {
        Some(pb::match_response::Result::Summary(s)) => assert_eq!(s.frames_received, 0),
        other => panic!("expected a summary, got {other:?}"),
    }
    server.stop().await;
}

fn vpdq_file(name: &str) -> Option<Vec<pb::Frame>> {
    let dir = support::conformance_dir()?;
    let text = std::fs::read_to_string(dir.join(format!("vpdq/{name}.txt"))).expect("vpdq file");
    Some(support::vpdq_frames(&text))
}

/// One frame per second, as framematch scan and HMA sample (shared/PDQ.md §2.1): frames whose
/// index is a multiple of 30 in these 30 fps files.
fn one_per_second(frames: Vec<pb::Frame>) -> Vec<pb::Frame> {
    frames
        .into_iter()
        .filter(|f| f.frame_index.is_multiple_of(30))
        .collect()
}

fn verdicts(responses: &[pb::MatchResponse]) -> Vec<(usize, &pb::Verdict)> {
    responses
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match &r.result {
            Some(pb::match_response::Result::Verdict(v)) => Some((i, v)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_frame_count_makes_the_verdict_final_before_the_stream_ends() {
    let (Some(reference), Some(upload)) = (
        vpdq_file("chair-orig-22-sd-bar"),
        vpdq_file("chair-19-sd-bar"),
    ) else {
        return;
    };
    let server = TestServer::start().await;
    support::create_bank(&server, "videos").await;
    let id = support::add_reference(&server, "videos", reference)
        .await
        .expect("add")
        .reference
        .expect("reference")
        .id;
    let upload = one_per_second(upload);
    let count = upload.len();
    let options = pb::MatchOptions {
        expected_frame_count: Some(u32::try_from(count).expect("count")),
        min_run_ms: Some(0),
        ..Default::default()
    };
    let requests = upload
        .into_iter()
        .enumerate()
        .map(|(i, frame)| pb::MatchRequest {
            options: (i == 0).then(|| options.clone()),
            frame: Some(frame),
        })
        .collect();
    let responses = support::match_video(&server, requests)
        .await
        .expect("stream");
    let all = verdicts(&responses);
    let (position, first_final) = all
        .iter()
        .find(|(_, v)| v.status == pb::VerdictStatus::Final as i32)
        .expect("a final verdict");
    assert_eq!(
        first_final.source.as_ref().map(|s| s.reference_id),
        Some(id)
    );
    assert!(first_final.is_match && first_final.percentage_match);
    let frames_before = responses[..*position]
        .iter()
        .filter(|r| matches!(r.result, Some(pb::match_response::Result::Frame(_))))
        .count();
    assert!(
        frames_before < count,
        "final after {frames_before} of {count} frames: the upload service could stop early"
    );
    // The upload keeps matching, so no provisional verdict ever says otherwise.
    assert!(all.iter().all(|(_, v)| v.is_match));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_excerpt_inside_an_unrelated_upload_matches_by_its_run() {
    let (Some(reference), Some(filler)) = (
        vpdq_file("chair-orig-22-sd-bar"),
        vpdq_file("pattern-hd-no-bar"),
    ) else {
        return;
    };
    let server = TestServer::start().await;
    support::create_bank(&server, "videos").await;
    let id = support::add_reference(&server, "videos", reference.clone())
        .await
        .expect("add")
        .reference
        .expect("reference")
        .id;
    // Upload: the unrelated pattern clip (7 s), 10 s of the chair clip from its 5 s mark, then
    // the pattern clip again, renumbered onto one timeline at one frame per second.
    let filler = one_per_second(filler);
    let excerpt: Vec<pb::Frame> = one_per_second(reference)
        .into_iter()
        .filter(|f| (5_000..15_000).contains(&f.timestamp_ms))
        .collect();
    assert_eq!(excerpt.len(), 10);
    let mut timeline: Vec<pb::Frame> = Vec::new();
    for frame in filler.iter().chain(&excerpt).chain(&filler) {
        let i = u32::try_from(timeline.len()).expect("index");
        timeline.push(pb::Frame {
            embeddings: Vec::new(),
            frame_index: i,
            timestamp_ms: u64::from(i) * 1000,
            signal: frame.signal.clone(),
        });
    }
    let requests: Vec<pb::MatchRequest> = timeline
        .into_iter()
        .map(|frame| pb::MatchRequest {
            options: None,
            frame: Some(frame),
        })
        .collect();
    let responses = support::match_video(&server, requests.clone())
        .await
        .expect("stream");
    let closing = verdicts(&responses)
        .into_iter()
        .map(|(_, v)| v)
        .rfind(|v| v.source.as_ref().map(|s| s.reference_id) == Some(id))
        .expect("a verdict for the reference");
    assert!(!closing.percentage_match, "{closing:?}");
    assert!(closing.run_match && closing.is_match, "{closing:?}");
    let run = closing.run.as_ref().expect("run");
    let start = u64::try_from(filler.len()).expect("len") * 1000;
    assert!(
        run.query_start_ms >= start && run.query_end_ms < start + 10_000,
        "{run:?}"
    );
    assert!(run.query_end_ms - run.query_start_ms >= 5_000, "{run:?}");
    assert!(
        run.reference_start_ms >= 4_000 && run.reference_end_ms <= 16_000,
        "{run:?}"
    );

    // With the rule off, the same upload does not match.
    let mut without = requests;
    without[0].options = Some(pb::MatchOptions {
        min_run_ms: Some(0),
        ..Default::default()
    });
    let responses = support::match_video(&server, without)
        .await
        .expect("stream");
    assert!(
        verdicts(&responses).iter().all(|(_, v)| !v.is_match),
        "without the run rule the excerpt is too small a share"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_shared_videos_never_match_by_either_rule() {
    let Some(dir) = support::conformance_dir() else {
        return;
    };
    let names = [
        "chair-19-sd-bar",
        "pattern-sd-grey-bar",
        "doorknob-hd-no-bar",
    ];
    let server = TestServer::start().await;
    support::create_bank(&server, "videos").await;
    for name in names {
        let text = std::fs::read_to_string(dir.join(format!("vpdq/{name}.txt"))).expect("file");
        support::add_reference(&server, "videos", support::vpdq_frames(&text))
            .await
            .expect("add");
    }
    for query in ["pattern-hd-no-bar", "chair-orig-22-sd-bar"] {
        let text = std::fs::read_to_string(dir.join(format!("vpdq/{query}.txt"))).expect("file");
        let requests = support::vpdq_frames(&text)
            .into_iter()
            .map(|frame| pb::MatchRequest {
                options: None,
                frame: Some(frame),
            })
            .collect();
        let responses = support::match_video(&server, requests)
            .await
            .expect("stream");
        for (_, v) in verdicts(&responses) {
            let source = v.source.as_ref().expect("source");
            let related = query.starts_with("chair") && source.reference_id == 1;
            assert_eq!(
                v.is_match, related,
                "{query} vs reference {}: {v:?}",
                source.reference_id
            );
        }
    }
    server.stop().await;
}

/// Frames of one stream are hashed and searched concurrently (issue #6), but answered in the
/// order they were sent: slow image frames and fast precomputed hashes interleaved come back in
/// sending order, and a bad frame ends the stream only after every frame before it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_of_one_stream_are_answered_in_order_even_when_matched_concurrently() {
    let Some(image) = support::conformance_file("pdq/bridge-1-original.jpg") else {
        return;
    };
    let server = TestServer::start_with(|config| config.hash_workers = 2).await;
    let frame = |i: u32| -> pb::Frame {
        if i.is_multiple_of(3) {
            pb::Frame {
                embeddings: Vec::new(),
                frame_index: i,
                timestamp_ms: u64::from(i) * 40,
                ..support::image_frame(image.clone())
            }
        } else {
            let hash = PdqHash::from_bit_fn(|k| (k * 7 + i as usize * 13) % 5 < 2);
            support::pdq_frame(i, u64::from(i) * 40, &hash, 100)
        }
    };
    let requests: Vec<pb::MatchRequest> = (0..24)
        .map(|i| pb::MatchRequest {
            options: None,
            frame: Some(frame(i)),
        })
        .collect();
    let responses = support::match_video(&server, requests)
        .await
        .expect("stream");
    let order: Vec<u32> = responses
        .iter()
        .filter_map(|r| match &r.result {
            Some(pb::match_response::Result::Frame(f)) => Some(f.frame_index),
            _ => None,
        })
        .collect();
    assert_eq!(order, (0..24).collect::<Vec<_>>());

    // Frame 5 is an empty image: frames 0-4 are answered, then INVALID_ARGUMENT.
    let mut requests: Vec<pb::MatchRequest> = (0..9)
        .map(|i| pb::MatchRequest {
            options: None,
            frame: Some(frame(i)),
        })
        .collect();
    requests[5].frame = Some(support::image_frame(Vec::new()));
    let mut stream = server
        .matcher()
        .await
        .match_video(tokio_stream::iter(requests))
        .await
        .expect("open")
        .into_inner();
    let mut answered = Vec::new();
    let status = loop {
        match stream.message().await {
            Ok(Some(response)) => {
                if let Some(pb::match_response::Result::Frame(f)) = response.result {
                    answered.push(f.frame_index);
                }
            }
            Ok(None) => panic!("the stream must end with an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(answered, vec![0, 1, 2, 3, 4]);
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    server.stop().await;
}
