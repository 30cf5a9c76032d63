//! The one way client commands ([`crate::cli`]) and the load generator ([`crate::loadgen`])
//! reach a server: [`ClientOptions`] (the global `--server`, `--api-key` and `--tls-*` flags)
//! become a [`Connector`], which checks everything it can before dialling (URL, scheme, PEM
//! files, API key), and each [`Connector::connect`] gives a [`Connection`] that every generated
//! client takes: `MatcherClient::new(connection)`.
//!
//! - `https://` URLs speak TLS: the server must present a certificate for the URL's host signed
//!   by `--tls-ca`, or without it by one of the system's trusted roots. `--tls-client-cert` and
//!   `--tls-client-key` add a client certificate (mTLS). `http://` is plain, and TLS flags with
//!   it are refused rather than ignored.
//! - With an API key, [`BearerAuth`] puts `authorization: Bearer <key>` on every request's
//!   metadata, streaming RPCs included: it runs once per call, where the headers are sent.

use std::fmt;
use std::path::{Path, PathBuf};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::tls::{self, Identity, TrustRoots};

/// A connected channel whose requests carry the API key: what every generated client is built on.
pub type Connection = InterceptedService<Channel, BearerAuth>;

/// Default server of client commands.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// Why a client could not be set up or could not connect. The API key never appears in a message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server URL does not parse.
    #[error("invalid server URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// TLS flags were given for a plain `http://` server.
    #[error("--{flag} needs an https:// server URL, and --server is {url:?}")]
    TlsOverPlain {
        /// The first TLS flag given.
        flag: &'static str,
        /// The URL.
        url: String,
    },
    /// One of `--tls-client-cert` and `--tls-client-key` without the other.
    #[error("--{given} given without --{missing}; give both or neither")]
    HalfIdentity {
        /// The flag given.
        given: &'static str,
        /// The one missing.
        missing: &'static str,
    },
    /// A PEM file cannot be used.
    #[error("--{flag}: {source}")]
    Pem {
        /// The flag naming the file.
        flag: &'static str,
        /// What is wrong with it.
        #[source]
        source: tls::Error,
    },
    /// The API key cannot be sent as a header value.
    #[error("invalid --api-key (FRAMEMATCH_API_KEY): {reason}")]
    ApiKey {
        /// What is wrong (never the key itself).
        reason: &'static str,
    },
    /// TLS settings tonic refused: no system roots to trust, or a host name that cannot be
    /// checked against a certificate.
    #[error("cannot set up TLS for {url}: {}{hint}", chain(source))]
    Tls {
        /// The URL.
        url: String,
        /// What to do about it, when known.
        hint: &'static str,
        /// tonic's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server could not be reached, or the TLS handshake failed.
    #[error("cannot connect to {url}: {}", chain(source))]
    Connect {
        /// The URL.
        url: String,
        /// Why, with its causes in the message.
        #[source]
        source: tonic::transport::Error,
    },
}

/// An error and its causes on one line: tonic's transport error says only "transport error", the
/// reason (refused, unknown issuer, wrong host name, ...) is in its sources.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Layers often repeat their inner error verbatim; say it once.
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// A status's message, followed by the transport failure behind it when there is one.
///
/// A TLS 1.3 server that requires client certificates finishes the handshake and only then
/// drops a client without a valid one; the client sees its call fail with `transport error` or
/// `connection closed`, and whether rustls's `CertificateRequired` alert is in the source is a
/// race. So such failures carry a hint pointing at the client certificate flags.
pub fn status_message(status: &tonic::Status) -> String {
    let Some(source) = std::error::Error::source(status) else {
        return status.message().to_string();
    };
    let cause = chain(source);
    let message = if cause.starts_with(status.message()) {
        cause
    } else {
        format!("{}: {cause}", status.message())
    };
    format!(
        "{message} (the connection failed; a server that requires client certificates drops \
         clients without a valid one: check --tls-client-cert and --tls-client-key)"
    )
}

// === impl ClientOptions ===

/// How client commands reach the server: global flags, before or after the subcommand.
#[derive(Clone, clap::Args)]
pub struct ClientOptions {
    /// URL of the framematch server (client commands): `http://host:port`, or `https://host:port`
    /// for TLS.
    #[arg(long, global = true, env = "FRAMEMATCH_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// API key sent as `authorization: Bearer <key>` on every request (client commands).
    #[arg(
        long,
        global = true,
        env = "FRAMEMATCH_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
    /// PEM CA certificate(s) trusted for an https:// server (client commands); default: the
    /// system's trusted roots.
    #[arg(long, global = true, env = "FRAMEMATCH_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for servers that require one (mTLS; client commands); needs
    /// --tls-client-key.
    // Ids differ from `serve --tls-cert/--tls-key`: clap shares global values between arguments
    // of the same id, which would hand one command's file to the other.
    #[arg(
        id = "client_tls_cert",
        long = "tls-client-cert",
        global = true,
        env = "FRAMEMATCH_TLS_CLIENT_CERT",
        value_name = "PEM"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert (client commands).
    #[arg(
        id = "client_tls_key",
        long = "tls-client-key",
        global = true,
        env = "FRAMEMATCH_TLS_CLIENT_KEY",
        value_name = "PEM"
    )]
    pub tls_key: Option<PathBuf>,
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("server", &self.server)
            .field("api_key", &self.api_key.as_ref().map(|_| "<hidden>"))
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .finish()
    }
}

