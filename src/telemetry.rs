//! Telemetry (issue #5 item 1, DESIGN.md §7): logs, traces and metrics.
//!
//! - **Logs and traces.** [`Tracing::try_init`] installs the process-wide `tracing` subscriber:
//!   text or JSON lines on stderr (`--log-format`, filtered by `RUST_LOG`, default `info`) and,
//!   when an OTLP endpoint is configured, a tracing-opentelemetry layer that exports spans over
//!   OTLP/gRPC in batches. [`Tracing::shutdown`] flushes what is still queued.
//! - **Metrics.** One OpenTelemetry SDK meter provider per server ([`MetricsPipeline`]) with two
//!   readers: the Prometheus exporter, always on and served at `/metrics` on `--metrics-listen`
//!   by [`serve_metrics`], and, when an OTLP endpoint is configured, a periodic OTLP/gRPC reader.
//!   The instruments in [`Metrics`] are the single source of truth for both.
//! - **Spans.** One `rpc` span per RPC or stream ([`RpcCall`]), carrying the organisation and,
//!   for the streaming RPCs, a stream id. Per-frame work goes to metrics and debug events only
//!   (STYLE.md §3.4): a video stream of 100k frames is one span, not 100k.
//!
//! Invariants: nothing is exported over OTLP unless an endpoint is set ([`OtlpConfig`]); the OTLP
//! exporters are built inside a Tokio runtime (tonic's lazy channel spawns its worker there) and
//! flushed before that runtime goes away; metric names start with `framematch.` and carry their
//! unit on the instrument, so Prometheus names end in `_seconds` or `_total` by themselves.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    Counter, Histogram, Meter, MeterProvider as _, ObservableCounter, ObservableGauge,
    UpDownCounter,
};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::LogFormat;
use crate::index::SharedIndex;

/// The service name reported when `OTEL_SERVICE_NAME` does not set one.
pub const SERVICE_NAME: &str = "framematch";

/// Instrumentation scope of our meter and tracer.
const SCOPE: &str = "framematch";

