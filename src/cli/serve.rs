//! `framematch serve`: its flags (with `FRAMEMATCH_*` environment variables), validated once into
//! an [`api::ServeConfig`] before anything starts (STYLE.md §1.3: bad config exits 64).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::api::{self, ServeConfig};
use crate::config::{Error, FollowConfig, Limits, LogFormat, invalid};
use crate::embed::{InputSize, ModelConfig};
use crate::hash::PDQ_BITS;
use crate::index::{EngineKind, HnswParams, VectorParams};
use crate::matching::MatchParams;
use crate::telemetry::OtlpConfig;
use crate::tls::{self, Identity, ServerTls, TrustRoots};

/// Default address of the Prometheus scrape endpoint.
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9090";

/// `framematch serve` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on for gRPC; port 0 picks a free port. The bound address is printed on
    /// the first line of output.
    #[arg(long, env = "FRAMEMATCH_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Address of the Prometheus scrape endpoint (`GET /metrics`, plain HTTP), always on; port 0
    /// picks a free port. The bound address is printed on the second line of output.
    #[arg(long, env = "FRAMEMATCH_METRICS_LISTEN", default_value = DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: SocketAddr,
    /// Directory of the embedded store (created if missing). Unused with `--store`.
    #[arg(long, env = "FRAMEMATCH_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// A PostgreSQL URL (`postgres://user:password@host:5432/db`) to share one database between
    /// several replicas instead of the embedded store. Each replica follows the change log.
    #[arg(long, env = "FRAMEMATCH_STORE")]
    pub store: Option<String>,
    /// How often a replica polls the change log for other replicas' writes, in milliseconds (it is
    /// also woken at once by PostgreSQL notifications).
    #[arg(long, env = "FRAMEMATCH_TAIL_INTERVAL_MS", default_value_t = 1000)]
    pub tail_interval_ms: u64,
    /// Index engine for PDQ frames: `exact` (linear scan), `mih` (exact multi-index hashing) or `hnsw` (approximate).
    #[arg(long, env = "FRAMEMATCH_INDEX_ENGINE", default_value = "mih")]
    pub index_engine: String,
    /// hnsw: neighbours per node (M).
    #[arg(long, env = "FRAMEMATCH_HNSW_M", default_value_t = HnswParams::default().max_connections)]
    pub hnsw_m: usize,
    /// hnsw: candidate list size while building.
    #[arg(long, env = "FRAMEMATCH_HNSW_EF_CONSTRUCTION", default_value_t = HnswParams::default().ef_construction)]
    pub hnsw_ef_construction: usize,
    /// hnsw: candidate list size while searching.
    #[arg(long, env = "FRAMEMATCH_HNSW_EF_SEARCH", default_value_t = HnswParams::default().ef_search)]
    pub hnsw_ef_search: usize,
    /// hnsw: neighbours fetched per search before the radius filter.
    #[arg(long, env = "FRAMEMATCH_HNSW_KNN", default_value_t = HnswParams::default().knn)]
    pub hnsw_knn: usize,
    /// Vector index settings of embedding spaces created from now on, e.g.
    /// `m=16,ef_construction=128,ef_search=64,graph_min=20000` (any subset; missing keys keep
    /// these defaults). Stored with each space when it is created; a space keeps its stored
    /// settings across restarts whatever this says.
    #[arg(long, env = "FRAMEMATCH_VECTOR_INDEX", value_name = "SETTINGS")]
    pub vector_index: Option<String>,
    /// Default largest Hamming distance (bits) counted as a match.
    #[arg(long, env = "FRAMEMATCH_MAX_DISTANCE", default_value_t = crate::hash::DEFAULT_MAX_DISTANCE)]
    pub max_distance: u32,
    /// Default minimum PDQ quality (0-100) for a frame to match.
    #[arg(long, env = "FRAMEMATCH_MIN_QUALITY", default_value_t = crate::hash::DEFAULT_MIN_QUALITY)]
    pub min_quality: u8,
    /// Largest encoded image accepted, in bytes.
    #[arg(long, env = "FRAMEMATCH_MAX_IMAGE_BYTES", default_value_t = Limits::default().max_image_bytes)]
    pub max_image_bytes: usize,
    /// Largest picture accepted, in pixels.
    #[arg(long, env = "FRAMEMATCH_MAX_PIXELS", default_value_t = Limits::default().max_pixels)]
    pub max_pixels: u64,
    /// Largest decoded picture accepted, in bytes (width x height x bytes per pixel of the decoded
    /// form, 16-bit and alpha included), checked from the header before decoding.
    #[arg(long, env = "FRAMEMATCH_MAX_DECODE_BYTES", default_value_t = Limits::default().max_decode_bytes)]
    pub max_decode_bytes: u64,
    /// Memory all decodes in flight may hold together, in bytes; pictures wait for room.
    #[arg(long, env = "FRAMEMATCH_DECODE_MEMORY", default_value_t = Limits::default().decode_memory)]
    pub decode_memory: u64,
    /// Most frames in one stream.
    #[arg(long, env = "FRAMEMATCH_MAX_FRAMES_PER_STREAM", default_value_t = Limits::default().max_frames_per_stream)]
    pub max_frames_per_stream: u32,
    /// Most MatchVideo streams open at once.
    #[arg(long, env = "FRAMEMATCH_MAX_CONCURRENT_STREAMS", default_value_t = Limits::default().max_concurrent_streams)]
    pub max_concurrent_streams: usize,
    /// Threads hashing images; 0 means one per CPU core.
    #[arg(long, env = "FRAMEMATCH_HASH_WORKERS", default_value_t = 0)]
    pub hash_workers: usize,
    /// Most hashing jobs waiting for a worker before requests are refused.
    #[arg(long, env = "FRAMEMATCH_MAX_QUEUED_HASHES", default_value_t = Limits::default().max_queued_hashes)]
    pub max_queued_hashes: usize,
    /// How long open streams may run on after a shutdown signal, in milliseconds.
    #[arg(long, env = "FRAMEMATCH_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// Log format: `text` or `json`.
    #[arg(long, env = "FRAMEMATCH_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Local development only: accept every request without an API key, as an admin of the
    /// default organisation. Never use it on a network anyone else can reach.
    #[arg(long, env = "FRAMEMATCH_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// The secret of the admin key created on first start with an empty store (at least 24
    /// printable characters). Without it a random one is generated and printed once. Ignored once
    /// any key exists.
    #[arg(long, env = "FRAMEMATCH_BOOTSTRAP_ADMIN_KEY", hide_env_values = true)]
    pub bootstrap_admin_key: Option<String>,
    /// Follow a partner framematch at this URL (`http://host:port`): mirror the banks it shares
    /// with the organisation of `--follow-key` into this server, and keep them up to date.
    #[arg(long, env = "FRAMEMATCH_FOLLOW")]
    pub follow: Option<String>,
    /// The API key (a matcher key is enough) the partner gave this platform, sent as
    /// `authorization: Bearer <key>` to the partner named by `--follow`.
    #[arg(long, env = "FRAMEMATCH_FOLLOW_KEY", hide_env_values = true)]
    pub follow_key: Option<String>,
    /// Local organisations (comma-separated names) that may match against the mirrored banks;
    /// default the default organisation. Admins match against every bank anyway.
    #[arg(long, env = "FRAMEMATCH_FOLLOW_SHARE_WITH", value_delimiter = ',')]
    pub follow_share_with: Vec<String>,
    /// With an https:// `--follow`: the CA (PEM) to trust for the partner's certificate (default:
    /// the system's trusted roots).
    #[arg(long, env = "FRAMEMATCH_FOLLOW_TLS_CA", value_name = "PEM")]
    pub follow_tls_ca: Option<PathBuf>,
    /// With an https:// `--follow`: this platform's client certificate (PEM), when the partner
    /// requires one (mTLS); needs --follow-tls-client-key.
    #[arg(long, env = "FRAMEMATCH_FOLLOW_TLS_CLIENT_CERT", value_name = "PEM")]
    pub follow_tls_client_cert: Option<PathBuf>,
    /// The PEM private key of --follow-tls-client-cert.
    #[arg(long, env = "FRAMEMATCH_FOLLOW_TLS_CLIENT_KEY", value_name = "PEM")]
    pub follow_tls_client_key: Option<PathBuf>,
    /// Serve gRPC over TLS with this PEM certificate chain (leaf first); needs --tls-key. The
    /// metrics endpoint stays plain HTTP.
    #[arg(long, env = "FRAMEMATCH_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "FRAMEMATCH_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Require clients to present a certificate signed by a CA in this PEM file (mTLS).
    #[arg(long, env = "FRAMEMATCH_TLS_CLIENT_CA", value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
    /// With --tls-client-ca: also let in clients without a certificate (a certificate that is
    /// presented must still be valid).
    #[arg(long, env = "FRAMEMATCH_TLS_CLIENT_AUTH_OPTIONAL")]
    pub tls_client_auth_optional: bool,
    /// The server's own embedding model (`--embedding-model` and the flags that go with it).
    #[command(flatten)]
    pub embedding: EmbeddingArgs,
    /// The cosine at or above which a reference frame matches, for banks created with the space
    /// and no threshold of their own.
    #[arg(long, env = "FRAMEMATCH_EMBEDDING_THRESHOLD", value_name = "F", default_value_t = crate::embed::DEFAULT_THRESHOLD)]
    pub embedding_threshold: f32,
    /// Embed at most one upload frame per this many milliseconds of a MatchVideo stream (vPDQ's
    /// one frame per second; the model costs about a hundred times PDQ); 0 embeds every frame.
    #[arg(
        long,
        env = "FRAMEMATCH_EMBEDDING_INTERVAL_MS",
        value_name = "MS",
        default_value_t = 1000
    )]
    pub embedding_interval_ms: u64,
    /// Also embed these windows of each embedded upload frame, so a reference shown small inside
    /// another picture (picture-in-picture) still matches: grids `COLUMNSxROWS@SHARE`
    /// separated by commas, e.g. `2x2@0.6` (four windows of 60 % of the sides, one per corner),
    /// at most 16 windows; each is one more model run per embedded frame. `none` embeds the
    /// whole picture (and its content area inside borders) only.
    #[arg(
        long,
        env = "FRAMEMATCH_EMBEDDING_WINDOWS",
        value_name = "GRIDS",
        default_value = "none"
    )]
    pub embedding_windows: crate::embed::Windows,
}

