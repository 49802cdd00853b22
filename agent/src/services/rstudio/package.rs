//! Posit's RStudio Server package: the pin per distribution family (version, URL, and SHA-256
//! or Posit's signing-key fingerprint), the install steps, and a download that is verified
//! before anything uses it.

use std::fmt;
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

use super::signature::{self, Tools, MAX_KEY_BYTES, POSIT_FINGERPRINT};
use super::KIND;
use crate::platform::os::{Family, Os};
use crate::platform::packages::LocalPackage;
use crate::services::ServiceError;

/// The pinned RStudio Server release.
pub const VERSION: &str = "2026.07.0-139";

/// The package the `.deb` installs, as dpkg records it.
pub const PACKAGE_NAME: &str = "rstudio-server";

/// [`VERSION`] as dpkg records it: Posit's version is `2026.07.0+139` (the file name writes
/// `-`). Only the "already installed" check of the batch uses it; not confirmed against the
/// package, which cannot be downloaded here; were it wrong, the check would call the file
/// missing and apt-get, given the installed version again, would change nothing.
pub const PACKAGE_VERSION: &str = "2026.07.0+139";

/// SHA-256 of the jammy `.deb` of [`VERSION`] (as pinned by public Dockerfiles and the
/// project's reference; Posit's download page lists it).
const JAMMY_SHA256: &str = "e7b310c9e46811635b8dea8df82c729686c3a78f35cfa7767d9567e30f528465";

/// Packages larger than this are refused while downloading (the .deb is ~150 MB).
const MAX_PACKAGE_BYTES: u64 = 1 << 30;

/// One build of the pinned release, and how it is verified before install: by a pinned
/// SHA-256, by Posit's signature checked against the pinned key fingerprint, or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The release.
    pub version: &'static str,
    /// Posit's build name (`jammy`, `rhel9`).
    pub build: &'static str,
    /// Posit's download URL.
    pub url: &'static str,
    /// SHA-256 of the file, lowercase hex, when one is pinned.
    pub sha256: Option<&'static str>,
    /// The fingerprint of the key whose signature the file must carry, when its format's
    /// signature can be checked here (rpm).
    pub signed_by: Option<&'static str>,
}

impl Pin {
    /// The local file name (the URL's last segment).
    pub fn file_name(&self) -> &'static str {
        self.url.rsplit('/').next().unwrap_or(self.url)
    }
}

/// The pin for `os`: the jammy build on Debian 12 and Ubuntu 22.04/24.04 (Posit documents jammy
/// for all three), verified by SHA-256 (Posit's dpkg-sig signature is not checked: see
/// `docs/rstudio.md`); the rhel8/rhel9 build on EL, verified by Posit's rpm signature against
/// the pinned fingerprint (no SHA-256 of these builds could be confirmed from Posit or any
/// credible source).
pub fn pin(os: &Os) -> Pin {
    match os.family {
        Family::Debian => Pin {
            version: VERSION,
            build: "jammy",
            url: "https://download2.rstudio.org/server/jammy/amd64/rstudio-server-2026.07.0-139-amd64.deb",
            sha256: Some(JAMMY_SHA256),
            signed_by: None,
        },
        Family::RedHat if os.version_id.starts_with('8') => Pin {
            version: VERSION,
            build: "rhel8",
            url: "https://download2.rstudio.org/server/rhel8/x86_64/rstudio-server-rhel-2026.07.0-139-x86_64.rpm",
            sha256: None,
            signed_by: Some(POSIT_FINGERPRINT),
        },
        Family::RedHat => Pin {
            version: VERSION,
            build: "rhel9",
            url: "https://download2.rstudio.org/server/rhel9/x86_64/rstudio-server-rhel-2026.07.0-139-x86_64.rpm",
            sha256: None,
            signed_by: Some(POSIT_FINGERPRINT),
        },
    }
}

/// One install step: fetch steps before the batched package transaction, [`Step::Batch`] in
/// it, the rest after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Fetch `url` to `to`, keeping it only when its SHA-256 is `sha256` (when one is pinned).
    Download {
        /// Where from.
        url: String,
        /// The expected SHA-256, lowercase hex; `None`: the signature is the check.
        sha256: Option<String>,
        /// Where to.
        to: PathBuf,
    },
    /// Check that `package` carries a good signature by the key at `key_url`, whose
    /// fingerprint must be `fingerprint` (checked before the key is used), in a private rpm
    /// keyring; the package is removed when it does not.
    VerifySignature {
        /// The downloaded package.
        package: PathBuf,
        /// Where the signing key is fetched from.
        key_url: String,
        /// The pinned fingerprint.
        fingerprint: String,
    },
    /// Install this verified file in the one batched package transaction, beside R and every
    /// other service's packages (apt resolves its dependencies in the same transaction); after
    /// the batch, the service checks that it landed.
    Batch(LocalPackage),
    /// Run this argv (after the batch).
    Run(Vec<String>),
    /// Run this argv only when systemd is PID 1.
    Systemd(Vec<String>),
}

impl Step {
    /// Whether the step runs before the batched package transaction (it downloads or
    /// verifies, and installs nothing).
    pub fn is_fetch(&self) -> bool {
        matches!(self, Self::Download { .. } | Self::VerifySignature { .. })
    }

