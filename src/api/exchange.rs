//! `framematch.v1.Exchange`: the change feed partners follow (DESIGN.md §3, "Partners").
//!
//! `Changes(cursor)` reads the change log after the cursor, turns each entry the caller may see
//! into an event, and once it has caught up waits for this process to apply a new change (its
//! own write, the replica tailer's or the partner follower's) or for a short poll interval, then
//! reads on. What a caller may see is decided when the entry is sent, from the bank as it is
//! then: a bank that became visible is sent with its active references, one that stopped being
//! visible is sent as `bank_hidden`. Organisation and key changes are never sent.
//!
//! Memory is bounded: the log is read in batches, and events go through a small channel, so a
//! slow follower slows its own stream down rather than filling the server.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::{self, Caller};
use crate::model::{Bank, BankId, Change, ChangeKind, ChangeSeq, ReferenceId};
use crate::pb;
use crate::pb::exchange_server::Exchange;
use crate::telemetry::Rpc;

use super::{AppState, Error, convert};

/// Change-log entries read per batch.
const BATCH: usize = 256;
/// Events buffered per stream before the reader waits for the client.
const EVENT_BUFFER: usize = 64;
/// How often a caught-up stream looks at the log even without a wake-up (other replicas' writes
/// on a shared database reach this process through its tailer, which also wakes streams; this is
/// the safety net).
const POLL: Duration = Duration::from_secs(1);

/// The Exchange service.
#[derive(Clone)]
pub struct ExchangeService {
    state: AppState,
}

impl ExchangeService {
    /// A service over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

type EventTx = mpsc::Sender<Result<pb::ChangeEvent, Status>>;

#[tonic::async_trait]
impl Exchange for ExchangeService {
    type ChangesStream = ReceiverStream<Result<pb::ChangeEvent, Status>>;

