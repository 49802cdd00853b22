//! The uv that Python environments are built with when the image has none: a pinned release
//! found through the package index (the simple API of PEP 691, or PEP 503's HTML), checked
//! against its pinned SHA-256 and unpacked under `<opt>/tools/uv-<version>/uv`.
//!
//! The pin makes the index only a transport: PyPI, a mirror or a proxy give the same bytes or
//! nothing is installed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fsutil;

/// The uv release fetched when none is on `PATH`.
pub const UV_VERSION: &str = "0.13.9";

/// One published wheel of [`UV_VERSION`]: its file name on the index, SHA-256 and size.
#[derive(Debug)]
pub struct Wheel {
    arch: &'static str,
    /// The file name the index lists.
    pub file: &'static str,
    /// Its SHA-256, lowercase hex.
    pub sha256: &'static str,
    /// Its size in bytes.
    pub size: u64,
}

/// The wheel pinned for this machine's architecture, if any.
pub fn pinned_wheel() -> Option<&'static Wheel> {
    WHEELS.iter().find(|w| w.arch == std::env::consts::ARCH)
}

/// Statically linked builds (musl), so one binary serves every distribution exoagent runs on.
const WHEELS: &[Wheel] = &[
    Wheel {
        arch: "x86_64",
        file: "uv-0.13.9-py3-none-musllinux_1_1_x86_64.whl",
        sha256: "2c45530751517d6c3bbc69a19473f6effe47cce047bede01ffd8af7ea7b36b25",
        size: 19_295_638,
    },
    Wheel {
        arch: "aarch64",
        file: "uv-0.13.9-py3-none-manylinux_2_17_aarch64.manylinux2014_aarch64.musllinux_1_1_aarch64.whl",
        sha256: "5435c5ce14a56431208ca0996416d310f1598e8c2c8ba707688985a16bb82dbe",
        size: 18_026_789,
    },
];

/// PyPI's simple index, used when the environment names no other.
pub const PYPI_SIMPLE: &str = "https://pypi.org/simple";

/// How large the index's page for uv may be (PyPI's JSON lists every release: ~2 MiB today).
const MAX_INDEX_BYTES: usize = 32 << 20;

/// Why uv could not be had.
#[derive(Debug, thiserror::Error)]
pub enum UvError {
    /// No wheel is pinned for this CPU.
    #[error("no uv {UV_VERSION} build is pinned for this machine's architecture ({arch})")]
    UnsupportedArch {
        /// The machine's architecture.
        arch: String,
    },
    /// The index page could not be fetched.
    #[error("the package index page {url} could not be read: {detail}")]
    Index {
        /// The page.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The index does not offer the pinned wheel.
    #[error("the package index page {url} does not list {file}")]
    NotListed {
        /// The page.
        url: String,
        /// The pinned wheel's file name.
        file: String,
    },
    /// The wheel could not be downloaded.
    #[error("failed to download {url}: {detail}")]
    Download {
        /// The wheel's URL.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The wheel is not the pinned one.
    #[error("{url} has SHA-256 {actual}, the pin says {expected}; nothing was installed")]
    Checksum {
        /// The wheel's URL.
        url: String,
        /// What arrived.
        actual: String,
        /// What the pin says.
        expected: String,
    },
    /// The wheel holds no usable executable.
    #[error("the uv wheel {file} could not be unpacked: {detail}")]
    Unpack {
        /// The wheel's file name.
        file: String,
        /// What went wrong.
        detail: String,
    },
    /// A local file operation failed.
    #[error("failed to {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// To what.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl UvError {
    /// Short stable reason for logs and reports.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnsupportedArch { .. } => "uv-unsupported-arch",
            Self::Index { .. } => "uv-index-unreachable",
            Self::NotListed { .. } => "uv-not-listed",
            Self::Download { .. } => "uv-download-failed",
            Self::Checksum { .. } => "uv-checksum-mismatch",
            Self::Unpack { .. } => "uv-unpack-failed",
            Self::Io { .. } => "uv-io",
        }
    }
}

/// Where the pinned uv comes from: an index and the HTTP client to read it with.
#[derive(Clone)]
pub struct UvSource {
    index: String,
    /// Built when first needed: a client trusting the system's store reads and parses every
    /// root certificate, a noticeable part of a second at boot under emulation, and on a baked
    /// image (uv there, the venv up to date) nothing is fetched at all.
    client: std::sync::Arc<std::sync::OnceLock<reqwest::Client>>,
}

