//! Shared test helpers: locating ../shared/conformance and starting real servers.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;

/// The shared conformance folder beside the project (`../shared/conformance`).
///
/// Returns `None`, after saying so on stderr, when it is absent on a developer machine. Under CI
/// (`CI` set) its absence is a failure: CI always has it beside the clone.
pub fn conformance_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance");
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must have ../shared/conformance beside the clone, and {} is missing",
        dir.display()
    );
    eprintln!(
        "skipping: conformance data not found at {} (it lives in ../shared beside the clone)",
        dir.display()
    );
    None
}

use std::net::SocketAddr;

use framematch::api::ServeConfig;
use framematch::pb;
use framematch::tls::ServerTls;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The bootstrap admin key every test server and every spawned binary is started with
/// (`FRAMEMATCH_BOOTSTRAP_ADMIN_KEY`); test clients send it unless a test chooses another key.
pub const ADMIN_KEY: &str = "fmk_test_admin_0123456789abcdef0123456789abcdef";

/// Sends `authorization: Bearer <key>` on every request.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// A bearer of `key`.
    pub fn new(key: &str) -> Self {
        Self(Some(format!("Bearer {key}").parse().expect("ASCII key")))
    }

    /// Sends no key at all.
    pub fn none() -> Self {
        Self(None)
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel that sends a key.
pub type Authed = InterceptedService<Channel, Bearer>;

/// Connects to `url`, sending `key` (or nothing) on every request.
pub async fn connect_as(url: &str, key: Option<&str>) -> Authed {
    let channel = Channel::from_shared(url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    InterceptedService::new(channel, key.map_or_else(Bearer::none, Bearer::new))
}

/// A real framematch server on a loopback port, in this test's runtime, with its own data dir.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its Prometheus endpoint (`GET /metrics`) listens.
    pub metrics_addr: SocketAddr,
    /// Its data directory (dropped with the server).
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), framematch::server::Error>>>,
    /// How this harness's own clients speak TLS to it, when the server is started with TLS.
    client_tls: Option<ClientTlsConfig>,
}