    async fn changes(
        &self,
        request: Request<pb::ChangesRequest>,
    ) -> Result<Response<Self::ChangesStream>, Status> {
        let caller = auth::caller_of(&request)?;
        let call = self
            .state
            .rpc_call(Rpc::Changes, &caller, request.metadata());
        let pb::ChangesRequest { cursor } = request.into_inner();
        let opened = call.span().in_scope(|| -> Result<(), Status> {
            self.state.ensure_ready()?;
            if cursor < 0 {
                return Err(Error::InvalidField {
                    field: "cursor",
                    reason: format!("is {cursor}; a cursor is 0 or the seq of an event"),
                }
                .into());
            }
            Ok(())
        });
        if let Err(status) = opened {
            call.finish(Err(status.code()));
            return Err(status);
        }
        let state = self.state.clone();
        let stream = self.state.spawn_stream(
            call,
            EVENT_BUFFER,
            "the server is shutting down; resume from the last cursor on another replica",
            move |tx| async move {
                tokio::select! {
                    result = feed(&state, caller, ChangeSeq(cursor), &tx) => result,
                    // A caught-up feed waits for changes; a client that left ends it at once.
                    () = tx.closed() => Ok(()),
                }
            },
        );
        Ok(Response::new(stream))
    }
}

/// Sends every visible change after `cursor`, then follows new ones until the client leaves.
async fn feed(
    state: &AppState,
    caller: Caller,
    mut cursor: ChangeSeq,
    tx: &EventTx,
) -> Result<(), Status> {
    loop {
        // Subscribed before reading, so a change committed while this batch is sent still wakes
        // the wait below.
        let mut wake = state.changed.subscribe();
        wake.mark_unchanged();
        let batch = state
            .store
            .changes_since(cursor, BATCH)
            .await
            .map_err(Error::from)?;
        let full = batch.len() == BATCH;
        let mut banks = BankCache::default();
        for change in &batch {
            for event in events_for(state, &caller, change, &mut banks).await? {
                if tx.send(Ok(event)).await.is_err() {
                    return Ok(());
                }
            }
            cursor = change.seq;
        }
        if !full {
            tokio::select! {
                _ = wake.changed() => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

/// Banks read from the store during one batch.
#[derive(Default)]
struct BankCache(HashMap<BankId, Bank>);

impl BankCache {
    async fn get(&mut self, state: &AppState, id: BankId) -> Result<&Bank, Error> {
        match self.0.entry(id) {
            std::collections::hash_map::Entry::Occupied(entry) => Ok(entry.into_mut()),
            std::collections::hash_map::Entry::Vacant(entry) => {
                Ok(entry.insert(state.store.get_bank(id).await?))
            }
        }
    }
}

/// The events one change-log entry becomes for this caller (often none).
async fn events_for(
    state: &AppState,
    caller: &Caller,
    change: &Change,
    banks: &mut BankCache,
) -> Result<Vec<pb::ChangeEvent>, Error> {
    let actor = state.catalog.read().org_name(change.actor.org);
    let event = |change_pb: pb::change_event::Change| pb::ChangeEvent {
        seq: change.seq.0,
        at_ms: change.at_ms,
        actor: actor.clone(),
        change: Some(change_pb),
    };
    match &change.kind {
        ChangeKind::OrgCreated(_)
        | ChangeKind::KeyCreated { .. }
        | ChangeKind::KeyRevoked { .. } => Ok(Vec::new()),
        ChangeKind::BankCreated(id) => {
            let bank = banks.get(state, *id).await?;
            if !caller.can_see(bank) {
                return Ok(Vec::new());
            }
            let bank_pb = bank_pb(state, caller, bank);
            Ok(vec![event(pb::change_event::Change::Bank(bank_pb))])
        }
        ChangeKind::BankUpdated(id) => {
            let bank = banks.get(state, *id).await?.clone();
            if !caller.can_see(&bank) {
                return Ok(vec![event(pb::change_event::Change::BankHidden(
                    pb::BankHidden { bank_id: id.0 },
                ))]);
            }
            // The caller may not have seen this bank before: send what it holds now.
            let mut events = vec![event(pb::change_event::Change::Bank(bank_pb(
                state, caller, &bank,
            )))];
            for reference in state.store.list_references(*id, false).await? {
                events.push(event(pb::change_event::Change::ReferenceAdded(
                    reference_added(state, reference.id).await?,
                )));
            }
            Ok(events)
        }
        ChangeKind::ReferenceAdded { reference, bank } => {
            if !caller.can_see(banks.get(state, *bank).await?) {
                return Ok(Vec::new());
            }
            Ok(vec![event(pb::change_event::Change::ReferenceAdded(
                reference_added(state, *reference).await?,
            ))])
        }
        ChangeKind::ReferenceWithdrawn { reference, bank } => {
            if !caller.can_see(banks.get(state, *bank).await?) {
                return Ok(Vec::new());
            }
            let stored = state.store.get_reference(*reference).await?;
            let reference_pb = convert::reference_to_pb(&state.catalog.read(), &stored);
            Ok(vec![event(pb::change_event::Change::ReferenceWithdrawn(
                pb::ReferenceWithdrawn {
                    reference: Some(reference_pb),
                    bank_id: bank.0,
                },
            ))])
        }
    }
}

fn bank_pb(state: &AppState, caller: &Caller, bank: &Bank) -> pb::Bank {
    convert::bank_to_pb(&state.catalog.read(), bank, caller.may_change(bank).is_ok())
}

async fn reference_added(state: &AppState, id: ReferenceId) -> Result<pb::ReferenceAdded, Error> {
    let reference = state.store.get_reference(id).await?;
    let frames = state.store.reference_frames(id).await?;
    let embeddings = state.store.reference_embeddings(id).await?;
    let reference_pb = convert::reference_to_pb(&state.catalog.read(), &reference);
    Ok(pb::ReferenceAdded {
        reference: Some(reference_pb),
        frames: convert::stored_frames_to_pb(&frames, &embeddings),
        bank_id: reference.bank.0,
    })
}
