//! Telemetry (issue #5 item 1): the Prometheus endpoint of a real server after real traffic, the
//! binary's `metrics on ADDR` line, and spans and metrics received over OTLP/gRPC by a small
//! collector running in the test.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;

use framematch::hash::PdqHash;
use framematch::pb;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tonic::Code;

use crate::support::{self, TestServer};

const BIN: &str = env!("CARGO_BIN_EXE_framematch");

// --- Prometheus text ------------------------------------------------------------------------

/// One sample of the Prometheus text format: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the sample lines of a scrape (our label values never hold commas or quotes).
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').expect("labels close");
                    let labels = inner
                        .split(',')
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (key, value) = pair.split_once('=').expect("label pair");
                            (key.to_string(), value.trim_matches('"').to_string())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            Sample {
                name: name.to_string(),
                labels,
                value: value.parse().expect("sample value"),
            }
        })
        .collect()
}

/// The value of the one series named `name` whose labels include `labels`, or `None` if absent.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<f64> = samples(text)
        .into_iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    assert!(
        found.len() <= 1,
        "{name}{labels:?} matches {} series:\n{text}",
        found.len()
    );
    found.first().copied()
}

/// Like [`value`], with a missing series counting as 0 (counters appear on first use).
fn count(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(text, name, labels).unwrap_or(0.0)
}

// --- traffic --------------------------------------------------------------------------------

fn hash(seed: u64) -> PdqHash {
    PdqHash::from_words([
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        seed.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) ^ 0x5555_5555_5555_5555,
        seed.wrapping_mul(0x1656_67B1_9E37_79F9),
        !seed.wrapping_mul(0x27D4_EB2F_1656_67C5),
    ])
}

/// The bitwise complement: 256 bits away, never a match.
fn far_from(h: &PdqHash) -> PdqHash {
    let [a, b, c, d] = h.words();
    PdqHash::from_words([!a, !b, !c, !d])
}

