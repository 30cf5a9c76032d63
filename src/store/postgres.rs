//! The PostgreSQL backend: one database shared by several replicas (shared/DESIGN.md §3,
//! "Replicas"), behind the same [`super::Store`] methods as the embedded file.
//!
//! Owns the schema (numbered migrations recorded in `schema_migrations`), the SQL, the connection
//! pool, and the `LISTEN` connection that wakes change-log tailers. Input has already been
//! validated by [`super::Store`]; this file only enforces what needs the database (existence,
//! uniqueness).
//!
//! Durability (shared/DESIGN.md §3, "durable before acknowledged"):
//! - Every write is one transaction that appends exactly one row to `changes` (the follow
//!   cursor, local bookkeeping, appends none), and the method returns `Ok` only after `COMMIT`
//!   has returned. With `synchronous_commit` at `on` (or stronger), PostgreSQL has flushed the
//!   commit record to its WAL by then; a database whose `synchronous_commit` is `off` is
//!   refused at open ([`Error::UnsafeSetting`]).
//! - A write whose connection is lost during `COMMIT` reports [`Error::Unavailable`]: it may have
//!   committed without being acknowledged, never the reverse.
//!
//! Change-log order (the "no holes for a reader" invariant of [`super`]): a sequence or identity
//! column hands out numbers at insert time, but transactions commit in any order, so a tailer
//! could read seq 11 while seq 10 is still uncommitted, remember 11, and miss 10 for ever.
//! Instead every write takes the transaction-level advisory lock `CHANGE_LOG_LOCK` just before
//! appending its change and holds it until its commit, and numbers its change `MAX(seq) + 1`
//! under that lock. PostgreSQL makes a transaction visible before it releases its locks, so:
//! - sequence numbers commit strictly in order: a reader never sees `n + 1` before `n`;
//! - the log has no gaps at all (a rolled-back write consumes no number), so `last_seq` minus
//!   the tailer's position is exactly its lag in changes.
//!
//! The trade-off: appends to the log are serialised database-wide, from the advisory lock to the
//! end of `COMMIT` (one insert, one `NOTIFY` and one WAL flush, around a millisecond on local
//! disks). Everything before that in a write (checks, the reference row, up to a million frame
//! rows) runs concurrently. Writes are administrative and rare next to matches, which never touch
//! the store.
//!
//! Tailing: each write also runs `NOTIFY framematch_changes, '<seq>'`, delivered at commit.
//! [`PostgresStore::listen_changes`] turns those into wake-ups on a dedicated connection; a
//! tailer still reads the changes themselves with `changes_since` (notifications can be lost
//! with their connection), so it should also poll on a timer.
//!
//! Connection loss: every operation gets a connection from a small pool and gives up with
//! [`Error::Unavailable`] rather than hanging: connecting is bounded by [`CONNECT_TIMEOUT`],
//! waiting for a free connection by [`POOL_WAIT_TIMEOUT`], each statement by a server-side
//! `statement_timeout` of [`STATEMENT_TIMEOUT`], each whole operation by [`OPERATION_TIMEOUT`]
//! on the client, and a silent peer by TCP keepalives and `TCP_USER_TIMEOUT`. The pool drops
//! closed connections and opens new ones, so the store works again as soon as the database is
//! back; nothing needs reopening.
//!
//! Connections are plain TCP or Unix sockets (`NoTls`): a URL asking for `sslmode=require` fails
//! at open with a clear error. No lock is held across an `.await` in this file; the pool's own
//! locking is async.

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
    TimeoutType, Transaction,
};
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Config, IsolationLevel, NoTls, Row};
use tokio_stream::StreamExt;

use super::{ActiveSignals, DEFAULT_ORG_NAME, Error, NewBank, StoreStats, rows};
use crate::model::{
    Actor, ApiKey, Bank, BankId, Change, ChangeKind, ChangeSeq, EmbeddingSpace, FrameEmbedding,
    FrameSignal, IndexedEmbedding, IndexedFrame, KeyId, NewApiKey, NewReference, OrgId,
    Organisation, Reference, ReferenceId, ReferenceState, Visibility, now_ms,
};

/// The `NOTIFY` channel every write signals on, with its change's sequence number as payload.
pub const CHANGES_CHANNEL: &str = "framematch_changes";

/// First key of framematch's advisory locks (`pg_advisory_xact_lock(int4, int4)`): "fmch".
const LOCK_SPACE: i32 = 0x666d_6368;
/// Second key: held while checking and applying schema migrations, so replicas starting together
/// migrate once.
const MIGRATION_LOCK: i32 = 1;
/// Second key: held from appending a change until commit, so sequence numbers commit in order.
const CHANGE_LOG_LOCK: i32 = 2;

/// Bound on establishing one connection (TCP connect, startup and authentication).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Server-side bound on one statement (`statement_timeout`), unless the URL sets its own.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Client-side bound on one whole store operation, a little above [`STATEMENT_TIMEOUT`]: the
/// last guard against a connection that neither answers nor fails. The start-up load
/// ([`super::Store::load_active_frames`]) is exempt: its size is the data's.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(40);
/// Bound on waiting for a pooled connection to become free.
pub const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may have unacknowledged data, or stay silent past keepalive probes,
/// before the kernel declares it dead.
const TCP_DEAD_AFTER: Duration = Duration::from_secs(20);
/// Connections per store handle. Writes serialise on the change log and reads are short, so a
/// few are plenty; several replicas share the server's `max_connections`.
const POOL_SIZE: usize = 8;
/// Frames sent per `INSERT ... UNNEST`: bounds one message at about 500 kB.
const FRAMES_PER_INSERT: usize = 10_000;
/// Vector bytes sent per `INSERT ... UNNEST` (about 1,000 vectors of 512 f16 values).
const VECTOR_BYTES_PER_INSERT: usize = 1 << 20;
/// Most rows `load_active_frames` pre-allocates for, whatever the stored counts claim.
const MAX_PREALLOCATED_FRAMES: usize = 1 << 27;
/// Notifications buffered for a slow listener; more are dropped (they are only wake-ups).
const LISTEN_BUFFER: usize = 64;

