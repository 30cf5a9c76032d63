//! The embedded backend: one SQLite file, `<data_dir>/framematch.sqlite3`, for a single replica
//! with nothing to install.
//!
//! Owns the schema (numbered migrations tracked in `PRAGMA user_version`), the SQL, and the
//! mapping between rows and the domain types of [`crate::model`]. Input has already been
//! validated by [`super::Store`]; this file only enforces what needs the database (existence,
//! uniqueness).
//!
//! Durability (shared/DESIGN.md §3, "durable before acknowledged"):
//! - `journal_mode=WAL` with `synchronous=FULL`: every commit fsyncs the write-ahead log before
//!   `COMMIT` returns, so a write whose method returned `Ok` survives `kill -9` and power loss.
//!   Both settings are read back at open and refused if they did not take.
//! - Every write runs in one `BEGIN IMMEDIATE` transaction on the single writer connection and
//!   appends exactly one row to `changes` inside it (the follow cursor, local bookkeeping,
//!   appends none). SQLite has one writer at a time and
//!   `changes.seq` is `AUTOINCREMENT`, so sequence numbers become visible strictly in order: a
//!   reader never sees seq `n + 1` before `n`, and a tailer never misses an entry.
//! - The data directory is fsynced after the database file is created, so the file's directory
//!   entry is durable too (SQLite syncs the directory for its `-wal` file itself).
//! - A write whose caller stops waiting (a cancelled future) still runs to completion on the
//!   blocking pool: it may commit without being acknowledged, never the reverse.
//!
//! Concurrency: two connections, each behind a `parking_lot::Mutex` and used only inside
//! `spawn_blocking`, so no lock is ever held across an `.await`. Writes use the writer; reads use
//! a `query_only` reader, which thanks to WAL reads a consistent snapshot without blocking or
//! being blocked by writes. A snapshot starts at the first read of a transaction, so a read that
//! starts after a write returned sees that write.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, Transaction, TransactionBehavior};

use super::{ActiveSignals, DEFAULT_ORG_NAME, Error, NewBank, StoreStats, rows};
use crate::model::{
    Actor, ApiKey, Bank, BankId, Change, ChangeKind, ChangeSeq, EmbeddingSpace, FrameEmbedding,
    FrameSignal, IndexedEmbedding, IndexedFrame, KeyId, NewApiKey, NewReference, OrgId,
    Organisation, Reference, ReferenceId, ReferenceState, Visibility, now_ms,
};

/// File name of the database inside the data directory.
pub const FILE_NAME: &str = "framematch.sqlite3";

/// How long a statement waits for a lock held by another connection before failing with
/// `SQLITE_BUSY`. Only another process opening the same file can hold one for long.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Most rows `load_active_frames` pre-allocates for, whatever the stored counts claim, so a
/// corrupt count cannot ask for an absurd allocation up front.
const MAX_PREALLOCATED_FRAMES: usize = 1 << 27;

/// Schema steps; step `i` (0-based) takes the schema from version `i` to `i + 1`. Append only:
/// never edit a step that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: the whole data model of shared/DESIGN.md §2.
    r"
CREATE TABLE organisations (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    created_ms  INTEGER NOT NULL
) STRICT;

-- Used by the authentication issue: the secret is shown once and stored only as a hash.
CREATE TABLE api_keys (
    id          INTEGER PRIMARY KEY,
    org_id      INTEGER NOT NULL REFERENCES organisations (id),
    role        TEXT    NOT NULL CHECK (role IN ('matcher', 'contributor', 'admin')),
    key_hash    BLOB    NOT NULL UNIQUE,
    created_ms  INTEGER NOT NULL,
    revoked_ms  INTEGER
) STRICT;
CREATE INDEX api_keys_by_org ON api_keys (org_id);

CREATE TABLE banks (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    category    TEXT    NOT NULL,
    owner_org   INTEGER NOT NULL REFERENCES organisations (id),
    visibility  TEXT    NOT NULL CHECK (visibility IN ('private', 'shared', 'public')),
    description TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL
) STRICT;
CREATE INDEX banks_by_owner ON banks (owner_org);

