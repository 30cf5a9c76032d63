//! Embedding spaces end to end (issue #11) on real servers over real gRPC: a bank declares a
//! space, references carry client-computed vectors, uploads match them by cosine score with
//! `SIGNAL_EMBEDDING`, bad vectors are INVALID_ARGUMENT naming the space and the numbers, vectors
//! survive a restart (stored as f16), withdrawal takes them out of matching, `export` / `import`
//! (vpdq-json) round-trips them, and a partner following the server mirrors the bank's spaces and
//! the vectors.
//!
//! Not covered here: vectors the server computes with its own model (`SpaceModel`). The test
//! server is built from a `ServeConfig`, which has no way in for a test's model; the model path
//! is tested by the embed helper's `tests/it/embed_model.rs`.

use std::time::{Duration, Instant};

use framematch::config::FollowConfig;
use framematch::pb;
use tonic::Code;

use crate::support::{self, ADMIN_KEY, TestServer};

const BIN: &str = env!("CARGO_BIN_EXE_framematch");
const SPACE: &str = "sscd";
const DIM: usize = 16;
/// The bank's threshold: near copies score about 0.99, unrelated vectors about 0.
const THRESHOLD: f32 = 0.9;

fn space(name: &str, dimension: u32, threshold: f32) -> pb::EmbeddingSpace {
    pb::EmbeddingSpace {
        name: name.to_string(),
        dimension,
        metric: pb::EmbeddingMetric::Cosine as i32,
        threshold,
        index: DEFAULT_INDEX.to_string(),
    }
}

/// The server's default vector index settings, as replies spell them.
const DEFAULT_INDEX: &str = "m=16,ef_construction=128,ef_search=64,graph_min=20000";

