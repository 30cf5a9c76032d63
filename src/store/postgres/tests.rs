//! PostgreSQL-only store tests (the shared ones are in `store::tests`).

use std::collections::HashSet;

use crate::hash::PdqHash;
use crate::model::Category;
use std::time::Instant;

use super::test_support::{TestDatabase, admin_url, with_dbname};
use super::*;
use crate::store::Store;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn frame(frame_index: u32, seed: u8) -> FrameSignal {
    FrameSignal {
        frame_index,
        timestamp_ms: u64::from(frame_index) * 40,
        hash: PdqHash::from_bytes([seed; 32]),
        quality: 77,
    }
}

fn bank(name: &str, owner: OrgId) -> NewBank {
    NewBank {
        name: name.to_string(),
        category: Category::Other,
        owner,
        visibility: Visibility::Public,
        description: String::new(),
        embedding_spaces: Vec::new(),
    }
}

async fn add_one_reference(store: &Store) -> Result<Reference, Error> {
    let local = store.default_org().await?;
    let bank = store
        .create_bank(bank("bank", local), Actor::system(local))
        .await?;
    store
        .add_reference(
            NewReference {
                bank: bank.id,
                external_id: String::new(),
                note: String::new(),
                added_by: local,
                frames: vec![frame(0, 1), frame(1, 2)],
                embeddings: Vec::new(),
            },
            Actor::system(local),
        )
        .await
}

#[test]
fn test_urls_swap_only_the_database() {
    assert_eq!(
        with_dbname("postgres://u@h:5/old", "new"),
        "postgres://u@h:5/new"
    );
    assert_eq!(
        with_dbname("postgres://u:p@h:5/old?sslmode=disable", "new"),
        "postgres://u:p@h:5/new?sslmode=disable"
    );
    assert_eq!(with_dbname("postgres://h", "new"), "postgres://h/new");
}

#[test]
fn descriptions_hold_no_password() -> TestResult {
    let config: Config = "postgres://u:secret@db.example:6432/fm?application_name=x".parse()?;
    assert_eq!(describe(&config), "postgres://u@db.example:6432/fm");
    Ok(())
}

#[tokio::test]
async fn open_describes_the_database_without_its_password() -> TestResult {
    let Some(db) = TestDatabase::create().await? else {
        return Ok(());
    };
    let store = db.open().await?;
    let Store::Postgres(pg) = &store else {
        panic!("not postgres: {store:?}");
    };
    let config: Config = db.url().parse()?;
    let description = store.describe();
    assert!(description.starts_with("postgres://"), "{description}");
    assert!(
        description.ends_with(&format!("/{}", config.get_dbname().unwrap_or_default())),
        "{description}"
    );
    // The statement timeout reaches the server.
    let client = pg.client().await?;
    let timeout: String = client
        .query_one("SHOW statement_timeout", &[])
        .await?
        .try_get(0)?;
    assert_eq!(timeout, "30s");
    Ok(())
}