-- The organisations a bank with visibility 'shared' is shared with.
CREATE TABLE bank_shares (
    bank_id     INTEGER NOT NULL REFERENCES banks (id),
    org_id      INTEGER NOT NULL REFERENCES organisations (id),
    PRIMARY KEY (bank_id, org_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX bank_shares_by_org ON bank_shares (org_id);

-- 'references' is an SQL keyword, hence 'refs'. Active while withdrawn_ms IS NULL.
CREATE TABLE refs (
    id               INTEGER PRIMARY KEY,
    bank_id          INTEGER NOT NULL REFERENCES banks (id),
    external_id      TEXT    NOT NULL,
    note             TEXT    NOT NULL,
    added_by         INTEGER NOT NULL REFERENCES organisations (id),
    added_ms         INTEGER NOT NULL,
    frame_count      INTEGER NOT NULL CHECK (frame_count >= 0),
    withdrawn_ms     INTEGER,
    withdrawn_reason TEXT,
    CHECK ((withdrawn_ms IS NULL) = (withdrawn_reason IS NULL))
) STRICT;
CREATE INDEX refs_by_bank_state ON refs (bank_id, withdrawn_ms);

-- Clustered by reference: one reference's frames are contiguous, which makes the start-up load a
-- sequential read, and the primary key is the per-reference exact-hash deduplication.
CREATE TABLE frames (
    reference_id INTEGER NOT NULL REFERENCES refs (id),
    hash         BLOB    NOT NULL CHECK (length(hash) = 32),
    frame_index  INTEGER NOT NULL CHECK (frame_index BETWEEN 0 AND 4294967295),
    timestamp_ms INTEGER NOT NULL CHECK (timestamp_ms >= 0),
    quality      INTEGER NOT NULL CHECK (quality BETWEEN 0 AND 100),
    PRIMARY KEY (reference_id, hash)
) STRICT, WITHOUT ROWID;

-- The append-only change log. AUTOINCREMENT: a sequence number is never reused.
CREATE TABLE changes (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT    NOT NULL CHECK (kind IN
                     ('org_created', 'bank_created', 'reference_added', 'reference_withdrawn')),
    org_id       INTEGER REFERENCES organisations (id),
    bank_id      INTEGER REFERENCES banks (id),
    reference_id INTEGER REFERENCES refs (id),
    actor        INTEGER NOT NULL REFERENCES organisations (id),
    at_ms        INTEGER NOT NULL
) STRICT;
",
    // 2: issue #4: key labels; the acting key, the key concerned and a detail on every change,
    // with the kinds bank_updated, key_created and key_revoked; partner mirroring bookkeeping.
    r"
ALTER TABLE api_keys ADD COLUMN label TEXT NOT NULL DEFAULT '';

-- SQLite cannot change a CHECK constraint in place: rebuild the log. Every seq is copied, and
-- so is the AUTOINCREMENT high-water mark in sqlite_sequence (DROP TABLE deletes the old
-- table's entry, RENAME carries the new one's over), so no sequence number is ever reused.
CREATE TABLE changes_v2 (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT    NOT NULL CHECK (kind IN
                     ('org_created', 'bank_created', 'reference_added', 'reference_withdrawn',
                      'bank_updated', 'key_created', 'key_revoked')),
    org_id       INTEGER REFERENCES organisations (id),
    bank_id      INTEGER REFERENCES banks (id),
    reference_id INTEGER REFERENCES refs (id),
    -- The key a key_created or key_revoked change concerns.
    key_id       INTEGER REFERENCES api_keys (id),
    actor        INTEGER NOT NULL REFERENCES organisations (id),
    -- The key the actor used; NULL for the server itself.
    actor_key    INTEGER REFERENCES api_keys (id),
    detail       TEXT    NOT NULL DEFAULT '',
    at_ms        INTEGER NOT NULL
) STRICT;
INSERT INTO changes_v2 (seq, kind, org_id, bank_id, reference_id, actor, at_ms)
    SELECT seq, kind, org_id, bank_id, reference_id, actor, at_ms FROM changes ORDER BY seq;
DELETE FROM sqlite_sequence WHERE name = 'changes_v2';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'changes_v2', seq FROM sqlite_sequence WHERE name = 'changes';
DROP TABLE changes;
ALTER TABLE changes_v2 RENAME TO changes;
-- The audit trail of one bank.
CREATE INDEX changes_by_bank ON changes (bank_id, seq);

-- How far each followed partner feed has been mirrored.
CREATE TABLE follows (
    source      TEXT    PRIMARY KEY,
    cursor      INTEGER NOT NULL CHECK (cursor >= 0),
    updated_ms  INTEGER NOT NULL
) STRICT;

-- Which local bank mirrors which bank of a partner feed.
CREATE TABLE mirrored_banks (
    source      TEXT    NOT NULL,
    remote_id   INTEGER NOT NULL,
    bank_id     INTEGER NOT NULL UNIQUE REFERENCES banks (id),
    PRIMARY KEY (source, remote_id)
) STRICT, WITHOUT ROWID;

-- Which local reference mirrors which reference of a partner feed.
CREATE TABLE mirrored_refs (
    source       TEXT    NOT NULL,
    remote_id    INTEGER NOT NULL,
    reference_id INTEGER NOT NULL UNIQUE REFERENCES refs (id),
    PRIMARY KEY (source, remote_id)
) STRICT, WITHOUT ROWID;
",
    // 3: issue #11: embedding spaces (server-wide: one name, one dimension and metric), the
    // spaces each bank declares with its threshold, and the vectors of reference frames.
    r"
CREATE TABLE embedding_spaces (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    dimension   INTEGER NOT NULL CHECK (dimension BETWEEN 1 AND 4096),
    metric      TEXT    NOT NULL CHECK (metric IN ('cosine', 'dot'))
) STRICT;

CREATE TABLE bank_spaces (
    bank_id     INTEGER NOT NULL REFERENCES banks (id),
    space_id    INTEGER NOT NULL REFERENCES embedding_spaces (id),
    threshold   REAL    NOT NULL,
    PRIMARY KEY (bank_id, space_id)
) STRICT, WITHOUT ROWID;

-- Clustered by reference, as frames. vector: dimension f16 values, little-endian.
CREATE TABLE embeddings (
    reference_id INTEGER NOT NULL REFERENCES refs (id),
    space_id     INTEGER NOT NULL REFERENCES embedding_spaces (id),
    frame_index  INTEGER NOT NULL CHECK (frame_index BETWEEN 0 AND 4294967295),
    timestamp_ms INTEGER NOT NULL CHECK (timestamp_ms >= 0),
    vector       BLOB    NOT NULL,
    PRIMARY KEY (reference_id, space_id, frame_index)
) STRICT, WITHOUT ROWID;
",
    // 4: issue #11 item 2: each space's vector index settings, in their text form
    // (`m=16,ef_construction=128,ef_search=64,graph_min=20000`), written when the space is
    // created. NULL for the spaces created before: they are indexed with the defaults.
    r"
ALTER TABLE embedding_spaces ADD COLUMN index_params TEXT;
",
];

/// The SQLite backend. Cheap to clone: every clone shares the same connections.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// The only connection that writes. Every write is one `BEGIN IMMEDIATE` transaction.
    writer: Mutex<Connection>,
    /// `query_only`: reads never wait for the writer's lock, nor it for theirs.
    reader: Mutex<Connection>,
    /// Created at first open and never renamed or deleted, so it is read once.
    default_org: OrgId,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .field("default_org", &self.inner.default_org)
            .finish_non_exhaustive()
    }
}

// === impl EmbeddedStore ===

