//! `framematch.v1.Matcher`: the read path.
//!
//! `MatchVideo` follows tonic's bidirectional pattern: the handler spawns one task per stream that
//! reads the inbound messages in order and sends answers into a small bounded channel, which the
//! handler returns as the response stream. The bound gives backpressure: a client that stops
//! reading stops the task. A failed send means the client left, so the task stops quietly. Each
//! frame is answered before the next one is read, so answers come in the order frames were sent.
//!
//! Telemetry: each RPC runs in its span (`AppState::rpc_call`); a MatchVideo span covers the
//! stream task's whole life and is closed with the status that ended it.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{self, Caller};
use futures_util::future::{self, BoxFuture, FutureExt as _};
use futures_util::stream::{FuturesOrdered, StreamExt as _};

use crate::matching::{FrameHit, MatchParams, QueryFrame, Session};
use crate::pb;
use crate::pb::matcher_server::Matcher;
use crate::telemetry::Rpc;

use super::convert::{self, FrameInput};
use super::{AppState, BankFilter, Error, embedding};

/// Answers in flight per stream before the task waits for the client to read.
const RESPONSE_BUFFER: usize = 16;

/// The Matcher service.
#[derive(Clone)]
pub struct MatcherService {
    state: AppState,
}

impl MatcherService {
    /// A service over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

type ResponseTx = mpsc::Sender<Result<pb::MatchResponse, Status>>;

/// One frame's signals and hits, or why it could not be matched.
type Matched = Result<(QueryFrame, Vec<FrameHit>), Status>;

#[tonic::async_trait]
impl Matcher for MatcherService {
    type MatchVideoStream = ReceiverStream<Result<pb::MatchResponse, Status>>;

    async fn match_video(
        &self,
        request: Request<Streaming<pb::MatchRequest>>,
    ) -> Result<Response<Self::MatchVideoStream>, Status> {
        let caller = auth::caller_of(&request)?;
        let call = self
            .state
            .rpc_call(Rpc::MatchVideo, &caller, request.metadata());
        let opened = call.span().in_scope(|| -> Result<_, Status> {
            self.state.ensure_ready()?;
            Arc::clone(&self.state.streams)
                .try_acquire_owned()
                .map_err(|_| {
                    Error::Busy {
                        what: "concurrent MatchVideo streams",
                        limit: self.state.limits.max_concurrent_streams,
                    }
                    .into()
                })
        });
        let permit = match opened {
            Ok(permit) => permit,
            Err(status) => {
                call.finish(Err(status.code()));
                return Err(status);
            }
        };
        let mut inbound = request.into_inner();
        let state = self.state.clone();
        let stream = self.state.spawn_stream(
            call,
            RESPONSE_BUFFER,
            "the server is shutting down and the grace period for open streams is over; retry on another replica",
            move |tx| async move {
                // Held for the stream's life: counts towards max_concurrent_streams.
                let _permit = permit;
                // The stream stops counting as open before the client can see its end.
                let _open = state.metrics.stream_opened(Rpc::MatchVideo);
                run_stream(&state, &caller, &mut inbound, &tx).await
            },
        );
        Ok(Response::new(stream))
    }

