//! `serve(listener, config, shutdown)`: opens the store, starts answering at once (health
//! NOT_SERVING while the index loads), loads every active frame into the index, then reports
//! SERVING. The listener is bound by the caller, so tests bind 127.0.0.1:0 and never sleep; the
//! shutdown signal is any future (ctrl-c and SIGTERM in `main`, a oneshot in tests).
//!
//! Shutdown: health flips to NOT_SERVING, the server stops accepting, open streams get
//! `shutdown_grace` to finish, and what is left is dropped.
//!
//! Beside gRPC, every server serves its Prometheus endpoint (`GET /metrics`, issue #5) on a second
//! listener, from its own meter provider; the endpoint stops after gRPC has, and the last metrics
//! are flushed to OTLP (when configured) before `serve` returns.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;

use tonic::service::interceptor::InterceptedService;

use crate::api::ServeConfig;
use crate::api::admin::AdminService;
use crate::api::banks::BanksService;
use crate::api::exchange::ExchangeService;
use crate::api::matcher::MatcherService;
use crate::api::{AppState, Catalog};
use crate::auth::{self, Authenticator, KeyRing};
use crate::follow::Follower;
use crate::index::{FrameIndex, SignalIndex};
use crate::model::{Actor, ChangeKind, ChangeSeq, NewApiKey, Role};
use crate::pb;
use crate::store::{self, Store};
use crate::telemetry::{self, MetricsPipeline};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store could not be opened or read.
    #[error("store: {0}")]
    Store(#[from] store::Error),
    /// gRPC reflection could not be built from the descriptor set (a build problem).
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The metrics pipeline could not be built.
    #[error("telemetry: {0}")]
    Telemetry(#[from] telemetry::Error),
    /// `--follow` cannot start.
    #[error(transparent)]
    Follow(#[from] crate::follow::Error),
    /// The embedding model could not be loaded.
    #[error(transparent)]
    Embedding(#[from] crate::embed::Error),
    /// The metrics endpoint's address could not be bound.
    #[error("cannot listen for metrics on {address}: {source}")]
    MetricsListen {
        /// The configured `--metrics-listen`.
        address: SocketAddr,
        /// Why binding failed.
        #[source]
        source: std::io::Error,
    },
}

/// After the grace period, how long the UNAVAILABLE answers of aborted streams get to reach their
/// clients before connections are dropped.
const FINAL_FLUSH: Duration = Duration::from_secs(2);

/// Fully qualified names of the services health reports on.
const SERVICES: [&str; 4] = [
    "framematch.v1.Matcher",
    "framematch.v1.Banks",
    "framematch.v1.Admin",
    "framematch.v1.Exchange",
];

async fn set_health(reporter: &HealthReporter, serving: bool) {
    for service in SERVICES.into_iter().chain([""]) {
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        reporter.set_service_status(service, status).await;
    }
}

/// Runs the server on `listener` until `shutdown` completes, with its metrics endpoint bound to
/// `config.metrics_listen`.
///
/// # Errors
/// [`Error::MetricsListen`] when that address cannot be bound; otherwise as [`serve_with_metrics`].
pub async fn serve(
    listener: TcpListener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let address = config.metrics_listen;
    let metrics_listener = TcpListener::bind(address)
        .await
        .map_err(|source| Error::MetricsListen { address, source })?;
    serve_with_metrics(listener, metrics_listener, config, shutdown).await
}

/// Runs the server on `listener`, and its Prometheus endpoint on `metrics_listener`, until
/// `shutdown` completes. Both listeners are bound by the caller, which can then print or read
/// their addresses (port 0) before anything is served.
///
/// # Errors
/// [`Error::Store`] when the store cannot be opened, [`Error::Telemetry`] when the metrics
/// pipeline cannot be built, [`Error::Transport`] when serving fails.
pub async fn serve_with_metrics(
    listener: TcpListener,
    metrics_listener: TcpListener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let pipeline = Arc::new(MetricsPipeline::try_new(&config.otlp)?);
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let endpoint = tokio::spawn(telemetry::serve_metrics(
        metrics_listener,
        pipeline.registry(),
        async {
            // A dropped sender also means stop.
            let _ = metrics_stopped.await;
        },
    ));
    let result = serve_grpc(listener, config, shutdown, &pipeline).await;
    // Scrapes keep working through the grace period; the endpoint stops once gRPC has.
    let _ = metrics_stop.send(());
    match endpoint.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(
            error = &error as &dyn std::error::Error,
            "metrics endpoint failed"
        ),
        Err(error) => tracing::warn!(%error, "metrics endpoint task failed"),
    }
    // Flush telemetry: the last OTLP export blocks on the runtime's I/O, so it runs on the
    // blocking pool while the async workers stay free to carry it.
    let flushing = Arc::clone(&pipeline);
    if let Err(error) = tokio::task::spawn_blocking(move || flushing.shutdown()).await {
        tracing::warn!(%error, "flushing metrics failed");
    }
    result
}

/// The server's own embedding models (`--embedding-model`; none without it), loaded on the
/// blocking pool (ONNX Runtime reads and optimises the graph, then one trial run), each logged
/// with its space so operators see which spaces this server computes.
async fn load_models(
    config: &ServeConfig,
) -> Result<Vec<Arc<dyn crate::embed::SpaceModel>>, Error> {
    let Some(model) = config.embedding.clone() else {
        tracing::info!("no embedding model: only vectors sent by clients are matched");
        return Ok(Vec::new());
    };
    let started = Instant::now();
    let opened = tokio::task::spawn_blocking(move || crate::embed::OnnxModel::open(&model))
        .await
        .map_err(|e| crate::embed::Error::Model {
            path: config
                .embedding
                .as_ref()
                .map(|m| m.model.clone())
                .unwrap_or_default(),
            reason: format!("loading stopped: {e}"),
        })??;
    let model_config = opened.config();
    tracing::info!(
        space = %model_config.space,
        model = %model_config.model.display(),
        runtime = %model_config.runtime.display(),
        input = %model_config.input,
        dimension = crate::embed::SpaceModel::dimension(&opened),
        threshold = model_config.threshold,
        interval_ms = config.embedding_interval_ms,
        windows = %config.embedding_windows,
        took_ms = started.elapsed().as_millis() as u64,
        "embedding model loaded"
    );
    Ok(vec![Arc::new(opened)])
}

/// The gRPC part of [`serve_with_metrics`].
async fn serve_grpc(
    listener: TcpListener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
    pipeline: &MetricsPipeline,
) -> Result<(), Error> {
    // The model first: a broken download fails in a second, before the store is touched.
    let models = load_models(&config).await?;
    let store = match &config.postgres_url {
        Some(url) => Store::open_postgres(url).await?,
        None => Store::open_embedded(&config.data_dir).await?,
    };
    tracing::info!(store = %store.describe(), engine = %config.engine, "store open");
    let default_org = store.default_org().await?;
    let catalog = Catalog::new(store.list_banks().await?, store.list_orgs().await?);
    let index = SignalIndex::new(
        FrameIndex::new(config.engine, config.hnsw),
        config.vector_index,
    );
    let state = AppState::new(
        store,
        index,
        catalog,
        default_org,
        &config,
        pipeline.metrics(),
    )
    .with_models(models, config.embedding_interval_ms)
    .with_windows(config.embedding_windows.clone());
    load_keys(&state, config.bootstrap_admin_key.as_deref()).await?;
    let follower = match &config.follow {
        Some(follow) => Some(Follower::prepare(&state, follow)?),
        None => None,
    };
    if let Some(follower) = &follower {
        pipeline.observe_follow(follower.progress());
    }
    pipeline.observe_index(&state.index);
    let lag_ms = Arc::new(AtomicU64::new(0));
    let store_kind = match &state.store {
        Store::Embedded(_) => "embedded",
        Store::Postgres(_) => "postgres",
    };
    pipeline.observe_replica_lag(store_kind, Arc::clone(&lag_ms));

    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, false).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    // Every service but health and reflection sits behind the API-key interceptor.
    let max_message = config.limits.max_message_bytes();
    let authenticator = Authenticator::new(state.auth_mode());
    let matcher = InterceptedService::new(
        pb::matcher_server::MatcherServer::new(MatcherService::new(state.clone()))
            .max_decoding_message_size(max_message),
        authenticator.clone(),
    );
    let banks = InterceptedService::new(
        pb::banks_server::BanksServer::new(BanksService::new(state.clone()))
            .max_decoding_message_size(max_message),
        authenticator.clone(),
    );
    let admin = InterceptedService::new(
        pb::admin_server::AdminServer::new(AdminService::new(state.clone())),
        authenticator.clone(),
    );
    let exchange = InterceptedService::new(
        pb::exchange_server::ExchangeServer::new(ExchangeService::new(state.clone())),
        authenticator,
    );

    // The partner follower writes through the store and then the index: it starts once the
    // index is loaded.
    let (index_loaded, loaded) = tokio::sync::oneshot::channel();
    let loader = tokio::spawn(load_index(
        state.clone(),
        reporter.clone(),
        config.tail_interval,
        lag_ms,
        index_loaded,
    ));
    let follower = follower.map(|follower| follower.spawn(loaded));

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = Server::builder();
    if let Some(tls) = &config.tls {
        // Health and reflection share the listener, so they are behind TLS too; the metrics
        // endpoint is a separate plain-HTTP listener.
        crate::tls::install_crypto_provider();
        builder = builder.tls_config(tls.to_tonic())?;
        tracing::info!(mode = tls.mode(), "gRPC over TLS");
    }
    let server = builder
        // Counts and logs every refused request, wherever it is refused.
        .layer(crate::api::rejections::RejectionLayer::new(
            state.metrics.clone(),
        ))
        .add_service(health)
        .add_service(reflection)
        .add_service(matcher)
        .add_service(banks)
        .add_service(admin)
        .add_service(exchange)
        // TCP_NODELAY: an answer is one small HTTP/2 frame; without it Nagle's algorithm holds it
        // back until the client's (delayed) ACK, which at video frame rates means until the next
        // frame arrives, tens of milliseconds later.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                // A dropped sender also means stop.
                let _ = stop_rx.await;
            },
        );
    tokio::pin!(server);

    let result = tokio::select! {
        result = &mut server => Some(result),
        () = shutdown => None,
    };
    loader.abort();
    if let Some(follower) = follower {
        follower.stop().await;
    }
    if let Some(result) = result {
        return result.map_err(Error::from);
    }
    // Shutdown: refuse new work and stop accepting connections, give open streams the grace
    // period, then end what is left with UNAVAILABLE and give those answers a moment to leave.
    tracing::info!(grace = ?config.shutdown_grace, "shutting down");
    state.begin_shutdown();
    set_health(&reporter, false).await;
    let _ = stop_tx.send(());
    if let Ok(result) = tokio::time::timeout(config.shutdown_grace, &mut server).await {
        return result.map_err(Error::from);
    }
    tracing::warn!(
        streams = state.open_streams(),
        "shutdown grace period over; ending open streams with UNAVAILABLE"
    );
    state.abort_streams();
    match tokio::time::timeout(FINAL_FLUSH, server).await {
        Ok(result) => result.map_err(Error::from),
        Err(_) => {
            tracing::warn!("connections still open after the final flush; dropping them");
            Ok(())
        }
    }
}

