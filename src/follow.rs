//! Partner following (`serve --follow URL --follow-key KEY`; DESIGN.md §3, "Partners"): this
//! server reads the partner's `Exchange.Changes` feed and mirrors into its own store the banks the
//! partner shares with the key's organisation, so that a reference added there matches here within
//! seconds.
//!
//! What an event becomes here (the partner's URL is the *source* under which the store keeps the
//! cursor and the partner-id to local-id mappings):
//! - `bank`: a local organisation named after the bank's owner (created when missing; an owner
//!   named like this server's default organisation becomes `<owner>@<partner host:port>`, so the
//!   partner's `local` is never confused with ours), and a bank `<owner>.<name>` (sanitised to the
//!   bank-name alphabet) owned by it, shared with the `--follow-share-with` organisations (default
//!   the default organisation). A mirrored bank is created once and never renamed.
//! - `reference_added`: the reference with its stored frames, then the in-memory index.
//!   References the partner has withdrawn since are not mirrored.
//! - `reference_withdrawn`: the mirror is withdrawn with the partner's reason.
//! - `bank_hidden`: every active reference of the mirrored bank is withdrawn ("partner stopped
//!   sharing").
//!
//! Every write goes through the store (durable, with its change-log entry) before the index, as on
//! the Banks write path, and is idempotent: the store's mirror mappings turn a repeated event into
//! a no-op, also when several replicas on one PostgreSQL database follow the same partner.
//!
//! The cursor: events of one change-log entry share a `seq` (a bank that becomes visible comes with
//! its references), so a seq is complete only when an event with a higher one arrives. Only complete
//! seqs are persisted (at most once a second, and when the follower stops); after a restart the
//! feed resumes from there and the last group is applied again, which changes nothing.
//!
//! Disconnects are retried with capped exponential backoff and jitter; a rejected key
//! (UNAUTHENTICATED, PERMISSION_DENIED) is logged as an error saying what to do, and retried more
//! slowly. The follower starts once the index is loaded and stops at server shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder as _, ExponentialBuilder};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::Code;

use crate::api::{AppState, convert};
use crate::client::{self, ClientOptions, Connector};
use crate::config::{self, FollowConfig, invalid};
use crate::hash::{PDQ_BYTES, PdqHash};
use crate::model::{
    Actor, BankId, Category, FrameSignal, NewReference, OrgId, ReferenceId, ReferenceState,
    Visibility,
};
use crate::pb;
use crate::store::{self, MAX_NAME_CHARS, MAX_TEXT_BYTES, NewBank};
use crate::telemetry::FollowReport;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on an idle stream, so that a partner that vanished without closing the connection
/// (a network partition) is noticed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest event accepted: a reference of `store::MAX_FRAMES_PER_REFERENCE` frames is about 55 MB.
const MAX_EVENT_BYTES: usize = 128 * 1024 * 1024;
/// The cursor is written at most this often (and when the follower stops).
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// How long a stopping follower may take to finish the event it is applying.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect delays: 0.2 s doubling to 15 s, each plus up to 100 % jitter.
const RETRY: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(200))
    .with_max_delay(Duration::from_secs(15))
    .with_factor(2.0)
    .with_jitter()
    .without_max_times();
/// Reconnect delays after the partner rejected the key: 30 s doubling to 5 min, plus jitter.
const AUTH_RETRY: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_secs(30))
    .with_max_delay(Duration::from_secs(300))
    .with_factor(2.0)
    .with_jitter()
    .without_max_times();
/// Withdrawal reason of the mirrors of a bank the partner no longer shares.
pub const HIDDEN_REASON: &str = "partner stopped sharing";

/// Why following cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--follow-share-with` names an organisation this server does not have.
    #[error(
        "--follow-share-with names organisation {0:?}, which does not exist on this server; create it first (Admin.CreateOrganisation) or leave it out"
    )]
    UnknownShareOrg(String),
    /// The key, the URL or the TLS files are unusable.
    #[error("--follow: {0}")]
    Client(#[source] client::Error),
}

/// Event kinds, as counted in `framematch.follow.events`.
const KINDS: [&str; 5] = [
    "bank",
    "reference_added",
    "reference_withdrawn",
    "bank_hidden",
    "rejected",
];

/// What the follower has done, for metrics and tests. Shared with the metrics pipeline.
#[derive(Debug)]
pub struct FollowProgress {
    /// The partner's URL.
    pub partner: String,
    applied_seq: AtomicI64,
    connected: AtomicBool,
    events: [AtomicU64; KINDS.len()],
}

