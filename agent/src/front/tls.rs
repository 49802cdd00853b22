//! The front's TLS side: rustls (TLS 1.2 and 1.3, ring), one certificate for every ClientHello
//! (the UAP sends no SNI), re-read when its files change, optional client certificates from a
//! CA, and rate-limited logging of refused handshakes.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::ring::default_provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// How often a handshake may look at the certificate files for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(10);
/// Refused handshakes logged per [`LOG_WINDOW`] at most; the rest are counted.
const LOG_BURST: u32 = 10;
const LOG_WINDOW: Duration = Duration::from_secs(60);

/// A certificate, key or CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read.
    #[error("cannot read {what} '{path}': {source}")]
    Read {
        /// `certificate`, `private key` or `client CA`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no usable PEM item of the kind needed.
    #[error("{what} '{path}' is not usable: {detail}")]
    Invalid {
        /// `certificate`, `private key` or `client CA`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The key is not the certificate's key.
    #[error("private key '{key}' does not belong to certificate '{cert}'")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
}

impl TlsError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Read { .. } => "tls-file-unreadable",
            Self::Invalid { .. } => "tls-file-invalid",
            Self::Mismatch { .. } => "tls-key-mismatch",
        }
    }
}

/// The certificate chain in `cert` (PEM) with the private key in `key` (PEM), checked to match.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = load_certificates(cert, "certificate")?;
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error("private key", key, e))?;
    let signing = default_provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| TlsError::Invalid {
            what: "private key",
            path: key.to_owned(),
            detail: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
        },
        // The leaf could not be parsed: the certificate is at fault, not the key.
        other => TlsError::Invalid {
            what: "certificate",
            path: cert.to_owned(),
            detail: other.to_string(),
        },
    })?;
    Ok(certified)
}

/// Every certificate in the PEM file `path`; at least one.
pub fn load_certificates(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            what,
            path: path.to_owned(),
            detail: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn pem_error(what: &'static str, path: &Path, error: rustls::pki_types::pem::Error) -> TlsError {
    match error {
        rustls::pki_types::pem::Error::Io(source) => TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        },
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Invalid {
            what,
            path: path.to_owned(),
            detail: "no PEM block of the expected kind".into(),
        },
        other => TlsError::Invalid {
            what,
            path: path.to_owned(),
            detail: other.to_string(),
        },
    }
}

/// What the front's TLS needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// When set, clients must present a certificate issued by this CA (PEM).
    pub client_ca: Option<PathBuf>,
}

/// A ready acceptor and the log of refused handshakes.
#[derive(Clone)]
pub struct TlsSetup {
    /// Accepts TLS on a client connection.
    pub acceptor: TlsAcceptor,
    /// Logs refused handshakes, rate limited.
    pub log: Arc<HandshakeLog>,
}

impl fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSetup").finish_non_exhaustive()
    }
}

impl TlsSetup {
    /// Load `files` (all checked now) into an acceptor offering HTTP/1.1.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let resolver = Arc::new(ReloadingCert::load(&files.cert, &files.key)?);
        let builder = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions");
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in load_certificates(ca, "client CA")? {
                    roots.add(cert).map_err(|e| TlsError::Invalid {
                        what: "client CA",
                        path: ca.clone(),
                        detail: e.to_string(),
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .map_err(|e| TlsError::Invalid {
                        what: "client CA",
                        path: ca.clone(),
                        detail: e.to_string(),
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(resolver);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            log: Arc::new(HandshakeLog::new(files.client_ca.is_some())),
        })
    }
}

/// The one certificate, whatever the ClientHello names; re-read (at most every
/// [`RELOAD_CHECK`]) when either file's modification time changes, so a renewed certificate is
/// served without a restart. A file that fails to load keeps the previous certificate.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    served: Arc<CertifiedKey>,
    stamps: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl ReloadingCert {
    fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let stamps = (modified(cert), modified(key));
        let served = Arc::new(load_certified_key(cert, key)?);
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: Mutex::new(Current {
                served,
                stamps,
                checked: Instant::now(),
            }),
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.checked.elapsed() >= RELOAD_CHECK {
            current.checked = Instant::now();
            let stamps = (modified(&self.cert), modified(&self.key));
            if stamps != current.stamps {
                match load_certified_key(&self.cert, &self.key) {
                    Ok(loaded) => {
                        current.served = Arc::new(loaded);
                        current.stamps = stamps;
                        tracing::info!(target: "exoagent::front", "serving the renewed certificate");
                    }
                    // A half-written pair: keep serving the old one, look again later.
                    Err(e) => {
                        tracing::warn!(target: "exoagent::front", "keeping the current certificate: {e}")
                    }
                }
            }
        }
        Some(current.served.clone())
    }
}

/// Logs refused handshakes with the peer address: at most [`LOG_BURST`] lines a minute, then a
/// count of the ones left out.
#[derive(Debug)]
pub struct HandshakeLog {
    mutual: bool,
    window: Mutex<(Instant, u32)>,
}

impl HandshakeLog {
    fn new(mutual: bool) -> Self {
        Self {
            mutual,
            window: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Note a handshake from `peer` that failed with `error`. Only refusals worth an operator's
    /// attention are logged (a client certificate missing or not from the CA); garbage and
    /// closed connections are not, or a scan would fill the log.
    pub fn refused(&self, peer: SocketAddr, error: &std::io::Error) {
        let Some(tls) = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return;
        };
        let about_client_certificate = matches!(
            tls,
            rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_)
        );
        if !(self.mutual && about_client_certificate) {
            tracing::debug!(target: "exoagent::front", %peer, "TLS handshake failed: {tls}");
            return;
        }
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if window.0.elapsed() >= LOG_WINDOW {
            if window.1 > LOG_BURST {
                tracing::warn!(
                    target: "exoagent::front",
                    "{} more client-certificate refusals were not logged",
                    window.1 - LOG_BURST
                );
            }
            *window = (Instant::now(), 0);
        }
        window.1 = window.1.saturating_add(1);
        if window.1 <= LOG_BURST {
            tracing::warn!(
                target: "exoagent::front",
                %peer,
                "refused a client without a certificate from the configured CA: {tls}"
            );
        }
    }
}