/// The embedding model flags shared by `serve` and `hash --embedding`.
#[derive(Clone, Debug, clap::Args)]
pub struct EmbeddingArgs {
    /// An embedding model (issue #11): an ONNX graph taking uint8 NHWC pictures and returning
    /// one descriptor each, such as `sscd.onnx` from `.ci/fetch-models`. With it `serve` computes
    /// the vectors of frames that carry pixels, for banks that declare its space; without it
    /// everything works as before and only client-sent vectors are matched.
    #[arg(
        long = "embedding-model",
        env = "FRAMEMATCH_EMBEDDING_MODEL",
        value_name = "PATH"
    )]
    pub model: Option<PathBuf>,
    /// The embedding space the model's vectors belong to, as banks declare it.
    #[arg(long = "embedding-space", env = "FRAMEMATCH_EMBEDDING_SPACE", value_name = "NAME", default_value = crate::embed::DEFAULT_SPACE)]
    pub space: String,
    /// The size pictures are resized to before the model, `WIDTHxHEIGHT`.
    #[arg(
        long = "embedding-input",
        env = "FRAMEMATCH_EMBEDDING_INPUT",
        value_name = "WxH",
        default_value = "320x320"
    )]
    pub input: String,
    /// The ONNX Runtime shared library (`libonnxruntime.so.1.x`) that runs the model; needed with
    /// --embedding-model. The `onnxruntime` PyPI wheel ships one; `.ci/fetch-models` prints it.
    #[arg(long, env = "ORT_DYLIB_PATH", value_name = "PATH")]
    pub onnxruntime: Option<PathBuf>,
}

