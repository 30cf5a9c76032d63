//! The gRPC edge: shared state and the services built on it.
//!
//! - [`AppState`] is a cheap-to-clone handle on everything a request needs: the store (write path
//!   only), the in-memory index, the bank catalogue, the hashing pool and the metric instruments
//!   (`AppState::rpc_call` opens each RPC's span).
//! - `matcher` serves `framematch.v1.Matcher`, `banks` serves `framematch.v1.Banks`.
//! - `convert` turns wire messages into domain values (all validation happens there) and back;
//!   `status` is the one place where errors become gRPC codes.
//!
//! Invariants: the store is never touched on the match path; no lock is held across an `.await`
//! (the index and catalogue locks are `parking_lot` locks taken inside synchronous blocks); writes
//! are durable in the store before they are applied to the index and acknowledged.

pub mod admin;
pub mod banks;
pub mod budget;
pub mod config;
pub mod convert;
pub mod embedding;
pub mod exchange;
pub mod matcher;
pub mod rejections;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::Instrument as _;

use crate::auth::{AuthMode, Caller, KeyRing};
use crate::config::Limits;
use crate::hash::border;
use crate::hash::pdq::{self, DecodeLimits};
use crate::index::{SharedIndex, SignalIndex};
use crate::matching::{self, ContentSignal, FrameHit, MatchParams, QueryFrame};
use crate::model::{Bank, BankId, FrameSignal, OrgId, Organisation};
use crate::store::Store;
use crate::telemetry::{Metrics, Outcome, Rpc, RpcCall};
use convert::{Content, FrameInput};

pub use config::ServeConfig;
pub use status::Error;

/// The dimension a bank's space gets when CreateBank leaves it at 0 and the server has no model
/// of that name: SSCD's.
pub const DEFAULT_EMBEDDING_DIMENSION: u32 = 512;

/// Bank and organisation metadata kept in memory so match responses can say where content comes
/// from without reading the store.
#[derive(Debug, Default)]
pub struct Catalog {
    banks: HashMap<BankId, Bank>,
    bank_ids: HashMap<String, BankId>,
    orgs: HashMap<OrgId, String>,
    org_ids: HashMap<String, OrgId>,
}

impl Catalog {
    /// A catalogue of the given banks and organisations.
    pub fn new(banks: Vec<Bank>, orgs: Vec<Organisation>) -> Self {
        let mut catalog = Self::default();
        for org in orgs {
            catalog.insert_org(org);
        }
        for bank in banks {
            catalog.insert_bank(bank);
        }
        catalog
    }

    /// Adds or replaces a bank.
    pub fn insert_bank(&mut self, bank: Bank) {
        self.bank_ids.insert(bank.name.clone(), bank.id);
        self.banks.insert(bank.id, bank);
    }

    /// Adds or renames an organisation.
    pub fn insert_org(&mut self, org: Organisation) {
        if let Some(old) = self.orgs.insert(org.id, org.name.clone()) {
            self.org_ids.remove(&old);
        }
        self.org_ids.insert(org.name, org.id);
    }

    /// An organisation's id by name.
    pub fn org_id(&self, name: &str) -> Option<OrgId> {
        self.org_ids.get(name).copied()
    }

    /// Every bank, in no particular order.
    pub fn banks(&self) -> impl Iterator<Item = &Bank> {
        self.banks.values()
    }

    /// A bank by name, if `caller` may see it. A bank it may not see is reported exactly like one
    /// that does not exist, so that its existence does not leak.
    ///
    /// # Errors
    /// [`Error::UnknownBank`].
    pub fn visible_bank(&self, caller: &Caller, name: &str) -> Result<&Bank, Error> {
        self.bank_id(name)
            .and_then(|id| self.banks.get(&id))
            .filter(|bank| caller.can_see(bank))
            .ok_or_else(|| Error::UnknownBank {
                name: name.to_string(),
            })
    }

    /// A bank by id.
    pub fn bank(&self, id: BankId) -> Option<&Bank> {
        self.banks.get(&id)
    }

    /// A bank id by name.
    pub fn bank_id(&self, name: &str) -> Option<BankId> {
        self.bank_ids.get(name).copied()
    }