/// Schema steps; step `i` (0-based) takes the schema from version `i` to `i + 1`, recorded as a
/// row `i + 1` in `schema_migrations`. Append only: never edit a step that has shipped. Mirrors
/// the embedded schema, with PostgreSQL types.
const MIGRATIONS: &[&str] = &[
    // 1: the whole data model of shared/DESIGN.md §2.
    r"
CREATE TABLE organisations (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name        text   NOT NULL UNIQUE,
    created_ms  bigint NOT NULL
);

-- Used by the authentication issue: the secret is shown once and stored only as a hash.
CREATE TABLE api_keys (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    org_id      bigint NOT NULL REFERENCES organisations (id),
    role        text   NOT NULL CHECK (role IN ('matcher', 'contributor', 'admin')),
    key_hash    bytea  NOT NULL UNIQUE,
    created_ms  bigint NOT NULL,
    revoked_ms  bigint
);
CREATE INDEX api_keys_by_org ON api_keys (org_id);

CREATE TABLE banks (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name        text   NOT NULL UNIQUE,
    category    text   NOT NULL,
    owner_org   bigint NOT NULL REFERENCES organisations (id),
    visibility  text   NOT NULL CHECK (visibility IN ('private', 'shared', 'public')),
    description text   NOT NULL,
    created_ms  bigint NOT NULL
);
CREATE INDEX banks_by_owner ON banks (owner_org);

-- The organisations a bank with visibility 'shared' is shared with.
CREATE TABLE bank_shares (
    bank_id     bigint NOT NULL REFERENCES banks (id),
    org_id      bigint NOT NULL REFERENCES organisations (id),
    PRIMARY KEY (bank_id, org_id)
);
CREATE INDEX bank_shares_by_org ON bank_shares (org_id);

-- 'references' is an SQL keyword, hence 'refs'. Active while withdrawn_ms IS NULL.
CREATE TABLE refs (
    id               bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    bank_id          bigint NOT NULL REFERENCES banks (id),
    external_id      text   NOT NULL,
    note             text   NOT NULL,
    added_by         bigint NOT NULL REFERENCES organisations (id),
    added_ms         bigint NOT NULL,
    frame_count      bigint NOT NULL CHECK (frame_count BETWEEN 0 AND 4294967295),
    withdrawn_ms     bigint,
    withdrawn_reason text,
    CHECK ((withdrawn_ms IS NULL) = (withdrawn_reason IS NULL))
);
CREATE INDEX refs_by_bank_state ON refs (bank_id, withdrawn_ms);

-- The primary key is the per-reference exact-hash deduplication and, leading with
-- reference_id, the access path of the start-up load and of reference_frames.
CREATE TABLE frames (
    reference_id bigint   NOT NULL REFERENCES refs (id),
    hash         bytea    NOT NULL CHECK (octet_length(hash) = 32),
    frame_index  bigint   NOT NULL CHECK (frame_index BETWEEN 0 AND 4294967295),
    timestamp_ms bigint   NOT NULL CHECK (timestamp_ms >= 0),
    quality      smallint NOT NULL CHECK (quality BETWEEN 0 AND 100),
    PRIMARY KEY (reference_id, hash)
);

-- The append-only change log. seq is MAX(seq) + 1 under the change-log advisory lock (see the
-- file's documentation), not a sequence: it commits in order and has no gaps.
CREATE TABLE changes (
    seq          bigint PRIMARY KEY CHECK (seq > 0),
    kind         text   NOT NULL CHECK (kind IN
                     ('org_created', 'bank_created', 'reference_added', 'reference_withdrawn')),
    org_id       bigint REFERENCES organisations (id),
    bank_id      bigint REFERENCES banks (id),
    reference_id bigint REFERENCES refs (id),
    actor        bigint NOT NULL REFERENCES organisations (id),
    at_ms        bigint NOT NULL
);
",
    // 2: issue #4: key labels; the acting key, the key concerned and a detail on every change,
    // with the kinds bank_updated, key_created and key_revoked; partner mirroring bookkeeping.
    r"
ALTER TABLE api_keys ADD COLUMN label text NOT NULL DEFAULT '';

ALTER TABLE changes DROP CONSTRAINT changes_kind_check;
ALTER TABLE changes ADD CONSTRAINT changes_kind_check CHECK (kind IN
    ('org_created', 'bank_created', 'reference_added', 'reference_withdrawn',
     'bank_updated', 'key_created', 'key_revoked'));
ALTER TABLE changes
    -- The key a key_created or key_revoked change concerns.
    ADD COLUMN key_id    bigint REFERENCES api_keys (id),
    -- The key the actor used; NULL for the server itself.
    ADD COLUMN actor_key bigint REFERENCES api_keys (id),
    ADD COLUMN detail    text   NOT NULL DEFAULT '';
-- The audit trail of one bank.
CREATE INDEX changes_by_bank ON changes (bank_id, seq);

-- How far each followed partner feed has been mirrored.
CREATE TABLE follows (
    source      text   PRIMARY KEY,
    cursor      bigint NOT NULL CHECK (cursor >= 0),
    updated_ms  bigint NOT NULL
);

-- Which local bank mirrors which bank of a partner feed.
CREATE TABLE mirrored_banks (
    source      text   NOT NULL,
    remote_id   bigint NOT NULL,
    bank_id     bigint NOT NULL UNIQUE REFERENCES banks (id),
    PRIMARY KEY (source, remote_id)
);

-- Which local reference mirrors which reference of a partner feed.
CREATE TABLE mirrored_refs (
    source       text   NOT NULL,
    remote_id    bigint NOT NULL,
    reference_id bigint NOT NULL UNIQUE REFERENCES refs (id),
    PRIMARY KEY (source, remote_id)
);
",
    // 3: issue #11: embedding spaces (server-wide: one name, one dimension and metric), the
    // spaces each bank declares with its threshold, and the vectors of reference frames.
    r"
CREATE TABLE embedding_spaces (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name        text   NOT NULL UNIQUE,
    dimension   bigint NOT NULL CHECK (dimension BETWEEN 1 AND 4096),
    metric      text   NOT NULL CHECK (metric IN ('cosine', 'dot'))
);

CREATE TABLE bank_spaces (
    bank_id     bigint NOT NULL REFERENCES banks (id),
    space_id    bigint NOT NULL REFERENCES embedding_spaces (id),
    threshold   real   NOT NULL,
    PRIMARY KEY (bank_id, space_id)
);

-- Leading with reference_id: the access path of the start-up load and of reference_embeddings.
-- vector: dimension f16 values, little-endian.
CREATE TABLE embeddings (
    reference_id bigint NOT NULL REFERENCES refs (id),
    space_id     bigint NOT NULL REFERENCES embedding_spaces (id),
    frame_index  bigint NOT NULL CHECK (frame_index BETWEEN 0 AND 4294967295),
    timestamp_ms bigint NOT NULL CHECK (timestamp_ms >= 0),
    vector       bytea  NOT NULL,
    PRIMARY KEY (reference_id, space_id, frame_index)
);
",
    // 4: issue #11 item 2: each space's vector index settings, in their text form
    // (`m=16,ef_construction=128,ef_search=64,graph_min=20000`), written when the space is
    // created. NULL for the spaces created before: they are indexed with the defaults.
    r"
ALTER TABLE embedding_spaces ADD COLUMN index_params text;
",
];

/// The PostgreSQL backend. Cheap to clone: every clone shares one pool.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// The connection settings, kept for the dedicated `LISTEN` connections.
    config: Config,
    /// `postgres://user@host:port/db`, without the password.
    description: String,
    /// Created at first open and never renamed or deleted, so it is read once.
    default_org: OrgId,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("database", &self.inner.description)
            .field("default_org", &self.inner.default_org)
            .finish_non_exhaustive()
    }
}

// === impl PostgresStore ===

impl PostgresStore {
    /// See [`super::Store::open_postgres`].
    pub(super) async fn open(url: &str) -> Result<Self, Error> {
        let config = Config::from_str(url).map_err(|err| Error::InvalidInput {
            field: "postgres url",
            reason: err.to_string(),
        })?;
        Self::open_config(config).await
    }

