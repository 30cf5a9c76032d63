//! SQLite-only store tests (the shared ones are in `store::tests`).

use super::*;
use crate::hash::PdqHash;
use crate::model::Category;
use crate::store::Store;

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn open(dir: &Path) -> Result<EmbeddedStore, Error> {
    EmbeddedStore::open(dir).await
}

fn frame(frame_index: u32, seed: u8) -> FrameSignal {
    FrameSignal {
        frame_index,
        timestamp_ms: u64::from(frame_index) * 40,
        hash: PdqHash::from_bytes([seed; 32]),
        quality: 77,
    }
}

async fn add_one_reference(store: &Store) -> Result<Reference, Error> {
    let local = store.default_org().await?;
    let bank = store
        .create_bank(
            super::super::NewBank {
                name: "bank".to_string(),
                category: Category::Other,
                owner: local,
                visibility: Visibility::Public,
                description: String::new(),
                embedding_spaces: Vec::new(),
            },
            Actor::system(local),
        )
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

#[tokio::test]
async fn wal_full_sync_and_foreign_keys_are_in_effect() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path()).await?;
    for conn in [&store.inner.writer, &store.inner.reader] {
        let conn = conn.lock();
        let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
        assert_eq!(mode, "wal");
        let sync: i64 = conn.pragma_query_value(None, "synchronous", |r| r.get(0))?;
        assert_eq!(sync, 2, "synchronous=FULL");
        let fk: i64 = conn.pragma_query_value(None, "foreign_keys", |r| r.get(0))?;
        assert_eq!(fk, 1);
        let busy: i64 = conn.pragma_query_value(None, "busy_timeout", |r| r.get(0))?;
        assert_eq!(busy, 5000);
    }
    let query_only: i64 =
        store
            .inner
            .reader
            .lock()
            .pragma_query_value(None, "query_only", |r| r.get(0))?;
    assert_eq!(query_only, 1);
    // Foreign keys are enforced, not just declared.
    let orphan = store.inner.writer.lock().execute(
        "INSERT INTO frames (reference_id, hash, frame_index, timestamp_ms, quality)
         VALUES (999, zeroblob(32), 0, 0, 0)",
        [],
    );
    assert!(orphan.is_err());
    Ok(())
}

#[tokio::test]
async fn migrations_are_idempotent() -> TestResult {
    let dir = tempfile::tempdir()?;
    let schema = |store: &EmbeddedStore| -> rusqlite::Result<(i64, Vec<String>)> {
        let conn = store.inner.writer.lock();
        let version = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let mut stmt =
            conn.prepare("SELECT sql FROM sqlite_schema WHERE sql IS NOT NULL ORDER BY name")?;
        let sql = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok((version, sql))
    };
    let first = open(dir.path()).await?;
    let default_org = first.default_org();
    let before = schema(&first)?;
    assert_eq!(before.0, supported_version());
    drop(first);
    for _ in 0..2 {
        let again = open(dir.path()).await?;
        assert_eq!(schema(&again)?, before);
        assert_eq!(again.default_org(), default_org);
        assert_eq!(again.list_orgs().await?.len(), 1);
        assert_eq!(again.last_seq().await?, ChangeSeq(1));
    }
    Ok(())
}

/// A database file in `dir` as the release of schema `version` left it, before its data.
fn old_database(dir: &Path, version: usize) -> rusqlite::Result<Connection> {
    let conn = Connection::open(dir.join(FILE_NAME))?;
    for step in &MIGRATIONS[..version] {
        conn.execute_batch(step)?;
    }
    conn.pragma_update(None, "user_version", version)?;
    Ok(conn)
}

/// The schema version an embedded store's file records.
fn user_version(store: &Store) -> rusqlite::Result<i64> {
    let Store::Embedded(embedded) = store else {
        panic!("opened as embedded: {store:?}");
    };
    embedded
        .inner
        .writer
        .lock()
        .pragma_query_value(None, "user_version", |r| r.get(0))
}