impl EmbeddedStore {
    /// See [`super::Store::open_embedded`].
    pub(super) async fn open(data_dir: &Path) -> Result<Self, Error> {
        let data_dir = data_dir.to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(&data_dir))
            .await
            .map_err(Error::TaskFailed)?
    }

    fn open_blocking(data_dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(data_dir).map_err(|source| Error::Io {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(FILE_NAME);

        let mut writer = Connection::open(&path)?;
        configure(&writer)?;
        migrate(&mut writer)?;
        let default_org = ensure_default_org(&mut writer)?;
        sync_dir(data_dir)?;

        // Opened after the writer has made the file WAL and migrated it.
        let reader = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )?;
        configure(&reader)?;
        reader.execute_batch("PRAGMA query_only = ON")?;

        tracing::info!(path = %path.display(), schema_version = MIGRATIONS.len(), "store opened");
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                writer: Mutex::new(writer),
                reader: Mutex::new(reader),
                default_org,
            }),
        })
    }

    /// `sqlite:<path>`.
    pub(super) fn describe(&self) -> String {
        format!("sqlite:{}", self.inner.path.display())
    }

    /// The default organisation's id, read at open.
    pub(super) fn default_org(&self) -> OrgId {
        self.inner.default_org
    }

    /// Runs `op` in one `BEGIN IMMEDIATE` transaction on the writer and commits it. Rolled back
    /// (by drop) when `op` fails. Durable before acknowledged: with `synchronous=FULL` the WAL is
    /// fsynced before `commit` returns, and only then does this return `Ok`.
    async fn write<T, F>(&self, op: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, Error> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.writer.lock();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = op(&tx)?;
            tx.commit()?;
            Ok(value)
        })
        .await
        .map_err(Error::TaskFailed)?
    }

    /// Runs `op` in one read transaction on the reader: every statement in it sees the same
    /// snapshot.
    async fn read<T, F>(&self, op: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, Error> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.reader.lock();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
            let value = op(&tx)?;
            tx.commit()?;
            Ok(value)
        })
        .await
        .map_err(Error::TaskFailed)?
    }

    /// See [`super::Store::create_org`].
    pub(super) async fn create_org(
        &self,
        name: String,
        actor: Option<Actor>,
    ) -> Result<Organisation, Error> {
        self.write(move |tx| insert_org(tx, name, actor)).await
    }

    /// See [`super::Store::list_orgs`].
    pub(super) async fn list_orgs(&self) -> Result<Vec<Organisation>, Error> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached("SELECT id, name FROM organisations ORDER BY id")?;
            let orgs = stmt
                .query_map([], |row| {
                    Ok(Organisation {
                        id: OrgId(row.get(0)?),
                        name: row.get(1)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(orgs)
        })
        .await
    }

    /// See [`super::Store::create_bank`]. `new` is validated and its share list normalised.
    pub(super) async fn create_bank(&self, new: NewBank, actor: Actor) -> Result<Bank, Error> {
        self.write(move |tx| insert_bank(tx, new, actor)).await
    }

    /// See [`super::Store::list_banks`].
    pub(super) async fn list_banks(&self) -> Result<Vec<Bank>, Error> {
        self.read(|tx| {
            let mut shares: std::collections::HashMap<i64, Vec<OrgId>> =
                std::collections::HashMap::new();
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT bank_id, org_id FROM bank_shares ORDER BY bank_id, org_id",
                )?;
                let mut rows = stmt.query([])?;
                while let Some(row) = rows.next()? {
                    shares
                        .entry(row.get(0)?)
                        .or_default()
                        .push(OrgId(row.get(1)?));
                }
            }
            let mut spaces = all_bank_spaces(tx)?;
            let mut stmt = tx.prepare_cached(&format!("{BANK_SELECT} ORDER BY id"))?;
            let raw = stmt
                .query_map([], BankRow::from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            raw.into_iter()
                .map(|bank| {
                    let orgs = shares.remove(&bank.id).unwrap_or_default();
                    let bank_spaces = spaces.remove(&bank.id).unwrap_or_default();
                    bank.into_bank(orgs, bank_spaces)
                })
                .collect()
        })
        .await
    }

    /// See [`super::Store::get_bank`].
    pub(super) async fn get_bank(&self, id: BankId) -> Result<Bank, Error> {
        self.read(move |tx| read_bank(tx, id)).await
    }

    /// See [`super::Store::bank_by_name`].
    pub(super) async fn bank_by_name(&self, name: String) -> Result<Bank, Error> {
        self.read(move |tx| {
            let raw = tx
                .prepare_cached(&format!("{BANK_SELECT} WHERE name = ?1"))?
                .query_row([&name], BankRow::from_row)
                .optional()?
                .ok_or(Error::NotFound {
                    kind: "bank",
                    key: name,
                })?;
            finish_bank(tx, raw)
        })
        .await
    }

    /// See [`super::Store::add_reference`]. `new.frames` is validated, non-empty and already
    /// deduplicated.
    pub(super) async fn add_reference(
        &self,
        new: NewReference,
        actor: Actor,
    ) -> Result<Reference, Error> {
        self.write(move |tx| insert_reference(tx, new, actor)).await
    }

    /// See [`super::Store::withdraw_reference`]. `reason` is validated.
    pub(super) async fn withdraw_reference(
        &self,
        id: ReferenceId,
        reason: String,
        actor: Actor,
    ) -> Result<Reference, Error> {
        self.write(move |tx| {
            let (bank, withdrawn): (i64, bool) = tx
                .prepare_cached("SELECT bank_id, withdrawn_ms IS NOT NULL FROM refs WHERE id = ?1")?
                .query_row([id.0], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?
                .ok_or_else(|| Error::NotFound {
                    kind: "reference",
                    key: id.to_string(),
                })?;
            if withdrawn {
                return Err(Error::AlreadyWithdrawn { reference: id });
            }
            require_actor(tx, actor)?;
            let at_ms = now_ms();
            tx.prepare_cached(
                "UPDATE refs SET withdrawn_ms = ?2, withdrawn_reason = ?3 WHERE id = ?1",
            )?
            .execute((id.0, at_ms, &reason))?;
            append_change(
                tx,
                &ChangeKind::ReferenceWithdrawn {
                    reference: id,
                    bank: BankId(bank),
                },
                actor,
                &reason,
                at_ms,
            )?;
            read_reference(tx, id)
        })
        .await
    }

    /// See [`super::Store::update_bank_visibility`]. `visibility` is normalised.
    pub(super) async fn update_bank_visibility(
        &self,
        bank: BankId,
        visibility: Visibility,
        actor: Actor,
    ) -> Result<Bank, Error> {
        self.write(move |tx| {
            require_bank(tx, bank)?;
            let shares: &[OrgId] = match &visibility {
                Visibility::SharedWith(orgs) => orgs,
                Visibility::Private | Visibility::Public => &[],
            };
            for &org in shares {
                require_org(tx, org)?;
            }
            require_actor(tx, actor)?;
            tx.prepare_cached("UPDATE banks SET visibility = ?2 WHERE id = ?1")?
                .execute((bank.0, rows::visibility_text(&visibility)))?;
            tx.prepare_cached("DELETE FROM bank_shares WHERE bank_id = ?1")?
                .execute([bank.0])?;
            insert_shares(tx, bank, shares)?;
            append_change(
                tx,
                &ChangeKind::BankUpdated(bank),
                actor,
                &rows::visibility_detail(&visibility),
                now_ms(),
            )?;
            read_bank(tx, bank)
        })
        .await
    }

    /// See [`super::Store::create_api_key`]. The label is validated.
    pub(super) async fn create_api_key(
        &self,
        new: NewApiKey,
        actor: Actor,
    ) -> Result<ApiKey, Error> {
        self.write(move |tx| {
            require_org(tx, new.org)?;
            require_actor(tx, actor)?;
            let created_ms = now_ms();
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO api_keys (org_id, role, key_hash, label, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute((
                    new.org.0,
                    new.role.as_str(),
                    new.digest.as_slice(),
                    &new.label,
                    created_ms,
                ));
            match inserted {
                Ok(_) => {}
                Err(err) if is_unique_violation(&err) => {
                    return Err(Error::AlreadyExists {
                        kind: "api key",
                        key: "with this digest".to_string(),
                    });
                }
                Err(err) => return Err(err.into()),
            }
            let id = KeyId(tx.last_insert_rowid());
            append_change(
                tx,
                &ChangeKind::KeyCreated {
                    key: id,
                    org: new.org,
                },
                actor,
                &rows::key_detail(new.role, &new.label),
                created_ms,
            )?;
            Ok(ApiKey {
                id,
                org: new.org,
                role: new.role,
                digest: new.digest,
                label: new.label,
                created_ms,
                revoked_ms: None,
            })
        })
        .await
    }

    /// See [`super::Store::revoke_api_key`].
    pub(super) async fn revoke_api_key(&self, id: KeyId, actor: Actor) -> Result<ApiKey, Error> {
        self.write(move |tx| {
            let key = read_api_key(tx, id)?;
            if key.revoked_ms.is_some() {
                return Err(Error::AlreadyRevoked { key: id });
            }
            require_actor(tx, actor)?;
            let at_ms = now_ms();
            tx.prepare_cached("UPDATE api_keys SET revoked_ms = ?2 WHERE id = ?1")?
                .execute((id.0, at_ms))?;
            append_change(
                tx,
                &ChangeKind::KeyRevoked {
                    key: id,
                    org: key.org,
                },
                actor,
                &rows::key_detail(key.role, &key.label),
                at_ms,
            )?;
            Ok(ApiKey {
                revoked_ms: Some(at_ms),
                ..key
            })
        })
        .await
    }

    /// See [`super::Store::get_api_key`].
    pub(super) async fn get_api_key(&self, id: KeyId) -> Result<ApiKey, Error> {
        self.read(move |tx| read_api_key(tx, id)).await
    }

    /// See [`super::Store::list_api_keys`].
    pub(super) async fn list_api_keys(&self) -> Result<Vec<ApiKey>, Error> {
        self.read(|tx| {
            tx.prepare_cached(&format!("{KEY_SELECT} ORDER BY id"))?
                .query_map([], KeyRow::from_row)?
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .map(KeyRow::into_key)
                .collect()
        })
        .await
    }

    /// See [`super::Store::follow_cursor`].
    pub(super) async fn follow_cursor(&self, source: String) -> Result<ChangeSeq, Error> {
        self.read(move |tx| {
            let cursor: Option<i64> = tx
                .prepare_cached("SELECT cursor FROM follows WHERE source = ?1")?
                .query_row([&source], |row| row.get(0))
                .optional()?;
            Ok(ChangeSeq(cursor.unwrap_or(0)))
        })
        .await
    }

    /// See [`super::Store::set_follow_cursor`]. `seq` is not negative.
    pub(super) async fn set_follow_cursor(
        &self,
        source: String,
        seq: ChangeSeq,
    ) -> Result<(), Error> {
        self.write(move |tx| {
            tx.prepare_cached(
                "INSERT INTO follows (source, cursor, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (source) DO UPDATE
                     SET cursor = excluded.cursor, updated_ms = excluded.updated_ms",
            )?
            .execute((&source, seq.0, now_ms()))?;
            Ok(())
        })
        .await
    }

    /// See [`super::Store::mirrored_bank`].
    pub(super) async fn mirrored_bank(
        &self,
        source: String,
        remote_id: i64,
    ) -> Result<Option<Bank>, Error> {
        self.read(move |tx| {
            mirrored_bank_id(tx, &source, remote_id)?
                .map(|bank| read_bank(tx, bank))
                .transpose()
        })
        .await
    }

    /// See [`super::Store::create_mirrored_bank`]. `new` is validated and normalised.
    pub(super) async fn create_mirrored_bank(
        &self,
        source: String,
        remote_id: i64,
        new: NewBank,
        actor: Actor,
    ) -> Result<Bank, Error> {
        self.write(move |tx| {
            if let Some(existing) = mirrored_bank_id(tx, &source, remote_id)? {
                return read_bank(tx, existing);
            }
            let bank = insert_bank(tx, new, actor)?;
            tx.prepare_cached(
                "INSERT INTO mirrored_banks (source, remote_id, bank_id) VALUES (?1, ?2, ?3)",
            )?
            .execute((&source, remote_id, bank.id.0))?;
            Ok(bank)
        })
        .await
    }

    /// See [`super::Store::mirrored_reference`].
    pub(super) async fn mirrored_reference(
        &self,
        source: String,
        remote_id: i64,
    ) -> Result<Option<ReferenceId>, Error> {
        self.read(move |tx| mirrored_reference_id(tx, &source, remote_id))
            .await
    }

    /// See [`super::Store::add_mirrored_reference`]. `new` is validated and its frames
    /// deduplicated.
    pub(super) async fn add_mirrored_reference(
        &self,
        source: String,
        remote_id: i64,
        new: NewReference,
        actor: Actor,
    ) -> Result<(Reference, bool), Error> {
        self.write(move |tx| {
            if let Some(existing) = mirrored_reference_id(tx, &source, remote_id)? {
                return Ok((read_reference(tx, existing)?, false));
            }
            let reference = insert_reference(tx, new, actor)?;
            tx.prepare_cached(
                "INSERT INTO mirrored_refs (source, remote_id, reference_id) VALUES (?1, ?2, ?3)",
            )?
            .execute((&source, remote_id, reference.id.0))?;
            Ok((reference, true))
        })
        .await
    }

    /// See [`super::Store::get_reference`].
    pub(super) async fn get_reference(&self, id: ReferenceId) -> Result<Reference, Error> {
        self.read(move |tx| read_reference(tx, id)).await
    }

    /// See [`super::Store::list_references`].
    pub(super) async fn list_references(
        &self,
        bank: BankId,
        include_withdrawn: bool,
    ) -> Result<Vec<Reference>, Error> {
        self.read(move |tx| {
            require_bank(tx, bank)?;
            let mut stmt = tx.prepare_cached(&format!(
                "{REF_SELECT} WHERE bank_id = ?1 AND (?2 OR withdrawn_ms IS NULL) ORDER BY id"
            ))?;
            let mut rows = stmt.query((bank.0, include_withdrawn))?;
            let mut references = Vec::new();
            while let Some(row) = rows.next()? {
                references.push(reference_from_row(row)?);
            }
            Ok(references)
        })
        .await
    }

    /// See [`super::Store::reference_frames`].
    pub(super) async fn reference_frames(
        &self,
        id: ReferenceId,
    ) -> Result<Vec<FrameSignal>, Error> {
        self.read(move |tx| {
            reference_exists(tx, id)?;
            let mut stmt = tx.prepare_cached(
                "SELECT frame_index, timestamp_ms, hash, quality FROM frames
                 WHERE reference_id = ?1 ORDER BY frame_index",
            )?;
            let mut rows = stmt.query([id.0])?;
            let mut frames = Vec::new();
            while let Some(row) = rows.next()? {
                frames.push(frame_from_row(row, 0, id)?);
            }
            Ok(frames)
        })
        .await
    }

    /// See [`super::Store::reference_embeddings`].
    pub(super) async fn reference_embeddings(
        &self,
        id: ReferenceId,
    ) -> Result<Vec<FrameEmbedding>, Error> {
        self.read(move |tx| {
            reference_exists(tx, id)?;
            let mut stmt = tx.prepare_cached(
                "SELECT e.frame_index, e.timestamp_ms, s.name, s.dimension, e.vector
                 FROM embeddings AS e JOIN embedding_spaces AS s ON s.id = e.space_id
                 WHERE e.reference_id = ?1 ORDER BY s.name, e.frame_index",
            )?;
            let mut rows = stmt.query([id.0])?;
            let mut embeddings = Vec::new();
            while let Some(row) = rows.next()? {
                embeddings.push(embedding_from_row(row, 0, id)?);
            }
            Ok(embeddings)
        })
        .await
    }

    /// See [`super::Store::load_active`]. One read transaction: the frames, the vectors and the
    /// sequence number come from the same snapshot. Each is one prepared join, driven by `refs`
    /// (few rows) into the `frames` or `embeddings` primary key (each reference's rows
    /// contiguous), so the scans are close to sequential; the frame vector is sized up front.
    pub(super) async fn load_active(&self) -> Result<ActiveSignals, Error> {
        self.read(|tx| {
            let declared: i64 = tx.query_row(
                "SELECT COALESCE(SUM(frame_count), 0) FROM refs WHERE withdrawn_ms IS NULL",
                [],
                |row| row.get(0),
            )?;
            let seq = last_seq(tx)?;
            let declared = usize::try_from(declared).map_err(|_| Error::Corrupt {
                detail: format!("active references declare {declared} frames"),
            })?;
            let mut frames = Vec::with_capacity(declared.min(MAX_PREALLOCATED_FRAMES));
            // CROSS JOIN pins refs as the outer loop (SQLite never reorders a CROSS JOIN).
            let mut stmt = tx.prepare(
                "SELECT r.id, r.bank_id, f.frame_index, f.timestamp_ms, f.hash, f.quality
                 FROM refs AS r CROSS JOIN frames AS f ON f.reference_id = r.id
                 WHERE r.withdrawn_ms IS NULL",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let reference = ReferenceId(row.get(0)?);
                frames.push(IndexedFrame {
                    reference,
                    bank: BankId(row.get(1)?),
                    frame: frame_from_row(row, 2, reference)?,
                });
            }
            if frames.len() != declared {
                return Err(Error::Corrupt {
                    detail: format!(
                        "active references declare {declared} frames but {} are stored",
                        frames.len()
                    ),
                });
            }
            let mut embeddings = Vec::new();
            let mut stmt = tx.prepare(
                "SELECT r.id, r.bank_id, e.frame_index, e.timestamp_ms, s.name, s.dimension,
                        e.vector
                 FROM refs AS r CROSS JOIN embeddings AS e ON e.reference_id = r.id
                 JOIN embedding_spaces AS s ON s.id = e.space_id
                 WHERE r.withdrawn_ms IS NULL",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let reference = ReferenceId(row.get(0)?);
                embeddings.push(IndexedEmbedding {
                    reference,
                    bank: BankId(row.get(1)?),
                    embedding: embedding_from_row(row, 2, reference)?,
                });
            }
            Ok(ActiveSignals {
                frames,
                embeddings,
                seq,
            })
        })
        .await
    }

    /// See [`super::Store::changes_since`].
    pub(super) async fn changes_since(
        &self,
        after: ChangeSeq,
        limit: usize,
    ) -> Result<Vec<Change>, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |tx| {
            let mut stmt = tx.prepare_cached(&format!(
                "{CHANGE_SELECT} WHERE seq > ?1 ORDER BY seq LIMIT ?2"
            ))?;
            let mut rows = stmt.query((after.0, limit))?;
            let mut changes = Vec::new();
            while let Some(row) = rows.next()? {
                changes.push(change_from_row(row)?);
            }
            Ok(changes)
        })
        .await
    }

    /// See [`super::Store::audit`].
    pub(super) async fn audit(
        &self,
        bank: Option<BankId>,
        after: ChangeSeq,
        limit: usize,
    ) -> Result<Vec<Change>, Error> {
        let Some(bank) = bank else {
            return self.changes_since(after, limit).await;
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |tx| {
            require_bank(tx, bank)?;
            let mut stmt = tx.prepare_cached(&format!(
                "{CHANGE_SELECT} WHERE bank_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
            ))?;
            let mut rows = stmt.query((bank.0, after.0, limit))?;
            let mut changes = Vec::new();
            while let Some(row) = rows.next()? {
                changes.push(change_from_row(row)?);
            }
            Ok(changes)
        })
        .await
    }

    /// See [`super::Store::last_seq`].
    pub(super) async fn last_seq(&self) -> Result<ChangeSeq, Error> {
        self.read(|tx| last_seq(tx)).await
    }

    /// See [`super::Store::stats`].
    pub(super) async fn stats(&self) -> Result<StoreStats, Error> {
        self.read(|tx| {
            let counts: [i64; 7] = tx.query_row(
                "SELECT (SELECT COUNT(*) FROM organisations),
                        (SELECT COUNT(*) FROM banks),
                        (SELECT COUNT(*) FROM refs WHERE withdrawn_ms IS NULL),
                        (SELECT COUNT(*) FROM refs WHERE withdrawn_ms IS NOT NULL),
                        (SELECT COALESCE(SUM(frame_count), 0) FROM refs),
                        (SELECT COALESCE(MAX(seq), 0) FROM changes),
                        (SELECT COUNT(*) FROM api_keys WHERE revoked_ms IS NULL)",
                [],
                |row| {
                    Ok([
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                        row.get(5)?,
                        row.get(6)?,
                    ])
                },
            )?;
            let count = |value: i64| {
                u64::try_from(value).map_err(|_| Error::Corrupt {
                    detail: format!("negative count {value}"),
                })
            };
            Ok(StoreStats {
                organisations: count(counts[0])?,
                banks: count(counts[1])?,
                active_references: count(counts[2])?,
                withdrawn_references: count(counts[3])?,
                frames: count(counts[4])?,
                api_keys: count(counts[6])?,
                last_seq: ChangeSeq(counts[5]),
            })
        })
        .await
    }
}

