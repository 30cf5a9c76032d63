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

use std::collections::HashSet;
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

/// A bank as [`Store::create_bank`] accepts it: valid name and description, normalised shares,
/// valid embedding spaces sorted by name.
fn validate_new_bank(new: NewBank) -> Result<NewBank, Error> {
    validate_bank_name(&new.name)?;
    validate_text("description", &new.description)?;
    let mut spaces = new.embedding_spaces;
    if spaces.len() > MAX_SPACES_PER_BANK {
        return Err(Error::InvalidInput {
            field: "embedding_spaces",
            reason: format!("{} spaces, limit is {MAX_SPACES_PER_BANK}", spaces.len()),
        });
    }
    for space in &spaces {
        validate_space(space)?;
    }
    spaces.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(pair) = spaces.windows(2).find(|pair| pair[0].name == pair[1].name) {
        return Err(Error::InvalidInput {
            field: "embedding_spaces",
            reason: format!("embedding space {:?} is declared twice", pair[0].name),
        });
    }
    Ok(NewBank {
        visibility: normalise_visibility(new.visibility),
        embedding_spaces: spaces,
        ..new
    })
}

/// Checks an embedding space declaration against the documented rules.
///
/// # Errors
/// [`Error::InvalidInput`] (`"embedding_spaces"`) naming the space and the numbers.
pub fn validate_space(space: &EmbeddingSpace) -> Result<(), Error> {
    let invalid = |reason: String| Error::InvalidInput {
        field: "embedding_spaces",
        reason,
    };
    let chars = space.name.chars().count();
    if chars == 0 || chars > MAX_SPACE_NAME_CHARS {
        return Err(invalid(format!(
            "embedding space name {:?} has {chars} characters, must be 1 to {MAX_SPACE_NAME_CHARS}",
            space.name
        )));
    }
    if let Some(found) = space
        .name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-')))
    {
        return Err(invalid(format!(
            "embedding space name {:?} has {found:?}; use a-z, 0-9, '_', '-'",
            space.name
        )));
    }
    if !(1..=MAX_DIMENSION).contains(&space.dimension) {
        return Err(invalid(format!(
            "embedding space {:?} has dimension {}, must be 1 to {MAX_DIMENSION}",
            space.name, space.dimension
        )));
    }
    let threshold_ok = match space.metric {
        Metric::Cosine => space.threshold > 0.0 && space.threshold <= 1.0,
        Metric::Dot => space.threshold.is_finite(),
    };
    if !threshold_ok {
        return Err(invalid(format!(
            "embedding space {:?} has threshold {}; a {} threshold must be {}",
            space.name,
            space.threshold,
            space.metric,
            match space.metric {
                Metric::Cosine => "above 0 and at most 1",
                Metric::Dot => "finite",
            }
        )));
    }
    Ok(())
}

/// A reference as [`Store::add_reference`] accepts it into `bank`: valid texts, frames validated
/// and deduplicated, vectors checked against the bank's spaces (cosine ones normalised) and
/// sorted by space and frame index.
fn validate_new_reference(new: NewReference, bank: &Bank) -> Result<NewReference, Error> {
    validate_text("external_id", &new.external_id)?;
    validate_text("note", &new.note)?;
    let embeddings = validate_embeddings(new.embeddings, &bank.embedding_spaces)?;
    let frames = if new.frames.is_empty() && !embeddings.is_empty() {
        Vec::new()
    } else {
        dedup_frames(new.frames)?
    };
    Ok(NewReference {
        frames,
        embeddings,
        ..new
    })
}

/// Checks one vector against its space: the dimension, finite values within f16's range, and
/// for cosine a non-zero length; returns it L2-normalised for cosine spaces. `frame_index` only
/// names the frame in errors.
///
/// # Errors
/// [`Error::InvalidInput`] (`"embeddings"`) naming the space and the numbers.
pub fn check_vector(
    space: &EmbeddingSpace,
    frame_index: u32,
    mut vector: Vec<f32>,
) -> Result<Vec<f32>, Error> {
    let invalid = |reason: String| Error::InvalidInput {
        field: "embeddings",
        reason,
    };
    if vector.len() != space.dimension as usize {
        return Err(invalid(format!(
            "embedding space {:?} expects {} values, frame {frame_index} has {}",
            space.name,
            space.dimension,
            vector.len()
        )));
    }
    if let Some((position, value)) = vector
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite() || v.abs() > MAX_VECTOR_VALUE)
    {
        return Err(invalid(format!(
            "embedding space {:?}: frame {frame_index} value {position} is {value}; values must be finite and within ±{MAX_VECTOR_VALUE}",
            space.name
        )));
    }
    if space.metric == Metric::Cosine {
        let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
        if !norm.is_normal() {
            return Err(invalid(format!(
                "embedding space {:?}: frame {frame_index} has a vector of length {norm}; a cosine vector cannot be zero",
                space.name
            )));
        }
        for value in &mut vector {
            *value /= norm;
        }
    }
    Ok(vector)
}

/// Vectors as [`Store::add_reference`] accepts them for a bank with `spaces`.
fn validate_embeddings(
    mut embeddings: Vec<FrameEmbedding>,
    spaces: &[EmbeddingSpace],
) -> Result<Vec<FrameEmbedding>, Error> {
    if embeddings.len() > MAX_FRAMES_PER_REFERENCE {
        return Err(Error::InvalidInput {
            field: "embeddings",
            reason: format!(
                "{} vectors, limit is {MAX_FRAMES_PER_REFERENCE}",
                embeddings.len()
            ),
        });
    }
    for embedding in &mut embeddings {
        let Some(space) = spaces.iter().find(|s| s.name == embedding.space) else {
            let declared: Vec<&str> = spaces.iter().map(|s| s.name.as_str()).collect();
            return Err(Error::InvalidInput {
                field: "embeddings",
                reason: format!(
                    "frame {} has a vector of embedding space {:?}, which the bank does not declare (it declares [{}])",
                    embedding.frame_index,
                    embedding.space,
                    declared.join(", ")
                ),
            });
        };
        if i64::try_from(embedding.timestamp_ms).is_err() {
            return Err(Error::InvalidInput {
                field: "embeddings",
                reason: format!(
                    "frame {} has timestamp {} ms, limit is {} ms",
                    embedding.frame_index,
                    embedding.timestamp_ms,
                    i64::MAX
                ),
            });
        }
        embedding.vector = check_vector(
            space,
            embedding.frame_index,
            std::mem::take(&mut embedding.vector),
        )?;
    }
    embeddings.sort_by(|a, b| {
        a.space
            .cmp(&b.space)
            .then(a.frame_index.cmp(&b.frame_index))
    });
    if let Some(pair) = embeddings
        .windows(2)
        .find(|pair| pair[0].space == pair[1].space && pair[0].frame_index == pair[1].frame_index)
    {
        return Err(Error::InvalidInput {
            field: "embeddings",
            reason: format!(
                "frame {} has two vectors of embedding space {:?}; send one",
                pair[0].frame_index, pair[0].space
            ),
        });
    }
    Ok(embeddings)
}

