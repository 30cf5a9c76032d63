//! TLS material for the server (`serve --tls-cert/--tls-key`, `--tls-client-ca` for mTLS) and
//! for clients ([`crate::client`]): PEM files read and checked once, when the configuration is
//! validated, so a missing file, a file without a certificate, a key that does not belong to its
//! certificate or a CA that is not a certificate stops the process with a message naming the
//! file, instead of failing later at the first handshake with tonic's generic parse errors.
//!
//! The bytes handed to tonic are the PEM text as read; tonic's rustls (with ring) parses them
//! again when it builds its acceptor or connector. Everything here uses the ring provider
//! explicitly, and [`install_crypto_provider`] makes it the process default, so no other crate's
//! rustls features can change which one runs.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// How long a client gets to finish its TLS handshake before the server drops the connection, so
/// idle half-open connections cannot pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A PEM file (or buffer) that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read {origin}: {source}")]
    Read {
        /// The file.
        origin: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No `CERTIFICATE` block, or one that is not valid base64 DER.
    #[error("{origin}: {reason}")]
    Certificate {
        /// The file.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// No private key block, or one that cannot be loaded.
    #[error("{origin}: {reason}")]
    PrivateKey {
        /// The file.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// The private key is not the certificate's.
    #[error("the private key in {key} does not belong to the certificate in {cert}: {reason}")]
    KeyMismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// rustls's explanation.
        reason: String,
    },
}

/// The ring provider: the only one compiled in (Cargo.toml).
fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Makes ring the process-wide rustls provider, which tonic's server acceptor uses. Idempotent:
/// a provider installed earlier (by a previous call) is kept.
pub fn install_crypto_provider() {
    // Err means one is installed already; with only ring compiled in, it is ring.
    let _ = provider().install_default();
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        origin: path.display().to_string(),
        source,
    })
}

/// Every certificate in `pem`; at least one.
fn parse_certificates(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Certificate {
            origin: origin.to_string(),
            reason: format!("invalid PEM certificate: {e}"),
        })?;
    if certs.is_empty() {
        return Err(Error::Certificate {
            origin: origin.to_string(),
            reason: "no PEM certificate found (expected a -----BEGIN CERTIFICATE----- block)"
                .into(),
        });
    }
    Ok(certs)
}

fn parse_private_key(pem: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        let reason = match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key found (expected a \
                 -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY block)"
                .to_string(),
            other => format!("invalid PEM private key: {other}"),
        };
        Error::PrivateKey {
            origin: origin.to_string(),
            reason,
        }
    })
}

// === impl Identity ===

/// A certificate chain and its private key: the server's identity, or a client's for mTLS.
#[derive(Clone)]
pub struct Identity {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key never reaches a log line.
        f.debug_struct("Identity")
            .field("cert_pem_bytes", &self.cert_pem.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads and checks a PEM certificate chain (leaf first) and its PEM private key (PKCS#8,
    /// PKCS#1 or SEC1).
    ///
    /// # Errors
    /// [`Error::Read`] for an unreadable file, [`Error::Certificate`] or [`Error::PrivateKey`]
    /// for one without a usable block, [`Error::KeyMismatch`] when the key is not the leaf's.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, Error> {
        Self::check(
            read(cert)?,
            &cert.display().to_string(),
            read(key)?,
            &key.display().to_string(),
        )
    }

    /// As [`Identity::load`], from PEM text already in memory.
    ///
    /// # Errors
    /// As [`Identity::load`], except [`Error::Read`].
    pub fn from_pem(
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Result<Self, Error> {
        Self::check(
            cert_pem.into(),
            "the certificate PEM",
            key_pem.into(),
            "the private key PEM",
        )
    }

    fn check(
        cert_pem: Vec<u8>,
        cert_origin: &str,
        key_pem: Vec<u8>,
        key_origin: &str,
    ) -> Result<Self, Error> {
        let certs = parse_certificates(&cert_pem, cert_origin)?;
        let key = parse_private_key(&key_pem, key_origin)?;
        CertifiedKey::from_der(certs, key, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => Error::KeyMismatch {
                cert: cert_origin.to_string(),
                key: key_origin.to_string(),
                reason: e.to_string(),
            },
            other => Error::PrivateKey {
                origin: key_origin.to_string(),
                reason: format!("unusable private key: {other}"),
            },
        })?;
        Ok(Self { cert_pem, key_pem })
    }

    /// tonic's form.
    pub fn to_tonic(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem)
    }
}

// === impl TrustRoots ===

/// CA certificates that are trusted: by a client for the server, by the server for clients.
#[derive(Clone)]
pub struct TrustRoots {
    pem: Vec<u8>,
}