// === connection set-up ===

/// Per-connection settings the durability guarantee depends on, each read back.
/// [`Error::NotFound`] unless reference `id` exists.
fn reference_exists(tx: &Transaction<'_>, id: ReferenceId) -> Result<(), Error> {
    if tx
        .prepare_cached("SELECT 1 FROM refs WHERE id = ?1")?
        .exists([id.0])?
    {
        Ok(())
    } else {
        Err(Error::NotFound {
            kind: "reference",
            key: id.to_string(),
        })
    }
}

fn configure(conn: &Connection) -> Result<(), Error> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::PragmaNotApplied {
            pragma: "journal_mode",
            expected: "wal",
            actual: mode,
        });
    }
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
    // synchronous: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA.
    let synchronous: i64 = conn.pragma_query_value(None, "synchronous", |row| row.get(0))?;
    if synchronous != 2 {
        return Err(Error::PragmaNotApplied {
            pragma: "synchronous",
            expected: "2 (full)",
            actual: synchronous.to_string(),
        });
    }
    let foreign_keys: i64 = conn.pragma_query_value(None, "foreign_keys", |row| row.get(0))?;
    if foreign_keys != 1 {
        return Err(Error::PragmaNotApplied {
            pragma: "foreign_keys",
            expected: "1 (on)",
            actual: foreign_keys.to_string(),
        });
    }
    Ok(())
}