/// Loads the working API keys into the key ring. On first start (no key in the store, and keys
/// required) creates the bootstrap admin key of the default organisation: the operator's
/// `FRAMEMATCH_BOOTSTRAP_ADMIN_KEY`, or a random secret printed once on standard output.
async fn load_keys(state: &AppState, chosen: Option<&str>) -> Result<(), Error> {
    let mut keys = state.store.list_api_keys().await?;
    if state.auth_required && keys.iter().all(|key| key.revoked_ms.is_some()) {
        if keys.is_empty() {
            let secret = chosen.map_or_else(auth::generate_secret, str::to_string);
            let created = state
                .store
                .create_api_key(
                    NewApiKey {
                        org: state.default_org,
                        role: Role::Admin,
                        digest: auth::digest(&secret),
                        label: "bootstrap".to_string(),
                    },
                    Actor::system(state.default_org),
                )
                .await;
            match created {
                Ok(key) => {
                    if chosen.is_none() {
                        use std::io::Write as _;
                        // Shown once: the store keeps only its digest. A closed stdout only
                        // loses the copy; the log says where to look.
                        let mut stdout = std::io::stdout().lock();
                        let _ = writeln!(stdout, "bootstrap admin key: {secret}");
                        let _ = stdout.flush();
                    }
                    tracing::warn!(
                        key = key.id.0,
                        chosen = chosen.is_some(),
                        "created the bootstrap admin key (organisation \"{}\"); its secret is shown only once",
                        crate::store::DEFAULT_ORG_NAME
                    );
                }
                // Another replica on the same database bootstrapped first with the same secret.
                Err(store::Error::AlreadyExists { .. }) => {}
                Err(error) => return Err(error.into()),
            }
            keys = state.store.list_api_keys().await?;
        } else {
            tracing::warn!(
                "every API key is revoked; only a new store (or --insecure-no-auth) gets a new admin key"
            );
        }
    } else if chosen.is_some() {
        tracing::info!("FRAMEMATCH_BOOTSTRAP_ADMIN_KEY ignored: the store already has API keys");
    }
    if !state.auth_required {
        tracing::warn!(
            "--insecure-no-auth: every request is accepted as an admin of the default organisation; for local development only"
        );
    }
    *state.keys.write() = KeyRing::new(keys);
    Ok(())
}