/// A 96x96 PNG with some structure, for a frame the server has to hash.
fn png() -> Vec<u8> {
    let picture = image::RgbImage::from_fn(96, 96, |x, y| {
        let v = if (x / 12 + y / 16) % 2 == 0 { 230 } else { 20 };
        image::Rgb([v, (x * 2) as u8, (y * 2) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(picture)
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encode png");
    out.into_inner()
}

fn video_request(frame: pb::Frame) -> pb::MatchRequest {
    pb::MatchRequest {
        options: None,
        frame: Some(frame),
    }
}

/// Where each frame's answer says it ended, as the metrics label it.
fn outcome(result: &pb::FrameResult) -> &'static str {
    if result.low_quality {
        "low_quality"
    } else if result.matches.is_empty() {
        "unmatched"
    } else {
        "matched"
    }
}

/// A bank, a two-frame reference, MatchImage on a hash and on a picture, a three-frame MatchVideo
/// (matched, unmatched, low quality) and a MatchImage on an unknown bank. Returns the outcome
/// of each answered frame.
async fn traffic(server: &TestServer) -> Vec<&'static str> {
    let (a, b) = (hash(1), hash(2));
    support::create_bank(server, "violent").await;
    let added = support::add_reference(
        server,
        "violent",
        vec![
            support::pdq_frame(0, 0, &a, 100),
            support::pdq_frame(1, 1000, &b, 100),
        ],
    )
    .await
    .expect("add reference");
    assert_eq!(added.frames_stored, 2);

    let mut outcomes = Vec::new();
    let by_hash = support::match_image(server, support::pdq_frame(0, 0, &a, 100), None)
        .await
        .expect("match a hash");
    assert_eq!(outcome(&by_hash), "matched");
    outcomes.push(outcome(&by_hash));
    let by_picture = support::match_image(server, support::image_frame(png()), None)
        .await
        .expect("match a picture");
    outcomes.push(outcome(&by_picture));

    let answers = support::match_video(
        server,
        vec![
            video_request(support::pdq_frame(0, 0, &a, 100)),
            video_request(support::pdq_frame(1, 40, &far_from(&a), 100)),
            video_request(support::pdq_frame(2, 80, &b, 10)),
        ],
    )
    .await
    .expect("match video");
    let frames: Vec<&pb::FrameResult> = answers
        .iter()
        .filter_map(|answer| match &answer.result {
            Some(pb::match_response::Result::Frame(frame)) => Some(frame),
            _ => None,
        })
        .collect();
    let video: Vec<&'static str> = frames.iter().map(|f| outcome(f)).collect();
    assert_eq!(video, ["matched", "unmatched", "low_quality"]);
    outcomes.extend(video);

    let unknown = support::match_image(
        server,
        support::pdq_frame(0, 0, &a, 100),
        Some(pb::MatchOptions {
            banks: vec!["no-such-bank".into()],
            ..Default::default()
        }),
    )
    .await
    .expect_err("unknown bank");
    assert_eq!(unknown.code(), Code::NotFound);
    outcomes
}

// --- Prometheus endpoint --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_after_traffic_counts_frames_streams_store_writes_and_rpcs() {
    let server = TestServer::start().await;
    let before = server.scrape().await;
    assert_eq!(
        value(&before, "framematch_index_frames", &[("signal", "pdq")]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &before,
            "framematch_replica_lag_seconds",
            &[("store", "embedded")]
        ),
        Some(0.0)
    );
    assert_eq!(count(&before, "framematch_frames_matched_total", &[]), 0.0);

    let outcomes = traffic(&server).await;
    let after = server.scrape().await;

    for label in ["matched", "unmatched", "low_quality"] {
        let expected = outcomes.iter().filter(|o| **o == label).count() as f64;
        assert_eq!(
            count(
                &after,
                "framematch_frames_matched_total",
                &[("outcome", label)]
            ),
            expected,
            "frames {label}"
        );
    }
    let frames = outcomes.len() as f64;
    assert_eq!(frames, 5.0);
    assert_eq!(
        value(&after, "framematch_match_duration_seconds_count", &[]),
        Some(frames)
    );
    assert_eq!(
        value(
            &after,
            "framematch_index_search_duration_seconds_count",
            &[]
        ),
        Some(frames)
    );
    // Only the PNG needed hashing: the other frames came as PDQ hashes.
    assert_eq!(
        value(
            &after,
            "framematch_hash_duration_seconds_count",
            &[("input", "image")]
        ),
        Some(1.0)
    );
    let hash_seconds = value(
        &after,
        "framematch_hash_duration_seconds_sum",
        &[("input", "image")],
    )
    .expect("hash duration sum");
    assert!(hash_seconds > 0.0);
    assert_eq!(
        value(&after, "framematch_index_frames", &[("signal", "pdq")]),
        Some(2.0)
    );
    for rpc in ["MatchVideo", "AddReference"] {
        assert_eq!(
            value(&after, "framematch_streams_open", &[("rpc", rpc)]),
            Some(0.0),
            "{rpc} streams are all closed"
        );
    }
    for operation in ["create_bank", "add_reference"] {
        assert_eq!(
            value(
                &after,
                "framematch_store_write_duration_seconds_count",
                &[("operation", operation)]
            ),
            Some(1.0),
            "store writes of {operation}"
        );
    }
    for (method, code, expected) in [
        ("CreateBank", "OK", 1.0),
        ("AddReference", "OK", 1.0),
        ("MatchImage", "OK", 2.0),
        ("MatchImage", "NOT_FOUND", 1.0),
        ("MatchVideo", "OK", 1.0),
    ] {
        assert_eq!(
            count(
                &after,
                "framematch_rpc_requests_total",
                &[("method", method), ("code", code)]
            ),
            expected,
            "{method} {code}"
        );
    }
    assert_eq!(
        value(
            &after,
            "framematch_rpc_duration_seconds_count",
            &[("method", "MatchImage")]
        ),
        Some(3.0)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_answers_only_metrics() {
    let server = TestServer::start().await;
    let (status, head, body) = support::http_get(server.metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(
        body.contains("# TYPE framematch_index_frames gauge"),
        "{body}"
    );
    let (status, _, _) = support::http_get(server.metrics_addr, "/").await;
    assert_eq!(status, 404);
    server.stop().await;
}

// --- the binary -----------------------------------------------------------------------------

/// A `framematch serve` child on loopback ports, with extra environment for the child only.
struct Child {
    process: tokio::process::Child,
    url: String,
    metrics: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Child {
    /// Starts the binary, reads its two address lines, and waits for SERVING.
    async fn start(env: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut command = tokio::process::Command::new(BIN);
        command
            .env("FRAMEMATCH_BOOTSTRAP_ADMIN_KEY", support::ADMIN_KEY)
            .env("FRAMEMATCH_API_KEY", support::ADMIN_KEY)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut process = command.spawn().expect("spawn framematch serve");
        let mut lines = BufReader::new(process.stdout.take().expect("stdout")).lines();
        let first = lines.next_line().await.expect("read").expect("first line");
        let second = lines.next_line().await.expect("read").expect("second line");
        let address = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first line names the gRPC address: {first:?}"));
        let metrics = second
            .strip_prefix("metrics on ")
            .unwrap_or_else(|| panic!("second line names the metrics address: {second:?}"))
            .parse()
            .expect("metrics address");
        let url = format!("http://{address}");
        support::wait_serving(&url).await;
        Self {
            process,
            url,
            metrics,
            _dir: dir,
        }
    }

    /// SIGTERM, then the exit status.
    async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.process.id().expect("running").to_string();
        let status = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("kill -TERM");
        assert!(status.success());
        self.process.wait().await.expect("wait")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_prints_metrics_address_second_and_serves_it() {
    let child = Child::start(&[]).await;
    let (status, _, body) = support::http_get(child.metrics, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        value(&body, "framematch_index_frames", &[("signal", "pdq")]),
        Some(0.0)
    );
    assert!(!child.url.is_empty());
    assert!(child.terminate().await.success());
}

// --- OTLP -----------------------------------------------------------------------------------

/// An OTLP/gRPC collector that keeps every request it receives.
#[derive(Clone, Default)]
struct Collector {
    traces: Arc<parking_lot::Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<parking_lot::Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.traces.lock().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves on a fresh loopback port until the returned sender is dropped or fired.
    async fn start(&self) -> (SocketAddr, oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind collector");
        let addr = listener.local_addr().expect("collector addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(self.clone()))
            .add_service(MetricsServiceServer::new(self.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            );
        tokio::spawn(server);
        (addr, stop)
    }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn string(value: Option<&any_value::Value>) -> Option<&str> {
    match value {
        Some(any_value::Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

/// The trace and span ids of the client's side in the trace-propagation check.
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_exports_one_span_per_rpc_and_metrics_over_otlp() {
    let collector = Collector::default();
    let (collector_addr, stop_collector) = collector.start().await;
    let child = Child::start(&[
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{collector_addr}"),
        ),
        ("OTEL_SERVICE_NAME", "framematch-under-test".to_string()),
    ])
    .await;
    let a = hash(7);
    let banks = pb::banks_client::BanksClient::new(
        support::connect_as(&child.url, Some(support::ADMIN_KEY)).await,
    );
    let mut matcher = pb::matcher_client::MatcherClient::new(
        support::connect_as(&child.url, Some(support::ADMIN_KEY)).await,
    );
    banks
        .clone()
        .create_bank(pb::CreateBankRequest {
            embedding_spaces: Vec::new(),
            name: "violent".into(),
            category: pb::Category::GraphicViolence as i32,
            description: String::new(),
            ..Default::default()
        })
        .await
        .expect("create bank");
    banks
        .clone()
        .add_reference(tokio_stream::iter(vec![
            pb::AddReferenceRequest {
                item: Some(pb::add_reference_request::Item::Header(
                    pb::ReferenceHeader {
                        bank: "violent".into(),
                        external_id: String::new(),
                        note: "otlp".into(),
                    },
                )),
            },
            pb::AddReferenceRequest {
                item: Some(pb::add_reference_request::Item::Frame(support::pdq_frame(
                    0, 0, &a, 100,
                ))),
            },
        ]))
        .await
        .expect("add reference");
    // The upload service's own trace: the server's span joins it (W3C trace context).
    let mut traced = tonic::Request::new(pb::MatchImageRequest {
        options: None,
        frame: Some(support::pdq_frame(0, 0, &a, 100)),
    });
    traced.metadata_mut().insert(
        "traceparent",
        format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
            .parse()
            .expect("ASCII"),
    );
    matcher.match_image(traced).await.expect("match image");
    let mut answers = matcher
        .match_video(tokio_stream::iter(vec![
            video_request(support::pdq_frame(0, 0, &a, 100)),
            video_request(support::pdq_frame(1, 40, &a, 100)),
        ]))
        .await
        .expect("match video")
        .into_inner();
    while answers.message().await.expect("answer").is_some() {}

    // Shutdown flushes both pipelines before the process exits: no waiting on export intervals.
    assert!(child.terminate().await.success());
    let _ = stop_collector.send(());

    let traces = collector.traces.lock().clone();
    let resource_names: Vec<&str> = traces
        .iter()
        .flat_map(|r| &r.resource_spans)
        .filter_map(|rs| rs.resource.as_ref())
        .filter_map(|r| string(attribute(&r.attributes, "service.name")))
        .collect();
    assert!(!resource_names.is_empty(), "no spans arrived");
    assert!(
        resource_names.iter().all(|n| *n == "framematch-under-test"),
        "{resource_names:?}"
    );
    let spans: Vec<_> = traces
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .collect();
    for (name, streaming) in [
        ("framematch.v1.Banks/CreateBank", false),
        ("framematch.v1.Banks/AddReference", true),
        ("framematch.v1.Matcher/MatchImage", false),
        ("framematch.v1.Matcher/MatchVideo", true),
    ] {
        let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(
            found.len(),
            1,
            "one span for {name}; got {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        let span = found[0];
        assert_eq!(span.kind, SpanKind::Server as i32, "{name} kind");
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        if name.ends_with("MatchImage") {
            assert_eq!(
                hex(&span.trace_id),
                CLIENT_TRACE,
                "joins the client's trace"
            );
            assert_eq!(
                hex(&span.parent_span_id),
                CLIENT_SPAN,
                "child of the client's span"
            );
        } else {
            assert_ne!(
                hex(&span.trace_id),
                CLIENT_TRACE,
                "{name} starts its own trace"
            );
            assert!(span.parent_span_id.is_empty(), "{name} is a root span");
        }
        assert_eq!(
            string(attribute(&span.attributes, "org")),
            Some("local"),
            "{name} org"
        );
        let method = name.rsplit('/').next().expect("method");
        assert_eq!(
            string(attribute(&span.attributes, "rpc.method")),
            Some(method)
        );
        assert_eq!(
            attribute(&span.attributes, "rpc.grpc.status_code"),
            Some(&any_value::Value::IntValue(0)),
            "{name} status"
        );
        let stream_id = string(attribute(&span.attributes, "stream_id"));
        if streaming {
            let id = stream_id.unwrap_or_else(|| panic!("{name} has a stream id"));
            assert!(uuid::Uuid::parse_str(id).is_ok(), "{name} stream id {id:?}");
        } else {
            assert_eq!(stream_id, None, "{name} has no stream id");
        }
    }
    let ids: Vec<&str> = spans
        .iter()
        .filter_map(|s| string(attribute(&s.attributes, "stream_id")))
        .collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1], "each stream has its own id");

    let metrics = collector.metrics.lock().clone();
    let exported: BTreeMap<String, String> = metrics
        .iter()
        .flat_map(|r| &r.resource_metrics)
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
        .map(|m| (m.name.clone(), m.unit.clone()))
        .collect();
    for (name, unit) in [
        ("framematch.frames.matched", "{frame}"),
        ("framematch.match.duration", "s"),
        ("framematch.index.frames", "{frame}"),
        ("framematch.store.write.duration", "s"),
        ("framematch.replica.lag", "s"),
        ("framematch.rpc.requests", "{request}"),
    ] {
        assert_eq!(
            exported.get(name).map(String::as_str),
            Some(unit),
            "{name} exported with its unit; got {exported:?}"
        );
    }
}