    /// Opens a store on already-parsed connection settings, adding framematch's timeouts.
    pub(crate) async fn open_config(mut config: Config) -> Result<Self, Error> {
        apply_defaults(&mut config);
        let description = describe(&config);
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            // `Fast` checks only that the connection is not closed; a dead connection that has
            // not noticed yet fails its statement (and is then closed) within the timeouts.
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .expect("a runtime is set, which is all the pool builder can miss");
        let default_org = bounded("opening the store", async {
            let mut client = pool.get().await.map_err(pool_error)?;
            check_durability(&client).await?;
            migrate(&mut client).await?;
            ensure_default_org(&mut client).await
        })
        .await?;
        tracing::info!(database = %description, schema_version = MIGRATIONS.len(), "store opened");
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                config,
                description,
                default_org,
            }),
        })
    }

    /// `postgres://user@host:port/db`, without the password.
    pub(super) fn describe(&self) -> String {
        self.inner.description.clone()
    }

    /// The default organisation's id, read at open.
    pub(super) fn default_org(&self) -> OrgId {
        self.inner.default_org
    }

    /// A pooled connection, or [`Error::Unavailable`].
    async fn client(&self) -> Result<Object, Error> {
        self.inner.pool.get().await.map_err(pool_error)
    }

    /// Wake-ups for change-log tailers: a dedicated connection runs `LISTEN framematch_changes`
    /// and the receiver gets the sequence number of each change committed from then on, by any
    /// replica, in commit order. They are hints only: read the changes with
    /// [`super::Store::changes_since`], and poll on a timer as well, because notifications are
    /// dropped when the receiver falls 64 behind and die with the connection.
    ///
    /// The receiver is closed (`recv` returns `None`) when the connection is lost; listen again
    /// once the database is back, and read `changes_since` to cover the gap. Dropping the
    /// receiver closes the connection.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the database cannot be reached; [`Error::Postgres`].
    pub async fn listen_changes(&self) -> Result<mpsc::Receiver<ChangeSeq>, Error> {
        let config = self.inner.config.clone();
        bounded("listening for changes", async move {
            let (client, mut connection) = config.connect(NoTls).await?;
            let client = Arc::new(client);
            let (sender, receiver) = mpsc::channel(LISTEN_BUFFER);
            // The task owns the connection (and a handle to the client, which must outlive the
            // LISTEN) until the receiver is dropped or the connection ends.
            let keep_alive = Arc::clone(&client);
            tokio::spawn(async move {
                let _client = keep_alive;
                loop {
                    let message = tokio::select! {
                        () = sender.closed() => break,
                        message = std::future::poll_fn(|cx| connection.poll_message(cx)) => message,
                    };
                    match message {
                        Some(Ok(AsyncMessage::Notification(note)))
                            if note.channel() == CHANGES_CHANNEL =>
                        {
                            let Ok(seq) = note.payload().parse::<i64>() else {
                                tracing::warn!(
                                    payload = note.payload(),
                                    "unreadable change notification"
                                );
                                continue;
                            };
                            // Full means wake-ups are already pending: this one adds nothing.
                            if let Err(mpsc::error::TrySendError::Closed(_)) =
                                sender.try_send(ChangeSeq(seq))
                            {
                                break;
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(error)) => {
                            tracing::warn!(%error, "change listener connection lost");
                            break;
                        }
                        None => break,
                    }
                }
            });
            client
                .batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))
                .await?;
            Ok(receiver)
        })
        .await
    }

    /// See [`super::Store::create_org`].
    pub(super) async fn create_org(
        &self,
        name: String,
        actor: Option<Actor>,
    ) -> Result<Organisation, Error> {
        bounded("create_org", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let org = insert_org(&tx, name, actor).await?;
            tx.commit().await?;
            Ok(org)
        })
        .await
    }

    /// See [`super::Store::list_orgs`].
    pub(super) async fn list_orgs(&self) -> Result<Vec<Organisation>, Error> {
        bounded("list_orgs", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("SELECT id, name FROM organisations ORDER BY id")
                .await?;
            let orgs = client
                .query(&stmt, &[])
                .await?
                .iter()
                .map(|row| {
                    Ok(Organisation {
                        id: OrgId(row.try_get(0)?),
                        name: row.try_get(1)?,
                    })
                })
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
            Ok(orgs)
        })
        .await
    }

    /// See [`super::Store::create_bank`]. `new` is validated and its share list normalised.
    pub(super) async fn create_bank(&self, new: NewBank, actor: Actor) -> Result<Bank, Error> {
        bounded("create_bank", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let bank = insert_bank(&tx, new, actor).await?;
            tx.commit().await?;
            Ok(bank)
        })
        .await
    }

    /// See [`super::Store::list_banks`]. One statement, so banks and shares come from one
    /// snapshot.
    pub(super) async fn list_banks(&self) -> Result<Vec<Bank>, Error> {
        bounded("list_banks", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!("{BANK_SELECT} ORDER BY b.id"))
                .await?;
            client
                .query(&stmt, &[])
                .await?
                .iter()
                .map(bank_from_row)
                .collect()
        })
        .await
    }

    /// See [`super::Store::get_bank`].
    pub(super) async fn get_bank(&self, id: BankId) -> Result<Bank, Error> {
        bounded("get_bank", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!("{BANK_SELECT} WHERE b.id = $1"))
                .await?;
            let row = client
                .query_opt(&stmt, &[&id.0])
                .await?
                .ok_or_else(|| Error::NotFound {
                    kind: "bank",
                    key: id.to_string(),
                })?;
            bank_from_row(&row)
        })
        .await
    }

    /// See [`super::Store::bank_by_name`].
    pub(super) async fn bank_by_name(&self, name: String) -> Result<Bank, Error> {
        bounded("bank_by_name", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!("{BANK_SELECT} WHERE b.name = $1"))
                .await?;
            let row = client
                .query_opt(&stmt, &[&name])
                .await?
                .ok_or(Error::NotFound {
                    kind: "bank",
                    key: name,
                })?;
            bank_from_row(&row)
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
        bounded("add_reference", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let reference = insert_reference(&tx, new, actor).await?;
            tx.commit().await?;
            Ok(reference)
        })
        .await
    }

    /// See [`super::Store::withdraw_reference`]. `reason` is validated.
    pub(super) async fn withdraw_reference(
        &self,
        id: ReferenceId,
        reason: String,
        actor: Actor,
    ) -> Result<Reference, Error> {
        bounded("withdraw_reference", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            // The row lock makes a concurrent withdrawal wait, then see this one's result.
            let stmt = tx
                .prepare_cached(
                    "SELECT bank_id, withdrawn_ms IS NOT NULL FROM refs WHERE id = $1
                     FOR NO KEY UPDATE",
                )
                .await?;
            let row = tx
                .query_opt(&stmt, &[&id.0])
                .await?
                .ok_or_else(|| Error::NotFound {
                    kind: "reference",
                    key: id.to_string(),
                })?;
            let bank = BankId(row.try_get(0)?);
            if row.try_get::<_, bool>(1)? {
                return Err(Error::AlreadyWithdrawn { reference: id });
            }
            require_actor(&tx, actor).await?;
            let at_ms = now_ms();
            let stmt = tx
                .prepare_cached(
                    "UPDATE refs SET withdrawn_ms = $2, withdrawn_reason = $3 WHERE id = $1",
                )
                .await?;
            tx.execute(&stmt, &[&id.0, &at_ms, &reason]).await?;
            append_change(
                &tx,
                &ChangeKind::ReferenceWithdrawn {
                    reference: id,
                    bank,
                },
                actor,
                &reason,
                at_ms,
            )
            .await?;
            let reference = read_reference(&tx, id).await?;
            tx.commit().await?;
            Ok(reference)
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
        bounded("update_bank_visibility", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            // The row lock orders concurrent updates of one bank: the last to commit wins, with
            // its shares, and the log records both in that order.
            let stmt = tx
                .prepare_cached("SELECT 1 FROM banks WHERE id = $1 FOR NO KEY UPDATE")
                .await?;
            if tx.query_opt(&stmt, &[&bank.0]).await?.is_none() {
                return Err(Error::NotFound {
                    kind: "bank",
                    key: bank.to_string(),
                });
            }
            let shares: &[OrgId] = match &visibility {
                Visibility::SharedWith(orgs) => orgs,
                Visibility::Private | Visibility::Public => &[],
            };
            require_orgs(&tx, shares).await?;
            require_actor(&tx, actor).await?;
            let stmt = tx
                .prepare_cached("UPDATE banks SET visibility = $2 WHERE id = $1")
                .await?;
            tx.execute(&stmt, &[&bank.0, &rows::visibility_text(&visibility)])
                .await?;
            let stmt = tx
                .prepare_cached("DELETE FROM bank_shares WHERE bank_id = $1")
                .await?;
            tx.execute(&stmt, &[&bank.0]).await?;
            insert_shares(&tx, bank, shares).await?;
            let updated = read_bank(&tx, bank).await?;
            append_change(
                &tx,
                &ChangeKind::BankUpdated(bank),
                actor,
                &rows::visibility_detail(&visibility),
                now_ms(),
            )
            .await?;
            tx.commit().await?;
            Ok(updated)
        })
        .await
    }

    /// See [`super::Store::create_api_key`]. The label is validated.
    pub(super) async fn create_api_key(
        &self,
        new: NewApiKey,
        actor: Actor,
    ) -> Result<ApiKey, Error> {
        bounded("create_api_key", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            require_orgs(&tx, &[new.org]).await?;
            require_actor(&tx, actor).await?;
            let created_ms = now_ms();
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO api_keys (org_id, role, key_hash, label, created_ms)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (key_hash) DO NOTHING
                     RETURNING id",
                )
                .await?;
            let inserted = tx
                .query_opt(
                    &stmt,
                    &[
                        &new.org.0,
                        &new.role.as_str(),
                        &new.digest.as_slice(),
                        &new.label,
                        &created_ms,
                    ],
                )
                .await?;
            let Some(row) = inserted else {
                return Err(Error::AlreadyExists {
                    kind: "api key",
                    key: "with this digest".to_string(),
                });
            };
            let id = KeyId(row.try_get(0)?);
            append_change(
                &tx,
                &ChangeKind::KeyCreated {
                    key: id,
                    org: new.org,
                },
                actor,
                &rows::key_detail(new.role, &new.label),
                created_ms,
            )
            .await?;
            tx.commit().await?;
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
        bounded("revoke_api_key", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            // The row lock makes a concurrent revocation wait, then see this one's result.
            let stmt = tx
                .prepare_cached(&format!("{KEY_SELECT} WHERE id = $1 FOR NO KEY UPDATE"))
                .await?;
            let key = tx
                .query_opt(&stmt, &[&id.0])
                .await?
                .as_ref()
                .map(key_from_row)
                .transpose()?
                .ok_or_else(|| Error::NotFound {
                    kind: "api key",
                    key: id.to_string(),
                })?;
            if key.revoked_ms.is_some() {
                return Err(Error::AlreadyRevoked { key: id });
            }
            require_actor(&tx, actor).await?;
            let at_ms = now_ms();
            let stmt = tx
                .prepare_cached("UPDATE api_keys SET revoked_ms = $2 WHERE id = $1")
                .await?;
            tx.execute(&stmt, &[&id.0, &at_ms]).await?;
            append_change(
                &tx,
                &ChangeKind::KeyRevoked {
                    key: id,
                    org: key.org,
                },
                actor,
                &rows::key_detail(key.role, &key.label),
                at_ms,
            )
            .await?;
            tx.commit().await?;
            Ok(ApiKey {
                revoked_ms: Some(at_ms),
                ..key
            })
        })
        .await
    }

    /// See [`super::Store::get_api_key`].
    pub(super) async fn get_api_key(&self, id: KeyId) -> Result<ApiKey, Error> {
        bounded("get_api_key", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!("{KEY_SELECT} WHERE id = $1"))
                .await?;
            client
                .query_opt(&stmt, &[&id.0])
                .await?
                .as_ref()
                .map(key_from_row)
                .transpose()?
                .ok_or_else(|| Error::NotFound {
                    kind: "api key",
                    key: id.to_string(),
                })
        })
        .await
    }

    /// See [`super::Store::list_api_keys`].
    pub(super) async fn list_api_keys(&self) -> Result<Vec<ApiKey>, Error> {
        bounded("list_api_keys", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!("{KEY_SELECT} ORDER BY id"))
                .await?;
            client
                .query(&stmt, &[])
                .await?
                .iter()
                .map(key_from_row)
                .collect()
        })
        .await
    }

    /// See [`super::Store::follow_cursor`].
    pub(super) async fn follow_cursor(&self, source: String) -> Result<ChangeSeq, Error> {
        bounded("follow_cursor", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("SELECT cursor FROM follows WHERE source = $1")
                .await?;
            let cursor = match client.query_opt(&stmt, &[&source]).await? {
                Some(row) => row.try_get(0)?,
                None => 0,
            };
            Ok(ChangeSeq(cursor))
        })
        .await
    }

    /// See [`super::Store::set_follow_cursor`]. `seq` is not negative. One statement, committed
    /// on its own.
    pub(super) async fn set_follow_cursor(
        &self,
        source: String,
        seq: ChangeSeq,
    ) -> Result<(), Error> {
        bounded("set_follow_cursor", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "INSERT INTO follows (source, cursor, updated_ms) VALUES ($1, $2, $3)
                     ON CONFLICT (source) DO UPDATE
                         SET cursor = excluded.cursor, updated_ms = excluded.updated_ms",
                )
                .await?;
            client.execute(&stmt, &[&source, &seq.0, &now_ms()]).await?;
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
        bounded("mirrored_bank", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "{BANK_SELECT} JOIN mirrored_banks AS m ON m.bank_id = b.id
                     WHERE m.source = $1 AND m.remote_id = $2"
                ))
                .await?;
            client
                .query_opt(&stmt, &[&source, &remote_id])
                .await?
                .as_ref()
                .map(bank_from_row)
                .transpose()
        })
        .await
    }

    /// See [`super::Store::create_mirrored_bank`]. `new` is validated and normalised.
    ///
    /// Two followers racing to mirror the same bank: the loser's insert of the bank name (or of
    /// the mapping) waits for the winner's commit and then does nothing, and the loser returns
    /// the winner's bank.
    pub(super) async fn create_mirrored_bank(
        &self,
        source: String,
        remote_id: i64,
        new: NewBank,
        actor: Actor,
    ) -> Result<Bank, Error> {
        bounded("create_mirrored_bank", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            if let Some(existing) = mirrored_bank_id(&tx, &source, remote_id).await? {
                return read_bank(&tx, existing).await;
            }
            let bank = match insert_bank(&tx, new, actor).await {
                Ok(bank) => bank,
                Err(err @ Error::AlreadyExists { .. }) => {
                    // A fresh snapshot: a racing follower may have just committed the mapping.
                    return match mirrored_bank_id(&tx, &source, remote_id).await? {
                        Some(existing) => read_bank(&tx, existing).await,
                        None => Err(err),
                    };
                }
                Err(err) => return Err(err),
            };
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO mirrored_banks (source, remote_id, bank_id) VALUES ($1, $2, $3)
                     ON CONFLICT (source, remote_id) DO NOTHING",
                )
                .await?;
            if tx
                .execute(&stmt, &[&source, &remote_id, &bank.id.0])
                .await?
                == 0
            {
                drop(tx);
                let existing = mirrored_bank_id(&client, &source, remote_id)
                    .await?
                    .ok_or_else(|| Error::Corrupt {
                        detail: format!("mirrored bank {source} {remote_id} vanished"),
                    })?;
                return read_bank(&client, existing).await;
            }
            tx.commit().await?;
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
        bounded("mirrored_reference", async {
            let client = self.client().await?;
            mirrored_reference_id(&client, &source, remote_id).await
        })
        .await
    }

    /// See [`super::Store::add_mirrored_reference`]. `new` is validated and its frames
    /// deduplicated. A racing follower that loses on the mapping rolls back and returns the
    /// winner's reference with `false`.
    pub(super) async fn add_mirrored_reference(
        &self,
        source: String,
        remote_id: i64,
        new: NewReference,
        actor: Actor,
    ) -> Result<(Reference, bool), Error> {
        bounded("add_mirrored_reference", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            if let Some(existing) = mirrored_reference_id(&tx, &source, remote_id).await? {
                return Ok((read_reference(&tx, existing).await?, false));
            }
            let reference = insert_reference(&tx, new, actor).await?;
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO mirrored_refs (source, remote_id, reference_id)
                     VALUES ($1, $2, $3)
                     ON CONFLICT (source, remote_id) DO NOTHING",
                )
                .await?;
            if tx
                .execute(&stmt, &[&source, &remote_id, &reference.id.0])
                .await?
                == 0
            {
                drop(tx);
                let existing = mirrored_reference_id(&client, &source, remote_id)
                    .await?
                    .ok_or_else(|| Error::Corrupt {
                        detail: format!("mirrored reference {source} {remote_id} vanished"),
                    })?;
                return Ok((read_reference(&client, existing).await?, false));
            }
            tx.commit().await?;
            Ok((reference, true))
        })
        .await
    }

    /// See [`super::Store::get_reference`].
    pub(super) async fn get_reference(&self, id: ReferenceId) -> Result<Reference, Error> {
        bounded("get_reference", async {
            let client = self.client().await?;
            read_reference(&client, id).await
        })
        .await
    }

    /// See [`super::Store::list_references`]. One statement, one snapshot.
    pub(super) async fn list_references(
        &self,
        bank: BankId,
        include_withdrawn: bool,
    ) -> Result<Vec<Reference>, Error> {
        bounded("list_references", async {
            let client = self.client().await?;
            // Banks are never deleted: checking first and reading after cannot disagree.
            let stmt = client
                .prepare_cached("SELECT 1 FROM banks WHERE id = $1")
                .await?;
            if client.query_opt(&stmt, &[&bank.0]).await?.is_none() {
                return Err(Error::NotFound {
                    kind: "bank",
                    key: bank.to_string(),
                });
            }
            let stmt = client
                .prepare_cached(&format!(
                    "{REF_SELECT} WHERE bank_id = $1 AND ($2 OR withdrawn_ms IS NULL) ORDER BY id"
                ))
                .await?;
            client
                .query(&stmt, &[&bank.0, &include_withdrawn])
                .await?
                .iter()
                .map(reference_from_row)
                .collect()
        })
        .await
    }

    /// See [`super::Store::reference_frames`]. References are never deleted, so checking
    /// existence and reading frames need not share a snapshot.
    pub(super) async fn reference_frames(
        &self,
        id: ReferenceId,
    ) -> Result<Vec<FrameSignal>, Error> {
        bounded("reference_frames", async {
            let client = self.client().await?;
            reference_exists(&client, id).await?;
            let stmt = client
                .prepare_cached(
                    "SELECT frame_index, timestamp_ms, hash, quality FROM frames
                     WHERE reference_id = $1 ORDER BY frame_index",
                )
                .await?;
            client
                .query(&stmt, &[&id.0])
                .await?
                .iter()
                .map(|row| frame_from_row(row, 0, id))
                .collect()
        })
        .await
    }

    /// See [`super::Store::reference_embeddings`]. References are never deleted, so checking
    /// existence and reading vectors need not share a snapshot.
    pub(super) async fn reference_embeddings(
        &self,
        id: ReferenceId,
    ) -> Result<Vec<FrameEmbedding>, Error> {
        bounded("reference_embeddings", async {
            let client = self.client().await?;
            reference_exists(&client, id).await?;
            let stmt = client
                .prepare_cached(
                    "SELECT e.frame_index, e.timestamp_ms, s.name, s.dimension, e.vector
                     FROM embeddings AS e JOIN embedding_spaces AS s ON s.id = e.space_id
                     WHERE e.reference_id = $1 ORDER BY s.name, e.frame_index",
                )
                .await?;
            client
                .query(&stmt, &[&id.0])
                .await?
                .iter()
                .map(|row| embedding_from_row(row, 0, id))
                .collect()
        })
        .await
    }

    /// See [`super::Store::load_active`]. One `REPEATABLE READ READ ONLY` transaction:
    /// the frames, the vectors and the sequence number come from one snapshot, and because
    /// sequence numbers commit in order, that snapshot holds exactly the changes up to the
    /// returned one. Rows are streamed, not buffered. Exempt from [`OPERATION_TIMEOUT`] and
    /// `statement_timeout`: its duration is the data's; a dead connection still fails through
    /// TCP keepalives.
    pub(super) async fn load_active(&self) -> Result<ActiveSignals, Error> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
        let row = tx
            .query_one(
                "SELECT (SELECT COALESCE(SUM(frame_count), 0)::bigint FROM refs
                         WHERE withdrawn_ms IS NULL),
                        (SELECT COALESCE(MAX(seq), 0) FROM changes)",
                &[],
            )
            .await?;
        let declared: i64 = row.try_get(0)?;
        let seq = ChangeSeq(row.try_get(1)?);
        let declared = usize::try_from(declared).map_err(|_| Error::Corrupt {
            detail: format!("active references declare {declared} frames"),
        })?;
        let mut frames = Vec::with_capacity(declared.min(MAX_PREALLOCATED_FRAMES));
        let stmt = tx
            .prepare(
                "SELECT r.id, r.bank_id, f.frame_index, f.timestamp_ms, f.hash, f.quality
                 FROM refs AS r JOIN frames AS f ON f.reference_id = r.id
                 WHERE r.withdrawn_ms IS NULL
                 ORDER BY r.id",
            )
            .await?;
        let no_params: [i64; 0] = [];
        let mut rows = pin!(tx.query_raw(&stmt, no_params).await?);
        while let Some(row) = rows.next().await {
            let row = row?;
            let reference = ReferenceId(row.try_get(0)?);
            frames.push(IndexedFrame {
                reference,
                bank: BankId(row.try_get(1)?),
                frame: frame_from_row(&row, 2, reference)?,
            });
        }
        let stmt = tx
            .prepare(
                "SELECT r.id, r.bank_id, e.frame_index, e.timestamp_ms, s.name, s.dimension,
                        e.vector
                 FROM refs AS r JOIN embeddings AS e ON e.reference_id = r.id
                 JOIN embedding_spaces AS s ON s.id = e.space_id
                 WHERE r.withdrawn_ms IS NULL
                 ORDER BY r.id",
            )
            .await?;
        let mut embeddings = Vec::new();
        let mut rows = pin!(tx.query_raw(&stmt, no_params).await?);
        while let Some(row) = rows.next().await {
            let row = row?;
            let reference = ReferenceId(row.try_get(0)?);
            embeddings.push(IndexedEmbedding {
                reference,
                bank: BankId(row.try_get(1)?),
                embedding: embedding_from_row(&row, 2, reference)?,
            });
        }
        tx.commit().await?;
        if frames.len() != declared {
            return Err(Error::Corrupt {
                detail: format!(
                    "active references declare {declared} frames but {} are stored",
                    frames.len()
                ),
            });
        }
        Ok(ActiveSignals {
            frames,
            embeddings,
            seq,
        })
    }

    /// See [`super::Store::changes_since`].
    pub(super) async fn changes_since(
        &self,
        after: ChangeSeq,
        limit: usize,
    ) -> Result<Vec<Change>, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        bounded("changes_since", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "{CHANGE_SELECT} WHERE seq > $1 ORDER BY seq LIMIT $2"
                ))
                .await?;
            client
                .query(&stmt, &[&after.0, &limit])
                .await?
                .iter()
                .map(change_from_row)
                .collect()
        })
        .await
    }

    /// See [`super::Store::audit`]. The bank check and the changes come from one statement, so
    /// one snapshot.
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
        bounded("audit", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("SELECT 1 FROM banks WHERE id = $1")
                .await?;
            // Banks are never deleted: checking first and reading after cannot disagree.
            if client.query_opt(&stmt, &[&bank.0]).await?.is_none() {
                return Err(Error::NotFound {
                    kind: "bank",
                    key: bank.to_string(),
                });
            }
            let stmt = client
                .prepare_cached(&format!(
                    "{CHANGE_SELECT} WHERE bank_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                ))
                .await?;
            client
                .query(&stmt, &[&bank.0, &after.0, &limit])
                .await?
                .iter()
                .map(change_from_row)
                .collect()
        })
        .await
    }

    /// See [`super::Store::last_seq`].
    pub(super) async fn last_seq(&self) -> Result<ChangeSeq, Error> {
        bounded("last_seq", async {
            let client = self.client().await?;
            last_seq(&client).await
        })
        .await
    }

    /// See [`super::Store::stats`]. One statement, one snapshot.
    pub(super) async fn stats(&self) -> Result<StoreStats, Error> {
        bounded("stats", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT (SELECT COUNT(*) FROM organisations),
                            (SELECT COUNT(*) FROM banks),
                            (SELECT COUNT(*) FROM refs WHERE withdrawn_ms IS NULL),
                            (SELECT COUNT(*) FROM refs WHERE withdrawn_ms IS NOT NULL),
                            (SELECT COALESCE(SUM(frame_count), 0)::bigint FROM refs),
                            (SELECT COALESCE(MAX(seq), 0) FROM changes),
                            (SELECT COUNT(*) FROM api_keys WHERE revoked_ms IS NULL)",
                )
                .await?;
            let row = client.query_one(&stmt, &[]).await?;
            let count = |index: usize| -> Result<u64, Error> {
                let value: i64 = row.try_get(index)?;
                u64::try_from(value).map_err(|_| Error::Corrupt {
                    detail: format!("negative count {value}"),
                })
            };
            Ok(StoreStats {
                organisations: count(0)?,
                banks: count(1)?,
                active_references: count(2)?,
                withdrawn_references: count(3)?,
                frames: count(4)?,
                api_keys: count(6)?,
                last_seq: ChangeSeq(row.try_get(5)?),
            })
        })
        .await
    }
}