/// Bucket bounds, in seconds, for per-frame and store latencies: 100 µs to 10 s.
const LATENCY_BUCKETS_S: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Bucket bounds, in seconds, for whole RPCs: streams may last minutes.
const RPC_BUCKETS_S: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Why telemetry could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An OTLP exporter could not be built (a malformed endpoint, for instance).
    #[error("cannot build the OTLP {signal} exporter for {endpoint:?}")]
    Exporter {
        /// `traces` or `metrics`.
        signal: &'static str,
        /// The configured endpoint.
        endpoint: String,
        /// The exporter's reason.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// The Prometheus exporter could not be built or registered.
    #[error("cannot build the Prometheus exporter")]
    Prometheus(#[source] opentelemetry_sdk::error::OTelSdkError),
    /// The Prometheus text encoding failed.
    #[error("cannot encode {families} metric families as Prometheus text")]
    Encode {
        /// How many families were gathered.
        families: usize,
        /// The encoder's reason.
        #[source]
        source: prometheus::Error,
    },
    /// A global `tracing` subscriber was installed already.
    #[error("a global tracing subscriber is already installed")]
    Subscriber(#[source] tracing_subscriber::util::TryInitError),
    /// The metrics endpoint stopped with an I/O error.
    #[error("metrics endpoint on {address}")]
    Serve {
        /// Where it listened.
        address: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Where, if anywhere, traces and metrics are exported over OTLP/gRPC.
///
/// Read from the standard variables by [`OtlpConfig::from_env`]; tests build it directly.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OtlpConfig {
    /// OTLP/gRPC endpoint for spans (`http://collector:4317`), or `None` to export none.
    pub traces_endpoint: Option<String>,
    /// OTLP/gRPC endpoint for metrics, or `None` to export none.
    pub metrics_endpoint: Option<String>,
}

impl OtlpConfig {
    /// Reads the standard `OTEL_*` variables of this process; see [`OtlpConfig::from_vars`].
    pub fn from_env() -> Self {
        Self::from_vars(std::env::vars())
    }

    /// Resolves the endpoints from `OTEL_*` variables, as the OpenTelemetry specification orders
    /// them: a signal's own `OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT` before the shared
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`. `OTEL_SDK_DISABLED=true` turns both off, and
    /// `OTEL_TRACES_EXPORTER=none` / `OTEL_METRICS_EXPORTER=none` one each. Empty values count as
    /// unset. The other variables (headers, timeout, compression, service name, resource
    /// attributes, export interval) are read by the exporters and the SDK themselves.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let vars: std::collections::HashMap<String, String> = vars
            .into_iter()
            .filter(|(key, value)| key.starts_with("OTEL_") && !value.trim().is_empty())
            .collect();
        let get = |key: &str| vars.get(key).map(|v| v.trim().to_string());
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Self::default();
        }
        let endpoint = |signal: &str| {
            if get(&format!("OTEL_{signal}_EXPORTER")).is_some_and(|v| v == "none") {
                return None;
            }
            get(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
                .or_else(|| get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        };
        Self {
            traces_endpoint: endpoint("TRACES"),
            metrics_endpoint: endpoint("METRICS"),
        }
    }
}

/// The resource every exported span and metric carries: `service.name` from `OTEL_SERVICE_NAME`
/// (else [`SERVICE_NAME`]), `OTEL_RESOURCE_ATTRIBUTES`, and the SDK's own attributes.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    if named {
        detected
    } else {
        Resource::builder().with_service_name(SERVICE_NAME).build()
    }
}

/// The process-wide `tracing` subscriber and, when traces are exported, its OTLP pipeline.
#[derive(Debug)]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    /// Installs the global subscriber: log lines in `format` on stderr, and span export over OTLP
    /// when `otlp.traces_endpoint` is set. Call it inside a Tokio runtime when exporting.
    ///
    /// # Errors
    /// [`Error::Exporter`] for an unusable endpoint, [`Error::Subscriber`] when a global subscriber
    /// exists already.
    pub fn try_init(format: LogFormat, otlp: &OtlpConfig) -> Result<Self, Error> {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let (text, json) = match format {
            LogFormat::Text => (
                Some(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)),
                None,
            ),
            LogFormat::Json => (
                None,
                Some(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .with_writer(std::io::stderr),
                ),
            ),
        };
        let provider = otlp
            .traces_endpoint
            .as_deref()
            .map(tracer_provider)
            .transpose()?;
        // Only our own spans leave: the exporter's tonic, hyper and h2 trace themselves, and
        // exporting those spans would make more of them (RUST_LOG=debug would feed back).
        let otel = provider.as_ref().map(|provider| {
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(SCOPE))
                .with_tracked_inactivity(false)
                .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
                    metadata.target().starts_with("framematch")
                }))
        });
        tracing_subscriber::registry()
            .with(filter)
            .with(text)
            .with(json)
            .with(otel)
            .try_init()
            .map_err(Error::Subscriber)?;
        if let Some(endpoint) = &otlp.traces_endpoint {
            tracing::info!(%endpoint, "exporting traces over OTLP/gRPC");
        }
        Ok(Self { provider })
    }

    /// Exports the spans still queued and stops the exporter. Blocks: call it off the async
    /// workers (`spawn_blocking`) while the runtime is still alive.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "flushing traces failed");
        }
    }
}

/// A batch OTLP/gRPC span pipeline towards `endpoint`.
fn tracer_provider(endpoint: &str) -> Result<SdkTracerProvider, Error> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|source| Error::Exporter {
            signal: "traces",
            endpoint: endpoint.to_string(),
            source,
        })?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource())
        .build())
}

/// One server's meter provider: the Prometheus registry behind `/metrics`, and the OTLP reader
/// when configured. Built per server, so two servers in one process (tests) never share counts.
pub struct MetricsPipeline {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    meter: Meter,
    metrics: Metrics,
    // Kept so their callbacks stay registered for the provider's life.
    /// Observable gauges stay registered while they are held.
    lag_gauges: parking_lot::Mutex<Vec<ObservableGauge<f64>>>,
    observers: parking_lot::Mutex<Vec<ObservableGauge<u64>>>,
    follow_counters: parking_lot::Mutex<Vec<ObservableCounter<u64>>>,
}

impl std::fmt::Debug for MetricsPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsPipeline").finish_non_exhaustive()
    }
}

impl MetricsPipeline {
    /// A Prometheus registry plus, with `otlp.metrics_endpoint`, a periodic OTLP/gRPC reader
    /// (every `OTEL_METRIC_EXPORT_INTERVAL` ms, 60 s by default). Call it inside a Tokio runtime
    /// when exporting.
    ///
    /// # Errors
    /// [`Error::Prometheus`] or [`Error::Exporter`].
    pub fn try_new(otlp: &OtlpConfig) -> Result<Self, Error> {
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            // Our labels are enough; otel_scope_* on every series only adds noise.
            .scope_info_enabled(false)
            .build()
            .map_err(Error::Prometheus)?;
        let mut builder = SdkMeterProvider::builder()
            .with_reader(prometheus)
            .with_resource(resource());
        if let Some(endpoint) = &otlp.metrics_endpoint {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.as_str())
                .build()
                .map_err(|source| Error::Exporter {
                    signal: "metrics",
                    endpoint: endpoint.clone(),
                    source,
                })?;
            builder = builder.with_reader(PeriodicReader::builder(exporter).build());
            tracing::info!(%endpoint, "exporting metrics over OTLP/gRPC");
        }
        let provider = builder.build();
        let meter = provider.meter(SCOPE);
        let metrics = Metrics::new(&meter);
        Ok(Self {
            provider,
            registry,
            meter,
            metrics,
            lag_gauges: parking_lot::Mutex::new(Vec::new()),
            observers: parking_lot::Mutex::new(Vec::new()),
            follow_counters: parking_lot::Mutex::new(Vec::new()),
        })
    }

    /// The instruments, to record into.
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// Reports `framematch.replica.lag`: how far this server's index may be behind the store's
    /// change log, in seconds, labelled with the store kind. `lag_ms` is kept by the change-log
    /// follower: 0 while it is caught up, else the time since it last was. The embedded store is
    /// its own source (the index applies each write right after its commit), so it stays 0 there.
    pub fn observe_replica_lag(&self, store: &'static str, lag_ms: Arc<AtomicU64>) {
        let gauge = self
            .meter
            .f64_observable_gauge("framematch.replica.lag")
            .with_unit("s")
            .with_description(
                "How far this server's index may be behind the store's change log: 0 while caught \
                 up, else the time since it last was; always 0 with the embedded store",
            )
            .with_callback(move |observer| {
                let seconds = lag_ms.load(Ordering::Relaxed) as f64 / 1000.0;
                observer.observe(seconds, &[KeyValue::new("store", store)]);
            })
            .build();
        self.lag_gauges.lock().push(gauge);
    }

    /// Reports the index's size (`framematch.index.frames`) and tombstones
    /// (`framematch.index.tombstones`) per signal (`signal="pdq"`, or `signal="embedding"` with
    /// `space`), read at each collection. Holds the index until the pipeline is dropped, so the
    /// last export at shutdown still reports it.
    pub fn observe_index(&self, index: &SharedIndex) {
        let live = index.clone();
        let dead = index.clone();
        let frames = self
            .meter
            .u64_observable_gauge("framematch.index.frames")
            .with_unit("{frame}")
            .with_description(
                "Frame signals searchable in the in-memory index (a frame with uniform borders \
                 counts twice: whole picture and content area)",
            )
            .with_callback(move |observer| {
                let index = live.read();
                observer.observe(
                    index.pdq().live_frames() as u64,
                    &[KeyValue::new("signal", "pdq")],
                );
                for (name, space) in index.spaces() {
                    observer.observe(
                        space.live_vectors() as u64,
                        &[
                            KeyValue::new("signal", "embedding"),
                            KeyValue::new("space", name.to_string()),
                        ],
                    );
                }
            })
            .build();
        let tombstones = self
            .meter
            .u64_observable_gauge("framematch.index.tombstones")
            .with_unit("{frame}")
            .with_description("Withdrawn frames still held by the index until its next rebuild")
            .with_callback(move |observer| {
                let index = dead.read();
                observer.observe(
                    index.pdq().tombstones() as u64,
                    &[KeyValue::new("signal", "pdq")],
                );
                for (name, space) in index.spaces() {
                    observer.observe(
                        space.tombstones() as u64,
                        &[
                            KeyValue::new("signal", "embedding"),
                            KeyValue::new("space", name.to_string()),
                        ],
                    );
                }
            })
            .build();
        self.observers.lock().extend([frames, tombstones]);
    }

    /// Reports partner following (`--follow`, [`crate::follow`]), labelled with the partner's
    /// URL: `framematch.follow.seq` (the partner's change-log position mirrored so far),
    /// `framematch.follow.connected` (1 while the change stream is open) and
    /// `framematch.follow.events` (events applied, by kind; `rejected` counts malformed ones).
    pub fn observe_follow<P: FollowReport>(&self, progress: Arc<P>) {
        let partner = KeyValue::new("partner", progress.partner().to_string());
        let (seq_progress, seq_partner) = (Arc::clone(&progress), partner.clone());
        let seq = self
            .meter
            .u64_observable_gauge("framematch.follow.seq")
            .with_description(
                "The followed partner's change-log position up to which its changes are mirrored",
            )
            .with_callback(move |observer| {
                observer.observe(
                    seq_progress.applied_seq(),
                    std::slice::from_ref(&seq_partner),
                );
            })
            .build();
        let (up_progress, up_partner) = (Arc::clone(&progress), partner.clone());
        let connected = self
            .meter
            .u64_observable_gauge("framematch.follow.connected")
            .with_description("1 while the change stream from the followed partner is open, else 0")
            .with_callback(move |observer| {
                observer.observe(
                    u64::from(up_progress.is_connected()),
                    std::slice::from_ref(&up_partner),
                );
            })
            .build();
        let events = self
            .meter
            .u64_observable_counter("framematch.follow.events")
            .with_unit("{event}")
            .with_description("Change events from the followed partner applied here, by kind")
            .with_callback(move |observer| {
                for (kind, count) in progress.event_counts() {
                    observer.observe(count, &[partner.clone(), KeyValue::new("kind", kind)]);
                }
            })
            .build();
        self.observers.lock().extend([seq, connected]);
        self.follow_counters.lock().push(events);
    }

    /// The Prometheus registry the exporter writes into.
    pub fn registry(&self) -> prometheus::Registry {
        self.registry.clone()
    }

    /// Every metric in the Prometheus text format.
    ///
    /// # Errors
    /// [`Error::Encode`] when the encoder fails.
    pub fn encode(&self) -> Result<String, Error> {
        encode(&self.registry)
    }

    /// Exports the last OTLP batch and stops the readers. Blocks: call it off the async workers
    /// while the runtime is still alive.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "flushing metrics failed");
        }
    }
}

fn encode(registry: &prometheus::Registry) -> Result<String, Error> {
    use prometheus::Encoder as _;
    let families = registry.gather();
    let mut out = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&families, &mut out)
        .map_err(|source| Error::Encode {
            families: families.len(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Serves `GET /metrics` (Prometheus text format) on `listener` until `shutdown` completes.
///
/// # Errors
/// [`Error::Serve`] when the HTTP server fails.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: prometheus::Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    use axum::http::{StatusCode, header};
    let address = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                match encode(&registry) {
                    Ok(text) => (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
                        text,
                    ),
                    Err(error) => {
                        tracing::error!(error = &error as &dyn std::error::Error, "scrape failed");
                        (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                            error.to_string(),
                        )
                    }
                }
            }
        }),
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| Error::Serve { address, source })
}

/// How one frame's match ended, as counted by `framematch.frames.matched`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// At least one reference frame within the distance.
    Matched,
    /// Good quality, no reference frame within the distance.
    Unmatched,
    /// Quality under the request's minimum: not searched (the stream summary counts it the same).
    LowQuality,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Matched => "matched",
            Outcome::Unmatched => "unmatched",
            Outcome::LowQuality => "low_quality",
        }
    }
}

/// The instruments. Cloning is cheap (each is a shared handle).
#[derive(Clone, Debug)]
pub struct Metrics {
    frames: Counter<u64>,
    match_duration: Histogram<f64>,
    hash_duration: Histogram<f64>,
    search_duration: Histogram<f64>,
    streams_open: UpDownCounter<i64>,
    store_write_duration: Histogram<f64>,
    rpc_requests: Counter<u64>,
    rpc_duration: Histogram<f64>,
    rejections: Counter<u64>,
}

impl Metrics {
    /// Creates the instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        let seconds = |name: &'static str, description: &'static str, buckets: &[f64]| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(buckets.to_vec())
                .build()
        };
        Self {
            frames: meter
                .u64_counter("framematch.frames.matched")
                .with_unit("{frame}")
                .with_description("Upload frames answered (MatchImage, MatchVideo), by outcome")
                .build(),
            match_duration: seconds(
                "framematch.match.duration",
                "Time to answer one upload frame: hashing if it carries pixels, queueing, search",
                &LATENCY_BUCKETS_S,
            ),
            hash_duration: seconds(
                "framematch.hash.duration",
                "Time to decode and PDQ-hash one picture on the hashing pool, by input kind",
                &LATENCY_BUCKETS_S,
            ),
            search_duration: seconds(
                "framematch.index.search.duration",
                "Time to search the index for one frame (every variant and area it carries)",
                &LATENCY_BUCKETS_S,
            ),
            streams_open: meter
                .i64_up_down_counter("framematch.streams.open")
                .with_unit("{stream}")
                .with_description("Streams open now, by RPC")
                .build(),
            store_write_duration: seconds(
                "framematch.store.write.duration",
                "Time for one durable store write, commit included, by operation",
                &LATENCY_BUCKETS_S,
            ),
            rpc_requests: meter
                .u64_counter("framematch.rpc.requests")
                .with_unit("{request}")
                .with_description("Finished RPCs, by method and gRPC status code")
                .build(),
            rpc_duration: seconds(
                "framematch.rpc.duration",
                "Time from an RPC's start to its status, by method (a stream's whole life)",
                &RPC_BUCKETS_S,
            ),
            rejections: meter
                .u64_counter("framematch.rpc.rejected")
                .with_unit("{request}")
                .with_description(
                    "Requests refused for the caller's fault (key, message, limits), by method and reason",
                )
                .build(),
        }
    }

    /// Instruments bound to no exporter, for code paths built without a pipeline.
    pub fn noop() -> Self {
        Self::new(&opentelemetry::metrics::noop::NoopMeterProvider::new().meter(SCOPE))
    }

    /// One upload frame answered.
    pub fn frame_matched(&self, outcome: Outcome, elapsed: Duration) {
        self.frames
            .add(1, &[KeyValue::new("outcome", outcome.label())]);
        self.match_duration.record(elapsed.as_secs_f64(), &[]);
    }

    /// One picture hashed; `input` is `image` (encoded) or `rgb` (raw pixels).
    pub fn hashed(&self, input: &'static str, elapsed: Duration) {
        self.hash_duration
            .record(elapsed.as_secs_f64(), &[KeyValue::new("input", input)]);
    }

    /// One index search.
    pub fn searched(&self, elapsed: Duration) {
        self.search_duration.record(elapsed.as_secs_f64(), &[]);
    }

    /// One store write; `operation` names it (`create_bank`, `add_reference`, ...).
    pub fn store_write(&self, operation: &'static str, elapsed: Duration) {
        self.store_write_duration.record(
            elapsed.as_secs_f64(),
            &[KeyValue::new("operation", operation)],
        );
    }

    /// Counts a stream of `rpc` as open until the returned guard drops.
    pub fn stream_opened(&self, rpc: Rpc) -> OpenStream {
        let labels = [KeyValue::new("rpc", rpc.method())];
        self.streams_open.add(1, &labels);
        OpenStream {
            counter: self.streams_open.clone(),
            labels,
        }
    }

    /// One request refused; `method` is an [`Rpc::method`] or `unknown`, `reason` a fixed word
    /// (`unknown_key`, `malformed_message`, ...).
    pub fn rejected(&self, method: &'static str, reason: &'static str) {
        self.rejections.add(
            1,
            &[
                KeyValue::new("method", method),
                KeyValue::new("reason", reason),
            ],
        );
    }

    fn rpc_finished(&self, rpc: Rpc, code: tonic::Code, elapsed: Duration) {
        let method = KeyValue::new("method", rpc.method());
        self.rpc_requests
            .add(1, &[method.clone(), KeyValue::new("code", code_name(code))]);
        self.rpc_duration.record(elapsed.as_secs_f64(), &[method]);
    }
}

/// Counts one open stream until dropped.
#[derive(Debug)]
pub struct OpenStream {
    counter: UpDownCounter<i64>,
    labels: [KeyValue; 1],
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.counter.add(-1, &self.labels);
    }
}

/// The RPCs we serve, as spans and metric labels name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rpc {
    /// `framematch.v1.Matcher/MatchVideo` (bidirectional stream).
    MatchVideo,
    /// `framematch.v1.Matcher/MatchImage`.
    MatchImage,
    /// `framematch.v1.Banks/CreateBank`.
    CreateBank,
    /// `framematch.v1.Banks/ListBanks`.
    ListBanks,
    /// `framematch.v1.Banks/AddReference` (client stream).
    AddReference,
    /// `framematch.v1.Banks/WithdrawReference`.
    WithdrawReference,
    /// `framematch.v1.Banks/GetReference`.
    GetReference,
    /// `framematch.v1.Banks/Stats`.
    Stats,
    /// `framematch.v1.Banks/UpdateBank`.
    UpdateBank,
    /// `framematch.v1.Admin/CreateOrganisation`.
    CreateOrganisation,
    /// `framematch.v1.Admin/ListOrganisations`.
    ListOrganisations,
    /// `framematch.v1.Admin/CreateApiKey`.
    CreateApiKey,
    /// `framematch.v1.Admin/RevokeApiKey`.
    RevokeApiKey,
    /// `framematch.v1.Admin/ListApiKeys`.
    ListApiKeys,
    /// `framematch.v1.Admin/Audit`.
    Audit,
    /// `framematch.v1.Exchange/Changes`.
    Changes,
    /// `framematch.v1.Banks/ExportBank` (server stream).
    ExportBank,
}

impl Rpc {
    /// Every RPC.
    pub const ALL: [Rpc; 17] = [
        Rpc::MatchVideo,
        Rpc::MatchImage,
        Rpc::CreateBank,
        Rpc::ListBanks,
        Rpc::AddReference,
        Rpc::WithdrawReference,
        Rpc::GetReference,
        Rpc::Stats,
        Rpc::UpdateBank,
        Rpc::CreateOrganisation,
        Rpc::ListOrganisations,
        Rpc::CreateApiKey,
        Rpc::RevokeApiKey,
        Rpc::ListApiKeys,
        Rpc::Audit,
        Rpc::Changes,
        Rpc::ExportBank,
    ];

    /// The RPC an HTTP/2 request path (`/framematch.v1.Matcher/MatchImage`) names.
    pub fn from_path(path: &str) -> Option<Rpc> {
        let name = path.strip_prefix('/')?;
        Rpc::ALL.into_iter().find(|rpc| rpc.full_name() == name)
    }

    /// The method name, as in the proto.
    pub fn method(self) -> &'static str {
        match self {
            Rpc::MatchVideo => "MatchVideo",
            Rpc::MatchImage => "MatchImage",
            Rpc::CreateBank => "CreateBank",
            Rpc::ListBanks => "ListBanks",
            Rpc::AddReference => "AddReference",
            Rpc::WithdrawReference => "WithdrawReference",
            Rpc::GetReference => "GetReference",
            Rpc::Stats => "Stats",
            Rpc::UpdateBank => "UpdateBank",
            Rpc::CreateOrganisation => "CreateOrganisation",
            Rpc::ListOrganisations => "ListOrganisations",
            Rpc::CreateApiKey => "CreateApiKey",
            Rpc::RevokeApiKey => "RevokeApiKey",
            Rpc::ListApiKeys => "ListApiKeys",
            Rpc::Audit => "Audit",
            Rpc::Changes => "Changes",
            Rpc::ExportBank => "ExportBank",
        }
    }

    /// The fully qualified service name.
    pub fn service(self) -> &'static str {
        match self {
            Rpc::MatchVideo | Rpc::MatchImage => "framematch.v1.Matcher",
            Rpc::CreateBank
            | Rpc::ListBanks
            | Rpc::AddReference
            | Rpc::WithdrawReference
            | Rpc::GetReference
            | Rpc::Stats
            | Rpc::UpdateBank
            | Rpc::ExportBank => "framematch.v1.Banks",
            Rpc::CreateOrganisation
            | Rpc::ListOrganisations
            | Rpc::CreateApiKey
            | Rpc::RevokeApiKey
            | Rpc::ListApiKeys
            | Rpc::Audit => "framematch.v1.Admin",
            Rpc::Changes => "framematch.v1.Exchange",
        }
    }

    /// `service/method`, the span's name.
    pub fn full_name(self) -> &'static str {
        match self {
            Rpc::MatchVideo => "framematch.v1.Matcher/MatchVideo",
            Rpc::MatchImage => "framematch.v1.Matcher/MatchImage",
            Rpc::CreateBank => "framematch.v1.Banks/CreateBank",
            Rpc::ListBanks => "framematch.v1.Banks/ListBanks",
            Rpc::AddReference => "framematch.v1.Banks/AddReference",
            Rpc::WithdrawReference => "framematch.v1.Banks/WithdrawReference",
            Rpc::GetReference => "framematch.v1.Banks/GetReference",
            Rpc::Stats => "framematch.v1.Banks/Stats",
            Rpc::UpdateBank => "framematch.v1.Banks/UpdateBank",
            Rpc::CreateOrganisation => "framematch.v1.Admin/CreateOrganisation",
            Rpc::ListOrganisations => "framematch.v1.Admin/ListOrganisations",
            Rpc::CreateApiKey => "framematch.v1.Admin/CreateApiKey",
            Rpc::RevokeApiKey => "framematch.v1.Admin/RevokeApiKey",
            Rpc::ListApiKeys => "framematch.v1.Admin/ListApiKeys",
            Rpc::Audit => "framematch.v1.Admin/Audit",
            Rpc::Changes => "framematch.v1.Exchange/Changes",
            Rpc::ExportBank => "framematch.v1.Banks/ExportBank",
        }
    }

    /// Whether the client streams frames (such RPCs get a stream id).
    pub fn is_stream(self) -> bool {
        matches!(self, Rpc::MatchVideo | Rpc::AddReference)
    }
}

/// One RPC in progress: its span, and the clock its duration is measured by.
#[derive(Debug)]
pub struct RpcCall {
    rpc: Rpc,
    span: tracing::Span,
    started: Instant,
    metrics: Metrics,
}

/// Reads W3C trace-context headers (`traceparent`, `tracestate`) from gRPC metadata.
struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl opentelemetry::propagation::Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                tonic::metadata::KeyRef::Ascii(key) => Some(key.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

impl RpcCall {
    /// Opens the RPC's span, attributed to organisation `org`. Streaming RPCs get a fresh stream id.
    /// When the client sent a W3C `traceparent` in `metadata`, the span continues that trace (its
    /// parent is the client's span); otherwise it starts a trace of its own.
    pub fn start(
        rpc: Rpc,
        org: &str,
        metrics: &Metrics,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Self {
        let stream_id = rpc.is_stream().then(uuid::Uuid::new_v4);
        // Field names follow the OpenTelemetry RPC conventions; `otel.*` fields are read by
        // tracing-opentelemetry (span name, kind, status).
        let span = tracing::info_span!(
            "rpc",
            otel.name = rpc.full_name(),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = rpc.service(),
            rpc.method = rpc.method(),
            rpc.grpc.status_code = tracing::field::Empty,
            org = org,
            stream_id = tracing::field::Empty,
        );
        if let Some(id) = stream_id {
            span.record("stream_id", tracing::field::display(id));
        }
        if metadata.contains_key("traceparent") {
            use opentelemetry::propagation::TextMapPropagator as _;
            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
            let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new()
                .extract(&MetadataExtractor(metadata));
            // Fails only when no OpenTelemetry layer is installed, and then there is no trace to
            // join anyway.
            let _ = span.set_parent(parent);
        }
        Self {
            rpc,
            span,
            started: Instant::now(),
            metrics: metrics.clone(),
        }
    }

    /// The RPC's span, to instrument its futures and tasks with.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Runs `work` inside the span, then records its status.
    ///
    /// # Errors
    /// Whatever `work` returns.
    pub async fn run<T>(
        self,
        work: impl Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        use tracing::Instrument as _;
        let result = work.instrument(self.span.clone()).await;
        self.finish(result.as_ref().map(|_| ()).map_err(tonic::Status::code));
        result
    }

    /// Records the RPC's status on its span and in the RPC metrics, and closes the span.
    pub fn finish(self, result: Result<(), tonic::Code>) {
        let code = match result {
            Ok(()) => tonic::Code::Ok,
            Err(code) => code,
        };
        self.span.record("rpc.grpc.status_code", code as i32);
        if is_server_fault(code) {
            self.span.record("otel.status_code", "error");
        }
        self.metrics
            .rpc_finished(self.rpc, code, self.started.elapsed());
    }
}

/// Whether a status marks the span as failed: per the OpenTelemetry RPC conventions, a server
/// span is an error for codes that mean the server could not do its job, not for client mistakes.
fn is_server_fault(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unimplemented
            | tonic::Code::Internal
            | tonic::Code::Unavailable
            | tonic::Code::DataLoss
    )
}

/// A status code as the gRPC specification spells it (`OK`, `NOT_FOUND`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// What a partner follower (`--follow`) reports to [`MetricsPipeline::observe_follow`]: implemented by
/// the follower's own progress, so telemetry needs to know nothing of the follower.
pub trait FollowReport: Send + Sync + 'static {
    /// The partner's URL (the `partner` label).
    fn partner(&self) -> &str;
    /// The partner's change-log position mirrored so far.
    fn applied_seq(&self) -> u64;
    /// Whether the change stream is open now.
    fn is_connected(&self) -> bool;
    /// Events applied so far, by kind.
    fn event_counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn no_otlp_endpoint_exports_nothing() {
        let config = OtlpConfig::from_vars(vars(&[("OTEL_SERVICE_NAME", "x"), ("PATH", "/bin")]));
        assert_eq!(config, OtlpConfig::default());
    }

    #[test]
    fn shared_endpoint_exports_traces_and_metrics() {
        let config =
            OtlpConfig::from_vars(vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")]));
        assert_eq!(config.traces_endpoint.as_deref(), Some("http://c:4317"));
        assert_eq!(config.metrics_endpoint.as_deref(), Some("http://c:4317"));
    }

    #[test]
    fn signal_endpoint_wins_over_shared_endpoint() {
        let config = OtlpConfig::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://m:4317"),
        ]));
        assert_eq!(config.traces_endpoint.as_deref(), Some("http://c:4317"));
        assert_eq!(config.metrics_endpoint.as_deref(), Some("http://m:4317"));
    }

    #[test]
    fn exporter_none_and_sdk_disabled_turn_export_off() {
        let one_off = OtlpConfig::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ]));
        assert_eq!(one_off.traces_endpoint, None);
        assert!(one_off.metrics_endpoint.is_some());
        let all_off = OtlpConfig::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ]));
        assert_eq!(all_off, OtlpConfig::default());
    }

    #[test]
    fn empty_endpoint_counts_as_unset() {
        let config = OtlpConfig::from_vars(vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]));
        assert_eq!(config, OtlpConfig::default());
    }

    #[test]
    fn prometheus_names_carry_units_and_suffixes() {
        let pipeline = MetricsPipeline::try_new(&OtlpConfig::default()).expect("pipeline");
        let metrics = pipeline.metrics();
        metrics.frame_matched(Outcome::Matched, Duration::from_millis(2));
        metrics.hashed("image", Duration::from_millis(3));
        metrics.store_write("create_bank", Duration::from_millis(4));
        let open = metrics.stream_opened(Rpc::MatchVideo);
        let lag_ms = Arc::new(AtomicU64::new(1500));
        pipeline.observe_replica_lag("postgres", Arc::clone(&lag_ms));
        let text = pipeline.encode().expect("encode");
        for expected in [
            "framematch_frames_matched_total{outcome=\"matched\"} 1",
            "framematch_match_duration_seconds_count 1",
            "framematch_hash_duration_seconds_count{input=\"image\"} 1",
            "framematch_store_write_duration_seconds_count{operation=\"create_bank\"} 1",
            "framematch_streams_open{rpc=\"MatchVideo\"} 1",
            "framematch_replica_lag_seconds{store=\"postgres\"} 1.5",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        drop(open);
        lag_ms.store(0, Ordering::Relaxed);
        let text = pipeline.encode().expect("encode");
        assert!(text.contains("framematch_streams_open{rpc=\"MatchVideo\"} 0"));
        assert!(text.contains("framematch_replica_lag_seconds{store=\"postgres\"} 0"));
    }

    #[test]
    fn every_code_has_its_specification_name() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
    }
}