/// The schema version this binary creates and understands.
fn supported_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).expect("the migration list is a handful of entries")
}

/// Applies the pending migrations in one transaction; a no-op when the schema is current.
fn migrate(conn: &mut Connection) -> Result<(), Error> {
    let supported = supported_version();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > supported {
        return Err(Error::SchemaTooNew { found, supported });
    }
    let done = usize::try_from(found).map_err(|_| Error::Corrupt {
        detail: format!("negative schema version {found}"),
    })?;
    if done == MIGRATIONS.len() {
        return Ok(());
    }
    for (step, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        tracing::info!(from = step, to = step + 1, "applying store migration");
        tx.execute_batch(sql)?;
    }
    // user_version lives in the database header, so it commits atomically with the steps.
    tx.pragma_update(None, "user_version", supported)?;
    tx.commit()?;
    Ok(())
}

/// Finds or creates the organisation named [`DEFAULT_ORG_NAME`].
fn ensure_default_org(conn: &mut Connection) -> Result<OrgId, Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let existing: Option<i64> = tx
        .query_row(
            "SELECT id FROM organisations WHERE name = ?1",
            [DEFAULT_ORG_NAME],
            |row| row.get(0),
        )
        .optional()?;
    let id = match existing {
        Some(id) => OrgId(id),
        None => {
            let org = insert_org(&tx, DEFAULT_ORG_NAME.to_string(), None)?;
            tracing::info!(org = %org.id, name = DEFAULT_ORG_NAME, "created default organisation");
            org.id
        }
    };
    tx.commit()?;
    Ok(id)
}

