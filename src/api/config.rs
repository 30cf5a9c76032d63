//! The validated server configuration the state and the server are built from (validated from
//! `framematch serve`'s flags by [`crate::cli::serve`]; tests build it directly).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{FollowConfig, Limits, LogFormat};
use crate::embed::ModelConfig;
use crate::index::{EngineKind, HnswParams, VectorParams};
use crate::matching::MatchParams;
use crate::telemetry::OtlpConfig;
use crate::tls::ServerTls;

/// Validated server configuration.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Where the embedded store lives.
    pub data_dir: PathBuf,
    /// A PostgreSQL URL: the shared store of several replicas, instead of the embedded one.
    pub postgres_url: Option<String>,
    /// How often replicas poll the change log.
    pub tail_interval: Duration,
    /// Index engine.
    pub engine: EngineKind,
    /// hnsw parameters (used when `engine` is hnsw).
    pub hnsw: HnswParams,
    /// Vector index settings of embedding spaces created from now on (`--vector-index`).
    pub vector_index: VectorParams,
    /// Defaults for requests that leave options unset.
    pub match_defaults: MatchParams,
    /// Request limits.
    pub limits: Limits,
    /// Hashing threads.
    pub hash_workers: usize,
    /// Grace period for open streams at shutdown.
    pub shutdown_grace: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Where `serve` binds the Prometheus endpoint when the caller does not bind it.
    pub metrics_listen: SocketAddr,
    /// Accept requests without API keys (`--insecure-no-auth`).
    pub insecure_no_auth: bool,
    /// The first admin key's secret, when the operator chose it.
    pub bootstrap_admin_key: Option<String>,
    /// The partner to follow (`--follow`), if any.
    pub follow: Option<FollowConfig>,
    /// gRPC over TLS (and mTLS) when set; plain HTTP/2 otherwise.
    pub tls: Option<ServerTls>,
    /// The server's own embedding model, if any (`--embedding-*`); files checked to exist, not
    /// yet loaded (the server loads it before it answers).
    pub embedding: Option<ModelConfig>,
    /// Upload frames of one stream are embedded at most once per this many milliseconds.
    pub embedding_interval_ms: u64,
    /// Windows of each embedded upload picture embedded beside its whole
    /// (`--embedding-windows`; none by default).
    pub embedding_windows: crate::embed::Windows,
    /// Where metrics are exported over OTLP (spans are the process-wide subscriber's business,
    /// see [`crate::telemetry::Tracing`]). Not read from the environment here: `main` fills it
    /// from the `OTEL_*` variables, tests set it directly.
    pub otlp: OtlpConfig,
}

impl ServeConfig {
    /// A configuration with every default and the given data directory (used by tests). The
    /// metrics endpoint goes to a free loopback port rather than the command line's default, so
    /// servers in one process never compete for 9090.
    pub fn with_data_dir(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            postgres_url: None,
            tail_interval: Duration::from_millis(200),
            engine: EngineKind::default(),
            hnsw: HnswParams::default(),
            vector_index: VectorParams::default(),
            match_defaults: MatchParams::default(),
            limits: Limits::default(),
            hash_workers: default_workers(),
            shutdown_grace: Duration::from_secs(10),
            log_format: LogFormat::Text,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            insecure_no_auth: false,
            bootstrap_admin_key: None,
            follow: None,
            tls: None,
            embedding: None,
            embedding_interval_ms: 1000,
            embedding_windows: crate::embed::Windows::none(),
            otlp: OtlpConfig::default(),
        }
    }
}

/// One hashing thread per CPU core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
}