    async fn match_image(
        &self,
        request: Request<pb::MatchImageRequest>,
    ) -> Result<Response<pb::MatchImageResponse>, Status> {
        let caller = auth::caller_of(&request)?;
        let call = self
            .state
            .rpc_call(Rpc::MatchImage, &caller, request.metadata());
        call.run(async {
            self.state.ensure_ready()?;
            let pb::MatchImageRequest { options, frame } = request.into_inner();
            let (mut params, banks) = convert::match_params(options, &self.state.match_defaults)?;
            let filter = Arc::new(self.state.bank_filter(&caller, &banks)?);
            params.spaces = embedding::space_scopes(&self.state.catalog.read(), &filter);
            let frame = frame.ok_or(Error::MissingField { field: "frame" })?;
            let input = FrameInput::try_from_pb(frame, &self.state.limits)?;
            let params = Arc::new(params);
            let (query, hits) = self
                .state
                .match_frame(input, &params, &filter, true)
                .await?;
            let result = {
                let catalog = self.state.catalog.read();
                convert::frame_result_to_pb(&catalog, &query, &hits, &params)
            };
            Ok(Response::new(pb::MatchImageResponse {
                result: Some(result),
            }))
        })
        .await
    }
}

/// Opens the stream's session on its first message, and validates one message's frame.
fn accept_frame(
    state: &AppState,
    caller: &Caller,
    stream: &mut Option<(Session, Arc<MatchParams>, Arc<BankFilter>)>,
    message: pb::MatchRequest,
) -> Result<(FrameInput, Arc<MatchParams>, Arc<BankFilter>), Status> {
    let pb::MatchRequest { options, frame } = message;
    let (_, params, filter) = match stream {
        Some(open) => {
            if options.is_some() {
                return Err(Error::Protocol(
                    "options are only read from the first message of a stream",
                )
                .into());
            }
            open
        }
        None => {
            let (mut params, banks) = convert::match_params(options, &state.match_defaults)?;
            let filter = state.bank_filter(caller, &banks)?;
            params.spaces = embedding::space_scopes(&state.catalog.read(), &filter);
            let params = Arc::new(params);
            stream.insert((Session::new((*params).clone()), params, Arc::new(filter)))
        }
    };
    let frame = frame.ok_or(Error::MissingField { field: "frame" })?;
    let input = FrameInput::try_from_pb(frame, &state.limits)?;
    Ok((input, Arc::clone(params), Arc::clone(filter)))
}

/// Records one matched frame in the session and sends its result and any verdict it changed.
/// Returns false when the client has gone.
async fn answer_frame(
    state: &AppState,
    session: &mut Session,
    params: &MatchParams,
    query: &QueryFrame,
    hits: &[FrameHit],
    tx: &ResponseTx,
) -> bool {
    let changed = {
        let index = state.index.read();
        session.record(query, hits, &|reference| {
            index.reference_frame_count(reference, params.min_quality)
        })
    };
    let mut responses = Vec::with_capacity(1 + changed.len());
    {
        let catalog = state.catalog.read();
        responses.push(pb::MatchResponse {
            result: Some(pb::match_response::Result::Frame(
                convert::frame_result_to_pb(&catalog, query, hits, params),
            )),
        });
        // Verdicts as soon as they are known (issue #3): the upload service may stop early.
        responses.extend(changed.iter().map(|v| pb::MatchResponse {
            result: Some(pb::match_response::Result::Verdict(convert::verdict_to_pb(
                &catalog, v,
            ))),
        }));
    }
    for response in responses {
        if tx.send(Ok(response)).await.is_err() {
            return false;
        }
    }
    true
}

/// Reads one upload's frames, answers each, then sends the verdicts and the summary.
///
/// Returns `Ok` when the stream ended normally or the client left; an error ends the stream with
/// that status.
async fn run_stream(
    state: &AppState,
    caller: &Caller,
    inbound: &mut Streaming<pb::MatchRequest>,
    tx: &ResponseTx,
) -> Result<(), Status> {
    let mut stream: Option<(Session, Arc<MatchParams>, Arc<BankFilter>)> = None;
    let mut received: u32 = 0;
    // Frames are hashed and searched concurrently, up to `stream_pipeline` at a time, and answered
    // (and recorded in the session) strictly in the order they arrived. An invalid frame becomes
    // an error in that same order, so every frame before it is still answered.
    let mut in_flight: FuturesOrdered<BoxFuture<'static, Matched>> = FuturesOrdered::new();
    let mut inbound_open = true;
    let mut sampler = embedding::EmbedSampler::new(state.embed_interval_ms);
    loop {
        tokio::select! {
            biased;
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let (query, hits) = done?;
                let Some((session, params, _)) = stream.as_mut() else {
                    return Err(Status::internal("a frame was matched before the stream opened"));
                };
                if !answer_frame(state, session, params, &query, &hits, tx).await {
                    return Ok(());
                }
            }
            message = inbound.message(), if inbound_open && in_flight.len() < state.stream_pipeline => {
                let Some(message) = message? else {
                    inbound_open = false;
                    continue;
                };
                received = received.saturating_add(1);
                if received > state.limits.max_frames_per_stream {
                    let over = Error::OverLimit {
                        what: "MatchVideo stream",
                        actual: u64::from(received),
                        limit: u64::from(state.limits.max_frames_per_stream),
                        unit: "frames",
                    };
                    in_flight.push_back(future::ready(Err(over.into())).boxed());
                    inbound_open = false;
                    continue;
                }
                match accept_frame(state, caller, &mut stream, message) {
                    Ok((input, params, filter)) => {
                        let state = state.clone();
                        // Only frames with pixels can be embedded; they alone use up the interval.
                        let embed = input.content.has_pixels()
                            && sampler.due(input.timestamp_ms);
                        in_flight.push_back(
                            async move {
                                state
                                    .match_frame(input, &params, &filter, embed)
                                    .await
                                    .map_err(Status::from)
                            }
                            .boxed(),
                        );
                    }
                    Err(status) => {
                        in_flight.push_back(future::ready(Err(status)).boxed());
                        inbound_open = false;
                    }
                }
            }
            else => break,
        }
    }

    let session = match stream {
        Some((session, _, _)) => session,
        None => Session::new((*state.match_defaults).clone()),
    };
    let verdicts = {
        let index = state.index.read();
        session.finish(&|reference| {
            index
                .reference_frame_count(reference, session.params().min_quality)
                .is_some()
        })
    };
    let mut responses: Vec<pb::MatchResponse> = {
        let catalog = state.catalog.read();
        verdicts
            .iter()
            .map(|v| pb::MatchResponse {
                result: Some(pb::match_response::Result::Verdict(convert::verdict_to_pb(
                    &catalog, v,
                ))),
            })
            .collect()
    };
    let summary = session.summary();
    responses.push(pb::MatchResponse {
        result: Some(pb::match_response::Result::Summary(pb::StreamSummary {
            frames_received: summary.frames_received,
            frames_low_quality: summary.frames_low_quality,
            frames_matched: summary.frames_matched,
            distinct_frames: summary.distinct_frames,
            references_matched: u32::try_from(verdicts.iter().filter(|v| v.is_match).count())
                .unwrap_or(u32::MAX),
        })),
    });
    for response in responses {
        if tx.send(Ok(response)).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}
