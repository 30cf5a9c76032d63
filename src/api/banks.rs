//! `framematch.v1.Banks`: the write path.
//!
//! Order of every write (DESIGN.md §3): validate, commit to the store together with its change
//! entry (durable before acknowledged), apply to the in-memory index, acknowledge. A failure before
//! the commit leaves nothing behind; the index is only touched after the commit succeeded.
//!
//! Telemetry: each RPC runs in its span (`AppState::rpc_call`); store writes are timed into
//! `framematch.store.write.duration`.

use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::auth::{self, Caller};
use crate::model::{FrameEmbedding, FrameSignal, NewReference, Reference, ReferenceId, Role};
use crate::pb;
use crate::pb::banks_server::Banks;
use crate::store::NewBank;
use crate::telemetry::Rpc;

use super::convert::{self, FrameInput};
use super::{AppState, Error};

/// Longest external id accepted, in bytes.
pub const MAX_EXTERNAL_ID_BYTES: usize = 256;
/// Longest note or withdrawal reason accepted, in bytes.
pub const MAX_NOTE_BYTES: usize = 4096;
/// Exported references in flight per ExportBank stream before the task waits for the client to
/// read. With one reference's frames read from the store at a time, this bounds the memory an
/// export holds, whatever the bank's size.
const EXPORT_BUFFER: usize = 4;

/// The Banks service.
#[derive(Clone)]
pub struct BanksService {
    state: AppState,
}

impl BanksService {
    /// A service over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    /// A reference by id, if the caller may see its bank; NOT_FOUND otherwise, exactly as for an
    /// id that does not exist.
    async fn visible_reference(&self, caller: &Caller, id: i64) -> Result<Reference, Error> {
        let reference = match self.state.store.get_reference(ReferenceId(id)).await {
            Ok(reference) => reference,
            Err(crate::store::Error::NotFound { .. }) => {
                return Err(Error::UnknownReference { id });
            }
            Err(other) => return Err(other.into()),
        };
        let catalog = self.state.catalog.read();
        match catalog.bank(reference.bank) {
            Some(bank) if caller.can_see(bank) => Ok(reference),
            _ => Err(Error::UnknownReference { id }),
        }
    }
}

fn check_text(field: &'static str, text: &str, limit: usize) -> Result<(), Error> {
    if text.len() > limit {
        return Err(Error::OverLimit {
            what: field,
            actual: text.len() as u64,
            limit: limit as u64,
            unit: "bytes",
        });
    }
    Ok(())
}

#[tonic::async_trait]
impl Banks for BanksService {
    type ExportBankStream = ReceiverStream<Result<pb::ExportedReference, Status>>;

    async fn create_bank(
        &self,
        request: Request<pb::CreateBankRequest>,
    ) -> Result<Response<pb::Bank>, Status> {
        let caller = auth::caller_of(&request)?;
        let call = self
            .state
            .rpc_call(Rpc::CreateBank, &caller, request.metadata());
        call.run(async {
            self.state.ensure_ready()?;
            caller.require(Role::Contributor).map_err(Error::from)?;
            let pb::CreateBankRequest {
                name,
                category,
                description,
                visibility,
                shared_with,
                owner,
                embedding_spaces,
            } = request.into_inner();
            let category = convert::category_from_pb(category)?;
            let embedding_spaces = embedding_spaces
                .into_iter()
                .map(|space| {
                    let model = self
                        .state
                        .models
                        .iter()
                        .find(|m| m.name() == space.name)
                        .map(|m| (m.dimension(), m.metric()));
                    convert::embedding_space_from_pb(space, model, self.state.space_defaults)
                })
                .collect::<Result<Vec<_>, _>>()?;
            check_text("description", &description, MAX_NOTE_BYTES)?;
            let (visibility, owner) = {
                let catalog = self.state.catalog.read();
                let visibility =
                    convert::visibility_from_pb(&catalog, visibility, &shared_with, true)?;
                let owner = if owner.is_empty() {
                    caller.org
                } else {
                    caller.require(Role::Admin).map_err(Error::from)?;
                    catalog
                        .org_id(&owner)
                        .ok_or(Error::UnknownOrg { name: owner })?
                };
                (visibility, owner)
            };
            let started = Instant::now();
            let created = self
                .state
                .store
                .create_bank(
                    NewBank {
                        name,
                        category,
                        owner,
                        visibility,
                        description,
                        embedding_spaces,
                    },
                    caller.actor(),
                )
                .await;
            self.state
                .metrics
                .store_write("create_bank", started.elapsed());
            let bank = created.map_err(Error::from)?;
            self.state.ensure_spaces(&bank);
            self.state.note_change();
            let mut catalog = self.state.catalog.write();
            catalog.insert_bank(bank.clone());
            Ok(Response::new(convert::bank_to_pb(&catalog, &bank, true)))
        })
        .await
    }