impl ClientOptions {
    /// Plain options for `server`: no key, no TLS files (an https:// URL then trusts the system's
    /// roots).
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            api_key: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

// === impl BearerAuth ===

/// Puts `authorization: Bearer <key>` on every request when a key is set; passes requests through
/// untouched otherwise.
#[derive(Clone, Default)]
pub struct BearerAuth {
    header: Option<MetadataValue<Ascii>>,
}

impl fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerAuth")
            .field("key", &self.header.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

impl BearerAuth {
    /// The interceptor for `api_key`, or a pass-through for `None`.
    ///
    /// # Errors
    /// [`Error::ApiKey`] for an empty key, or one with characters other than visible ASCII
    /// (spaces, control characters and non-ASCII cannot travel in a header unchanged).
    pub fn try_new(api_key: Option<&str>) -> Result<Self, Error> {
        let Some(key) = api_key else {
            return Ok(Self::default());
        };
        if key.is_empty() {
            return Err(Error::ApiKey {
                reason: "the key is empty",
            });
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::ApiKey {
                reason: "the key must be visible ASCII without spaces (it is sent as an HTTP/2 \
                         header)",
            });
        }
        let mut header =
            MetadataValue::try_from(format!("Bearer {key}")).map_err(|_| Error::ApiKey {
                reason: "the key is not a valid header value",
            })?;
        // Kept out of HPACK's dynamic table and of header debug output.
        header.set_sensitive(true);
        Ok(Self {
            header: Some(header),
        })
    }
}

impl Interceptor for BearerAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

// === impl Connector ===

/// Checked settings for connecting to one server, reusable for many connections (the load
/// generator opens one per stream).
#[derive(Clone, Debug)]
pub struct Connector {
    url: String,
    endpoint: Endpoint,
    auth: BearerAuth,
}

impl Connector {
    /// Checks the URL, reads and checks the PEM files, and checks the API key. Nothing is dialled.
    ///
    /// # Errors
    /// [`Error::Url`], [`Error::TlsOverPlain`], [`Error::HalfIdentity`], [`Error::Pem`],
    /// [`Error::ApiKey`], [`Error::Tls`].
    pub fn new(options: &ClientOptions) -> Result<Self, Error> {
        let url = options.server.clone();
        let auth = BearerAuth::try_new(options.api_key.as_deref())?;
        let endpoint = Endpoint::from_shared(url.clone()).map_err(|e| Error::Url {
            url: url.clone(),
            reason: chain(&e),
        })?;
        let tls = match endpoint.uri().scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(Error::Url {
                    url,
                    reason: "expected http://host:port, or https://host:port for TLS".into(),
                });
            }
        };
        let identity = match (&options.tls_cert, &options.tls_key) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(Error::HalfIdentity {
                    given: "tls-client-cert",
                    missing: "tls-client-key",
                });
            }
            (None, Some(_)) => {
                return Err(Error::HalfIdentity {
                    given: "tls-client-key",
                    missing: "tls-client-cert",
                });
            }
            (Some(cert), Some(key)) => Some(Identity::load(cert, key).map_err(|source| {
                let flag = match &source {
                    tls::Error::PrivateKey { .. } | tls::Error::KeyMismatch { .. } => {
                        "tls-client-key"
                    }
                    tls::Error::Read { origin, .. } if Path::new(origin) == key.as_path() => {
                        "tls-client-key"
                    }
                    tls::Error::Read { .. } | tls::Error::Certificate { .. } => "tls-client-cert",
                };
                Error::Pem { flag, source }
            })?),
        };
        if !tls {
            let flag = if options.tls_ca.is_some() {
                Some("tls-ca")
            } else if identity.is_some() {
                Some("tls-client-cert")
            } else {
                None
            };
            if let Some(flag) = flag {
                return Err(Error::TlsOverPlain { flag, url });
            }
            return Ok(Self {
                url,
                endpoint,
                auth,
            });
        }
        let mut config = ClientTlsConfig::new();
        config = match &options.tls_ca {
            Some(path) => config.ca_certificate(
                TrustRoots::load(path)
                    .map_err(|source| Error::Pem {
                        flag: "tls-ca",
                        source,
                    })?
                    .to_tonic(),
            ),
            None => config.with_native_roots(),
        };
        if let Some(identity) = &identity {
            config = config.identity(identity.to_tonic());
        }
        let endpoint = endpoint.tls_config(config).map_err(|source| Error::Tls {
            url: url.clone(),
            hint: if options.tls_ca.is_none() {
                " (without --tls-ca the system's trusted roots are used; pass --tls-ca PEM \
                     to trust the server's CA)"
            } else {
                ""
            },
            source,
        })?;
        Ok(Self {
            url,
            endpoint,
            auth,
        })
    }

    /// The server URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Settings for one long-lived stream (the partner follower): a bound on dialling, and HTTP/2
    /// keep-alive pings so that a dead peer or a silently dropped connection is noticed.
    #[must_use]
    pub fn long_lived(
        mut self,
        connect_timeout: std::time::Duration,
        ping_interval: std::time::Duration,
        ping_timeout: std::time::Duration,
    ) -> Self {
        self.endpoint = self
            .endpoint
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(ping_interval)
            .keep_alive_timeout(ping_timeout)
            .keep_alive_while_idle(true);
        self
    }

    /// Opens a connection (TCP, then TLS for https://).
    ///
    /// # Errors
    /// [`Error::Connect`], naming the URL and the reason (refused, certificate not trusted, ...).
    pub async fn connect(&self) -> Result<Connection, Error> {
        let channel = self
            .endpoint
            .connect()
            .await
            .map_err(|source| Error::Connect {
                url: self.url.clone(),
                source,
            })?;
        Ok(InterceptedService::new(channel, self.auth.clone()))
    }
}