/// Loads every active frame from the store into the index, then marks the server ready. With a
/// shared (PostgreSQL) store it then follows the change log for as long as the server runs.
async fn load_index(
    state: AppState,
    reporter: HealthReporter,
    tail_interval: Duration,
    lag_ms: Arc<AtomicU64>,
    index_loaded: tokio::sync::oneshot::Sender<()>,
) {
    let started = Instant::now();
    match state.store.load_active().await {
        Ok(crate::store::ActiveSignals {
            frames,
            embeddings,
            seq,
        }) => {
            let count = frames.len();
            let vectors = embeddings.len();
            // Every space a bank declares gets its index before its vectors arrive (issue #11).
            state.ensure_catalog_spaces();
            let index = state.index.clone();
            // Building an index of millions of frames is CPU work: keep it off the async workers.
            let built = tokio::task::spawn_blocking(move || index.load(frames, embeddings)).await;
            if let Err(error) = built {
                tracing::error!(%error, "index load failed; staying NOT_SERVING");
                return;
            }
            state.set_ready();
            set_health(&reporter, true).await;
            tracing::info!(
                frames = count,
                vectors,
                change_seq = seq.0,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "index loaded; serving"
            );
            // No receiver when no partner is followed.
            let _ = index_loaded.send(());
            if matches!(state.store, Store::Postgres(_)) {
                follow_changes(state, reporter, seq, tail_interval, lag_ms).await;
            }
        }
        Err(error) => {
            tracing::error!(%error, "reading frames from the store failed; staying NOT_SERVING");
        }
    }
}