impl TestServer {
    /// Starts a server with default settings and waits until it reports SERVING.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a server with settings adjusted by `adjust`, and waits until it reports SERVING.
    pub async fn start_with(adjust: impl FnOnce(&mut ServeConfig)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, adjust).await
    }

    /// Starts a server over an existing data directory.
    pub async fn start_in(dir: tempfile::TempDir, adjust: impl FnOnce(&mut ServeConfig)) -> Self {
        Self::launch(dir, adjust, None).await
    }

    /// Starts a server speaking TLS as `server_tls` says; the harness's own clients
    /// ([`TestServer::channel`], health) connect to `https://localhost:PORT` with `client_tls`.
    pub async fn start_tls(server_tls: ServerTls, client_tls: ClientTlsConfig) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::launch(
            dir,
            |config| config.tls = Some(server_tls),
            Some(client_tls),
        )
        .await
    }

    async fn launch(
        dir: tempfile::TempDir,
        adjust: impl FnOnce(&mut ServeConfig),
        client_tls: Option<ClientTlsConfig>,
    ) -> Self {
        let mut config = ServeConfig::with_data_dir(dir.path().to_path_buf());
        config.bootstrap_admin_key = Some(ADMIN_KEY.to_string());
        adjust(&mut config);
        // Bound before the server task starts, so clients can connect at once: no sleeps.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let metrics_listener = tokio::net::TcpListener::bind(config.metrics_listen)
            .await
            .expect("bind metrics");
        let metrics_addr = metrics_listener.local_addr().expect("metrics addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(framematch::server::serve_with_metrics(
            listener,
            metrics_listener,
            config,
            async {
                let _ = stopped.await;
            },
        ));
        let server = Self {
            addr,
            metrics_addr,
            dir,
            stop: Some(stop),
            task: Some(task),
            client_tls,
        };
        wait_serving_on(server.channel().await).await;
        server
    }

    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` with TLS (the name its certificate
    /// is for).
    pub fn url(&self) -> String {
        match self.client_tls {
            None => format!("http://{}", self.addr),
            Some(_) => format!("https://localhost:{}", self.addr.port()),
        }
    }

    /// The Prometheus text its metrics endpoint serves now.
    pub async fn scrape(&self) -> String {
        let (status, _, body) = http_get(self.metrics_addr, "/metrics").await;
        assert_eq!(status, 200, "GET /metrics answered {status}: {body}");
        body
    }

    /// A connected channel (over TLS when the server speaks it).
    pub async fn channel(&self) -> Channel {
        let mut endpoint = Channel::from_shared(self.url()).expect("url");
        if let Some(tls) = &self.client_tls {
            endpoint = endpoint.tls_config(tls.clone()).expect("client tls");
        }
        endpoint.connect().await.expect("connect")
    }

    /// A connection sending `key` (or no key), over TLS when the server speaks it.
    pub async fn connect_as(&self, key: Option<&str>) -> Authed {
        InterceptedService::new(
            self.channel().await,
            key.map_or_else(Bearer::none, Bearer::new),
        )
    }

    /// A Matcher client with the admin key.
    pub async fn matcher(&self) -> pb::matcher_client::MatcherClient<Authed> {
        self.matcher_as(ADMIN_KEY).await
    }

    /// A Matcher client with `key`.
    pub async fn matcher_as(&self, key: &str) -> pb::matcher_client::MatcherClient<Authed> {
        pb::matcher_client::MatcherClient::new(self.connect_as(Some(key)).await)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    /// A Banks client with the admin key.
    pub async fn banks(&self) -> pb::banks_client::BanksClient<Authed> {
        self.banks_as(ADMIN_KEY).await
    }

    /// A Banks client with `key`.
    pub async fn banks_as(&self, key: &str) -> pb::banks_client::BanksClient<Authed> {
        pb::banks_client::BanksClient::new(self.connect_as(Some(key)).await)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    /// An Admin client with the admin key.
    pub async fn admin(&self) -> pb::admin_client::AdminClient<Authed> {
        self.admin_as(ADMIN_KEY).await
    }

    /// An Admin client with `key`.
    pub async fn admin_as(&self, key: &str) -> pb::admin_client::AdminClient<Authed> {
        pb::admin_client::AdminClient::new(self.connect_as(Some(key)).await)
    }

    /// An Exchange client with `key`.
    pub async fn exchange_as(&self, key: &str) -> pb::exchange_client::ExchangeClient<Authed> {
        pb::exchange_client::ExchangeClient::new(self.connect_as(Some(key)).await)
            .max_decoding_message_size(64 * 1024 * 1024)
    }

    /// Stops the server and joins its task, so a server panic fails the test. Returns the data
    /// directory for a restart.
    pub async fn stop(self) -> tempfile::TempDir {
        let TestServer {
            dir, stop, task, ..
        } = self;
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        if let Some(task) = task {
            task.await
                .expect("server task panicked")
                .expect("server returned an error");
        }
        dir
    }
}

/// Waits, by watching gRPC health (no sleeping), until the server at `url` reports SERVING.
pub async fn wait_serving(url: &str) {
    let channel = Channel::from_shared(url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect to health");
    wait_serving_on(channel).await;
}

/// As [`wait_serving`], over a channel already connected (e.g. with TLS).
pub async fn wait_serving_on(channel: Channel) {
    let mut health = HealthClient::new(channel);
    let mut updates = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let deadline = std::time::Duration::from_secs(60);
    tokio::time::timeout(deadline, async {
        while let Some(update) = updates.message().await.expect("health stream") {
            if update.status == ServingStatus::Serving as i32 {
                return;
            }
        }
        panic!("health stream ended before SERVING");
    })
    .await
    .expect("server did not become SERVING within 60 s");
}

/// Reads a conformance file, or `None` to skip (see [`conformance_dir`]).
pub fn conformance_file(relative: &str) -> Option<Vec<u8>> {
    let dir = conformance_dir()?;
    Some(std::fs::read(dir.join(relative)).unwrap_or_else(|e| panic!("reading {relative}: {e}")))
}

/// An image frame.
pub fn image_frame(bytes: Vec<u8>) -> pb::Frame {
    pb::Frame {
        embeddings: Vec::new(),
        frame_index: 0,
        timestamp_ms: 0,
        signal: Some(pb::frame::Signal::Image(bytes)),
    }
}

/// A precomputed-hash frame.
pub fn pdq_frame(
    frame_index: u32,
    timestamp_ms: u64,
    hash: &framematch::hash::PdqHash,
    quality: u32,
) -> pb::Frame {
    pb::Frame {
        embeddings: Vec::new(),
        frame_index,
        timestamp_ms,
        signal: Some(pb::frame::Signal::Pdq(pb::PdqSignal {
            hash: hash.as_bytes().to_vec(),
            quality,
            variants: Vec::new(),
            content: None,
        })),
    }
}

/// Creates a bank.
pub async fn create_bank(server: &TestServer, name: &str) -> pb::Bank {
    server
        .banks()
        .await
        .create_bank(pb::CreateBankRequest {
            embedding_spaces: Vec::new(),
            name: name.into(),
            category: pb::Category::GraphicViolence as i32,
            description: String::new(),
            ..Default::default()
        })
        .await
        .expect("create bank")
        .into_inner()
}

/// Adds a reference made of `frames` to `bank`.
pub async fn add_reference(
    server: &TestServer,
    bank: &str,
    frames: Vec<pb::Frame>,
) -> Result<pb::AddReferenceResponse, tonic::Status> {
    let mut messages = vec![pb::AddReferenceRequest {
        item: Some(pb::add_reference_request::Item::Header(
            pb::ReferenceHeader {
                bank: bank.into(),
                external_id: String::new(),
                note: "test".into(),
            },
        )),
    }];
    messages.extend(frames.into_iter().map(|f| pb::AddReferenceRequest {
        item: Some(pb::add_reference_request::Item::Frame(f)),
    }));
    server
        .banks()
        .await
        .add_reference(tokio_stream::iter(messages))
        .await
        .map(tonic::Response::into_inner)
}

/// Matches one frame.
pub async fn match_image(
    server: &TestServer,
    frame: pb::Frame,
    options: Option<pb::MatchOptions>,
) -> Result<pb::FrameResult, tonic::Status> {
    server
        .matcher()
        .await
        .match_image(pb::MatchImageRequest {
            options,
            frame: Some(frame),
        })
        .await
        .map(|r| r.into_inner().result.expect("result"))
}

/// Sends a whole MatchVideo stream and collects every answer, or the status that ended it.
pub async fn match_video(
    server: &TestServer,
    requests: Vec<pb::MatchRequest>,
) -> Result<Vec<pb::MatchResponse>, tonic::Status> {
    let mut responses = server
        .matcher()
        .await
        .match_video(tokio_stream::iter(requests))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(response) = responses.message().await? {
        out.push(response);
    }
    Ok(out)
}

/// Parses a vPDQ reference file (`frame,quality,hex,timestamp` lines) into frames.
pub fn vpdq_frames(text: &str) -> Vec<pb::Frame> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            assert!(fields.len() >= 4, "vPDQ line has 4 fields: {line}");
            let index: u32 = fields[0].parse().expect("frame number");
            let quality: u32 = fields[1].parse().expect("quality");
            let hash: framematch::hash::PdqHash = fields[2].parse().expect("hash");
            let seconds: f64 = fields[3].parse().expect("timestamp");
            pdq_frame(index, (seconds * 1000.0).round() as u64, &hash, quality)
        })
        .collect()
}

/// A plain HTTP/1.0 GET (the server closes the connection after answering): status, headers and
/// body. Enough for the metrics endpoint without an HTTP client dependency.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("send request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read response");
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header end");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    (status, head.to_string(), body.to_string())
}

/// A fresh database of one test's own on the test PostgreSQL cluster; `drop_now` removes it.
pub struct Database {
    admin_url: String,
    name: String,
    /// Its URL.
    pub url: String,
}

impl Database {
    /// `None` (after saying why) when no test cluster is configured outside CI.
    pub async fn create() -> Option<Self> {
        let Ok(admin_url) = std::env::var("FRAMEMATCH_TEST_POSTGRES_URL") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must set FRAMEMATCH_TEST_POSTGRES_URL (.ci/run starts a cluster)"
            );
            eprintln!(
                "skipping: FRAMEMATCH_TEST_POSTGRES_URL is not set (eval \"$(.ci/postgres-start)\")"
            );
            return None;
        };
        let name = format!("fm_test_{}", uuid::Uuid::new_v4().simple());
        let (client, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test cluster");
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let base = admin_url
            .rsplit_once('/')
            .map(|(base, _)| base.to_string())
            .expect("URL has a database path");
        let url = format!("{base}/{name}");
        Some(Self {
            admin_url,
            name,
            url,
        })
    }

    /// Drops the database.
    pub async fn drop_now(self) {
        let (client, connection) = tokio_postgres::connect(&self.admin_url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test cluster");
        tokio::spawn(connection);
        client
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .await
            .expect("drop database");
    }
}

/// Whether ffmpeg and ffprobe can be run. Under CI (`CI` set) their absence is a failure.
pub fn ffmpeg_available() -> bool {
    let runs = |program: &str| {
        std::process::Command::new(program)
            .arg("-version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if runs("ffmpeg") && runs("ffprobe") {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must have ffmpeg and ffprobe installed (apt-get install ffmpeg)"
    );
    eprintln!("skipping: ffmpeg/ffprobe not found (apt-get install ffmpeg)");
    false
}