/// A database written by the first release (schema 1, with data and a change log) opened
/// by this one: migrated in place, its data and log kept, its sequence numbers never reused.
#[tokio::test]
async fn a_schema_1_database_is_upgraded_in_place() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let conn = old_database(dir.path(), 1)?;
        conn.execute_batch(
            "INSERT INTO organisations (id, name, created_ms) VALUES (1, 'local', 10),
                 (2, 'partner', 11);
             INSERT INTO api_keys (id, org_id, role, key_hash, created_ms)
                 VALUES (1, 2, 'contributor', zeroblob(32), 12);
             INSERT INTO banks (id, name, category, owner_org, visibility, description,
                                created_ms)
                 VALUES (1, 'old', 'terrorism', 1, 'shared', 'kept', 13);
             INSERT INTO bank_shares (bank_id, org_id) VALUES (1, 2);
             INSERT INTO refs (id, bank_id, external_id, note, added_by, added_ms,
                               frame_count)
                 VALUES (1, 1, 'x', 'n', 2, 14, 1);
             INSERT INTO frames (reference_id, hash, frame_index, timestamp_ms, quality)
                 VALUES (1, zeroblob(32), 0, 0, 50);
             INSERT INTO changes (kind, org_id, bank_id, reference_id, actor, at_ms) VALUES
                 ('org_created', 1, NULL, NULL, 1, 10),
                 ('org_created', 2, NULL, NULL, 2, 11),
                 ('bank_created', NULL, 1, NULL, 1, 13),
                 ('reference_added', NULL, 1, 1, 2, 14),
                 ('org_created', 2, NULL, NULL, 2, 15);
             -- Seq 5 was handed out and is gone: AUTOINCREMENT must never hand it out again.
             DELETE FROM changes WHERE seq = 5;",
        )?;
    }
    let store = Store::open_embedded(dir.path()).await?;
    assert_eq!(user_version(&store)?, supported_version());

    let local = store.default_org().await?;
    assert_eq!(local, OrgId(1));
    assert_eq!(store.list_orgs().await?.len(), 2);
    let bank = store.get_bank(BankId(1)).await?;
    assert_eq!(bank.visibility, Visibility::SharedWith(vec![OrgId(2)]));
    assert_eq!(bank.description, "kept");
    let reference = store.get_reference(ReferenceId(1)).await?;
    assert_eq!(reference.added_by, OrgId(2));
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

    // The new kinds and columns work, and numbering continues after the high-water mark.
    let actor = Actor {
        org: OrgId(2),
        key: Some(KeyId(1)),
    };
    store
        .update_bank_visibility(BankId(1), Visibility::Public, actor)
        .await?;
    let change = store.changes_since(ChangeSeq(4), 10).await?;
    assert_eq!(change.len(), 1);
    assert_eq!(change[0].seq, ChangeSeq(6));
    assert_eq!(change[0].kind, ChangeKind::BankUpdated(BankId(1)));
    assert_eq!(change[0].actor, actor);
    assert_eq!(change[0].detail, "public");
    store.revoke_api_key(KeyId(1), actor).await?;
    assert_eq!(store.last_seq().await?, ChangeSeq(7));
    drop(store);

    // Reopening finds nothing more to do.
    let store = Store::open_embedded(dir.path()).await?;
    assert_eq!(store.changes_since(ChangeSeq(0), 100).await?.len(), 6);
    Ok(())
}

/// A schema-3 database (embedding spaces without stored index settings) opened by this
/// release: its spaces read back with no settings (the defaults), and new spaces store
/// theirs.
#[tokio::test]
async fn a_schema_3_database_gains_index_settings_in_place() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let conn = old_database(dir.path(), 3)?;
        conn.execute_batch(
            "INSERT INTO organisations (id, name, created_ms) VALUES (1, 'local', 10);
             INSERT INTO banks (id, name, category, owner_org, visibility, description,
                                created_ms)
                 VALUES (1, 'old', 'terrorism', 1, 'private', '', 13);
             INSERT INTO embedding_spaces (id, name, dimension, metric)
                 VALUES (1, 'sscd', 4, 'cosine');
             INSERT INTO bank_spaces (bank_id, space_id, threshold) VALUES (1, 1, 0.8);",
        )?;
    }
    let store = Store::open_embedded(dir.path()).await?;
    assert_eq!(user_version(&store)?, supported_version());
    let new = crate::store::tests::schema_3_spaces_gain_index_settings(&store).await?;
    drop(store);
    let store = Store::open_embedded(dir.path()).await?;
    assert_eq!(store.get_bank(new.id).await?, new);
    Ok(())
}

/// The rebuilt change log keeps every constraint of the first one, and gains its new ones.
#[tokio::test]
async fn the_change_log_checks_its_kind_and_references() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path()).await?;
    let conn = store.inner.writer.lock();
    let insert = |kind: &str, key: i64| {
        conn.execute(
            "INSERT INTO changes (kind, org_id, key_id, actor, at_ms)
             VALUES (?1, 1, ?2, 1, 0)",
            (kind, key),
        )
    };
    assert!(insert("bank_deleted", 0).is_err(), "unknown kind accepted");
    assert!(insert("key_created", 999).is_err(), "dangling key accepted");
    let sequence: i64 = conn.query_row(
        "SELECT seq FROM sqlite_sequence WHERE name = 'changes'",
        [],
        |row| row.get(0),
    )?;
    assert_eq!(sequence, 1);
    Ok(())
}

