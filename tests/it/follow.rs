//! Partner following (`serve --follow`) between two real `framematch` processes over real gRPC:
//! partner A shares banks with organisation `platform-b`; server B follows A with a key of
//! `platform-b` and must match what A adds (the product asks for 2 s; the tests allow a
//! generous 10 s and print what they measured), never what A keeps private, stop matching what A
//! withdraws, and survive `kill -9` of itself and a restart of A without losing or duplicating
//! anything.
//!
//! `cargo test --test it follow -- --nocapture` prints the add-on-A to match-on-B times.

#![allow(clippy::print_stdout)] // the measured figures and the matrix are printed for the note

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use framematch::hash::PdqHash;
use framematch::pb;

use crate::support::{self, ADMIN_KEY};

const BIN: &str = env!("CARGO_BIN_EXE_framematch");
/// The functional deadline for a change on A to be matchable on B (the requirement is 2 s).
const DEADLINE: Duration = Duration::from_secs(10);
/// How often B is asked while waiting.
const POLL: Duration = Duration::from_millis(20);

/// A `framematch serve` process whose log goes to a file.
struct Node {
    child: Child,
    url: String,
    metrics: String,
    log: PathBuf,
}

impl Node {
    /// Starts the binary listening on `listen`, over `data_dir`, and waits for SERVING.
    async fn start(data_dir: &Path, listen: &str, extra: &[&str], log: PathBuf) -> Self {
        let stderr = File::create(&log).expect("log file");
        let mut child = Command::new(BIN)
            .env("FRAMEMATCH_BOOTSTRAP_ADMIN_KEY", ADMIN_KEY)
            .env("RUST_LOG", "info,framematch::follow=debug")
            .args([
                "serve",
                "--listen",
                listen,
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn framematch serve");
        let stdout = child.stdout.take().expect("stdout");
        let (first, second) = tokio::task::spawn_blocking(move || {
            let mut reader = BufReader::new(stdout);
            let mut first = String::new();
            let mut second = String::new();
            reader.read_line(&mut first).expect("first line");
            reader.read_line(&mut second).expect("second line");
            (first, second)
        })
        .await
        .expect("reader");
        let address = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "first line names the address: {first:?}; log:\n{}",
                    read_log(&log)
                )
            })
            .to_string();
        let metrics = second
            .trim()
            .strip_prefix("metrics on ")
            .unwrap_or_else(|| panic!("second line names the metrics address: {second:?}"))
            .to_string();
        let node = Self {
            child,
            url: format!("http://{address}"),
            metrics,
            log,
        };
        support::wait_serving(&node.url).await;
        node
    }

    async fn admin(&self) -> pb::admin_client::AdminClient<support::Authed> {
        pb::admin_client::AdminClient::new(support::connect_as(&self.url, Some(ADMIN_KEY)).await)
    }

    async fn banks(&self) -> pb::banks_client::BanksClient<support::Authed> {
        pb::banks_client::BanksClient::new(support::connect_as(&self.url, Some(ADMIN_KEY)).await)
            .max_decoding_message_size(64 * 1024 * 1024)
    }

    async fn matcher(&self) -> pb::matcher_client::MatcherClient<support::Authed> {
        pb::matcher_client::MatcherClient::new(
            support::connect_as(&self.url, Some(ADMIN_KEY)).await,
        )
    }

    async fn stats(&self) -> pb::StatsResponse {
        self.banks()
            .await
            .stats(pb::StatsRequest {})
            .await
            .expect("stats")
            .into_inner()
    }

    async fn bank_names(&self) -> Vec<(String, String)> {
        let mut names: Vec<(String, String)> = self
            .banks()
            .await
            .list_banks(pb::ListBanksRequest {})
            .await
            .expect("list banks")
            .into_inner()
            .banks
            .into_iter()
            .map(|b| (b.name, b.owner))
            .collect();
        names.sort();
        names
    }

    async fn scrape(&self) -> String {
        let addr = self.metrics.parse().expect("metrics address");
        let (status, _, body) = support::http_get(addr, "/metrics").await;
        assert_eq!(status, 200, "GET /metrics answered {status}");
        body
    }

    fn log_text(&self) -> String {
        read_log(&self.log)
    }

    /// SIGKILL: no shutdown code runs.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        assert!(sent.success());
        self.child.wait().expect("wait")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A failing test must not leave servers behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A loopback port nothing listens on now (bound, read, released), so that A can be restarted