impl EmbeddingArgs {
    /// The model these flags name, checked (space name, input size, both files exist), or `None`
    /// without `--embedding-model`. `threshold` and `sessions` are the caller's.
    ///
    /// # Errors
    /// The flag and what is wrong with it; a missing file is named with how to fetch it.
    pub fn model_config(
        &self,
        threshold: f32,
        sessions: usize,
    ) -> Result<Option<ModelConfig>, Error> {
        let Some(model) = &self.model else {
            return Ok(None);
        };
        let space = self.space.as_str();
        if space.is_empty()
            || space.len() > MAX_SPACE_NAME
            || !space
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(invalid(
                "embedding-space",
                format!("{space:?}: 1 to {MAX_SPACE_NAME} characters of a-z 0-9 _ -"),
            ));
        }
        let input: InputSize = self
            .input
            .parse()
            .map_err(|reason| invalid("embedding-input", reason))?;
        if !model.is_file() {
            return Err(invalid(
                "embedding-model",
                crate::embed::Error::ModelMissing {
                    path: model.clone(),
                }
                .to_string(),
            ));
        }
        let Some(runtime) = &self.onnxruntime else {
            return Err(invalid(
                "onnxruntime",
                "the ONNX Runtime library is needed with --embedding-model (or set ORT_DYLIB_PATH); \
                 run `eval \"$(.ci/fetch-models)\"` (README \"Embedding model\")",
            ));
        };
        if !runtime.is_file() {
            return Err(invalid(
                "onnxruntime",
                crate::embed::Error::RuntimeMissing {
                    path: runtime.clone(),
                }
                .to_string(),
            ));
        }
        Ok(Some(ModelConfig {
            space: space.to_string(),
            model: model.clone(),
            runtime: runtime.clone(),
            input,
            threshold,
            sessions,
        }))
    }
}