    /// An organisation's name, or its number when unknown.
    pub fn org_name(&self, id: OrgId) -> String {
        self.orgs
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("org-{id}"))
    }
}

/// Which banks a request searches.
#[derive(Clone, Debug)]
pub enum BankFilter {
    /// Every bank.
    All,
    /// Only these.
    Only(HashSet<BankId>),
}

impl BankFilter {
    /// Whether frames of `bank` may be returned.
    pub fn allows(&self, bank: BankId) -> bool {
        match self {
            BankFilter::All => true,
            BankFilter::Only(set) => set.contains(&bank),
        }
    }
}

/// Shared server state. Cloning is cheap.
#[derive(Clone)]
pub struct AppState {
    /// The durable store (write path and start-up only).
    pub store: Store,
    /// The in-memory index of every signal (PDQ and the embedding spaces), with its background
    /// rebuilder.
    pub index: SharedIndex,
    /// Bank and organisation names.
    pub catalog: Arc<RwLock<Catalog>>,
    /// The working API keys (also read by the authentication interceptor).
    pub keys: Arc<RwLock<KeyRing>>,
    /// The organisation created with the store ("local"): owner of the bootstrap admin key, and
    /// every caller's organisation under `--insecure-no-auth`.
    pub default_org: OrgId,
    /// Whether API keys are checked (false only under `--insecure-no-auth`).
    pub auth_required: bool,
    /// Bumped after every change this process applies: its own writes and those the replica
    /// tailer or the partner follower brings in. Change-feed streams wait on it.
    pub changed: Arc<tokio::sync::watch::Sender<u64>>,
    /// Request limits.
    pub limits: Arc<Limits>,
    /// Defaults for unset match options.
    pub match_defaults: Arc<MatchParams>,
    /// Metric instruments (issue #5).
    pub metrics: Metrics,
    /// The server's own embedding models, one per space it computes vectors for (empty: the
    /// server computes none, and matches only the vectors clients send).
    pub models: Arc<Vec<Arc<dyn crate::embed::SpaceModel>>>,
    /// Upload frames of one stream are embedded at most once per this many milliseconds.
    pub embed_interval_ms: u64,
    /// The windows of an upload picture embedded beside its whole (`--embedding-windows`).
    pub embed_windows: Arc<crate::embed::Windows>,
    /// What CreateBank gives a space whose threshold, dimension or metric is left unset and
    /// that no model of the server serves.
    pub space_defaults: convert::SpaceDefaults,
    workers: Arc<Semaphore>,
    /// The memory decodes in flight may hold together (`--decode-memory`).
    pub decode_budget: budget::DecodeBudget,
    /// Whether a frame that arrives already hashed is searched right on the async worker rather
    /// than on the blocking pool: with `mih` a search takes about 0.1 ms at 1M frames, less than
    /// the two thread hand-offs of the pool; the scan and hnsw take milliseconds and stay off the
    /// async workers.
    inline_search: bool,
    /// Most frames of one MatchVideo stream in flight at once (hashing and searching on the
    /// blocking pool), so one stream with many frames uses every core.
    pub stream_pipeline: usize,
    queued: Arc<AtomicUsize>,
    streams: Arc<Semaphore>,
    ready: Arc<AtomicBool>,
    /// Set when shutdown starts: no new work is accepted.
    closing: Arc<AtomicBool>,
    /// Set when the shutdown grace period is over: open streams end with UNAVAILABLE.
    abort: Arc<tokio::sync::watch::Sender<bool>>,
}