async fn create_bank_with(
    server: &TestServer,
    name: &str,
    spaces: Vec<pb::EmbeddingSpace>,
) -> Result<pb::Bank, tonic::Status> {
    server
        .banks()
        .await
        .create_bank(pb::CreateBankRequest {
            embedding_spaces: spaces,
            name: name.into(),
            category: pb::Category::GraphicViolence as i32,
            visibility: pb::Visibility::Public as i32,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A deterministic unit-length-ish vector: reference `seed`'s descriptor.
fn descriptor(seed: u32) -> Vec<f32> {
    (0..DIM)
        .map(|i| ((i as f32 + 1.0) * (seed as f32 * 0.731 + 0.1)).sin())
        .collect()
}

/// `v` moved a little, as a re-encoded copy's descriptor moves.
fn nudged(v: &[f32]) -> Vec<f32> {
    v.iter()
        .enumerate()
        .map(|(i, x)| x + if i % 2 == 0 { 0.03 } else { -0.03 })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// A frame that carries only a vector (no picture, no PDQ).
fn vector_frame(frame_index: u32, space: &str, values: Vec<f32>) -> pb::Frame {
    pb::Frame {
        frame_index,
        timestamp_ms: u64::from(frame_index) * 1000,
        signal: None,
        embeddings: vec![pb::Embedding {
            space: space.to_string(),
            values,
        }],
    }
}

/// Matches one vector-only frame against every bank.
async fn match_vector(
    server: &TestServer,
    values: Vec<f32>,
) -> Result<Vec<pb::FrameMatch>, tonic::Status> {
    support::match_image(server, vector_frame(0, SPACE, values), None)
        .await
        .map(|result| result.matches)
}

/// A server with bank `vectors` (space `sscd`, 16-d cosine, threshold 0.9) holding one reference
/// of two vector-only frames (`descriptor(1)`, `descriptor(2)`); returns its id.
async fn server_with_reference() -> (TestServer, i64) {
    let server = TestServer::start().await;
    let id = add_vectors_reference(&server).await;
    (server, id)
}

async fn add_vectors_reference(server: &TestServer) -> i64 {
    create_bank_with(server, "vectors", vec![space(SPACE, DIM as u32, THRESHOLD)])
        .await
        .expect("create bank");
    let added = support::add_reference(
        server,
        "vectors",
        vec![
            vector_frame(0, SPACE, descriptor(1)),
            vector_frame(1, SPACE, descriptor(2)),
        ],
    )
    .await
    .expect("add reference");
    assert_eq!(added.frames_received, 2);
    assert_eq!(added.frames_stored, 0, "no PDQ frame");
    added.reference.expect("reference").id
}

fn assert_embedding_match(matches: &[pb::FrameMatch], reference: i64, frame: u32) {
    let hit = matches
        .iter()
        .find(|m| m.source.as_ref().map(|s| s.reference_id) == Some(reference))
        .unwrap_or_else(|| panic!("no match on reference {reference}: {matches:?}"));
    assert_eq!(hit.signal, pb::Signal::Embedding as i32, "{hit:?}");
    assert_eq!(hit.space, SPACE);
    assert!(hit.score >= THRESHOLD && hit.score <= 1.01, "{hit:?}");
    assert_eq!(hit.reference_frame_index, frame);
}

#[tokio::test]
async fn client_vectors_match_by_score_in_the_banks_space() {
    let (server, reference) = server_with_reference().await;
    let banks = server
        .banks()
        .await
        .list_banks(pb::ListBanksRequest {})
        .await
        .expect("list")
        .into_inner()
        .banks;
    assert_eq!(banks[0].embedding_spaces, vec![space(SPACE, 16, THRESHOLD)]);

    let near = nudged(&descriptor(2));
    assert!(cosine(&near, &descriptor(2)) > 0.99);
    let matches = match_vector(&server, near).await.expect("match");
    assert_embedding_match(&matches, reference, 1);

    // Unrelated descriptors score far below the threshold.
    let far = descriptor(40);
    assert!(cosine(&far, &descriptor(1)) < 0.5 && cosine(&far, &descriptor(2)) < 0.5);
    assert!(match_vector(&server, far).await.expect("match").is_empty());

    // A PDQ frame with a vector beside it matches by the vector too.
    let mut frame = support::pdq_frame(0, 0, &framematch::hash::PdqHash::from_bytes([7; 32]), 100);
    frame.embeddings = vec![pb::Embedding {
        space: SPACE.into(),
        values: nudged(&descriptor(1)),
    }];
    let result = support::match_image(&server, frame, None)
        .await
        .expect("match");
    assert_embedding_match(&result.matches, reference, 0);

    // Over a MatchVideo stream: a verdict from vectors alone.
    let requests = vec![
        pb::MatchRequest {
            options: None,
            frame: Some(vector_frame(0, SPACE, nudged(&descriptor(1)))),
        },
        pb::MatchRequest {
            options: None,
            frame: Some(vector_frame(1, SPACE, nudged(&descriptor(2)))),
        },
    ];
    let responses = support::match_video(&server, requests)
        .await
        .expect("video");
    let matched_frames = responses
        .iter()
        .filter_map(|r| match &r.result {
            Some(pb::match_response::Result::Frame(f)) => Some(f),
            _ => None,
        })
        .filter(|f| !f.matches.is_empty())
        .count();
    assert_eq!(matched_frames, 2, "{responses:?}");
    server.stop().await;
}

/// `result` failed with `code` and a message containing `text`.
fn expect<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, text: &str) {
    let status = result.expect_err(text);
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(text),
        "{text:?} not in {status:?}"
    );
}

#[tokio::test]
async fn bad_vectors_and_spaces_are_refused_with_the_numbers() {
    let (server, _) = server_with_reference().await;

    // References.
    let add = |frame: pb::Frame| support::add_reference(&server, "vectors", vec![frame]);
    expect(
        add(vector_frame(3, SPACE, vec![0.5; DIM - 1])).await,
        Code::InvalidArgument,
        "embedding space \"sscd\" expects 16 values, frame 3 has 15",
    );
    let mut nan = descriptor(1);
    nan[4] = f32::NAN;
    expect(
        add(vector_frame(2, SPACE, nan)).await,
        Code::InvalidArgument,
        "embedding space \"sscd\" in frame 2: value 4 is NaN",
    );
    let mut inf = descriptor(1);
    inf[0] = f32::INFINITY;
    expect(
        add(vector_frame(2, SPACE, inf)).await,
        Code::InvalidArgument,
        "value 0 is inf",
    );
    expect(
        add(vector_frame(1, "", descriptor(1))).await,
        Code::InvalidArgument,
        "frame.embeddings.space is empty in frame 1",
    );
    expect(
        add(vector_frame(5, "other", descriptor(1))).await,
        Code::InvalidArgument,
        "frame 5 has a vector of embedding space \"other\", which the bank does not declare",
    );
    expect(
        add(vector_frame(0, SPACE, vec![0.0; DIM])).await,
        Code::InvalidArgument,
        "a cosine vector cannot be zero",
    );

    // Uploads.
    expect(
        match_vector(&server, vec![0.5; 3]).await,
        Code::InvalidArgument,
        "embedding space \"sscd\" expects 16 values, frame 0 has 3",
    );
    expect(
        support::match_image(&server, vector_frame(0, "other", descriptor(1)), None).await,
        Code::InvalidArgument,
        "frame 0 has a vector of embedding space \"other\", which no bank in scope declares (in scope: [sscd])",
    );
    expect(
        support::match_image(&server, pb::Frame::default(), None).await,
        Code::InvalidArgument,
        "frame.embeddings",
    );

    // Banks.
    expect(
        create_bank_with(&server, "b", vec![space(SPACE, 32, 0.8)]).await,
        Code::FailedPrecondition,
        "embedding space \"sscd\" exists with dimension 16 (cosine); cannot declare it with dimension 32 (cosine)",
    );
    expect(
        create_bank_with(&server, "b", vec![space("x", 16, 1.5)]).await,
        Code::InvalidArgument,
        "embedding space \"x\" has threshold 1.5; a cosine threshold must be above 0 and at most 1",
    );
    expect(
        create_bank_with(&server, "b", vec![space("x", 5000, 0.8)]).await,
        Code::InvalidArgument,
        "embedding space \"x\" has dimension 5000, must be 1 to 4096",
    );
    expect(
        create_bank_with(&server, "b", vec![space("Bad Name", 16, 0.8)]).await,
        Code::InvalidArgument,
        "use a-z, 0-9",
    );
    // Unset parts take the server's defaults: dimension 512, cosine, threshold 0.39.
    let defaulted = create_bank_with(
        &server,
        "defaults",
        vec![pb::EmbeddingSpace {
            name: "fresh".into(),
            ..Default::default()
        }],
    )
    .await
    .expect("defaults");
    assert_eq!(defaulted.embedding_spaces, vec![space("fresh", 512, 0.39)]);
    server.stop().await;
}

#[tokio::test]
async fn vectors_survive_a_restart_and_withdrawal_takes_them_out() {
    let (server, reference) = server_with_reference().await;
    let near = nudged(&descriptor(1));
    let before = match_vector(&server, near.clone()).await.expect("match");
    assert_embedding_match(&before, reference, 0);

    let server = TestServer::start_in(server.stop().await, |_| {}).await;
    let after = match_vector(&server, near.clone()).await.expect("match");
    assert_embedding_match(&after, reference, 0);
    // Stored as f16: the score moves by less than 1e-3.
    assert!(
        (before[0].score - after[0].score).abs() < 1e-3,
        "{before:?} {after:?}"
    );

    server
        .banks()
        .await
        .withdraw_reference(pb::WithdrawReferenceRequest {
            reference_id: reference,
            reason: "false positive".into(),
        })
        .await
        .expect("withdraw");
    assert!(
        match_vector(&server, near.clone())
            .await
            .expect("match")
            .is_empty()
    );
    let server = TestServer::start_in(server.stop().await, |_| {}).await;
    assert!(match_vector(&server, near).await.expect("match").is_empty());
    server.stop().await;
}

/// Runs the binary against `url`; returns (exit code, stdout, stderr).
async fn run(url: &str, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(BIN)
        .env("FRAMEMATCH_API_KEY", ADMIN_KEY)
        .args(args)
        .args(["--server", url])
        .output()
        .await
        .expect("run framematch");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn export_and_import_carry_the_vectors() {
    let (source, _) = server_with_reference().await;
    // A reference with a PDQ frame and a vector of the same frame.
    let mut frame =
        support::pdq_frame(0, 0, &framematch::hash::PdqHash::from_bytes([0x5a; 32]), 90);
    frame.embeddings = vec![pb::Embedding {
        space: SPACE.into(),
        values: descriptor(3),
    }];
    support::add_reference(&source, "vectors", vec![frame])
        .await
        .expect("add");

    let mut stream = source
        .banks()
        .await
        .export_bank(pb::ExportBankRequest {
            bank: "vectors".into(),
            include_withdrawn: false,
        })
        .await
        .expect("export")
        .into_inner();
    let mut exported = Vec::new();
    while let Some(reference) = stream.message().await.expect("export stream") {
        exported.push(reference);
    }
    assert_eq!(exported.len(), 2);
    let vector_only = &exported[0].frames;
    assert_eq!(vector_only.len(), 2);
    assert!(
        vector_only
            .iter()
            .all(|f| f.pdq.is_empty() && f.embeddings.len() == 1)
    );
    assert!(cosine(&vector_only[1].embeddings[0].values, &descriptor(2)) > 0.9999);
    let mixed = &exported[1].frames;
    assert_eq!(mixed.len(), 1);
    assert_eq!(mixed[0].pdq.len(), 32);
    assert!(cosine(&mixed[0].embeddings[0].values, &descriptor(3)) > 0.9999);

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("vectors.jsonl").display().to_string();
    let (code, _, err) = run(
        &source.url(),
        &["export", "vectors", "--format", "vpdq-json", "-o", &file],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    // The PDQ-only formats say what they drop.
    let pdq_file = dir.path().join("vectors.vpdq").display().to_string();
    let (code, _, err) = run(
        &source.url(),
        &["export", "vectors", "--format", "vpdq", "-o", &pdq_file],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("vectors are not written"), "{err}");

    let target = TestServer::start().await;
    create_bank_with(
        &target,
        "vectors",
        vec![space(SPACE, DIM as u32, THRESHOLD)],
    )
    .await
    .expect("bank");
    let (code, out, err) = run(&target.url(), &["import", "vectors", &file]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("imported 2 references"), "{out}");
    let matches = match_vector(&target, nudged(&descriptor(2)))
        .await
        .expect("match");
    assert_eq!(matches.len(), 1, "{matches:?}");
    assert_eq!(matches[0].signal, pb::Signal::Embedding as i32);
    let matches = match_vector(&target, nudged(&descriptor(3)))
        .await
        .expect("match");
    assert_eq!(matches.len(), 1, "{matches:?}");
    source.stop().await;
    target.stop().await;
}

#[tokio::test]
async fn bank_create_takes_embedding_flags_and_bank_list_shows_them() {
    let server = TestServer::start().await;
    let (code, _, err) = run(
        &server.url(),
        &[
            "bank",
            "create",
            "cli-bank",
            "--category",
            "other",
            "--embedding",
            "sscd",
            "--embedding",
            "mine:0.5:64:dot",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(&server.url(), &["bank", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\tcli-bank\tother\tlocal\tprivate\t\tmine:0.5:64:dot,sscd:0.39:512:cosine\tmine:m=16,ef_construction=128,ef_search=64,graph_min=20000 sscd:m=16,ef_construction=128,ef_search=64,graph_min=20000\n"),
        "{out:?}"
    );
    let (code, _, err) = run(
        &server.url(),
        &[
            "bank",
            "create",
            "x",
            "--category",
            "other",
            "--embedding",
            "s:0.5:64:l2",
        ],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown embedding metric \"l2\""), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn a_follower_mirrors_the_spaces_and_the_vectors() {
    let partner = TestServer::start().await;
    let url = partner.url();
    let follower = TestServer::start_with(|config| {
        config.follow = Some(FollowConfig {
            url,
            key: ADMIN_KEY.to_string(),
            share_with: Vec::new(),
            tls_ca: None,
            tls_client_cert: None,
            tls_client_key: None,
        });
    })
    .await;
    let reference = add_vectors_reference(&partner).await;
    assert!(reference > 0);

    let started = Instant::now();
    let near = nudged(&descriptor(2));
    loop {
        match match_vector(&follower, near.clone()).await {
            Ok(matches) if !matches.is_empty() => {
                assert_eq!(matches[0].signal, pb::Signal::Embedding as i32);
                assert_eq!(matches[0].space, SPACE);
                assert_eq!(matches[0].reference_frame_index, 1);
                break;
            }
            // Before the bank is mirrored, no bank in scope declares the space.
            Ok(_) | Err(_) => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the follower did not match the partner's vector within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let banks = follower
        .banks()
        .await
        .list_banks(pb::ListBanksRequest {})
        .await
        .expect("list")
        .into_inner()
        .banks;
    let mirrored: Vec<_> = banks
        .iter()
        .filter(|b| !b.embedding_spaces.is_empty())
        .collect();
    assert_eq!(mirrored.len(), 1, "{banks:?}");
    assert_eq!(
        mirrored[0].embedding_spaces,
        vec![space(SPACE, 16, THRESHOLD)]
    );
    follower.stop().await;
    partner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_on_the_same_postgresql_matches_the_vectors_and_loads_them_at_start() {
    let Some(database) = support::Database::create().await else {
        return;
    };
    let replica =
        |url: String| TestServer::start_with(move |config| config.postgres_url = Some(url));
    let a = replica(database.url.clone()).await;
    let b = replica(database.url.clone()).await;
    // Written through A: B learns the bank (its space) and the reference from the change log.
    let reference = add_vectors_reference(&a).await;
    let near = nudged(&descriptor(1));
    let started = Instant::now();
    loop {
        if let Ok(matches) = match_vector(&b, near.clone()).await
            && !matches.is_empty()
        {
            assert_embedding_match(&matches, reference, 0);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "replica B did not match A's vector within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A third replica started now loads the vectors from PostgreSQL.
    let c = replica(database.url.clone()).await;
    assert_embedding_match(&match_vector(&c, near).await.expect("match"), reference, 0);
    a.stop().await;
    b.stop().await;
    c.stop().await;
    database.drop_now().await;
}

fn unit(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

async fn bank_spaces(server: &TestServer, bank: &str) -> Vec<(String, String)> {
    let banks = server
        .banks()
        .await
        .list_banks(pb::ListBanksRequest {})
        .await
        .expect("list banks")
        .into_inner()
        .banks;
    banks
        .into_iter()
        .find(|b| b.name == bank)
        .unwrap_or_else(|| panic!("no bank {bank}"))
        .embedding_spaces
        .into_iter()
        .map(|s| (s.name, s.index))
        .collect()
}

/// Issue #11 item 2: a space's index settings are stored when it is created (from
/// `--vector-index`, or from the request) and kept across a restart under another flag.
#[tokio::test]
async fn index_settings_are_stored_per_space_and_survive_a_restart() {
    const TUNED: &str = "m=24,ef_construction=200,ef_search=64,graph_min=20000";
    let server = TestServer::start_with(|config| {
        config.vector_index = "m=24,ef_construction=200".parse().expect("settings");
    })
    .await;
    let unset = |name: &str| pb::EmbeddingSpace {
        index: String::new(),
        ..space(name, DIM as u32, THRESHOLD)
    };
    let created = create_bank_with(
        &server,
        "tuned",
        vec![
            unset(SPACE),
            pb::EmbeddingSpace {
                index: "m=12, ef_search=300".into(),
                ..unset("asked")
            },
        ],
    )
    .await
    .expect("create bank");
    let asked = "m=12,ef_construction=128,ef_search=300,graph_min=20000";
    let expected = vec![
        ("asked".to_string(), asked.to_string()),
        (SPACE.to_string(), TUNED.to_string()),
    ];
    let reply: Vec<(String, String)> = created
        .embedding_spaces
        .iter()
        .map(|s| (s.name.clone(), s.index.clone()))
        .collect();
    assert_eq!(reply, expected);
    assert_eq!(bank_spaces(&server, "tuned").await, expected);

    let bad = create_bank_with(
        &server,
        "bad",
        vec![pb::EmbeddingSpace {
            index: "m=1".into(),
            ..unset("other")
        }],
    )
    .await
    .expect_err("bad settings");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    assert!(
        bad.message().contains("m must be 2 to 256, not 1"),
        "{bad:?}"
    );

    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |config| {
        config.vector_index = "m=8".parse().expect("settings");
    })
    .await;
    assert_eq!(
        bank_spaces(&server, "tuned").await,
        expected,
        "stored ones kept"
    );
    // A new space takes the new flag; a bank declaring a stored space gets its stored settings
    // whatever it asks.
    let later = create_bank_with(
        &server,
        "later",
        vec![
            unset("fresh"),
            pb::EmbeddingSpace {
                index: "m=64".into(),
                ..unset(SPACE)
            },
        ],
    )
    .await
    .expect("create bank");
    let reply: Vec<(String, String)> = later
        .embedding_spaces
        .into_iter()
        .map(|s| (s.name, s.index))
        .collect();
    assert_eq!(
        reply,
        vec![
            (
                "fresh".to_string(),
                "m=8,ef_construction=128,ef_search=64,graph_min=20000".to_string()
            ),
            (SPACE.to_string(), TUNED.to_string()),
        ]
    );
    // Matching works on the space indexed with its stored settings.
    support::add_reference(
        &server,
        "tuned",
        vec![vector_frame(0, SPACE, descriptor(5))],
    )
    .await
    .expect("add reference");
    let matches = match_vector(&server, nudged(&descriptor(5)))
        .await
        .expect("match");
    assert!(!matches.is_empty(), "no match after restart");
    server.stop().await;
}

/// GetReference returns the stored vectors only when asked, as frames with named vectors (the
/// stored f16 values of the L2-normalised vectors).
#[tokio::test]
async fn get_reference_returns_its_vectors_when_asked() {
    let (server, id) = server_with_reference().await;
    let get = |include_embeddings: bool| {
        let server = &server;
        async move {
            server
                .banks()
                .await
                .get_reference(pb::GetReferenceRequest {
                    reference_id: id,
                    include_embeddings,
                })
                .await
                .expect("get reference")
                .into_inner()
        }
    };
    let plain = get(false).await;
    assert!(plain.frames.is_empty(), "{plain:?}");
    let full = get(true).await;
    assert_eq!(
        pb::Reference {
            frames: Vec::new(),
            ..full.clone()
        },
        plain
    );
    assert_eq!(full.frames.len(), 2, "{full:?}");
    for (position, frame) in full.frames.iter().enumerate() {
        assert_eq!(frame.frame_index, position as u32);
        assert_eq!(frame.timestamp_ms, position as u64 * 1000);
        assert!(frame.signal.is_none());
        assert_eq!(frame.embeddings.len(), 1);
        assert_eq!(frame.embeddings[0].space, SPACE);
        let sent = unit(&descriptor(position as u32 + 1));
        let got = &frame.embeddings[0].values;
        assert_eq!(got.len(), sent.len());
        for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
            assert!(
                (g - s).abs() <= 5e-4,
                "frame {position} value {i}: {g} vs {s}"
            );
        }
    }
    let missing = server
        .banks()
        .await
        .get_reference(pb::GetReferenceRequest {
            reference_id: id + 1000,
            include_embeddings: true,
        })
        .await
        .expect_err("unknown reference");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    server.stop().await;
}
