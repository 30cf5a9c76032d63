//! The embedded backend: one SQLite file, `<data_dir>/framematch.sqlite3`, for a single replica
//! with nothing to install.
//!
//! Owns the schema (numbered migrations tracked in `PRAGMA user_version`), the SQL, and the
//! mapping between rows and the domain types of [`crate::model`]. Input has already been
//! validated by [`super::Store`]; this module only enforces what needs the database (existence,
//! uniqueness). It is split by concern like the PostgreSQL backend: `schema` (migrations and
//! connection settings), `banks` (organisations, banks, sharing, embedding spaces), `refs`
//! (references, frames, vectors, the start-up load), `keys` (API keys and audit), `changes` (the
//! change log, follow cursors and mirrored writes); opening and the blocking-pool helpers stay
//! here.
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

mod banks;
mod changes;
mod keys;
mod refs;
mod schema;
#[cfg(test)]
mod tests;

use banks::*;
use changes::*;
use keys::*;
use refs::*;
use schema::*;

/// File name of the database inside the data directory.
pub const FILE_NAME: &str = "framematch.sqlite3";

/// How long a statement waits for a lock held by another connection before failing with
/// `SQLITE_BUSY`. Only another process opening the same file can hold one for long.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Most rows `load_active_frames` pre-allocates for, whatever the stored counts claim, so a
/// corrupt count cannot ask for an absurd allocation up front.
const MAX_PREALLOCATED_FRAMES: usize = 1 << 27;

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
        create_private_dir(data_dir)?;
        let path = data_dir.join(FILE_NAME);
        // SQLite creates the `-wal` and `-shm` files with the main file's mode, so the main file
        // is made 0600 before SQLite opens it.
        make_private_file(&path)?;

        let mut writer = Connection::open(&path)?;
        configure(&writer)?;
        migrate(&mut writer)?;
        let default_org = ensure_default_org(&mut writer)?;
        sync_dir(data_dir)?;
        // Files left by an older version, which created them 0644.
        for suffix in ["-wal", "-shm"] {
            let mut side = path.clone().into_os_string();
            side.push(suffix);
            let side = PathBuf::from(side);
            if side.exists() {
                make_private_file(&side)?;
            }
        }

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

    /// See [`super::Store::bank_counts`].
    pub(super) async fn bank_counts(&self) -> Result<Vec<(BankId, super::BankCounts)>, Error> {
        self.read(|tx| {
            let mut stmt = tx.prepare(
                "SELECT bank_id,
                        SUM(CASE WHEN withdrawn_ms IS NULL THEN 1 ELSE 0 END),
                        SUM(CASE WHEN withdrawn_ms IS NULL THEN 0 ELSE 1 END),
                        COALESCE(SUM(frame_count), 0)
                 FROM refs GROUP BY bank_id",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    [row.get::<_, i64>(1)?, row.get(2)?, row.get(3)?],
                ))
            })?;
            let count = |value: i64| {
                u64::try_from(value).map_err(|_| Error::Corrupt {
                    detail: format!("negative count {value}"),
                })
            };
            let mut out = Vec::new();
            for row in rows {
                let (bank, [active, withdrawn, frames]) = row?;
                out.push((
                    BankId(bank),
                    super::BankCounts {
                        active_references: count(active)?,
                        withdrawn_references: count(withdrawn)?,
                        frames: count(frames)?,
                    },
                ));
            }
            Ok(out)
        })
        .await
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

/// Creates the data directory (and missing parents) with mode 0700. An existing directory keeps
/// its mode, which the operator chose (a volume mount, say), with a warning when others can read
/// it.
fn create_private_dir(dir: &Path) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if dir.is_dir() {
            let mode = std::fs::metadata(dir).map_err(io)?.permissions().mode() & 0o777;
            if mode & 0o007 != 0 {
                tracing::warn!(
                    path = %dir.display(),
                    mode = format!("{mode:o}"),
                    "the data directory is open to other users; chmod 700 it"
                );
            }
            return Ok(());
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir).map_err(io)
}

/// Creates `path` empty with mode 0600 when it does not exist, and sets an existing one to 0600.
fn make_private_file(path: &Path) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)
    }
    #[cfg(not(unix))]
    {
        let _ = (path, io);
        Ok(())
    }
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

/// Whether `err` is a violated `UNIQUE` constraint.
fn is_unique_violation(err: &rusqlite::Error) -> bool {
    err.sqlite_error()
        .is_some_and(|e| e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}