/// Applies the writes of every replica sharing the store, in change-log order, to this replica's
/// index and catalogue (DESIGN.md §3). Polls every `interval` and wakes at once on a PostgreSQL
/// notification. This replica's own writes come back through the log too; applying them again is
/// a no-op (inserts and withdrawals are idempotent).
///
/// While the store is unreachable the replica keeps matching from memory: `Banks` (the write
/// path) reports NOT_SERVING in gRPC health, `Matcher` stays SERVING, and both recover when the
/// store answers again. Runs until the task is aborted at shutdown.
async fn follow_changes(
    state: AppState,
    reporter: HealthReporter,
    mut applied: ChangeSeq,
    interval: Duration,
    lag_ms: Arc<AtomicU64>,
) {
    let mut synced = Instant::now();
    let mut wake: Option<tokio::sync::mpsc::Receiver<ChangeSeq>> = None;
    let mut store_ok = true;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        if wake.is_none() && store_ok {
            wake = state.store.listen_changes().await.ok().flatten();
        }
        tokio::select! {
            _ = ticker.tick() => {}
            seq = next_notification(&mut wake) => {
                if seq.is_none() {
                    // The listening connection is gone; polling goes on and it is reopened.
                    wake = None;
                }
            }
        }
        let outcome = catch_up(&state, &mut applied).await;
        if outcome.is_ok() {
            synced = Instant::now();
        }
        // Caught up: no lag. Otherwise the index may miss whatever happened since the last sync.
        lag_ms.store(
            u64::try_from(synced.elapsed().as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        match outcome {
            Ok(()) if !store_ok => {
                store_ok = true;
                reporter
                    .set_service_status("framematch.v1.Banks", tonic_health::ServingStatus::Serving)
                    .await;
                tracing::info!(change_seq = applied.0, "store reachable again; caught up");
            }
            Ok(()) => {}
            Err(error) if store_ok => {
                store_ok = false;
                wake = None;
                reporter
                    .set_service_status(
                        "framematch.v1.Banks",
                        tonic_health::ServingStatus::NotServing,
                    )
                    .await;
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    change_seq = applied.0,
                    "store unreachable; matching from memory"
                );
            }
            Err(_) => {}
        }
    }
}

