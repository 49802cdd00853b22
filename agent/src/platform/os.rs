//! OS detection from os-release: which distribution, whether it is supported, which family and
//! package manager.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The supported releases, for messages.
pub const SUPPORTED: &str =
    "Ubuntu 20.04, 22.04, 24.04; Debian 11, 12, 13; Rocky Linux 8, 9; AlmaLinux 8, 9";

/// A family of distributions sharing packaging and conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Debian and Ubuntu: apt, group `sudo`.
    Debian,
    /// Rocky and AlmaLinux: dnf, group `wheel`.
    RedHat,
}

impl Family {
    /// The family's package manager.
    pub fn package_manager(self) -> PackageManager {
        match self {
            Self::Debian => PackageManager::Apt,
            Self::RedHat => PackageManager::Dnf,
        }
    }

    /// The groups whose members administer the machine, in the order they are added.
    pub fn admin_groups(self) -> &'static [&'static str] {
        match self {
            Self::Debian => &["sudo", "admin"],
            Self::RedHat => &["wheel"],
        }
    }
}

/// A package manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageManager {
    /// apt-get / dpkg.
    Apt,
    /// dnf / rpm.
    Dnf,
}

impl fmt::Display for PackageManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Apt => "apt",
            Self::Dnf => "dnf",
        })
    }
}

/// The detected operating system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Os {
    /// os-release `ID` (e.g. `ubuntu`).
    pub id: String,
    /// os-release `VERSION_ID` (e.g. `22.04`, `9.4`).
    pub version_id: String,
    /// os-release `PRETTY_NAME`, for people.
    pub pretty_name: String,
    /// The family.
    pub family: Family,
    /// Whether this release is one exoagent supports.
    pub supported: bool,
}

/// Why the OS cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OsError {
    /// Neither os-release file could be read.
    #[error("failed to read '{path}': {source}")]
    Unreadable {
        /// The first path tried.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A release exoagent does not support.
    #[error("unsupported OS '{pretty}' (ID={id}, VERSION_ID={version} in '{path}'); supported: {SUPPORTED}")]
    Unsupported {
        /// `ID`.
        id: String,
        /// `VERSION_ID`.
        version: String,
        /// `PRETTY_NAME` (or ID and version).
        pretty: String,
        /// The os-release file read.
        path: PathBuf,
    },
}

impl OsError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreadable { .. } => "os-release-unreadable",
            Self::Unsupported { .. } => "os-unsupported",
        }
    }
}

/// Parse os-release text: `KEY=value` lines, values optionally in single or double quotes with
/// backslash escapes inside double quotes; comments and blank lines ignored.
pub fn parse_os_release(text: &str) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, raw)) = line.split_once('=') else {
            continue;
        };
        let raw = raw.trim();
        let value = if raw.len() >= 2 && raw.starts_with('"') && raw.ends_with('"') {
            let mut out = String::new();
            let mut chars = raw[1..raw.len() - 1].chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    if let Some(next) = chars.next() {
                        out.push(next);
                    }
                } else {
                    out.push(c);
                }
            }
            out
        } else if raw.len() >= 2 && raw.starts_with('\'') && raw.ends_with('\'') {
            raw[1..raw.len() - 1].to_owned()
        } else {
            raw.to_owned()
        };
        fields.insert(key.trim().to_owned(), value);
    }
    fields
}

/// Read `<root>/etc/os-release`, falling back to `<root>/usr/lib/os-release`.
fn read_os_release(root: &Path) -> Result<(PathBuf, String), OsError> {
    let primary = root.join("etc/os-release");
    match std::fs::read_to_string(&primary) {
        Ok(text) => Ok((primary, text)),
        Err(first) => {
            let fallback = root.join("usr/lib/os-release");
            std::fs::read_to_string(&fallback)
                .map(|text| (fallback, text))
                .map_err(|_| OsError::Unreadable {
                    path: primary,
                    source: first,
                })
        }
    }
}

/// What the fields say, supported or not.
fn classify(fields: &HashMap<String, String>) -> Os {
    let get = |key: &str| fields.get(key).cloned().unwrap_or_default();
    let id = get("ID").to_ascii_lowercase();
    let version_id = get("VERSION_ID");
    let like = get("ID_LIKE").to_ascii_lowercase();
    let major = version_id.split('.').next().unwrap_or_default();
    let supported = match id.as_str() {
        "ubuntu" => ["20.04", "22.04", "24.04"].contains(&version_id.as_str()),
        "debian" => ["11", "12", "13"].contains(&version_id.as_str()),
        "rocky" | "almalinux" => ["8", "9"].contains(&major),
        _ => false,
    };
    let redhat_like = ["rhel", "fedora", "centos", "rocky", "almalinux"];
    let family = if redhat_like.contains(&id.as_str())
        || like.split_whitespace().any(|l| redhat_like.contains(&l))
    {
        Family::RedHat
    } else {
        Family::Debian
    };
    let pretty_name = match fields.get("PRETTY_NAME") {
        Some(pretty) if !pretty.is_empty() => pretty.clone(),
        _ => format!("{id} {version_id}").trim().to_owned(),
    };
    Os {
        id,
        version_id,
        pretty_name,
        family,
        supported,
    }
}

/// Detect the OS at `root` and refuse anything unsupported.
pub fn detect(root: &Path) -> Result<Os, OsError> {
    let (path, text) = read_os_release(root)?;
    let os = classify(&parse_os_release(&text));
    if os.supported {
        Ok(os)
    } else {
        Err(OsError::Unsupported {
            id: os.id,
            version: os.version_id,
            pretty: os.pretty_name,
            path,
        })
    }
}

/// Detect the OS at `root` without refusing it (the sandbox runs on any Linux): an unknown
/// distribution gets its family guessed from `ID`/`ID_LIKE`, a missing os-release is
/// "unknown Linux" of the Debian family.
pub fn detect_lenient(root: &Path) -> Result<Os, OsError> {
    match read_os_release(root) {
        Ok((_, text)) => Ok(classify(&parse_os_release(&text))),
        Err(_) => Ok(Os {
            id: "linux".into(),
            version_id: String::new(),
            pretty_name: "unknown Linux".into(),
            family: Family::Debian,
            supported: false,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_comments_and_escapes() {
        let fields = parse_os_release(
            "# comment\n\nNAME=\"Rocky Linux\"\nID='rocky'\nVERSION_ID=9.4\nX=\"a \\\"q\\\" b\"\n",
        );
        assert_eq!(fields["NAME"], "Rocky Linux");
        assert_eq!(fields["ID"], "rocky");
        assert_eq!(fields["VERSION_ID"], "9.4");
        assert_eq!(fields["X"], "a \"q\" b");
    }

    #[test]
    fn lenient_detection_of_a_missing_file_is_unknown_linux() {
        let dir = tempfile::tempdir().unwrap();
        let os = detect_lenient(dir.path()).unwrap();
        assert_eq!(os.pretty_name, "unknown Linux");
        assert!(!os.supported);
        let err = detect(dir.path()).unwrap_err();
        assert_eq!(err.reason(), "os-release-unreadable");
        assert!(err.to_string().contains("etc/os-release"), "{err}");
    }
}
