//! The durable reference store: organisations, banks, references with their frame signals, and the
//! append-only change log (shared/DESIGN.md §2, §3).
//!
//! [`Store`] is one enum over the backends so that callers never name a backend: the embedded
//! SQLite file ([`embedded`]) for a single replica, and PostgreSQL ([`postgres`]) for several
//! replicas sharing one database. Everything backend-neutral lives here: the public types, the one [`Error`], and input
//! validation with its documented limits, so every backend accepts and rejects exactly the same
//! inputs.
//!
//! Invariants every backend upholds:
//! - **Durable before acknowledged.** A write method returns `Ok` only after its transaction has
//!   committed durably (it survives `kill -9` and power loss).
//! - **One write, one change.** Every write (create organisation, create bank, add reference with
//!   all its frames, withdraw reference) is a single transaction that also appends exactly one
//!   [`Change`]; the change becomes visible together with the data, never before.
//! - **The log has no holes for a reader.** [`Store::changes_since`] returns changes in sequence
//!   order, and a change with a lower sequence number never becomes visible after one with a
//!   higher number, so a tailer that remembers the last sequence it saw never misses a change.
//! - **Frames are deduplicated by exact hash within a reference**, keeping the first occurrence
//!   in frame-index order. Frames of any quality are stored; the matcher filters by quality.
//! - **Nothing is deleted.** Withdrawal marks a reference; its frames stay stored (for audit) but
//!   are excluded from [`Store::load_active_frames`].
//! - Methods are async, but no lock is held across an `.await`: the embedded backend runs each
//!   call to completion on tokio's blocking pool; the PostgreSQL backend awaits its pooled
//!   connection and bounds every operation with timeouts, failing with [`Error::Unavailable`]
//!   rather than hanging when the database is out of reach.

pub mod embedded;
pub mod postgres;
mod rows;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use crate::hash::PdqHash;
use crate::model::{
    Bank, BankId, Category, Change, ChangeSeq, FrameSignal, IndexedFrame, NewReference, OrgId,
    Organisation, Reference, ReferenceId, Visibility,
};