// === connection set-up ===

/// framematch's timeouts and name, where the URL did not choose its own.
/// [`Error::NotFound`] unless reference `id` exists.
async fn reference_exists(client: &impl GenericClient, id: ReferenceId) -> Result<(), Error> {
    let stmt = client
        .prepare_cached("SELECT 1 FROM refs WHERE id = $1")
        .await?;
    match client.query_opt(&stmt, &[&id.0]).await? {
        Some(_) => Ok(()),
        None => Err(Error::NotFound {
            kind: "reference",
            key: id.to_string(),
        }),
    }
}

fn apply_defaults(config: &mut Config) {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("framematch");
    }
    config
        .keepalives(true)
        .keepalives_idle(TCP_DEAD_AFTER / 2)
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(5)
        .tcp_user_timeout(TCP_DEAD_AFTER);
    let options = config.get_options().unwrap_or_default().to_string();
    if !options.contains("statement_timeout") {
        let options = format!(
            "{options} -c statement_timeout={}",
            STATEMENT_TIMEOUT.as_millis()
        );
        config.options(options.trim_start());
    }
}

/// `postgres://user@host:port/db` for logs: no password, no options.
fn describe(config: &Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    let user = config
        .get_user()
        .map(|user| format!("{user}@"))
        .unwrap_or_default();
    format!(
        "postgres://{user}{}/{}",
        hosts.join(","),
        config.get_dbname().unwrap_or_default()
    )
}

