//! Transport security over real TLS on loopback: a CA, a server certificate for
//! `localhost`/127.0.0.1 and client certificates are made here with rcgen, the server is started
//! with them (in process, and the real binary with its `--tls-*` flags), and clients built by
//! `framematch::client` (the module every client command uses) talk to it. Also: the API key
//! interceptor puts its header on unary and streaming calls alike.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use framematch::client::{self, ClientOptions};
use framematch::pb;
use framematch::tls::{Identity, ServerTls, TrustRoots};
use tonic::transport::{Certificate, ClientTlsConfig};

use crate::support::{self, TestServer};

const BIN: &str = env!("CARGO_BIN_EXE_framematch");

/// A throwaway PKI, as PEM files in a temporary directory: `ca.pem` signs `server.pem` (for
/// localhost and 127.0.0.1) and `client.pem`; `rogue-ca.pem` signs `rogue-client.pem`.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca_pem, issuer) = ca("framematch test CA");
        let (rogue_ca, rogue_issuer) = ca("someone else's CA");
        let write = |name: &str, pem: String| {
            std::fs::write(dir.path().join(name), pem).expect("write pem");
        };
        write("ca.pem", ca_pem);
        write("rogue-ca.pem", rogue_ca);
        for (name, sans, issuer) in [
            ("server", vec!["localhost", "127.0.0.1"], &issuer),
            ("client", vec!["upload-service"], &issuer),
            ("rogue-client", vec!["upload-service"], &rogue_issuer),
        ] {
            let key = rcgen::KeyPair::generate().expect("key");
            let sans: Vec<String> = sans.into_iter().map(String::from).collect();
            let cert = rcgen::CertificateParams::new(sans)
                .expect("params")
                .signed_by(&key, issuer)
                .expect("sign");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("read pem")
    }

    /// The server's TLS settings, without client certificates.
    fn server_tls(&self) -> ServerTls {
        ServerTls::new(
            Identity::load(&self.path("server.pem"), &self.path("server.key")).expect("identity"),
        )
    }

    /// The server's TLS settings, requiring client certificates signed by the CA.
    fn server_mtls(&self) -> ServerTls {
        self.server_tls()
            .with_client_ca(TrustRoots::load(&self.path("ca.pem")).expect("ca"))
    }

    /// The test harness's client: trusts the CA and presents the client certificate.
    fn harness_client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.read("ca.pem")))
            .identity(tonic::transport::Identity::from_pem(
                self.read("client.pem"),
                self.read("client.key"),
            ))
    }

    /// `framematch::client` options for `url` trusting `ca` (a file name here), with the client
    /// certificate `identity` (`client` or `rogue-client`) when given.
    fn options(&self, url: &str, ca: &str, identity: Option<&str>) -> ClientOptions {
        let mut options = ClientOptions::new(url);
        options.api_key = Some(support::ADMIN_KEY.to_string());
        options.tls_ca = Some(self.path(ca));
        if let Some(name) = identity {
            options.tls_cert = Some(self.path(&format!("{name}.pem")));
            options.tls_key = Some(self.path(&format!("{name}.key")));
        }
        options
    }
}

/// A self-signed CA certificate (PEM) and the issuer to sign with it.
fn ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("self-sign");
    (cert.pem(), rcgen::Issuer::new(params, key))
}

/// Stats through a `framematch::client` connection; a connection or RPC failure as its message.
async fn stats_with(options: &ClientOptions) -> Result<pb::StatsResponse, String> {
    let connection = client::connect(options).await.map_err(|e| e.to_string())?;
    pb::banks_client::BanksClient::new(connection)
        .stats(pb::StatsRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| format!("{:?}: {}", status.code(), client::status_message(&status)))
}

