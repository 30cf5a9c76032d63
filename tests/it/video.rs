//! Videos end to end (issue #3): the real binary decoding with the real FFmpeg, checked against the
//! reference vPDQ outputs in ../shared/conformance/vpdq, vPDQ files and `vpdq-match`, and `scan`
//! against a real server.
//!
//! FFmpeg is required: in CI its absence fails these tests (`.ci/run` installs it); on a
//! developer machine without it they are skipped with a message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use framematch::hash::PdqHash;
use framematch::hash::vpdq::{self, MatchConfig, Semantics, Vpdq};

use crate::support::{self, TestServer};

const BIN: &str = env!("CARGO_BIN_EXE_framematch");

/// The conformance vpdq folder, when both it and ffmpeg are there.
fn vpdq_dir_with_ffmpeg() -> Option<PathBuf> {
    let dir = support::conformance_dir()?.join("vpdq");
    support::ffmpeg_available().then_some(dir)
}

/// Runs the binary; returns (exit code, stdout, stderr).
fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (i32, String, String) {
    let output = Command::new(BIN)
        .env("FRAMEMATCH_BOOTSTRAP_ADMIN_KEY", support::ADMIN_KEY)
        .env("FRAMEMATCH_API_KEY", support::ADMIN_KEY)
        .args(args)
        .output()
        .expect("run framematch");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// As [`run`], off the async runtime, so an in-process server keeps serving meanwhile.
async fn run_async(args: Vec<String>) -> (i32, String, String) {
    let output = tokio::process::Command::new(BIN)
        .env("FRAMEMATCH_BOOTSTRAP_ADMIN_KEY", support::ADMIN_KEY)
        .env("FRAMEMATCH_API_KEY", support::ADMIN_KEY)
        .args(&args)
        .output()
        .await
        .expect("run framematch");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn videos(dir: &Path) -> Vec<PathBuf> {
    let mut videos: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list vpdq dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "mp4"))
        .collect();
    videos.sort();
    assert!(!videos.is_empty(), "no .mp4 in {}", dir.display());
    videos
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .expect("file name")
        .to_string_lossy()
        .into_owned()
}