impl FollowProgress {
    fn new(partner: String) -> Self {
        Self {
            partner,
            applied_seq: AtomicI64::new(0),
            connected: AtomicBool::new(false),
            events: Default::default(),
        }
    }

    /// The partner's change-log position of the last event applied (0 before the first).
    pub fn applied_seq(&self) -> u64 {
        u64::try_from(self.applied_seq.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Whether the change stream is open now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Events applied so far, by kind (`rejected`: malformed events that were skipped).
    pub fn event_counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        KINDS
            .iter()
            .zip(&self.events)
            .map(|(kind, count)| (*kind, count.load(Ordering::Relaxed)))
    }

    fn count(&self, kind: Kind) {
        if let Some(counter) = self.events.get(kind as usize) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The follower's progress as the metrics pipeline reads it.
impl FollowReport for FollowProgress {
    fn partner(&self) -> &str {
        &self.partner
    }

    fn applied_seq(&self) -> u64 {
        FollowProgress::applied_seq(self)
    }

    fn is_connected(&self) -> bool {
        FollowProgress::is_connected(self)
    }

    fn event_counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        FollowProgress::event_counts(self)
    }
}

/// Index into [`KINDS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bank = 0,
    ReferenceAdded = 1,
    ReferenceWithdrawn = 2,
    BankHidden = 3,
    Rejected = 4,
}

/// A follower, ready to start once the index is loaded.
pub struct Follower {
    state: AppState,
    /// The partner's URL: the source name in the store.
    source: String,
    /// The partner's URL, TLS settings and key, checked.
    connector: Connector,
    /// Local organisations the mirrored banks are shared with.
    share_with: Vec<OrgId>,
    /// Name of this server's default organisation (an owner named so is renamed).
    local_default: String,
    /// `host:port` of the partner, for renamed owners.
    authority: String,
    progress: Arc<FollowProgress>,
    /// Partner bank id to local bank id, as far as seen.
    banks: HashMap<i64, BankId>,
}

/// A running follower.
pub struct FollowerHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl FollowerHandle {
    /// Stops the follower: it finishes the event it is applying, records its cursor and returns.
    pub async fn stop(self) {
        let Self { stop, mut task } = self;
        stop.send_replace(true);
        if tokio::time::timeout(STOP_TIMEOUT, &mut task).await.is_err() {
            tracing::warn!("the partner follower did not stop in time; abandoning it");
            task.abort();
        }
    }
}

impl Follower {
    /// A follower of `config`'s partner over `state`. Resolves `--follow-share-with` now, so a
    /// typo stops the server at start.
    ///
    /// # Errors
    /// [`Error::UnknownShareOrg`], [`Error::Key`].
    pub fn prepare(state: &AppState, config: &FollowConfig) -> Result<Self, Error> {
        let (share_with, local_default) = {
            let catalog = state.catalog.read();
            let share_with = if config.share_with.is_empty() {
                vec![state.default_org]
            } else {
                config
                    .share_with
                    .iter()
                    .map(|name| {
                        catalog
                            .org_id(name)
                            .ok_or_else(|| Error::UnknownShareOrg(name.clone()))
                    })
                    .collect::<Result<Vec<_>, _>>()?
            };
            (share_with, catalog.org_name(state.default_org))
        };
        let connector = Connector::new(&ClientOptions {
            server: config.url.clone(),
            api_key: Some(config.key.clone()),
            tls_ca: config.tls_ca.clone(),
            tls_cert: config.tls_client_cert.clone(),
            tls_key: config.tls_client_key.clone(),
        })
        .map_err(Error::Client)?
        .long_lived(CONNECT_TIMEOUT, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT);
        let authority = config
            .url
            .parse::<tonic::transport::Uri>()
            .ok()
            .and_then(|uri| uri.authority().map(ToString::to_string))
            .unwrap_or_else(|| config.url.clone());
        Ok(Self {
            state: state.clone(),
            source: config.url.clone(),
            connector,
            share_with,
            local_default,
            authority,
            progress: Arc::new(FollowProgress::new(config.url.clone())),
            banks: HashMap::new(),
        })
    }

    /// What the follower has done (for metrics).
    pub fn progress(&self) -> Arc<FollowProgress> {
        Arc::clone(&self.progress)
    }

    /// Starts following once `index_loaded` fires (never, if its sender is dropped: the loader
    /// failed and said why).
    pub fn spawn(self, index_loaded: oneshot::Receiver<()>) -> FollowerHandle {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(self.run(index_loaded, stopped));
        FollowerHandle { stop, task }
    }

