//! Issue #13 item 4 on the real server, with raw bytes over real gRPC: a message that is not
//! protobuf, or carries invalid UTF-8 in a string field, is INVALID_ARGUMENT (not INTERNAL) on
//! unary, client-streaming and bidirectional RPCs alike; every refusal, bad keys included, is
//! counted in `framematch_rpc_rejected_total` by method and reason.

use bytes::{Buf, BufMut};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

use crate::support::{self, ADMIN_KEY, TestServer};

/// Sends whatever bytes it is given as the message, and reads any answer as bytes.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawBytes;

impl Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

/// Not protobuf: a field tag of wire type 7, which does not exist.
const GARBAGE: &[u8] = &[0x0f, 0xff, 0xff, 0xff];
/// Field 1 (a string in CreateOrganisationRequest and CreateBankRequest) holding C3 28, which is
/// not UTF-8.
const BAD_UTF8: &[u8] = &[0x0a, 0x02, 0xc3, 0x28];

async fn grpc(server: &TestServer, key: Option<&str>) -> tonic::client::Grpc<support::Authed> {
    let mut grpc = tonic::client::Grpc::new(server.connect_as(key).await);
    grpc.ready().await.expect("ready");
    grpc
}

async fn unary(
    server: &TestServer,
    key: Option<&str>,
    path: &'static str,
    body: &[u8],
) -> tonic::Status {
    grpc(server, key)
        .await
        .unary(
            tonic::Request::new(body.to_vec()),
            PathAndQuery::from_static(path),
            RawCodec,
        )
        .await
        .expect_err("refused")
}

/// The `framematch_rpc_rejected_total` value for `method` and `reason` (0 when absent).
fn rejected(scrape: &str, method: &str, reason: &str) -> u64 {
    scrape
        .lines()
        .filter(|line| line.starts_with("framematch_rpc_rejected_total{"))
        .filter(|line| {
            line.contains(&format!("method=\"{method}\""))
                && line.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_and_invalid_utf8_are_invalid_argument_and_counted() {
    let server = TestServer::start().await;
    let admin = Some(ADMIN_KEY);

    let status = unary(&server, admin, "/framematch.v1.Matcher/MatchImage", GARBAGE).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("malformed protobuf message"),
        "{status:?}"
    );

    let status = unary(
        &server,
        admin,
        "/framematch.v1.Admin/CreateOrganisation",
        BAD_UTF8,
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("invalid UTF-8 in a string field")
            && status.message().contains("name"),
        "{status:?}"
    );
    let status = unary(&server, admin, "/framematch.v1.Banks/CreateBank", BAD_UTF8).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // Client streaming: the first message is not protobuf.
    let status = grpc(&server, admin)
        .await
        .client_streaming(
            tonic::Request::new(tokio_stream::iter(vec![GARBAGE.to_vec()])),
            PathAndQuery::from_static("/framematch.v1.Banks/AddReference"),
            RawCodec,
        )
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // Bidirectional: the stream ends with the status.
    let answer = grpc(&server, admin)
        .await
        .streaming(
            tonic::Request::new(tokio_stream::iter(vec![GARBAGE.to_vec()])),
            PathAndQuery::from_static("/framematch.v1.Matcher/MatchVideo"),
            RawCodec,
        )
        .await;
    let status = match answer {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("MatchVideo ended without a status"),
                    Err(status) => break status,
                }
            }
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("malformed protobuf message"),
        "{status:?}"
    );

    // Bad keys: none, a malformed header, an unknown key.
    let none = unary(&server, None, "/framematch.v1.Banks/Stats", &[]).await;
    assert_eq!(none.code(), Code::Unauthenticated);
    let mut raw = grpc(&server, None).await;
    let mut request = tonic::Request::new(Vec::new());
    request
        .metadata_mut()
        .insert("authorization", "Basic abc".parse().expect("ascii"));
    let malformed = raw
        .unary(
            request,
            PathAndQuery::from_static("/framematch.v1.Banks/Stats"),
            RawCodec,
        )
        .await
        .expect_err("malformed");
    assert_eq!(malformed.code(), Code::Unauthenticated);
    let unknown_secret = "fmk_0000000000000000000000000000000000000000000000000000000000000000";
    let unknown = unary(
        &server,
        Some(unknown_secret),
        "/framematch.v1.Banks/Stats",
        &[],
    )
    .await;
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert!(!unknown.message().contains(unknown_secret));

    // Still serving, and every refusal counted once by method and reason.
    support::match_image(
        &server,
        support::pdq_frame(0, 0, &framematch::hash::PdqHash::default(), 100),
        None,
    )
    .await
    .expect("still serving");
    let scrape = server.scrape().await;
    for (method, reason) in [
        ("MatchImage", "malformed_message"),
        ("CreateOrganisation", "invalid_utf8"),
        ("CreateBank", "invalid_utf8"),
        ("AddReference", "malformed_message"),
        ("MatchVideo", "malformed_message"),
        ("Stats", "missing_key"),
        ("Stats", "malformed_key"),
        ("Stats", "unknown_key"),
    ] {
        assert_eq!(
            rejected(&scrape, method, reason),
            1,
            "{method} {reason} in\n{}",
            scrape
                .lines()
                .filter(|l| l.starts_with("framematch_rpc_rejected"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // An answer is not a refusal: the successful match counted nothing.
    assert_eq!(rejected(&scrape, "MatchImage", "invalid_argument"), 0);
    server.stop().await;
}