/// Refuses a database where `COMMIT` can return before the commit record is flushed: an
/// acknowledged write must survive a crash of the database server.
async fn check_durability(client: &Object) -> Result<(), Error> {
    let row = client
        .query_one("SELECT current_setting('synchronous_commit')", &[])
        .await?;
    let actual: String = row.try_get(0)?;
    if actual == "off" {
        return Err(Error::UnsafeSetting {
            setting: "synchronous_commit",
            expected: "on, remote_write, remote_apply or local",
            actual,
        });
    }
    Ok(())
}

/// The schema version this binary creates and understands.
fn supported_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).expect("the migration list is a handful of entries")
}

/// Applies the pending migrations in one transaction under [`MIGRATION_LOCK`], so that replicas
/// starting together apply each step once and the others wait, then find nothing to do.
async fn migrate(client: &mut Object) -> Result<(), Error> {
    let supported = supported_version();
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[&LOCK_SPACE, &MIGRATION_LOCK],
    )
    .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    bigint      PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let found: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::bigint FROM schema_migrations",
            &[],
        )
        .await?
        .try_get(0)?;
    if found > supported {
        return Err(Error::SchemaTooNew { found, supported });
    }
    let done = usize::try_from(found).map_err(|_| Error::Corrupt {
        detail: format!("negative schema version {found}"),
    })?;
    for (step, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        tracing::info!(from = step, to = step + 1, "applying store migration");
        tx.batch_execute(sql).await?;
        let version = i64::try_from(step + 1).expect("a handful of migrations");
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&version],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Finds or creates the organisation named [`DEFAULT_ORG_NAME`]. Replicas racing here both try
/// to insert; `ON CONFLICT DO NOTHING` makes the loser wait for the winner and then find its row.
async fn ensure_default_org(client: &mut Object) -> Result<OrgId, Error> {
    let find = "SELECT id FROM organisations WHERE name = $1";
    if let Some(row) = client.query_opt(find, &[&DEFAULT_ORG_NAME]).await? {
        return Ok(OrgId(row.try_get(0)?));
    }
    let tx = client.transaction().await?;
    let id = match insert_org(&tx, DEFAULT_ORG_NAME.to_string(), None).await {
        Ok(org) => {
            tracing::info!(org = %org.id, name = DEFAULT_ORG_NAME, "created default organisation");
            org.id
        }
        Err(Error::AlreadyExists { .. }) => {
            drop(tx);
            let row = client.query_one(find, &[&DEFAULT_ORG_NAME]).await?;
            return Ok(OrgId(row.try_get(0)?));
        }
        Err(err) => return Err(err),
    };
    tx.commit().await?;
    Ok(id)
}

/// Runs `op`, giving up with [`Error::Unavailable`] after [`OPERATION_TIMEOUT`]. A write cut
/// off here rolls back unless its `COMMIT` had already reached the server.
async fn bounded<T>(
    what: &'static str,
    op: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(OPERATION_TIMEOUT, op)
        .await
        .unwrap_or_else(|_| {
            Err(Error::Unavailable {
                reason: format!(
                    "{what} got no answer from the database within {} s",
                    OPERATION_TIMEOUT.as_secs()
                ),
                source: None,
            })
        })
}

// === errors ===

/// Connection-level failures become [`Error::Unavailable`] (retry later; the pool reconnects),
/// everything else [`Error::Postgres`] (a bug or a broken database).
impl From<tokio_postgres::Error> for Error {
    fn from(err: tokio_postgres::Error) -> Self {
        match unavailable_reason(&err) {
            Some(reason) => Error::Unavailable {
                reason: reason.to_string(),
                source: Some(Box::new(err)),
            },
            None => Error::Postgres(err),
        }
    }
}