    async fn run(mut self, index_loaded: oneshot::Receiver<()>, mut stop: watch::Receiver<bool>) {
        tokio::select! {
            loaded = index_loaded => if loaded.is_err() { return },
            () = stopped(&mut stop) => return,
        }
        tracing::info!(partner = %self.source, "following partner");
        let mut cursor: Option<Cursor> = None;
        let mut retry = RETRY.build();
        let mut auth_retry = AUTH_RETRY.build();
        let mut failures: u32 = 0;
        loop {
            let ended = self.session(&mut cursor, &mut stop).await;
            self.progress.connected.store(false, Ordering::Relaxed);
            if let Some(cursor) = cursor.as_mut() {
                self.persist(cursor).await;
                cursor.reconnecting();
            }
            let (failure, opened) = match ended {
                Ended::Stopped => break,
                Ended::Failed { failure, opened } => (failure, opened),
            };
            if opened {
                failures = 0;
                retry = RETRY.build();
                auth_retry = AUTH_RETRY.build();
            }
            failures += 1;
            let delay = if failure.is_auth() {
                auth_retry.next()
            } else {
                retry.next()
            }
            .unwrap_or(Duration::from_secs(300));
            self.log_failure(&failure, failures, delay);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopped(&mut stop) => break,
            }
        }
        tracing::info!(
            partner = %self.source,
            cursor = cursor.map_or(0, |c| c.persisted),
            "stopped following partner"
        );
    }

    fn log_failure(&self, failure: &Failure, failures: u32, delay: Duration) {
        let retry_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        match failure {
            Failure::Status(status) if status.code() == Code::Unauthenticated => {
                tracing::error!(
                    partner = %self.source,
                    retry_ms,
                    "the partner rejected --follow-key ({}): ask the partner for a working API key of your organisation on their server (a matcher key is enough) and restart with it; retrying slowly meanwhile",
                    status.message()
                );
            }
            Failure::Status(status) if status.code() == Code::PermissionDenied => {
                tracing::error!(
                    partner = %self.source,
                    retry_ms,
                    "the partner refuses to send its changes to --follow-key ({}): ask the partner for a key allowed to follow (a matcher key of your organisation); retrying slowly meanwhile",
                    status.message()
                );
            }
            _ if failures == 1 => {
                tracing::warn!(
                    partner = %self.source,
                    retry_ms,
                    reason = %failure,
                    "partner change stream down; reconnecting"
                );
            }
            _ => {
                tracing::debug!(
                    partner = %self.source,
                    attempt = failures,
                    retry_ms,
                    reason = %failure,
                    "partner still unreachable"
                );
            }
        }
    }

    /// Records the cursor if a complete seq is not recorded yet. A failure is logged: the seqs
    /// after the recorded cursor are applied again later, which changes nothing.
    async fn persist(&self, cursor: &mut Cursor) {
        if let Err(error) = self.persist_or_fail(cursor).await {
            tracing::warn!(
                partner = %self.source,
                error = &error as &dyn std::error::Error,
                "recording the follow cursor failed; it will be recorded later"
            );
        }
    }

    async fn persist_or_fail(&self, cursor: &mut Cursor) -> Result<(), store::Error> {
        if let Some(seq) = cursor.unsaved() {
            self.state
                .store
                .set_follow_cursor(&self.source, crate::model::ChangeSeq(seq))
                .await?;
            cursor.saved(seq);
        }
        Ok(())
    }

