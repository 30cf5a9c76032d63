//! Import and export (issue #4, part 6) end to end: `Banks.ExportBank` on a real server, and the
//! real binary's `export` / `import` moving a bank of real images and a real video (hashed with
//! FFmpeg) into a fresh server in each format, after which the same uploads match the same
//! references at the same distances. ThreatExchange's own hash list (conformance `haystack.txt`)
//! is imported as conformance input and searched with its needles.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use framematch::formats::Format;
use framematch::hash::PdqHash;
use framematch::pb;

use crate::support::{self, TestServer};

const BIN: &str = env!("CARGO_BIN_EXE_framematch");
const BANK: &str = "known";

/// Runs the binary against `server` off the async runtime; returns (exit code, stdout, stderr).
async fn run(server: &TestServer, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(BIN)
        .env("FRAMEMATCH_API_KEY", support::ADMIN_KEY)
        .args(args)
        .args(["--server", &server.url()])
        .output()
        .await
        .expect("run framematch");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Every reference of `bank` with its frames, by id.
async fn export(
    server: &TestServer,
    bank: &str,
    include_withdrawn: bool,
) -> Result<Vec<pb::ExportedReference>, tonic::Status> {
    let mut stream = server
        .banks()
        .await
        .export_bank(pb::ExportBankRequest {
            bank: bank.into(),
            include_withdrawn,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(exported) = stream.message().await? {
        out.push(exported);
    }
    Ok(out)
}

fn id(exported: &pb::ExportedReference) -> i64 {
    exported.reference.as_ref().map_or(0, |r| r.id)
}

#[tokio::test]
async fn export_bank_streams_references_with_their_frames_by_id() {
    let server = TestServer::start().await;
    support::create_bank(&server, BANK).await;
    support::create_bank(&server, "other").await;
    let hash = |seed: u8| PdqHash::from_bytes([seed; 32]);
    let first = support::add_reference(
        &server,
        BANK,
        vec![
            support::pdq_frame(30, 1000, &hash(2), 80),
            support::pdq_frame(0, 0, &hash(1), 100),
        ],
    )
    .await
    .expect("add");
    let withdrawn =
        support::add_reference(&server, BANK, vec![support::pdq_frame(0, 0, &hash(3), 90)])
            .await
            .expect("add");
    support::add_reference(
        &server,
        "other",
        vec![support::pdq_frame(0, 0, &hash(4), 90)],
    )
    .await
    .expect("add");
    let withdrawn_id = withdrawn.reference.as_ref().map_or(0, |r| r.id);
    server
        .banks()
        .await
        .withdraw_reference(pb::WithdrawReferenceRequest {
            reference_id: withdrawn_id,
            reason: "false positive".into(),
        })
        .await
        .expect("withdraw");

    let active = export(&server, BANK, false).await.expect("export");
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].reference, first.reference);
    let frames: Vec<(u32, u64, Vec<u8>, u32)> = active[0]
        .frames
        .iter()
        .map(|f| (f.frame_index, f.timestamp_ms, f.pdq.clone(), f.quality))
        .collect();
    assert_eq!(
        frames,
        vec![(0, 0, vec![1; 32], 100), (30, 1000, vec![2; 32], 80)]
    );

    let all = export(&server, BANK, true).await.expect("export");
    assert_eq!(
        all.iter().map(id).collect::<Vec<_>>(),
        vec![id(&active[0]), withdrawn_id]
    );
    let state = all[1]
        .reference
        .as_ref()
        .map(|r| (r.state, r.withdrawn_reason.clone()));
    assert_eq!(
        state,
        Some((
            pb::ReferenceState::Withdrawn as i32,
            "false positive".to_string()
        ))
    );

    let status = export(&server, "nope", false)
        .await
        .expect_err("unknown bank");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(status.message().contains("nope"), "{status:?}");
    server.stop().await;
}

/// What one upload frame matched, reference ids translated by `ids`: with `exact`, every
/// (reference, distance, reference frame index, time); otherwise each reference with its best
/// distance (formats that renumber frames may split one frame's two signals into two hits).
fn matches(
    result: &pb::FrameResult,
    ids: &HashMap<i64, i64>,
    exact: bool,
) -> BTreeSet<(i64, u32, u32, u64)> {
    let hits = result.matches.iter().filter_map(|m| {
        let reference = *ids.get(&m.source.as_ref()?.reference_id)?;
        Some((
            reference,
            m.distance,
            m.reference_frame_index,
            m.reference_timestamp_ms,
        ))
    });
    if exact {
        return hits.collect();
    }
    let mut best: HashMap<i64, u32> = HashMap::new();
    for (reference, distance, _, _) in hits {
        let entry = best.entry(reference).or_insert(distance);
        *entry = (*entry).min(distance);
    }
    best.into_iter().map(|(r, d)| (r, d, 0, 0)).collect()
}

fn all_matches() -> Option<pb::MatchOptions> {
    Some(pb::MatchOptions {
        max_matches_per_frame: Some(1000),
        ..pb::MatchOptions::default()
    })
}

/// Every picture in the conformance pdq folder.
fn conformance_images(dir: &Path) -> Vec<PathBuf> {
    let mut images: Vec<PathBuf> = std::fs::read_dir(dir.join("pdq"))
        .expect("pdq dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| ["jpg", "png", "webp"].contains(&e.to_str().unwrap_or("")))
        })
        .collect();
    images.sort();
    images
}

