//! The durable reference store: organisations, banks, references with their frame signals, and the
//! append-only change log (shared/DESIGN.md §2, §3).
//!
//! [`Store`] is one enum over the backends so that callers never name a backend: the embedded
//! SQLite file ([`embedded`]) for a single replica, and PostgreSQL ([`postgres`]) for several
//! replicas sharing one database. Everything backend-neutral lives here (the public types and the one
//! [`Error`]) or beside it: input validation with its documented limits in `rules`, so every
//! backend accepts and rejects exactly the same inputs, and the decoding of stored values in
//! `rows`.
//!
//! Invariants every backend upholds:
//! - **Durable before acknowledged.** A write method returns `Ok` only after its transaction has
//!   committed durably (it survives `kill -9` and power loss).
//! - **One write, one change.** Every write (create organisation, create bank, change a bank's
//!   visibility, add reference with all its frames, withdraw reference, create or revoke an API
//!   key, and the mirrored bank and reference of a followed partner) is a single transaction that
//!   also appends exactly one [`Change`], naming its [`Actor`] (organisation and key); the change
//!   becomes visible together with the data, never before. The one exception is the follow
//!   cursor ([`Store::set_follow_cursor`]): local bookkeeping, not data, so it has no change.
//! - **The log has no holes for a reader.** [`Store::changes_since`] returns changes in sequence
//!   order, and a change with a lower sequence number never becomes visible after one with a
//!   higher number, so a tailer that remembers the last sequence it saw never misses a change.
//! - **Frames are deduplicated by exact hash within a reference**, keeping the first occurrence
//!   in frame-index order. Frames of any quality are stored; the matcher filters by quality.
//! - **Nothing is deleted.** Withdrawal marks a reference; its frames and vectors stay stored
//!   (for audit) but are excluded from [`Store::load_active`].
//! - **Embedding spaces are server-wide** (issue #11): a space name means one dimension and one
//!   metric in every bank that declares it (a conflicting declaration is
//!   [`Error::SpaceConflict`]); the threshold is each bank's own. A bank's spaces are fixed at
//!   its creation, so a reference's vectors can be checked against them before its write
//!   transaction starts. Vectors are stored as f16 (2 bytes a value); cosine vectors are
//!   L2-normalised before they are stored.
//! - Methods are async, but no lock is held across an `.await`: the embedded backend runs each
//!   call to completion on tokio's blocking pool; the PostgreSQL backend awaits its pooled
//!   connection and bounds every operation with timeouts, failing with [`Error::Unavailable`]
//!   rather than hanging when the database is out of reach.

pub mod embedded;
pub mod postgres;
mod rows;
mod rules;

pub use rules::{check_vector, validate_space};
use rules::{
    normalise_visibility, validate_label, validate_new_bank, validate_new_reference,
    validate_org_name, validate_source, validate_text,
};