impl std::fmt::Debug for UvSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UvSource")
            .field("index", &self.index)
            .finish()
    }
}

impl UvSource {
    /// uv from the simple index at `index` (e.g. `https://pypi.org/simple`).
    pub fn new(index: &str, client: reqwest::Client) -> Self {
        Self {
            index: index.trim_end_matches('/').to_owned(),
            client: std::sync::Arc::new(std::sync::OnceLock::from(client)),
        }
    }

    /// The index the operator set for Python packages (`UV_DEFAULT_INDEX`, `UV_INDEX_URL`,
    /// `PIP_INDEX_URL`, first set wins), else PyPI; a client with connect and total time
    /// limits that trusts the system's certificate store.
    pub fn from_environment() -> Self {
        let index = ["UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
            .unwrap_or_else(|| PYPI_SIMPLE.to_owned());
        Self {
            index: index.trim_end_matches('/').to_owned(),
            client: std::sync::Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// The client, built on first use ([`Self::from_environment`]'s time limits).
    fn client(&self) -> &reqwest::Client {
        self.client.get_or_init(|| {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(30))
                .timeout(Duration::from_secs(600))
                .build()
                .unwrap_or_default()
        })
    }

    /// The index this source reads.
    pub fn index(&self) -> &str {
        &self.index
    }

    /// The pinned uv under `tools_dir`, fetched and unpacked first when it is not there yet.
    pub async fn ensure(&self, tools_dir: &Path) -> Result<PathBuf, UvError> {
        let wheel = pinned_wheel().ok_or_else(|| UvError::UnsupportedArch {
            arch: std::env::consts::ARCH.into(),
        })?;
        let dir = tools_dir.join(format!("uv-{UV_VERSION}"));
        let binary = dir.join("uv");
        // Written only after its wheel's checksum matched (a rename), so its presence is proof.
        if binary.is_file() {
            return Ok(binary);
        }
        let url = self.wheel_url(wheel).await?;
        let bytes = self.download(&url, wheel.size).await?;
        let actual = hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
        if actual != wheel.sha256 {
            return Err(UvError::Checksum {
                url,
                actual,
                expected: wheel.sha256.into(),
            });
        }
        let executable = unpack(wheel.file, &bytes)?;
        let io = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| UvError::Io {
                action,
                path,
                source,
            }
        };
        fsutil::ensure_dir(tools_dir, 0o755).map_err(io("create", tools_dir))?;
        fsutil::ensure_dir(&dir, 0o755).map_err(io("create", &dir))?;
        // Readable and runnable by the instance user, who builds workflow environments.
        fsutil::write_atomic(&binary, &executable, 0o755, None).map_err(io("write", &binary))?;
        tracing::info!(target: "exoagent::platform", uv = %binary.display(), version = UV_VERSION, index = %self.index, "uv fetched and verified");
        Ok(binary)
    }

    /// The wheel's URL as the index lists it (relative links resolved against the page).
    async fn wheel_url(&self, wheel: &Wheel) -> Result<String, UvError> {
        let page = format!("{}/uv/", self.index);
        let failed = |detail: String| UvError::Index {
            url: page.clone(),
            detail,
        };
        let response = self
            .client()
            .get(&page)
            .header(
                reqwest::header::ACCEPT,
                "application/vnd.pypi.simple.v1+json, text/html;q=0.1",
            )
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| failed(e.to_string()))?;
        let base = response.url().clone();
        let body = read_capped(response, MAX_INDEX_BYTES)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let href = listed_href(&body, wheel.file).ok_or_else(|| UvError::NotListed {
            url: page.clone(),
            file: wheel.file.into(),
        })?;
        let mut url = base
            .join(&href)
            .map_err(|e| failed(format!("bad link {href:?}: {e}")))?;
        url.set_fragment(None);
        Ok(url.to_string())
    }

