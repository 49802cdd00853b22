//! Posit's RStudio Server package: the pin per distribution family (version, URL, SHA-256), the
//! install steps, and a download that is verified before anything uses it.

use std::fmt;
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

use super::KIND;
use crate::platform::os::{Family, Os};
use crate::services::ServiceError;

/// The pinned RStudio Server release.
pub const VERSION: &str = "2026.07.0-139";

/// SHA-256 of the jammy `.deb` of [`VERSION`] (as pinned by public Dockerfiles and the
/// project's reference; Posit's download page lists it).
const JAMMY_SHA256: &str = "e7b310c9e46811635b8dea8df82c729686c3a78f35cfa7767d9567e30f528465";

/// Packages larger than this are refused while downloading (the .deb is ~150 MB).
const MAX_PACKAGE_BYTES: u64 = 1 << 30;

/// One build of the pinned release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The release.
    pub version: &'static str,
    /// Posit's build name (`jammy`, `rhel9`).
    pub build: &'static str,
    /// Posit's download URL.
    pub url: &'static str,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: &'static str,
}

impl Pin {
    /// The local file name (the URL's last segment).
    pub fn file_name(&self) -> &'static str {
        self.url.rsplit('/').next().unwrap_or(self.url)
    }
}

/// The pin for `os`: the jammy build on Debian 12 and Ubuntu 22.04/24.04 (Posit documents jammy
/// for all three); none for EL, whose SHA-256 could not be confirmed from Posit.
pub fn pin(os: &Os) -> Result<Pin, ServiceError> {
    match os.family {
        Family::Debian => Ok(Pin {
            version: VERSION,
            build: "jammy",
            url: "https://download2.rstudio.org/server/jammy/amd64/rstudio-server-2026.07.0-139-amd64.deb",
            sha256: JAMMY_SHA256,
        }),
        Family::RedHat => {
            let build = if os.version_id.starts_with('8') {
                "rhel8"
            } else {
                "rhel9"
            };
            Err(ServiceError::Refused {
                service: KIND,
                reason: "rstudio-pin-missing",
                detail: format!(
                    "no SHA-256 is pinned for the {build} build of RStudio Server {VERSION} \
                     (https://download2.rstudio.org/server/{build}/x86_64/rstudio-server-rhel-{VERSION}-x86_64.rpm); \
                     refusing to install an unverified package"
                ),
            })
        }
    }
}

/// One install step after the batched package transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Fetch `url` to `to`, keeping it only when its SHA-256 is `sha256`.
    Download {
        /// Where from.
        url: String,
        /// The expected SHA-256, lowercase hex.
        sha256: String,
        /// Where to.
        to: PathBuf,
    },
    /// Run this argv.
    Run(Vec<String>),
    /// Run this argv only when systemd is PID 1.
    Systemd(Vec<String>),
}

impl Step {
    /// Whether the step runs before the batched package transaction (it downloads or
    /// verifies, and installs nothing).
    pub fn is_fetch(&self) -> bool {
        matches!(self, Self::Download { .. })
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Download { url, sha256, to } => write!(
                f,
                "download {url} to {} and verify SHA-256 {sha256} before installing",
                to.display()
            ),
            Self::Run(argv) => write!(f, "run {}", argv.join(" ")),
            Self::Systemd(argv) => write!(f, "run {} (when systemd is PID 1)", argv.join(" ")),
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
/// the SHA-256 is `sha256`. A wrong checksum leaves nothing behind. A `to` already there with
/// the right SHA-256 (fetched before the batch) is kept without downloading again.
pub async fn download_verified(url: &str, sha256: &str, to: &Path) -> Result<(), ServiceError> {
    if file_sha256(to)
        .await
        .is_some_and(|actual| actual.eq_ignore_ascii_case(sha256))
    {
        return Ok(());
    }
    let part = to.with_extension("part");
    let result = fetch(url, &part).await.and_then(|actual| {
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
    Some(hex(digest.finish().as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fetch `url` into `part`; the SHA-256 of what arrived, lowercase hex.
async fn fetch(url: &str, part: &Path) -> Result<String, ServiceError> {
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
        if total > MAX_PACKAGE_BYTES {
            return Err(download_failed(url, "larger than 1 GiB"));
        }
        digest.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(crate::services::io_error(KIND, "write", part))?;
    }
    file.sync_all()
        .await
        .map_err(crate::services::io_error(KIND, "write", part))?;
    Ok(hex(digest.finish().as_ref()))
}