#[tokio::test]
async fn migrations_are_idempotent_and_recorded() -> TestResult {
    let Some(db) = TestDatabase::create().await? else {
        return Ok(());
    };
    let schema = || async {
        let client = db.connect().await?;
        let versions: Vec<i64> = client
            .query(
                "SELECT version FROM schema_migrations ORDER BY version",
                &[],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let tables: Vec<String> = client
            .query(
                "SELECT table_name::text FROM information_schema.tables
                 WHERE table_schema = current_schema() ORDER BY 1",
                &[],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        Ok::<_, Box<dyn std::error::Error>>((versions, tables))
    };
    let first = db.open().await?;
    let default_org = first.default_org().await?;
    let before = schema().await?;
    assert_eq!(before.0, (1..=supported_version()).collect::<Vec<_>>());
    assert!(before.1.contains(&"frames".to_string()), "{before:?}");
    drop(first);
    for _ in 0..2 {
        let again = db.open().await?;
        assert_eq!(schema().await?, before);
        assert_eq!(again.default_org().await?, default_org);
        assert_eq!(again.list_orgs().await?.len(), 1);
        assert_eq!(again.last_seq().await?, ChangeSeq(1));
    }
    Ok(())
}

/// The test database as the release of schema `version` left it, before its data.
async fn old_database(
    db: &TestDatabase,
    version: usize,
) -> Result<tokio_postgres::Client, Box<dyn std::error::Error>> {
    let client = db.connect().await?;
    client
        .batch_execute(
            "CREATE TABLE schema_migrations (
                 version    bigint      PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await?;
    for (step, sql) in MIGRATIONS[..version].iter().enumerate() {
        client.batch_execute(sql).await?;
        client
            .execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[&(step as i64 + 1)],
            )
            .await?;
    }
    Ok(client)
}

/// A schema-3 database (embedding spaces without stored index settings) opened by this
/// release: its spaces read back with no settings (the defaults), and new spaces store
/// theirs.
#[tokio::test]
async fn a_schema_3_database_gains_index_settings_in_place() -> TestResult {
    let Some(db) = TestDatabase::create().await? else {
        return Ok(());
    };
    {
        let client = old_database(&db, 3).await?;
        client
            .batch_execute(
                "INSERT INTO organisations (name, created_ms) VALUES ('local', 10);
                 INSERT INTO banks (name, category, owner_org, visibility, description,
                                    created_ms)
                     VALUES ('old', 'terrorism', 1, 'private', '', 13);
                 INSERT INTO embedding_spaces (name, dimension, metric)
                     VALUES ('sscd', 4, 'cosine');
                 INSERT INTO bank_spaces (bank_id, space_id, threshold) VALUES (1, 1, 0.8);",
            )
            .await?;
    }
    let store = db.open().await?;
    let versions: Vec<i64> = db
        .connect()
        .await?
        .query("SELECT version FROM schema_migrations ORDER BY 1", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, (1..=supported_version()).collect::<Vec<_>>());
    let new = crate::store::tests::schema_3_spaces_gain_index_settings(&store).await?;
    drop(store);
    let store = db.open().await?;
    assert_eq!(store.get_bank(new.id).await?, new);
    Ok(())
}

/// A database written by the first release (schema 1, with data and a change log) opened
/// by this one: migrated in place, its data and log kept.
#[tokio::test]
async fn a_schema_1_database_is_upgraded_in_place() -> TestResult {
    let Some(db) = TestDatabase::create().await? else {
        return Ok(());
    };
    {
        let client = old_database(&db, 1).await?;
        client
            .batch_execute(
                "INSERT INTO organisations (name, created_ms) VALUES ('local', 10),
                     ('partner', 11);
                 INSERT INTO api_keys (org_id, role, key_hash, created_ms)
                     VALUES (2, 'contributor', decode(repeat('00', 32), 'hex'), 12);
                 INSERT INTO banks (name, category, owner_org, visibility, description,
                                    created_ms)
                     VALUES ('old', 'terrorism', 1, 'shared', 'kept', 13);
                 INSERT INTO bank_shares (bank_id, org_id) VALUES (1, 2);
                 INSERT INTO refs (bank_id, external_id, note, added_by, added_ms,
                                   frame_count)
                     VALUES (1, 'x', 'n', 2, 14, 1);
                 INSERT INTO frames (reference_id, hash, frame_index, timestamp_ms, quality)
                     VALUES (1, decode(repeat('00', 32), 'hex'), 0, 0, 50);
                 INSERT INTO changes (seq, kind, org_id, bank_id, reference_id, actor, at_ms)
                     VALUES (1, 'org_created', 1, NULL, NULL, 1, 10),
                            (2, 'org_created', 2, NULL, NULL, 2, 11),
                            (3, 'bank_created', NULL, 1, NULL, 1, 13),
                            (4, 'reference_added', NULL, 1, 1, 2, 14);",
            )
            .await?;
    }
    let store = db.open().await?;
    let versions: Vec<i64> = db
        .connect()
        .await?
        .query("SELECT version FROM schema_migrations ORDER BY 1", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, (1..=supported_version()).collect::<Vec<_>>());

    assert_eq!(store.default_org().await?, OrgId(1));
    assert_eq!(store.list_orgs().await?.len(), 2);
    let bank = store.get_bank(BankId(1)).await?;
    assert_eq!(bank.visibility, Visibility::SharedWith(vec![OrgId(2)]));
    assert_eq!(bank.description, "kept");
    assert_eq!(
        store.get_reference(ReferenceId(1)).await?.added_by,
        OrgId(2)
    );
    assert_eq!(store.reference_frames(ReferenceId(1)).await?.len(), 1);
    let key = store.get_api_key(KeyId(1)).await?;
    assert_eq!(
        (key.org, key.role, key.label.as_str(), key.revoked_ms),
        (OrgId(2), crate::model::Role::Contributor, "", None)
    );
    let changes = store.changes_since(ChangeSeq(0), 100).await?;
    let seqs: Vec<i64> = changes.iter().map(|c| c.seq.0).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert_eq!(
        changes[3],
        Change {
            seq: ChangeSeq(4),
            kind: ChangeKind::ReferenceAdded {
                reference: ReferenceId(1),
                bank: BankId(1),
            },
            actor: Actor::system(OrgId(2)),
            detail: String::new(),
            at_ms: 14,
        }
    );

    // The new kinds and columns work, and numbering continues.
    let actor = Actor {
        org: OrgId(2),
        key: Some(KeyId(1)),
    };
    store
        .update_bank_visibility(BankId(1), Visibility::Public, actor)
        .await?;
    store.revoke_api_key(KeyId(1), actor).await?;
    let new = store.changes_since(ChangeSeq(4), 10).await?;
    let kinds: Vec<_> = new
        .iter()
        .map(|c| (c.seq.0, c.kind.clone(), c.actor))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (5, ChangeKind::BankUpdated(BankId(1)), actor),
            (
                6,
                ChangeKind::KeyRevoked {
                    key: KeyId(1),
                    org: OrgId(2)
                },
                actor
            ),
        ]
    );
    drop(store);
    let store = db.open().await?;
    assert_eq!(store.last_seq().await?, ChangeSeq(6));

    // The re-added kind constraint still refuses unknown kinds.
    let err = db
        .connect()
        .await?
        .execute(
            "INSERT INTO changes (seq, kind, actor, at_ms) VALUES (7, 'bank_deleted', 1, 0)",
            &[],
        )
        .await
        .err()
        .ok_or("an unknown kind was accepted")?;
    assert_eq!(err.code(), Some(&SqlState::CHECK_VIOLATION), "{err:?}");
    Ok(())
}