/// The next notification, or never when there is no listener.
async fn next_notification(
    wake: &mut Option<tokio::sync::mpsc::Receiver<ChangeSeq>>,
) -> Option<ChangeSeq> {
    match wake {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Applies every change after `applied`, advancing it change by change.
async fn catch_up(state: &AppState, applied: &mut ChangeSeq) -> Result<(), store::Error> {
    const BATCH: usize = 1000;
    loop {
        let changes = state.store.changes_since(*applied, BATCH).await?;
        if changes.is_empty() {
            return Ok(());
        }
        for change in changes {
            apply_change(state, &change.kind).await?;
            *applied = change.seq;
        }
        state.note_change();
    }
}

/// Applies one change to the index and catalogue. Idempotent.
async fn apply_change(state: &AppState, kind: &ChangeKind) -> Result<(), store::Error> {
    match kind {
        ChangeKind::OrgCreated(id) => {
            if let Some(org) = state
                .store
                .list_orgs()
                .await?
                .into_iter()
                .find(|o| o.id == *id)
            {
                state.catalog.write().insert_org(org);
            }
        }
        ChangeKind::BankCreated(id) => {
            let bank = state.store.get_bank(*id).await?;
            state.ensure_spaces(&bank);
            state.catalog.write().insert_bank(bank);
        }
        ChangeKind::ReferenceAdded { reference, bank } => {
            let frames = state.store.reference_frames(*reference).await?;
            let embeddings = state.store.reference_embeddings(*reference).await?;
            state
                .index
                .insert_reference(*reference, *bank, &frames, &embeddings);
        }
        ChangeKind::ReferenceWithdrawn { reference, .. } => {
            state.index.withdraw(*reference);
        }
        ChangeKind::BankUpdated(id) => {
            let bank = state.store.get_bank(*id).await?;
            state.catalog.write().insert_bank(bank);
        }
        ChangeKind::KeyCreated { key, .. } | ChangeKind::KeyRevoked { key, .. } => {
            let key = state.store.get_api_key(*key).await?;
            state.keys.write().apply(&key);
        }
    }
    Ok(())
}