impl AppState {
    /// State over an opened store and an (empty or loaded) index. Not ready until
    /// [`AppState::set_ready`].
    pub fn new(
        store: Store,
        index: SignalIndex,
        catalog: Catalog,
        default_org: OrgId,
        config: &ServeConfig,
        metrics: Metrics,
    ) -> Self {
        let vector_params = index.vector_params();
        Self {
            store,
            index: SharedIndex::new(index),
            catalog: Arc::new(RwLock::new(catalog)),
            keys: Arc::new(RwLock::new(KeyRing::default())),
            default_org,
            auth_required: !config.insecure_no_auth,
            changed: Arc::new(tokio::sync::watch::channel(0).0),
            limits: Arc::new(config.limits.clone()),
            match_defaults: Arc::new(config.match_defaults.clone()),
            metrics,
            models: Arc::new(Vec::new()),
            embed_interval_ms: 1000,
            embed_windows: Arc::new(crate::embed::Windows::none()),
            space_defaults: convert::SpaceDefaults {
                threshold: crate::embed::DEFAULT_THRESHOLD,
                dimension: DEFAULT_EMBEDDING_DIMENSION,
                metric: crate::model::Metric::Cosine,
                index: vector_params,
            },
            workers: Arc::new(Semaphore::new(config.hash_workers.max(1))),
            decode_budget: budget::DecodeBudget::new(config.limits.decode_memory),
            stream_pipeline: config.hash_workers.max(1) * 2,
            inline_search: config.engine == crate::index::EngineKind::Mih,
            queued: Arc::new(AtomicUsize::new(0)),
            streams: Arc::new(Semaphore::new(config.limits.max_concurrent_streams)),
            ready: Arc::new(AtomicBool::new(false)),
            closing: Arc::new(AtomicBool::new(false)),
            abort: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// The state with the server's embedding models, embedding one upload frame per
    /// `interval_ms` of a stream.
    pub fn with_models(
        mut self,
        models: Vec<Arc<dyn crate::embed::SpaceModel>>,
        interval_ms: u64,
    ) -> Self {
        self.models = Arc::new(models);
        self.embed_interval_ms = interval_ms;
        self
    }

    /// The state embedding `windows` of each upload picture beside its whole (none by default).
    pub fn with_windows(mut self, windows: crate::embed::Windows) -> Self {
        self.embed_windows = Arc::new(windows);
        self
    }

    /// Gives each embedding space of `bank` its vector index, if it has none yet
    /// (`SharedIndex::ensure_space_with`), built with the space's stored settings; call it before
    /// the bank's vectors reach the index. The store refuses a space declared with two dimensions
    /// or metrics, so a conflict here means the index and the store disagree: it is logged, and
    /// that space's vectors are not indexed. A stored space whose graph settings (`m`,
    /// `ef_construction`) differ from the server's `--vector-index` keeps its own, said at info.
    pub fn ensure_spaces(&self, bank: &Bank) {
        let flag = self.index.read().vector_params();
        for space in &bank.embedding_spaces {
            let params = space.index_params();
            match self.index.ensure_space_with(
                &space.name,
                space.dimension as usize,
                space.metric,
                params,
            ) {
                Ok(true) => {
                    if params.max_connections != flag.max_connections
                        || params.ef_construction != flag.ef_construction
                    {
                        tracing::info!(
                            space = %space.name,
                            stored = %params,
                            vector_index = %flag,
                            "embedding space keeps its stored index settings; --vector-index applies to spaces created from now on"
                        );
                    }
                }
                Ok(false) => {}
                Err(conflict) => {
                    tracing::error!(bank = %bank.name, %conflict, "embedding space not indexed");
                }
            }
        }
    }

    /// The server's models that serve one of `spaces` (a bank's).
    pub fn models_for(
        &self,
        spaces: &[crate::model::EmbeddingSpace],
    ) -> Vec<Arc<dyn crate::embed::SpaceModel>> {
        self.models
            .iter()
            .filter(|m| {
                spaces
                    .iter()
                    .any(|s| embedding::serves(m.as_ref(), &s.name, s.dimension, s.metric))
            })
            .cloned()
            .collect()
    }

    /// [`AppState::ensure_spaces`] for every bank of the catalogue (start-up).
    pub fn ensure_catalog_spaces(&self) {
        let banks: Vec<Bank> = self.catalog.read().banks().cloned().collect();
        for bank in &banks {
            self.ensure_spaces(bank);
        }
    }

    /// Shutdown has started: from now on new requests get UNAVAILABLE, open streams go on.
    pub fn begin_shutdown(&self) {
        self.closing.store(true, Ordering::Release);
    }

    /// The grace period is over: open streams end with UNAVAILABLE.
    pub fn abort_streams(&self) {
        self.abort.send_replace(true);
    }

    /// Completes once [`AppState::abort_streams`] has been called.
    pub async fn streams_aborted(&self) {
        let mut abort = self.abort.subscribe();
        // An error means the sender is gone, which cannot happen while `self` holds it.
        let _ = abort.wait_for(|aborted| *aborted).await;
    }

    /// Marks the index as loaded: requests are served from now on.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// How the authentication interceptor identifies callers.
    pub fn auth_mode(&self) -> AuthMode {
        if self.auth_required {
            AuthMode::Keys(Arc::clone(&self.keys))
        } else {
            AuthMode::Insecure(self.default_org)
        }
    }

    /// Records that this process has applied a change, waking change-feed streams.
    pub fn note_change(&self) {
        self.changed
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// Opens the span of one RPC, attributed to the caller's organisation, continuing the
    /// client's trace when its metadata carries a W3C `traceparent`.
    pub fn rpc_call(
        &self,
        rpc: Rpc,
        caller: &Caller,
        metadata: &tonic::metadata::MetadataMap,
    ) -> RpcCall {
        let org = self.catalog.read().org_name(caller.org);
        RpcCall::start(rpc, &org, &self.metrics, metadata)
    }

    /// UNAVAILABLE until the index is loaded, and again once shutdown has started.
    ///
    /// # Errors
    /// [`Error::NotReady`] while loading, [`Error::ShuttingDown`] after shutdown started.
    pub fn ensure_ready(&self) -> Result<(), Error> {
        if self.closing.load(Ordering::Acquire) {
            Err(Error::ShuttingDown)
        } else if self.ready.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(Error::NotReady)
        }
    }

    /// Runs the body of a server-streaming RPC on its own task and returns the stream the client
    /// reads. The body sends its items through the sender it is given; when it fails, its status
    /// is the stream's last item. When the shutdown grace period ends first, the stream ends with
    /// UNAVAILABLE and `on_shutdown` as its message. Either way the RPC's span and metrics are
    /// finished with the outcome.
    pub fn spawn_stream<T, F>(
        &self,
        call: RpcCall,
        buffer: usize,
        on_shutdown: &'static str,
        body: impl FnOnce(mpsc::Sender<Result<T, Status>>) -> F,
    ) -> ReceiverStream<Result<T, Status>>
    where
        T: Send + 'static,
        F: Future<Output = Result<(), Status>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(buffer);
        let body = body(tx.clone());
        let state = self.clone();
        let span = call.span().clone();
        tokio::spawn(
            async move {
                let result = tokio::select! {
                    result = body => result,
                    () = state.streams_aborted() => Err(Status::unavailable(on_shutdown)),
                };
                let code = result.as_ref().map_err(Status::code).copied();
                if let Err(status) = result {
                    // The client may be gone already; then there is nobody left to tell.
                    let _ = tx.send(Err(status)).await;
                }
                call.finish(code);
            }
            .instrument(span),
        );
        ReceiverStream::new(rx)
    }

    /// Number of MatchVideo streams open now.
    pub fn open_streams(&self) -> usize {
        self.limits
            .max_concurrent_streams
            .saturating_sub(self.streams.available_permits())
    }

    /// The banks a match request searches: the named ones, or when none is named every bank the
    /// caller may see. Admins with no names search everything.
    ///
    /// # Errors
    /// [`Error::UnknownBank`] for a name the catalogue does not have or the caller may not see.
    pub fn bank_filter(&self, caller: &Caller, names: &[String]) -> Result<BankFilter, Error> {
        let catalog = self.catalog.read();
        if names.is_empty() {
            if caller.is_admin() {
                return Ok(BankFilter::All);
            }
            return Ok(BankFilter::Only(
                catalog
                    .banks()
                    .filter(|bank| caller.can_see(bank))
                    .map(|bank| bank.id)
                    .collect(),
            ));
        }
        names
            .iter()
            .map(|name| catalog.visible_bank(caller, name).map(|bank| bank.id))
            .collect::<Result<HashSet<_>, _>>()
            .map(BankFilter::Only)
    }

    /// Runs `job` on the blocking pool, at most one job per hashing worker at a time, refusing
    /// new work when too many jobs already wait (RESOURCE_EXHAUSTED rather than unbounded
    /// memory). The job first reserves `cost` (bytes, width, height: see [`budget::cost_of`]) of
    /// the decode budget, then a worker; both stay with the job until it ends, even when the
    /// request is gone before.
    async fn run_blocking<T: Send + 'static>(
        &self,
        cost: (u64, u32, u32),
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Error> {
        let limit = self.limits.max_queued_hashes;
        let waiting = self.queued.fetch_add(1, Ordering::AcqRel);
        let _queued = QueueSlot(&self.queued);
        if waiting >= limit {
            return Err(Error::Busy {
                what: "hashing queue",
                limit,
            });
        }
        let (bytes, width, height) = cost;
        let memory = self.decode_budget.reserve(bytes, width, height).await?;
        let worker = Arc::clone(&self.workers)
            .acquire_owned()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        tokio::task::spawn_blocking(move || {
            let _held = (memory, worker);
            job()
        })
        .await
        .map_err(|e| Error::Worker(e.to_string()))
    }

    /// Turns a frame into its PDQ signals, hashing it on the pool when it carries pixels: the whole
    /// picture, and its content area when it has uniform borders (issue #3). With `dihedral`, also
    /// the 8 variants of each (for precomputed hashes, only when the client sent them).
    ///
    /// # Errors
    /// Hashing failures ([`Error::Hash`]) and pool errors.
    ///
    /// With `models`, a frame with pixels is also embedded by each of them (the whole picture
    /// only: what a reference stores), decoded once for both signals.
    pub async fn frame_signal(
        &self,
        input: FrameInput,
        dihedral: bool,
        models: Vec<Arc<dyn crate::embed::SpaceModel>>,
    ) -> Result<QueryFrame, Error> {
        if !input.content.has_pixels() {
            return query_frame(
                input,
                dihedral,
                &self.limits.decode_limits(),
                Embed::none(),
                &self.metrics,
            )
            .map(|(query, _)| query);
        }
        let limits = self.limits.decode_limits();
        let cost = budget::cost_of(&input.content, &limits, !models.is_empty())?;
        let metrics = self.metrics.clone();
        let (query, hashed) = self
            .run_blocking(cost, move || {
                let embed = Embed {
                    models: &models,
                    min_quality: 0,
                    content_area: false,
                    windows: &NO_WINDOWS,
                };
                query_frame(input, dihedral, &limits, embed, &metrics)
            })
            .await??;
        if let Some((input, elapsed)) = hashed {
            self.metrics.hashed(input, elapsed);
        }
        Ok(query)
    }

    /// Hashes (if needed) and searches one upload frame, and counts it in the frame metrics.
    ///
    /// # Errors
    /// As [`AppState::frame_signal`].
    ///
    /// With `embed`, a frame that carries pixels is also run through the server's models of the
    /// spaces in scope (callers sample: see [`embedding::EmbedSampler`]).
    ///
    /// The client's own vectors are checked against the spaces in scope
    /// ([`convert::query_embeddings`]); the server's models do not embed a space the client sent
    /// a vector of.
    pub async fn match_frame(
        &self,
        mut input: FrameInput,
        params: &Arc<MatchParams>,
        filter: &Arc<BankFilter>,
        embed: bool,
    ) -> Result<(QueryFrame, Vec<FrameHit>), Error> {
        let started = Instant::now();
        let client_vectors =
            convert::query_embeddings(std::mem::take(&mut input.embeddings), &params.spaces)?;
        let precomputed = !input.content.has_pixels();
        let index = self.index.clone();
        let models = if embed && !precomputed {
            embedding::models_in_scope(&self.models, &params.spaces)
                .into_iter()
                .filter(|m| !client_vectors.iter().any(|v| &*v.space == m.name()))
                .collect()
        } else {
            Vec::new()
        };
        let params = Arc::clone(params);
        let filter = Arc::clone(filter);
        let limits = self.limits.decode_limits();
        let cost = budget::cost_of(&input.content, &limits, !models.is_empty())?;
        let min_quality = params.min_quality;
        let metrics = self.metrics.clone();
        let windows = Arc::clone(&self.embed_windows);
        let job = move || -> Result<_, Error> {
            let embed = Embed {
                models: &models,
                min_quality,
                content_area: true,
                windows: &windows,
            };
            let (mut query, hashed) =
                query_frame(input, params.dihedral, &limits, embed, &metrics)?;
            // The client's vectors first, then the models'.
            let computed = std::mem::replace(&mut query.embeddings, client_vectors);
            query.embeddings.extend(computed);
            let search_started = Instant::now();
            let hits = {
                let index = index.read();
                matching::search_frame(&*index, &query, &params, &|bank| filter.allows(bank))
            };
            Ok((query, hashed, hits, search_started.elapsed()))
        };
        // Hashing (when the frame carries pixels) is CPU work of milliseconds: it and the search
        // run in one job on the blocking pool, off the async workers. A precomputed hash is only
        // searched, which with `mih` is quicker than the pool's hand-offs. The index read lock
        // lives only inside the job.
        let (query, hashed, hits, searched) = if precomputed && self.inline_search {
            job()?
        } else {
            self.run_blocking(cost, job).await??
        };
        if let Some((input, elapsed)) = hashed {
            self.metrics.hashed(input, elapsed);
        }
        // Same order as the stream summary: a low-quality frame is counted as such even when its
        // content area matched.
        let outcome = if query.has_pdq && query.signal.quality < min_quality {
            Outcome::LowQuality
        } else if hits.is_empty() {
            Outcome::Unmatched
        } else {
            Outcome::Matched
        };
        self.metrics.searched(searched);
        self.metrics.frame_matched(outcome, started.elapsed());
        tracing::debug!(
            frame_index = query.signal.frame_index,
            outcome = ?outcome,
            hits = hits.len(),
            "frame matched"
        );
        Ok((query, hits))
    }
}

/// The input kind ("image" or "rgb") and how long hashing it took, for the hashing metric.
type Hashed = (&'static str, Duration);

/// Which of the server's models embed a frame's picture in [`query_frame`].
#[derive(Clone, Copy)]
struct Embed<'a> {
    /// The models (none: no vectors are computed).
    models: &'a [Arc<dyn crate::embed::SpaceModel>],
    /// A frame no signal would search at this quality is not embedded.
    min_quality: u8,
    /// Also embed the content area inside uniform borders (uploads), not only the whole picture
    /// (what a reference stores).
    content_area: bool,
    /// Also embed these windows of the picture (uploads; none for references).
    windows: &'a crate::embed::Windows,
}

/// The windows of pictures that are not uploads (references): none.
static NO_WINDOWS: crate::embed::Windows = crate::embed::Windows::none();

impl Embed<'static> {
    /// No model: PDQ only.
    const fn none() -> Self {
        Embed {
            models: &[],
            min_quality: 0,
            content_area: false,
            windows: &NO_WINDOWS,
        }
    }
}