#[tokio::test]
async fn newer_schema_version_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    drop(open(dir.path()).await?);
    {
        let conn = Connection::open(dir.path().join(FILE_NAME))?;
        conn.pragma_update(None, "user_version", supported_version() + 1)?;
    }
    let err = open(dir.path()).await;
    assert!(
        matches!(err, Err(Error::SchemaTooNew { found, supported })
            if found == supported_version() + 1 && supported == supported_version()),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_an_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join(FILE_NAME), vec![0x42u8; 8192])?;
    let err = open(dir.path()).await;
    assert!(matches!(err, Err(Error::Sqlite(_))), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn a_data_dir_that_is_a_file_is_an_io_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x")?;
    let err = open(&file.join("data")).await;
    assert!(
        matches!(err, Err(Error::Io { ref path, .. }) if path == &file.join("data")),
        "{err:?}"
    );
    Ok(())
}

/// A committed write is in the database files the moment the call returns: a copy of the
/// files taken while the store is still open (what a crash leaves behind) holds it.
#[tokio::test]
async fn acknowledged_write_is_in_the_files_before_close() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open_embedded(dir.path()).await?;
    let reference = add_one_reference(&store).await?;
    let crash = tempfile::tempdir()?;
    for suffix in ["", "-wal"] {
        let name = format!("{FILE_NAME}{suffix}");
        std::fs::copy(dir.path().join(&name), crash.path().join(&name))?;
    }
    let recovered = Store::open_embedded(crash.path()).await?;
    assert_eq!(recovered.get_reference(reference.id).await?, reference);
    assert_eq!(recovered.last_seq().await?, store.last_seq().await?);
    drop(store);
    Ok(())
}

#[tokio::test]
async fn bad_stored_hash_is_corrupt() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open_embedded(dir.path()).await?;
    let reference = add_one_reference(&store).await?;
    let Store::Embedded(embedded) = &store else {
        panic!("opened as embedded: {store:?}");
    };
    {
        let conn = embedded.inner.writer.lock();
        conn.execute_batch("PRAGMA ignore_check_constraints = ON")?;
        conn.execute(
            "UPDATE frames SET hash = zeroblob(31) WHERE reference_id = ?1 AND frame_index = 1",
            [reference.id.0],
        )?;
        conn.execute_batch("PRAGMA ignore_check_constraints = OFF")?;
    }
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
    let dir = tempfile::tempdir()?;
    let store = Store::open_embedded(dir.path()).await?;
    let reference = add_one_reference(&store).await?;
    let Store::Embedded(embedded) = &store else {
        panic!("opened as embedded: {store:?}");
    };
    embedded
        .inner
        .writer
        .lock()
        .execute("UPDATE banks SET category = 'gore'", [])?;
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
async fn start_up_load_is_driven_by_refs_through_the_frames_key() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path()).await?;
    let conn = store.inner.reader.lock();
    let mut stmt = conn.prepare(
        "EXPLAIN QUERY PLAN
         SELECT r.id, r.bank_id, f.frame_index, f.timestamp_ms, f.hash, f.quality
         FROM refs AS r CROSS JOIN frames AS f ON f.reference_id = r.id
         WHERE r.withdrawn_ms IS NULL",
    )?;
    let plan = stmt
        .query_map([], |r| r.get::<_, String>(3))?
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(plan.len(), 2, "{plan:?}");
    assert!(plan[0].starts_with("SCAN r"), "{plan:?}");
    assert!(
        plan[1].starts_with("SEARCH f USING PRIMARY KEY (reference_id=?)"),
        "{plan:?}"
    );
    Ok(())
}

#[tokio::test]
async fn concurrent_writes_get_distinct_ordered_sequence_numbers() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open_embedded(dir.path()).await?;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.create_org(&format!("org-{i}"), None).await
        }));
    }
    for task in tasks {
        task.await??;
    }
    let changes = store.changes_since(ChangeSeq(0), 1000).await?;
    let seqs: Vec<i64> = changes.iter().map(|c| c.seq.0).collect();
    assert_eq!(seqs, (1..=17).collect::<Vec<_>>());
    Ok(())
}

#[cfg(unix)]
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[cfg(unix)]
#[tokio::test]
async fn the_data_directory_is_0700_and_its_files_0600() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("new/data");
    let store = Store::open_embedded(&data).await?;
    add_one_reference(&store).await?;
    assert_eq!(mode_of(&data), 0o700);
    for name in [
        "framematch.sqlite3",
        "framematch.sqlite3-wal",
        "framematch.sqlite3-shm",
    ] {
        assert_eq!(mode_of(&data.join(name)), 0o600, "{name}");
    }
    drop(store);

    // Files an older version left world-readable are tightened at the next open; the
    // directory the operator made keeps its mode.
    use std::os::unix::fs::PermissionsExt;
    for name in ["framematch.sqlite3", "framematch.sqlite3-wal"] {
        let path = data.join(name);
        if path.exists() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        }
    }
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o750))?;
    let store = Store::open_embedded(&data).await?;
    assert_eq!(mode_of(&data), 0o750);
    assert_eq!(mode_of(&data.join("framematch.sqlite3")), 0o600);
    if data.join("framematch.sqlite3-wal").exists() {
        assert_eq!(mode_of(&data.join("framematch.sqlite3-wal")), 0o600);
    }
    drop(store);
    Ok(())
}