    async fn list_banks(
        &self,
        request: Request<pb::ListBanksRequest>,
    ) -> Result<Response<pb::ListBanksResponse>, Status> {
        let caller = auth::caller_of(&request)?;
        let call = self
            .state
            .rpc_call(Rpc::ListBanks, &caller, request.metadata());
        call.run(async {
            self.state.ensure_ready()?;
            let banks = self.state.store.list_banks().await.map_err(Error::from)?;
            let catalog = self.state.catalog.read();
            Ok(Response::new(pb::ListBanksResponse {
                banks: banks
                    .iter()
                    .filter(|bank| caller.can_see(bank))
                    .map(|bank| {
                        convert::bank_to_pb(&catalog, bank, caller.may_change(bank).is_ok())
                    })
                    .collect(),
            }))
        })
        .await
    }

    async fn update_bank(
        &self,
        request: Request<pb::UpdateBankRequest>,
    ) -> Result<Response<pb::Bank>, Status> {
        let caller = auth::caller_of(&request)?;
        let call = self
            .state
            .rpc_call(Rpc::UpdateBank, &caller, request.metadata());
        call.run(async {
            self.state.ensure_ready()?;
            let pb::UpdateBankRequest {
                bank,
                visibility,
                shared_with,
            } = request.into_inner();
            let (bank_id, visibility) = {
                let catalog = self.state.catalog.read();
                let bank = catalog.visible_bank(&caller, &bank)?;
                caller.may_change(bank).map_err(Error::from)?;
                let visibility =
                    convert::visibility_from_pb(&catalog, visibility, &shared_with, false)?;
                (bank.id, visibility)
            };
            let started = Instant::now();
            let updated = self
                .state
                .store
                .update_bank_visibility(bank_id, visibility, caller.actor())
                .await;
            self.state
                .metrics
                .store_write("update_bank", started.elapsed());
            let bank = updated.map_err(Error::from)?;
            self.state.note_change();
            let mut catalog = self.state.catalog.write();
            catalog.insert_bank(bank.clone());
            Ok(Response::new(convert::bank_to_pb(&catalog, &bank, true)))
        })
        .await
    }

