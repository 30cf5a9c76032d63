//! The `framematch bench` load generator (issue #6) against a real server on loopback: small,
//! bounded runs whose report counts are checked. Timings are never asserted (STYLE.md §3.6).

use framematch::client::ClientOptions;
use framematch::hash::PdqHash;
use framematch::loadgen::{self, LoadConfig, Payload};

use crate::support::{TestServer, add_reference, create_bank, pdq_frame};

fn config(server: &TestServer, payload: Payload) -> LoadConfig {
    LoadConfig {
        client: ClientOptions {
            api_key: Some(crate::support::ADMIN_KEY.to_string()),
            ..ClientOptions::new(server.url())
        },
        streams: 3,
        frames_per_stream: 20,
        rate: None,
        duration: None,
        max_in_flight: 4,
        payload,
        server_pid: None,
    }
}

#[tokio::test]
async fn hash_streams_are_all_answered_and_counted() {
    let server = TestServer::start().await;
    create_bank(&server, "load").await;
    let hashes: Vec<PdqHash> = loadgen::random_hashes(5, 11);
    let frames = hashes
        .iter()
        .enumerate()
        .map(|(i, h)| pdq_frame(i as u32, i as u64 * 1000, h, 100))
        .collect();
    add_reference(&server, "load", frames)
        .await
        .expect("add reference");

    // Every frame carries a stored hash, so every frame matches.
    let report = loadgen::run(&config(&server, Payload::Hashes(hashes)))
        .await
        .expect("run");
    assert_eq!(report.errors, 0, "{:?}", report.error_samples);
    assert_eq!(report.streams_opened, 3);
    assert_eq!(report.streams_completed, 3);
    assert_eq!(report.frames_sent, 60);
    assert_eq!(report.frames_answered, 60);
    assert_eq!(report.frames_matched, 60);
    assert!(report.latency_p50_ms <= report.latency_p99_ms);
    assert!(report.latency_p99_ms <= report.latency_max_ms);
    assert_eq!(report.server_cpu_s, None, "no pid given");
    assert!(
        report
            .to_markdown()
            .contains("| frames (sent / answered / matched) | 60 / 60 / 60 |")
    );

    // Random hashes match nothing; a fixed rate still sends every frame.
    let mut unrelated = config(&server, Payload::Hashes(loadgen::random_hashes(50, 12)));
    unrelated.rate = Some(2000.0);
    unrelated.streams = 2;
    unrelated.server_pid = Some(std::process::id());
    let report = loadgen::run(&unrelated).await.expect("run");
    assert_eq!(report.errors, 0, "{:?}", report.error_samples);
    assert_eq!(report.frames_answered, 40);
    assert_eq!(report.frames_matched, 0);
    assert!(
        report.server_cpu_s.is_some(),
        "our own pid has a /proc entry"
    );
    server.stop().await;
}

#[tokio::test]
async fn jpeg_720p_frames_are_hashed_by_the_server() {
    let server = TestServer::start().await;
    let jpegs = loadgen::jpeg_720p_frames(&[]).expect("synthetic frames");
    assert_eq!(jpegs.len(), 4);
    let picture = image::load_from_memory(&jpegs[0]).expect("decode");
    assert_eq!((picture.width(), picture.height()), (1280, 720));
    let mut run = config(&server, Payload::Jpeg(jpegs));
    run.streams = 2;
    run.frames_per_stream = 3;
    let report = loadgen::run(&run).await.expect("run");
    assert_eq!(report.errors, 0, "{:?}", report.error_samples);
    assert_eq!(report.frames_sent, 6);
    assert_eq!(report.frames_answered, 6);
    assert_eq!(report.streams_completed, 2);
    server.stop().await;
}

#[tokio::test]
async fn streams_ended_by_the_server_are_errors() {
    let server = TestServer::start_with(|c| c.limits.max_frames_per_stream = 5).await;
    let report = loadgen::run(&config(
        &server,
        Payload::Hashes(loadgen::random_hashes(10, 13)),
    ))
    .await
    .expect("run");
    assert_eq!(report.streams_opened, 3);
    assert_eq!(report.streams_completed, 0);
    assert_eq!(report.errors, 3, "{:?}", report.error_samples);
    assert!(report.frames_answered <= 15);
    assert!(
        report
            .error_samples
            .iter()
            .any(|e| e.contains("ResourceExhausted")),
        "{:?}",
        report.error_samples
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_settings_are_refused() {
    let mut run = LoadConfig {
        client: ClientOptions::new("http://127.0.0.1:1"),
        streams: 0,
        frames_per_stream: 1,
        rate: None,
        duration: None,
        max_in_flight: 1,
        payload: Payload::Hashes(loadgen::random_hashes(1, 1)),
        server_pid: None,
    };
    assert!(loadgen::run(&run).await.is_err());
    run.streams = 1;
    run.rate = Some(0.0);
    assert!(loadgen::run(&run).await.is_err());
    run.rate = None;
    run.payload = Payload::Jpeg(Vec::new());
    assert!(loadgen::run(&run).await.is_err());
    // An unreachable server is an error in the report, not a failure to run.
    run.payload = Payload::Hashes(loadgen::random_hashes(1, 1));
    let report = loadgen::run(&run).await.expect("run");
    assert_eq!(report.errors, 1);
    assert_eq!(report.frames_answered, 0);
}