/// [`Connector::new`] then [`Connector::connect`]: one connection for a client command.
///
/// # Errors
/// As those two.
pub async fn connect(options: &ClientOptions) -> Result<Connection, Error> {
    Connector::new(options)?.connect().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_of(auth: &mut BearerAuth) -> Option<String> {
        auth.call(tonic::Request::new(()))
            .expect("never refuses")
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().expect("ascii").to_string())
    }

    #[test]
    fn the_key_goes_in_a_bearer_header() {
        let mut auth = BearerAuth::try_new(Some("fm_live_abc123")).expect("valid key");
        assert_eq!(
            header_of(&mut auth).as_deref(),
            Some("Bearer fm_live_abc123")
        );
        let mut none = BearerAuth::try_new(None).expect("no key");
        assert_eq!(header_of(&mut none), None);
    }

    #[test]
    fn malformed_keys_are_refused_without_echoing_them() {
        for key in ["", "clé-secrète", "two words", "line\nbreak", "tab\tkey"] {
            let error = BearerAuth::try_new(Some(key)).expect_err(key);
            let message = error.to_string();
            assert!(message.contains("--api-key"), "{message}");
            if !key.is_empty() {
                assert!(!message.contains(key), "the key leaked: {message}");
            }
        }
    }

    #[test]
    fn debug_output_hides_the_key() {
        let mut options = ClientOptions::new("http://127.0.0.1:1");
        options.api_key = Some("s3cret-key".into());
        let shown = format!("{options:?}");
        assert!(!shown.contains("s3cret-key"), "{shown}");
        assert!(shown.contains("<hidden>"), "{shown}");
        let auth = BearerAuth::try_new(Some("s3cret-key")).expect("valid");
        assert!(!format!("{auth:?}").contains("s3cret-key"));
    }

    #[test]
    fn urls_and_tls_flags_are_checked_before_dialling() {
        let error = Connector::new(&ClientOptions::new("127.0.0.1:50051")).expect_err("no scheme");
        assert!(error.to_string().contains("127.0.0.1:50051"), "{error}");
        let error = Connector::new(&ClientOptions::new("ftp://host:1")).expect_err("bad scheme");
        assert!(error.to_string().contains("https://"), "{error}");

        let mut options = ClientOptions::new("http://127.0.0.1:1");
        options.tls_ca = Some("/no/such/ca.pem".into());
        let error = Connector::new(&options).expect_err("tls over http");
        assert!(
            matches!(error, Error::TlsOverPlain { flag: "tls-ca", .. }),
            "{error}"
        );

        let mut options = ClientOptions::new("https://localhost:1");
        options.tls_ca = Some("/no/such/ca.pem".into());
        let error = Connector::new(&options).expect_err("missing ca");
        assert!(error.to_string().starts_with("--tls-ca: "), "{error}");
        assert!(error.to_string().contains("/no/such/ca.pem"), "{error}");

        let mut options = ClientOptions::new("https://localhost:1");
        options.tls_cert = Some("/no/such/cert.pem".into());
        let error = Connector::new(&options).expect_err("half identity");
        assert!(error.to_string().contains("--tls-client-key"), "{error}");

        let mut options = ClientOptions::new("https://localhost:1");
        options.api_key = Some("bad key".into());
        assert!(matches!(
            Connector::new(&options).expect_err("bad key"),
            Error::ApiKey { .. }
        ));

        Connector::new(&ClientOptions::new("http://127.0.0.1:1")).expect("plain");
    }
}
