//! The real `framematch` binary: durability across SIGKILL, and the command line.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use framematch::hash::PdqHash;
use framematch::pb;

use crate::support;

const BIN: &str = env!("CARGO_BIN_EXE_framematch");

/// A `framematch serve` child process (also the real-model server of `embed_model`).
pub(crate) struct Served {
    pub(crate) child: Child,
    url: String,
}

impl Served {
    /// Starts the binary on 127.0.0.1:0 over `data_dir`, reads the bound address from its first
    /// line of output, and waits for SERVING.
    async fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &[]).await
    }

    /// As [`Served::start`], with extra `serve` flags.
    pub(crate) async fn start_with(data_dir: &Path, extra: &[&str]) -> Self {
        let served = Self::spawn(data_dir, extra).await;
        support::wait_serving(&served.url).await;
        served
    }

    /// Starts the binary and reads its address, without waiting for SERVING.
    async fn spawn(data_dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .env("FRAMEMATCH_BOOTSTRAP_ADMIN_KEY", support::ADMIN_KEY)
            .env("FRAMEMATCH_API_KEY", support::ADMIN_KEY)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn framematch serve");
        let stdout = child.stdout.take().expect("stdout");
        let first_line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout)
                .read_line(&mut line)
                .expect("read first line");
            line
        })
        .await
        .expect("reader");
        let address = first_line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first line names the address: {first_line:?}"))
            .to_string();
        let url = format!("http://{address}");
        Self { child, url }
    }

    pub(crate) async fn banks(&self) -> pb::banks_client::BanksClient<support::Authed> {
        pb::banks_client::BanksClient::new(
            support::connect_as(&self.url, Some(support::ADMIN_KEY)).await,
        )
    }

    pub(crate) async fn matcher(&self) -> pb::matcher_client::MatcherClient<support::Authed> {
        pb::matcher_client::MatcherClient::new(
            support::connect_as(&self.url, Some(support::ADMIN_KEY)).await,
        )
    }

    /// SIGKILL: no shutdown code runs.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// SIGTERM, then wait for a clean exit.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        self.child.wait().expect("wait")
    }
}