/// API key labels: up to [`MAX_LABEL_BYTES`] bytes, no control characters (they end up in logs
/// and in the audit trail).
fn validate_label(label: &str) -> Result<(), Error> {
    if label.len() > MAX_LABEL_BYTES {
        return Err(Error::InvalidInput {
            field: "label",
            reason: format!("{} bytes, limit is {MAX_LABEL_BYTES}", label.len()),
        });
    }
    if let Some((position, found)) = label.chars().enumerate().find(|(_, c)| c.is_control()) {
        return Err(Error::InvalidInput {
            field: "label",
            reason: format!("control character {found:?} at position {position}"),
        });
    }
    Ok(())
}

/// Partner feed names: 1..=[`MAX_SOURCE_BYTES`] bytes.
fn validate_source(source: &str) -> Result<(), Error> {
    if source.is_empty() || source.len() > MAX_SOURCE_BYTES {
        return Err(Error::InvalidInput {
            field: "source",
            reason: format!("{} bytes, must be 1 to {MAX_SOURCE_BYTES}", source.len()),
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
    use crate::model::{ChangeKind, ReferenceState, Role};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// The server acting for `org`, without a key.
    fn sys(org: OrgId) -> Actor {
        Actor::system(org)
    }

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
            embedding_spaces: Vec::new(),
        }
    }

    fn new_reference(bank: BankId, added_by: OrgId, frames: Vec<FrameSignal>) -> NewReference {
        NewReference {
            bank,
            external_id: "ext-1".to_string(),
            note: "a note".to_string(),
            added_by,
            frames,
            embeddings: Vec::new(),
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
        assert_eq!(changes[0].actor, sys(local));
        assert_eq!(changes[0].detail, "");
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
        assert_eq!(changes[0].actor, sys(local));
        assert_eq!(store.stats().await?.organisations, 1);
        Ok(())
    }

    async fn orgs_round_trip_and_reject_duplicates(store: Store) -> TestResult {
        let acme = store.create_org("Acme Video Ltd", None).await?;
        assert_eq!(acme.name, "Acme Video Ltd");
        let orgs = store.list_orgs().await?;
        assert_eq!(orgs.len(), 2);
        assert_eq!(orgs[1], acme);
        let err = store.create_org("Acme Video Ltd", None).await;
        assert!(
            matches!(err, Err(Error::AlreadyExists { kind: "organisation", ref key }) if key == "Acme Video Ltd"),
            "{err:?}"
        );
        for bad in ["", " padded", "tab\there", &"x".repeat(MAX_NAME_CHARS + 1)] {
            let err = store.create_org(bad, None).await;
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
        store.create_org(&"é".repeat(MAX_NAME_CHARS), None).await?;
        Ok(())
    }

    async fn banks_round_trip_by_id_and_name(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let partner = store.create_org("partner", None).await?.id;
        let other = store.create_org("other", None).await?.id;

        let private = store
            .create_bank(new_bank("private.bank", local), sys(local))
            .await?;
        let shared = store
            .create_bank(
                NewBank {
                    visibility: Visibility::SharedWith(vec![other, partner, other]),
                    category: Category::Terrorism,
                    ..new_bank("shared_bank-1", local)
                },
                sys(local),
            )
            .await?;
        let public = store
            .create_bank(
                NewBank {
                    visibility: Visibility::Public,
                    category: Category::SuicideSelfHarm,
                    ..new_bank("public", partner)
                },
                sys(partner),
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
        store
            .create_bank(new_bank("dup", local), sys(local))
            .await?;
        let err = store.create_bank(new_bank("dup", local), sys(local)).await;
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
            let err = store.create_bank(new_bank(bad, local), sys(local)).await;
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
            store.create_bank(long, sys(local)).await,
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
            let err = store.create_bank(bank, sys(actor)).await;
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
        let bank = store
            .create_bank(new_bank("b", local), sys(local))
            .await?
            .id;
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
            .add_reference(new_reference(bank, local, frames), sys(local))
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
            .add_reference(new_reference(bank, local, vec![frame(0, 1)]), sys(local))
            .await?;
        assert_eq!(second.frame_count, 1);
        assert_eq!(store.stats().await?.frames, 4);
        Ok(())
    }

    async fn reference_errors(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let bank = store
            .create_bank(new_bank("b", local), sys(local))
            .await?
            .id;
        let before = store.last_seq().await?;

        let err = store
            .add_reference(new_reference(bank, local, vec![]), sys(local))
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
                .add_reference(new_reference(bank, local, vec![bad_quality]), sys(local))
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
                .add_reference(new_reference(bank, local, vec![bad_time]), sys(local))
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
            store.add_reference(long_note, sys(local)).await,
            Err(Error::InvalidInput { field: "note", .. })
        ));
        let err = store
            .add_reference(
                new_reference(BankId(77), local, vec![frame(0, 1)]),
                sys(local),
            )
            .await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "bank", ref key }) if key == "77"),
            "{err:?}"
        );
        let err = store
            .add_reference(
                new_reference(bank, OrgId(78), vec![frame(0, 1)]),
                sys(OrgId(78)),
            )
            .await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "organisation", ref key }) if key == "78"),
            "{err:?}"
        );
        for err in [
            store.get_reference(ReferenceId(5)).await.map(|_| ()),
            store.reference_frames(ReferenceId(5)).await.map(|_| ()),
            store
                .withdraw_reference(ReferenceId(5), "fp", sys(local))
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
        let bank = store
            .create_bank(new_bank("b", local), sys(local))
            .await?
            .id;
        let reference = store
            .add_reference(new_reference(bank, local, vec![frame(0, 1)]), sys(local))
            .await?;
        assert!(matches!(
            store
                .withdraw_reference(reference.id, " ", sys(local))
                .await,
            Err(Error::InvalidInput {
                field: "reason",
                ..
            })
        ));
        assert!(matches!(
            store
                .withdraw_reference(reference.id, "fp", sys(OrgId(999)))
                .await,
            Err(Error::NotFound {
                kind: "organisation",
                ..
            })
        ));
        let withdrawn = store
            .withdraw_reference(reference.id, "false positive", sys(local))
            .await?;
        let ReferenceState::Withdrawn { reason, at_ms } = &withdrawn.state else {
            panic!("not withdrawn: {withdrawn:?}");
        };
        assert_eq!(reason, "false positive");
        assert!(*at_ms >= reference.added_ms);
        assert_eq!(store.get_reference(reference.id).await?, withdrawn);
        let seq = store.last_seq().await?;
        let err = store
            .withdraw_reference(reference.id, "again", sys(local))
            .await;
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

        let partner = store.create_org("partner", None).await?.id;
        let bank = store
            .create_bank(new_bank("b", partner), sys(local))
            .await?
            .id;
        let reference = store
            .add_reference(
                new_reference(bank, partner, vec![frame(0, 1), frame(1, 2)]),
                sys(partner),
            )
            .await?
            .id;
        store
            .withdraw_reference(reference, "fp", sys(local))
            .await?;

        let changes = store.changes_since(start, 100).await?;
        let kinds: Vec<_> = changes.iter().map(|c| (c.kind.clone(), c.actor)).collect();
        assert_eq!(
            kinds,
            vec![
                (ChangeKind::OrgCreated(partner), sys(partner)),
                (ChangeKind::BankCreated(bank), sys(local)),
                (ChangeKind::ReferenceAdded { reference, bank }, sys(partner)),
                (
                    ChangeKind::ReferenceWithdrawn { reference, bank },
                    sys(local)
                ),
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

    fn digest(seed: u8) -> crate::model::KeyDigest {
        [seed; 32]
    }

    fn new_key(org: OrgId, role: Role, seed: u8, label: &str) -> NewApiKey {
        NewApiKey {
            org,
            role,
            digest: digest(seed),
            label: label.to_string(),
        }
    }

    /// The latest change; the log is never empty (the default organisation's creation).
    async fn last_change(store: &Store) -> Result<Change, Box<dyn std::error::Error>> {
        let seq = store.last_seq().await?;
        let mut changes = store.changes_since(ChangeSeq(seq.0 - 1), 1).await?;
        Ok(changes.pop().ok_or("empty change log")?)
    }

    async fn bank_visibility_updates_rewrite_shares_and_log_the_change(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let a = store.create_org("a", None).await?.id;
        let b = store.create_org("b", None).await?.id;
        let bank = store.create_bank(new_bank("b1", local), sys(local)).await?;
        let other = store
            .create_bank(
                NewBank {
                    visibility: Visibility::SharedWith(vec![a]),
                    ..new_bank("b2", local)
                },
                sys(local),
            )
            .await?;
        let actor = sys(a);

        let shared = store
            .update_bank_visibility(bank.id, Visibility::SharedWith(vec![b, a, b]), actor)
            .await?;
        assert_eq!(shared.visibility, Visibility::SharedWith(vec![a, b]));
        assert_eq!(
            shared,
            Bank {
                visibility: Visibility::SharedWith(vec![a, b]),
                ..bank.clone()
            }
        );
        assert_eq!(store.get_bank(bank.id).await?, shared);
        let change = last_change(&store).await?;
        assert_eq!(change.kind, ChangeKind::BankUpdated(bank.id));
        assert_eq!(change.actor, actor);
        assert_eq!(change.detail, format!("shared with {a},{b}"));

        let public = store
            .update_bank_visibility(bank.id, Visibility::Public, actor)
            .await?;
        assert_eq!(public.visibility, Visibility::Public);
        assert_eq!(
            store.get_bank(bank.id).await?.visibility,
            Visibility::Public
        );
        assert_eq!(last_change(&store).await?.detail, "public");

        // Back to shared with one: the old shares are gone, not merged.
        store
            .update_bank_visibility(bank.id, Visibility::SharedWith(vec![b]), actor)
            .await?;
        assert_eq!(
            store.get_bank(bank.id).await?.visibility,
            Visibility::SharedWith(vec![b])
        );
        let private = store
            .update_bank_visibility(bank.id, Visibility::Private, actor)
            .await?;
        assert_eq!(private.visibility, Visibility::Private);
        assert_eq!(last_change(&store).await?.detail, "private");
        // Another bank's shares are untouched.
        assert_eq!(store.get_bank(other.id).await?, other);
        assert_eq!(
            store.list_banks().await?,
            vec![private.clone(), other.clone()]
        );

        let before = store.last_seq().await?;
        let err = store
            .update_bank_visibility(BankId(999), Visibility::Public, actor)
            .await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "bank", ref key }) if key == "999"),
            "{err:?}"
        );
        let err = store
            .update_bank_visibility(bank.id, Visibility::SharedWith(vec![a, OrgId(998)]), actor)
            .await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "organisation", ref key }) if key == "998"),
            "{err:?}"
        );
        let err = store
            .update_bank_visibility(bank.id, Visibility::Public, sys(OrgId(997)))
            .await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "organisation", ref key }) if key == "997"),
            "{err:?}"
        );
        // Failed updates change nothing and log nothing.
        assert_eq!(store.get_bank(bank.id).await?, private);
        assert_eq!(store.last_seq().await?, before);
        Ok(())
    }

    async fn api_keys_round_trip_and_revoke_once(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let partner = store.create_org("partner", None).await?.id;

        let admin = store
            .create_api_key(new_key(local, Role::Admin, 1, "ops"), sys(local))
            .await?;
        assert_eq!(admin.org, local);
        assert_eq!(admin.role, Role::Admin);
        assert_eq!(admin.digest, digest(1));
        assert_eq!(admin.label, "ops");
        assert_eq!(admin.revoked_ms, None);
        assert!(admin.created_ms > 0);
        let change = last_change(&store).await?;
        assert_eq!(
            change.kind,
            ChangeKind::KeyCreated {
                key: admin.id,
                org: local
            }
        );
        assert_eq!(change.actor, sys(local));
        assert_eq!(change.detail, "admin: ops");

        // A key of one organisation made by another's admin key; labels may be empty.
        let by_admin = Actor {
            org: local,
            key: Some(admin.id),
        };
        let matcher = store
            .create_api_key(new_key(partner, Role::Matcher, 2, ""), by_admin)
            .await?;
        let change = last_change(&store).await?;
        assert_eq!(
            change.kind,
            ChangeKind::KeyCreated {
                key: matcher.id,
                org: partner
            }
        );
        assert_eq!(change.actor, by_admin);
        assert_eq!(change.detail, "matcher");
        let longest = store
            .create_api_key(
                new_key(partner, Role::Contributor, 3, &"l".repeat(MAX_LABEL_BYTES)),
                by_admin,
            )
            .await?;

        assert_eq!(store.get_api_key(admin.id).await?, admin);
        assert_eq!(store.get_api_key(matcher.id).await?, matcher);
        assert_eq!(
            store.list_api_keys().await?,
            vec![admin.clone(), matcher.clone(), longest.clone()]
        );
        assert_eq!(store.stats().await?.api_keys, 3);

        let before = store.last_seq().await?;
        let err = store
            .create_api_key(new_key(partner, Role::Matcher, 1, "again"), by_admin)
            .await;
        assert!(
            matches!(
                err,
                Err(Error::AlreadyExists {
                    kind: "api key",
                    ..
                })
            ),
            "{err:?}"
        );
        let err = store
            .create_api_key(new_key(OrgId(99), Role::Matcher, 4, ""), by_admin)
            .await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "organisation", ref key }) if key == "99"),
            "{err:?}"
        );
        for label in ["l".repeat(MAX_LABEL_BYTES + 1), "tab\there".to_string()] {
            let err = store
                .create_api_key(new_key(local, Role::Matcher, 5, &label), by_admin)
                .await;
            assert!(
                matches!(err, Err(Error::InvalidInput { field: "label", .. })),
                "{err:?}"
            );
        }
        // The acting key must exist and act for the acting organisation.
        let err = store
            .create_api_key(
                new_key(local, Role::Matcher, 6, ""),
                Actor {
                    org: local,
                    key: Some(KeyId(77)),
                },
            )
            .await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "api key", ref key }) if key == "77"),
            "{err:?}"
        );
        let err = store
            .create_api_key(
                new_key(local, Role::Matcher, 6, ""),
                Actor {
                    org: partner,
                    key: Some(admin.id),
                },
            )
            .await;
        assert!(
            matches!(err, Err(Error::InvalidInput { field: "actor", .. })),
            "{err:?}"
        );
        assert_eq!(store.last_seq().await?, before);
        assert_eq!(store.list_api_keys().await?.len(), 3);

        let revoked = store.revoke_api_key(matcher.id, by_admin).await?;
        let at_ms = revoked.revoked_ms.ok_or("not revoked")?;
        assert!(at_ms >= matcher.created_ms);
        assert_eq!(
            revoked,
            ApiKey {
                revoked_ms: Some(at_ms),
                ..matcher.clone()
            }
        );
        assert_eq!(store.get_api_key(matcher.id).await?, revoked);
        let change = last_change(&store).await?;
        assert_eq!(
            change.kind,
            ChangeKind::KeyRevoked {
                key: matcher.id,
                org: partner
            }
        );
        assert_eq!(change.actor, by_admin);
        assert_eq!(change.detail, "matcher");
        // Revoked keys stay listed; only active ones count.
        assert_eq!(
            store.list_api_keys().await?,
            vec![admin.clone(), revoked, longest]
        );
        assert_eq!(store.stats().await?.api_keys, 2);

        let seq = store.last_seq().await?;
        let err = store.revoke_api_key(matcher.id, by_admin).await;
        assert!(
            matches!(err, Err(Error::AlreadyRevoked { key }) if key == matcher.id),
            "{err:?}"
        );
        let err = store.revoke_api_key(KeyId(555), by_admin).await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "api key", ref key }) if key == "555"),
            "{err:?}"
        );
        let err = store.get_api_key(KeyId(555)).await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "api key", ref key }) if key == "555"),
            "{err:?}"
        );
        assert_eq!(store.last_seq().await?, seq);

        // A key may revoke itself; the change names it.
        let own = Actor {
            org: local,
            key: Some(admin.id),
        };
        store.revoke_api_key(admin.id, own).await?;
        let change = last_change(&store).await?;
        assert_eq!(change.actor, own);
        assert_eq!(change.detail, "admin: ops");
        assert_eq!(store.stats().await?.api_keys, 1);
        Ok(())
    }

    /// Every write appends exactly one change naming the acting organisation and key; the
    /// follow cursor and repeated mirror writes append none.
    async fn each_write_names_its_actor_org_and_key(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let admin = store
            .create_api_key(new_key(local, Role::Admin, 1, "admin"), sys(local))
            .await?;
        let actor = Actor {
            org: local,
            key: Some(admin.id),
        };
        let mut seq = store.last_seq().await?;
        // Checks that exactly one change was appended since the previous check, by `actor`.
        let mut one_more = async |store: &Store, expected: ChangeKind| -> TestResult {
            let changes = store.changes_since(seq, 10).await?;
            assert_eq!(changes.len(), 1, "{changes:?}");
            assert_eq!(changes[0].seq.0, seq.0 + 1);
            assert_eq!(changes[0].kind, expected);
            assert_eq!(changes[0].actor, actor);
            seq = changes[0].seq;
            Ok(())
        };

        let org = store.create_org("partner", Some(actor)).await?.id;
        one_more(&store, ChangeKind::OrgCreated(org)).await?;
        let bank = store.create_bank(new_bank("b", org), actor).await?.id;
        one_more(&store, ChangeKind::BankCreated(bank)).await?;
        store
            .update_bank_visibility(bank, Visibility::Public, actor)
            .await?;
        one_more(&store, ChangeKind::BankUpdated(bank)).await?;
        let reference = store
            .add_reference(new_reference(bank, org, vec![frame(0, 1)]), actor)
            .await?;
        // added_by is the reference's; the actor is the change's.
        assert_eq!(reference.added_by, org);
        let reference = reference.id;
        one_more(&store, ChangeKind::ReferenceAdded { reference, bank }).await?;
        let withdrawn = store
            .withdraw_reference(reference, "duplicate of 7", actor)
            .await?;
        assert!(matches!(withdrawn.state, ReferenceState::Withdrawn { .. }));
        one_more(&store, ChangeKind::ReferenceWithdrawn { reference, bank }).await?;
        assert_eq!(last_change(&store).await?.detail, "duplicate of 7");
        let key = store
            .create_api_key(new_key(org, Role::Contributor, 2, "k"), actor)
            .await?
            .id;
        one_more(&store, ChangeKind::KeyCreated { key, org }).await?;
        store.revoke_api_key(key, actor).await?;
        one_more(&store, ChangeKind::KeyRevoked { key, org }).await?;

        let mirrored = store
            .create_mirrored_bank("peer", 10, new_bank("peer.b", org), actor)
            .await?
            .id;
        one_more(&store, ChangeKind::BankCreated(mirrored)).await?;
        let (mirrored_ref, created) = store
            .add_mirrored_reference(
                "peer",
                20,
                new_reference(mirrored, org, vec![frame(0, 2)]),
                actor,
            )
            .await?;
        assert!(created);
        one_more(
            &store,
            ChangeKind::ReferenceAdded {
                reference: mirrored_ref.id,
                bank: mirrored,
            },
        )
        .await?;

        // No change for these.
        store
            .create_mirrored_bank("peer", 10, new_bank("peer.b", org), actor)
            .await?;
        store
            .add_mirrored_reference(
                "peer",
                20,
                new_reference(mirrored, org, vec![frame(0, 2)]),
                actor,
            )
            .await?;
        store.set_follow_cursor("peer", ChangeSeq(42)).await?;
        assert_eq!(store.last_seq().await?, seq);
        Ok(())
    }

    async fn audit_filters_by_bank_in_order(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let actor = sys(local);
        let b1 = store.create_bank(new_bank("b1", local), actor).await?.id;
        let b2 = store.create_bank(new_bank("b2", local), actor).await?.id;
        let r1 = store
            .add_reference(new_reference(b1, local, vec![frame(0, 1)]), actor)
            .await?
            .id;
        let r2 = store
            .add_reference(new_reference(b2, local, vec![frame(0, 2)]), actor)
            .await?
            .id;
        store.create_org("unrelated", None).await?;
        store
            .update_bank_visibility(b1, Visibility::Public, actor)
            .await?;
        store.withdraw_reference(r2, "fp", actor).await?;
        store.withdraw_reference(r1, "fp", actor).await?;

        let all = store.changes_since(ChangeSeq(0), 100).await?;
        assert_eq!(store.audit(None, ChangeSeq(0), 100).await?, all);
        assert_eq!(
            store.audit(None, ChangeSeq(3), 2).await?,
            store.changes_since(ChangeSeq(3), 2).await?
        );

        let of_b1 = store.audit(Some(b1), ChangeSeq(0), 100).await?;
        let kinds: Vec<ChangeKind> = of_b1.iter().map(|c| c.kind.clone()).collect();
        assert_eq!(
            kinds,
            vec![
                ChangeKind::BankCreated(b1),
                ChangeKind::ReferenceAdded {
                    reference: r1,
                    bank: b1
                },
                ChangeKind::BankUpdated(b1),
                ChangeKind::ReferenceWithdrawn {
                    reference: r1,
                    bank: b1
                },
            ]
        );
        // The same entries as in the full log.
        for change in &of_b1 {
            assert!(all.contains(change), "{change:?}");
        }
        assert!(of_b1.windows(2).all(|w| w[0].seq < w[1].seq));
        // Paging by sequence number within the filter.
        assert_eq!(store.audit(Some(b1), of_b1[1].seq, 2).await?, of_b1[2..4]);
        assert_eq!(store.audit(Some(b1), ChangeSeq(0), 1).await?, of_b1[..1]);
        assert!(store.audit(Some(b1), of_b1[3].seq, 10).await?.is_empty());
        assert_eq!(store.audit(Some(b2), ChangeSeq(0), 100).await?.len(), 3);

        let err = store.audit(Some(BankId(404)), ChangeSeq(0), 10).await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "bank", ref key }) if key == "404"),
            "{err:?}"
        );
        Ok(())
    }

    async fn list_references_of_a_bank(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let actor = sys(local);
        let b1 = store.create_bank(new_bank("b1", local), actor).await?.id;
        let b2 = store.create_bank(new_bank("b2", local), actor).await?.id;
        let r1 = store
            .add_reference(new_reference(b1, local, vec![frame(0, 1)]), actor)
            .await?;
        store
            .add_reference(new_reference(b2, local, vec![frame(0, 2)]), actor)
            .await?;
        let r3 = store
            .add_reference(
                new_reference(b1, local, vec![frame(0, 3), frame(1, 4)]),
                actor,
            )
            .await?;
        let r3 = store.withdraw_reference(r3.id, "fp", actor).await?;
        assert_eq!(store.list_references(b1, false).await?, vec![r1.clone()]);
        assert_eq!(store.list_references(b1, true).await?, vec![r1, r3]);
        let empty = store.create_bank(new_bank("b3", local), actor).await?.id;
        assert!(store.list_references(empty, true).await?.is_empty());
        let err = store.list_references(BankId(404), true).await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "bank", ref key }) if key == "404"),
            "{err:?}"
        );
        Ok(())
    }

    async fn follow_cursors_are_per_source_and_upserted(store: Store) -> TestResult {
        let seq = store.last_seq().await?;
        assert_eq!(
            store.follow_cursor("https://a.example").await?,
            ChangeSeq(0)
        );
        store
            .set_follow_cursor("https://a.example", ChangeSeq(17))
            .await?;
        store
            .set_follow_cursor("https://b.example", ChangeSeq(3))
            .await?;
        assert_eq!(
            store.follow_cursor("https://a.example").await?,
            ChangeSeq(17)
        );
        assert_eq!(
            store.follow_cursor("https://b.example").await?,
            ChangeSeq(3)
        );
        store
            .set_follow_cursor("https://a.example", ChangeSeq(20))
            .await?;
        assert_eq!(
            store.follow_cursor("https://a.example").await?,
            ChangeSeq(20)
        );
        // Backwards is allowed: replaying a feed is safe.
        store
            .set_follow_cursor("https://a.example", ChangeSeq(0))
            .await?;
        assert_eq!(
            store.follow_cursor("https://a.example").await?,
            ChangeSeq(0)
        );
        assert_eq!(
            store.follow_cursor("https://b.example").await?,
            ChangeSeq(3)
        );

        let err = store.set_follow_cursor("x", ChangeSeq(-1)).await;
        assert!(
            matches!(
                err,
                Err(Error::InvalidInput {
                    field: "cursor",
                    ..
                })
            ),
            "{err:?}"
        );
        for bad in [String::new(), "s".repeat(MAX_SOURCE_BYTES + 1)] {
            let err = store.set_follow_cursor(&bad, ChangeSeq(1)).await;
            assert!(
                matches!(
                    err,
                    Err(Error::InvalidInput {
                        field: "source",
                        ..
                    })
                ),
                "{err:?}"
            );
            let err = store.follow_cursor(&bad).await;
            assert!(
                matches!(
                    err,
                    Err(Error::InvalidInput {
                        field: "source",
                        ..
                    })
                ),
                "{err:?}"
            );
        }
        // Bookkeeping, not data: no change entries.
        assert_eq!(store.last_seq().await?, seq);
        Ok(())
    }

    async fn mirrored_banks_are_created_once(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let partner = store.create_org("partner", None).await?.id;
        let actor = sys(local);
        assert_eq!(store.mirrored_bank("peer", 1).await?, None);

        let bank = store
            .create_mirrored_bank(
                "peer",
                1,
                NewBank {
                    visibility: Visibility::SharedWith(vec![partner, partner]),
                    ..new_bank("peer.violence", local)
                },
                actor,
            )
            .await?;
        assert_eq!(bank.visibility, Visibility::SharedWith(vec![partner]));
        assert_eq!(store.get_bank(bank.id).await?, bank);
        assert_eq!(store.mirrored_bank("peer", 1).await?, Some(bank.clone()));
        let seq = store.last_seq().await?;
        assert_eq!(
            last_change(&store).await?.kind,
            ChangeKind::BankCreated(bank.id)
        );

        // Again, even with different contents: the existing bank, unchanged, no change entry.
        let again = store
            .create_mirrored_bank(
                "peer",
                1,
                NewBank {
                    visibility: Visibility::Public,
                    ..new_bank("peer.other-name", local)
                },
                actor,
            )
            .await?;
        assert_eq!(again, bank);
        assert_eq!(store.last_seq().await?, seq);
        assert_eq!(store.list_banks().await?, vec![bank.clone()]);

        // The same remote id from another source is another bank.
        let other = store
            .create_mirrored_bank("peer2", 1, new_bank("peer2.violence", local), actor)
            .await?;
        assert_ne!(other.id, bank.id);
        assert_eq!(store.mirrored_bank("peer2", 1).await?, Some(other));
        assert_eq!(store.mirrored_bank("peer", 2).await?, None);

        // A name taken by a local bank: refused, and no mapping is left behind.
        store.create_bank(new_bank("taken", local), actor).await?;
        let seq = store.last_seq().await?;
        let err = store
            .create_mirrored_bank("peer", 3, new_bank("taken", local), actor)
            .await;
        assert!(
            matches!(err, Err(Error::AlreadyExists { kind: "bank", ref key }) if key == "taken"),
            "{err:?}"
        );
        let err = store
            .create_mirrored_bank("peer", 3, new_bank("bad name", local), actor)
            .await;
        assert!(
            matches!(
                err,
                Err(Error::InvalidInput {
                    field: "bank name",
                    ..
                })
            ),
            "{err:?}"
        );
        let err = store
            .create_mirrored_bank("", 3, new_bank("fine", local), actor)
            .await;
        assert!(
            matches!(
                err,
                Err(Error::InvalidInput {
                    field: "source",
                    ..
                })
            ),
            "{err:?}"
        );
        let err = store
            .create_mirrored_bank("peer", 3, new_bank("fine", OrgId(404)), actor)
            .await;
        assert!(
            matches!(
                err,
                Err(Error::NotFound {
                    kind: "organisation",
                    ..
                })
            ),
            "{err:?}"
        );
        assert_eq!(store.mirrored_bank("peer", 3).await?, None);
        assert_eq!(store.last_seq().await?, seq);
        Ok(())
    }

    async fn mirrored_references_are_added_once(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let actor = sys(local);
        let bank = store
            .create_mirrored_bank("peer", 1, new_bank("peer.b", local), actor)
            .await?
            .id;
        assert_eq!(store.mirrored_reference("peer", 5).await?, None);

        let frames = vec![frame(1, 2), frame(0, 1), frame(2, 1)];
        let (reference, created) = store
            .add_mirrored_reference("peer", 5, new_reference(bank, local, frames.clone()), actor)
            .await?;
        assert!(created);
        // Validated and deduplicated like any reference.
        assert_eq!(reference.frame_count, 2);
        assert_eq!(
            store.reference_frames(reference.id).await?,
            vec![frame(0, 1), frame(1, 2)]
        );
        assert_eq!(store.get_reference(reference.id).await?, reference);
        assert_eq!(
            store.mirrored_reference("peer", 5).await?,
            Some(reference.id)
        );
        let seq = store.last_seq().await?;

        let (again, created) = store
            .add_mirrored_reference(
                "peer",
                5,
                new_reference(bank, local, vec![frame(0, 9)]),
                actor,
            )
            .await?;
        assert!(!created);
        assert_eq!(again, reference);
        assert_eq!(store.last_seq().await?, seq);
        assert_eq!(store.stats().await?.frames, 2);

        // After a withdrawal, the mapping returns the reference as it is now.
        let withdrawn = store.withdraw_reference(reference.id, "fp", actor).await?;
        let (again, created) = store
            .add_mirrored_reference("peer", 5, new_reference(bank, local, frames), actor)
            .await?;
        assert!(!created);
        assert_eq!(again, withdrawn);

        // Failed mirrors leave neither a reference, nor a mapping, nor a change.
        let seq = store.last_seq().await?;
        let err = store
            .add_mirrored_reference(
                "peer",
                6,
                new_reference(BankId(404), local, vec![frame(0, 3)]),
                actor,
            )
            .await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "bank", ref key }) if key == "404"),
            "{err:?}"
        );
        let err = store
            .add_mirrored_reference("peer", 6, new_reference(bank, local, vec![]), actor)
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
        let err = store
            .add_mirrored_reference(
                "peer",
                6,
                new_reference(bank, local, vec![frame(0, 3)]),
                sys(OrgId(404)),
            )
            .await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "organisation", ref key }) if key == "404"),
            "{err:?}"
        );
        assert_eq!(store.mirrored_reference("peer", 6).await?, None);
        assert_eq!(store.last_seq().await?, seq);
        assert_eq!(store.stats().await?.active_references, 0);
        Ok(())
    }

    async fn load_active_frames_excludes_withdrawn(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let b1 = store
            .create_bank(new_bank("b1", local), sys(local))
            .await?
            .id;
        let b2 = store
            .create_bank(new_bank("b2", local), sys(local))
            .await?
            .id;
        let r1 = store
            .add_reference(
                new_reference(b1, local, vec![frame(0, 1), frame(1, 2)]),
                sys(local),
            )
            .await?
            .id;
        let r2 = store
            .add_reference(new_reference(b2, local, vec![frame(0, 3)]), sys(local))
            .await?
            .id;
        let r3 = store
            .add_reference(new_reference(b1, local, vec![frame(7, 4)]), sys(local))
            .await?
            .id;
        store.withdraw_reference(r2, "fp", sys(local)).await?;

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
                api_keys: 0,
                last_seq: seq,
            }
        );
        Ok(())
    }

    fn space(name: &str, dimension: u32, metric: Metric, threshold: f32) -> EmbeddingSpace {
        EmbeddingSpace {
            name: name.to_string(),
            dimension,
            metric,
            threshold,
            index: None,
        }
    }

    fn vector_of(frame_index: u32, space: &str, vector: Vec<f32>) -> FrameEmbedding {
        FrameEmbedding {
            frame_index,
            timestamp_ms: u64::from(frame_index) * 1000,
            space: space.to_string(),
            vector,
        }
    }

    /// A deterministic vector with values spread over [-1, 1].
    fn wavy(dimension: usize, seed: f32) -> Vec<f32> {
        (0..dimension)
            .map(|i| ((i as f32 + 1.0) * seed).sin())
            .collect()
    }

    fn unit(mut v: Vec<f32>) -> Vec<f32> {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        for x in &mut v {
            *x /= norm;
        }
        v
    }

    fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32) {
        assert_eq!(actual.len(), expected.len());
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!(
                (a - e).abs() <= tolerance,
                "value {i}: {a} is not within {tolerance} of {e}"
            );
        }
    }

    fn bank_with_spaces(name: &str, owner: OrgId, spaces: Vec<EmbeddingSpace>) -> NewBank {
        NewBank {
            embedding_spaces: spaces,
            ..new_bank(name, owner)
        }
    }

    /// What both drivers' schema-3 upgrade tests check once the store is open (each wrote bank
    /// 1 of org 1 with the space "sscd", 4 values, cosine, in the schema-3 form): the old space
    /// reads back without settings (the defaults), and a new bank declaring it and a new space
    /// "fresh" with settings stores them for the new space only. Returns the new bank, to
    /// compare after reopening.
    pub(super) async fn schema_3_spaces_gain_index_settings(
        store: &Store,
    ) -> Result<Bank, Box<dyn std::error::Error>> {
        let old = store.get_bank(BankId(1)).await?;
        assert_eq!(old.embedding_spaces.len(), 1);
        assert_eq!(old.embedding_spaces[0].index, None);
        assert_eq!(
            old.embedding_spaces[0].index_params(),
            crate::index::VectorParams::default()
        );
        let tuned: crate::index::VectorParams = "m=24,ef_construction=200"
            .parse()
            .map_err(|e| format!("{e}"))?;
        let asked = |name: &str| EmbeddingSpace {
            index: Some(tuned),
            ..space(name, 4, Metric::Cosine, 0.7)
        };
        let new = store
            .create_bank(
                bank_with_spaces("new", OrgId(1), vec![asked("sscd"), asked("fresh")]),
                sys(OrgId(1)),
            )
            .await?;
        let settings: Vec<(&str, Option<crate::index::VectorParams>)> = new
            .embedding_spaces
            .iter()
            .map(|s| (s.name.as_str(), s.index))
            .collect();
        // The old space keeps its (default) settings; the new one stores the asked ones.
        assert_eq!(settings, vec![("fresh", Some(tuned)), ("sscd", None)]);
        Ok(new)
    }

    /// A space's index settings are written when it is first created and kept: a second bank
    /// declaring it with other settings gets the stored ones, and so does every read.
    async fn space_index_settings_are_stored_once(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let tuned: crate::index::VectorParams = "m=24,ef_construction=200,ef_search=96,graph_min=5"
            .parse()
            .map_err(|e| format!("{e}"))?;
        let first = store
            .create_bank(
                bank_with_spaces(
                    "tuned",
                    local,
                    vec![
                        EmbeddingSpace {
                            index: Some(tuned),
                            ..space("sscd", 8, Metric::Cosine, 0.8)
                        },
                        space("plain", 4, Metric::Dot, 1.0),
                    ],
                ),
                sys(local),
            )
            .await?;
        let by_name = |bank: &Bank, name: &str| {
            bank.embedding_spaces
                .iter()
                .find(|s| s.name == name)
                .cloned()
                .ok_or_else(|| format!("bank {} has no space {name}", bank.name))
        };
        assert_eq!(by_name(&first, "sscd")?.index, Some(tuned));
        // No settings asked: NULL, the defaults.
        assert_eq!(by_name(&first, "plain")?.index, None);
        assert_eq!(
            by_name(&first, "plain")?.index_params(),
            crate::index::VectorParams::default()
        );
        assert_eq!(store.get_bank(first.id).await?, first);

        let other: crate::index::VectorParams = "m=8".parse().map_err(|e| format!("{e}"))?;
        let second = store
            .create_bank(
                bank_with_spaces(
                    "later",
                    local,
                    vec![EmbeddingSpace {
                        index: Some(other),
                        ..space("sscd", 8, Metric::Cosine, 0.9)
                    }],
                ),
                sys(local),
            )
            .await?;
        let declared = by_name(&second, "sscd")?;
        assert_eq!(declared.index, Some(tuned), "the stored settings are kept");
        assert_eq!(declared.threshold, 0.9, "the threshold is the bank's own");
        assert_eq!(store.get_bank(second.id).await?, second);
        assert_eq!(store.bank_by_name("later").await?, second);
        assert_eq!(store.list_banks().await?, vec![first, second]);
        Ok(())
    }

    async fn embeddings_round_trip_in_f16(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let bank = store
            .create_bank(
                bank_with_spaces(
                    "vectors",
                    local,
                    vec![
                        space("sscd", 64, Metric::Cosine, 0.75),
                        space("raw", 3, Metric::Dot, -2.5),
                    ],
                ),
                sys(local),
            )
            .await?;
        // Sorted by name whatever the request's order.
        let expected_spaces = vec![
            space("raw", 3, Metric::Dot, -2.5),
            space("sscd", 64, Metric::Cosine, 0.75),
        ];
        assert_eq!(bank.embedding_spaces, expected_spaces);
        assert_eq!(store.get_bank(bank.id).await?, bank);
        assert_eq!(store.bank_by_name("vectors").await?, bank);
        assert_eq!(store.list_banks().await?, vec![bank.clone()]);

        let sscd0 = wavy(64, 0.37);
        let sscd1 = wavy(64, 1.91);
        let raw = vec![120.5, -3.25, 0.001];
        let reference = store
            .add_reference(
                NewReference {
                    embeddings: vec![
                        vector_of(1, "sscd", sscd1.clone()),
                        vector_of(0, "sscd", sscd0.clone()),
                        vector_of(0, "raw", raw.clone()),
                    ],
                    ..new_reference(bank.id, local, vec![frame(0, 1), frame(1, 2)])
                },
                sys(local),
            )
            .await?;
        let stored = store.reference_embeddings(reference.id).await?;
        assert_eq!(stored.len(), 3);
        assert_eq!(
            stored
                .iter()
                .map(|e| (e.space.as_str(), e.frame_index, e.timestamp_ms))
                .collect::<Vec<_>>(),
            vec![("raw", 0, 0), ("sscd", 0, 0), ("sscd", 1, 1000)]
        );
        // Dot vectors are kept as sent (f16 keeps 11 significant bits); cosine ones normalised.
        assert_close(&stored[0].vector, &raw, 0.07);
        assert_close(&stored[1].vector, &unit(sscd0), 1e-3);
        assert_close(&stored[2].vector, &unit(sscd1), 1e-3);

        let active = store.load_active().await?;
        assert_eq!(active.frames.len(), 2);
        assert_eq!(active.seq, store.last_seq().await?);
        let mut loaded: Vec<FrameEmbedding> = active
            .embeddings
            .iter()
            .map(|e| {
                assert_eq!((e.reference, e.bank), (reference.id, bank.id));
                e.embedding.clone()
            })
            .collect();
        loaded.sort_by(|a, b| {
            a.space
                .cmp(&b.space)
                .then(a.frame_index.cmp(&b.frame_index))
        });
        assert_eq!(loaded, stored);

        // A second bank may declare the same space with its own threshold.
        let other = store
            .create_bank(
                bank_with_spaces("other", local, vec![space("sscd", 64, Metric::Cosine, 0.9)]),
                sys(local),
            )
            .await?;
        assert_eq!(
            store.get_bank(other.id).await?.embedding_spaces,
            vec![space("sscd", 64, Metric::Cosine, 0.9)]
        );

        // A reference with vectors and no PDQ frame.
        let vector_only = store
            .add_reference(
                NewReference {
                    embeddings: vec![vector_of(4, "sscd", wavy(64, 0.5))],
                    ..new_reference(other.id, local, Vec::new())
                },
                sys(local),
            )
            .await?;
        assert_eq!(vector_only.frame_count, 0);
        assert!(store.reference_frames(vector_only.id).await?.is_empty());
        assert_eq!(store.reference_embeddings(vector_only.id).await?.len(), 1);
        assert_eq!(store.load_active().await?.embeddings.len(), 4);
        Ok(())
    }

    async fn embedding_space_conflicts_and_bad_vectors_are_refused(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let bank = store
            .create_bank(
                bank_with_spaces("b", local, vec![space("sscd", 4, Metric::Cosine, 0.8)]),
                sys(local),
            )
            .await?;
        let seq = store.last_seq().await?;
        let err = store
            .create_bank(
                bank_with_spaces("c", local, vec![space("sscd", 8, Metric::Cosine, 0.8)]),
                sys(local),
            )
            .await
            .map(|_| ());
        let Err(err @ Error::SpaceConflict { .. }) = err else {
            panic!("expected a space conflict, got {err:?}");
        };
        assert_eq!(
            err.to_string(),
            "embedding space \"sscd\" exists with dimension 4 (cosine); cannot declare it with dimension 8 (cosine)"
        );
        let err = store
            .create_bank(
                bank_with_spaces("c", local, vec![space("sscd", 4, Metric::Dot, 0.8)]),
                sys(local),
            )
            .await;
        assert!(matches!(err, Err(Error::SpaceConflict { .. })), "{err:?}");
        // Nothing of the refused banks was kept.
        assert_eq!(store.last_seq().await?, seq);
        assert!(matches!(
            store.bank_by_name("c").await,
            Err(Error::NotFound { .. })
        ));

        for (bad, expected) in [
            (space("", 4, Metric::Cosine, 0.5), "has 0 characters"),
            (space("SSCD", 4, Metric::Cosine, 0.5), "'S'"),
            (
                space("x", 0, Metric::Cosine, 0.5),
                "dimension 0, must be 1 to 4096",
            ),
            (space("x", 4097, Metric::Cosine, 0.5), "dimension 4097"),
            (space("x", 4, Metric::Cosine, 0.0), "threshold 0"),
            (space("x", 4, Metric::Cosine, 1.5), "threshold 1.5"),
            (space("x", 4, Metric::Dot, f32::NAN), "threshold NaN"),
        ] {
            let err = store
                .create_bank(bank_with_spaces("d", local, vec![bad]), sys(local))
                .await;
            assert!(
                matches!(&err, Err(Error::InvalidInput { field: "embedding_spaces", reason }) if reason.contains(expected)),
                "{expected}: {err:?}"
            );
        }
        let twice = store
            .create_bank(
                bank_with_spaces(
                    "d",
                    local,
                    vec![
                        space("x", 4, Metric::Cosine, 0.5),
                        space("x", 4, Metric::Cosine, 0.6),
                    ],
                ),
                sys(local),
            )
            .await;
        assert!(
            matches!(twice, Err(Error::InvalidInput { .. })),
            "{twice:?}"
        );

        let add = |embeddings: Vec<FrameEmbedding>| {
            let store = store.clone();
            async move {
                store
                    .add_reference(
                        NewReference {
                            embeddings,
                            ..new_reference(bank.id, local, vec![frame(0, 1)])
                        },
                        sys(local),
                    )
                    .await
            }
        };
        for (embeddings, expected) in [
            (
                vec![vector_of(3, "sscd", vec![1.0; 3])],
                "embedding space \"sscd\" expects 4 values, frame 3 has 3",
            ),
            (
                vec![vector_of(2, "other", vec![1.0; 4])],
                "frame 2 has a vector of embedding space \"other\", which the bank does not declare (it declares [sscd])",
            ),
            (
                vec![vector_of(1, "sscd", vec![1.0, f32::NAN, 0.0, 0.0])],
                "frame 1 value 1 is NaN",
            ),
            (
                vec![vector_of(1, "sscd", vec![1.0, 0.0, f32::INFINITY, 0.0])],
                "frame 1 value 2 is inf",
            ),
            (
                vec![vector_of(0, "sscd", vec![0.0; 4])],
                "a cosine vector cannot be zero",
            ),
            (
                vec![
                    vector_of(5, "sscd", vec![1.0; 4]),
                    vector_of(5, "sscd", vec![2.0; 4]),
                ],
                "frame 5 has two vectors of embedding space \"sscd\"",
            ),
        ] {
            let err = add(embeddings).await;
            assert!(
                matches!(&err, Err(Error::InvalidInput { field: "embeddings", reason }) if reason.contains(expected)),
                "{expected}: {err:?}"
            );
        }
        assert_eq!(store.last_seq().await?, seq);
        assert_eq!(store.stats().await?.active_references, 0);
        // Neither frames nor vectors: still an error.
        let empty = store
            .add_reference(new_reference(bank.id, local, Vec::new()), sys(local))
            .await;
        assert!(
            matches!(
                empty,
                Err(Error::InvalidInput {
                    field: "frames",
                    ..
                })
            ),
            "{empty:?}"
        );
        Ok(())
    }

    async fn withdrawn_vectors_are_not_loaded(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let bank = store
            .create_bank(
                bank_with_spaces("b", local, vec![space("sscd", 8, Metric::Cosine, 0.8)]),
                sys(local),
            )
            .await?;
        let mut ids = Vec::new();
        for seed in 1..=3u8 {
            let reference = store
                .add_reference(
                    NewReference {
                        embeddings: vec![vector_of(0, "sscd", wavy(8, f32::from(seed)))],
                        ..new_reference(bank.id, local, vec![frame(0, seed)])
                    },
                    sys(local),
                )
                .await?;
            ids.push(reference.id);
        }
        store.withdraw_reference(ids[1], "fp", sys(local)).await?;
        let active = store.load_active().await?;
        let mut loaded: Vec<ReferenceId> = active.embeddings.iter().map(|e| e.reference).collect();
        loaded.sort_unstable();
        assert_eq!(loaded, vec![ids[0], ids[2]]);
        // Kept for audit.
        assert_eq!(store.reference_embeddings(ids[1]).await?.len(), 1);
        assert!(matches!(
            store.reference_embeddings(ReferenceId(999)).await,
            Err(Error::NotFound {
                kind: "reference",
                ..
            })
        ));
        Ok(())
    }

    async fn mirrored_references_keep_their_vectors(store: Store) -> TestResult {
        let local = store.default_org().await?;
        let bank = store
            .create_mirrored_bank(
                "peer",
                7,
                bank_with_spaces("mirror", local, vec![space("sscd", 4, Metric::Cosine, 0.8)]),
                sys(local),
            )
            .await?;
        assert_eq!(bank.embedding_spaces.len(), 1);
        let (reference, added) = store
            .add_mirrored_reference(
                "peer",
                70,
                NewReference {
                    embeddings: vec![vector_of(0, "sscd", vec![0.5, 0.5, 0.5, 0.5])],
                    ..new_reference(bank.id, local, vec![frame(0, 1)])
                },
                sys(local),
            )
            .await?;
        assert!(added);
        let stored = store.reference_embeddings(reference.id).await?;
        assert_eq!(stored.len(), 1);
        assert_close(&stored[0].vector, &[0.5; 4], 1e-3);
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
        bank_visibility_updates_rewrite_shares_and_log_the_change,
        api_keys_round_trip_and_revoke_once,
        each_write_names_its_actor_org_and_key,
        audit_filters_by_bank_in_order,
        list_references_of_a_bank,
        follow_cursors_are_per_source_and_upserted,
        mirrored_banks_are_created_once,
        mirrored_references_are_added_once,
        embeddings_round_trip_in_f16,
        space_index_settings_are_stored_once,
        embedding_space_conflicts_and_bad_vectors_are_refused,
        withdrawn_vectors_are_not_loaded,
        mirrored_references_keep_their_vectors,
    );

    #[tokio::test]
    async fn vectors_survive_close_and_reopen() -> TestResult {
        let dir = tempfile::tempdir()?;
        let sent = wavy(16, 0.3);
        let (bank, reference) = {
            let store = Store::open_embedded(dir.path()).await?;
            let local = store.default_org().await?;
            let bank = store
                .create_bank(
                    bank_with_spaces("kept", local, vec![space("sscd", 16, Metric::Cosine, 0.8)]),
                    sys(local),
                )
                .await?;
            let reference = store
                .add_reference(
                    NewReference {
                        embeddings: vec![vector_of(0, "sscd", sent.clone())],
                        ..new_reference(bank.id, local, vec![frame(0, 9)])
                    },
                    sys(local),
                )
                .await?;
            (bank, reference)
        };
        let store = Store::open_embedded(dir.path()).await?;
        assert_eq!(store.get_bank(bank.id).await?, bank);
        let stored = store.reference_embeddings(reference.id).await?;
        assert_eq!(stored.len(), 1);
        assert_close(&stored[0].vector, &unit(sent), 1e-3);
        assert_eq!(store.load_active().await?.embeddings.len(), 1);
        Ok(())
    }

    #[test]
    fn f16_storage_is_within_1e_3_of_unit_vectors() -> TestResult {
        let v = unit(wavy(512, 0.77));
        let bytes = rows::encode_vector(&v);
        assert_eq!(bytes.len(), 1024);
        let back = rows::embedding(rows::EmbeddingColumns {
            reference: ReferenceId(1),
            frame_index: 0,
            timestamp_ms: 0,
            space: "sscd".to_string(),
            dimension: 512,
            vector: &bytes,
        })?;
        assert_close(&back.vector, &v, 1e-3);
        let short = rows::embedding(rows::EmbeddingColumns {
            reference: ReferenceId(1),
            frame_index: 0,
            timestamp_ms: 0,
            space: "sscd".to_string(),
            dimension: 513,
            vector: &bytes,
        });
        assert!(matches!(short, Err(Error::Corrupt { .. })), "{short:?}");
        Ok(())
    }

    #[tokio::test]
    async fn data_survives_close_and_reopen() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (org, bank, reference, seq) = {
            let store = Store::open_embedded(dir.path()).await?;
            let local = store.default_org().await?;
            let org = store.create_org("partner", None).await?;
            let bank = store
                .create_bank(
                    NewBank {
                        visibility: Visibility::SharedWith(vec![org.id]),
                        ..new_bank("kept", local)
                    },
                    sys(local),
                )
                .await?;
            let reference = store
                .add_reference(
                    new_reference(bank.id, org.id, vec![frame(0, 9)]),
                    sys(org.id),
                )
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
        let err = Error::AlreadyRevoked { key: KeyId(3) };
        assert_eq!(err.to_string(), "api key 3 is already revoked");
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