/// Makes the database file's directory entry durable. SQLite syncs the directory for the `-wal`
/// file it creates, not for the main file.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), Error> {
    std::fs::File::open(dir)
        .and_then(|file| file.sync_all())
        .map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Directories cannot be opened as files here; NTFS journals the directory entry itself.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), Error> {
    Ok(())
}

// === rows <-> domain ===

fn is_unique_violation(err: &rusqlite::Error) -> bool {
    err.sqlite_error()
        .is_some_and(|e| e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

/// Inserts an organisation and its change entry, naming `actor`, or without one the new
/// organisation itself.
fn insert_org(
    tx: &Transaction<'_>,
    name: String,
    actor: Option<Actor>,
) -> Result<Organisation, Error> {
    if let Some(actor) = actor {
        require_actor(tx, actor)?;
    }
    let created_ms = now_ms();
    let inserted = tx
        .prepare_cached("INSERT INTO organisations (name, created_ms) VALUES (?1, ?2)")?
        .execute((&name, created_ms));
    match inserted {
        Ok(_) => {}
        Err(err) if is_unique_violation(&err) => {
            return Err(Error::AlreadyExists {
                kind: "organisation",
                key: name,
            });
        }
        Err(err) => return Err(err.into()),
    }
    let id = OrgId(tx.last_insert_rowid());
    let actor = actor.unwrap_or(Actor::system(id));
    append_change(tx, &ChangeKind::OrgCreated(id), actor, "", created_ms)?;
    Ok(Organisation { id, name })
}

/// Inserts a bank with its shares and its change entry. `new` is validated and normalised.
fn insert_bank(tx: &Transaction<'_>, new: NewBank, actor: Actor) -> Result<Bank, Error> {
    require_org(tx, new.owner)?;
    let shares: &[OrgId] = match &new.visibility {
        Visibility::SharedWith(orgs) => orgs,
        Visibility::Private | Visibility::Public => &[],
    };
    for &org in shares {
        require_org(tx, org)?;
    }
    require_actor(tx, actor)?;
    let created_ms = now_ms();
    let inserted = tx
        .prepare_cached(
            "INSERT INTO banks
                 (name, category, owner_org, visibility, description, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute((
            &new.name,
            new.category.as_str(),
            new.owner.0,
            rows::visibility_text(&new.visibility),
            &new.description,
            created_ms,
        ));
    match inserted {
        Ok(_) => {}
        Err(err) if is_unique_violation(&err) => {
            return Err(Error::AlreadyExists {
                kind: "bank",
                key: new.name,
            });
        }
        Err(err) => return Err(err.into()),
    }
    let id = BankId(tx.last_insert_rowid());
    insert_shares(tx, id, shares)?;
    let embedding_spaces = insert_bank_spaces(tx, id, &new.embedding_spaces)?;
    append_change(tx, &ChangeKind::BankCreated(id), actor, "", created_ms)?;
    Ok(Bank {
        id,
        name: new.name,
        category: new.category,
        owner: new.owner,
        visibility: new.visibility,
        description: new.description,
        created_ms,
        embedding_spaces,
    })
}

/// Declares `spaces` for `bank`: each space is created on first use, with its index settings;
/// one that exists must have the same dimension and metric ([`Error::SpaceConflict`]) and keeps
/// its settings. The spaces as declared: each with the settings its index has.
fn insert_bank_spaces(
    conn: &Connection,
    bank: BankId,
    spaces: &[EmbeddingSpace],
) -> Result<Vec<EmbeddingSpace>, Error> {
    let mut declared = Vec::with_capacity(spaces.len());
    for space in spaces {
        conn.prepare_cached(
            "INSERT INTO embedding_spaces (name, dimension, metric, index_params)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO NOTHING",
        )?
        .execute((
            &space.name,
            space.dimension,
            space.metric.as_str(),
            space.index.map(|params| params.to_string()),
        ))?;
        let (space_id, dimension, metric, index): (i64, i64, String, Option<String>) = conn
            .prepare_cached(
                "SELECT id, dimension, metric, index_params FROM embedding_spaces WHERE name = ?1",
            )?
            .query_row([&space.name], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })?;
        let stored = rows::space(
            bank.0,
            space.name.clone(),
            dimension,
            &metric,
            space.threshold,
            index.as_deref(),
        )?;
        if stored.dimension != space.dimension || stored.metric != space.metric {
            return Err(Error::SpaceConflict {
                space: space.name.clone(),
                dimension: stored.dimension,
                metric: stored.metric,
                asked_dimension: space.dimension,
                asked_metric: space.metric,
            });
        }
        conn.prepare_cached(
            "INSERT INTO bank_spaces (bank_id, space_id, threshold) VALUES (?1, ?2, ?3)",
        )?
        .execute((bank.0, space_id, f64::from(space.threshold)))?;
        declared.push(stored);
    }
    Ok(declared)
}

/// The spaces of every bank, by bank id, each bank's sorted by name.
fn all_bank_spaces(
    conn: &Connection,
) -> Result<std::collections::HashMap<i64, Vec<EmbeddingSpace>>, Error> {
    let mut spaces: std::collections::HashMap<i64, Vec<EmbeddingSpace>> =
        std::collections::HashMap::new();
    let mut stmt = conn.prepare_cached(
        "SELECT b.bank_id, s.name, s.dimension, s.metric, b.threshold, s.index_params
         FROM bank_spaces AS b JOIN embedding_spaces AS s ON s.id = b.space_id
         ORDER BY b.bank_id, s.name",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let bank: i64 = row.get(0)?;
        let metric: String = row.get(3)?;
        let threshold: f64 = row.get(4)?;
        let index: Option<String> = row.get(5)?;
        let space = rows::space(
            bank,
            row.get(1)?,
            row.get(2)?,
            &metric,
            threshold as f32,
            index.as_deref(),
        )?;
        spaces.entry(bank).or_default().push(space);
    }
    Ok(spaces)
}

/// The spaces of one bank, sorted by name.
fn bank_spaces(conn: &Connection, bank: i64) -> Result<Vec<EmbeddingSpace>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT s.name, s.dimension, s.metric, b.threshold, s.index_params
         FROM bank_spaces AS b JOIN embedding_spaces AS s ON s.id = b.space_id
         WHERE b.bank_id = ?1 ORDER BY s.name",
    )?;
    let mut rows = stmt.query([bank])?;
    let mut spaces = Vec::new();
    while let Some(row) = rows.next()? {
        let metric: String = row.get(2)?;
        let threshold: f64 = row.get(3)?;
        let index: Option<String> = row.get(4)?;
        spaces.push(rows::space(
            bank,
            row.get(0)?,
            row.get(1)?,
            &metric,
            threshold as f32,
            index.as_deref(),
        )?);
    }
    Ok(spaces)
}

/// Inserts a reference's vectors. They are validated against the bank's spaces (which never
/// change), so every space named exists.
fn insert_embeddings(
    tx: &Transaction<'_>,
    reference: ReferenceId,
    embeddings: &[FrameEmbedding],
) -> Result<(), Error> {
    if embeddings.is_empty() {
        return Ok(());
    }
    let mut ids: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    let mut insert = tx.prepare_cached(
        "INSERT INTO embeddings (reference_id, space_id, frame_index, timestamp_ms, vector)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for embedding in embeddings {
        let space_id = match ids.get(embedding.space.as_str()) {
            Some(id) => *id,
            None => {
                let id: i64 = tx
                    .prepare_cached("SELECT id FROM embedding_spaces WHERE name = ?1")?
                    .query_row([&embedding.space], |row| row.get(0))?;
                ids.insert(&embedding.space, id);
                id
            }
        };
        let timestamp_ms =
            i64::try_from(embedding.timestamp_ms).map_err(|_| Error::InvalidInput {
                field: "embeddings",
                reason: format!("{} ms does not fit an i64", embedding.timestamp_ms),
            })?;
        insert.execute((
            reference.0,
            space_id,
            embedding.frame_index,
            timestamp_ms,
            rows::encode_vector(&embedding.vector),
        ))?;
    }
    Ok(())
}

fn insert_shares(conn: &Connection, bank: BankId, shares: &[OrgId]) -> Result<(), Error> {
    let mut share =
        conn.prepare_cached("INSERT INTO bank_shares (bank_id, org_id) VALUES (?1, ?2)")?;
    for &org in shares {
        share.execute((bank.0, org.0))?;
    }
    Ok(())
}

/// Inserts a reference with its frames and its change entry. `new.frames` is validated,
/// non-empty and already deduplicated.
fn insert_reference(
    tx: &Transaction<'_>,
    new: NewReference,
    actor: Actor,
) -> Result<Reference, Error> {
    require_bank(tx, new.bank)?;
    require_org(tx, new.added_by)?;
    require_actor(tx, actor)?;
    let frame_count = u32::try_from(new.frames.len()).map_err(|_| Error::InvalidInput {
        field: "frames",
        reason: format!("{} frames do not fit a u32 count", new.frames.len()),
    })?;
    let added_ms = now_ms();
    tx.prepare_cached(
        "INSERT INTO refs (bank_id, external_id, note, added_by, added_ms, frame_count)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute((
        new.bank.0,
        &new.external_id,
        &new.note,
        new.added_by.0,
        added_ms,
        frame_count,
    ))?;
    let id = ReferenceId(tx.last_insert_rowid());
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO frames (reference_id, hash, frame_index, timestamp_ms, quality)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for frame in &new.frames {
            let timestamp_ms =
                i64::try_from(frame.timestamp_ms).map_err(|_| Error::InvalidInput {
                    field: "frames.timestamp_ms",
                    reason: format!("{} ms does not fit an i64", frame.timestamp_ms),
                })?;
            insert.execute((
                id.0,
                frame.hash.as_bytes().as_slice(),
                frame.frame_index,
                timestamp_ms,
                frame.quality,
            ))?;
        }
    }
    insert_embeddings(tx, id, &new.embeddings)?;
    append_change(
        tx,
        &ChangeKind::ReferenceAdded {
            reference: id,
            bank: new.bank,
        },
        actor,
        "",
        added_ms,
    )?;
    Ok(Reference {
        id,
        bank: new.bank,
        external_id: new.external_id,
        note: new.note,
        added_by: new.added_by,
        added_ms,
        state: ReferenceState::Active,
        frame_count,
    })
}