    /// The verified file the step puts into the batched transaction.
    pub fn batched(&self) -> Option<&LocalPackage> {
        match self {
            Self::Batch(local) => Some(local),
            _ => None,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Download {
                url,
                sha256: Some(sha256),
                to,
            } => write!(
                f,
                "download {url} to {} and verify SHA-256 {sha256}, before the batched package transaction",
                to.display()
            ),
            Self::Download {
                url,
                sha256: None,
                to,
            } => write!(
                f,
                "download {url} to {}, before the batched package transaction (no SHA-256 pinned: the signature is the check)",
                to.display()
            ),
            Self::VerifySignature {
                package,
                key_url,
                fingerprint,
            } => write!(
                f,
                "verify {} is signed by key {fingerprint} (fetched from {key_url}, fingerprint checked first) with rpmkeys in a private keyring, before installing",
                package.display()
            ),
            Self::Batch(local) => write!(
                f,
                "install {} ({} {}) in the one batched apt transaction, with R and every other service's packages",
                local.path.display(),
                local.name,
                local.version
            ),
            Self::Run(argv) => write!(f, "run {} (after the batch)", argv.join(" ")),
            Self::Systemd(argv) => write!(
                f,
                "run {} (after the batch, when systemd is PID 1)",
                argv.join(" ")
            ),
        }
    }
}

fn download_failed(url: &str, detail: impl fmt::Display) -> ServiceError {
    ServiceError::Refused {
        service: KIND,
        reason: "rstudio-download-failed",
        detail: format!("failed to download '{url}': {detail}"),
    }
}

/// Download `url` to `to` through a `.part` file, hashing as it arrives; `to` appears only when
/// the SHA-256 is `sha256` (any file when `None`: a signature check must follow). A wrong
/// checksum leaves nothing behind. A `to` already there (fetched before the batch) is kept
/// without downloading again when it has the right SHA-256, or, with no SHA-256 pinned, always:
/// the signature check that must follow runs on it every time.
pub async fn download_verified(
    url: &str,
    sha256: Option<&str>,
    to: &Path,
) -> Result<(), ServiceError> {
    let kept = match sha256 {
        Some(sha256) => file_sha256(to)
            .await
            .is_some_and(|actual| actual.eq_ignore_ascii_case(sha256)),
        None => to.is_file(),
    };
    if kept {
        return Ok(());
    }
    let part = to.with_extension("part");
    let result = fetch(url, &part, MAX_PACKAGE_BYTES).await.and_then(|actual| {
        let Some(sha256) = sha256 else {
            return Ok(());
        };
        if actual.eq_ignore_ascii_case(sha256) {
            Ok(())
        } else {
            Err(ServiceError::Refused {
                service: KIND,
                reason: "rstudio-checksum-mismatch",
                detail: format!(
                    "'{url}' has SHA-256 {actual}, the pin says {sha256}; nothing was installed"
                ),
            })
        }
    });
    match result {
        Ok(()) => std::fs::rename(&part, to).map_err(crate::services::io_error(KIND, "rename", to)),
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            Err(e)
        }
    }
}

/// The SHA-256 of the file at `path`, lowercase hex; `None` when it cannot be read.
async fn file_sha256(path: &Path) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await.ok()?;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match file.read(&mut buf).await.ok()? {
            0 => break,
            n => digest.update(&buf[..n]),
        }
    }
    Some(data_encoding::HEXLOWER.encode(digest.finish().as_ref()))
}

/// Check that `package` carries a good signature by the key at `key_url`, whose only primary
/// key must have the fingerprint `fingerprint`; the package is removed when it does not, so
/// nothing unverified is left for a later install.
pub async fn verify_signature(
    package: &Path,
    key_url: &str,
    fingerprint: &str,
    tools: &Tools,
) -> Result<(), ServiceError> {
    let key = package.with_extension("key");
    let result = async {
        fetch(key_url, &key, MAX_KEY_BYTES).await?;
        signature::verify_rpm(package, &key, fingerprint, tools)
            .await
            .map_err(|e| ServiceError::Refused {
                service: KIND,
                reason: e.reason(),
                detail: e.to_string(),
            })
    }
    .await;
    let _ = std::fs::remove_file(&key);
    if result.is_err() {
        let _ = std::fs::remove_file(package);
    }
    result
}

/// Fetch `url` into `part` (at most `max` bytes); the SHA-256 of what arrived, lowercase hex.
async fn fetch(url: &str, part: &Path, max: u64) -> Result<String, ServiceError> {
    let mut response = reqwest::get(url)
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| download_failed(url, e))?;
    let mut file = tokio::fs::File::create(part)
        .await
        .map_err(crate::services::io_error(KIND, "create", part))?;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut total = 0u64;
    while let Some(chunk) = response.chunk().await.map_err(|e| download_failed(url, e))? {
        total += chunk.len() as u64;
        if total > max {
            return Err(download_failed(url, format!("larger than {max} bytes")));
        }
        digest.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(crate::services::io_error(KIND, "write", part))?;
    }
    file.sync_all()
        .await
        .map_err(crate::services::io_error(KIND, "write", part))?;
    Ok(data_encoding::HEXLOWER.encode(digest.finish().as_ref()))
}