/// Longest bank or organisation name, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Longest free-text field (bank description, reference external id and note, withdrawal
/// reason), in bytes of UTF-8.
pub const MAX_TEXT_BYTES: usize = 4096;
/// Most frames one reference may carry before deduplication. A guard against one write turning
/// into an unbounded transaction: 1M frames is about 9 hours of video at 30 frames per second.
pub const MAX_FRAMES_PER_REFERENCE: usize = 1_000_000;
/// Highest PDQ quality score.
pub const MAX_QUALITY: u8 = 100;
/// Name of the organisation every store creates when it is first opened.
pub const DEFAULT_ORG_NAME: &str = "local";

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bank, reference or organisation does not exist.
    #[error("{kind} {key} not found")]
    NotFound {
        /// `"bank"`, `"reference"` or `"organisation"`.
        kind: &'static str,
        /// The id or name that was looked up.
        key: String,
    },
    /// A bank or organisation with that name already exists.
    #[error("{kind} {key:?} already exists")]
    AlreadyExists {
        /// `"bank"` or `"organisation"`.
        kind: &'static str,
        /// The name that is taken.
        key: String,
    },
    /// The reference was already withdrawn.
    #[error("reference {reference} is already withdrawn")]
    AlreadyWithdrawn {
        /// The reference.
        reference: ReferenceId,
    },
    /// An argument breaks one of the documented limits.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it, with the numbers.
        reason: String,
    },
    /// The database file was written by a newer framematch with a schema this binary does not
    /// know; refusing to touch it.
    #[error("database schema version {found} is newer than the {supported} this binary supports")]
    SchemaTooNew {
        /// Schema version found in the database.
        found: i64,
        /// Highest schema version this binary knows.
        supported: i64,
    },
    /// A setting the durability guarantee depends on did not take effect.
    #[error("sqlite pragma {pragma} is {actual:?}, expected {expected:?}")]
    PragmaNotApplied {
        /// The pragma, e.g. `journal_mode`.
        pragma: &'static str,
        /// The value required.
        expected: &'static str,
        /// The value the database reports.
        actual: String,
    },
    /// The SQLite library reported an error (internal: busy, full disk, I/O, a bug).
    #[error("sqlite operation failed")]
    Sqlite(#[from] rusqlite::Error),
    /// Creating or syncing the data directory failed.
    #[error("i/o error on {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Stored data breaks an invariant: a hash that is not 32 bytes, an unknown category, ...
    #[error("stored data is corrupt: {detail}")]
    Corrupt {
        /// What was found, and where.
        detail: String,
    },
    /// The blocking task running a store operation panicked or was cancelled.
    #[error("store task failed")]
    TaskFailed(#[source] tokio::task::JoinError),
    /// The database cannot be reached right now: connection refused or lost, a timeout, the
    /// server shutting down. Retry later; the store reconnects by itself. A write that fails
    /// this way may or may not have committed.
    #[error("database unavailable: {reason}")]
    Unavailable {
        /// What happened, with the timeout that expired when there was one.
        reason: String,
        /// The client or pool error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// PostgreSQL reported an error other than losing the connection (internal: a bug, a
    /// permission or a broken database).
    #[error("postgresql operation failed")]
    Postgres(#[source] tokio_postgres::Error),
    /// A database setting the durability guarantee depends on has an unsafe value; refusing to
    /// acknowledge writes that a crash could lose.
    #[error("postgresql setting {setting} is {actual:?}, expected {expected}")]
    UnsafeSetting {
        /// The setting, e.g. `synchronous_commit`.
        setting: &'static str,
        /// The values accepted.
        expected: &'static str,
        /// The value the database reports.
        actual: String,
    },
}

/// What a new bank is made of, before the store gives it an id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewBank {
    /// Unique name: 1 to [`MAX_NAME_CHARS`] characters of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// What it holds.
    pub category: Category,
    /// The owning organisation; must exist.
    pub owner: OrgId,
    /// Who else may match against it. Organisations listed in
    /// [`Visibility::SharedWith`] must exist; duplicates are dropped and the list is kept sorted.
    pub visibility: Visibility,
    /// Free text, up to [`MAX_TEXT_BYTES`] bytes.
    pub description: String,
}

/// Counts for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Organisations.
    pub organisations: u64,
    /// Banks.
    pub banks: u64,
    /// References that match.
    pub active_references: u64,
    /// References withdrawn.
    pub withdrawn_references: u64,
    /// Frame signals stored, for active and withdrawn references alike (after deduplication).
    pub frames: u64,
    /// Latest change-log position.
    pub last_seq: ChangeSeq,
}

/// The durable store: a cheap-to-clone handle over one backend.
#[derive(Clone, Debug)]
pub enum Store {
    /// A SQLite file in the data directory: one replica, nothing to install.
    Embedded(embedded::EmbeddedStore),
    /// A PostgreSQL database shared by several replicas.
    Postgres(postgres::PostgresStore),
}

// === impl Store ===

impl Store {
    /// Opens (creating if needed) `<data_dir>/framematch.sqlite3`, creating `data_dir` too,
    /// applies pending schema migrations, and ensures the organisation named
    /// [`DEFAULT_ORG_NAME`] exists.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be created or synced; [`Error::SchemaTooNew`] when
    /// the file comes from a newer framematch; [`Error::PragmaNotApplied`] when WAL mode, full
    /// synchronisation or foreign keys cannot be enabled; [`Error::Sqlite`] for any other SQLite
    /// failure (not a database, locked, ...); [`Error::TaskFailed`].
    pub async fn open_embedded(data_dir: &Path) -> Result<Store, Error> {
        embedded::EmbeddedStore::open(data_dir)
            .await
            .map(Store::Embedded)
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://user:password@host:port/db`,
    /// or the `key=value` form), applies pending schema migrations under an advisory lock (so
    /// replicas starting together migrate once), and ensures the organisation named
    /// [`DEFAULT_ORG_NAME`] exists. The role needs `CREATE` on the first schema of its
    /// `search_path` the first time.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (`"postgres url"`) for a URL that does not parse;
    /// [`Error::Unavailable`] when the database cannot be reached within
    /// [`postgres::CONNECT_TIMEOUT`]; [`Error::SchemaTooNew`] when the database comes from a
    /// newer framematch; [`Error::UnsafeSetting`] when `synchronous_commit` is `off`;
    /// [`Error::Postgres`] for anything else (authentication, permissions, ...).
    pub async fn open_postgres(url: &str) -> Result<Store, Error> {
        postgres::PostgresStore::open(url)
            .await
            .map(Store::Postgres)
    }

    /// Wake-ups for a change-log tailer: the sequence number of each change committed by any
    /// replica from now on (PostgreSQL `LISTEN`). `None` for the embedded store, which has a
    /// single replica and so no other writer to hear from. Hints only: read the changes with
    /// [`Store::changes_since`], and poll on a timer too; the receiver closes when the
    /// connection is lost (listen again when the database is back). See
    /// [`postgres::PostgresStore::listen_changes`].
    ///
    /// # Errors
    /// [`Error::Unavailable`]; [`Error::Postgres`].
    pub async fn listen_changes(&self) -> Result<Option<mpsc::Receiver<ChangeSeq>>, Error> {
        match self {
            Store::Embedded(_) => Ok(None),
            Store::Postgres(store) => store.listen_changes().await.map(Some),
        }
    }

    /// A short description for logs, e.g. `sqlite:/data/framematch.sqlite3`. Holds no secrets.
    pub fn describe(&self) -> String {
        match self {
            Store::Embedded(store) => store.describe(),
            Store::Postgres(store) => store.describe(),
        }
    }

    /// The organisation created at first open, named [`DEFAULT_ORG_NAME`].
    ///
    /// # Errors
    /// None today: both backends read the id at open.
    pub async fn default_org(&self) -> Result<OrgId, Error> {
        match self {
            Store::Embedded(store) => Ok(store.default_org()),
            Store::Postgres(store) => Ok(store.default_org()),
        }
    }

    /// Creates an organisation. Its change entry names the new organisation as the actor.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the name is empty, longer than [`MAX_NAME_CHARS`], has
    /// control characters or leading/trailing whitespace; [`Error::AlreadyExists`] when the name
    /// is taken; backend errors.
    pub async fn create_org(&self, name: &str) -> Result<Organisation, Error> {
        validate_org_name(name)?;
        match self {
            Store::Embedded(store) => store.create_org(name.to_string()).await,
            Store::Postgres(store) => store.create_org(name.to_string()).await,
        }
    }

    /// Every organisation, by id.
    ///
    /// # Errors
    /// Backend errors only.
    pub async fn list_orgs(&self) -> Result<Vec<Organisation>, Error> {
        match self {
            Store::Embedded(store) => store.list_orgs().await,
            Store::Postgres(store) => store.list_orgs().await,
        }
    }

    /// Creates a bank owned by `new.owner`; `actor` is recorded in the change log.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a bad name or an over-long description;
    /// [`Error::NotFound`] (`"organisation"`) when the owner, the actor or an organisation it is
    /// shared with does not exist; [`Error::AlreadyExists`] when the name is taken; backend
    /// errors.
    pub async fn create_bank(&self, new: NewBank, actor: OrgId) -> Result<Bank, Error> {
        validate_bank_name(&new.name)?;
        validate_text("description", &new.description)?;
        let new = NewBank {
            visibility: normalise_visibility(new.visibility),
            ..new
        };
        match self {
            Store::Embedded(store) => store.create_bank(new, actor).await,
            Store::Postgres(store) => store.create_bank(new, actor).await,
        }
    }

    /// Every bank, by id.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for an unreadable stored bank; backend errors.
    pub async fn list_banks(&self) -> Result<Vec<Bank>, Error> {
        match self {
            Store::Embedded(store) => store.list_banks().await,
            Store::Postgres(store) => store.list_banks().await,
        }
    }

    /// One bank by id.
    ///
    /// # Errors
    /// [`Error::NotFound`] (`"bank"`); [`Error::Corrupt`]; backend errors.
    pub async fn get_bank(&self, id: BankId) -> Result<Bank, Error> {
        match self {
            Store::Embedded(store) => store.get_bank(id).await,
            Store::Postgres(store) => store.get_bank(id).await,
        }
    }

    /// One bank by its unique name.
    ///
    /// # Errors
    /// [`Error::NotFound`] (`"bank"`); [`Error::Corrupt`]; backend errors.
    pub async fn bank_by_name(&self, name: &str) -> Result<Bank, Error> {
        match self {
            Store::Embedded(store) => store.bank_by_name(name.to_string()).await,
            Store::Postgres(store) => store.bank_by_name(name.to_string()).await,
        }
    }

    /// Adds a reference with all its frames in one transaction. Frames are deduplicated by exact
    /// hash, keeping the first occurrence in frame-index order (ties keep input order); the
    /// returned [`Reference::frame_count`] counts the frames kept.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when there are no frames or more than
    /// [`MAX_FRAMES_PER_REFERENCE`], a quality is above [`MAX_QUALITY`], a timestamp does not fit
    /// in an `i64`, or the external id or note is longer than [`MAX_TEXT_BYTES`];
    /// [`Error::NotFound`] when the bank (`"bank"`) or the adding organisation
    /// (`"organisation"`) does not exist; backend errors.
    pub async fn add_reference(&self, new: NewReference) -> Result<Reference, Error> {
        validate_text("external_id", &new.external_id)?;
        validate_text("note", &new.note)?;
        let frames = dedup_frames(new.frames)?;
        let new = NewReference { frames, ..new };
        match self {
            Store::Embedded(store) => store.add_reference(new).await,
            Store::Postgres(store) => store.add_reference(new).await,
        }
    }

    /// Withdraws a reference so it never matches again; its frames stay stored.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the reason is empty or longer than [`MAX_TEXT_BYTES`];
    /// [`Error::NotFound`] when the reference (`"reference"`) or the actor (`"organisation"`)
    /// does not exist; [`Error::AlreadyWithdrawn`]; backend errors.
    pub async fn withdraw_reference(
        &self,
        id: ReferenceId,
        reason: &str,
        actor: OrgId,
    ) -> Result<Reference, Error> {
        validate_text("reason", reason)?;
        if reason.trim().is_empty() {
            return Err(Error::InvalidInput {
                field: "reason",
                reason: "a withdrawal needs a reason".to_string(),
            });
        }
        match self {
            Store::Embedded(store) => {
                store
                    .withdraw_reference(id, reason.to_string(), actor)
                    .await
            }
            Store::Postgres(store) => {
                store
                    .withdraw_reference(id, reason.to_string(), actor)
                    .await
            }
        }
    }

    /// One reference by id, active or withdrawn.
    ///
    /// # Errors
    /// [`Error::NotFound`] (`"reference"`); [`Error::Corrupt`]; backend errors.
    pub async fn get_reference(&self, id: ReferenceId) -> Result<Reference, Error> {
        match self {
            Store::Embedded(store) => store.get_reference(id).await,
            Store::Postgres(store) => store.get_reference(id).await,
        }
    }

    /// The references of one bank, by id: the active ones, and with `include_withdrawn` the
    /// withdrawn ones too. Frames are not read; see [`Store::reference_frames`].
    ///
    /// # Errors
    /// [`Error::NotFound`] (`"bank"`); [`Error::Corrupt`] for an unreadable stored reference;
    /// backend errors.
    pub async fn list_references(
        &self,
        bank: BankId,
        include_withdrawn: bool,
    ) -> Result<Vec<Reference>, Error> {
        match self {
            Store::Embedded(store) => store.list_references(bank, include_withdrawn).await,
            Store::Postgres(store) => store.list_references(bank, include_withdrawn).await,
        }
    }

    /// The stored (deduplicated) frames of one reference, active or withdrawn, by frame index.
    ///
    /// # Errors
    /// [`Error::NotFound`] (`"reference"`); [`Error::Corrupt`] for a stored hash that is not 32
    /// bytes or an out-of-range number; backend errors.
    pub async fn reference_frames(&self, id: ReferenceId) -> Result<Vec<FrameSignal>, Error> {
        match self {
            Store::Embedded(store) => store.reference_frames(id).await,
            Store::Postgres(store) => store.reference_frames(id).await,
        }
    }

    /// Every frame of every active reference, plus the change-log position they reflect, read
    /// from one consistent snapshot: apply `changes_since(seq)` afterwards to catch up. Order is
    /// unspecified but stable (by reference today).
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a stored hash that is not 32 bytes or an out-of-range number;
    /// backend errors.
    pub async fn load_active_frames(&self) -> Result<(Vec<IndexedFrame>, ChangeSeq), Error> {
        match self {
            Store::Embedded(store) => store.load_active_frames().await,
            Store::Postgres(store) => store.load_active_frames().await,
        }
    }

    /// Up to `limit` changes with a sequence number above `after`, in sequence order.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for an unreadable change entry; backend errors.
    pub async fn changes_since(
        &self,
        after: ChangeSeq,
        limit: usize,
    ) -> Result<Vec<Change>, Error> {
        match self {
            Store::Embedded(store) => store.changes_since(after, limit).await,
            Store::Postgres(store) => store.changes_since(after, limit).await,
        }
    }

    /// The latest change-log position (`ChangeSeq(0)` for an empty log).
    ///
    /// # Errors
    /// Backend errors only.
    pub async fn last_seq(&self) -> Result<ChangeSeq, Error> {
        match self {
            Store::Embedded(store) => store.last_seq().await,
            Store::Postgres(store) => store.last_seq().await,
        }
    }

    /// Counts of everything stored, from one snapshot.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a negative count; backend errors.
    pub async fn stats(&self) -> Result<StoreStats, Error> {
        match self {
            Store::Embedded(store) => store.stats().await,
            Store::Postgres(store) => store.stats().await,
        }
    }
}

// === validation (backend-neutral) ===

/// Bank names: 1..=[`MAX_NAME_CHARS`] characters of `[A-Za-z0-9_.-]`.
fn validate_bank_name(name: &str) -> Result<(), Error> {
    validate_name_length("bank name", name)?;
    if let Some((position, found)) = name
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(Error::InvalidInput {
            field: "bank name",
            reason: format!(
                "{found:?} at position {position} is not allowed; use A-Z, a-z, 0-9, '_', '.', '-'"
            ),
        });
    }
    Ok(())
}

/// Organisation names: 1..=[`MAX_NAME_CHARS`] printable characters, no leading or trailing
/// whitespace (so "local" and "local " cannot both exist).
fn validate_org_name(name: &str) -> Result<(), Error> {
    validate_name_length("organisation name", name)?;
    if let Some((position, found)) = name.chars().enumerate().find(|(_, c)| c.is_control()) {
        return Err(Error::InvalidInput {
            field: "organisation name",
            reason: format!("control character {found:?} at position {position}"),
        });
    }
    if name.trim() != name {
        return Err(Error::InvalidInput {
            field: "organisation name",
            reason: "leading or trailing whitespace".to_string(),
        });
    }
    Ok(())
}

fn validate_name_length(field: &'static str, name: &str) -> Result<(), Error> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(Error::InvalidInput {
            field,
            reason: format!("{chars} characters, must be 1 to {MAX_NAME_CHARS}"),
        });
    }
    Ok(())
}