fn require_bank(conn: &Connection, id: BankId) -> Result<(), Error> {
    let exists = conn
        .prepare_cached("SELECT 1 FROM banks WHERE id = ?1")?
        .exists([id.0])?;
    if exists {
        Ok(())
    } else {
        Err(Error::NotFound {
            kind: "bank",
            key: id.to_string(),
        })
    }
}

/// The actor's organisation exists and so does its key, which acts for that organisation.
fn require_actor(conn: &Connection, actor: Actor) -> Result<(), Error> {
    require_org(conn, actor.org)?;
    let Some(key) = actor.key else {
        return Ok(());
    };
    let org: i64 = conn
        .prepare_cached("SELECT org_id FROM api_keys WHERE id = ?1")?
        .query_row([key.0], |row| row.get(0))
        .optional()?
        .ok_or_else(|| Error::NotFound {
            kind: "api key",
            key: key.to_string(),
        })?;
    rows::check_actor(actor, OrgId(org))
}

fn mirrored_bank_id(
    conn: &Connection,
    source: &str,
    remote_id: i64,
) -> Result<Option<BankId>, Error> {
    let id = conn
        .prepare_cached("SELECT bank_id FROM mirrored_banks WHERE source = ?1 AND remote_id = ?2")?
        .query_row((source, remote_id), |row| row.get(0))
        .optional()?;
    Ok(id.map(BankId))
}

fn mirrored_reference_id(
    conn: &Connection,
    source: &str,
    remote_id: i64,
) -> Result<Option<ReferenceId>, Error> {
    let id = conn
        .prepare_cached(
            "SELECT reference_id FROM mirrored_refs WHERE source = ?1 AND remote_id = ?2",
        )?
        .query_row((source, remote_id), |row| row.get(0))
        .optional()?;
    Ok(id.map(ReferenceId))
}

fn require_org(conn: &Connection, id: OrgId) -> Result<(), Error> {
    let exists = conn
        .prepare_cached("SELECT 1 FROM organisations WHERE id = ?1")?
        .exists([id.0])?;
    if exists {
        Ok(())
    } else {
        Err(Error::NotFound {
            kind: "organisation",
            key: id.to_string(),
        })
    }
}