/// Why `err` means the database is out of reach, or `None` when it does not.
fn unavailable_reason(err: &tokio_postgres::Error) -> Option<&'static str> {
    if err.is_closed() {
        return Some("the connection to the database was lost");
    }
    if let Some(code) = err.code() {
        return if code == &SqlState::QUERY_CANCELED {
            Some("the statement timed out or was cancelled")
        } else if code == &SqlState::ADMIN_SHUTDOWN
            || code == &SqlState::CRASH_SHUTDOWN
            || code == &SqlState::CANNOT_CONNECT_NOW
        {
            Some("the database is shutting down or starting up")
        } else if code == &SqlState::TOO_MANY_CONNECTIONS {
            Some("the database has no connection slots left")
        } else if code.code().starts_with("08") {
            Some("the connection to the database failed")
        } else {
            None
        };
    }
    // No SQLSTATE: I/O, connect, timeout or protocol failures. Only an I/O error or a connect
    // timeout anywhere in the chain means the database is out of reach.
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return Some("cannot reach the database");
        }
        source = cause.source();
    }
    let text = err.to_string();
    if text.contains("timeout") || text.contains("timed out") {
        return Some("connecting to the database timed out");
    }
    None
}

fn pool_error(err: PoolError) -> Error {
    let reason = match &err {
        PoolError::Timeout(TimeoutType::Wait) => format!(
            "no database connection became free within {} s",
            POOL_WAIT_TIMEOUT.as_secs()
        ),
        PoolError::Timeout(TimeoutType::Create | TimeoutType::Recycle) => format!(
            "connecting to the database took longer than {} s",
            CONNECT_TIMEOUT.as_secs()
        ),
        PoolError::Closed | PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
            "the database connection pool is unusable".to_string()
        }
        PoolError::Backend(_) => String::new(),
    };
    match err {
        PoolError::Backend(err) => err.into(),
        other => Error::Unavailable {
            reason,
            source: Some(Box::new(other)),
        },
    }
}

// === rows <-> domain ===

/// Inserts an organisation and its change entry, naming `actor`, or without one the new
/// organisation itself.
async fn insert_org(
    tx: &Transaction<'_>,
    name: String,
    actor: Option<Actor>,
) -> Result<Organisation, Error> {
    if let Some(actor) = actor {
        require_actor(tx, actor).await?;
    }
    let created_ms = now_ms();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO organisations (name, created_ms) VALUES ($1, $2)
             ON CONFLICT (name) DO NOTHING
             RETURNING id",
        )
        .await?;
    let Some(row) = tx.query_opt(&stmt, &[&name, &created_ms]).await? else {
        return Err(Error::AlreadyExists {
            kind: "organisation",
            key: name,
        });
    };
    let id = OrgId(row.try_get(0)?);
    let actor = actor.unwrap_or(Actor::system(id));
    append_change(tx, &ChangeKind::OrgCreated(id), actor, "", created_ms).await?;
    Ok(Organisation { id, name })
}

/// Inserts a bank with its shares and its change entry. `new` is validated and normalised.
async fn insert_bank(tx: &Transaction<'_>, new: NewBank, actor: Actor) -> Result<Bank, Error> {
    let shares: &[OrgId] = match &new.visibility {
        Visibility::SharedWith(orgs) => orgs,
        Visibility::Private | Visibility::Public => &[],
    };
    let mut needed = vec![new.owner];
    needed.extend_from_slice(shares);
    require_orgs(tx, &needed).await?;
    require_actor(tx, actor).await?;
    let created_ms = now_ms();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO banks
                 (name, category, owner_org, visibility, description, created_ms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (name) DO NOTHING
             RETURNING id",
        )
        .await?;
    let inserted = tx
        .query_opt(
            &stmt,
            &[
                &new.name,
                &new.category.as_str(),
                &new.owner.0,
                &rows::visibility_text(&new.visibility),
                &new.description,
                &created_ms,
            ],
        )
        .await?;
    let Some(row) = inserted else {
        return Err(Error::AlreadyExists {
            kind: "bank",
            key: new.name,
        });
    };
    let id = BankId(row.try_get(0)?);
    insert_shares(tx, id, shares).await?;
    let embedding_spaces = insert_bank_spaces(tx, id, &new.embedding_spaces).await?;
    append_change(tx, &ChangeKind::BankCreated(id), actor, "", created_ms).await?;
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
/// its settings. Returns the spaces as declared, each with the settings its index has. Two banks declaring a new space at
/// once: the second insert waits for the first's commit and then does nothing, and the read
/// after it (a new statement, so a new snapshot under READ COMMITTED) sees the winner's row.
async fn insert_bank_spaces(
    tx: &Transaction<'_>,
    bank: BankId,
    spaces: &[EmbeddingSpace],
) -> Result<Vec<EmbeddingSpace>, Error> {
    if spaces.is_empty() {
        return Ok(Vec::new());
    }
    let create = tx
        .prepare_cached(
            "INSERT INTO embedding_spaces (name, dimension, metric, index_params)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO NOTHING",
        )
        .await?;
    let read = tx
        .prepare_cached(
            "SELECT id, dimension, metric, index_params FROM embedding_spaces WHERE name = $1",
        )
        .await?;
    let declare = tx
        .prepare_cached(
            "INSERT INTO bank_spaces (bank_id, space_id, threshold) VALUES ($1, $2, $3)",
        )
        .await?;
    let mut declared = Vec::with_capacity(spaces.len());
    for space in spaces {
        tx.execute(
            &create,
            &[
                &space.name,
                &i64::from(space.dimension),
                &space.metric.as_str(),
                &space.index.map(|params| params.to_string()),
            ],
        )
        .await?;
        let row = tx.query_one(&read, &[&space.name]).await?;
        let space_id: i64 = row.try_get(0)?;
        let metric: String = row.try_get(2)?;
        let index: Option<String> = row.try_get(3)?;
        let stored = rows::space(
            bank.0,
            space.name.clone(),
            row.try_get(1)?,
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
        tx.execute(&declare, &[&bank.0, &space_id, &space.threshold])
            .await?;
        declared.push(stored);
    }
    Ok(declared)
}

/// Inserts a reference's vectors, up to [`VECTOR_BYTES_PER_INSERT`] per statement. They are
/// validated against the bank's spaces (which never change), so every space named exists.
async fn insert_embeddings(
    tx: &Transaction<'_>,
    reference: ReferenceId,
    embeddings: &[FrameEmbedding],
) -> Result<(), Error> {
    if embeddings.is_empty() {
        return Ok(());
    }
    let read = tx
        .prepare_cached("SELECT id FROM embedding_spaces WHERE name = $1")
        .await?;
    let mut ids: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for embedding in embeddings {
        if !ids.contains_key(embedding.space.as_str()) {
            let id: i64 = tx.query_one(&read, &[&embedding.space]).await?.try_get(0)?;
            ids.insert(&embedding.space, id);
        }
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO embeddings (reference_id, space_id, frame_index, timestamp_ms, vector)
             SELECT $1, space_id, frame_index, timestamp_ms, vector
             FROM UNNEST($2::bigint[], $3::bigint[], $4::bigint[], $5::bytea[])
                 AS e (space_id, frame_index, timestamp_ms, vector)",
        )
        .await?;
    let per_insert = embeddings.first().map_or(1, |e| {
        (VECTOR_BYTES_PER_INSERT / (e.vector.len() * 2).max(1)).max(1)
    });
    for chunk in embeddings.chunks(per_insert) {
        let space_ids: Vec<i64> = chunk
            .iter()
            .map(|e| ids.get(e.space.as_str()).copied().unwrap_or_default())
            .collect();
        let indices: Vec<i64> = chunk.iter().map(|e| i64::from(e.frame_index)).collect();
        let timestamps = chunk
            .iter()
            .map(|e| {
                i64::try_from(e.timestamp_ms).map_err(|_| Error::InvalidInput {
                    field: "embeddings",
                    reason: format!("{} ms does not fit an i64", e.timestamp_ms),
                })
            })
            .collect::<Result<Vec<i64>, Error>>()?;
        let vectors: Vec<Vec<u8>> = chunk
            .iter()
            .map(|e| rows::encode_vector(&e.vector))
            .collect();
        tx.execute(
            &stmt,
            &[&reference.0, &space_ids, &indices, &timestamps, &vectors],
        )
        .await?;
    }
    Ok(())
}

async fn insert_shares(tx: &Transaction<'_>, bank: BankId, shares: &[OrgId]) -> Result<(), Error> {
    if shares.is_empty() {
        return Ok(());
    }
    let share_ids: Vec<i64> = shares.iter().map(|org| org.0).collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO bank_shares (bank_id, org_id)
             SELECT $1, org FROM UNNEST($2::bigint[]) AS org",
        )
        .await?;
    tx.execute(&stmt, &[&bank.0, &share_ids]).await?;
    Ok(())
}

/// Inserts a reference with its frames and its change entry. `new.frames` is validated,
/// non-empty and already deduplicated.
async fn insert_reference(
    tx: &Transaction<'_>,
    new: NewReference,
    actor: Actor,
) -> Result<Reference, Error> {
    let frame_count = u32::try_from(new.frames.len()).map_err(|_| Error::InvalidInput {
        field: "frames",
        reason: format!("{} frames do not fit a u32 count", new.frames.len()),
    })?;
    let stmt = tx
        .prepare_cached("SELECT 1 FROM banks WHERE id = $1")
        .await?;
    if tx.query_opt(&stmt, &[&new.bank.0]).await?.is_none() {
        return Err(Error::NotFound {
            kind: "bank",
            key: new.bank.to_string(),
        });
    }
    require_orgs(tx, &[new.added_by]).await?;
    require_actor(tx, actor).await?;
    let added_ms = now_ms();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO refs (bank_id, external_id, note, added_by, added_ms, frame_count)
             VALUES ($1, $2, $3, $4, $5, $6)
             RETURNING id",
        )
        .await?;
    let row = tx
        .query_one(
            &stmt,
            &[
                &new.bank.0,
                &new.external_id,
                &new.note,
                &new.added_by.0,
                &added_ms,
                &i64::from(frame_count),
            ],
        )
        .await?;
    let id = ReferenceId(row.try_get(0)?);
    insert_frames(tx, id, &new.frames).await?;
    insert_embeddings(tx, id, &new.embeddings).await?;
    append_change(
        tx,
        &ChangeKind::ReferenceAdded {
            reference: id,
            bank: new.bank,
        },
        actor,
        "",
        added_ms,
    )
    .await?;
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

/// The actor's organisation exists and so does its key, which acts for that organisation.
async fn require_actor(tx: &Transaction<'_>, actor: Actor) -> Result<(), Error> {
    require_orgs(tx, &[actor.org]).await?;
    let Some(key) = actor.key else {
        return Ok(());
    };
    let stmt = tx
        .prepare_cached("SELECT org_id FROM api_keys WHERE id = $1")
        .await?;
    let org: i64 = tx
        .query_opt(&stmt, &[&key.0])
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: "api key",
            key: key.to_string(),
        })?
        .try_get(0)?;
    rows::check_actor(actor, OrgId(org))
}