fn hash(seed: usize) -> framematch::hash::PdqHash {
    framematch::hash::PdqHash::from_bit_fn(|k| (k * 11 + seed * 5) % 7 < 3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_the_ca_uses_every_service_over_tls() {
    let pki = Pki::new();
    let server = TestServer::start_tls(pki.server_tls(), pki.harness_client()).await;
    let url = server.url();
    assert!(url.starts_with("https://localhost:"), "{url}");
    support::create_bank(&server, "tls-bank").await;
    let frames: Vec<pb::Frame> = (0..3)
        .map(|i| support::pdq_frame(i, u64::from(i) * 1000, &hash(i as usize), 100))
        .collect();
    let added = support::add_reference(&server, "tls-bank", frames.clone())
        .await
        .expect("add reference over tls");
    let reference_id = added.reference.expect("reference").id;

    // The client module, trusting the CA, with no client certificate (none is required).
    let connection = client::connect(&pki.options(&url, "ca.pem", None))
        .await
        .expect("a client trusting the CA connects");
    let mut banks = pb::banks_client::BanksClient::new(connection.clone());
    let stats = banks
        .stats(pb::StatsRequest {})
        .await
        .expect("stats over tls")
        .into_inner();
    assert_eq!((stats.banks, stats.active_references), (1, 1));
    let listed = banks
        .list_banks(pb::ListBanksRequest {})
        .await
        .expect("list banks over tls")
        .into_inner();
    assert_eq!(listed.banks.len(), 1);
    assert_eq!(listed.banks[0].name, "tls-bank");

    // A bidirectional stream: every frame answered, the reference matched.
    let requests: Vec<pb::MatchRequest> = frames
        .into_iter()
        .map(|frame| pb::MatchRequest {
            options: None,
            frame: Some(frame),
        })
        .collect();
    let mut responses = pb::matcher_client::MatcherClient::new(connection.clone())
        .match_video(tokio_stream::iter(requests))
        .await
        .expect("match video over tls")
        .into_inner();
    let (mut answered, mut matched) = (0, false);
    while let Some(response) = responses.message().await.expect("stream over tls") {
        match response.result {
            Some(pb::match_response::Result::Frame(_)) => answered += 1,
            Some(pb::match_response::Result::Verdict(v)) => {
                matched |=
                    v.is_match && v.source.as_ref().map(|s| s.reference_id) == Some(reference_id);
            }
            Some(pb::match_response::Result::Summary(_)) | None => {}
        }
    }
    assert_eq!(answered, 3);
    assert!(matched, "the stream's verdict matches the reference");

    // Health and reflection share the TLS listener.
    let health = tonic_health::pb::health_client::HealthClient::new(connection.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "framematch.v1.Matcher".into(),
        })
        .await
        .expect("health over tls")
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let services = list_services(connection).await;
    assert!(
        services.iter().any(|s| s == "framematch.v1.Matcher"),
        "{services:?}"
    );

    // The metrics endpoint stays plain HTTP.
    assert!(server.scrape().await.contains("framematch"));
    server.stop().await;
}

/// The services reflection lists, over one ServerReflectionInfo stream.
async fn list_services(connection: client::Connection) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(connection)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response: ServerReflectionResponse = responses
        .message()
        .await
        .expect("reflection stream")
        .expect("an answer");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_do_not_trust_the_server_are_refused_with_a_clear_error() {
    let pki = Pki::new();
    let server = TestServer::start_tls(pki.server_tls(), pki.harness_client()).await;
    let url = server.url();

    let error = stats_with(&pki.options(&url, "rogue-ca.pem", None))
        .await
        .expect_err("another CA's trust does not extend to this server");
    assert!(
        error.starts_with(&format!("cannot connect to {url}")),
        "{error}"
    );
    assert!(error.contains("certificate"), "{error}");
    assert!(error.contains("UnknownIssuer"), "{error}");

    // The certificate also covers 127.0.0.1 (an IP address SAN).
    let port = server.addr.port();
    let by_ip = format!("https://127.0.0.1:{port}");
    stats_with(&pki.options(&by_ip, "ca.pem", None))
        .await
        .expect("the certificate's IP address SAN is accepted");

    // Plain HTTP/2 to a TLS port fails too, rather than talking in the clear.
    let plain = format!("http://127.0.0.1:{port}");
    assert!(stats_with(&ClientOptions::new(plain)).await.is_err());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_clients_with_a_certificate_from_it_get_in() {
    let pki = Pki::new();
    let server = TestServer::start_tls(pki.server_mtls(), pki.harness_client()).await;
    let url = server.url();

    let error = stats_with(&pki.options(&url, "ca.pem", None))
        .await
        .expect_err("no client certificate");
    assert!(error.contains("--tls-client-cert"), "{error}");
    let error = stats_with(&pki.options(&url, "ca.pem", Some("rogue-client")))
        .await
        .expect_err("a client certificate from another CA");
    assert!(error.contains("client certificate"), "{error}");

    let stats = stats_with(&pki.options(&url, "ca.pem", Some("client")))
        .await
        .expect("a client certificate signed by the CA");
    assert_eq!(stats.banks, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_auth_admits_clients_without_a_certificate_but_not_bad_ones() {
    let pki = Pki::new();
    let mut tls = pki.server_mtls();
    tls.client_auth_optional = true;
    let server = TestServer::start_tls(tls, pki.harness_client()).await;
    let url = server.url();
    stats_with(&pki.options(&url, "ca.pem", None))
        .await
        .expect("no certificate is allowed");
    stats_with(&pki.options(&url, "ca.pem", Some("client")))
        .await
        .expect("a good certificate is allowed");
    stats_with(&pki.options(&url, "ca.pem", Some("rogue-client")))
        .await
        .expect_err("a certificate from another CA is not");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_travels_on_unary_and_streaming_calls() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    // A server that records the authorization header of every call it receives.
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let recorder = {
        let seen = Arc::clone(&seen);
        move |request: tonic::Request<()>| {
            let header = request
                .metadata()
                .get("authorization")
                .map(|v| v.to_str().unwrap_or("<not ascii>").to_string());
            seen.lock().expect("lock").push(header);
            Ok(request)
        }
    };
    let (_reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("reflection");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(recorder))
            .add_service(health)
            .add_service(reflection)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );

    {
        // Every client is dropped at the end of this block: graceful shutdown waits for them.
        let mut options = ClientOptions::new(format!("http://{addr}"));
        options.api_key = Some("fm_test_0123456789".into());
        let connection = client::connect(&options).await.expect("connect");
        let mut health = HealthClient::new(connection.clone());
        health
            .check(HealthCheckRequest::default())
            .await
            .expect("unary");
        let mut updates = health
            .watch(HealthCheckRequest::default())
            .await
            .expect("server streaming")
            .into_inner();
        updates.message().await.expect("watch").expect("a status");
        list_services(connection).await;

        let without = client::connect(&ClientOptions::new(format!("http://{addr}")))
            .await
            .expect("connect");
        HealthClient::new(without)
            .check(HealthCheckRequest::default())
            .await
            .expect("unary without a key");
    }

    let bearer = Some("Bearer fm_test_0123456789".to_string());
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen, vec![bearer.clone(), bearer.clone(), bearer, None]);
    let _ = stop.send(());
    tokio::time::timeout(std::time::Duration::from_secs(30), task)
        .await
        .expect("the recording server stops once its clients are gone")
        .expect("join")
        .expect("serve");
}

// === the real binary ===

/// `framematch serve` with the test PKI's server certificate and `extra` flags, SERVING.
struct Served {
    child: Child,
    port: u16,
    _data: tempfile::TempDir,
}

impl Served {
    async fn start(pki: &Pki, extra: &[&str]) -> Self {
        let data = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(BIN)
            .env("FRAMEMATCH_BOOTSTRAP_ADMIN_KEY", support::ADMIN_KEY)
            .env("FRAMEMATCH_API_KEY", support::ADMIN_KEY)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--tls-cert",
                &pki.arg("server.pem"),
                "--tls-key",
                &pki.arg("server.key"),
                "--data-dir",
            ])
            .arg(data.path())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn framematch serve");
        let stdout = child.stdout.take().expect("stdout");
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout)
                .read_line(&mut line)
                .expect("read first line");
            line
        })
        .await
        .expect("reader");
        let port = line
            .trim()
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or_else(|| panic!("first line names the address: {line:?}"));
        let served = Self {
            child,
            port,
            _data: data,
        };
        let channel = tonic::transport::Channel::from_shared(served.url())
            .expect("url")
            .tls_config(pki.harness_client())
            .expect("tls")
            .connect()
            .await
            .expect("connect over tls");
        support::wait_serving_on(channel).await;
        served
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// SIGTERM, and a clean exit.
    fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        assert!(sent.success());
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "exit 0 after SIGTERM: {status:?}");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // A failed assertion must not leave the server running; after terminate() this is a
        // no-op on a reaped child.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the CLI with `args` and `env`: exit code, stdout, stderr.
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = Command::new(BIN)
        .env("FRAMEMATCH_BOOTSTRAP_ADMIN_KEY", support::ADMIN_KEY)
        .env("FRAMEMATCH_API_KEY", support::ADMIN_KEY)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run framematch");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_the_cli_over_tls() {
    let pki = Pki::new();
    let served = Served::start(&pki, &[]).await;
    let url = served.url();
    let ca = pki.arg("ca.pem");

    let (code, out, err) = run(
        &[
            "--server",
            &url,
            "--tls-ca",
            &ca,
            "bank",
            "create",
            "tls",
            "--category",
            "terrorism",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\ttls\n"), "{out:?}");
    // Flags after the subcommand, and the CA from the environment.
    let (code, out, err) = run(
        &["stats", "--server", &url],
        &[("FRAMEMATCH_TLS_CA", ca.as_str())],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("banks\t1"), "{out}");

    // Without the CA the system's roots are used, and they do not know ours.
    let (code, _, err) = run(&["stats", "--server", &url], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&url), "{err}");
    assert!(
        err.contains("certificate") || err.contains("--tls-ca"),
        "{err}"
    );
    // The TLS flags with a plain URL are a clear mistake, not silently ignored.
    let plain = format!("http://127.0.0.1:{}", served.port);
    let (code, _, err) = run(&["stats", "--server", &plain, "--tls-ca", &ca], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--tls-ca needs an https://"), "{err}");
    served.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_requires_client_certificates_with_a_client_ca() {
    let pki = Pki::new();
    let served = Served::start(&pki, &["--tls-client-ca", &pki.arg("ca.pem")]).await;
    let url = served.url();
    let ca = pki.arg("ca.pem");
    let (cert, key) = (pki.arg("client.pem"), pki.arg("client.key"));

    let (code, _, err) = run(&["stats", "--server", &url, "--tls-ca", &ca], &[]);
    assert_eq!(code, 2, "no client certificate is refused: {err}");
    assert!(err.contains("--tls-client-cert"), "{err}");

    let (code, out, err) = run(
        &[
            "stats",
            "--server",
            &url,
            "--tls-ca",
            &ca,
            "--tls-client-cert",
            &cert,
            "--tls-client-key",
            &key,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("banks\t0"), "{out}");

    // The same through the environment, and the load generator on the same connection module.
    let env = [
        ("FRAMEMATCH_SERVER", url.as_str()),
        ("FRAMEMATCH_TLS_CA", ca.as_str()),
        ("FRAMEMATCH_TLS_CLIENT_CERT", cert.as_str()),
        ("FRAMEMATCH_TLS_CLIENT_KEY", key.as_str()),
    ];
    let (code, out, err) = run(
        &[
            "bench",
            "--streams",
            "2",
            "--frames-per-stream",
            "5",
            "--json",
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("json report");
    assert_eq!(report["errors"], 0, "{out}");
    assert_eq!(report["frames_answered"], 10, "{out}");

    // A client key that is not the certificate's is caught before dialling, naming the file.
    let rogue_key = pki.arg("rogue-client.key");
    let (code, _, err) = run(
        &[
            "stats",
            "--server",
            &url,
            "--tls-ca",
            &ca,
            "--tls-client-cert",
            &cert,
            "--tls-client-key",
            &rogue_key,
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--tls-client-key"), "{err}");
    assert!(err.contains(&rogue_key), "{err}");
    served.terminate();
}

#[test]
fn tls_misconfiguration_exits_64_naming_the_flag_and_file() {
    let pki = Pki::new();
    let serve = |extra: &[&str]| {
        let mut args = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        run(&args, &[])
    };
    let (code, _, err) = serve(&["--tls-cert", &pki.arg("server.pem")]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("--tls-cert") && err.contains("--tls-key"),
        "{err}"
    );

    let missing = pki.arg("nowhere.pem");
    let (code, _, err) = serve(&["--tls-cert", &missing, "--tls-key", &pki.arg("server.key")]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains(&missing), "{err}");

    let (code, _, err) = serve(&[
        "--tls-cert",
        &pki.arg("server.pem"),
        "--tls-key",
        &pki.arg("client.key"),
    ]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("does not belong"), "{err}");

    let (code, _, err) = serve(&["--tls-client-ca", &pki.arg("ca.pem")]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--tls-client-ca"), "{err}");
}

// === following a partner over TLS ===

/// A plain `framematch serve` (embedded store) with `extra` flags, its log in `log`, SERVING.
struct PlainNode {
    child: Child,
    url: String,
    metrics: std::net::SocketAddr,
    log: PathBuf,
    _data: tempfile::TempDir,
}

impl PlainNode {
    async fn start(extra: &[&str], log: PathBuf) -> Self {
        let data = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(BIN)
            .env("FRAMEMATCH_BOOTSTRAP_ADMIN_KEY", support::ADMIN_KEY)
            .env("RUST_LOG", "info,framematch::follow=debug")
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data.path())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn framematch serve");
        let stdout = child.stdout.take().expect("stdout");
        let (first, second) = tokio::task::spawn_blocking(move || {
            let mut reader = BufReader::new(stdout);
            let (mut first, mut second) = (String::new(), String::new());
            reader.read_line(&mut first).expect("first line");
            reader.read_line(&mut second).expect("second line");
            (first, second)
        })
        .await
        .expect("reader");
        let address = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first line names the address: {first:?}"));
        let metrics = second
            .trim()
            .strip_prefix("metrics on ")
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("second line names the metrics address: {second:?}"));
        let node = Self {
            url: format!("http://{address}"),
            child,
            metrics,
            log,
            _data: data,
        };
        support::wait_serving(&node.url).await;
        node
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of `framematch_follow_connected` on its metrics endpoint, if exported.
    async fn follow_connected(&self) -> Option<i64> {
        let (status, _, body) = support::http_get(self.metrics, "/metrics").await;
        assert_eq!(status, 200, "GET /metrics answered {status}");
        body.lines()
            .find(|l| l.starts_with("framematch_follow_connected"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// The banks `hash` matches on this server.
    async fn matched_banks(&self, hash: &framematch::hash::PdqHash) -> Vec<String> {
        pb::matcher_client::MatcherClient::new(
            support::connect_as(&self.url, Some(support::ADMIN_KEY)).await,
        )
        .match_image(pb::MatchImageRequest {
            options: None,
            frame: Some(support::pdq_frame(0, 0, hash, 100)),
        })
        .await
        .expect("match image")
        .into_inner()
        .result
        .expect("result")
        .matches
        .into_iter()
        .map(|m| m.source.expect("source").bank)
        .collect()
    }

    /// Polls every 20 ms until `done` holds for the log text and follower metric, or fails
    /// after 10 s naming `what` with the log.
    async fn wait_until(&self, what: &str, done: impl Fn(&str, Option<i64>) -> bool) {
        let started = std::time::Instant::now();
        loop {
            let connected = self.follow_connected().await;
            let log = self.log_text();
            if done(&log, connected) {
                return;
            }
            assert!(
                started.elapsed() < FOLLOW_DEADLINE,
                "{what}: not within {FOLLOW_DEADLINE:?} (follow_connected {connected:?}); log:\n{log}"
            );
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

impl Drop for PlainNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long a change on the partner may take to be matchable on the follower (the product asks
/// for 2 s), and how often the follower is asked meanwhile.
const FOLLOW_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(20);

impl Served {
    /// A connection to this TLS server with the harness's client identity and the admin key.
    async fn connect(&self, pki: &Pki) -> support::Authed {
        let channel = tonic::transport::Channel::from_shared(self.url())
            .expect("url")
            .tls_config(pki.harness_client())
            .expect("tls")
            .connect()
            .await
            .expect("connect over tls");
        tonic::service::interceptor::InterceptedService::new(
            channel,
            support::Bearer::new(support::ADMIN_KEY),
        )
    }
}

#[allow(clippy::print_stdout)] // the measured add-to-match time is printed
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_mirrors_a_partner_that_requires_client_certificates() {
    let pki = Pki::new();
    let logs = tempfile::tempdir().expect("temp dir");
    let a = Served::start(&pki, &["--tls-client-ca", &pki.arg("ca.pem")]).await;
    let a_url = a.url();

    // On A: platform-b, a matcher key for it, and a bank platform-a shares with it.
    let mut admin = pb::admin_client::AdminClient::new(a.connect(&pki).await);
    for org in ["platform-a", "platform-b"] {
        admin
            .create_organisation(pb::CreateOrganisationRequest { name: org.into() })
            .await
            .expect("create organisation over mtls");
    }
    let key = admin
        .create_api_key(pb::CreateApiKeyRequest {
            organisation: "platform-b".into(),
            role: pb::Role::Matcher as i32,
            label: "B follows A over mTLS".into(),
        })
        .await
        .expect("key for platform-b")
        .into_inner()
        .secret;
    let mut banks = pb::banks_client::BanksClient::new(a.connect(&pki).await);
    banks
        .create_bank(pb::CreateBankRequest {
            embedding_spaces: Vec::new(),
            name: "shared".into(),
            category: pb::Category::Terrorism as i32,
            description: "shared over mTLS".into(),
            visibility: pb::Visibility::Shared as i32,
            shared_with: vec!["platform-b".into()],
            owner: "platform-a".into(),
        })
        .await
        .expect("create shared bank over mtls");

    // B presents the client certificate; B' trusts A's CA but has no certificate to present.
    let (ca, cert, client_key) = (
        pki.arg("ca.pem"),
        pki.arg("client.pem"),
        pki.arg("client.key"),
    );
    let follow = [
        "--follow",
        a_url.as_str(),
        "--follow-key",
        key.as_str(),
        "--follow-tls-ca",
        ca.as_str(),
    ];
    let mut with_cert = follow.to_vec();
    with_cert.extend([
        "--follow-tls-client-cert",
        cert.as_str(),
        "--follow-tls-client-key",
        client_key.as_str(),
    ]);
    let b = PlainNode::start(&with_cert, logs.path().join("b.log")).await;
    let no_cert = PlainNode::start(&follow, logs.path().join("b-no-cert.log")).await;

    // B's change stream opens over mTLS before anything is added, so what follows is the live
    // add-on-A to match-on-B latency.
    b.wait_until("B connected to A", |_, connected| connected == Some(1))
        .await;

    let reference = hash(42);
    let started = std::time::Instant::now();
    banks
        .add_reference(tokio_stream::iter([
            pb::AddReferenceRequest {
                item: Some(pb::add_reference_request::Item::Header(
                    pb::ReferenceHeader {
                        bank: "shared".into(),
                        external_id: "over-mtls".into(),
                        note: "added on A over mTLS".into(),
                    },
                )),
            },
            pb::AddReferenceRequest {
                item: Some(pb::add_reference_request::Item::Frame(support::pdq_frame(
                    0, 0, &reference, 100,
                ))),
            },
        ]))
        .await
        .expect("add reference on A over mtls");
    let acked = started.elapsed();
    let matched = loop {
        let matched = b.matched_banks(&reference).await;
        if !matched.is_empty() {
            break matched;
        }
        assert!(
            started.elapsed() < FOLLOW_DEADLINE,
            "B did not match A's reference within {FOLLOW_DEADLINE:?}; B's log:\n{}",
            b.log_text()
        );
        tokio::time::sleep(FOLLOW_POLL).await;
    };
    let total = started.elapsed();
    assert_eq!(matched, vec!["platform-a.shared".to_string()]);
    println!(
        "over mTLS: add on A acknowledged in {acked:?}; first match on B {total:?} after the add"
    );

    // Without a client certificate A refuses the follower: it fails (one warning), keeps failing
    // on its retries (logged at debug), is not connected, mirrors nothing, and serves all the
    // same. The reference was added before B matched it, so B' has had as long to see it.
    no_cert
        .wait_until("B' keeps failing to follow A", |log, connected| {
            connected == Some(0)
                && log.contains("partner change stream down")
                && log.contains("partner still unreachable")
                && log.contains("check --follow-tls-client-cert and --follow-tls-client-key")
        })
        .await;
    assert!(
        no_cert.matched_banks(&reference).await.is_empty(),
        "a follower without a client certificate must not mirror A's reference; log:\n{}",
        no_cert.log_text()
    );
    let stats = pb::banks_client::BanksClient::new(
        support::connect_as(&no_cert.url, Some(support::ADMIN_KEY)).await,
    )
    .stats(pb::StatsRequest {})
    .await
    .expect("stats on B'")
    .into_inner();
    assert_eq!((stats.banks, stats.active_references), (0, 0), "{stats:?}");
    let health = tonic_health::pb::health_client::HealthClient::new(
        support::connect_as(&no_cert.url, None).await,
    )
    .check(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    })
    .await
    .expect("health on B'")
    .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert_eq!(b.follow_connected().await, Some(1), "B is still connected");
    // The followers go first: A's graceful shutdown would otherwise wait on B's open stream.
    drop(b);
    drop(no_cert);
    a.terminate();
}