/// on the same address B follows.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn hash(seed: u64) -> PdqHash {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    PdqHash::from_bit_fn(|_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state & 1 == 1
    })
}

async fn create_bank(
    node: &Node,
    name: &str,
    owner: &str,
    visibility: pb::Visibility,
    shared_with: &[&str],
) {
    node.banks()
        .await
        .create_bank(pb::CreateBankRequest {
            embedding_spaces: Vec::new(),
            name: name.into(),
            category: pb::Category::Terrorism as i32,
            description: format!("{name} on A"),
            visibility: visibility as i32,
            shared_with: shared_with.iter().map(|s| (*s).to_string()).collect(),
            owner: owner.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("create bank {name}: {e}"));
}

/// Adds a one-frame reference of `hash` to `bank` on `node`; returns its id.
async fn add_reference(node: &Node, bank: &str, external_id: &str, hash: &PdqHash) -> i64 {
    let messages = vec![
        pb::AddReferenceRequest {
            item: Some(pb::add_reference_request::Item::Header(
                pb::ReferenceHeader {
                    bank: bank.into(),
                    external_id: external_id.into(),
                    note: "added on A".into(),
                },
            )),
        },
        pb::AddReferenceRequest {
            item: Some(pb::add_reference_request::Item::Frame(support::pdq_frame(
                0, 0, hash, 100,
            ))),
        },
    ];
    node.banks()
        .await
        .add_reference(tokio_stream::iter(messages))
        .await
        .unwrap_or_else(|e| panic!("add reference to {bank}: {e}"))
        .into_inner()
        .reference
        .expect("reference")
        .id
}

/// The banks, by name, whose references `hash` matches on the server behind `matcher`.
async fn matched_banks(
    matcher: &mut pb::matcher_client::MatcherClient<support::Authed>,
    hash: &PdqHash,
) -> Vec<String> {
    let result = matcher
        .match_image(pb::MatchImageRequest {
            options: None,
            frame: Some(support::pdq_frame(0, 0, hash, 100)),
        })
        .await
        .expect("match on B")
        .into_inner()
        .result
        .expect("result");
    result
        .matches
        .into_iter()
        .map(|m| m.source.expect("source").bank)
        .collect()
}

/// Polls B every [`POLL`] until `hash` matches (`want`) or stops matching (`!want`); returns the
/// bank it matched in and the time it took, or fails after [`DEADLINE`] with B's log.
async fn wait_for(b: &Node, hash: &PdqHash, want: bool, what: &str) -> (Option<String>, Duration) {
    let started = Instant::now();
    let mut matcher = b.matcher().await;
    loop {
        let banks = matched_banks(&mut matcher, hash).await;
        if banks.is_empty() != want {
            return (banks.into_iter().next(), started.elapsed());
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{what}: not seen on B within {DEADLINE:?}; B's log:\n{}",
            b.log_text()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A's organisations, B's key and A's banks: `shared` (platform-a's, shared with platform-b),
/// `private` (platform-a's) and `public` (A's default organisation's, public).
async fn partner_a(a: &Node) -> String {
    let mut admin = a.admin().await;
    for org in ["platform-a", "platform-b"] {
        admin
            .create_organisation(pb::CreateOrganisationRequest { name: org.into() })
            .await
            .expect("create organisation");
    }
    let key = admin
        .create_api_key(pb::CreateApiKeyRequest {
            organisation: "platform-b".into(),
            role: pb::Role::Matcher as i32,
            label: "B follows A".into(),
        })
        .await
        .expect("key for platform-b")
        .into_inner()
        .secret;
    create_bank(
        a,
        "shared",
        "platform-a",
        pb::Visibility::Shared,
        &["platform-b"],
    )
    .await;
    create_bank(a, "private", "platform-a", pb::Visibility::Private, &[]).await;
    create_bank(a, "public", "", pb::Visibility::Public, &[]).await;
    key
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_mirrors_what_its_partner_shares_and_survives_restarts() {
    let a_dir = tempfile::tempdir().expect("temp dir");
    let b_dir = tempfile::tempdir().expect("temp dir");
    let logs = tempfile::tempdir().expect("temp dir");
    let a_listen = format!("127.0.0.1:{}", free_port());
    let a = Node::start(a_dir.path(), &a_listen, &[], logs.path().join("a1.log")).await;
    let key = partner_a(&a).await;
    // Already there when B starts following: arrives with B's first catch-up.
    add_reference(&a, "shared", "before", &hash(1)).await;

    let follow = ["--follow", a.url.as_str(), "--follow-key", key.as_str()];
    let b = Node::start(
        b_dir.path(),
        "127.0.0.1:0",
        &follow,
        logs.path().join("b1.log"),
    )
    .await;
    let (bank, caught_up) = wait_for(&b, &hash(1), true, "reference added before B started").await;
    assert_eq!(bank.as_deref(), Some("platform-a.shared"));
    println!("B caught up with A's existing reference {caught_up:?} after becoming SERVING");

    // Add on A, match on B: the latency the product promises (2 s).
    let mut times = Vec::new();
    for i in 0..7 {
        let h = hash(100 + i);
        let started = Instant::now();
        add_reference(&a, "shared", &format!("live-{i}"), &h).await;
        let acked = started.elapsed();
        let (bank, _) = wait_for(&b, &h, true, "reference added on A").await;
        let total = started.elapsed();
        assert_eq!(bank.as_deref(), Some("platform-a.shared"));
        println!("add on A acknowledged in {acked:?}; first match on B {total:?} after the add");
        times.push(total);
    }
    println!(
        "add-on-A to match-on-B: median {:?} of {} adds (min {:?}, max {:?})",
        median(times.clone()),
        times.len(),
        times.iter().min().expect("times"),
        times.iter().max().expect("times")
    );

    // A public bank is mirrored too. Its owner is A's default organisation, "local", like B's own:
    // on B it is named after A's address instead.
    let a_authority = a_listen.clone();
    let public_bank = format!("local_{}.public", a_authority.replace(':', "_"));
    let (bank, _) = {
        add_reference(&a, "public", "pub", &hash(200)).await;
        wait_for(&b, &hash(200), true, "reference in A's public bank").await
    };
    assert_eq!(bank.as_deref(), Some(public_bank.as_str()));

    // A private reference never arrives: a shared one added after it does, so the private one
    // would have come first.
    add_reference(&a, "private", "secret", &hash(300)).await;
    add_reference(&a, "shared", "after-secret", &hash(301)).await;
    wait_for(&b, &hash(301), true, "reference added after a private one").await;
    let mut matcher = b.matcher().await;
    assert!(
        matched_banks(&mut matcher, &hash(300)).await.is_empty(),
        "a reference in A's private bank must not reach B"
    );
    let banks = b.bank_names().await;
    assert_eq!(
        banks,
        vec![
            (public_bank.clone(), format!("local@{a_authority}")),
            ("platform-a.shared".to_string(), "platform-a".to_string()),
        ],
        "B mirrors exactly the banks A shares with platform-b"
    );

    // Withdraw on A: B stops matching.
    let withdrawn = add_reference(&a, "shared", "to-withdraw", &hash(400)).await;
    wait_for(&b, &hash(400), true, "reference to withdraw").await;
    let started = Instant::now();
    a.banks()
        .await
        .withdraw_reference(pb::WithdrawReferenceRequest {
            reference_id: withdrawn,
            reason: "false positive".into(),
        })
        .await
        .expect("withdraw on A");
    wait_for(&b, &hash(400), false, "withdrawal on A").await;
    println!("withdraw on A to no match on B: {:?}", started.elapsed());

    // kill -9 B; A goes on; B restarts over the same data: nothing lost, nothing twice.
    let before = b.stats().await;
    let banks_before = b.bank_names().await;
    assert_eq!(before.active_references, 10, "{before:?}");
    assert_eq!(before.withdrawn_references, 1, "{before:?}");
    b.kill();
    add_reference(&a, "shared", "while-b-was-down", &hash(500)).await;
    let b = Node::start(
        b_dir.path(),
        "127.0.0.1:0",
        &follow,
        logs.path().join("b2.log"),
    )
    .await;
    let (_, after_restart) =
        wait_for(&b, &hash(500), true, "reference added while B was down").await;
    println!("after B's restart, the reference added meanwhile matched within {after_restart:?}");
    let after = b.stats().await;
    assert_eq!(after.banks, before.banks, "no bank mirrored twice");
    assert_eq!(
        after.active_references,
        before.active_references + 1,
        "exactly the one new reference, none twice: {after:?}"
    );
    assert_eq!(after.withdrawn_references, before.withdrawn_references);
    assert_eq!(after.stored_frames, before.stored_frames + 1);
    assert_eq!(b.bank_names().await, banks_before);
    let mut matcher = b.matcher().await;
    assert!(matched_banks(&mut matcher, &hash(400)).await.is_empty());
    assert!(!matched_banks(&mut matcher, &hash(103)).await.is_empty());

    // A restarts on the same address: B reconnects by itself and gets what A adds next.
    a.kill();
    let a = Node::start(a_dir.path(), &a_listen, &[], logs.path().join("a2.log")).await;
    let started = Instant::now();
    add_reference(&a, "shared", "after-a-restart", &hash(600)).await;
    wait_for(&b, &hash(600), true, "reference added after A restarted").await;
    println!(
        "after A's restart, add on A to match on B: {:?}",
        started.elapsed()
    );
    let stats = b.stats().await;
    assert_eq!(stats.active_references, after.active_references + 1);

    // The follower's state is in B's metrics: connected, and at A's last change (the gauge is
    // set just after the index, so it may trail the match by a moment).
    let a_seq = a.stats().await.last_change_seq;
    let started = Instant::now();
    loop {
        let metrics = b.scrape().await;
        let value = |name: &str| {
            metrics
                .lines()
                .find(|l| l.starts_with(name) && l.contains(&a.url))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<i64>().ok())
        };
        if value("framematch_follow_seq") == Some(a_seq) {
            assert_eq!(value("framematch_follow_connected"), Some(1), "{metrics}");
            assert!(
                metrics.contains("framematch_follow_events_total{kind=\"reference_added\""),
                "{metrics}"
            );
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "framematch_follow_seq never reached A's {a_seq}:\n{metrics}"
        );
        tokio::time::sleep(POLL).await;
    }

    // Both stop cleanly.
    let b_log = b.log.clone();
    assert!(b.terminate().success(), "B exits 0 on SIGTERM");
    assert!(a.terminate().success(), "A exits 0 on SIGTERM");
    let log = read_log(&b_log);
    assert!(log.contains("stopped following partner"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_key_is_reported_and_the_follower_keeps_serving() {
    let a_dir = tempfile::tempdir().expect("temp dir");
    let b_dir = tempfile::tempdir().expect("temp dir");
    let logs = tempfile::tempdir().expect("temp dir");
    let a = Node::start(a_dir.path(), "127.0.0.1:0", &[], logs.path().join("a.log")).await;
    let follow = [
        "--follow",
        a.url.as_str(),
        "--follow-key",
        "fmk_not_a_key_of_this_partner_0123456789",
    ];
    let b = Node::start(
        b_dir.path(),
        "127.0.0.1:0",
        &follow,
        logs.path().join("b.log"),
    )
    .await;
    let started = Instant::now();
    loop {
        let log = b.log_text();
        if log.contains("the partner rejected --follow-key") {
            assert!(log.contains("ERROR"), "logged as an error: {log}");
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no error about the key within {DEADLINE:?}:\n{log}"
        );
        tokio::time::sleep(POLL).await;
    }
    // B serves its own banks all the same, and says it is not connected.
    assert_eq!(b.stats().await.banks, 0);
    let metrics = b.scrape().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("framematch_follow_connected") && l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(b.terminate().success());
    assert!(a.terminate().success());
}

#[test]
fn follow_flags_are_checked_before_starting() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = |args: &[&str]| {
        let output = Command::new(BIN)
            .env("FRAMEMATCH_BOOTSTRAP_ADMIN_KEY", ADMIN_KEY)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .output()
            .expect("run framematch");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--follow", "http://127.0.0.1:1"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--follow-key"), "{err}");
    let (code, err) = run(&["--follow", "ftp://x", "--follow-key", "k"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--follow"), "{err}");
    let (code, err) = run(&["--follow-key", "k"]);
    assert_eq!(code, Some(64), "{err}");
    // The key never appears in what is printed.
    let (code, err) = run(&[
        "--follow",
        "http://127.0.0.1:1",
        "--follow-key",
        "secret-value-0123456789-abcdef",
        "--follow-share-with",
        "nobody-here",
    ]);
    assert_eq!(code, Some(2), "a runtime error exits 2: {err}");
    assert!(err.contains("\"nobody-here\""), "{err}");
    assert_eq!(err.matches("does not exist").count(), 1, "said once: {err}");
    assert!(!err.contains("secret-value"), "{err}");
}
