//! Every refused request, counted and logged once (issue #13 item 4).
//!
//! A request can be refused in three places: the API-key interceptor (UNAUTHENTICATED), tonic
//! itself (a message over the size limit, OUT_OF_RANGE; a unary message that does not decode,
//! INVALID_ARGUMENT through [`crate::pb::codec`]) and the handlers ([`super::status`]). Only the
//! last passes through our code, so the count is taken where all three meet: [`RejectionLayer`]
//! wraps the whole gRPC server and reads the status of every response, from its headers (a
//! trailers-only answer: every unary refusal) or from its trailers (a stream that ends refused).
//! Each refusal adds one to `framematch.rpc.rejected{method, reason}` and is logged once at info,
//! with the peer's address, the method, the code and the message; messages never carry the
//! presented key (the interceptor's are fixed texts).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Status};

use crate::auth;
use crate::pb::codec;
use crate::telemetry::{Metrics, Rpc, code_name};

/// Why a request was refused, as the `reason` label says it; `None` when the status is not a
/// refusal (success, a server fault, NOT_FOUND and other answers about the data).
pub fn reason(status: &Status) -> Option<&'static str> {
    let message = status.message();
    Some(match status.code() {
        Code::Unauthenticated if message == auth::MISSING_KEY => "missing_key",
        Code::Unauthenticated if message == auth::UNKNOWN_KEY => "unknown_key",
        Code::Unauthenticated => "malformed_key",
        Code::InvalidArgument if message.starts_with(codec::MALFORMED) => "malformed_message",
        Code::InvalidArgument if message.starts_with(codec::INVALID_UTF8) => "invalid_utf8",
        Code::InvalidArgument => "invalid_argument",
        Code::OutOfRange => "message_too_large",
        Code::ResourceExhausted => "resource_exhausted",
        Code::PermissionDenied => "permission_denied",
        Code::FailedPrecondition => "failed_precondition",
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::NotFound
        | Code::AlreadyExists
        | Code::Aborted
        | Code::Unimplemented
        | Code::Internal
        | Code::Unavailable
        | Code::DataLoss => return None,
    })
}

/// The tower layer in front of every service (see the module docs).
#[derive(Clone, Debug)]
pub struct RejectionLayer {
    metrics: Metrics,
}

impl RejectionLayer {
    /// Counts into `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> tower_layer::Layer<S> for RejectionLayer {
    type Service = Rejections<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Rejections {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// [`RejectionLayer`]'s service.
#[derive(Clone, Debug)]
pub struct Rejections<S> {
    inner: S,
    metrics: Metrics,
}

/// What a refusal is counted and logged with.
#[derive(Debug)]
struct Seen {
    method: &'static str,
    peer: Option<SocketAddr>,
    metrics: Metrics,
}

impl Seen {
    fn record(&self, status: &Status) {
        if let Some(reason) = reason(status) {
            self.metrics.rejected(self.method, reason);
            tracing::info!(
                peer = self.peer.map(tracing::field::display),
                method = self.method,
                code = code_name(status.code()),
                reason,
                message = status.message(),
                "request rejected"
            );
        }
    }
}

fn peer_of<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

impl<S, ReqBody, ResBody> tonic::codegen::Service<http::Request<ReqBody>> for Rejections<S>
where
    S: tonic::codegen::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Watched<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let seen = Seen {
            method: Rpc::from_path(request.uri().path()).map_or("unknown", Rpc::method),
            peer: peer_of(&request),
            metrics: self.metrics.clone(),
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let (parts, body) = response.await?.into_parts();
            // A trailers-only answer carries its status in the headers; otherwise it comes in
            // the trailers, if the body gets that far.
            let seen = match Status::from_header_map(&parts.headers) {
                Some(status) => {
                    seen.record(&status);
                    None
                }
                None => Some(seen),
            };
            Ok(http::Response::from_parts(
                parts,
                Watched {
                    body: Box::pin(body),
                    seen,
                },
            ))
        })
    }
}

/// A response body whose trailers are read for the status on their way out.
pub struct Watched<B> {
    body: Pin<Box<B>>,
    seen: Option<Seen>,
}

impl<B> std::fmt::Debug for Watched<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched").finish_non_exhaustive()
    }
}

impl<B: http_body::Body> http_body::Body for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = this.body.as_mut().poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
            && let Some(seen) = this.seen.take()
            && let Some(status) = Status::from_header_map(trailers)
        {
            seen.record(&status);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_have_a_reason_and_answers_none() {
        let cases = [
            (
                Status::unauthenticated(auth::MISSING_KEY),
                Some("missing_key"),
            ),
            (
                Status::unauthenticated(auth::UNKNOWN_KEY),
                Some("unknown_key"),
            ),
            (
                Status::unauthenticated("invalid API key"),
                Some("malformed_key"),
            ),
            (
                Status::invalid_argument(format!("{}: x", codec::MALFORMED)),
                Some("malformed_message"),
            ),
            (
                Status::invalid_argument(format!("{}: x", codec::INVALID_UTF8)),
                Some("invalid_utf8"),
            ),
            (
                Status::invalid_argument("missing frame"),
                Some("invalid_argument"),
            ),
            (Status::out_of_range("too large"), Some("message_too_large")),
            (
                Status::resource_exhausted("full"),
                Some("resource_exhausted"),
            ),
            (Status::not_found("bank"), None),
            (Status::internal("bug"), None),
            (Status::ok(""), None),
        ];
        for (status, expected) in cases {
            assert_eq!(reason(&status), expected, "{status:?}");
        }
    }
}