impl fmt::Debug for TrustRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustRoots")
            .field("pem_bytes", &self.pem.len())
            .finish()
    }
}

impl TrustRoots {
    /// Reads one or more PEM CA certificates and checks that each can be a trust anchor.
    ///
    /// # Errors
    /// [`Error::Read`] for an unreadable file, [`Error::Certificate`] for one without usable
    /// certificates.
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::check(read(path)?, &path.display().to_string())
    }

    /// As [`TrustRoots::load`], from PEM text already in memory.
    ///
    /// # Errors
    /// As [`TrustRoots::load`], except [`Error::Read`].
    pub fn from_pem(pem: impl Into<Vec<u8>>) -> Result<Self, Error> {
        Self::check(pem.into(), "the CA certificate PEM")
    }

    fn check(pem: Vec<u8>, origin: &str) -> Result<Self, Error> {
        let mut store = RootCertStore::empty();
        for cert in parse_certificates(&pem, origin)? {
            store.add(cert).map_err(|e| Error::Certificate {
                origin: origin.to_string(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        Ok(Self { pem })
    }

    /// tonic's form.
    pub fn to_tonic(&self) -> tonic::transport::Certificate {
        tonic::transport::Certificate::from_pem(&self.pem)
    }
}

// === impl ServerTls ===

/// How the server speaks TLS: its identity, and optionally the CA its clients' certificates must
/// be signed by (mTLS).
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The server's certificate chain and key.
    pub identity: Identity,
    /// When set, clients must present a certificate signed by one of these CAs.
    pub client_ca: Option<TrustRoots>,
    /// With `client_ca`: clients without a certificate are let in too (one that presents a
    /// certificate must still present a valid one).
    pub client_auth_optional: bool,
}

impl ServerTls {
    /// TLS with `identity` and no client certificates.
    pub fn new(identity: Identity) -> Self {
        Self {
            identity,
            client_ca: None,
            client_auth_optional: false,
        }
    }

    /// Also requires client certificates signed by `client_ca`.
    #[must_use]
    pub fn with_client_ca(self, client_ca: TrustRoots) -> Self {
        Self {
            client_ca: Some(client_ca),
            ..self
        }
    }

    /// tonic's server configuration.
    pub fn to_tonic(&self) -> tonic::transport::ServerTlsConfig {
        let mut config = tonic::transport::ServerTlsConfig::new()
            .identity(self.identity.to_tonic())
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.client_ca {
            config = config
                .client_ca_root(ca.to_tonic())
                .client_auth_optional(self.client_auth_optional);
        }
        config
    }

    /// One word for logs: `tls` or `mtls` (or `mtls-optional`).
    pub fn mode(&self) -> &'static str {
        match (&self.client_ca, self.client_auth_optional) {
            (None, _) => "tls",
            (Some(_), false) => "mtls",
            (Some(_), true) => "mtls-optional",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh self-signed certificate for `localhost` and its key, as PEM.
    fn self_signed() -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        let cert = params.self_signed(&key).expect("sign");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_matching_certificate_and_key_make_an_identity() {
        let (cert, key) = self_signed();
        Identity::from_pem(cert.as_str(), key.as_str()).expect("valid pair");
        TrustRoots::from_pem(cert).expect("a self-signed certificate is a usable root");
    }

    #[test]
    fn a_key_from_another_pair_is_refused() {
        let (cert, _) = self_signed();
        let (_, other_key) = self_signed();
        let error = Identity::from_pem(cert, other_key).expect_err("mismatch");
        assert!(matches!(error, Error::KeyMismatch { .. }), "{error}");
        assert!(error.to_string().contains("does not belong"), "{error}");
    }

    #[test]
    fn swapped_or_empty_files_are_named_errors() {
        let (cert, key) = self_signed();
        let error = Identity::from_pem(key.as_str(), cert.as_str()).expect_err("swapped");
        assert!(
            error.to_string().contains("no PEM certificate found"),
            "{error}"
        );
        let error = Identity::from_pem(cert.as_str(), cert.as_str()).expect_err("no key");
        assert!(error.to_string().contains("no PEM private key"), "{error}");
        let error = TrustRoots::from_pem("").expect_err("empty");
        assert!(matches!(error, Error::Certificate { .. }), "{error}");
        let error = TrustRoots::load(Path::new("/no/such/ca.pem")).expect_err("missing");
        assert!(error.to_string().contains("/no/such/ca.pem"), "{error}");
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let (cert, key) = self_signed();
        let identity = Identity::from_pem(cert, key.as_str()).expect("valid pair");
        let shown = format!("{identity:?}");
        assert!(!shown.contains("PRIVATE"), "{shown}");
        let body = key.lines().nth(1).expect("a base64 line");
        assert!(!shown.contains(body), "{shown}");
    }
}