    async fn add_reference(
        &self,
        request: Request<Streaming<pb::AddReferenceRequest>>,
    ) -> Result<Response<pb::AddReferenceResponse>, Status> {
        let caller = auth::caller_of(&request)?;
        let call = self
            .state
            .rpc_call(Rpc::AddReference, &caller, request.metadata());
        call.run(async {
            self.state.ensure_ready()?;
            let _open = self.state.metrics.stream_opened(Rpc::AddReference);
            let mut inbound = request.into_inner();
            let header = match inbound.message().await? {
                Some(pb::AddReferenceRequest {
                    item: Some(pb::add_reference_request::Item::Header(header)),
                }) => header,
                Some(_) => {
                    return Err(Error::Protocol(
                        "the first AddReference message must be the header (bank, external_id, note)",
                    )
                    .into());
                }
                None => return Err(Error::MissingField { field: "header" }.into()),
            };
            let pb::ReferenceHeader {
                bank,
                external_id,
                note,
            } = header;
            check_text("external_id", &external_id, MAX_EXTERNAL_ID_BYTES)?;
            check_text("note", &note, MAX_NOTE_BYTES)?;
            let (bank_id, spaces) = {
                let catalog = self.state.catalog.read();
                let bank = catalog.visible_bank(&caller, &bank)?;
                caller.may_change(bank).map_err(Error::from)?;
                (bank.id, bank.embedding_spaces.clone())
            };
            // The bank's spaces the server computes vectors of itself, for frames with pixels.
            let models = self.state.models_for(&spaces);

            let mut frames: Vec<FrameSignal> = Vec::new();
            let mut embeddings: Vec<FrameEmbedding> = Vec::new();
            let mut received: u32 = 0;
            while let Some(message) = inbound.message().await? {
                let frame = match message.item {
                    Some(pb::add_reference_request::Item::Frame(frame)) => frame,
                    Some(pb::add_reference_request::Item::Header(_)) => {
                        return Err(Error::Protocol("only the first message may be a header").into());
                    }
                    None => return Err(Error::MissingField { field: "item" }.into()),
                };
                received = received.saturating_add(1);
                if received > self.state.limits.max_frames_per_stream {
                    return Err(Error::OverLimit {
                        what: "AddReference stream",
                        actual: u64::from(received),
                        limit: u64::from(self.state.limits.max_frames_per_stream),
                        unit: "frames",
                    }
                    .into());
                }
                let mut input = FrameInput::try_from_pb(frame, &self.state.limits)?;
                let sent = std::mem::take(&mut input.embeddings);
                convert::reference_embeddings(&sent, &spaces)?;
                // A space the client sent a vector of is not computed again.
                let wanted: Vec<_> = models
                    .iter()
                    .filter(|m| !sent.iter().any(|e| e.space == m.name()))
                    .cloned()
                    .collect();
                let query = self.state.frame_signal(input, false, wanted).await?;
                embeddings.extend(sent);
                embeddings.extend(query.embeddings.iter().map(|v| FrameEmbedding {
                    frame_index: query.signal.frame_index,
                    timestamp_ms: query.signal.timestamp_ms,
                    space: v.space.to_string(),
                    vector: v.vector.clone(),
                }));
                if !query.has_pdq {
                    continue;
                }
                frames.push(query.signal);
                // A frame with uniform borders is also stored by its content area's hash, under the
                // same frame index, so uploads without the bars match it (issue #3).
                if let Some(content) = query.content {
                    frames.push(FrameSignal {
                        hash: content.hash,
                        quality: content.quality,
                        ..query.signal
                    });
                }
            }
            if frames.is_empty() && embeddings.is_empty() {
                return Err(Error::MissingField {
                    field: "frames (a reference needs at least one frame)",
                }
                .into());
            }

            // Durable before acknowledged: the store commits the reference, its frames and its change
            // entry in one transaction; only then does the index learn of it.
            let started = Instant::now();
            let added = self
                .state
                .store
                .add_reference(
                    NewReference {
                        bank: bank_id,
                        external_id,
                        note,
                        added_by: caller.org,
                        frames,
                        embeddings,
                    },
                    caller.actor(),
                )
                .await;
            self.state
                .metrics
                .store_write("add_reference", started.elapsed());
            let reference = added.map_err(Error::from)?;
            let stored = self
                .state
                .store
                .reference_frames(reference.id)
                .await
                .map_err(Error::from)?;
            // As stored: normalised and rounded to f16, exactly what a restart loads.
            let stored_vectors = self
                .state
                .store
                .reference_embeddings(reference.id)
                .await
                .map_err(Error::from)?;
            let min_quality = self.state.match_defaults.min_quality;
            let low_quality = stored.iter().filter(|f| f.quality < min_quality).count();
            self.state
                .index
                .insert_reference(reference.id, bank_id, &stored, &stored_vectors);
            self.state.note_change();
            let catalog = self.state.catalog.read();
            Ok(Response::new(pb::AddReferenceResponse {
                reference: Some(convert::reference_to_pb(&catalog, &reference)),
                frames_received: received,
                frames_stored: u32::try_from(stored.len()).unwrap_or(u32::MAX),
                frames_low_quality: u32::try_from(low_quality).unwrap_or(u32::MAX),
            }))
        })
        .await
    }

    async fn withdraw_reference(
        &self,
        request: Request<pb::WithdrawReferenceRequest>,
    ) -> Result<Response<pb::Reference>, Status> {
        let caller = auth::caller_of(&request)?;
        let call = self
            .state
            .rpc_call(Rpc::WithdrawReference, &caller, request.metadata());
        call.run(async {
            self.state.ensure_ready()?;
            let pb::WithdrawReferenceRequest {
                reference_id,
                reason,
            } = request.into_inner();
            let existing = self.visible_reference(&caller, reference_id).await?;
            {
                let catalog = self.state.catalog.read();
                if let Some(bank) = catalog.bank(existing.bank) {
                    caller.may_change(bank).map_err(Error::from)?;
                }
            }
            if reason.trim().is_empty() {
                return Err(Error::MissingField {
                    field: "reason (say why the reference is withdrawn)",
                }
                .into());
            }
            check_text("reason", &reason, MAX_NOTE_BYTES)?;
            let id = ReferenceId(reference_id);
            let started = Instant::now();
            let withdrawn = self
                .state
                .store
                .withdraw_reference(id, &reason, caller.actor())
                .await;
            self.state
                .metrics
                .store_write("withdraw_reference", started.elapsed());
            let reference = withdrawn.map_err(Error::from)?;
            self.state.index.withdraw(id);
            self.state.note_change();
            let catalog = self.state.catalog.read();
            Ok(Response::new(convert::reference_to_pb(
                &catalog, &reference,
            )))
        })
        .await
    }