impl TryFrom<&ServeArgs> for ServeConfig {
    type Error = Error;

    fn try_from(args: &ServeArgs) -> Result<Self, Error> {
        let engine = EngineKind::from_str(&args.index_engine).map_err(|_| {
            invalid(
                "index-engine",
                format!("{:?}; expected exact, mih or hnsw", args.index_engine),
            )
        })?;
        if args.max_distance > PDQ_BITS / 2 {
            return Err(invalid(
                "max-distance",
                format!(
                    "{} bits; at most {} (half the hash)",
                    args.max_distance,
                    PDQ_BITS / 2
                ),
            ));
        }
        if args.min_quality > 100 {
            return Err(invalid(
                "min-quality",
                format!("{}; at most 100", args.min_quality),
            ));
        }
        for (flag, value) in [
            ("max-image-bytes", args.max_image_bytes as u64),
            ("max-pixels", args.max_pixels),
            ("max-decode-bytes", args.max_decode_bytes),
            (
                "max-frames-per-stream",
                u64::from(args.max_frames_per_stream),
            ),
            ("max-concurrent-streams", args.max_concurrent_streams as u64),
            ("max-queued-hashes", args.max_queued_hashes as u64),
            ("hnsw-m", args.hnsw_m as u64),
            ("hnsw-ef-construction", args.hnsw_ef_construction as u64),
            ("hnsw-ef-search", args.hnsw_ef_search as u64),
            ("hnsw-knn", args.hnsw_knn as u64),
        ] {
            if value == 0 {
                return Err(invalid(flag, "must be at least 1"));
            }
        }
        if args.max_image_bytes > 1 << 30 {
            return Err(invalid("max-image-bytes", "at most 1 GiB"));
        }
        decode_memory_fits(args)?;
        let log_format = match args.log_format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log-format",
                    format!("{other:?}; expected text or json"),
                ));
            }
        };
        let postgres_url = match &args.store {
            None => None,
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Some(url.clone())
            }
            Some(_) => {
                return Err(invalid(
                    "store",
                    "must be a postgres:// or postgresql:// URL (leave it unset for the embedded store)",
                ));
            }
        };
        if args.tail_interval_ms == 0 {
            return Err(invalid("tail-interval-ms", "must be at least 1"));
        }
        if let Some(secret) = &args.bootstrap_admin_key {
            crate::auth::validate_secret(secret)
                .map_err(|reason| invalid("bootstrap-admin-key", reason))?;
        }
        let follow = match (&args.follow, &args.follow_key) {
            (Some(url), Some(key)) => Some(FollowConfig {
                tls_ca: args.follow_tls_ca.clone(),
                tls_client_cert: args.follow_tls_client_cert.clone(),
                tls_client_key: args.follow_tls_client_key.clone(),
                ..FollowConfig::parse(url, key, &args.follow_share_with)?
            }),
            (Some(_), None) => return Err(invalid("follow-key", "is required with --follow")),
            (None, Some(_)) => return Err(invalid("follow", "is required with --follow-key")),
            (None, None) if !args.follow_share_with.is_empty() => {
                return Err(invalid("follow", "is required with --follow-share-with"));
            }
            (None, None) => None,
        };
        let vector_index = match &args.vector_index {
            None => VectorParams::default(),
            Some(text) => text
                .parse::<VectorParams>()
                .map_err(|bad| invalid("vector-index", bad.to_string()))?,
        };
        let hash_workers = if args.hash_workers == 0 {
            api::config::default_workers()
        } else {
            args.hash_workers
        };
        Ok(Self {
            embedding: embedding_model(args, hash_workers)?,
            embedding_interval_ms: args.embedding_interval_ms,
            embedding_windows: args.embedding_windows.clone(),
            data_dir: args.data_dir.clone(),
            postgres_url,
            tail_interval: Duration::from_millis(args.tail_interval_ms),
            engine,
            hnsw: HnswParams {
                max_connections: args.hnsw_m,
                ef_construction: args.hnsw_ef_construction,
                ef_search: args.hnsw_ef_search,
                knn: args.hnsw_knn,
            },
            vector_index,
            match_defaults: MatchParams {
                max_distance: args.max_distance,
                min_quality: args.min_quality,
                ..MatchParams::default()
            },
            limits: Limits {
                max_image_bytes: args.max_image_bytes,
                max_pixels: args.max_pixels,
                max_frames_per_stream: args.max_frames_per_stream,
                max_concurrent_streams: args.max_concurrent_streams,
                max_queued_hashes: args.max_queued_hashes,
                max_decode_bytes: args.max_decode_bytes,
                decode_memory: args.decode_memory,
            },
            hash_workers,
            shutdown_grace: Duration::from_millis(args.shutdown_grace_ms),
            log_format,
            metrics_listen: args.metrics_listen,
            insecure_no_auth: args.insecure_no_auth,
            bootstrap_admin_key: args.bootstrap_admin_key.clone(),
            follow,
            tls: server_tls(args)?,
            otlp: OtlpConfig::default(),
        })
    }
}

