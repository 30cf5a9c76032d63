//! Several replicas on one PostgreSQL database (DESIGN.md §3): each follows the change log, so a
//! write through one is matched by the others. Runs against the real PostgreSQL named by
//! `FRAMEMATCH_TEST_POSTGRES_URL` (`.ci/run` starts one); each test makes its own database.

use std::time::{Duration, Instant};

use framematch::hash::PdqHash;
use framematch::pb;

use crate::support::{self, Database, TestServer};

async fn replica(database: &Database) -> TestServer {
    let url = database.url.clone();
    TestServer::start_with(move |config| config.postgres_url = Some(url)).await
}

fn hash(seed: usize) -> PdqHash {
    PdqHash::from_bit_fn(|k| (k * 11 + seed * 17) % 7 < 3)
}

/// Whether `server` matches `hash` to `reference` now.
async fn matches(server: &TestServer, hash: &PdqHash, reference: i64) -> bool {
    support::match_image(server, support::pdq_frame(0, 0, hash, 100), None)
        .await
        .expect("match")
        .matches
        .iter()
        .any(|m| m.source.as_ref().map(|s| s.reference_id) == Some(reference))
}

/// Waits until `matches` says `want`, for at most `limit`; returns how long it took.
async fn until(server: &TestServer, hash: &PdqHash, reference: i64, want: bool) -> Duration {
    let started = Instant::now();
    let limit = Duration::from_secs(10);
    while matches(server, hash, reference).await != want {
        assert!(
            started.elapsed() < limit,
            "replica did not converge within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_replica_is_matched_by_the_others() {
    let Some(database) = Database::create().await else {
        return;
    };
    let a = replica(&database).await;
    let b = replica(&database).await;

    support::create_bank(&a, "shared").await;
    let added = support::add_reference(&a, "shared", vec![support::pdq_frame(0, 0, &hash(1), 100)])
        .await
        .expect("add through A");
    let id = added.reference.expect("reference").id;
    assert!(
        matches(&a, &hash(1), id).await,
        "the writer matches at once"
    );
    let took = until(&b, &hash(1), id, true).await;
    eprintln!("replica B matched A's reference after {took:?}");
    // B knows the bank too: matching restricted to it works.
    let only = pb::MatchOptions {
        banks: vec!["shared".into()],
        ..Default::default()
    };
    let result = support::match_image(&b, support::pdq_frame(0, 0, &hash(1), 100), Some(only))
        .await
        .expect("B resolves the bank A created");
    assert_eq!(result.matches.len(), 1);

    // A withdrawal through B stops matches on A.
    b.banks()
        .await
        .withdraw_reference(pb::WithdrawReferenceRequest {
            reference_id: id,
            reason: "false positive".into(),
        })
        .await
        .expect("withdraw through B");
    until(&a, &hash(1), id, false).await;

    // A replica started later loads the current state.
    let second =
        support::add_reference(&b, "shared", vec![support::pdq_frame(0, 0, &hash(2), 100)])
            .await
            .expect("add through B")
            .reference
            .expect("reference")
            .id;
    let c = replica(&database).await;
    assert!(
        matches(&c, &hash(2), second).await,
        "C loads B's reference at start"
    );
    assert!(
        !matches(&c, &hash(1), id).await,
        "C never serves the withdrawn one"
    );
    let stats = c
        .banks()
        .await
        .stats(pb::StatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(
        (stats.active_references, stats.withdrawn_references),
        (1, 1)
    );

    for server in [a, b, c] {
        server.stop().await;
    }
    database.drop_now().await;
}

/// A cluster of this test's own (started by `.ci/postgres-start` in a temp dir), so it can be
/// stopped and started under a running replica. Stopped on drop.
struct OwnCluster {
    url: String,
    pgdata: String,
    _dir: tempfile::TempDir,
}

impl OwnCluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let output =
            std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/postgres-start"))
                .env("FRAMEMATCH_PG_DIR", dir.path())
                .env_remove("FRAMEMATCH_PG_PORT")
                .output()
                .expect("run .ci/postgres-start");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let value = |name: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("{name} in {stdout}"))
                .to_string()
        };
        Self {
            url: value("FRAMEMATCH_TEST_POSTGRES_URL"),
            pgdata: value("FRAMEMATCH_TEST_PGDATA"),
            _dir: dir,
        }
    }

    /// `pg_ctl -D <data> -w <args>`, as the `postgres` user under root (PostgreSQL refuses root).
    fn pg_ctl(&self, args: &[&str]) {
        let pg_ctl = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin/pg_ctl"))
            .filter(|p| p.exists())
            .max()
            .map_or_else(|| "pg_ctl".to_string(), |p| p.display().to_string());
        let status = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", &pg_ctl, "-D", &self.pgdata, "-w"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run pg_ctl");
        assert!(status.success(), "pg_ctl {args:?}: {status}");
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.pg_ctl(&["stop", "-m", "immediate"]);
    }
}