/// Appends the one change entry of the current write transaction.
fn append_change(
    conn: &Connection,
    kind: &ChangeKind,
    actor: Actor,
    detail: &str,
    at_ms: i64,
) -> Result<ChangeSeq, Error> {
    let ids = rows::change_ids(kind);
    conn.prepare_cached(
        "INSERT INTO changes
             (kind, org_id, bank_id, reference_id, key_id, actor, actor_key, detail, at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute((
        ids.kind,
        ids.org,
        ids.bank,
        ids.reference,
        ids.key,
        actor.org.0,
        actor.key.map(|key| key.0),
        detail,
        at_ms,
    ))?;
    Ok(ChangeSeq(conn.last_insert_rowid()))
}

fn last_seq(conn: &Connection) -> Result<ChangeSeq, Error> {
    let seq = conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM changes")?
        .query_row([], |row| row.get(0))?;
    Ok(ChangeSeq(seq))
}

const CHANGE_SELECT: &str = "SELECT seq, kind, org_id, bank_id, reference_id, key_id, actor,
        actor_key, detail, at_ms FROM changes";

fn change_from_row(row: &Row<'_>) -> Result<Change, Error> {
    let kind: String = row.get(1)?;
    rows::change(rows::ChangeColumns {
        seq: row.get(0)?,
        kind: &kind,
        org: row.get(2)?,
        bank: row.get(3)?,
        reference: row.get(4)?,
        key: row.get(5)?,
        actor: row.get(6)?,
        actor_key: row.get(7)?,
        detail: row.get(8)?,
        at_ms: row.get(9)?,
    })
}

const KEY_SELECT: &str =
    "SELECT id, org_id, role, key_hash, label, created_ms, revoked_ms FROM api_keys";

/// An `api_keys` row before its role and digest are checked.
struct KeyRow {
    id: i64,
    org: i64,
    role: String,
    digest: Vec<u8>,
    label: String,
    created_ms: i64,
    revoked_ms: Option<i64>,
}

impl KeyRow {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            org: row.get(1)?,
            role: row.get(2)?,
            digest: row.get(3)?,
            label: row.get(4)?,
            created_ms: row.get(5)?,
            revoked_ms: row.get(6)?,
        })
    }

    fn into_key(self) -> Result<ApiKey, Error> {
        rows::api_key(rows::ApiKeyColumns {
            id: self.id,
            org: self.org,
            role: &self.role,
            digest: &self.digest,
            label: self.label,
            created_ms: self.created_ms,
            revoked_ms: self.revoked_ms,
        })
    }
}

fn read_api_key(conn: &Connection, id: KeyId) -> Result<ApiKey, Error> {
    conn.prepare_cached(&format!("{KEY_SELECT} WHERE id = ?1"))?
        .query_row([id.0], KeyRow::from_row)
        .optional()?
        .ok_or_else(|| Error::NotFound {
            kind: "api key",
            key: id.to_string(),
        })?
        .into_key()
}

fn read_bank(conn: &Connection, id: BankId) -> Result<Bank, Error> {
    let raw = conn
        .prepare_cached(&format!("{BANK_SELECT} WHERE id = ?1"))?
        .query_row([id.0], BankRow::from_row)
        .optional()?
        .ok_or_else(|| Error::NotFound {
            kind: "bank",
            key: id.to_string(),
        })?;
    finish_bank(conn, raw)
}

const BANK_SELECT: &str =
    "SELECT id, name, category, owner_org, visibility, description, created_ms FROM banks";

/// A `banks` row before its text columns are parsed and its shares attached.
struct BankRow {
    id: i64,
    name: String,
    category: String,
    owner: i64,
    visibility: String,
    description: String,
    created_ms: i64,
}

impl BankRow {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            name: row.get(1)?,
            category: row.get(2)?,
            owner: row.get(3)?,
            visibility: row.get(4)?,
            description: row.get(5)?,
            created_ms: row.get(6)?,
        })
    }

    fn into_bank(self, shares: Vec<OrgId>, spaces: Vec<EmbeddingSpace>) -> Result<Bank, Error> {
        rows::bank(rows::BankColumns {
            id: self.id,
            name: self.name,
            category: &self.category,
            owner: self.owner,
            visibility: &self.visibility,
            shares,
            description: self.description,
            created_ms: self.created_ms,
            spaces,
        })
    }
}

/// Attaches the shares and embedding spaces of one bank.
fn finish_bank(conn: &Connection, raw: BankRow) -> Result<Bank, Error> {
    let shares = conn
        .prepare_cached("SELECT org_id FROM bank_shares WHERE bank_id = ?1 ORDER BY org_id")?
        .query_map([raw.id], |row| Ok(OrgId(row.get(0)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    let spaces = bank_spaces(conn, raw.id)?;
    raw.into_bank(shares, spaces)
}

const REF_SELECT: &str = "SELECT id, bank_id, external_id, note, added_by, added_ms, frame_count,
        withdrawn_ms, withdrawn_reason FROM refs";

fn read_reference(conn: &Connection, id: ReferenceId) -> Result<Reference, Error> {
    let mut stmt = conn.prepare_cached(&format!("{REF_SELECT} WHERE id = ?1"))?;
    let mut rows = stmt.query([id.0])?;
    match rows.next()? {
        Some(row) => reference_from_row(row),
        None => Err(Error::NotFound {
            kind: "reference",
            key: id.to_string(),
        }),
    }
}

fn reference_from_row(row: &Row<'_>) -> Result<Reference, Error> {
    let id = ReferenceId(row.get(0)?);
    let state = rows::reference_state(id, row.get(7)?, row.get(8)?)?;
    let frame_count = rows::frame_count(id, row.get(6)?)?;
    Ok(Reference {
        id,
        bank: BankId(row.get(1)?),
        external_id: row.get(2)?,
        note: row.get(3)?,
        added_by: OrgId(row.get(4)?),
        added_ms: row.get(5)?,
        state,
        frame_count,
    })
}

/// Reads `frame_index, timestamp_ms, hash, quality` starting at column `first`, checking every
/// value against its domain type. The hash is borrowed from SQLite, not allocated.
fn frame_from_row(
    row: &Row<'_>,
    first: usize,
    reference: ReferenceId,
) -> Result<FrameSignal, Error> {
    let frame_index: i64 = row.get(first)?;
    let hash = row.get_ref(first + 2)?;
    let bytes = hash.as_blob().map_err(|_| Error::Corrupt {
        detail: format!(
            "reference {reference} frame {frame_index}: hash is stored as {}",
            hash.data_type()
        ),
    })?;
    rows::frame(
        reference,
        frame_index,
        row.get(first + 1)?,
        bytes,
        row.get(first + 3)?,
    )
}

/// Reads `frame_index, timestamp_ms, space name, dimension, vector` starting at column `first`.
fn embedding_from_row(
    row: &Row<'_>,
    first: usize,
    reference: ReferenceId,
) -> Result<FrameEmbedding, Error> {
    let frame_index: i64 = row.get(first)?;
    let vector = row.get_ref(first + 4)?;
    let bytes = vector.as_blob().map_err(|_| Error::Corrupt {
        detail: format!(
            "reference {reference} frame {frame_index}: vector is stored as {}",
            vector.data_type()
        ),
    })?;
    rows::embedding(rows::EmbeddingColumns {
        reference,
        frame_index,
        timestamp_ms: row.get(first + 1)?,
        space: row.get(first + 2)?,
        dimension: row.get(first + 3)?,
        vector: bytes,
    })
}

#[cfg(test)]
mod tests {
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
}