/// Turns a validated frame into the signals it is searched with, hashing pixels when it carries
/// them (synchronous: callers run it on the blocking pool). The second value names the input kind
/// and the hashing time, when there was hashing to do. The client's vectors
/// ([`FrameInput::embeddings`]) are the caller's to check and add; the ones returned are the
/// models'.
fn query_frame(
    input: FrameInput,
    dihedral: bool,
    limits: &DecodeLimits,
    embed: Embed<'_>,
    metrics: &Metrics,
) -> Result<(QueryFrame, Option<Hashed>), Error> {
    let FrameInput {
        frame_index,
        timestamp_ms,
        content,
        embeddings: _,
    } = input;
    let models = embed.models;
    let started = Instant::now();
    let (hashes, kind, picture) = match content {
        Content::Vectors => {
            let query = QueryFrame {
                signal: FrameSignal {
                    frame_index,
                    timestamp_ms,
                    hash: crate::hash::PdqHash::default(),
                    quality: 0,
                },
                variants: None,
                content: None,
                has_pdq: false,
                embeddings: Vec::new(),
            };
            return Ok((query, None));
        }
        Content::Pdq {
            hash,
            quality,
            variants,
            content,
        } => {
            let query = QueryFrame {
                signal: FrameSignal {
                    frame_index,
                    timestamp_ms,
                    hash,
                    quality,
                },
                variants: if dihedral { variants.map(|v| *v) } else { None },
                content: content.map(|c| ContentSignal {
                    variants: if dihedral { c.variants } else { None },
                    ..*c
                }),
                has_pdq: true,
                embeddings: Vec::new(),
            };
            return Ok((query, None));
        }
        Content::Image(bytes) => {
            // Decoded once for both signals; the models need 8-bit RGB.
            let decoded = pdq::decode_image(&bytes, limits)?;
            let picture = (!models.is_empty()).then(|| decoded.to_rgb8());
            (border::hash_picture(decoded), "image", picture)
        }
        Content::Rgb {
            width,
            height,
            data,
        } => {
            let hashes = border::hash_rgb(width, height, &data)?;
            let picture = if models.is_empty() {
                None
            } else {
                image::RgbImage::from_raw(width, height, data)
            };
            (hashes, "rgb", picture)
        }
    };
    let elapsed = started.elapsed();
    let full = &hashes.full;
    let mut query = QueryFrame {
        signal: FrameSignal {
            frame_index,
            timestamp_ms,
            hash: full.hash(),
            quality: full.quality(),
        },
        variants: dihedral.then(|| full.dihedral()),
        content: hashes.content.as_ref().map(|c| ContentSignal {
            hash: c.hash(),
            quality: c.quality(),
            variants: dihedral.then(|| c.dihedral()),
        }),
        has_pdq: true,
        embeddings: Vec::new(),
    };
    // A frame no signal will search (flat, dark) is not worth the model's time.
    if let Some(picture) = picture
        && query.searchable(embed.min_quality)
    {
        let area = hashes.area.filter(|_| embed.content_area);
        let (vectors, took) = embedding::embed_picture(models, &picture, area, embed.windows)?;
        metrics.hashed("embedding", took);
        query.embeddings = vectors;
    }
    Ok((query, Some((kind, elapsed))))
}

