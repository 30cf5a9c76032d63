//! The PostgreSQL backend: one database shared by several replicas (shared/DESIGN.md §3,
//! "Replicas"), behind the same [`super::Store`] methods as the embedded file.
//!
//! Owns the schema (numbered migrations recorded in `schema_migrations`), the SQL, the connection
//! pool, and the `LISTEN` connection that wakes change-log tailers. Input has already been
//! validated by [`super::Store`]; this module only enforces what needs the database (existence,
//! uniqueness). It is split by concern: `schema` (migrations and open-time checks), `banks`
//! (organisations, banks, sharing, embedding spaces), `refs` (references, frames, vectors, the
//! start-up load), `keys` (API keys and audit), `changes` (the change log, `LISTEN` tailing,
//! follow cursors and mirrored writes); connection set-up and errors stay here.
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
//! at open with a clear error. No lock is held across an `.await` in this module; the pool's own
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

    /// See [`super::Store::bank_counts`].
    pub(super) async fn bank_counts(&self) -> Result<Vec<(BankId, super::BankCounts)>, Error> {
        bounded("bank_counts", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT bank_id,
                            COUNT(*) FILTER (WHERE withdrawn_ms IS NULL),
                            COUNT(*) FILTER (WHERE withdrawn_ms IS NOT NULL),
                            COALESCE(SUM(frame_count), 0)::bigint
                     FROM refs GROUP BY bank_id",
                )
                .await?;
            let mut out = Vec::new();
            for row in client.query(&stmt, &[]).await? {
                let count = |index: usize| -> Result<u64, Error> {
                    let value: i64 = row.try_get(index)?;
                    u64::try_from(value).map_err(|_| Error::Corrupt {
                        detail: format!("negative count {value}"),
                    })
                };
                out.push((
                    BankId(row.try_get(0)?),
                    super::BankCounts {
                        active_references: count(1)?,
                        withdrawn_references: count(2)?,
                        frames: count(3)?,
                    },
                ));
            }
            Ok(out)
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