/// Longest embedding space name (as the proto's `EmbeddingSpace.name` allows).
const MAX_SPACE_NAME: usize = 64;

/// `--embedding-*` and `--onnxruntime` of `serve`: [`EmbeddingArgs::model_config`] with the
/// threshold checked, so a missing download stops the server before it starts, naming the file
/// and the fix.
fn embedding_model(args: &ServeArgs, sessions: usize) -> Result<Option<ModelConfig>, Error> {
    let threshold = args.embedding_threshold;
    if args.embedding.model.is_none() && !args.embedding_windows.is_empty() {
        return Err(invalid(
            "embedding-windows",
            format!(
                "{}: needs --embedding-model; windows are embedded by the server's own model",
                args.embedding_windows
            ),
        ));
    }
    if args.embedding.model.is_some()
        && !(threshold.is_finite() && threshold > 0.0 && threshold <= 1.0)
    {
        return Err(invalid(
            "embedding-threshold",
            format!("{threshold}: a cosine above 0 and at most 1"),
        ));
    }
    args.embedding.model_config(threshold, sessions)
}

/// `--decode-memory` holds at least one picture at `--max-pixels` and `--max-decode-bytes`, so
/// every picture those limits accept can be decoded.
fn decode_memory_fits(args: &ServeArgs) -> Result<(), Error> {
    let limits = Limits {
        max_pixels: args.max_pixels,
        max_decode_bytes: args.max_decode_bytes,
        ..Limits::default()
    };
    let worst = api::budget::worst_decode_cost(&limits, args.embedding.model.is_some());
    if args.decode_memory < worst {
        return Err(invalid(
            "decode-memory",
            format!(
                "{} bytes is less than one picture at --max-pixels {} and --max-decode-bytes {} needs ({worst} bytes); raise it or lower those",
                args.decode_memory, args.max_pixels, args.max_decode_bytes
            ),
        ));
    }
    Ok(())
}