    async fn get_reference(
        &self,
        request: Request<pb::GetReferenceRequest>,
    ) -> Result<Response<pb::Reference>, Status> {
        let caller = auth::caller_of(&request)?;
        let call = self
            .state
            .rpc_call(Rpc::GetReference, &caller, request.metadata());
        call.run(async {
            self.state.ensure_ready()?;
            let pb::GetReferenceRequest {
                reference_id,
                include_embeddings,
            } = request.into_inner();
            // One check for both: the vectors are read only of a reference the caller may see.
            let reference = self.visible_reference(&caller, reference_id).await?;
            let frames = if include_embeddings {
                let embeddings = self
                    .state
                    .store
                    .reference_embeddings(reference.id)
                    .await
                    .map_err(Error::from)?;
                convert::embedding_frames_to_pb(&embeddings)
            } else {
                Vec::new()
            };
            let catalog = self.state.catalog.read();
            Ok(Response::new(pb::Reference {
                frames,
                ..convert::reference_to_pb(&catalog, &reference)
            }))
        })
        .await
    }

    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let caller = auth::caller_of(&request)?;
        let call = self.state.rpc_call(Rpc::Stats, &caller, request.metadata());
        call.run(async {
            self.state.ensure_ready()?;
            let stats = self.state.store.stats().await.map_err(Error::from)?;
            if !caller.is_admin() {
                // Only the banks this caller may see are counted; the server-wide figures
                // (index, streams) would reveal how much other organisations hold and do.
                let counts = self.state.store.bank_counts().await.map_err(Error::from)?;
                let engine = self.state.index.read().pdq().engine_name();
                let catalog = self.state.catalog.read();
                let visible = |id| catalog.bank(id).is_some_and(|bank| caller.can_see(bank));
                let mut response = pb::StatsResponse {
                    banks: catalog.banks().filter(|bank| caller.can_see(bank)).count() as u64,
                    index_engine: engine.to_string(),
                    last_change_seq: stats.last_seq.0,
                    ..pb::StatsResponse::default()
                };
                for (_, bank) in counts.iter().filter(|(id, _)| visible(*id)) {
                    response.active_references += bank.active_references;
                    response.withdrawn_references += bank.withdrawn_references;
                    response.stored_frames += bank.frames;
                }
                return Ok(Response::new(response));
            }
            let (indexed, tombstones, engine, memory) = {
                let index = self.state.index.read();
                (
                    index.pdq().live_frames(),
                    index.pdq().tombstones(),
                    index.pdq().engine_name(),
                    index.memory_bytes(),
                )
            };
            Ok(Response::new(pb::StatsResponse {
                banks: stats.banks,
                active_references: stats.active_references,
                withdrawn_references: stats.withdrawn_references,
                stored_frames: stats.frames,
                indexed_frames: indexed as u64,
                index_tombstones: tombstones as u64,
                index_engine: engine.to_string(),
                index_memory_bytes: memory as u64,
                last_change_seq: stats.last_seq.0,
                open_streams: self.state.open_streams() as u64,
            }))
        })
        .await
    }

    async fn export_bank(
        &self,
        request: Request<pb::ExportBankRequest>,
    ) -> Result<Response<Self::ExportBankStream>, Status> {
        let caller = auth::caller_of(&request)?;
        let call = self
            .state
            .rpc_call(Rpc::ExportBank, &caller, request.metadata());
        let span = call.span().clone();
        let opened = async {
            self.state.ensure_ready()?;
            let pb::ExportBankRequest {
                bank,
                include_withdrawn,
            } = request.into_inner();
            // Any role may export a bank it may see (it could follow the same bank's changes);
            // one it may not see is NOT_FOUND, like one that does not exist.
            let bank_id = self.state.catalog.read().visible_bank(&caller, &bank)?.id;
            self.state
                .store
                .list_references(bank_id, include_withdrawn)
                .await
                .map_err(Error::from)
        }
        .instrument(span.clone())
        .await;
        let references = match opened {
            Ok(references) => references,
            Err(error) => {
                let status = Status::from(error);
                call.finish(Err(status.code()));
                return Err(status);
            }
        };
        let state = self.state.clone();
        let stream = self.state.spawn_stream(
            call,
            EXPORT_BUFFER,
            "the server is shutting down and the grace period for open streams is over; retry on another replica",
            move |tx| async move {
                let _open = state.metrics.stream_opened(Rpc::ExportBank);
                export_references(&state, references, &tx).await
            },
        );
        Ok(Response::new(stream))
    }
}

/// Sends each reference with its stored frames, reading one reference's frames at a time. A
/// failed send means the client left: the export stops quietly.
async fn export_references(
    state: &AppState,
    references: Vec<Reference>,
    tx: &mpsc::Sender<Result<pb::ExportedReference, Status>>,
) -> Result<(), Status> {
    for reference in references {
        let frames = state
            .store
            .reference_frames(reference.id)
            .await
            .map_err(Error::from)?;
        let embeddings = state
            .store
            .reference_embeddings(reference.id)
            .await
            .map_err(Error::from)?;
        let exported = {
            let catalog = state.catalog.read();
            pb::ExportedReference {
                reference: Some(convert::reference_to_pb(&catalog, &reference)),
                frames: convert::stored_frames_to_pb(&frames, &embeddings),
            }
        };
        if tx.send(Ok(exported)).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}