/// Waits until gRPC health of `service` on `server` reports `want`.
async fn health_becomes(server: &TestServer, service: &str, want: i32) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let mut health = HealthClient::new(server.channel().await);
    let mut updates = health
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(update) = updates.message().await.expect("health stream") {
            if update.status == want {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{service} did not report {want} within 30 s"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_loses_the_database_keeps_matching_and_recovers() {
    if std::env::var_os("FRAMEMATCH_TEST_POSTGRES_URL").is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide PostgreSQL"
        );
        eprintln!("skipping: FRAMEMATCH_TEST_POSTGRES_URL is not set");
        return;
    }
    use tonic_health::pb::health_check_response::ServingStatus;
    let cluster = OwnCluster::start();
    let url = cluster.url.clone();
    let server = TestServer::start_with(move |config| config.postgres_url = Some(url)).await;
    support::create_bank(&server, "b").await;
    let id = support::add_reference(&server, "b", vec![support::pdq_frame(0, 0, &hash(3), 100)])
        .await
        .expect("add")
        .reference
        .expect("reference")
        .id;

    let lag = |text: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix("framematch_replica_lag_seconds{store=\"postgres\"} "))
            .unwrap_or_else(|| panic!("replica lag in {text}"))
            .parse()
            .expect("a number")
    };
    assert!(lag(&server.scrape().await) < 5.0);
    cluster.pg_ctl(&["stop", "-m", "fast"]);
    health_becomes(
        &server,
        "framematch.v1.Banks",
        ServingStatus::NotServing as i32,
    )
    .await;
    // The lag metric grows while the database is away (it counts from the last sync).
    let started = Instant::now();
    while lag(&server.scrape().await) <= 0.5 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "lag never grew"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Matching goes on from memory, and the matcher stays SERVING.
    assert!(matches(&server, &hash(3), id).await);
    health_becomes(
        &server,
        "framematch.v1.Matcher",
        ServingStatus::Serving as i32,
    )
    .await;
    let write = support::add_reference(&server, "b", vec![support::pdq_frame(0, 0, &hash(4), 100)])
        .await
        .expect_err("writes fail while the database is down");
    assert!(
        matches!(
            write.code(),
            tonic::Code::Unavailable | tonic::Code::Internal
        ),
        "{write:?}"
    );

    cluster.pg_ctl(&["start", "-l", &format!("{}/../restart.log", cluster.pgdata)]);
    health_becomes(
        &server,
        "framematch.v1.Banks",
        ServingStatus::Serving as i32,
    )
    .await;
    assert!(lag(&server.scrape().await) < 5.0, "caught up again");
    let again = support::add_reference(&server, "b", vec![support::pdq_frame(0, 0, &hash(5), 100)])
        .await
        .expect("writes work again")
        .reference
        .expect("reference")
        .id;
    assert!(matches(&server, &hash(5), again).await);
    server.stop().await;
}

/// Whether `key` is accepted by `server` now (UNAUTHENTICATED otherwise).
async fn accepts(server: &TestServer, key: &str) -> bool {
    match pb::banks_client::BanksClient::new(server.connect_as(Some(key)).await)
        .stats(pb::StatsRequest {})
        .await
    {
        Ok(_) => true,
        Err(status) if status.code() == tonic::Code::Unauthenticated => false,
        Err(status) => panic!("unexpected answer: {status}"),
    }
}

/// Waits until `accepts` says `want`, for at most 10 s; returns how long it took.
async fn until_key(server: &TestServer, key: &str, want: bool) -> Duration {
    let started = Instant::now();
    while accepts(server, key).await != want {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "replica did not converge on the key within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_created_and_revoked_through_one_replica_apply_on_the_others() {
    let Some(database) = Database::create().await else {
        return;
    };
    let a = replica(&database).await;
    let b = replica(&database).await;
    let created = a
        .admin()
        .await
        .create_api_key(pb::CreateApiKeyRequest {
            organisation: "local".into(),
            role: pb::Role::Matcher as i32,
            label: "replicated".into(),
        })
        .await
        .expect("create through A")
        .into_inner();
    let took = until_key(&b, &created.secret, true).await;
    eprintln!("replica B accepted A's new key after {took:?}");
    a.admin()
        .await
        .revoke_api_key(pb::RevokeApiKeyRequest {
            id: created.key.expect("key").id,
        })
        .await
        .expect("revoke through A");
    assert!(
        !accepts(&a, &created.secret).await,
        "the revoking replica refuses it at once"
    );
    let took = until_key(&b, &created.secret, false).await;
    eprintln!("replica B refused the revoked key after {took:?}");
    a.stop().await;
    b.stop().await;
}