fn validate_text(field: &'static str, text: &str) -> Result<(), Error> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(Error::InvalidInput {
            field,
            reason: format!("{} bytes, limit is {MAX_TEXT_BYTES}", text.len()),
        });
    }
    Ok(())
}

/// Sorted, duplicate-free share lists, so that what is stored and read back compares equal.
fn normalise_visibility(visibility: Visibility) -> Visibility {
    match visibility {
        Visibility::SharedWith(mut orgs) => {
            orgs.sort_unstable();
            orgs.dedup();
            Visibility::SharedWith(orgs)
        }
        other @ (Visibility::Private | Visibility::Public) => other,
    }
}

/// Validates frames and keeps the first frame of each distinct hash in frame-index order. The
/// result is sorted by frame index (stable, so equal indices keep input order).
fn dedup_frames(mut frames: Vec<FrameSignal>) -> Result<Vec<FrameSignal>, Error> {
    if frames.is_empty() {
        return Err(Error::InvalidInput {
            field: "frames",
            reason: "a reference needs at least 1 frame, got 0".to_string(),
        });
    }
    if frames.len() > MAX_FRAMES_PER_REFERENCE {
        return Err(Error::InvalidInput {
            field: "frames",
            reason: format!(
                "{} frames, limit is {MAX_FRAMES_PER_REFERENCE}",
                frames.len()
            ),
        });
    }
    for frame in &frames {
        if frame.quality > MAX_QUALITY {
            return Err(Error::InvalidInput {
                field: "frames.quality",
                reason: format!(
                    "frame {} has quality {}, must be 0 to {MAX_QUALITY}",
                    frame.frame_index, frame.quality
                ),
            });
        }
        if i64::try_from(frame.timestamp_ms).is_err() {
            return Err(Error::InvalidInput {
                field: "frames.timestamp_ms",
                reason: format!(
                    "frame {} has timestamp {} ms, limit is {} ms",
                    frame.frame_index,
                    frame.timestamp_ms,
                    i64::MAX
                ),
            });
        }
    }
    frames.sort_by_key(|frame| frame.frame_index);
    let mut seen: HashSet<PdqHash> = HashSet::with_capacity(frames.len());
    frames.retain(|frame| seen.insert(frame.hash));
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ChangeKind, ReferenceState};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn hash(seed: u8) -> PdqHash {
        PdqHash::from_bytes([seed; 32])
    }

    fn frame(frame_index: u32, seed: u8) -> FrameSignal {
        FrameSignal {
            frame_index,
            timestamp_ms: u64::from(frame_index) * 1000,
            hash: hash(seed),
            quality: 90,
        }
    }

    fn new_bank(name: &str, owner: OrgId) -> NewBank {
        NewBank {
            name: name.to_string(),
            category: Category::GraphicViolence,
            owner,
            visibility: Visibility::Private,
            description: "test bank".to_string(),
        }
    }

    fn new_reference(bank: BankId, added_by: OrgId, frames: Vec<FrameSignal>) -> NewReference {
        NewReference {
            bank,
            external_id: "ext-1".to_string(),
            note: "a note".to_string(),
            added_by,
            frames,
        }
    }

    async fn open() -> Result<(tempfile::TempDir, Store), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open_embedded(dir.path()).await?;
        Ok((dir, store))
    }

    #[tokio::test]
    async fn open_creates_dir_file_and_default_org() -> TestResult {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("nested").join("data");
        let store = Store::open_embedded(&data_dir).await?;
        assert!(data_dir.join("framematch.sqlite3").is_file());
        assert_eq!(
            store.describe(),
            format!("sqlite:{}", data_dir.join("framematch.sqlite3").display())
        );
        let local = store.default_org().await?;
        let orgs = store.list_orgs().await?;
        assert_eq!(
            orgs,
            vec![Organisation {
                id: local,
                name: DEFAULT_ORG_NAME.to_string()
            }]
        );
        let changes = store.changes_since(ChangeSeq(0), 100).await?;
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].kind, ChangeKind::OrgCreated(local));
        assert_eq!(changes[0].actor, local);
        Ok(())
    }

    async fn fresh_store_has_the_default_org_and_its_change(store: Store) -> TestResult {
        let local = store.default_org().await?;
        assert_eq!(
            store.list_orgs().await?,
            vec![Organisation {
                id: local,
                name: DEFAULT_ORG_NAME.to_string()
            }]
        );
        let changes = store.changes_since(ChangeSeq(0), 100).await?;
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].seq, ChangeSeq(1));
        assert_eq!(changes[0].kind, ChangeKind::OrgCreated(local));
        assert_eq!(changes[0].actor, local);
        assert_eq!(store.stats().await?.organisations, 1);
        Ok(())
    }

    async fn orgs_round_trip_and_reject_duplicates(store: Store) -> TestResult {
        let acme = store.create_org("Acme Video Ltd").await?;
        assert_eq!(acme.name, "Acme Video Ltd");
        let orgs = store.list_orgs().await?;
        assert_eq!(orgs.len(), 2);
        assert_eq!(orgs[1], acme);
        let err = store.create_org("Acme Video Ltd").await;
        assert!(
            matches!(err, Err(Error::AlreadyExists { kind: "organisation", ref key }) if key == "Acme Video Ltd"),
            "{err:?}"
        );
        for bad in ["", " padded", "tab\there", &"x".repeat(MAX_NAME_CHARS + 1)] {
            let err = store.create_org(bad).await;
            assert!(
                matches!(
                    err,
                    Err(Error::InvalidInput {
                        field: "organisation name",
                        ..
                    })
                ),
                "{bad:?}: {err:?}"
            );
        }
        store.create_org(&"é".repeat(MAX_NAME_CHARS)).await?;
        Ok(())
    }

    async fn banks_round_trip_by_id_and_name(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let partner = store.create_org("partner").await?.id;
        let other = store.create_org("other").await?.id;

        let private = store
            .create_bank(new_bank("private.bank", local), local)
            .await?;
        let shared = store
            .create_bank(
                NewBank {
                    visibility: Visibility::SharedWith(vec![other, partner, other]),
                    category: Category::Terrorism,
                    ..new_bank("shared_bank-1", local)
                },
                local,
            )
            .await?;
        let public = store
            .create_bank(
                NewBank {
                    visibility: Visibility::Public,
                    category: Category::SuicideSelfHarm,
                    ..new_bank("public", partner)
                },
                partner,
            )
            .await?;
        // Shares come back sorted and deduplicated.
        assert_eq!(
            shared.visibility,
            Visibility::SharedWith(vec![partner, other])
        );
        assert_eq!(private.owner, local);
        assert_eq!(private.description, "test bank");
        assert!(private.created_ms > 0);

        for bank in [&private, &shared, &public] {
            assert_eq!(&store.get_bank(bank.id).await?, bank);
            assert_eq!(&store.bank_by_name(&bank.name).await?, bank);
        }
        assert_eq!(store.list_banks().await?, vec![private, shared, public]);
        Ok(())
    }

    async fn bank_errors(store: Store) -> TestResult {
        let local = store.default_org().await?;
        store.create_bank(new_bank("dup", local), local).await?;
        let err = store.create_bank(new_bank("dup", local), local).await;
        assert!(
            matches!(err, Err(Error::AlreadyExists { kind: "bank", ref key }) if key == "dup"),
            "{err:?}"
        );
        for bad in [
            "",
            "has space",
            "slash/",
            "ümlaut",
            &"b".repeat(MAX_NAME_CHARS + 1),
        ] {
            let err = store.create_bank(new_bank(bad, local), local).await;
            assert!(
                matches!(
                    err,
                    Err(Error::InvalidInput {
                        field: "bank name",
                        ..
                    })
                ),
                "{bad:?}: {err:?}"
            );
        }
        let long = NewBank {
            description: "d".repeat(MAX_TEXT_BYTES + 1),
            ..new_bank("long", local)
        };
        assert!(matches!(
            store.create_bank(long, local).await,
            Err(Error::InvalidInput {
                field: "description",
                ..
            })
        ));
        let ghost = OrgId(9999);
        for (bank, actor) in [
            (new_bank("ghost-owner", ghost), local),
            (new_bank("ghost-actor", local), ghost),
            (
                NewBank {
                    visibility: Visibility::SharedWith(vec![local, ghost]),
                    ..new_bank("ghost-share", local)
                },
                local,
            ),
        ] {
            let err = store.create_bank(bank, actor).await;
            assert!(
                matches!(err, Err(Error::NotFound { kind: "organisation", ref key }) if key == "9999"),
                "{err:?}"
            );
        }
        assert!(matches!(
            store.get_bank(BankId(42)).await,
            Err(Error::NotFound { kind: "bank", ref key }) if key == "42"
        ));
        assert!(matches!(
            store.bank_by_name("nope").await,
            Err(Error::NotFound { kind: "bank", ref key }) if key == "nope"
        ));
        // Failed writes leave no trace in the log.
        assert_eq!(store.changes_since(ChangeSeq(0), 100).await?.len(), 2);
        Ok(())
    }

    async fn references_round_trip_with_dedup_by_exact_hash(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let bank = store.create_bank(new_bank("b", local), local).await?.id;
        // Out of order; hash 1 appears at indices 0, 2 and 5; hash 2 at 1 and 3.
        let frames = vec![
            frame(5, 1),
            frame(3, 2),
            frame(2, 1),
            frame(0, 1),
            frame(4, 3),
            frame(1, 2),
        ];
        let reference = store
            .add_reference(new_reference(bank, local, frames))
            .await?;
        assert_eq!(reference.frame_count, 3);
        assert_eq!(reference.state, ReferenceState::Active);
        assert_eq!(reference.bank, bank);
        assert_eq!(reference.external_id, "ext-1");
        assert_eq!(reference.note, "a note");
        assert_eq!(reference.added_by, local);
        assert_eq!(store.get_reference(reference.id).await?, reference);
        assert_eq!(
            store.reference_frames(reference.id).await?,
            vec![frame(0, 1), frame(1, 2), frame(4, 3)]
        );
        // The same hash in another reference is a separate frame.
        let second = store
            .add_reference(new_reference(bank, local, vec![frame(0, 1)]))
            .await?;
        assert_eq!(second.frame_count, 1);
        assert_eq!(store.stats().await?.frames, 4);
        Ok(())
    }

    async fn reference_errors(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let bank = store.create_bank(new_bank("b", local), local).await?.id;
        let before = store.last_seq().await?;

        let err = store
            .add_reference(new_reference(bank, local, vec![]))
            .await;
        assert!(
            matches!(
                err,
                Err(Error::InvalidInput {
                    field: "frames",
                    ..
                })
            ),
            "{err:?}"
        );
        let bad_quality = FrameSignal {
            quality: 101,
            ..frame(0, 1)
        };
        assert!(matches!(
            store
                .add_reference(new_reference(bank, local, vec![bad_quality]))
                .await,
            Err(Error::InvalidInput {
                field: "frames.quality",
                ..
            })
        ));
        let bad_time = FrameSignal {
            timestamp_ms: u64::MAX,
            ..frame(0, 1)
        };
        assert!(matches!(
            store
                .add_reference(new_reference(bank, local, vec![bad_time]))
                .await,
            Err(Error::InvalidInput {
                field: "frames.timestamp_ms",
                ..
            })
        ));
        let long_note = NewReference {
            note: "n".repeat(MAX_TEXT_BYTES + 1),
            ..new_reference(bank, local, vec![frame(0, 1)])
        };
        assert!(matches!(
            store.add_reference(long_note).await,
            Err(Error::InvalidInput { field: "note", .. })
        ));
        let err = store
            .add_reference(new_reference(BankId(77), local, vec![frame(0, 1)]))
            .await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "bank", ref key }) if key == "77"),
            "{err:?}"
        );
        let err = store
            .add_reference(new_reference(bank, OrgId(78), vec![frame(0, 1)]))
            .await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "organisation", ref key }) if key == "78"),
            "{err:?}"
        );
        for err in [
            store.get_reference(ReferenceId(5)).await.map(|_| ()),
            store.reference_frames(ReferenceId(5)).await.map(|_| ()),
            store
                .withdraw_reference(ReferenceId(5), "fp", local)
                .await
                .map(|_| ()),
        ] {
            assert!(
                matches!(err, Err(Error::NotFound { kind: "reference", ref key }) if key == "5"),
                "{err:?}"
            );
        }
        assert_eq!(store.last_seq().await?, before);
        Ok(())
    }

    async fn withdraw_twice_is_already_withdrawn(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let bank = store.create_bank(new_bank("b", local), local).await?.id;
        let reference = store
            .add_reference(new_reference(bank, local, vec![frame(0, 1)]))
            .await?;
        assert!(matches!(
            store.withdraw_reference(reference.id, " ", local).await,
            Err(Error::InvalidInput {
                field: "reason",
                ..
            })
        ));
        assert!(matches!(
            store
                .withdraw_reference(reference.id, "fp", OrgId(999))
                .await,
            Err(Error::NotFound {
                kind: "organisation",
                ..
            })
        ));
        let withdrawn = store
            .withdraw_reference(reference.id, "false positive", local)
            .await?;
        let ReferenceState::Withdrawn { reason, at_ms } = &withdrawn.state else {
            panic!("not withdrawn: {withdrawn:?}");
        };
        assert_eq!(reason, "false positive");
        assert!(*at_ms >= reference.added_ms);
        assert_eq!(store.get_reference(reference.id).await?, withdrawn);
        let seq = store.last_seq().await?;
        let err = store.withdraw_reference(reference.id, "again", local).await;
        assert!(
            matches!(err, Err(Error::AlreadyWithdrawn { reference: r }) if r == reference.id),
            "{err:?}"
        );
        assert_eq!(store.last_seq().await?, seq);
        // Frames of a withdrawn reference stay readable.
        assert_eq!(
            store.reference_frames(reference.id).await?,
            vec![frame(0, 1)]
        );
        Ok(())
    }

    async fn each_write_appends_one_change_in_order(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let start = store.last_seq().await?;
        assert_eq!(start, ChangeSeq(1));

        let partner = store.create_org("partner").await?.id;
        let bank = store.create_bank(new_bank("b", partner), local).await?.id;
        let reference = store
            .add_reference(new_reference(bank, partner, vec![frame(0, 1), frame(1, 2)]))
            .await?
            .id;
        store.withdraw_reference(reference, "fp", local).await?;

        let changes = store.changes_since(start, 100).await?;
        let kinds: Vec<_> = changes.iter().map(|c| (c.kind.clone(), c.actor)).collect();
        assert_eq!(
            kinds,
            vec![
                (ChangeKind::OrgCreated(partner), partner),
                (ChangeKind::BankCreated(bank), local),
                (ChangeKind::ReferenceAdded { reference, bank }, partner),
                (ChangeKind::ReferenceWithdrawn { reference, bank }, local),
            ]
        );
        let seqs: Vec<i64> = changes.iter().map(|c| c.seq.0).collect();
        assert_eq!(seqs, vec![2, 3, 4, 5]);
        assert!(changes.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        assert_eq!(store.last_seq().await?, ChangeSeq(5));
        // Paging.
        assert_eq!(store.changes_since(ChangeSeq(2), 2).await?, changes[1..3]);
        assert!(store.changes_since(ChangeSeq(5), 10).await?.is_empty());
        assert!(store.changes_since(ChangeSeq(0), 0).await?.is_empty());
        Ok(())
    }

    async fn load_active_frames_excludes_withdrawn(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let b1 = store.create_bank(new_bank("b1", local), local).await?.id;
        let b2 = store.create_bank(new_bank("b2", local), local).await?.id;
        let r1 = store
            .add_reference(new_reference(b1, local, vec![frame(0, 1), frame(1, 2)]))
            .await?
            .id;
        let r2 = store
            .add_reference(new_reference(b2, local, vec![frame(0, 3)]))
            .await?
            .id;
        let r3 = store
            .add_reference(new_reference(b1, local, vec![frame(7, 4)]))
            .await?
            .id;
        store.withdraw_reference(r2, "fp", local).await?;

        let (mut frames, seq) = store.load_active_frames().await?;
        assert_eq!(seq, store.last_seq().await?);
        frames.sort_by_key(|f| (f.reference, f.frame.frame_index));
        let expected = vec![
            IndexedFrame {
                reference: r1,
                bank: b1,
                frame: frame(0, 1),
            },
            IndexedFrame {
                reference: r1,
                bank: b1,
                frame: frame(1, 2),
            },
            IndexedFrame {
                reference: r3,
                bank: b1,
                frame: frame(7, 4),
            },
        ];
        assert_eq!(frames, expected);

        let stats = store.stats().await?;
        assert_eq!(
            stats,
            StoreStats {
                organisations: 1,
                banks: 2,
                active_references: 2,
                withdrawn_references: 1,
                frames: 4,
                last_seq: seq,
            }
        );
        Ok(())
    }

    async fn list_references_by_bank_with_or_without_withdrawn(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let b1 = store.create_bank(new_bank("b1", local), local).await?.id;
        let b2 = store.create_bank(new_bank("b2", local), local).await?.id;
        let empty = store.create_bank(new_bank("empty", local), local).await?.id;
        let r1 = store
            .add_reference(new_reference(b1, local, vec![frame(0, 1), frame(1, 2)]))
            .await?;
        let other = store
            .add_reference(new_reference(b2, local, vec![frame(0, 3)]))
            .await?;
        let r3 = store
            .add_reference(NewReference {
                external_id: "ext-3".to_string(),
                note: "third".to_string(),
                ..new_reference(b1, local, vec![frame(0, 4)])
            })
            .await?;
        let r4 = store
            .add_reference(new_reference(b1, local, vec![frame(0, 5)]))
            .await?;
        let r3 = store.withdraw_reference(r3.id, "fp", local).await?;

        // By id, exactly as get_reference reads each one, and only this bank's.
        assert_eq!(
            store.list_references(b1, false).await?,
            vec![r1.clone(), r4.clone()]
        );
        assert_eq!(
            store.list_references(b1, true).await?,
            vec![r1, r3.clone(), r4]
        );
        assert_eq!(store.list_references(b2, true).await?, vec![other]);
        assert!(matches!(r3.state, ReferenceState::Withdrawn { .. }));
        assert!(store.list_references(empty, true).await?.is_empty());
        let err = store.list_references(BankId(4242), false).await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "bank", ref key }) if key == "4242"),
            "{err:?}"
        );
        Ok(())
    }

    /// Runs each backend-neutral test body above against both backends: a temporary SQLite
    /// file, and a fresh PostgreSQL database when `FRAMEMATCH_TEST_POSTGRES_URL` names a server
    /// (see `postgres::test_support`).
    macro_rules! backend_tests {
        ($($name:ident),* $(,)?) => {
            mod embedded_backend {
                $(
                    #[tokio::test]
                    async fn $name() -> super::TestResult {
                        let (_dir, store) = super::open().await?;
                        super::$name(store).await
                    }
                )*
            }

            mod postgres_backend {
                use crate::store::postgres::test_support::TestDatabase;
                $(
                    #[tokio::test]
                    async fn $name() -> super::TestResult {
                        let Some(db) = TestDatabase::create().await? else {
                            return Ok(());
                        };
                        let store = db.open().await?;
                        super::$name(store).await
                    }
                )*
            }
        };
    }

    backend_tests!(
        fresh_store_has_the_default_org_and_its_change,
        orgs_round_trip_and_reject_duplicates,
        banks_round_trip_by_id_and_name,
        bank_errors,
        references_round_trip_with_dedup_by_exact_hash,
        reference_errors,
        withdraw_twice_is_already_withdrawn,
        each_write_appends_one_change_in_order,
        load_active_frames_excludes_withdrawn,
        list_references_by_bank_with_or_without_withdrawn,
    );

    #[tokio::test]
    async fn data_survives_close_and_reopen() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (org, bank, reference, seq) = {
            let store = Store::open_embedded(dir.path()).await?;
            let local = store.default_org().await?;
            let org = store.create_org("partner").await?;
            let bank = store
                .create_bank(
                    NewBank {
                        visibility: Visibility::SharedWith(vec![org.id]),
                        ..new_bank("kept", local)
                    },
                    local,
                )
                .await?;
            let reference = store
                .add_reference(new_reference(bank.id, org.id, vec![frame(0, 9)]))
                .await?;
            (org, bank, reference, store.last_seq().await?)
        };
        let store = Store::open_embedded(dir.path()).await?;
        assert_eq!(store.list_orgs().await?.len(), 2);
        assert_eq!(store.list_orgs().await?[1], org);
        assert_eq!(store.get_bank(bank.id).await?, bank);
        assert_eq!(store.get_reference(reference.id).await?, reference);
        assert_eq!(store.last_seq().await?, seq);
        let (frames, loaded_seq) = store.load_active_frames().await?;
        assert_eq!(loaded_seq, seq);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].frame, frame(0, 9));
        Ok(())
    }

    #[test]
    fn dedup_keeps_first_by_frame_index_then_input_order() -> TestResult {
        let a = FrameSignal {
            quality: 10,
            ..frame(3, 1)
        };
        let b = FrameSignal {
            quality: 20,
            ..frame(3, 1)
        };
        let kept = dedup_frames(vec![frame(9, 1), a, b, frame(1, 2)])?;
        assert_eq!(kept, vec![frame(1, 2), a]);
        Ok(())
    }

    #[test]
    fn error_messages_are_lowercase_with_numbers() {
        let err = Error::AlreadyWithdrawn {
            reference: ReferenceId(7),
        };
        assert_eq!(err.to_string(), "reference 7 is already withdrawn");
        let err = Error::SchemaTooNew {
            found: 9,
            supported: 1,
        };
        assert_eq!(
            err.to_string(),
            "database schema version 9 is newer than the 1 this binary supports"
        );
        let err = Error::NotFound {
            kind: "bank",
            key: "12".to_string(),
        };
        assert_eq!(err.to_string(), "bank 12 not found");
    }
}