use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use crate::hash::PdqHash;
use crate::model::{
    Actor, ApiKey, Bank, BankId, Category, Change, ChangeSeq, EmbeddingSpace, FrameEmbedding,
    FrameSignal, IndexedEmbedding, IndexedFrame, KeyId, Metric, NewApiKey, NewReference, OrgId,
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
/// Longest API key label, in bytes of UTF-8.
pub const MAX_LABEL_BYTES: usize = 256;
/// Longest partner feed name ([`Store::follow_cursor`] and the mirror methods), in bytes of
/// UTF-8.
pub const MAX_SOURCE_BYTES: usize = 512;
/// Longest embedding space name, in characters (`[a-z0-9_-]`).
pub const MAX_SPACE_NAME_CHARS: usize = 64;
/// Longest embedding vector, in values.
pub const MAX_DIMENSION: u32 = 4096;
/// Most embedding spaces one bank may declare.
pub const MAX_SPACES_PER_BANK: usize = 16;
/// Largest magnitude of a stored vector value: the largest finite f16.
pub const MAX_VECTOR_VALUE: f32 = 65504.0;
/// Name of the organisation every store creates when it is first opened.
pub const DEFAULT_ORG_NAME: &str = "local";

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bank, reference, organisation or API key does not exist.
    #[error("{kind} {key} not found")]
    NotFound {
        /// `"bank"`, `"reference"`, `"organisation"` or `"api key"`.
        kind: &'static str,
        /// The id or name that was looked up.
        key: String,
    },
    /// A bank or organisation with that name, or an API key with that digest, already exists.
    #[error("{kind} {key:?} already exists")]
    AlreadyExists {
        /// `"bank"`, `"organisation"` or `"api key"`.
        kind: &'static str,
        /// The name that is taken (for an API key, the words "with this digest": never the
        /// digest itself).
        key: String,
    },
    /// The reference was already withdrawn.
    #[error("reference {reference} is already withdrawn")]
    AlreadyWithdrawn {
        /// The reference.
        reference: ReferenceId,
    },
    /// The API key was already revoked.
    #[error("api key {key} is already revoked")]
    AlreadyRevoked {
        /// The key.
        key: KeyId,
    },
    /// A bank declares an embedding space under a name the server already knows with another
    /// dimension or metric (a space is server-wide: one index serves every bank declaring it).
    #[error(
        "embedding space {space:?} exists with dimension {dimension} ({metric}); \
         cannot declare it with dimension {asked_dimension} ({asked_metric})"
    )]
    SpaceConflict {
        /// The space's name.
        space: String,
        /// Its dimension as stored.
        dimension: u32,
        /// Its metric as stored.
        metric: Metric,
        /// The dimension asked for.
        asked_dimension: u32,
        /// The metric asked for.
        asked_metric: Metric,
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
#[derive(Clone, Debug, PartialEq)]
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
    /// The embedding spaces it holds beside PDQ: up to [`MAX_SPACES_PER_BANK`], distinct names
    /// of 1 to [`MAX_SPACE_NAME_CHARS`] characters of `[a-z0-9_-]`, dimension 1 to
    /// [`MAX_DIMENSION`], a finite threshold (for cosine, above 0 and at most 1). Fixed for the
    /// bank's life; kept sorted by name.
    pub embedding_spaces: Vec<EmbeddingSpace>,
}

/// Everything the index is loaded with at start-up, from one consistent snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ActiveSignals {
    /// Every PDQ frame of every active reference.
    pub frames: Vec<IndexedFrame>,
    /// Every vector of every active reference.
    pub embeddings: Vec<IndexedEmbedding>,
    /// The change-log position they reflect.
    pub seq: ChangeSeq,
}