/// Lines that differ between two vPDQ texts, described frame by frame with the hash distance.
fn describe_differences(expected: &str, actual: &str) -> String {
    let parse = |text: &str| -> BTreeMap<u64, (u8, PdqHash, String)> {
        Vpdq::parse(text)
            .map(|v| {
                v.features
                    .iter()
                    .map(|f| {
                        (
                            f.frame_number,
                            (f.quality, f.hash, format!("{:.3}", f.timestamp_s)),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (expected, actual) = (parse(expected), parse(actual));
    let mut out = Vec::new();
    for (frame, want) in &expected {
        match actual.get(frame) {
            None => out.push(format!("frame {frame}: missing")),
            Some(got) if got != want => out.push(format!(
                "frame {frame}: {} bits off, quality {} vs {}, time {} vs {}",
                got.1.distance(&want.1),
                got.0,
                want.0,
                got.2,
                want.2
            )),
            Some(_) => {}
        }
    }
    for frame in actual.keys().filter(|f| !expected.contains_key(f)) {
        out.push(format!("frame {frame}: not in the reference"));
    }
    out.join("\n")
}

#[test]
fn every_frame_hashes_equal_the_ffmpeg_5_1_9_reference_bit_for_bit() {
    let Some(dir) = vpdq_dir_with_ffmpeg() else {
        return;
    };
    let mut failures = Vec::new();
    for video in videos(&dir) {
        let case = stem(&video);
        let expected_path = dir
            .join("regenerated-ffmpeg-5.1.9")
            .join(format!("{case}.txt"));
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", expected_path.display()));
        let (code, out, err) = run(&["hash".as_ref(), "--every-frame".as_ref(), video.as_os_str()]);
        assert_eq!(code, 0, "{case}: {err}");
        if out != expected {
            failures.push(format!(
                "{case}:\n{}",
                describe_differences(&expected, &out)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "not bit-exact:\n{}",
        failures.join("\n")
    );
}

#[test]
fn default_sampling_hashes_one_frame_per_second_as_vpdq_selects() {
    let Some(dir) = vpdq_dir_with_ffmpeg() else {
        return;
    };
    // Every shared clip is 30 fps: step (int)(1.0 · 30) = 30, and (int)(0.5 · 30) = 15.
    let keep = |every_frame: &str, step: u64| -> String {
        every_frame
            .lines()
            .filter(|line| {
                let frame: u64 = line
                    .split(',')
                    .next()
                    .and_then(|f| f.parse().ok())
                    .expect("frame number");
                frame.is_multiple_of(step)
            })
            .map(|line| format!("{line}\n"))
            .collect()
    };
    for video in videos(&dir) {
        let case = stem(&video);
        let every_frame = std::fs::read_to_string(
            dir.join("regenerated-ffmpeg-5.1.9")
                .join(format!("{case}.txt")),
        )
        .expect("reference");
        let (code, out, err) = run(&["hash".as_ref(), video.as_os_str()]);
        assert_eq!(code, 0, "{case}: {err}");
        assert_eq!(out, keep(&every_frame, 30), "{case} at 1 s");
        assert!(out.lines().count() >= 4, "{case}: clips are 4 s or more");
    }
    let video = dir.join("test-padded-dimensions.mp4");
    let every_frame =
        std::fs::read_to_string(dir.join("regenerated-ffmpeg-5.1.9/test-padded-dimensions.txt"))
            .expect("reference");
    let (code, out, err) = run(&[
        "hash".as_ref(),
        "--seconds-per-hash".as_ref(),
        "0.5".as_ref(),
        video.as_os_str(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, keep(&every_frame, 15), "at 0.5 s");
}

#[test]
fn vpdq_text_and_json_round_trip() {
    let Some(conformance) = support::conformance_dir() else {
        return;
    };
    let dir = conformance.join("vpdq/regenerated-ffmpeg-5.1.9");
    for entry in std::fs::read_dir(&dir).expect("list") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        let vpdq = Vpdq::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(vpdq.to_text(), text, "{}: text round trip", path.display());
        // Every-frame files number their frames 0, 1, 2, …, which is what JSON entries get.
        let json = vpdq.to_json();
        let back = Vpdq::parse(&json).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(back.to_text(), text, "{}: JSON round trip", path.display());
    }
}

#[test]
fn hma_json_with_exponent_timestamps_matches_its_text_form() {
    let Some(conformance) = support::conformance_dir() else {
        return;
    };
    let text_path = conformance.join("vpdq/chair-19-sd-bar.txt");
    let vpdq = Vpdq::parse(&std::fs::read_to_string(&text_path).expect("read")).expect("parse");
    // python-threatexchange writes timestamps with 3 significant digits: 18.767 → "18.8",
    // 123.4 → "1.23e+02". Uppercase hex is accepted too.
    let entries: Vec<String> = vpdq
        .features
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let time = if i % 2 == 0 {
                format!("{:.2e}", f.timestamp_s + 100.0).replace('e', "e+0")
            } else {
                format!("{:.1}", f.timestamp_s)
            };
            format!("{},{},{time}", f.hash.to_string().to_uppercase(), f.quality)
        })
        .collect();
    assert!(entries[0].ends_with(",1.00e+02"), "{}", entries[0]);
    let dir = tempfile::tempdir().expect("temp dir");
    let json_path = dir.path().join("chair-19.json");
    std::fs::write(&json_path, serde_json::to_string(&entries).expect("json")).expect("write");
    let parsed = Vpdq::parse(&std::fs::read_to_string(&json_path).expect("read")).expect("parse");
    assert_eq!(parsed.features.len(), vpdq.features.len());
    assert_eq!(parsed.features[0].timestamp_s, 100.0);
    let (code, out, err) = run(&[
        "vpdq-match".as_ref(),
        json_path.as_os_str(),
        text_path.as_os_str(),
    ]);
    assert_eq!((code, out.as_str()), (1, "100.00\t100.00\ttrue\n"), "{err}");
}

#[test]
fn vpdq_match_reproduces_every_row_of_the_expected_table() {
    let Some(conformance) = support::conformance_dir() else {
        return;
    };
    let dir = conformance.join("vpdq");
    let table = std::fs::read_to_string(dir.join("vpdq-match-expected.tsv")).expect("table");
    let mut rows = 0;
    let cpp = MatchConfig {
        semantics: Semantics::Cpp,
        ..MatchConfig::default()
    };
    let load = |name: &str| {
        Vpdq::parse(&std::fs::read_to_string(dir.join(name)).expect("read")).expect("parse")
    };
    for line in table.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        let [query, compared, pytx_q, pytx_c, pytx_match, cpp_q, cpp_c] = cols.as_slice() else {
            panic!("7 columns: {line}");
        };
        let (code, out, err) = run(&[
            "vpdq-match".as_ref(),
            dir.join(query).as_os_str(),
            dir.join(compared).as_os_str(),
        ]);
        let expected_code = if *pytx_match == "true" { 1 } else { 0 };
        assert_eq!(code, expected_code, "{query} vs {compared}: {err}");
        assert_eq!(
            out,
            format!("{pytx_q}\t{pytx_c}\t{pytx_match}\n"),
            "{query} vs {compared} (python-threatexchange)"
        );
        // The C++ columns, through the library (the CLI's --cpp is the same call).
        let r = vpdq::match_brute(&load(query).features, &load(compared).features, &cpp);
        assert_eq!(
            format!("{:.2}\t{:.2}", r.query_match_pct, r.compared_match_pct),
            format!("{cpp_q}\t{cpp_c}"),
            "{query} vs {compared} (C++)"
        );
        rows += 1;
    }
    assert_eq!(rows, 121, "every ordered pair of the 11 files");
}

#[test]
fn files_that_are_not_videos_fail_clearly_with_exit_2() {
    if !support::ffmpeg_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let text = dir.path().join("notes.mp4");
    std::fs::write(&text, "this is not a video\n").expect("write");
    let (code, out, err) = run(&["hash".as_ref(), text.as_os_str()]);
    assert_eq!(code, 2, "{out}");
    assert!(err.contains("is not a video"), "{err}");
    assert!(out.is_empty(), "{out}");

    let empty = dir.path().join("empty.mp4");
    std::fs::write(&empty, b"").expect("write");
    let (code, _, err) = run(&["hash".as_ref(), empty.as_os_str()]);
    assert_eq!(code, 2);
    assert!(err.contains("not a video"), "{err}");

    let missing = dir.path().join("missing.mp4");
    let (code, _, err) = run(&["hash".as_ref(), missing.as_os_str()]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read"), "{err}");

    // A real media file without a video stream.
    let audio = dir.path().join("tone.wav");
    let status = Command::new("ffmpeg")
        .args([
            "-nostdin",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "sine=duration=0.2",
        ])
        .arg(&audio)
        .status()
        .expect("ffmpeg");
    assert!(status.success());
    let (code, _, err) = run(&["hash".as_ref(), audio.as_os_str()]);
    assert_eq!(code, 2);
    assert!(err.contains("has no video stream"), "{err}");

    // Without ffmpeg on PATH, the message says how to get it.
    let video = support::conformance_dir().map_or_else(
        || audio.clone(),
        |c| c.join("vpdq/test-padded-dimensions.mp4"),
    );
    let output = Command::new(BIN)
        .env("FRAMEMATCH_BOOTSTRAP_ADMIN_KEY", support::ADMIN_KEY)
        .env("FRAMEMATCH_API_KEY", support::ADMIN_KEY)
        .arg("hash")
        .arg(&video)
        .env("PATH", dir.path())
        .output()
        .expect("run framematch");
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains("ffprobe not found: install ffmpeg (for example `apt-get install ffmpeg`)"),
        "{err}"
    );

    // vpdq-match with a bad vPDQ file names the line.
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "0,100,zz,0.000\n").expect("write");
    let (code, _, err) = run(&["vpdq-match".as_ref(), bad.as_os_str(), bad.as_os_str()]);
    assert_eq!(code, 2);
    assert!(err.contains("line 1"), "{err}");
}

#[test]
fn a_truncated_video_hashes_the_frames_before_the_cut() {
    let Some(dir) = vpdq_dir_with_ffmpeg() else {
        return;
    };
    let original = dir.join("test-padded-dimensions.mp4");
    let tmp = tempfile::tempdir().expect("temp dir");
    // With its index at the end (as shared), a cut MP4 has no index at all: not a video.
    let bytes = std::fs::read(&original).expect("read");
    let no_index = tmp.path().join("no-index.mp4");
    std::fs::write(&no_index, &bytes[..bytes.len() * 2 / 5]).expect("write");
    let (code, out, err) = run(&["hash".as_ref(), no_index.as_os_str()]);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(
        err.contains("is not a video") && err.contains("moov atom not found"),
        "{err}"
    );

    // With the index first (a lossless remux), the frames before the cut decode exactly as in
    // the whole file; the last one is cut inside its data and decodes only approximately.
    let faststart = tmp.path().join("faststart.mp4");
    let status = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-i"])
        .arg(&original)
        .args(["-c", "copy", "-movflags", "+faststart"])
        .arg(&faststart)
        .status()
        .expect("ffmpeg");
    assert!(status.success());
    let bytes = std::fs::read(&faststart).expect("read");
    let cut = tmp.path().join("cut.mp4");
    std::fs::write(&cut, &bytes[..bytes.len() * 3 / 5]).expect("write");
    let (code, out, err) = run(&["hash".as_ref(), "--every-frame".as_ref(), cut.as_os_str()]);
    assert_eq!(code, 0, "ffmpeg decodes what is there: {err}");
    let expected =
        std::fs::read_to_string(dir.join("regenerated-ffmpeg-5.1.9/test-padded-dimensions.txt"))
            .expect("reference");
    let got: Vec<&str> = out.lines().collect();
    assert!(got.len() > 10 && got.len() < 150, "{} frames", got.len());
    let whole: Vec<&str> = expected.lines().take(got.len() - 1).collect();
    assert_eq!(got[..got.len() - 1], whole[..]);
}

#[test]
fn a_stream_that_changes_size_midway_keeps_whole_frames_and_frame_numbers() {
    if !support::ffmpeg_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let part = |size: &str, name: &str| {
        let path = tmp.path().join(name);
        let status = Command::new("ffmpeg")
            .args(["-nostdin", "-v", "error", "-f", "lavfi", "-i"])
            .arg(format!("testsrc=size={size}:rate=30:duration=2"))
            .args(["-c:v", "mpeg2video", "-q:v", "2"])
            .arg(&path)
            .status()
            .expect("ffmpeg");
        assert!(status.success());
        std::fs::read(path).expect("read part")
    };
    // MPEG-TS streams concatenate byte-wise: 2 s at 320x240, then 2 s at 160x120.
    let joined = tmp.path().join("joined.ts");
    std::fs::write(
        &joined,
        [part("320x240", "a.ts"), part("160x120", "b.ts")].concat(),
    )
    .expect("write");
    let (code, every, err) = run(&[
        "hash".as_ref(),
        "--every-frame".as_ref(),
        joined.as_os_str(),
    ]);
    assert_eq!(code, 0, "{err}");
    // 120 frames in; the join may cost a frame (decoders drop one across the discontinuity).
    let decoded = every.lines().count();
    assert!((115..=120).contains(&decoded), "{decoded} frames");
    let (code, sampled, err) = run(&["hash".as_ref(), joined.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    let picked: Vec<&str> = every
        .lines()
        .filter(|l| ["0,", "30,", "60,", "90,"].iter().any(|p| l.starts_with(p)))
        .collect();
    assert_eq!(sampled.lines().collect::<Vec<_>>(), picked);
}

/// `ref add` then `scan` against an in-process server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_matches_a_referenced_video_and_passes_an_unrelated_one() {
    let Some(dir) = vpdq_dir_with_ffmpeg() else {
        return;
    };
    let server = TestServer::start().await;
    let url = server.url();
    let arg = |p: &Path| p.display().to_string();
    let with_server = |mut args: Vec<String>| {
        args.extend(["--server".to_string(), url.clone()]);
        args
    };
    support::create_bank(&server, "known").await;
    let reference = dir.join("test-padded-dimensions.mp4");
    let unrelated = dir.join("doorknob-hd-no-bar.mp4");

    let (code, out, err) = run_async(with_server(vec![
        "ref".into(),
        "add".into(),
        "known".into(),
        arg(&reference),
    ]))
    .await;
    assert_eq!(code, 0, "{err}");
    let (id, path) = out.trim_end().split_once('\t').expect("id<TAB>path");
    assert_eq!(path, arg(&reference));
    let stored = server
        .banks()
        .await
        .get_reference(framematch::pb::GetReferenceRequest {
            reference_id: id.parse().expect("id"),
            include_embeddings: false,
        })
        .await
        .expect("get")
        .into_inner();
    // 150 frames at 30 fps, one hash per second: frames 0, 30, 60, 90, 120. The clip is padded
    // with uniform borders, so each frame is also stored by its content area's hash.
    assert_eq!(stored.frame_count, 10);

    let (code, out, err) = run_async(with_server(vec![
        "scan".into(),
        arg(&reference),
        "--bank".into(),
        "known".into(),
    ]))
    .await;
    assert_eq!(code, 1, "the same video matches: {out}{err}");
    assert_eq!(
        out,
        format!("{}\t{id}\tknown\t100.00\t100.00\tmatch\n", arg(&reference))
    );

    let (code, out, err) = run_async(with_server(vec!["scan".into(), arg(&unrelated)])).await;
    assert_eq!(code, 0, "an unrelated video does not match: {out}{err}");
    assert!(!out.contains("\tmatch"), "{out}");

    // The server hashes JPEG frames within a few bits of the local hashes.
    let (code, out, err) = run_async(with_server(vec![
        "scan".into(),
        "--send-images".into(),
        arg(&reference),
    ]))
    .await;
    assert_eq!(code, 1, "--send-images matches too: {out}{err}");
    assert!(out.ends_with("\tmatch\n"), "{out}");

    // A reference given as HMA's JSON vPDQ (every frame of another clip) matches that clip.
    let tmp = tempfile::tempdir().expect("temp dir");
    let pattern = dir.join("pattern-sd-grey-bar.mp4");
    let text =
        std::fs::read_to_string(dir.join("regenerated-ffmpeg-5.1.9/pattern-sd-grey-bar.txt"))
            .expect("reference hashes");
    let json = tmp.path().join("pattern.json");
    std::fs::write(&json, Vpdq::parse(&text).expect("parse").to_json()).expect("write");
    let (code, out, err) = run_async(with_server(vec![
        "ref".into(),
        "add".into(),
        "known".into(),
        arg(&json),
    ]))
    .await;
    assert_eq!(code, 0, "{err}");
    let (json_id, _) = out.trim_end().split_once('\t').expect("id<TAB>path");
    let (code, out, err) = run_async(with_server(vec!["scan".into(), arg(&pattern)])).await;
    assert_eq!(code, 1, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.split('\t').nth(1) == Some(json_id))
        .unwrap_or_else(|| panic!("a verdict for reference {json_id}: {out}"));
    assert!(line.starts_with(&format!("{}\t", arg(&pattern))), "{line}");
    // All 7 frames sent (one a second) are among the reference's 206: the query side is 100 %.
    let cols: Vec<&str> = line.split('\t').collect();
    assert_eq!((cols[3], cols[5]), ("100.00", "match"), "{line}");

    // A text file is not a video: exit 2, nothing on stdout.
    let text = tmp.path().join("notes.txt");
    std::fs::write(&text, "hello\n").expect("write");
    let (code, out, err) = run_async(with_server(vec!["scan".into(), arg(&text)])).await;
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.contains("not a video"), "{err}");
    server.stop().await;
}

/// Issue #3 item 7: a horizontally mirrored re-upload matches with `--dihedral` only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_dihedral_matches_a_mirrored_reupload() {
    let Some(dir) = vpdq_dir_with_ffmpeg() else {
        return;
    };
    let reference = dir.join("test-padded-dimensions.mp4");
    let tmp = tempfile::tempdir().expect("temp dir");
    let mirrored = tmp.path().join("mirrored.mkv");
    let status = tokio::process::Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-i"])
        .arg(&reference)
        .args(["-vf", "hflip", "-c:v", "mjpeg", "-q:v", "3", "-an"])
        .arg(&mirrored)
        .status()
        .await
        .expect("ffmpeg");
    assert!(status.success(), "ffmpeg mirrors the clip");

    let server = TestServer::start().await;
    let url = server.url();
    support::create_bank(&server, "known").await;
    let arg = |p: &Path| p.display().to_string();
    let with_server = |mut args: Vec<String>| {
        args.extend(["--server".to_string(), url.clone()]);
        args
    };
    let (code, _, err) = run_async(with_server(vec![
        "ref".into(),
        "add".into(),
        "known".into(),
        arg(&reference),
    ]))
    .await;
    assert_eq!(code, 0, "{err}");

    let (code, out, err) = run_async(with_server(vec!["scan".into(), arg(&mirrored)])).await;
    assert_eq!(code, 0, "plain PDQ misses a mirror image: {out}{err}");
    let (code, out, err) = run_async(with_server(vec![
        "scan".into(),
        "--dihedral".into(),
        arg(&mirrored),
    ]))
    .await;
    assert_eq!(code, 1, "--dihedral finds it: {out}{err}");
    assert!(out.ends_with("\tmatch\n"), "{out}");
    server.stop().await;
}

#[test]
fn vpdq_files_and_videos_are_interchangeable_in_vpdq_match() {
    let Some(dir) = vpdq_dir_with_ffmpeg() else {
        return;
    };
    let video = dir.join("pattern-sd-grey-bar.mp4");
    let hashes = dir.join("regenerated-ffmpeg-5.1.9/pattern-sd-grey-bar.txt");
    // The video is hashed at 1 s: 7 of the file's 206 frames, all found in it.
    let (code, out, err) = run(&["vpdq-match".as_ref(), video.as_os_str(), hashes.as_os_str()]);
    assert_eq!(code, 1, "{err}");
    let cols: Vec<&str> = out.trim_end().split('\t').collect();
    assert_eq!(cols[0], "100.00", "{out}");
    assert_eq!(cols[2], "true", "{out}");
    // With --every-frame both sides are the same frames.
    let (code, out, err) = run(&[
        "vpdq-match".as_ref(),
        "--every-frame".as_ref(),
        hashes.as_os_str(),
        video.as_os_str(),
    ]);
    assert_eq!((code, out.as_str()), (1, "100.00\t100.00\ttrue\n"), "{err}");
}

/// Runs a client command of the binary against `server`, off the runtime.
async fn client(server: &TestServer, args: &[&str]) -> (i32, String, String) {
    let mut all: Vec<String> = args.iter().map(|a| (*a).to_string()).collect();
    all.extend(["--server".to_string(), server.url()]);
    run_async(all).await
}

/// The `scan` line for `reference` in `out`: (query %, reference %, match?).
fn scan_line(out: &str, reference: &str) -> Option<(f64, f64, bool)> {
    out.lines().find_map(|line| {
        let f: Vec<&str> = line.split('\t').collect();
        (f.len() == 6 && f[1] == reference).then(|| {
            (
                f[3].parse().expect("query %"),
                f[4].parse().expect("reference %"),
                f[5] == "match",
            )
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bars_added_by_a_re_upload_no_longer_hide_it() {
    let Some(dir) = vpdq_dir_with_ffmpeg() else {
        return;
    };
    let path = |name: &str| dir.join(name).display().to_string();
    // Plain vPDQ: the barred SD copy and the bare HD original share no frame (the shared table
    // says 0 % both ways).
    let (_, plain, _) = run(&[
        "vpdq-match",
        &path("pattern-sd-grey-bar.mp4"),
        &path("pattern-hd-no-bar.mp4"),
    ]);
    assert!(plain.starts_with("0.00\t0.00\tfalse"), "{plain}");

    let server = TestServer::start().await;
    support::create_bank(&server, "videos").await;
    let (code, out, err) = client(
        &server,
        &["ref", "add", "videos", &path("pattern-hd-no-bar.mp4")],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let id = out.split('\t').next().expect("id").to_string();
    for barred in [
        "pattern-sd-grey-bar.mp4",
        "pattern-sd-with-small-logo-bar.mp4",
    ] {
        let (code, out, err) = client(&server, &["scan", &path(barred)]).await;
        assert_eq!(
            code, 1,
            "{barred} should match with its bars removed: {out}{err}"
        );
        let (query, reference, matched) = scan_line(&out, &id).expect("a verdict line");
        assert!(matched && query >= 80.0, "{barred}: {out}");
        assert!(reference > 0.0);
    }
    // And the other way round: a barred reference, a bare upload.
    support::create_bank(&server, "barred").await;
    let (code, out, _) = client(
        &server,
        &["ref", "add", "barred", &path("pattern-sd-grey-bar.mp4")],
    )
    .await;
    assert_eq!(code, 0);
    let barred_id = out.split('\t').next().expect("id").to_string();
    let (code, out, _) = client(
        &server,
        &["scan", "--bank", "barred", &path("pattern-hd-no-bar.mp4")],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(
        scan_line(&out, &barred_id).is_some_and(|(_, _, m)| m),
        "{out}"
    );
    // Unrelated clips still do not match.
    for other in ["chair-19-sd-bar.mp4", "doorknob-hd-no-bar.mp4"] {
        let (code, out, _) = client(&server, &["scan", &path(other)]).await;
        assert_eq!(code, 0, "{other}: {out}");
    }
    server.stop().await;
}

/// Runs ffmpeg with `args`, panicking with its stderr on failure.
fn ffmpeg(args: &[&str]) {
    let output = Command::new("ffmpeg")
        .args(["-v", "error", "-y"])
        .args(args)
        .output()
        .expect("run ffmpeg");
    assert!(
        output.status.success(),
        "ffmpeg {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_excerpt_spliced_into_an_unrelated_video_matches_by_its_run() {
    let Some(dir) = vpdq_dir_with_ffmpeg() else {
        return;
    };
    let path = |name: &str| dir.join(name).display().to_string();
    let work = tempfile::tempdir().expect("temp dir");
    let upload = work.path().join("upload.mp4").display().to_string();
    // Upload: 4 s of the doorknob clip, 10 s of the chair reference from its 5 s mark, then 7 s
    // of the pattern clip, all at the reference's 480x720 and 30 fps.
    ffmpeg(&[
        "-i",
        &path("doorknob-hd-no-bar.mp4"),
        "-i",
        &path("chair-orig-22-sd-bar.mp4"),
        "-i",
        &path("pattern-hd-no-bar.mp4"),
        "-filter_complex",
        "[0:v]scale=480:720,setsar=1,fps=30[a];\
         [1:v]trim=start=5:duration=10,setpts=PTS-STARTPTS,fps=30[b];\
         [2:v]scale=480:720,setsar=1,fps=30[c];\
         [a][b][c]concat=n=3:v=1:a=0[out]",
        "-map",
        "[out]",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        &upload,
    ]);

    let server = TestServer::start().await;
    support::create_bank(&server, "videos").await;
    let (code, out, err) = client(
        &server,
        &["ref", "add", "videos", &path("chair-orig-22-sd-bar.mp4")],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let id = out.split('\t').next().expect("id").to_string();

    // The percentage rule alone misses it: under half of the upload is the excerpt.
    let (code, out, _) = client(&server, &["scan", "--min-run-ms", "0", &upload]).await;
    assert_eq!(code, 0, "without the run rule: {out}");
    // The run rule (default 5 s) finds it.
    let (code, out, err) = client(&server, &["scan", &upload]).await;
    assert_eq!(code, 1, "{out}{err}");
    let (query, _, matched) = scan_line(&out, &id).expect("a verdict line");
    assert!(matched && query < 80.0, "{out}");

    // Unrelated shared videos never match the chair reference, by either rule.
    for other in [
        "pattern-sd-grey-bar.mp4",
        "doorknob-hd-no-bar.mp4",
        "pattern-hd-no-bar.mp4",
    ] {
        let (code, out, _) = client(&server, &["scan", &path(other)]).await;
        assert_eq!(code, 0, "{other}: {out}");
    }
    server.stop().await;
}