/// `--tls-*`: both halves of the identity or neither, client CAs only over TLS, and every file
/// read and checked now, so a bad one stops the server before it starts.
fn server_tls(args: &ServeArgs) -> Result<Option<ServerTls>, Error> {
    let (cert, key) = match (&args.tls_cert, &args.tls_key) {
        (None, None) => {
            if args.tls_client_ca.is_some() {
                return Err(invalid(
                    "tls-client-ca",
                    "needs --tls-cert and --tls-key: client certificates are only checked over TLS",
                ));
            }
            if args.tls_client_auth_optional {
                return Err(invalid(
                    "tls-client-auth-optional",
                    "needs --tls-client-ca (and --tls-cert, --tls-key)",
                ));
            }
            return Ok(None);
        }
        (Some(_), None) => {
            return Err(invalid(
                "tls-cert",
                "given without --tls-key; give both or neither",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "tls-key",
                "given without --tls-cert; give both or neither",
            ));
        }
        (Some(cert), Some(key)) => (cert, key),
    };
    let identity = Identity::load(cert, key).map_err(|error| {
        let flag = match &error {
            tls::Error::PrivateKey { .. } | tls::Error::KeyMismatch { .. } => "tls-key",
            tls::Error::Read { origin, .. } if Path::new(origin) == key.as_path() => "tls-key",
            tls::Error::Read { .. } | tls::Error::Certificate { .. } => "tls-cert",
        };
        invalid(flag, error.to_string())
    })?;
    let mut tls = ServerTls::new(identity);
    match &args.tls_client_ca {
        Some(path) => {
            let roots = TrustRoots::load(path)
                .map_err(|error| invalid("tls-client-ca", error.to_string()))?;
            tls = tls.with_client_ca(roots);
            tls.client_auth_optional = args.tls_client_auth_optional;
        }
        None if args.tls_client_auth_optional => {
            return Err(invalid("tls-client-auth-optional", "needs --tls-client-ca"));
        }
        None => {}
    }
    Ok(Some(tls))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn config(flags: &[&str]) -> Result<ServeConfig, Error> {
        let parsed = Flags::try_parse_from(std::iter::once("serve").chain(flags.iter().copied()))
            .expect("flags parse");
        ServeConfig::try_from(&parsed.serve)
    }

    /// A CA, and a certificate for `localhost` it signed, written as PEM files in `dir`.
    fn write_pki(dir: &Path) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("sign");
        let other_key = rcgen::KeyPair::generate().expect("key");
        for (name, pem) in [
            ("ca.pem", ca.pem()),
            ("cert.pem", cert.pem()),
            ("key.pem", key.serialize_pem()),
            ("other-key.pem", other_key.serialize_pem()),
        ] {
            std::fs::write(dir.join(name), pem).expect("write pem");
        }
    }

    #[test]
    fn without_a_model_the_server_embeds_nothing() {
        let config = config(&[]).expect("valid");
        assert!(config.embedding.is_none());
        assert_eq!(config.embedding_interval_ms, 1000);
    }

    #[test]
    fn embedding_flags_are_checked_and_files_named() {
        let dir = tempfile::tempdir().expect("dir");
        let model = dir.path().join("sscd.onnx");
        let runtime = dir.path().join("libonnxruntime.so");
        std::fs::write(&model, b"graph").expect("write");
        std::fs::write(&runtime, b"library").expect("write");
        let (m, r) = (model.display().to_string(), runtime.display().to_string());
        let embedding = config(&[
            "--embedding-model",
            &m,
            "--onnxruntime",
            &r,
            "--embedding-input",
            "512x288",
            "--embedding-threshold",
            "0.8",
            "--hash-workers",
            "3",
        ])
        .expect("valid")
        .embedding
        .expect("a model");
        assert_eq!(embedding.space, "sscd");
        assert_eq!(embedding.input.to_string(), "512x288");
        assert_eq!(embedding.threshold, 0.8);
        assert_eq!(embedding.sessions, 3);

        let missing = dir.path().join("none.onnx").display().to_string();
        let error = config(&["--embedding-model", &missing, "--onnxruntime", &r])
            .expect_err("missing model");
        assert_eq!(error.flag, "embedding-model");
        assert!(
            error.reason.contains(&format!("{missing}: no such file")),
            "{error}"
        );
        assert!(error.reason.contains(".ci/fetch-models"), "{error}");
        let error = config(&["--embedding-model", &m, "--onnxruntime", &missing])
            .expect_err("missing runtime");
        assert_eq!(error.flag, "onnxruntime");
        for (flag, value) in [
            ("embedding-space", "SSCD"),
            ("embedding-input", "320"),
            ("embedding-threshold", "1.5"),
            ("embedding-threshold", "0"),
        ] {
            let long = format!("--{flag}");
            let error = config(&["--embedding-model", &m, "--onnxruntime", &r, &long, value])
                .expect_err("invalid");
            assert_eq!(error.flag, flag, "{value}");
        }
    }

    #[test]
    fn vector_index_settings_parse_or_name_the_flag() {
        assert_eq!(
            config(&[]).expect("valid").vector_index,
            VectorParams::default()
        );
        let tuned = config(&["--vector-index", "m=24,ef_construction=200"])
            .expect("valid")
            .vector_index;
        assert_eq!((tuned.max_connections, tuned.ef_construction), (24, 200));
        assert_eq!(tuned.ef_search, VectorParams::default().ef_search);
        for bad in ["m=1", "ef_search=0", "m", "depth=3", "m=x"] {
            let error = config(&["--vector-index", bad]).expect_err(bad);
            assert_eq!(error.flag, "vector-index", "{bad}");
            assert!(
                error
                    .to_string()
                    .starts_with("invalid --vector-index: bad vector index settings"),
                "{error}"
            );
        }
    }

    #[test]
    fn without_tls_flags_the_server_is_plain() {
        assert!(config(&[]).expect("valid").tls.is_none());
    }

    #[test]
    fn tls_flags_load_the_identity_and_client_ca() {
        let dir = tempfile::tempdir().expect("dir");
        write_pki(dir.path());
        let path = |name: &str| dir.path().join(name).display().to_string();
        let (cert, key, ca) = (path("cert.pem"), path("key.pem"), path("ca.pem"));
        let tls = config(&["--tls-cert", &cert, "--tls-key", &key])
            .expect("valid")
            .tls
            .expect("tls on");
        assert_eq!(tls.mode(), "tls");
        let tls = config(&[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
        ])
        .expect("valid")
        .tls
        .expect("tls on");
        assert_eq!(tls.mode(), "mtls");
        let tls = config(&[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
            "--tls-client-auth-optional",
        ])
        .expect("valid")
        .tls
        .expect("tls on");
        assert_eq!(tls.mode(), "mtls-optional");
    }

    #[test]
    fn half_a_tls_configuration_is_refused() {
        let error = config(&["--tls-cert", "cert.pem"]).expect_err("no key");
        assert_eq!(error.flag, "tls-cert");
        assert!(error.reason.contains("without --tls-key"), "{error}");
        let error = config(&["--tls-key", "key.pem"]).expect_err("no cert");
        assert_eq!(error.flag, "tls-key");
        let error = config(&["--tls-client-ca", "ca.pem"]).expect_err("no tls");
        assert_eq!(error.flag, "tls-client-ca");
        let error = config(&["--tls-client-auth-optional"]).expect_err("no ca");
        assert_eq!(error.flag, "tls-client-auth-optional");
    }

    #[test]
    fn unusable_pem_files_are_named() {
        let dir = tempfile::tempdir().expect("dir");
        write_pki(dir.path());
        let path = |name: &str| dir.path().join(name).display().to_string();
        let (cert, key) = (path("cert.pem"), path("key.pem"));

        let missing = path("missing.pem");
        let error = config(&["--tls-cert", &missing, "--tls-key", &key]).expect_err("missing");
        assert_eq!(error.flag, "tls-cert");
        assert!(error.to_string().contains(&missing), "{error}");
        let error = config(&["--tls-cert", &cert, "--tls-key", &missing]).expect_err("missing");
        assert_eq!(error.flag, "tls-key");
        assert!(error.to_string().contains(&missing), "{error}");

        // The key given as the certificate, the certificate as the key.
        let error = config(&["--tls-cert", &key, "--tls-key", &cert]).expect_err("swapped");
        assert_eq!(error.flag, "tls-cert");
        assert!(error.reason.contains(&key), "{error}");
        assert!(error.reason.contains("no PEM certificate"), "{error}");

        let other = path("other-key.pem");
        let error = config(&["--tls-cert", &cert, "--tls-key", &other]).expect_err("mismatch");
        assert_eq!(error.flag, "tls-key");
        assert!(error.reason.contains("does not belong"), "{error}");

        let error = config(&[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &key,
        ])
        .expect_err("a key is no CA");
        assert_eq!(error.flag, "tls-client-ca");
        assert!(error.reason.contains(&key), "{error}");
    }
}