/// One bank's reference counts ([`Store::bank_counts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BankCounts {
    /// References that match.
    pub active_references: u64,
    /// References withdrawn.
    pub withdrawn_references: u64,
    /// Frame signals stored for its references, active and withdrawn.
    pub frames: u64,
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
    /// API keys not revoked.
    pub api_keys: u64,
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

    /// Creates an organisation. Its change entry names `actor`, or with `None` the new
    /// organisation itself (without a key: the server creating it, e.g. at bootstrap).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the name is empty, longer than [`MAX_NAME_CHARS`], has
    /// control characters or leading/trailing whitespace, or the actor's key acts for another
    /// organisation (`"actor"`); [`Error::AlreadyExists`] when the name is taken;
    /// [`Error::NotFound`] when the actor's organisation (`"organisation"`) or key (`"api key"`)
    /// does not exist; backend errors.
    pub async fn create_org(
        &self,
        name: &str,
        actor: Option<Actor>,
    ) -> Result<Organisation, Error> {
        validate_org_name(name)?;
        match self {
            Store::Embedded(store) => store.create_org(name.to_string(), actor).await,
            Store::Postgres(store) => store.create_org(name.to_string(), actor).await,
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
    /// [`Error::InvalidInput`] for a bad name, an over-long description or a bad embedding
    /// space (`"embedding_spaces"`), or an actor whose key acts for another organisation
    /// (`"actor"`); [`Error::SpaceConflict`] when a space name is known with another dimension
    /// or metric; [`Error::NotFound`] when the owner, the
    /// actor or an organisation it is shared with (`"organisation"`), or the actor's key
    /// (`"api key"`), does not exist; [`Error::AlreadyExists`] when the name is taken; backend
    /// errors.
    pub async fn create_bank(&self, new: NewBank, actor: Actor) -> Result<Bank, Error> {
        let new = validate_new_bank(new)?;
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
    /// [`Error::NotFound`] when the bank (`"bank"`), the adding organisation or the actor's
    /// (`"organisation"`), or the actor's key (`"api key"`) does not exist;
    /// [`Error::InvalidInput`] (`"actor"`) when the actor's key acts for another organisation;
    /// backend errors.
    ///
    /// The reference's [`Reference::added_by`] is `new.added_by`; the change names `actor`.
    ///
    /// Its vectors ([`NewReference::embeddings`]) are stored in the same transaction: each must
    /// name one of the bank's spaces, have its dimension, finite values within
    /// [`MAX_VECTOR_VALUE`], and at most one vector per space and frame index
    /// ([`Error::InvalidInput`] `"embeddings"`, naming the space and the numbers). Vectors of
    /// cosine spaces are L2-normalised (a zero vector is refused). A reference may have no PDQ
    /// frame when it has at least one vector.
    pub async fn add_reference(&self, new: NewReference, actor: Actor) -> Result<Reference, Error> {
        let bank = self.get_bank(new.bank).await?;
        let new = validate_new_reference(new, &bank)?;
        match self {
            Store::Embedded(store) => store.add_reference(new, actor).await,
            Store::Postgres(store) => store.add_reference(new, actor).await,
        }
    }

    /// Withdraws a reference so it never matches again; its frames stay stored. The change's
    /// detail is the reason.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the reason is empty or longer than [`MAX_TEXT_BYTES`], or
    /// the actor's key acts for another organisation (`"actor"`); [`Error::NotFound`] when the
    /// reference (`"reference"`), the actor (`"organisation"`) or its key (`"api key"`) does not
    /// exist; [`Error::AlreadyWithdrawn`]; backend errors.
    pub async fn withdraw_reference(
        &self,
        id: ReferenceId,
        reason: &str,
        actor: Actor,
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

    /// Replaces a bank's visibility (and its share list, normalised as [`Store::create_bank`]
    /// does) and appends a `BankUpdated` change whose detail describes the new visibility:
    /// `private`, `public` or `shared with 2,5`.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the bank (`"bank"`), a listed organisation or the actor
    /// (`"organisation"`), or the actor's key (`"api key"`) does not exist;
    /// [`Error::InvalidInput`] (`"actor"`) when the actor's key acts for another organisation;
    /// backend errors.
    pub async fn update_bank_visibility(
        &self,
        bank: BankId,
        visibility: Visibility,
        actor: Actor,
    ) -> Result<Bank, Error> {
        let visibility = normalise_visibility(visibility);
        match self {
            Store::Embedded(store) => store.update_bank_visibility(bank, visibility, actor).await,
            Store::Postgres(store) => store.update_bank_visibility(bank, visibility, actor).await,
        }
    }

    /// Stores a new API key (its digest only) and appends a `KeyCreated` change whose detail is
    /// the key's role and label.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the label is longer than [`MAX_LABEL_BYTES`] or has control
    /// characters, or the actor's key acts for another organisation (`"actor"`);
    /// [`Error::NotFound`] when the key's organisation or the actor (`"organisation"`), or the
    /// actor's key (`"api key"`), does not exist; [`Error::AlreadyExists`] (`"api key"`) when a
    /// key with the same digest exists; backend errors.
    pub async fn create_api_key(&self, new: NewApiKey, actor: Actor) -> Result<ApiKey, Error> {
        validate_label(&new.label)?;
        match self {
            Store::Embedded(store) => store.create_api_key(new, actor).await,
            Store::Postgres(store) => store.create_api_key(new, actor).await,
        }
    }

    /// Revokes an API key for ever and appends a `KeyRevoked` change whose detail is the key's
    /// role and label. A key may revoke itself.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the key (`"api key"`), the actor (`"organisation"`) or the
    /// actor's key (`"api key"`) does not exist; [`Error::AlreadyRevoked`];
    /// [`Error::InvalidInput`] (`"actor"`) when the actor's key acts for another organisation;
    /// backend errors.
    pub async fn revoke_api_key(&self, id: KeyId, actor: Actor) -> Result<ApiKey, Error> {
        match self {
            Store::Embedded(store) => store.revoke_api_key(id, actor).await,
            Store::Postgres(store) => store.revoke_api_key(id, actor).await,
        }
    }

    /// One API key by id, revoked or not.
    ///
    /// # Errors
    /// [`Error::NotFound`] (`"api key"`); [`Error::Corrupt`]; backend errors.
    pub async fn get_api_key(&self, id: KeyId) -> Result<ApiKey, Error> {
        match self {
            Store::Embedded(store) => store.get_api_key(id).await,
            Store::Postgres(store) => store.get_api_key(id).await,
        }
    }

    /// Every API key, revoked ones included, by id.
    ///
    /// # Errors
    /// [`Error::Corrupt`]; backend errors.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKey>, Error> {
        match self {
            Store::Embedded(store) => store.list_api_keys().await,
            Store::Postgres(store) => store.list_api_keys().await,
        }
    }

    /// The position up to which the partner feed `source` has been mirrored
    /// (`ChangeSeq(0)` when it never was).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (`"source"`) for an empty or over-long name
    /// ([`MAX_SOURCE_BYTES`]); [`Error::Corrupt`] for a negative stored cursor; backend errors.
    pub async fn follow_cursor(&self, source: &str) -> Result<ChangeSeq, Error> {
        validate_source(source)?;
        match self {
            Store::Embedded(store) => store.follow_cursor(source.to_string()).await,
            Store::Postgres(store) => store.follow_cursor(source.to_string()).await,
        }
    }

    /// Records (durably) that the partner feed `source` has been mirrored up to `seq`. Local
    /// bookkeeping: appends no change. May move the cursor backwards (to replay a feed; the
    /// mirror methods are idempotent).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a bad `source` or a negative `seq` (`"cursor"`); backend
    /// errors.
    pub async fn set_follow_cursor(&self, source: &str, seq: ChangeSeq) -> Result<(), Error> {
        validate_source(source)?;
        if seq.0 < 0 {
            return Err(Error::InvalidInput {
                field: "cursor",
                reason: format!("{} is negative", seq.0),
            });
        }
        match self {
            Store::Embedded(store) => store.set_follow_cursor(source.to_string(), seq).await,
            Store::Postgres(store) => store.set_follow_cursor(source.to_string(), seq).await,
        }
    }

    /// The local bank mirroring bank `remote_id` of the partner feed `source`, if there is one.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (`"source"`); [`Error::Corrupt`]; backend errors.
    pub async fn mirrored_bank(&self, source: &str, remote_id: i64) -> Result<Option<Bank>, Error> {
        validate_source(source)?;
        match self {
            Store::Embedded(store) => store.mirrored_bank(source.to_string(), remote_id).await,
            Store::Postgres(store) => store.mirrored_bank(source.to_string(), remote_id).await,
        }
    }

    /// Creates the local bank mirroring bank `remote_id` of the partner feed `source`, with its
    /// mapping and a `BankCreated` change, in one transaction. Idempotent: when the mapping
    /// exists already, returns the bank it names unchanged (whatever `new` says) and appends
    /// nothing.
    ///
    /// # Errors
    /// As [`Store::create_bank`] (the bank name must be free unless the mapping exists), plus
    /// [`Error::InvalidInput`] (`"source"`).
    pub async fn create_mirrored_bank(
        &self,
        source: &str,
        remote_id: i64,
        new: NewBank,
        actor: Actor,
    ) -> Result<Bank, Error> {
        validate_source(source)?;
        let new = validate_new_bank(new)?;
        let source = source.to_string();
        match self {
            Store::Embedded(store) => {
                store
                    .create_mirrored_bank(source, remote_id, new, actor)
                    .await
            }
            Store::Postgres(store) => {
                store
                    .create_mirrored_bank(source, remote_id, new, actor)
                    .await
            }
        }
    }

    /// The local reference mirroring reference `remote_id` of the partner feed `source`, if
    /// there is one.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (`"source"`); backend errors.
    pub async fn mirrored_reference(
        &self,
        source: &str,
        remote_id: i64,
    ) -> Result<Option<ReferenceId>, Error> {
        validate_source(source)?;
        match self {
            Store::Embedded(store) => {
                store
                    .mirrored_reference(source.to_string(), remote_id)
                    .await
            }
            Store::Postgres(store) => {
                store
                    .mirrored_reference(source.to_string(), remote_id)
                    .await
            }
        }
    }

    /// Adds the local reference mirroring reference `remote_id` of the partner feed `source`:
    /// the reference, its frames, the mapping and a `ReferenceAdded` change in one transaction,
    /// returning it with `true`. Idempotent: when the mapping exists already, returns the
    /// reference it names (as it is now, perhaps withdrawn) with `false` and appends nothing.
    ///
    /// # Errors
    /// As [`Store::add_reference`], plus [`Error::InvalidInput`] (`"source"`).
    pub async fn add_mirrored_reference(
        &self,
        source: &str,
        remote_id: i64,
        new: NewReference,
        actor: Actor,
    ) -> Result<(Reference, bool), Error> {
        validate_source(source)?;
        let bank = self.get_bank(new.bank).await?;
        let new = validate_new_reference(new, &bank)?;
        let source = source.to_string();
        match self {
            Store::Embedded(store) => {
                store
                    .add_mirrored_reference(source, remote_id, new, actor)
                    .await
            }
            Store::Postgres(store) => {
                store
                    .add_mirrored_reference(source, remote_id, new, actor)
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

    /// The references of one bank, by id; withdrawn ones only with `include_withdrawn`.
    ///
    /// # Errors
    /// [`Error::NotFound`] (`"bank"`); [`Error::Corrupt`]; backend errors.
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

    /// The stored vectors of one reference, active or withdrawn, by space name then frame
    /// index (as f16 gives them back: within 5e-4 of each value stored).
    ///
    /// # Errors
    /// [`Error::NotFound`] (`"reference"`); [`Error::Corrupt`] for a stored vector of the wrong
    /// length; backend errors.
    pub async fn reference_embeddings(
        &self,
        id: ReferenceId,
    ) -> Result<Vec<FrameEmbedding>, Error> {
        match self {
            Store::Embedded(store) => store.reference_embeddings(id).await,
            Store::Postgres(store) => store.reference_embeddings(id).await,
        }
    }

    /// Every frame and every vector of every active reference, plus the change-log position they
    /// reflect, read from one consistent snapshot: apply `changes_since(seq)` afterwards to catch
    /// up. Order is unspecified but stable (by reference today).
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a stored hash that is not 32 bytes, a vector of the wrong length or
    /// an out-of-range number; backend errors.
    pub async fn load_active(&self) -> Result<ActiveSignals, Error> {
        match self {
            Store::Embedded(store) => store.load_active().await,
            Store::Postgres(store) => store.load_active().await,
        }
    }

    /// The PDQ half of [`Store::load_active`]: every frame of every active reference and the
    /// change-log position they reflect.
    ///
    /// # Errors
    /// As [`Store::load_active`].
    pub async fn load_active_frames(&self) -> Result<(Vec<IndexedFrame>, ChangeSeq), Error> {
        let active = self.load_active().await?;
        Ok((active.frames, active.seq))
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

    /// The audit trail: up to `limit` changes with a sequence number above `after`, in sequence
    /// order; with `bank`, only the changes concerning that bank (its creation, visibility
    /// changes, and references added to or withdrawn from it).
    ///
    /// # Errors
    /// [`Error::NotFound`] (`"bank"`) when `bank` does not exist; [`Error::Corrupt`] for an
    /// unreadable change entry; backend errors.
    pub async fn audit(
        &self,
        bank: Option<BankId>,
        after: ChangeSeq,
        limit: usize,
    ) -> Result<Vec<Change>, Error> {
        match self {
            Store::Embedded(store) => store.audit(bank, after, limit).await,
            Store::Postgres(store) => store.audit(bank, after, limit).await,
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

    /// Reference counts per bank that has references, so that `Stats` can count only the banks
    /// a caller may see.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a negative count; backend errors.
    pub async fn bank_counts(&self) -> Result<Vec<(BankId, BankCounts)>, Error> {
        match self {
            Store::Embedded(store) => store.bank_counts().await,
            Store::Postgres(store) => store.bank_counts().await,
        }
    }
}

#[cfg(test)]
mod tests;