async fn mirrored_bank_id(
    client: &impl GenericClient,
    source: &str,
    remote_id: i64,
) -> Result<Option<BankId>, Error> {
    let stmt = client
        .prepare_cached("SELECT bank_id FROM mirrored_banks WHERE source = $1 AND remote_id = $2")
        .await?;
    match client.query_opt(&stmt, &[&source, &remote_id]).await? {
        Some(row) => Ok(Some(BankId(row.try_get(0)?))),
        None => Ok(None),
    }
}

async fn mirrored_reference_id(
    client: &impl GenericClient,
    source: &str,
    remote_id: i64,
) -> Result<Option<ReferenceId>, Error> {
    let stmt = client
        .prepare_cached(
            "SELECT reference_id FROM mirrored_refs WHERE source = $1 AND remote_id = $2",
        )
        .await?;
    match client.query_opt(&stmt, &[&source, &remote_id]).await? {
        Some(row) => Ok(Some(ReferenceId(row.try_get(0)?))),
        None => Ok(None),
    }
}

async fn read_bank(client: &impl GenericClient, id: BankId) -> Result<Bank, Error> {
    let stmt = client
        .prepare_cached(&format!("{BANK_SELECT} WHERE b.id = $1"))
        .await?;
    let row = client
        .query_opt(&stmt, &[&id.0])
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: "bank",
            key: id.to_string(),
        })?;
    bank_from_row(&row)
}

/// Fails with the first of `ids`, in order, that is not an organisation.
async fn require_orgs(tx: &Transaction<'_>, ids: &[OrgId]) -> Result<(), Error> {
    let raw: Vec<i64> = ids.iter().map(|id| id.0).collect();
    let stmt = tx
        .prepare_cached("SELECT id FROM organisations WHERE id = ANY($1)")
        .await?;
    let found = tx
        .query(&stmt, &[&raw])
        .await?
        .iter()
        .map(|row| row.try_get::<_, i64>(0))
        .collect::<Result<std::collections::HashSet<i64>, _>>()?;
    match ids.iter().find(|id| !found.contains(&id.0)) {
        Some(missing) => Err(Error::NotFound {
            kind: "organisation",
            key: missing.to_string(),
        }),
        None => Ok(()),
    }
}

/// Inserts a reference's frames, [`FRAMES_PER_INSERT`] per statement.
async fn insert_frames(
    tx: &Transaction<'_>,
    reference: ReferenceId,
    frames: &[FrameSignal],
) -> Result<(), Error> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO frames (reference_id, hash, frame_index, timestamp_ms, quality)
             SELECT $1, hash, frame_index, timestamp_ms, quality
             FROM UNNEST($2::bytea[], $3::bigint[], $4::bigint[], $5::smallint[])
                 AS f (hash, frame_index, timestamp_ms, quality)",
        )
        .await?;
    for chunk in frames.chunks(FRAMES_PER_INSERT) {
        let hashes: Vec<&[u8]> = chunk.iter().map(|f| f.hash.as_bytes().as_slice()).collect();
        let indices: Vec<i64> = chunk.iter().map(|f| i64::from(f.frame_index)).collect();
        let timestamps = chunk
            .iter()
            .map(|f| {
                i64::try_from(f.timestamp_ms).map_err(|_| Error::InvalidInput {
                    field: "frames.timestamp_ms",
                    reason: format!("{} ms does not fit an i64", f.timestamp_ms),
                })
            })
            .collect::<Result<Vec<i64>, Error>>()?;
        let qualities: Vec<i16> = chunk.iter().map(|f| i16::from(f.quality)).collect();
        tx.execute(
            &stmt,
            &[&reference.0, &hashes, &indices, &timestamps, &qualities],
        )
        .await?;
    }
    Ok(())
}

/// Appends the one change entry of the current write transaction and queues its notification.
/// Takes [`CHANGE_LOG_LOCK`], held until the transaction ends: call it last, just before
/// `COMMIT`, to keep the serialised part of a write short.
async fn append_change(
    tx: &Transaction<'_>,
    kind: &ChangeKind,
    actor: Actor,
    detail: &str,
    at_ms: i64,
) -> Result<ChangeSeq, Error> {
    let ids = rows::change_ids(kind);
    // Its own statement: in READ COMMITTED the next statement takes a fresh snapshot, which
    // includes the previous lock holder's commit, so MAX(seq) below is current.
    let lock = tx
        .prepare_cached("SELECT pg_advisory_xact_lock($1, $2)")
        .await?;
    tx.execute(&lock, &[&LOCK_SPACE, &CHANGE_LOG_LOCK]).await?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO changes (seq, kind, org_id, bank_id, reference_id, key_id, actor,
                                  actor_key, detail, at_ms)
             SELECT COALESCE(MAX(seq), 0) + 1, $1, $2, $3, $4, $5, $6, $7, $8, $9 FROM changes
             RETURNING seq",
        )
        .await?;
    let actor_key = actor.key.map(|key| key.0);
    let seq = ChangeSeq(
        tx.query_one(
            &insert,
            &[
                &ids.kind,
                &ids.org,
                &ids.bank,
                &ids.reference,
                &ids.key,
                &actor.org.0,
                &actor_key,
                &detail,
                &at_ms,
            ],
        )
        .await?
        .try_get(0)?,
    );
    let notify = tx.prepare_cached("SELECT pg_notify($1, $2)").await?;
    tx.execute(&notify, &[&CHANGES_CHANNEL, &seq.0.to_string()])
        .await?;
    Ok(seq)
}

async fn last_seq(client: &impl GenericClient) -> Result<ChangeSeq, Error> {
    let stmt = client
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM changes")
        .await?;
    Ok(ChangeSeq(client.query_one(&stmt, &[]).await?.try_get(0)?))
}

const CHANGE_SELECT: &str = "SELECT seq, kind, org_id, bank_id, reference_id, key_id, actor,
        actor_key, detail, at_ms FROM changes";

fn change_from_row(row: &Row) -> Result<Change, Error> {
    rows::change(rows::ChangeColumns {
        seq: row.try_get(0)?,
        kind: row.try_get(1)?,
        org: row.try_get(2)?,
        bank: row.try_get(3)?,
        reference: row.try_get(4)?,
        key: row.try_get(5)?,
        actor: row.try_get(6)?,
        actor_key: row.try_get(7)?,
        detail: row.try_get(8)?,
        at_ms: row.try_get(9)?,
    })
}

const KEY_SELECT: &str =
    "SELECT id, org_id, role, key_hash, label, created_ms, revoked_ms FROM api_keys";

