//! The upstream TLS front (DESIGN §4.5, docs/uap.md): a process per fronted service that owns
//! the service's public port, terminates TLS (or passes plain HTTP) and forwards to the service
//! on loopback, plus the certificate it serves and how the agent runs it.

pub mod cert;
pub mod cli;
pub mod proxy;
pub mod settings;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub use proxy::{serve, Front, FrontLimits, Hop};
pub use tls::{TlsError, TlsFiles, TlsSetup};

use crate::model::Endpoint;
use crate::supervise::{Probe, RunAs, RunSpec};
use cert::{CertError, CertNames, CertSource, Installed};
use settings::{CertChoice, TlsSettings};

/// How long a front may take from launch to accepting connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The client CA's installed copy inside the TLS directory.
const CLIENT_CA_FILE: &str = "client-ca.pem";

/// Put in `dir` what the fronts serve: the certificate (generated for `names`, or the
/// operator's) and a copy of the client CA, readable by `owner` only where it matters.
pub fn prepare(
    dir: &Path,
    settings: &TlsSettings,
    names: CertNames,
    owner: Option<(u32, u32)>,
    now: SystemTime,
) -> Result<(Installed, TlsFiles), CertError> {
    let source = match &settings.certificate {
        CertChoice::Generated => CertSource::Generated(names),
        CertChoice::Operator { cert, key } => CertSource::Operator {
            cert: cert.clone(),
            key: key.clone(),
        },
    };
    let installed = cert::ensure(dir, &source, now, owner)?;
    let client_ca = match &settings.client_ca {
        None => None,
        Some(ca) => {
            // Checked to hold certificates before anything was changed; copied so the front's
            // account can read it wherever the operator keeps it.
            tls::load_certificates(ca, "client CA")?;
            let text = std::fs::read(ca).map_err(|source| CertError::Io {
                action: "read",
                path: ca.clone(),
                source,
            })?;
            let copy = dir.join(CLIENT_CA_FILE);
            crate::fsutil::write_if_changed(&copy, &text, 0o644, owner).map_err(|source| {
                CertError::Io {
                    action: "write",
                    path: copy.clone(),
                    source,
                }
            })?;
            Some(copy)
        }
    };
    let files = TlsFiles {
        cert: installed.cert.clone(),
        key: installed.key.clone(),
        client_ca,
    };
    Ok((installed, files))
}

/// How the agent runs the front before one service.
#[derive(Debug, Clone)]
pub struct FrontRun<'a> {
    /// The exoagent executable.
    pub exe: &'a Path,
    /// The public address (the service's configured bind and port).
    pub public: SocketAddr,
    /// The service on loopback.
    pub backend: SocketAddr,
    /// The installed certificate, key and client CA.
    pub files: &'a TlsFiles,
    /// `[tls]`.
    pub settings: &'a TlsSettings,
}

impl FrontRun<'_> {
    /// The supervised command: `exoagent front …` with every choice on the command line (no
    /// secret is among them: the key is a path to a 0600 file).
    pub fn run_spec(&self, cwd: PathBuf, run_as: Option<RunAs>) -> RunSpec {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let mut argv = vec![
            path(self.exe),
            "front".into(),
            "--listen".into(),
            self.public.to_string(),
            "--backend".into(),
            self.backend.to_string(),
            "--cert-file".into(),
            path(&self.files.cert),
            "--key-file".into(),
            path(&self.files.key),
        ];
        if let Some(ca) = &self.files.client_ca {
            argv.extend(["--client-ca-file".into(), path(ca)]);
        }
        if self.settings.require {
            argv.push("--require-tls".into());
        }
        for proxy in &self.settings.trusted_proxies {
            argv.extend(["--trusted-proxy".into(), proxy.to_string()]);
        }
        RunSpec {
            argv,
            env: vec![
                ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
                ("LANG".into(), "C.UTF-8".into()),
                ("EXOAGENT_LOG".into(), "info".into()),
            ],
            cwd,
            run_as,
        }
    }

    /// Ready and alive while it accepts connections on its public port.
    pub fn probe(&self) -> Probe {
        Probe::Tcp {
            addr: Endpoint::direct(self.public).probe_addr(),
        }
    }
}