/// Followers racing to mirror the same partner bank and reference on two handles: each
/// gets the one bank and the one reference, and the log records each creation once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_mirror_writes_create_once() -> TestResult {
    let Some(db) = TestDatabase::create().await? else {
        return Ok(());
    };
    let first = db.open().await?;
    let second = db.open().await?;
    let local = first.default_org().await?;
    let actor = Actor::system(local);
    let start = first.last_seq().await?;

    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = if i % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        tasks.push(tokio::spawn(async move {
            let bank = store
                .create_mirrored_bank("peer", 1, bank("peer.b", local), actor)
                .await?;
            let (reference, created) = store
                .add_mirrored_reference(
                    "peer",
                    9,
                    NewReference {
                        bank: bank.id,
                        external_id: String::new(),
                        note: String::new(),
                        added_by: local,
                        frames: vec![frame(0, 1)],
                        embeddings: Vec::new(),
                    },
                    actor,
                )
                .await?;
            Ok::<_, Error>((bank.id, reference.id, created))
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await??);
    }
    let banks: HashSet<BankId> = results.iter().map(|r| r.0).collect();
    let references: HashSet<ReferenceId> = results.iter().map(|r| r.1).collect();
    assert_eq!(banks.len(), 1, "{results:?}");
    assert_eq!(references.len(), 1, "{results:?}");
    assert_eq!(results.iter().filter(|r| r.2).count(), 1, "{results:?}");
    let log = first.changes_since(start, 100).await?;
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(first.stats().await?.active_references, 1);
    assert_eq!(first.list_banks().await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn replicas_opening_together_migrate_once() -> TestResult {
    let Some(db) = TestDatabase::create().await? else {
        return Ok(());
    };
    let url = db.url().to_string();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        tasks.push(tokio::spawn(
            async move { Store::open_postgres(&url).await },
        ));
    }
    let mut orgs = HashSet::new();
    for task in tasks {
        orgs.insert(task.await??.default_org().await?);
    }
    assert_eq!(orgs.len(), 1);
    let store = db.open().await?;
    assert_eq!(store.list_orgs().await?.len(), 1);
    assert_eq!(store.changes_since(ChangeSeq(0), 10).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn newer_schema_version_is_refused() -> TestResult {
    let Some(db) = TestDatabase::create().await? else {
        return Ok(());
    };
    drop(db.open().await?);
    db.connect()
        .await?
        .execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&(supported_version() + 1)],
        )
        .await?;
    let err = db.open().await;
    assert!(
        matches!(err, Err(Error::SchemaTooNew { found, supported })
            if found == supported_version() + 1 && supported == supported_version()),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn synchronous_commit_off_is_refused() -> TestResult {
    let Some(db) = TestDatabase::create().await? else {
        return Ok(());
    };
    let config: Config = db.url().parse()?;
    let dbname = config.get_dbname().unwrap_or_default().to_string();
    db.connect()
        .await?
        .batch_execute(&format!(
            "ALTER DATABASE {dbname} SET synchronous_commit = off"
        ))
        .await?;
    let err = db.open().await;
    assert!(
        matches!(err, Err(Error::UnsafeSetting { setting: "synchronous_commit", ref actual, .. }) if actual == "off"),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn data_survives_close_and_reopen() -> TestResult {
    let Some(db) = TestDatabase::create().await? else {
        return Ok(());
    };
    let (reference, seq) = {
        let store = db.open().await?;
        let reference = add_one_reference(&store).await?;
        (reference, store.last_seq().await?)
    };
    let store = db.open().await?;
    assert_eq!(store.get_reference(reference.id).await?, reference);
    assert_eq!(store.last_seq().await?, seq);
    let (frames, loaded_seq) = store.load_active_frames().await?;
    assert_eq!(loaded_seq, seq);
    assert_eq!(frames.len(), 2);
    Ok(())
}

#[tokio::test]
async fn the_database_checks_hash_length() -> TestResult {
    let Some(db) = TestDatabase::create().await? else {
        return Ok(());
    };
    let store = db.open().await?;
    let reference = add_one_reference(&store).await?;
    let client = db.connect().await?;
    let short = vec![0u8; 31];
    let err = client
        .execute(
            "UPDATE frames SET hash = $2 WHERE reference_id = $1",
            &[&reference.id.0, &short],
        )
        .await
        .err()
        .ok_or("a 31-byte hash was accepted")?;
    assert_eq!(err.code(), Some(&SqlState::CHECK_VIOLATION), "{err:?}");

    // Past the constraint, the store reports corruption instead of panicking.
    client
        .batch_execute("ALTER TABLE frames DROP CONSTRAINT frames_hash_check")
        .await?;
    client
        .execute(
            "UPDATE frames SET hash = $2 WHERE reference_id = $1 AND frame_index = 1",
            &[&reference.id.0, &short],
        )
        .await?;
    for err in [
        store.load_active_frames().await.map(|_| ()),
        store.reference_frames(reference.id).await.map(|_| ()),
    ] {
        assert!(
            matches!(err, Err(Error::Corrupt { ref detail }) if detail.contains("31 bytes")),
            "{err:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn unknown_stored_category_is_corrupt() -> TestResult {
    let Some(db) = TestDatabase::create().await? else {
        return Ok(());
    };
    let store = db.open().await?;
    let reference = add_one_reference(&store).await?;
    db.connect()
        .await?
        .batch_execute("UPDATE banks SET category = 'gore'")
        .await?;
    let err = store.get_bank(reference.bank).await;
    assert!(
        matches!(err, Err(Error::Corrupt { ref detail }) if detail.contains("gore")),
        "{err:?}"
    );
    assert!(matches!(
        store.list_banks().await,
        Err(Error::Corrupt { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn large_references_are_inserted_in_chunks() -> TestResult {
    let Some(db) = TestDatabase::create().await? else {
        return Ok(());
    };
    let store = db.open().await?;
    let local = store.default_org().await?;
    let bank = store
        .create_bank(bank("big", local), Actor::system(local))
        .await?
        .id;
    let count = u32::try_from(FRAMES_PER_INSERT * 2 + 7)?;
    let frames: Vec<FrameSignal> = (0..count)
        .map(|i| FrameSignal {
            frame_index: i,
            timestamp_ms: u64::from(i) * 33,
            hash: PdqHash::from_bytes({
                let mut bytes = [0u8; 32];
                bytes[..4].copy_from_slice(&i.to_le_bytes());
                bytes
            }),
            quality: u8::try_from(i % 101).unwrap_or(0),
        })
        .collect();
    let reference = store
        .add_reference(
            NewReference {
                bank,
                external_id: "big".to_string(),
                note: String::new(),
                added_by: local,
                frames: frames.clone(),
                embeddings: Vec::new(),
            },
            Actor::system(local),
        )
        .await?;
    assert_eq!(reference.frame_count, count);
    assert_eq!(store.reference_frames(reference.id).await?, frames);
    assert_eq!(store.load_active_frames().await?.0.len(), frames.len());
    Ok(())
}

/// Two handles (two replicas) write concurrently while a tailer follows the log: every
/// batch it reads continues exactly where the previous one ended, and both handles read the
/// same gap-free log afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_on_two_handles_share_one_gap_free_log() -> TestResult {
    let Some(db) = TestDatabase::create().await? else {
        return Ok(());
    };
    let first = db.open().await?;
    let second = db.open().await?;
    let local = first.default_org().await?;
    let bank_id = first
        .create_bank(bank("shared", local), Actor::system(local))
        .await?
        .id;
    const WRITERS: usize = 8;
    const WRITES: usize = 10;

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tailer = {
        let store = second.clone();
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut last = ChangeSeq(0);
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let batch = store
                    .changes_since(last, 7)
                    .await
                    .map_err(|err| err.to_string())?;
                for change in &batch {
                    if change.seq.0 != last.0 + 1 {
                        return Err(format!("after {} the tailer saw {}", last.0, change.seq.0));
                    }
                    last = change.seq;
                    seen.push(change.seq.0);
                }
                if finished && batch.is_empty() {
                    return Ok(seen);
                }
            }
        })
    };

    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let store = if writer % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        writers.push(tokio::spawn(async move {
            for write in 0..WRITES {
                if write % 2 == 0 {
                    store
                        .create_org(&format!("org-{writer}-{write}"), None)
                        .await?;
                } else {
                    let seed = u8::try_from(writer * WRITES + write).unwrap_or(0);
                    store
                        .add_reference(
                            NewReference {
                                bank: bank_id,
                                external_id: String::new(),
                                note: String::new(),
                                added_by: local,
                                frames: vec![frame(0, seed), frame(1, seed.wrapping_add(1))],
                                embeddings: Vec::new(),
                            },
                            Actor::system(local),
                        )
                        .await?;
                }
            }
            Ok::<_, Error>(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = tailer.await??;

    let total = i64::try_from(2 + WRITERS * WRITES)?;
    assert_eq!(seen, (1..=total).collect::<Vec<_>>());
    let from_first = first.changes_since(ChangeSeq(0), 1000).await?;
    let from_second = second.changes_since(ChangeSeq(0), 1000).await?;
    assert_eq!(from_first, from_second);
    assert_eq!(first.last_seq().await?, ChangeSeq(total));
    let (frames, seq) = second.load_active_frames().await?;
    assert_eq!(seq, ChangeSeq(total));
    assert_eq!(frames.len(), WRITERS * WRITES);
    Ok(())
}

#[tokio::test]
async fn listeners_hear_every_replicas_writes_in_order() -> TestResult {
    let Some(db) = TestDatabase::create().await? else {
        return Ok(());
    };
    let first = db.open().await?;
    let second = db.open().await?;
    let mut heard = first
        .listen_changes()
        .await?
        .ok_or("postgres stores can listen")?;
    let a = second.create_org("from-second", None).await?;
    let b = first.create_org("from-first", None).await?;
    let wait = Duration::from_secs(5);
    let one = tokio::time::timeout(wait, heard.recv()).await?;
    let two = tokio::time::timeout(wait, heard.recv()).await?;
    assert_eq!((one, two), (Some(ChangeSeq(2)), Some(ChangeSeq(3))));
    let log = first.changes_since(ChangeSeq(1), 10).await?;
    let kinds: Vec<_> = log.into_iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds,
        vec![ChangeKind::OrgCreated(a.id), ChangeKind::OrgCreated(b.id)]
    );
    // A failed write notifies nobody.
    assert!(second.create_org("from-first", None).await.is_err());
    assert!(
        tokio::time::timeout(Duration::from_millis(300), heard.recv())
            .await
            .is_err()
    );

    let dir = tempfile::tempdir()?;
    let embedded = Store::open_embedded(dir.path()).await?;
    assert!(embedded.listen_changes().await?.is_none());
    Ok(())
}

#[tokio::test]
async fn unreachable_database_fails_fast_with_unavailable() -> TestResult {
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let started = Instant::now();
    let err = Store::open_postgres("postgres://framematch@127.0.0.1:1/none").await;
    assert!(matches!(err, Err(Error::Unavailable { .. })), "{err:?}");
    let message = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.starts_with("database unavailable: "), "{message}");
    assert!(started.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(2));
    Ok(())
}

#[tokio::test]
async fn a_url_that_does_not_parse_is_invalid_input() {
    let err = Store::open_postgres("postgres://host:notaport/db").await;
    assert!(
        matches!(
            err,
            Err(Error::InvalidInput {
                field: "postgres url",
                ..
            })
        ),
        "{err:?}"
    );
}

/// A PostgreSQL cluster of this test's own, started with `.ci/postgres-start`, so it can be
/// stopped and started again without disturbing other tests. Stopped on drop.
struct OwnCluster {
    url: String,
    pgdata: String,
    _dir: tempfile::TempDir,
}

impl OwnCluster {
    fn start() -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/postgres-start");
        let output = std::process::Command::new(script)
            .env("FRAMEMATCH_PG_DIR", dir.path())
            .env_remove("FRAMEMATCH_PG_PORT")
            .output()?;
        if !output.status.success() {
            return Err(format!(
                "postgres-start failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        let stdout = String::from_utf8(output.stdout)?;
        let value = |name: &str| {
            stdout
                .lines()
                .find_map(|line| line.strip_prefix(&format!("export {name}=")))
                .map(str::to_string)
                .ok_or_else(|| format!("no {name} in {stdout:?}"))
        };
        Ok(Self {
            url: value("FRAMEMATCH_TEST_POSTGRES_URL")?,
            pgdata: value("FRAMEMATCH_TEST_PGDATA")?,
            _dir: dir,
        })
    }

    /// Runs `pg_ctl -D <data> <args>`, as the `postgres` user when we are root.
    fn pg_ctl(&self, args: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
        let pg_ctl = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|entry| entry.path().join("bin/pg_ctl"))
            .filter(|path| path.exists())
            .max()
            .map_or_else(|| "pg_ctl".to_string(), |p| p.display().to_string());
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| out.stdout.trim_ascii() == b"0");
        let mut command = if root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--", &pg_ctl]);
            c
        } else {
            std::process::Command::new(&pg_ctl)
        };
        let status = command
            .args(["-D", &self.pgdata, "-w", "-t", "60"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()?;
        if !status.success() {
            return Err(format!("pg_ctl {args:?} failed: {status}").into());
        }
        Ok(())
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        if let Err(err) = self.pg_ctl(&["stop", "-m", "immediate"]) {
            eprintln!("could not stop the test cluster: {err}");
        }
    }
}

#[tokio::test]
async fn store_recovers_after_the_database_restarts() -> TestResult {
    if admin_url().is_none() {
        return Ok(());
    }
    let cluster = OwnCluster::start()?;
    let store = Store::open_postgres(&cluster.url).await?;
    store.create_org("before", None).await?;
    let mut heard = store
        .listen_changes()
        .await?
        .ok_or("postgres stores can listen")?;

    cluster.pg_ctl(&["stop", "-m", "fast"])?;
    let started = Instant::now();
    let err = store.create_org("during", None).await;
    assert!(matches!(err, Err(Error::Unavailable { .. })), "{err:?}");
    let err = store.list_orgs().await;
    assert!(matches!(err, Err(Error::Unavailable { .. })), "{err:?}");
    assert!(started.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(2));
    // The listener's connection is gone, and its receiver says so.
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), heard.recv()).await?,
        None
    );

    cluster.pg_ctl(&["start", "-l", &format!("{}/../restart.log", cluster.pgdata)])?;
    let after = store.create_org("after", None).await?;
    let names: Vec<String> = store
        .list_orgs()
        .await?
        .into_iter()
        .map(|org| org.name)
        .collect();
    assert_eq!(names, vec!["local", "before", "after"]);
    let mut heard = store
        .listen_changes()
        .await?
        .ok_or("postgres stores can listen")?;
    store.create_org("again", None).await?;
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), heard.recv()).await?,
        Some(ChangeSeq(4))
    );
    assert!(after.id.0 > 0);
    Ok(())
}
