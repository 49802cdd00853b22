//! Posit's signature on the RStudio Server rpm, verified before install with the tools EL ships
//! (`gpg`, `rpmkeys`) against Posit's key pinned by fingerprint: the key's fingerprint is checked
//! first (`gpg --show-keys` in a private home), then the key is imported into a private rpm
//! database (`rpmkeys --dbpath <temporary directory> --import`) and the package checked with
//! `rpmkeys --dbpath … --checksig` requiring a signature (`_pkgverify_level signature`: an
//! unsigned package is refused, not merely digest-checked). The system's rpm keyring and
//! GnuPG home are never touched.
//!
//! Posit's key: <https://posit.co/code-signing/>; rpm's verification levels:
//! <https://rpm-software-management.github.io/rpm/manual/signatures_digests.html>.

use std::path::{Path, PathBuf};

use crate::platform::exec;

/// Posit's code-signing key, as Posit publishes it.
pub const POSIT_KEY_URL: &str = "https://dl.posit.co/public/open/gpg.51C0B5BB19F92D60.key";

/// The fingerprint of Posit's code-signing key (key id `51C0B5BB19F92D60`).
pub const POSIT_FINGERPRINT: &str = "8B65E5A107BBEFE3BA99C59751C0B5BB19F92D60";

/// Signing keys larger than this are refused while downloading.
pub const MAX_KEY_BYTES: u64 = 1 << 20;

/// How many lines of a tool's output an error keeps.
const TAIL_LINES: usize = 6;

/// The tools used, by path (names on `PATH` in production).
#[derive(Debug, Clone)]
pub struct Tools {
    /// `gpg` (Debian `gpg`, EL `gnupg2`).
    pub gpg: PathBuf,
    /// `rpmkeys` (Debian `rpm`, EL `rpm`).
    pub rpmkeys: PathBuf,
}

impl Default for Tools {
    fn default() -> Self {
        Self {
            gpg: "gpg".into(),
            rpmkeys: "rpmkeys".into(),
        }
    }
}

/// Why a package's signature was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// A tool could not be run.
    #[error("failed to run '{command}': {source}")]
    Tool {
        /// The command.
        command: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The private keyring could not be made.
    #[error("failed to create a private keyring directory: {0}")]
    Keyring(std::io::Error),
    /// The key file holds no readable OpenPGP key.
    #[error("'{key}' holds no readable OpenPGP public key: {detail}")]
    KeyUnreadable {
        /// The key file.
        key: PathBuf,
        /// What gpg said.
        detail: String,
    },
    /// The key file holds another key (or more than the pinned one).
    #[error(
        "'{key}' holds the key(s) {found}, not only the pinned {pinned}; refusing to trust it"
    )]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The primary key fingerprints found.
        found: String,
        /// The pinned fingerprint.
        pinned: String,
    },
    /// rpm would not import the key.
    #[error("'{command}' failed: {detail}")]
    Import {
        /// The command.
        command: String,
        /// Its output.
        detail: String,
    },
    /// The package carries no good signature by the pinned key (unsigned, signed by another
    /// key, or changed after signing).
    #[error(
        "'{package}' carries no good signature by the pinned key {pinned}: {detail}; nothing was installed"
    )]
    BadSignature {
        /// The package.
        package: PathBuf,
        /// The pinned fingerprint.
        pinned: String,
        /// What rpmkeys said.
        detail: String,
    },
}

impl SignatureError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Tool { .. } => "rstudio-signature-tool-missing",
            Self::Keyring(_) | Self::Import { .. } => "rstudio-signature-check-failed",
            Self::KeyUnreadable { .. } => "rstudio-signing-key-invalid",
            Self::KeyMismatch { .. } => "rstudio-signing-key-mismatch",
            Self::BadSignature { .. } => "rstudio-signature-invalid",
        }
    }
}

/// The fingerprints of the primary keys in `gpg --with-colons` output (each `fpr` record
/// right after a `pub` record; subkeys' follow `sub`), uppercase.
pub fn primary_fingerprints(colons: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut after_pub = false;
    for line in colons.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.first().copied() {
            Some("pub") => after_pub = true,
            Some("fpr") if after_pub => {
                if let Some(fpr) = fields.get(9).filter(|f| !f.is_empty()) {
                    found.push(fpr.to_ascii_uppercase());
                }
                after_pub = false;
            }
            Some("fpr") => {}
            _ => after_pub = false,
        }
    }
    found
}

async fn run_tool(program: &Path, args: &[&str]) -> Result<exec::Finished, SignatureError> {
    exec::run(program, args, &[("LC_ALL", "C")], None)
        .await
        .map_err(|source| SignatureError::Tool {
            command: exec::shown(program, args),
            source,
        })
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

/// Check that `rpm` carries a good signature by the key in `key`, whose only primary key must
/// have the fingerprint `pinned` (40 hex digits). Nothing outside a private temporary
/// directory is read or written besides the two files.
pub async fn verify_rpm(
    rpm: &Path,
    key: &Path,
    pinned: &str,
    tools: &Tools,
) -> Result<(), SignatureError> {
    let private = tempfile::Builder::new()
        .prefix("exoagent-rpmkeys.")
        .tempdir()
        .map_err(SignatureError::Keyring)?;
    let gnupg = private.path().join("gnupg");
    let dbpath = private.path().join("rpmdb");
    for dir in [&gnupg, &dbpath] {
        crate::fsutil::ensure_dir(dir, 0o700).map_err(SignatureError::Keyring)?;
    }
    // Paths that are not UTF-8 would be passed as empty strings and fail loudly below.
    let shown = run_tool(
        &tools.gpg,
        &[
            "--homedir",
            text(&gnupg),
            "--batch",
            "--no-tty",
            "--with-colons",
            "--show-keys",
            "--",
            text(key),
        ],
    )
    .await?;
    let found = primary_fingerprints(&shown.stdout);
    if !shown.status.success() || found.is_empty() {
        return Err(SignatureError::KeyUnreadable {
            key: key.to_path_buf(),
            detail: shown.tail(TAIL_LINES),
        });
    }
    if found.len() != 1 || !found[0].eq_ignore_ascii_case(pinned) {
        return Err(SignatureError::KeyMismatch {
            key: key.to_path_buf(),
            found: found.join(", "),
            pinned: pinned.to_ascii_uppercase(),
        });
    }
    let db = format!("--dbpath={}", text(&dbpath));
    let import = ["--quiet", db.as_str(), "--import", "--", text(key)];
    let imported = run_tool(&tools.rpmkeys, &import).await?;
    if !imported.status.success() {
        return Err(SignatureError::Import {
            command: exec::shown(&tools.rpmkeys, &import),
            detail: imported.tail(TAIL_LINES),
        });
    }
    let checked = run_tool(
        &tools.rpmkeys,
        &[
            db.as_str(),
            // Refuse a package without a signature (the default accepts good digests alone).
            "--define=_pkgverify_level signature",
            "--checksig",
            "--",
            text(rpm),
        ],
    )
    .await?;
    if checked.status.success() && checked.stdout.contains("signatures OK") {
        Ok(())
    } else {
        let said = format!("{}\n{}", checked.stdout.trim(), checked.stderr.trim());
        Err(SignatureError::BadSignature {
            package: rpm.to_path_buf(),
            pinned: pinned.to_ascii_uppercase(),
            detail: crate::text::last_lines(&said, TAIL_LINES).join(" | "),
        })
    }
}