/// The whole-video verdicts of `frames`, per translated reference: (query %, reference %, match).
async fn verdicts(
    server: &TestServer,
    frames: &[pb::Frame],
    ids: &HashMap<i64, i64>,
) -> Vec<(i64, String, String, bool)> {
    let mut requests: Vec<pb::MatchRequest> = frames
        .iter()
        .map(|f| pb::MatchRequest {
            options: None,
            frame: Some(f.clone()),
        })
        .collect();
    requests[0].options = all_matches();
    let responses = support::match_video(server, requests)
        .await
        .expect("match video");
    let mut out: Vec<(i64, String, String, bool)> = responses
        .into_iter()
        .filter_map(|r| match r.result? {
            pb::match_response::Result::Verdict(v)
                if v.status == pb::VerdictStatus::Final as i32 =>
            {
                let reference = *ids.get(&v.source.as_ref()?.reference_id)?;
                Some((
                    reference,
                    format!("{:.2}", v.query_match_pct),
                    format!("{:.2}", v.reference_match_pct),
                    v.is_match,
                ))
            }
            _ => None,
        })
        .collect();
    out.sort_by_key(|v| v.0);
    out.dedup();
    out
}

/// The binary exports a bank of real images and a real video in each format, and imports it
/// into a fresh server: every conformance image and every frame of the video then matches the same
/// references at the same distances there. The vpdq and vpdq-json layouts keep everything, so
/// frame numbers, times and whole-video verdicts are the same too; the pdq format holds the
/// one-frame references only (the video is reported as skipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_gives_the_same_matches_in_every_format() {
    let Some(dir) = support::conformance_dir() else {
        return;
    };
    if !support::ffmpeg_available() {
        return;
    }
    let source = TestServer::start().await;
    support::create_bank(&source, BANK).await;
    let images = conformance_images(&dir);
    // The references: a few of the pictures (hashed by the server), and a real video with
    // letterbox bars (hashed here by FFmpeg, so its frames carry content-area hashes too).
    for name in [
        "bridge-1-original.jpg",
        "pen-and-coaster.png",
        "q0746.jpg",
        "c.png",
    ] {
        let bytes = std::fs::read(dir.join("pdq").join(name)).expect("image");
        support::add_reference(&source, BANK, vec![support::image_frame(bytes)])
            .await
            .expect("add image");
    }
    let video = dir.join("vpdq/test-padded-dimensions.mp4");
    let (code, _, err) = run(
        &source,
        &[
            "ref",
            "add",
            BANK,
            &video.display().to_string(),
            "--note",
            "padded, \"test\" clip",
            "--external-id",
            "case 7",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    // A withdrawn reference is left out of the export.
    let withdrawn = support::add_reference(
        &source,
        BANK,
        vec![support::image_frame(
            std::fs::read(dir.join("pdq/wee.jpg")).expect("image"),
        )],
    )
    .await
    .expect("add");
    source
        .banks()
        .await
        .withdraw_reference(pb::WithdrawReferenceRequest {
            reference_id: withdrawn.reference.map_or(0, |r| r.id),
            reason: "false positive".into(),
        })
        .await
        .expect("withdraw");
    let exported = export(&source, BANK, false).await.expect("export");
    assert_eq!(exported.len(), 5);
    assert!(
        exported.iter().any(|e| e.frames.len() > 1
            && e.frames
                .windows(2)
                .any(|w| w[0].frame_index == w[1].frame_index)),
        "the padded video stores two signals for some frames"
    );

    // The uploads: every conformance picture, and every frame of the video (the reference
    // hashes of FFmpeg 5.1.9, sampled every frame where the reference was sampled once a second).
    let video_frames = support::vpdq_frames(
        &std::fs::read_to_string(
            dir.join("vpdq/regenerated-ffmpeg-5.1.9/test-padded-dimensions.txt"),
        )
        .expect("video hashes"),
    );
    let mut uploads: Vec<pb::Frame> = images
        .iter()
        .map(|p| support::image_frame(std::fs::read(p).expect("image")))
        .collect();
    uploads.extend(video_frames.iter().cloned());

    let tmp = tempfile::tempdir().expect("temp dir");
    for format in Format::ALL {
        let file = tmp.path().join(format!("bank.{format}"));
        let file_arg = file.display().to_string();
        let (code, out, err) = run(
            &source,
            &["export", BANK, "--format", format.as_str(), "-o", &file_arg],
        )
        .await;
        assert_eq!((code, out.as_str()), (0, ""), "{format}: {err}");
        let held: Vec<&pb::ExportedReference> = exported
            .iter()
            .filter(|e| format != Format::Pdq || e.frames.len() == 1)
            .collect();
        let skipped = exported.len() - held.len();
        assert!(
            err.ends_with(&format!(
                "exported {} references ({} frames), skipped {skipped}\n",
                held.len(),
                held.iter().map(|e| e.frames.len()).sum::<usize>()
            )),
            "{format}: {err}"
        );
        assert!(!tmp.path().join(format!("bank.{format}.partial")).exists());

        let target = TestServer::start().await;
        support::create_bank(&target, BANK).await;
        // No --format: told from the content.
        let (code, out, err) = run(&target, &["import", BANK, &file_arg]).await;
        assert_eq!(code, 0, "{format}: {err}");
        let stored: usize = held.iter().map(|e| e.frames.len()).sum();
        assert_eq!(
            out,
            format!(
                "imported {} references ({stored} frames), skipped 0\n",
                held.len()
            ),
            "{format}: {err}"
        );
        let imported = export(&target, BANK, false).await.expect("export target");
        assert_eq!(imported.len(), held.len(), "{format}");
        // Reference ids on both sides, translated to their position in the export.
        let source_ids: HashMap<i64, i64> = held.iter().zip(0..).map(|(e, k)| (id(e), k)).collect();
        let target_ids: HashMap<i64, i64> =
            imported.iter().zip(0..).map(|(e, k)| (id(e), k)).collect();
        let lossless = matches!(format, Format::Vpdq | Format::VpdqJson);
        if lossless {
            for (a, b) in held.iter().zip(&imported) {
                assert_eq!(a.frames, b.frames, "{format}");
                let (a, b) = (a.reference.as_ref(), b.reference.as_ref());
                assert_eq!(
                    a.map(|r| (&r.external_id, &r.note)),
                    b.map(|r| (&r.external_id, &r.note)),
                    "{format}"
                );
            }
        }

        let (mut images_matched, mut frames_matched) = (0, 0);
        for (n, upload) in uploads.iter().enumerate() {
            let before = support::match_image(&source, upload.clone(), all_matches())
                .await
                .expect("match source");
            let after = support::match_image(&target, upload.clone(), all_matches())
                .await
                .expect("match target");
            let before = matches(&before, &source_ids, lossless);
            assert_eq!(
                before,
                matches(&after, &target_ids, lossless),
                "{format}: upload {n}"
            );
            if !before.is_empty() {
                if n < images.len() {
                    images_matched += 1;
                } else {
                    frames_matched += 1;
                }
            }
        }
        // The comparison has something to compare: the referenced pictures (at least) match, and
        // the video's frames do wherever the video was exported.
        assert!(
            images_matched >= 4,
            "{format}: {images_matched} pictures matched"
        );
        if format != Format::Pdq {
            assert!(frames_matched > 0, "{format}: no video frame matched");
        }
        if lossless {
            let before = verdicts(&source, &video_frames, &source_ids).await;
            assert!(
                before.iter().any(|v| v.1 != "0.00" && v.2 != "0.00"),
                "{format}: the video's frames give its reference a verdict: {before:?}"
            );
            assert_eq!(
                before,
                verdicts(&target, &video_frames, &target_ids).await,
                "{format}"
            );
        }
        target.stop().await;
    }
    source.stop().await;
}

/// The binary's import: a format it cannot tell, a malformed line (named, nothing imported),
/// skipped items reported with their line, an unknown bank, and a pdq export of a video.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_reports_bad_lines_and_skips_and_exits_2_on_error() {
    let server = TestServer::start().await;
    support::create_bank(&server, BANK).await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let h1 = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22";
    let write = |name: &str, text: String| {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };

    let bad = write("bad.txt", format!("pdq {h1}\npdq {}\n", &h1[..60]));
    let (code, out, err) = run(&server, &["import", BANK, &bad]).await;
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(
        err.starts_with(&format!("framematch: {bad}: line 2: ")),
        "{err}"
    );

    let unknown = write("unknown.txt", "hello there\n".to_string());
    let (code, _, err) = run(&server, &["import", BANK, &unknown]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("line 1") && err.contains("--format"), "{err}");

    let csv = write(
        "list.csv",
        format!(
            "signal_type,signal_str,collab,category,tags\n\
             pdq,{h1},c,TRUE_POSITIVE,external_id=a%201\n\
             video_md5,d41d8cd98f00b204e9800998ecf8427e,c,TRUE_POSITIVE,\n\
             pdq,{h1},c,FALSE_POSITIVE,\n"
        ),
    );
    let (code, out, err) = run(&server, &["import", BANK, &csv, "--format", "csv"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "imported 1 references (1 frames), skipped 2\n");
    assert!(
        err.contains(&format!("{csv}:3: skipped: signal type \"video_md5\"")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{csv}:4: skipped: category FALSE_POSITIVE")),
        "{err}"
    );
    let stored = export(&server, BANK, false).await.expect("export");
    assert_eq!(
        stored[0].reference.as_ref().map(|r| r.external_id.as_str()),
        Some("a 1")
    );

    let (code, out, err) = run(&server, &["import", "nope", &csv]).await;
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(
        err.contains(&format!(
            "{csv}:2: adding the reference to bank nope (after 0 imported)"
        )),
        "{err}"
    );
    assert!(err.contains("NotFound"), "{err}");

    let (code, out, err) = run(&server, &["export", "nope"]).await;
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.contains("NotFound"), "{err}");

    // A two-frame reference cannot be a pdq line: reported, the rest written.
    support::add_reference(
        &server,
        BANK,
        vec![
            support::pdq_frame(0, 0, &PdqHash::from_bytes([1; 32]), 100),
            support::pdq_frame(30, 1000, &PdqHash::from_bytes([2; 32]), 100),
        ],
    )
    .await
    .expect("add");
    let (code, out, err) = run(&server, &["export", BANK, "--format", "pdq"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("pdq {h1}\n"));
    assert!(
        err.contains("skipped: 2 frames: the pdq format holds one-frame references only"),
        "{err}"
    );
    assert!(
        err.ends_with("exported 1 references (1 frames), skipped 1\n"),
        "{err}"
    );
    server.stop().await;
}

/// ThreatExchange's sample hash list (bare hex lines) imported with the real binary: each needle
/// finds exactly the haystack lines the brute-force table lists, at its distances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threatexchange_haystack_imports_and_its_needles_match_as_listed() {
    let Some(dir) = support::conformance_dir() else {
        return;
    };
    let server = TestServer::start().await;
    support::create_bank(&server, BANK).await;
    let haystack = dir.join("pdq/haystack.txt");
    let (code, out, err) = run(&server, &["import", BANK, &haystack.display().to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "imported 1350 references (1350 frames), skipped 0\n");
    // Reference id -> 1-based haystack line, by import order.
    let lines: HashMap<i64, usize> = export(&server, BANK, false)
        .await
        .expect("export")
        .iter()
        .zip(1..)
        .map(|(e, line)| (id(e), line))
        .collect();

    let table =
        std::fs::read_to_string(dir.join("pdq/needles-haystack-within-31.tsv")).expect("table");
    let mut expected: HashMap<usize, BTreeSet<(usize, u32)>> = HashMap::new();
    for row in table.lines().skip(1) {
        let cols: Vec<usize> = row
            .split('\t')
            .map(|c| c.parse().expect("number"))
            .collect();
        expected
            .entry(cols[0])
            .or_default()
            .insert((cols[1], u32::try_from(cols[2]).expect("distance")));
    }
    let needles = std::fs::read_to_string(dir.join("pdq/needles.txt")).expect("needles");
    for (needle, hex) in needles.lines().zip(1..).map(|(h, n)| (n, h)) {
        let hash: PdqHash = hex.parse().expect("needle");
        let result =
            support::match_image(&server, support::pdq_frame(0, 0, &hash, 100), all_matches())
                .await
                .expect("match");
        let found: BTreeSet<(usize, u32)> = result
            .matches
            .iter()
            .map(|m| {
                (
                    lines[&m.source.as_ref().map_or(0, |s| s.reference_id)],
                    m.distance,
                )
            })
            .collect();
        assert_eq!(
            found,
            expected.remove(&needle).unwrap_or_default(),
            "needle line {needle}"
        );
    }
    assert!(expected.is_empty(), "{expected:?}");
    server.stop().await;
}