/// A connected channel to `served` and a watch on the Matcher's gRPC health.
async fn watch_matcher_health(
    served: &Served,
) -> (
    tonic::transport::Channel,
    tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) {
    let channel = tonic::transport::Channel::from_shared(served.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let statuses = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "framematch.v1.Matcher".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    (channel, statuses)
}

fn hash(seed: usize) -> PdqHash {
    PdqHash::from_bit_fn(|k| (k * 7 + seed * 13) % 5 < 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_reference_survives_kill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let served = Served::start(dir.path()).await;
    let mut banks = served.banks().await;
    banks
        .create_bank(pb::CreateBankRequest {
            embedding_spaces: Vec::new(),
            name: "durable".into(),
            category: pb::Category::SuicideSelfHarm as i32,
            description: String::new(),
            ..Default::default()
        })
        .await
        .expect("create bank");
    let frames: Vec<pb::Frame> = (0..5)
        .map(|i| support::pdq_frame(i, u64::from(i) * 1000, &hash(i as usize), 100))
        .collect();
    let mut messages = vec![pb::AddReferenceRequest {
        item: Some(pb::add_reference_request::Item::Header(
            pb::ReferenceHeader {
                bank: "durable".into(),
                external_id: "case-1".into(),
                note: String::new(),
            },
        )),
    }];
    messages.extend(frames.into_iter().map(|f| pb::AddReferenceRequest {
        item: Some(pb::add_reference_request::Item::Frame(f)),
    }));
    let added = banks
        .add_reference(tokio_stream::iter(messages))
        .await
        .expect("add")
        .into_inner();
    let id = added.reference.expect("reference").id;
    // Acknowledged: now kill without any chance to flush.
    served.kill();

    let served = Served::start(dir.path()).await;
    let reference = served
        .banks()
        .await
        .get_reference(pb::GetReferenceRequest {
            reference_id: id,
            include_embeddings: false,
        })
        .await
        .expect("reference survives")
        .into_inner();
    assert_eq!(reference.external_id, "case-1");
    assert_eq!(reference.frame_count, 5);
    let result = served
        .matcher()
        .await
        .match_image(pb::MatchImageRequest {
            options: None,
            frame: Some(support::pdq_frame(0, 0, &hash(3), 100)),
        })
        .await
        .expect("match")
        .into_inner()
        .result
        .expect("result");
    let m = result.matches.first().expect("the reloaded index matches");
    assert_eq!(m.source.as_ref().map(|s| s.reference_id), Some(id));
    assert_eq!(m.reference_frame_index, 3);
    assert_eq!(m.reference_timestamp_ms, 3000);
    assert_eq!(m.distance, 0);
    let status = served.terminate();
    assert!(status.success(), "SIGTERM gives a clean exit: {status:?}");
}

/// Runs the binary with `args` and the test keys (and no server-side embedding settings from the
/// caller's environment); returns its exit code, stdout and stderr.
pub(crate) fn run(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(BIN)
        .env_remove("FRAMEMATCH_EMBEDDING_MODEL")
        .env_remove("FRAMEMATCH_EMBEDDING_WINDOWS")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_adds_matches_and_withdraws() {
    let Some(conformance) = support::conformance_dir() else {
        return;
    };
    let pdq = conformance.join("pdq");
    let file = |name: &str| pdq.join(name).display().to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let served = Served::start(dir.path()).await;
    let url = served.url.clone();
    let server = ["--server", url.as_str()];

    let (code, out, err) = run(&[
        &["bank", "create", "cli", "--category", "terrorism"][..],
        &server[..],
    ]
    .concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\tcli\n"), "{out:?}");
    let (code, _, err) = run(&[
        &["bank", "create", "bad", "--category", "gore"][..],
        &server[..],
    ]
    .concat());
    assert_eq!(code, 2, "an unknown category is a usage error: {err}");

    let original = file("bridge-1-original.jpg");
    let (code, out, err) =
        run(&[&["ref", "add", "cli", original.as_str()][..], &server[..]].concat());
    assert_eq!(code, 0, "{err}");
    let (id, path) = out.trim_end().split_once('\t').expect("id<TAB>path");
    assert_eq!(path, original);

    let blurred = file("blur-a-lot.jpg");
    let unrelated = file("pen-and-coaster.png");
    let (code, out, err) = run(&[
        &["match", blurred.as_str(), unrelated.as_str()][..],
        &server[..],
    ]
    .concat());
    assert_eq!(code, 1, "a match exits 1: {err}");
    let fields: Vec<&str> = out.trim_end().split('\t').collect();
    assert_eq!(fields[..3], [blurred.as_str(), id, "cli"], "{out:?}");
    let distance: u32 = fields[3].parse().expect("distance");
    assert!(distance <= 31);

    let (code, out, _) = run(&[&["match", unrelated.as_str()][..], &server[..]].concat());
    assert_eq!(
        (code, out.as_str()),
        (0, ""),
        "no match exits 0 and prints nothing"
    );

    let (code, out, err) = run(&[
        &["ref", "withdraw", id, "--reason", "test"][..],
        &server[..],
    ]
    .concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("withdrawn"));
    let (code, _, _) = run(&[&["match", blurred.as_str()][..], &server[..]].concat());
    assert_eq!(code, 0, "a withdrawn reference no longer matches");

    let (code, out, _) = run(&[&["stats"][..], &server[..]].concat());
    assert_eq!(code, 0);
    assert!(out.contains("withdrawn_references\t1"), "{out}");

    let (code, _, err) = run(&["match", blurred.as_str(), "--server", "http://127.0.0.1:1"]);
    assert_eq!(code, 2, "an unreachable server exits 2");
    assert!(err.contains("cannot connect"), "{err}");
    let (code, _, err) = run(&[&["match", "/no/such/file.jpg"][..], &server[..]].concat());
    assert_eq!(code, 2);
    assert!(err.contains("/no/such/file.jpg"), "{err}");
    served.terminate();
}

#[test]
fn hash_command_prints_reference_hashes() {
    let Some(conformance) = support::conformance_dir() else {
        return;
    };
    let expected =
        std::fs::read_to_string(conformance.join("pdq/expected.tsv")).expect("expected.tsv");
    for name in ["pen-and-coaster.png", "bridge-1-original.jpg"] {
        let line = expected
            .lines()
            .find(|l| l.starts_with(&format!("{name}\t")))
            .expect("listed");
        let fields: Vec<&str> = line.split('\t').collect();
        let path = conformance.join("pdq").join(name).display().to_string();
        let (code, out, err) = run(&["hash", path.as_str()]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, format!("{},{},{path}\n", fields[1], fields[2]));
    }
    let path = conformance
        .join("pdq/bridge-1-original.jpg")
        .display()
        .to_string();
    let (code, out, _) = run(&["hash", "--dihedral", path.as_str()]);
    assert_eq!(code, 0);
    assert_eq!(out.trim_end().split(',').count(), 3 + 7);
    let (code, _, err) = run(&["hash", "/no/such/file.png"]);
    assert_eq!(code, 2);
    assert!(err.contains("/no/such/file.png"));
}

#[test]
fn invalid_configuration_exits_64() {
    let (code, _, err) = run(&["serve", "--index-engine", "magic"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--index-engine"), "{err}");
    let (code, _, _) = run(&["serve", "--max-distance", "200"]);
    assert_eq!(code, 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_streams_finish_within_the_grace_then_ends_them_unavailable() {
    use tonic_health::pb::health_check_response::ServingStatus;

    let dir = tempfile::tempdir().expect("temp dir");
    let served = Served::start_with(dir.path(), &["--shutdown-grace-ms", "1500"]).await;
    let (channel, mut statuses) = watch_matcher_health(&served).await;
    let frame = |i: u32| pb::MatchRequest {
        options: None,
        frame: Some(support::pdq_frame(
            i,
            u64::from(i) * 1000,
            &hash(i as usize),
            100,
        )),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::MatchRequest>(4);
    let mut matcher = pb::matcher_client::MatcherClient::new(
        tonic::service::interceptor::InterceptedService::new(
            channel.clone(),
            support::Bearer::new(support::ADMIN_KEY),
        ),
    );
    tx.send(frame(0)).await.expect("send");
    let mut answers = matcher
        .match_video(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream opens")
        .into_inner();
    answers
        .message()
        .await
        .expect("answer")
        .expect("frame 0 answered");

    let pid = served.child.id().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    assert!(sent.success());
    // Health flips to NOT_SERVING as soon as shutdown starts.
    loop {
        let update = statuses
            .message()
            .await
            .expect("health stream")
            .expect("an update");
        if update.status == ServingStatus::NotServing as i32 {
            break;
        }
    }
    // The open stream still works within the grace period.
    tx.send(frame(1)).await.expect("send");
    answers
        .message()
        .await
        .expect("still answered during the grace period")
        .expect("frame 1 answered");
    // Then it is ended with UNAVAILABLE (the client keeps its side open).
    let ended = loop {
        match answers.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(
        ended.message().contains("grace period"),
        "{}",
        ended.message()
    );
    drop(tx);
    let mut child = served.child;
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "exit 0 after SIGTERM: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_server_processes_on_one_postgres_database_converge() {
    let Some(database) = support::Database::create().await else {
        return;
    };
    let url = database.url.clone();
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = Served::start_with(dir_a.path(), &["--store", &url]).await;
    let b = Served::start_with(
        dir_b.path(),
        &["--store", &url, "--tail-interval-ms", "200"],
    )
    .await;
    a.banks()
        .await
        .create_bank(pb::CreateBankRequest {
            embedding_spaces: Vec::new(),
            name: "shared".into(),
            category: pb::Category::Terrorism as i32,
            description: String::new(),
            ..Default::default()
        })
        .await
        .expect("create bank on A");
    let messages = vec![
        pb::AddReferenceRequest {
            item: Some(pb::add_reference_request::Item::Header(
                pb::ReferenceHeader {
                    bank: "shared".into(),
                    external_id: String::new(),
                    note: String::new(),
                },
            )),
        },
        pb::AddReferenceRequest {
            item: Some(pb::add_reference_request::Item::Frame(support::pdq_frame(
                0,
                0,
                &hash(7),
                100,
            ))),
        },
    ];
    let id = a
        .banks()
        .await
        .add_reference(tokio_stream::iter(messages))
        .await
        .expect("add on A")
        .into_inner()
        .reference
        .expect("reference")
        .id;
    let started = std::time::Instant::now();
    let mut matcher = b.matcher().await;
    loop {
        let result = matcher
            .match_image(pb::MatchImageRequest {
                options: None,
                frame: Some(support::pdq_frame(0, 0, &hash(7), 100)),
            })
            .await
            .expect("match on B")
            .into_inner()
            .result
            .expect("result");
        if result
            .matches
            .iter()
            .any(|m| m.source.as_ref().map(|s| s.reference_id) == Some(id))
        {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "B never matched A's reference"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    eprintln!(
        "process B matched process A's reference after {:?}",
        started.elapsed()
    );
    assert!(a.terminate().success());
    assert!(b.terminate().success());
    database.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_until_the_index_is_loaded() {
    use tonic_health::pb::health_check_response::ServingStatus;

    let Some(database) = support::Database::create().await else {
        return;
    };
    let url = database.url.clone();
    // A first run creates the schema.
    let dir = tempfile::tempdir().expect("dir");
    let first =
        Served::start_with(dir.path(), &["--store", &url, "--shutdown-grace-ms", "200"]).await;
    assert!(first.terminate().success());

    // Hold the frames table so the next server's initial load waits for us: deterministic.
    let (mut holder, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let lock = holder.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE frames IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock frames");

    let loading = Served::spawn(dir.path(), &["--store", &url]).await;
    let (channel, mut statuses) = watch_matcher_health(&loading).await;
    let first_status = statuses.message().await.expect("stream").expect("status");
    assert_eq!(first_status.status, ServingStatus::NotServing as i32);
    let early = pb::matcher_client::MatcherClient::new(
        tonic::service::interceptor::InterceptedService::new(
            channel.clone(),
            support::Bearer::new(support::ADMIN_KEY),
        ),
    )
    .match_image(pb::MatchImageRequest {
        options: None,
        frame: Some(support::pdq_frame(0, 0, &hash(1), 100)),
    })
    .await
    .expect_err("no matching while loading");
    assert_eq!(early.code(), tonic::Code::Unavailable);
    assert!(early.message().contains("loading"), "{}", early.message());

    lock.rollback().await.expect("release");
    loop {
        let update = statuses.message().await.expect("stream").expect("status");
        if update.status == ServingStatus::Serving as i32 {
            break;
        }
    }
    assert!(loading.terminate().success());
    database.drop_now().await;
}

/// Runs the CLI with `key` as FRAMEMATCH_API_KEY (or none).
fn run_as(key: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    command.env_remove("FRAMEMATCH_API_KEY").args(args);
    if let Some(key) = key {
        command.env("FRAMEMATCH_API_KEY", key);
    }
    let output = command.output().expect("run framematch");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_key_is_printed_once_and_the_cli_manages_orgs_keys_sharing_and_audit() {
    let dir = tempfile::tempdir().expect("temp dir");
    // No FRAMEMATCH_BOOTSTRAP_ADMIN_KEY: the server makes one and prints it once.
    let mut child = std::process::Command::new(BIN)
        .env_remove("FRAMEMATCH_BOOTSTRAP_ADMIN_KEY")
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let lines = tokio::task::spawn_blocking(move || {
        let mut reader = BufReader::new(stdout);
        let mut lines = Vec::new();
        for _ in 0..3 {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read");
            lines.push(line.trim_end().to_string());
        }
        lines
    })
    .await
    .expect("reader");
    let url = format!(
        "http://{}",
        lines[0]
            .strip_prefix("listening on ")
            .expect("address line")
    );
    let admin = lines[2]
        .strip_prefix("bootstrap admin key: ")
        .unwrap_or_else(|| panic!("third line gives the key: {lines:?}"))
        .to_string();
    assert!(admin.starts_with("fmk_") && admin.len() == 68, "{admin}");
    support::wait_serving(&url).await;
    let server = ["--server", url.as_str()];
    let cli = |key: Option<&str>, args: &[&str]| run_as(key, &[args, &server[..]].concat());

    let (code, _, err) = cli(None, &["bank", "list"]);
    assert_eq!(code, 2);
    assert!(err.contains("Unauthenticated"), "{err}");
    assert_eq!(cli(Some(&admin), &["org", "create", "youtube"]).0, 0);
    let (code, out, err) = cli(
        Some(&admin),
        &[
            "key",
            "create",
            "--org",
            "local",
            "--role",
            "contributor",
            "--label",
            "analysts",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (contributor_id, contributor) = out.trim_end().split_once('\t').expect("id<TAB>secret");
    let (code, out, err) = cli(
        Some(&admin),
        &["key", "create", "--org", "youtube", "--role", "matcher"],
    );
    assert_eq!(code, 0, "{err}");
    let youtube = out
        .trim_end()
        .split_once('\t')
        .expect("id<TAB>secret")
        .1
        .to_string();

    let (code, _, err) = cli(
        Some(contributor),
        &[
            "bank",
            "create",
            "attacks",
            "--category",
            "graphic_violence",
            "--visibility",
            "shared",
            "--share-with",
            "youtube",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = cli(Some(contributor), &["bank", "list"]);
    assert!(
        out.contains("\tattacks\tgraphic_violence\tlocal\tshared\tyoutube\t\t\n"),
        "{out:?}"
    );
    // The partner sees the bank, not whom else it is shared with, and may not change it.
    let (_, out, _) = cli(Some(&youtube), &["bank", "list"]);
    assert!(
        out.contains("\tattacks\tgraphic_violence\tlocal\tshared\t\t\t\n"),
        "{out:?}"
    );
    let (code, _, err) = cli(
        Some(&youtube),
        &["bank", "share", "attacks", "--visibility", "public"],
    );
    assert_eq!(code, 2);
    assert!(err.contains("PermissionDenied"), "{err}");
    let (code, _, err) = cli(
        Some(contributor),
        &["bank", "share", "attacks", "--visibility", "private"],
    );
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = cli(Some(&youtube), &["bank", "list"]);
    assert!(!out.contains("attacks"), "unshared: {out:?}");

    let (code, out, err) = cli(Some(&admin), &["audit", "--bank", "attacks"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(rows[0][4], "bank_created");
    assert_eq!(rows[0][2], "local");
    assert_eq!(rows[0][3], contributor_id, "the key that acted");
    assert_eq!(rows[1][4], "bank_updated");
    assert_eq!(rows[1][9], "private");
    let (code, _, err) = cli(Some(contributor), &["audit"]);
    assert_eq!(code, 2, "audit needs an admin key");
    assert!(err.contains("PermissionDenied"), "{err}");

    assert_eq!(cli(Some(&admin), &["key", "revoke", contributor_id]).0, 0);
    let (code, _, err) = cli(Some(contributor), &["bank", "list"]);
    assert_eq!(code, 2);
    assert!(err.contains("Unauthenticated"), "{err}");
    let (_, out, _) = cli(Some(&admin), &["key", "list", "--org", "local"]);
    assert!(
        out.lines().any(|l| l
            .starts_with(&format!("{contributor_id}\tlocal\tcontributor\tanalysts\t"))
            && l.ends_with("\trevoked")),
        "{out}"
    );

    // After a restart no new bootstrap key is made (the store has keys), and the old one works.
    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    assert!(child.wait().expect("wait").success());
    let served = Served::start(dir.path()).await;
    let (code, out, err) = run_as(Some(&admin), &["--server", &served.url, "key", "list"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().count(),
        3,
        "bootstrap, contributor and matcher keys: {out}"
    );
    served.terminate();
}

/// Runs the binary with its stdout a pipe whose reading end is already closed, as
/// `framematch ... | head -1` leaves it once `head` has exited.
fn run_with_closed_stdout(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .env("FRAMEMATCH_API_KEY", support::ADMIN_KEY)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run framematch");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("wait");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_data_private_files_and_quiet_broken_pipes() {
    use std::os::unix::fs::PermissionsExt;
    let Some(conformance) = support::conformance_dir() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let served = Served::start(&data).await;
    let server = ["--server", served.url.as_str()];
    let mode = |path: &Path| std::fs::metadata(path).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    for name in [
        "framematch.sqlite3",
        "framematch.sqlite3-wal",
        "framematch.sqlite3-shm",
    ] {
        assert_eq!(mode(&data.join(name)), 0o600, "{name}");
    }

    // `ref add` of a JPEG cut to its first third: a clear error, nothing stored.
    let (code, _, err) = run(&[
        &["bank", "create", "b", "--category", "other"][..],
        &server[..],
    ]
    .concat());
    assert_eq!(code, 0, "{err}");
    let original = std::fs::read(conformance.join("pdq/bridge-1-original.jpg")).expect("read");
    let cut = dir.path().join("cut.jpg");
    std::fs::write(&cut, &original[..original.len() / 3]).expect("write");
    let cut = cut.display().to_string();
    let (code, out, err) = run(&[&["ref", "add", "b", cut.as_str()][..], &server[..]].concat());
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(
        err.contains("InvalidArgument") && err.contains("truncated") && err.contains(&cut),
        "{err}"
    );
    let (code, _, err) = run(&["hash", cut.as_str()]);
    assert_eq!(code, 2);
    assert!(err.contains("truncated"), "{err}");

    // A reader that has gone: quiet exit 0, no panic.
    let (code, err) = run_with_closed_stdout(&[&["stats"][..], &server[..]].concat());
    assert_eq!((code, err.as_str()), (Some(0), ""), "stats");
    let (code, err) = run_with_closed_stdout(&[&["bank", "list"][..], &server[..]].concat());
    assert_eq!((code, err.as_str()), (Some(0), ""), "bank list");
    let whole = conformance.join("pdq/bridge-1-original.jpg");
    let (code, err) = run_with_closed_stdout(&["hash", whole.to_str().expect("utf-8")]);
    assert_eq!((code, err.as_str()), (Some(0), ""), "hash");
    served.terminate();
}