/// Decrements the hashing-queue count when a job leaves, however it leaves.
struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{EngineKind, FrameIndex, HnswParams, VectorParams};
    use crate::model::{EmbeddingSpace, Metric};

    /// A small real model: the picture's colour histogram (4 bins per channel), L2-normalised.
    struct Histogram;

    impl crate::embed::SpaceModel for Histogram {
        fn name(&self) -> &str {
            "histogram"
        }
        fn dimension(&self) -> u32 {
            12
        }
        fn metric(&self) -> Metric {
            Metric::Cosine
        }
        fn embed(&self, picture: &image::RgbImage) -> Result<Vec<f32>, String> {
            let mut bins = vec![0.0f32; 12];
            for pixel in picture.pixels() {
                for (channel, value) in pixel.0.iter().enumerate() {
                    bins[channel * 4 + usize::from(*value / 64)] += 1.0;
                }
            }
            let norm = bins.iter().map(|b| b * b).sum::<f32>().sqrt();
            Ok(bins.into_iter().map(|b| b / norm).collect())
        }
    }

    async fn state(dir: &std::path::Path) -> AppState {
        let store = Store::open_embedded(dir).await.expect("store");
        let default_org = store.default_org().await.expect("org");
        let index = SignalIndex::new(
            FrameIndex::new(EngineKind::default(), HnswParams::default()),
            VectorParams::default(),
        );
        let config = ServeConfig::with_data_dir(dir.to_path_buf());
        AppState::new(
            store,
            index,
            Catalog::default(),
            default_org,
            &config,
            Metrics::noop(),
        )
        .with_models(vec![Arc::new(Histogram)], 0)
    }

    /// A 64x64 picture: a noisy gradient, with black bars top and bottom when `bars`.
    fn picture(bars: bool) -> FrameInput {
        let (width, height) = (64u32, 64u32);
        let mut data = Vec::with_capacity(64 * 64 * 3);
        for y in 0..height {
            for x in 0..width {
                let bar = bars && !(16..48).contains(&y);
                let v = |k: u32| {
                    if bar {
                        0
                    } else {
                        ((x * k + y * 7 + (x * y) % 13) % 256) as u8
                    }
                };
                data.extend_from_slice(&[v(3), v(5), v(11)]);
            }
        }
        FrameInput {
            frame_index: 4,
            timestamp_ms: 400,
            content: Content::Rgb {
                width,
                height,
                data,
            },
            embeddings: Vec::new(),
        }
    }

    #[tokio::test]
    async fn reference_frames_get_the_models_vector_of_the_whole_picture_only() {
        let dir = tempfile::tempdir().expect("dir");
        let state = state(dir.path()).await;
        let spaces = [EmbeddingSpace {
            name: "histogram".into(),
            dimension: 12,
            metric: Metric::Cosine,
            threshold: 0.9,
            index: None,
        }];
        let models = state.models_for(&spaces);
        assert_eq!(models.len(), 1);
        // A space of that name with another dimension is not the model's.
        assert!(
            state
                .models_for(&[EmbeddingSpace {
                    dimension: 13,
                    ..spaces[0].clone()
                }])
                .is_empty()
        );
        let query = state
            .frame_signal(picture(true), false, models.clone())
            .await
            .expect("hashed");
        assert!(query.has_pdq);
        assert!(query.content.is_some(), "the bars give a content area");
        assert_eq!(query.embeddings.len(), 1, "whole picture only");
        let vector = &query.embeddings[0];
        assert!(!vector.content_area);
        assert_eq!(&*vector.space, "histogram");
        let expected = crate::embed::SpaceModel::embed(&Histogram, &{
            let Content::Rgb { data, .. } = picture(true).content else {
                unreachable!("an rgb frame")
            };
            image::RgbImage::from_raw(64, 64, data).expect("picture")
        })
        .expect("embed");
        assert_eq!(vector.vector, expected);
        // Without models, PDQ only.
        let plain = state
            .frame_signal(picture(false), false, Vec::new())
            .await
            .expect("hashed");
        assert!(plain.embeddings.is_empty());
    }

    #[tokio::test]
    async fn uploads_get_model_vectors_unless_the_client_sent_that_space() {
        let dir = tempfile::tempdir().expect("dir");
        let state = state(dir.path()).await;
        let params = Arc::new(MatchParams {
            spaces: vec![matching::SpaceScope {
                space: Arc::from("histogram"),
                dimension: 12,
                metric: Metric::Cosine,
                thresholds: HashMap::from([(BankId(1), 0.9)]),
            }],
            ..MatchParams::default()
        });
        let filter = Arc::new(BankFilter::All);
        let (query, _) = state
            .match_frame(picture(true), &params, &filter, true)
            .await
            .expect("matched");
        // The whole picture and its content area inside the bars.
        assert_eq!(query.embeddings.len(), 2);
        assert!(query.embeddings.iter().any(|v| v.content_area));

        let mut sent = picture(true);
        sent.embeddings = vec![crate::model::FrameEmbedding {
            frame_index: 4,
            timestamp_ms: 400,
            space: "histogram".into(),
            vector: vec![2.0; 12],
        }];
        let (query, _) = state
            .match_frame(sent, &params, &filter, true)
            .await
            .expect("matched");
        assert_eq!(
            query.embeddings.len(),
            1,
            "the client's vector, not the model's"
        );
        assert!((query.embeddings[0].vector[0] - 12f32.sqrt().recip()).abs() < 1e-6);

        let mut wrong = picture(false);
        wrong.embeddings = vec![crate::model::FrameEmbedding {
            frame_index: 4,
            timestamp_ms: 400,
            space: "histogram".into(),
            vector: vec![1.0; 11],
        }];
        let error = state
            .match_frame(wrong, &params, &filter, true)
            .await
            .expect_err("wrong dimension");
        assert_eq!(Status::from(error).code(), tonic::Code::InvalidArgument);
    }
}