fn key_from_row(row: &Row) -> Result<ApiKey, Error> {
    rows::api_key(rows::ApiKeyColumns {
        id: row.try_get(0)?,
        org: row.try_get(1)?,
        role: row.try_get(2)?,
        digest: row.try_get(3)?,
        label: row.try_get(4)?,
        created_ms: row.try_get(5)?,
        revoked_ms: row.try_get(6)?,
    })
}

/// A bank with its sorted shares and its embedding spaces (five parallel arrays, by name), in
/// one statement.
const BANK_SELECT: &str = "SELECT b.id, b.name, b.category, b.owner_org, b.visibility,
        b.description, b.created_ms,
        ARRAY(SELECT s.org_id FROM bank_shares AS s WHERE s.bank_id = b.id ORDER BY s.org_id),
        ARRAY(SELECT e.name FROM bank_spaces AS p JOIN embedding_spaces AS e ON e.id = p.space_id
              WHERE p.bank_id = b.id ORDER BY e.name),
        ARRAY(SELECT e.dimension FROM bank_spaces AS p
              JOIN embedding_spaces AS e ON e.id = p.space_id
              WHERE p.bank_id = b.id ORDER BY e.name),
        ARRAY(SELECT e.metric FROM bank_spaces AS p
              JOIN embedding_spaces AS e ON e.id = p.space_id
              WHERE p.bank_id = b.id ORDER BY e.name),
        ARRAY(SELECT p.threshold FROM bank_spaces AS p
              JOIN embedding_spaces AS e ON e.id = p.space_id
              WHERE p.bank_id = b.id ORDER BY e.name),
        ARRAY(SELECT e.index_params FROM bank_spaces AS p
              JOIN embedding_spaces AS e ON e.id = p.space_id
              WHERE p.bank_id = b.id ORDER BY e.name)
    FROM banks AS b";

fn bank_from_row(row: &Row) -> Result<Bank, Error> {
    let shares: Vec<i64> = row.try_get(7)?;
    let id: i64 = row.try_get(0)?;
    let names: Vec<String> = row.try_get(8)?;
    let dimensions: Vec<i64> = row.try_get(9)?;
    let metrics: Vec<String> = row.try_get(10)?;
    let thresholds: Vec<f32> = row.try_get(11)?;
    let indexes: Vec<Option<String>> = row.try_get(12)?;
    if dimensions.len() != names.len()
        || metrics.len() != names.len()
        || thresholds.len() != names.len()
        || indexes.len() != names.len()
    {
        return Err(Error::Corrupt {
            detail: format!("bank {id}: its embedding spaces changed while read"),
        });
    }
    let spaces = names
        .into_iter()
        .zip(dimensions)
        .zip(metrics.iter().zip(thresholds))
        .zip(indexes)
        .map(|(((name, dimension), (metric, threshold)), index)| {
            rows::space(id, name, dimension, metric, threshold, index.as_deref())
        })
        .collect::<Result<Vec<_>, _>>()?;
    rows::bank(rows::BankColumns {
        spaces,
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        category: row.try_get(2)?,
        owner: row.try_get(3)?,
        visibility: row.try_get(4)?,
        shares: shares.into_iter().map(OrgId).collect(),
        description: row.try_get(5)?,
        created_ms: row.try_get(6)?,
    })
}

const REF_SELECT: &str = "SELECT id, bank_id, external_id, note, added_by, added_ms, frame_count,
        withdrawn_ms, withdrawn_reason FROM refs";

async fn read_reference(client: &impl GenericClient, id: ReferenceId) -> Result<Reference, Error> {
    let stmt = client
        .prepare_cached(&format!("{REF_SELECT} WHERE id = $1"))
        .await?;
    let row = client
        .query_opt(&stmt, &[&id.0])
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: "reference",
            key: id.to_string(),
        })?;
    reference_from_row(&row)
}

fn reference_from_row(row: &Row) -> Result<Reference, Error> {
    let id = ReferenceId(row.try_get(0)?);
    let state = rows::reference_state(id, row.try_get(7)?, row.try_get(8)?)?;
    let frame_count = rows::frame_count(id, row.try_get(6)?)?;
    Ok(Reference {
        id,
        bank: BankId(row.try_get(1)?),
        external_id: row.try_get(2)?,
        note: row.try_get(3)?,
        added_by: OrgId(row.try_get(4)?),
        added_ms: row.try_get(5)?,
        state,
        frame_count,
    })
}

/// Reads `frame_index, timestamp_ms, hash, quality` starting at column `first`, checking every
/// value against its domain type. The hash is borrowed from the row, not allocated.
fn frame_from_row(row: &Row, first: usize, reference: ReferenceId) -> Result<FrameSignal, Error> {
    let quality: i16 = row.try_get(first + 3)?;
    rows::frame(
        reference,
        row.try_get(first)?,
        row.try_get(first + 1)?,
        row.try_get(first + 2)?,
        i64::from(quality),
    )
}

/// Reads `frame_index, timestamp_ms, space name, dimension, vector` starting at column `first`.
fn embedding_from_row(
    row: &Row,
    first: usize,
    reference: ReferenceId,
) -> Result<FrameEmbedding, Error> {
    rows::embedding(rows::EmbeddingColumns {
        reference,
        frame_index: row.try_get(first)?,
        timestamp_ms: row.try_get(first + 1)?,
        space: row.try_get(first + 2)?,
        dimension: row.try_get(first + 3)?,
        vector: row.try_get(first + 4)?,
    })
}

/// A fresh database per test on the server named by `FRAMEMATCH_TEST_POSTGRES_URL`, so tests
/// run in parallel without sharing tables, advisory locks or `NOTIFY` channels (all three are
/// per database), and dropped afterwards.
#[cfg(test)]
pub(crate) mod test_support {
    use tokio_postgres::NoTls;

    use crate::store::{Error, Store};

    /// The server the tests use: a URL whose database (any existing one) the tests connect to
    /// in order to create their own.
    pub(crate) const URL_VAR: &str = "FRAMEMATCH_TEST_POSTGRES_URL";

    type BoxError = Box<dyn std::error::Error>;

    /// The admin URL, or `None` after saying why the test is skipped. Under CI (`CI` set) a
    /// missing server is a failure, not a skip (STYLE.md §3.6).
    pub(crate) fn admin_url() -> Option<String> {
        match std::env::var(URL_VAR) {
            Ok(url) if !url.is_empty() => Some(url),
            _ if std::env::var_os("CI").is_some() => {
                panic!("{URL_VAR} must name a PostgreSQL server under CI; see .ci/postgres-start")
            }
            _ => {
                eprintln!("skipping: {URL_VAR} is not set (eval \"$(.ci/postgres-start)\")");
                None
            }
        }
    }

    /// `url` with its database replaced by `dbname`. Needs the URL form, not `key=value`.
    pub(crate) fn with_dbname(url: &str, dbname: &str) -> String {
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (url, None),
        };
        let authority_end = base
            .find("://")
            .map(|scheme| scheme + 3)
            .and_then(|start| base[start..].find('/').map(|slash| start + slash))
            .unwrap_or(base.len());
        let mut out = format!("{}/{dbname}", &base[..authority_end]);
        if let Some(query) = query {
            out.push('?');
            out.push_str(query);
        }
        out
    }

    /// A database that exists for one test.
    pub(crate) struct TestDatabase {
        admin: String,
        name: String,
        url: String,
    }

    impl TestDatabase {
        /// Creates an empty database, or returns `None` when the tests are skipped.
        pub(crate) async fn create() -> Result<Option<Self>, BoxError> {
            let Some(admin) = admin_url() else {
                return Ok(None);
            };
            let name = format!("framematch_t_{}", uuid::Uuid::new_v4().simple());
            let (client, connection) = tokio_postgres::connect(&admin, NoTls).await?;
            tokio::spawn(connection);
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await?;
            let url = with_dbname(&admin, &name);
            Ok(Some(Self { admin, name, url }))
        }

        /// Its URL.
        pub(crate) fn url(&self) -> &str {
            &self.url
        }

        /// A store on it.
        pub(crate) async fn open(&self) -> Result<Store, Error> {
            Store::open_postgres(&self.url).await
        }

        /// A plain connection to it, to look at or tamper with the tables directly.
        pub(crate) async fn connect(&self) -> Result<tokio_postgres::Client, BoxError> {
            let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await?;
            tokio::spawn(connection);
            Ok(client)
        }
    }

    impl Drop for TestDatabase {
        /// Drops the database (closing any connection still open to it) on a thread of its own,
        /// since `Drop` cannot await inside the test's runtime.
        fn drop(&mut self) {
            let admin = self.admin.clone();
            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
            let dropped = std::thread::spawn(move || -> Result<(), String> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(async {
                    let (client, connection) = tokio_postgres::connect(&admin, NoTls)
                        .await
                        .map_err(|e| e.to_string())?;
                    tokio::spawn(connection);
                    client.batch_execute(&sql).await.map_err(|e| e.to_string())
                })
            })
            .join();
            if !matches!(dropped, Ok(Ok(()))) {
                eprintln!("could not drop test database {}: {dropped:?}", self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
                            return Err(format!(
                                "after {} the tailer saw {}",
                                last.0, change.seq.0
                            ));
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
}