    /// The file at `url`, which must be exactly `size` bytes.
    async fn download(&self, url: &str, size: u64) -> Result<Vec<u8>, UvError> {
        let failed = |detail: String| UvError::Download {
            url: url.to_owned(),
            detail,
        };
        let response = self
            .client()
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| failed(e.to_string()))?;
        let bytes = read_capped(response, size as usize)
            .await
            .map_err(|e| failed(e.to_string()))?;
        if bytes.len() as u64 != size {
            return Err(failed(format!(
                "{} bytes arrived, the pinned wheel has {size}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }
}

/// The body of `response`, failing once it passes `max` bytes.
async fn read_capped(mut response: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > max {
            return Err(format!("larger than {max} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The link the index page gives for `file`: from PEP 691's JSON (`files[].filename/url`), else
/// from PEP 503's HTML (an `href` whose last path segment is the file name).
fn listed_href(body: &[u8], file: &str) -> Option<String> {
    if let Ok(page) = serde_json::from_slice::<serde_json::Value>(body) {
        return page["files"].as_array()?.iter().find_map(|f| {
            (f["filename"].as_str() == Some(file))
                .then(|| f["url"].as_str().map(str::to_owned))
                .flatten()
        });
    }
    let html = String::from_utf8_lossy(body);
    html.split("href=")
        .skip(1)
        .filter_map(|rest| {
            let quote = rest.chars().next().filter(|c| *c == '"' || *c == '\'')?;
            let end = rest[1..].find(quote)?;
            Some(rest[1..1 + end].replace("&amp;", "&"))
        })
        .find(|href| {
            let path = href.split(['#', '?']).next().unwrap_or("");
            path.rsplit('/').next() == Some(file)
        })
}

/// The `uv` executable inside the wheel (`uv-<version>.data/scripts/uv`).
fn unpack(file: &str, wheel: &[u8]) -> Result<Vec<u8>, UvError> {
    let failed = |detail: String| UvError::Unpack {
        file: file.into(),
        detail,
    };
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(wheel)).map_err(|e| failed(e.to_string()))?;
    let member = format!("uv-{UV_VERSION}.data/scripts/uv");
    let mut entry = archive
        .by_name(&member)
        .map_err(|e| failed(format!("{member}: {e}")))?;
    let mut executable = Vec::with_capacity(entry.size() as usize);
    entry
        .read_to_end(&mut executable)
        .map_err(|e| failed(format!("{member}: {e}")))?;
    Ok(executable)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The environment uv runs with so that it trusts the system's certificate store (where an
/// operator or the image puts a site's CA), as the agent itself does; a value the operator set
/// is kept. Both spellings: `UV_SYSTEM_CERTS` (current) and `UV_NATIVE_TLS` (older uv on PATH).
pub fn tls_env() -> Vec<(String, String)> {
    ["UV_SYSTEM_CERTS", "UV_NATIVE_TLS"]
        .iter()
        .filter(|k| std::env::var_os(k).is_none())
        .map(|k| ((*k).to_owned(), "1".to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_exists_for_this_machine_and_names_the_pinned_version() {
        let wheel = pinned_wheel().expect("a pin for this architecture");
        assert!(wheel.file.starts_with(&format!("uv-{UV_VERSION}-")));
        assert_eq!(wheel.sha256.len(), 64);
    }

    #[test]
    fn json_pages_give_the_url_of_the_exact_file() {
        let page = br#"{"files":[{"filename":"uv-0.13.9.tar.gz","url":"https://f/a.tar.gz"},
            {"filename":"x.whl","url":"https://f/x.whl#sha256=00"}]}"#;
        assert_eq!(
            listed_href(page, "x.whl").as_deref(),
            Some("https://f/x.whl#sha256=00")
        );
        assert_eq!(listed_href(page, "y.whl"), None);
    }

    #[test]
    fn html_pages_give_the_link_whose_last_segment_is_the_file() {
        let page = br#"<html><body><a href="../../packages/ab/uv-1-x.whl.metadata">m</a>
            <a href='../../packages/ab/x.whl#sha256=00'>x.whl</a>
            <a href="https://h/p/q.whl?a=1&amp;b=2">q.whl</a></body></html>"#;
        assert_eq!(
            listed_href(page, "x.whl").as_deref(),
            Some("../../packages/ab/x.whl#sha256=00")
        );
        assert_eq!(
            listed_href(page, "q.whl").as_deref(),
            Some("https://h/p/q.whl?a=1&b=2")
        );
        assert_eq!(listed_href(page, "uv-1-x.whl"), None);
    }

    #[test]
    fn a_wheel_without_the_executable_is_refused() {
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut w = zip::ZipWriter::new(&mut buf);
            w.start_file("uv/__init__.py", zip::write::SimpleFileOptions::default())
                .unwrap();
            std::io::Write::write_all(&mut w, b"").unwrap();
            w.finish().unwrap();
        }
        let e = unpack("x.whl", buf.get_ref()).unwrap_err();
        assert_eq!(e.reason(), "uv-unpack-failed");
        assert!(e.to_string().contains("scripts/uv"), "{e}");
        assert_eq!(
            unpack("x.whl", b"not a zip").unwrap_err().reason(),
            "uv-unpack-failed"
        );
    }
}