    /// One connection: reads the cursor (first time), opens the stream from it and applies events
    /// until the stream fails or the follower is stopped.
    async fn session(
        &mut self,
        cursor: &mut Option<Cursor>,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        let cursor = match cursor {
            Some(cursor) => cursor,
            None => match self.state.store.follow_cursor(&self.source).await {
                Ok(seq) => cursor.insert(Cursor::new(seq.0)),
                Err(error) => return Ended::failed(Failure::Store(error), false),
            },
        };
        let channel = tokio::select! {
            connected = self.connector.connect() => match connected {
                Ok(channel) => channel,
                Err(error) => return Ended::failed(Failure::Connect(error), false),
            },
            () = stopped(stop) => return Ended::Stopped,
        };
        let mut client = pb::exchange_client::ExchangeClient::new(channel)
            .max_decoding_message_size(MAX_EVENT_BYTES);
        let from = cursor.resume_from();
        let opened = tokio::select! {
            opened = client.changes(pb::ChangesRequest { cursor: from }) => opened,
            () = stopped(stop) => return Ended::Stopped,
        };
        let mut stream = match opened {
            Ok(response) => response.into_inner(),
            Err(status) => return Ended::failed(Failure::Status(status), false),
        };
        self.progress.connected.store(true, Ordering::Relaxed);
        tracing::info!(partner = %self.source, cursor = from, "partner change stream open");
        let mut tick = tokio::time::interval(PERSIST_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut persisted_at = Instant::now();
        loop {
            // Only the waits are raced with the stop signal; an event, once received, is applied
            // to the end.
            let message = tokio::select! {
                biased;
                () = stopped(stop) => return Ended::Stopped,
                _ = tick.tick() => {
                    self.persist(cursor).await;
                    persisted_at = Instant::now();
                    continue;
                }
                message = stream.message() => message,
            };
            let event = match message {
                Ok(Some(event)) => event,
                Ok(None) => return Ended::failed(Failure::Ended, true),
                Err(status) => return Ended::failed(Failure::Status(status), true),
            };
            let seq = event.seq;
            if let Err(reason) = cursor.begin(seq) {
                return Ended::failed(Failure::Protocol(reason), true);
            }
            if persisted_at.elapsed() >= PERSIST_EVERY {
                if let Err(error) = self.persist_or_fail(cursor).await {
                    return Ended::failed(Failure::Store(error), true);
                }
                persisted_at = Instant::now();
            }
            match self.apply(event).await {
                Ok(kind) => self.progress.count(kind),
                Err(Rejected::Store(error)) => {
                    // Not applied: the session ends and the group is read again after the
                    // backoff.
                    return Ended::failed(Failure::Store(error), true);
                }
                Err(Rejected::Malformed(reason)) => {
                    tracing::error!(
                        partner = %self.source,
                        seq,
                        "skipped a change from the partner: {reason}"
                    );
                    self.progress.count(Kind::Rejected);
                }
            }
            self.progress.applied_seq.store(seq, Ordering::Relaxed);
        }
    }

    /// Applies one event. Idempotent.
    async fn apply(&mut self, event: pb::ChangeEvent) -> Result<Kind, Rejected> {
        use pb::change_event::Change;
        match event.change {
            Some(Change::Bank(bank)) => {
                self.mirror_bank(bank).await?;
                Ok(Kind::Bank)
            }
            Some(Change::ReferenceAdded(added)) => {
                self.mirror_reference(added).await?;
                Ok(Kind::ReferenceAdded)
            }
            Some(Change::ReferenceWithdrawn(withdrawn)) => {
                let reference = withdrawn.reference.ok_or_else(|| {
                    Rejected::Malformed("reference_withdrawn without its reference".to_string())
                })?;
                let reason = withdrawal_reason(&reference.withdrawn_reason);
                if let Some(local) = self
                    .state
                    .store
                    .mirrored_reference(&self.source, reference.id)
                    .await?
                {
                    self.withdraw(local, &reason).await?;
                    tracing::info!(
                        partner = %self.source,
                        partner_reference = reference.id,
                        reference = local.0,
                        "withdrew a mirrored reference"
                    );
                }
                Ok(Kind::ReferenceWithdrawn)
            }
            Some(Change::BankHidden(hidden)) => {
                if let Some(bank) = self.local_bank(hidden.bank_id).await? {
                    let references = self.state.store.list_references(bank, false).await?;
                    let count = references.len();
                    for reference in references {
                        self.withdraw(reference.id, HIDDEN_REASON).await?;
                    }
                    tracing::info!(
                        partner = %self.source,
                        partner_bank = hidden.bank_id,
                        bank = bank.0,
                        withdrawn = count,
                        "the partner stopped sharing a bank; withdrew its mirrored references"
                    );
                }
                Ok(Kind::BankHidden)
            }
            None => Err(Rejected::Malformed(
                "an event without a change (sent by a newer partner?)".to_string(),
            )),
        }
    }

    /// The local bank mirroring partner bank `remote`, if there is one.
    async fn local_bank(&mut self, remote: i64) -> Result<Option<BankId>, Rejected> {
        if let Some(id) = self.banks.get(&remote) {
            return Ok(Some(*id));
        }
        let Some(bank) = self.state.store.mirrored_bank(&self.source, remote).await? else {
            return Ok(None);
        };
        let id = bank.id;
        // Another replica may have created it and this one's tailer not applied it yet.
        let known = self.state.catalog.read().bank(id).is_some();
        if !known {
            self.state.catalog.write().insert_bank(bank);
        }
        self.banks.insert(remote, id);
        Ok(Some(id))
    }

    async fn mirror_bank(&mut self, bank: pb::Bank) -> Result<(), Rejected> {
        if self.local_bank(bank.id).await?.is_some() {
            return Ok(());
        }
        let owner_name = mirror_org_name(&bank.owner, &self.local_default, &self.authority);
        let owner = self.mirror_org(&owner_name).await?;
        let category = category(bank.category);
        let name = bank_name(&owner_name, &bank.name);
        let new = NewBank {
            name: name.clone(),
            category,
            owner,
            visibility: Visibility::SharedWith(self.share_with.clone()),
            description: truncate(
                format!(
                    "Mirrored from {} (bank {:?} of {:?}, id {}). {}",
                    self.source, bank.name, bank.owner, bank.id, bank.description
                ),
                MAX_TEXT_BYTES,
            ),
            embedding_spaces: self.mirror_spaces(&bank),
        };
        let store = &self.state.store;
        let actor = Actor::system(owner);
        let mut new = new;
        let mut attempt = store
            .create_mirrored_bank(&self.source, bank.id, new.clone(), actor)
            .await;
        // A space this server knows with another dimension or metric cannot be mirrored: the
        // bank is mirrored without it (PDQ and its other spaces still match).
        while let Err(store::Error::SpaceConflict { space, .. }) = &attempt {
            tracing::warn!(
                partner = %self.source,
                partner_bank = bank.id,
                space = %space,
                error = %attempt.as_ref().err().map(ToString::to_string).unwrap_or_default(),
                "mirroring the bank without an embedding space that conflicts with this server's"
            );
            let space = space.clone();
            new.embedding_spaces.retain(|s| s.name != space);
            attempt = store
                .create_mirrored_bank(&self.source, bank.id, new.clone(), actor)
                .await;
        }
        let created = match attempt {
            Err(store::Error::AlreadyExists { kind: "bank", .. }) => {
                // A local bank has that name: the mirror gets the partner's id as a suffix.
                let other = fallback_bank_name(&name, bank.id);
                tracing::warn!(
                    partner = %self.source,
                    taken = %name,
                    name = %other,
                    "a local bank already has the mirrored bank's name; using another"
                );
                store
                    .create_mirrored_bank(
                        &self.source,
                        bank.id,
                        NewBank { name: other, ..new },
                        actor,
                    )
                    .await?
            }
            other => other?,
        };
        tracing::info!(
            partner = %self.source,
            partner_bank = bank.id,
            bank = %created.name,
            owner = %owner_name,
            "mirroring a partner bank"
        );
        self.banks.insert(bank.id, created.id);
        self.state.ensure_spaces(&created);
        self.state.catalog.write().insert_bank(created);
        self.state.note_change();
        Ok(())
    }

    /// The partner bank's embedding spaces as this server can hold them: a space the partner
    /// describes in a way this server refuses (a newer partner's rules) is left out, with a
    /// warning.
    fn mirror_spaces(&self, bank: &pb::Bank) -> Vec<crate::model::EmbeddingSpace> {
        bank.embedding_spaces
            .iter()
            .filter_map(|space| {
                // The partner's index settings tune its machine: a mirrored space that is new
                // here gets this server's --vector-index.
                let unset = pb::EmbeddingSpace {
                    index: String::new(),
                    ..space.clone()
                };
                match convert::embedding_space_from_pb(unset, None, self.state.space_defaults) {
                    Ok(space) => Some(space),
                    Err(error) => {
                        tracing::warn!(
                            partner = %self.source,
                            partner_bank = bank.id,
                            space = %space.name,
                            %error,
                            "embedding space of a partner bank not mirrored"
                        );
                        None
                    }
                }
            })
            .collect()
    }

    /// The local organisation named `name`, created when missing.
    async fn mirror_org(&self, name: &str) -> Result<OrgId, Rejected> {
        let known = self.state.catalog.read().org_id(name);
        if let Some(id) = known {
            return Ok(id);
        }
        let org = match self.state.store.create_org(name, None).await {
            Ok(org) => {
                tracing::info!(partner = %self.source, organisation = %name, "created an organisation for a partner bank owner");
                self.state.note_change();
                org
            }
            // Another replica created it first.
            Err(store::Error::AlreadyExists { .. }) => self
                .state
                .store
                .list_orgs()
                .await?
                .into_iter()
                .find(|org| org.name == name)
                .ok_or_else(|| {
                    Rejected::Store(store::Error::NotFound {
                        kind: "organisation",
                        key: name.to_string(),
                    })
                })?,
            Err(error) => return Err(error.into()),
        };
        let id = org.id;
        self.state.catalog.write().insert_org(org);
        Ok(id)
    }

    async fn mirror_reference(&mut self, added: pb::ReferenceAdded) -> Result<(), Rejected> {
        let reference = added.reference.ok_or_else(|| {
            Rejected::Malformed("reference_added without its reference".to_string())
        })?;
        let Some(bank) = self.local_bank(added.bank_id).await? else {
            return Err(Rejected::Malformed(format!(
                "reference {} is in partner bank {}, which was never announced",
                reference.id, added.bank_id
            )));
        };
        if reference.state == pb::ReferenceState::Withdrawn as i32 {
            // Withdrawn on the partner since it was added: nothing to match. Its withdrawal comes
            // later in the feed and finds nothing to do.
            tracing::debug!(partner = %self.source, partner_reference = reference.id, "skipped a reference withdrawn since");
            return Ok(());
        }
        let frames = added
            .frames
            .iter()
            .enumerate()
            // A frame without a hash carries vectors only (issue #11).
            .filter(|(_, frame)| !frame.pdq.is_empty())
            .map(|(i, frame)| frame_from_pb(frame).map_err(|e| format!("frame {i}: {e}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                Rejected::Malformed(format!("reference {} has a bad {e}", reference.id))
            })?;
        let (_, mut embeddings) = convert::stored_frames_from_pb(
            added
                .frames
                .into_iter()
                .map(|frame| pb::StoredFrame {
                    pdq: Vec::new(),
                    ..frame
                })
                .collect(),
        )
        .map_err(|e| {
            Rejected::Malformed(format!("reference {} has a bad vector: {e}", reference.id))
        })?;
        // Vectors of a space the mirror does not hold (refused here as conflicting) are dropped.
        let spaces: Vec<String> = self
            .state
            .catalog
            .read()
            .bank(bank)
            .map(|b| b.embedding_spaces.iter().map(|s| s.name.clone()).collect())
            .unwrap_or_default();
        embeddings.retain(|e| spaces.contains(&e.space));
        let owner = self.bank_owner(bank).await?;
        let (local, created) = self
            .state
            .store
            .add_mirrored_reference(
                &self.source,
                reference.id,
                NewReference {
                    bank,
                    external_id: reference.external_id,
                    note: reference.note,
                    added_by: owner,
                    frames,
                    embeddings,
                },
                Actor::system(owner),
            )
            .await?;
        if created {
            let stored = self.state.store.reference_frames(local.id).await?;
            let vectors = self.state.store.reference_embeddings(local.id).await?;
            let index = self.state.index.clone();
            let id = local.id;
            // Index inserts are CPU work (hnsw especially): off the async workers.
            tokio::task::spawn_blocking(move || {
                index.insert_reference(id, bank, &stored, &vectors)
            })
            .await
            .map_err(|e| Rejected::Store(store::Error::TaskFailed(e)))?;
            self.state.note_change();
            tracing::debug!(
                partner = %self.source,
                partner_reference = reference.id,
                reference = id.0,
                "mirrored a partner reference"
            );
        } else if matches!(local.state, ReferenceState::Withdrawn { .. }) {
            tracing::warn!(
                partner = %self.source,
                partner_reference = reference.id,
                reference = local.id.0,
                "the partner's reference is active but its mirror here was withdrawn (the partner stopped sharing its bank, then shared it again); it stays withdrawn"
            );
        }
        Ok(())
    }

    /// The organisation owning a local bank.
    async fn bank_owner(&self, bank: BankId) -> Result<OrgId, Rejected> {
        let known = self.state.catalog.read().bank(bank).map(|b| b.owner);
        match known {
            Some(owner) => Ok(owner),
            None => {
                let bank = self.state.store.get_bank(bank).await?;
                let owner = bank.owner;
                self.state.catalog.write().insert_bank(bank);
                Ok(owner)
            }
        }
    }

    /// Withdraws a local mirror (already withdrawn is fine) and takes it out of the index.
    async fn withdraw(&self, id: ReferenceId, reason: &str) -> Result<(), Rejected> {
        let reference = self.state.store.get_reference(id).await?;
        if reference.state == ReferenceState::Active {
            let owner = self.bank_owner(reference.bank).await?;
            match self
                .state
                .store
                .withdraw_reference(id, reason, Actor::system(owner))
                .await
            {
                Ok(_) | Err(store::Error::AlreadyWithdrawn { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        let index = self.state.index.clone();
        // A withdrawal takes the index's write lock (its rebuilds run in the background).
        tokio::task::spawn_blocking(move || index.withdraw(id))
            .await
            .map_err(|e| Rejected::Store(store::Error::TaskFailed(e)))?;
        self.state.note_change();
        Ok(())
    }
}

/// Completes when the stop signal is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// How a session ended.
enum Ended {
    Stopped,
    Failed {
        failure: Failure,
        /// Whether the change stream had been opened (the backoff starts over).
        opened: bool,
    },
}

impl Ended {
    fn failed(failure: Failure, opened: bool) -> Self {
        Self::Failed { failure, opened }
    }
}

/// Why a session ended.
#[derive(Debug)]
enum Failure {
    Connect(client::Error),
    Status(tonic::Status),
    Ended,
    Store(store::Error),
    Protocol(String),
}

impl Failure {
    fn is_auth(&self) -> bool {
        matches!(self, Failure::Status(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied))
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(error) => {
                write!(f, "cannot connect: {error}")?;
                let mut source = std::error::Error::source(error);
                while let Some(cause) = source {
                    write!(f, ": {cause}")?;
                    source = cause.source();
                }
                Ok(())
            }
            Failure::Status(status) => {
                // With the transport failure behind it, and for a failed connection the hint
                // about client certificates (the CLI's wording names its own flags).
                let message = client::status_message(status).replace(
                    "--tls-client-cert and --tls-client-key",
                    "--follow-tls-client-cert and --follow-tls-client-key",
                );
                write!(f, "{:?}: {message}", status.code())
            }
            Failure::Ended => f.write_str("the partner ended the stream"),
            Failure::Store(error) => write!(f, "local store: {error}"),
            Failure::Protocol(reason) => write!(f, "the partner's feed is out of order: {reason}"),
        }
    }
}

/// Why an event was not applied.
#[derive(Debug)]
enum Rejected {
    /// The store failed; applying it again later may work.
    Store(store::Error),
    /// The event can never be applied: skipped, with an error in the log.
    Malformed(String),
}

impl From<store::Error> for Rejected {
    fn from(error: store::Error) -> Self {
        match error {
            // The event breaks a limit, or names something that cannot be created: retrying
            // cannot help.
            store::Error::InvalidInput { .. } | store::Error::AlreadyExists { .. } => {
                Rejected::Malformed(error.to_string())
            }
            other => Rejected::Store(other),
        }
    }
}

/// Which events of the feed have been applied completely.
///
/// Several events may carry one seq; a seq is complete once an event with a higher seq arrives.
/// Only complete seqs are recorded, so resuming from the recorded cursor never skips an event
/// (it may repeat the last group, which the idempotent mirror writes absorb).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cursor {
    /// Every event with a seq up to this one has been applied.
    complete: i64,
    /// The seq of the events being applied now.
    pending: Option<i64>,
    /// What the store holds.
    persisted: i64,
}

impl Cursor {
    fn new(persisted: i64) -> Self {
        Self {
            complete: persisted,
            pending: None,
            persisted,
        }
    }

    /// An event with `seq` is about to be applied: the previous seq is complete when this one is
    /// higher.
    fn begin(&mut self, seq: i64) -> Result<(), String> {
        let floor = self.pending.unwrap_or(self.complete);
        if seq < floor || (self.pending.is_none() && seq == self.complete) {
            return Err(format!(
                "seq {seq} after {floor} (resumed after {})",
                self.complete
            ));
        }
        if seq > floor {
            if let Some(previous) = self.pending {
                self.complete = previous;
            }
            self.pending = Some(seq);
        }
        Ok(())
    }

    /// The complete seq to record, when it is ahead of the store.
    fn unsaved(&self) -> Option<i64> {
        (self.complete > self.persisted).then_some(self.complete)
    }

    /// The store now holds `seq`.
    fn saved(&mut self, seq: i64) {
        self.persisted = self.persisted.max(seq);
    }

    /// Where a new stream starts: after the last complete seq.
    fn resume_from(&self) -> i64 {
        self.complete
    }

    /// The stream is gone: the pending group will be sent again in full.
    fn reconnecting(&mut self) {
        self.pending = None;
    }
}

/// The local organisation for a partner bank owner: the owner's name, unless it is the name of
/// this server's default organisation (every server calls its own `local`), which becomes
/// `<owner>@<partner host:port>`.
fn mirror_org_name(owner: &str, local_default: &str, authority: &str) -> String {
    let owner = owner.trim();
    if owner != local_default {
        return owner.chars().take(MAX_NAME_CHARS).collect();
    }
    let suffix = format!("@{authority}");
    let keep = MAX_NAME_CHARS.saturating_sub(suffix.chars().count());
    let mut name: String = owner.chars().take(keep).collect();
    name.push_str(&suffix);
    name.chars().take(MAX_NAME_CHARS).collect()
}

/// `<owner>.<name>` in the bank-name alphabet (`A-Z a-z 0-9 _ . -`; anything else becomes `_`),
/// at most [`MAX_NAME_CHARS`] characters.
fn bank_name(owner: &str, name: &str) -> String {
    let sanitised: String = format!("{owner}.{name}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(MAX_NAME_CHARS)
        .collect();
    sanitised
}

/// The name used when `name` is taken by a local bank: `<name>-<partner id>`, shortened to fit.
fn fallback_bank_name(name: &str, remote_id: i64) -> String {
    let suffix = format!("-{remote_id}");
    let keep = MAX_NAME_CHARS.saturating_sub(suffix.len());
    let mut out: String = name.chars().take(keep).collect();
    out.push_str(&suffix);
    out
}

/// The local withdrawal reason for a partner withdrawal.
fn withdrawal_reason(remote: &str) -> String {
    let remote = remote.trim();
    if remote.is_empty() {
        "withdrawn by the partner".to_string()
    } else {
        truncate(
            format!("withdrawn by the partner: {remote}"),
            MAX_TEXT_BYTES,
        )
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// A partner's category; one this build does not know (a newer partner) is `other`.
fn category(value: i32) -> Category {
    match pb::Category::try_from(value) {
        Ok(pb::Category::SuicideSelfHarm) => Category::SuicideSelfHarm,
        Ok(pb::Category::GraphicViolence) => Category::GraphicViolence,
        Ok(pb::Category::Terrorism) => Category::Terrorism,
        Ok(pb::Category::Other | pb::Category::Unspecified) | Err(_) => Category::Other,
    }
}

fn frame_from_pb(frame: &pb::StoredFrame) -> Result<FrameSignal, String> {
    let bytes: [u8; PDQ_BYTES] = frame
        .pdq
        .as_slice()
        .try_into()
        .map_err(|_| format!("pdq of {} bytes, expected {PDQ_BYTES}", frame.pdq.len()))?;
    let quality = u8::try_from(frame.quality)
        .ok()
        .filter(|q| *q <= store::MAX_QUALITY)
        .ok_or_else(|| format!("quality {}, at most {}", frame.quality, store::MAX_QUALITY))?;
    Ok(FrameSignal {
        frame_index: frame.frame_index,
        timestamp_ms: frame.timestamp_ms,
        hash: PdqHash::from_bytes(bytes),
        quality,
    })
}

/// `--follow`'s checks live here, with the follower that owns their limits.
impl FollowConfig {
    /// Validates `--follow`, `--follow-key` and `--follow-share-with`.
    ///
    /// # Errors
    /// The flag and what is wrong with it.
    pub fn parse(url: &str, key: &str, share_with: &[String]) -> Result<Self, config::Error> {
        let url = url.trim().trim_end_matches('/');
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(invalid(
                "follow",
                format!("{url:?}: must be an http://host:port or https://host:port URL"),
            ));
        }
        match url.parse::<tonic::transport::Uri>() {
            Ok(uri) if uri.host().is_some_and(|h| !h.is_empty()) => {}
            _ => {
                return Err(invalid(
                    "follow",
                    format!("{url:?} is not a URL with a host (e.g. http://partner.example:50051)"),
                ));
            }
        }
        if url.len() > crate::store::MAX_SOURCE_BYTES {
            return Err(invalid(
                "follow",
                format!(
                    "is {} bytes long; at most {} are accepted",
                    url.len(),
                    crate::store::MAX_SOURCE_BYTES
                ),
            ));
        }
        if key.is_empty()
            || key.len() > crate::auth::MAX_SECRET_CHARS
            || !key.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid(
                "follow-key",
                format!(
                    "must be the partner's API key: 1 to {} printable ASCII characters without spaces",
                    crate::auth::MAX_SECRET_CHARS
                ),
            ));
        }
        let mut orgs = Vec::new();
        for name in share_with {
            let name = name.trim();
            if name.is_empty() {
                return Err(invalid(
                    "follow-share-with",
                    "an empty organisation name (write names separated by commas)",
                ));
            }
            if !orgs.iter().any(|o: &String| o == name) {
                orgs.push(name.to_string());
            }
        }
        Ok(Self {
            url: url.to_string(),
            key: key.to_string(),
            share_with: orgs,
            tls_ca: None,
            tls_client_cert: None,
            tls_client_key: None,
        })
    }
}

#[cfg(test)]
mod tests;
