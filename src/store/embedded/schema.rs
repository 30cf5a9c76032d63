//! Schema and migrations: the numbered steps, applied in one transaction, and the checks a database must pass before it is used.

use super::*;

/// Schema steps; step `i` (0-based) takes the schema from version `i` to `i + 1`. Append only:
/// never edit a step that has shipped.
pub(super) const MIGRATIONS: &[&str] = &[
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

pub(super) fn configure(conn: &Connection) -> Result<(), Error> {
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
pub(super) fn supported_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).expect("the migration list is a handful of entries")
}

/// Applies the pending migrations in one transaction; a no-op when the schema is current.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), Error> {
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
pub(super) fn ensure_default_org(conn: &mut Connection) -> Result<OrgId, Error> {
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
