//! The instance passphrase (DESIGN §4.4): 11 RFC 1751 words, generated once, kept in a
//! root-only file, compared in constant time, hashed with argon2 for JupyterLab.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHasher, SaltString};
use rand::rngs::OsRng;
use rand::Rng;
use subtle::ConstantTimeEq;

use crate::platform::exec;

/// Words in a passphrase.
pub const WORDS: usize = 11;
/// The longest passphrase: 11 words of at most 4 letters and 10 spaces.
pub const MAX_LEN: usize = WORDS * 4 + WORDS - 1;

/// A secret passphrase. Never printed: `Debug` is redacted, there is no `Display`, and the
/// buffer is zeroed when the last clone is dropped. Clones share the buffer and the argon2 hash
/// ([`Passphrase::argon2_once`]), so the hash can be worked out on a blocking thread while the
/// account is created, and JupyterLab's configuration picks it up.
#[derive(Clone)]
pub struct Passphrase(Arc<Secret>);

/// The shared part of a [`Passphrase`].
struct Secret {
    text: String,
    /// The argon2 hash once computed, or why it could not be (not secret: a salted hash).
    argon2: OnceLock<Result<String, String>>,
    /// Whether [`Passphrase::start_argon2`] was called (one blocking task is enough).
    argon2_started: AtomicBool,
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // SAFETY: writing zero bytes keeps the string valid UTF-8.
        unsafe { self.text.as_bytes_mut() }.fill(0);
    }
}

impl Passphrase {
    /// Wrap an existing passphrase.
    pub fn new(text: String) -> Self {
        Self(Arc::new(Secret {
            text,
            argon2: OnceLock::new(),
            argon2_started: AtomicBool::new(false),
        }))
    }

    /// A fresh passphrase: 11 words drawn uniformly from the 2048-word dictionary with the OS
    /// random number generator (121 bits).
    pub fn generate() -> Self {
        let words = dictionary();
        let mut rng = OsRng;
        let chosen: Vec<&str> = (0..WORDS)
            .map(|_| words[rng.gen_range(0..words.len())])
            .collect();
        Self::new(chosen.join(" "))
    }

    /// [`argon2_hash`] of this passphrase, computed once and shared by every clone; a second
    /// caller while the first computes waits for its result. Blocking (argon2 is meant to be
    /// slow: tens of milliseconds here, seconds under emulation): call it off the runtime.
    pub fn argon2_once(&self) -> Result<String, SecretError> {
        self.0
            .argon2
            .get_or_init(|| {
                // Background work: the services starting meanwhile come first (here, when no
                // thread can be started).
                let passphrase = self.clone();
                exec::at_background_priority(move || argon2_hash(&passphrase))
                    .unwrap_or_else(|_| argon2_hash(self))
                    .map_err(|e| match e {
                        SecretError::Hash(detail) => detail,
                        other => other.to_string(),
                    })
            })
            .clone()
            .map_err(SecretError::Hash)
    }

    /// Start [`Self::argon2_once`] on a blocking thread now (once per passphrase), so that the
    /// hash is ready when it is asked for. Its outcome is kept, not returned: an error reaches
    /// whoever asks.
    pub fn start_argon2(&self) {
        if self.0.argon2_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let passphrase = self.clone();
        // Detached on purpose: the result lives in the shared cell; a panic leaves the cell
        // empty and the next caller computes again.
        drop(tokio::task::spawn_blocking(move || {
            let _ = passphrase.argon2_once();
        }));
    }

    /// The secret itself, for the few places that must hand it on (stdin of chpasswd, hashing).
    pub fn expose(&self) -> &str {
        &self.0.text
    }

    /// Constant-time comparison with `candidate`.
    pub fn matches(&self, candidate: &str) -> bool {
        self.0.text.as_bytes().ct_eq(candidate.as_bytes()).into()
    }
}

/// The RFC 1751 dictionary. The `rfc1751` crate keeps its list private, so it is recovered
/// through the public encoder: the first word of an 8-byte key encodes the key's top 11 bits.
pub fn dictionary() -> &'static [&'static str] {
    static WORDS: OnceLock<Vec<&'static str>> = OnceLock::new();
    WORDS.get_or_init(|| {
        use rfc1751::ToRfc1751;
        (0u64..2048)
            .map(|i| {
                let key = (i << 53).to_be_bytes();
                let encoded = key[..].to_rfc1751().unwrap_or_default();
                let first = encoded.split(' ').next().unwrap_or_default().to_owned();
                &*Box::leak(first.into_boxed_str())
            })
            .collect()
    })
}

/// Why the passphrase could not be loaded, stored or hashed.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Reading or writing the file failed.
    #[error("failed to {action} '{path}': {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is readable by others or owned by someone else.
    #[error("'{path}' must be mode 0600 and owned by uid {expected_uid}; found mode {mode:04o}, uid {uid}")]
    Unsafe {
        /// The path.
        path: PathBuf,
        /// The mode found.
        mode: u32,
        /// The owner found.
        uid: u32,
        /// The owner required.
        expected_uid: u32,
    },
    /// The file does not hold a passphrase.
    #[error("'{path}' does not hold a passphrase of {WORDS} words")]
    Malformed {
        /// The path.
        path: PathBuf,
    },
    /// The file does not hold a token.
    #[error("'{path}' does not hold a token ({what})")]
    NotAToken {
        /// The path.
        path: PathBuf,
        /// What a token is.
        what: &'static str,
    },
    /// Hashing failed.
    #[error("failed to hash the passphrase: {0}")]
    Hash(String),
}

impl SecretError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Io { source, .. } if crate::fsutil::is_disk_full(source) => "disk-full",
            Self::Io { .. } => "secret-io",
            Self::Unsafe { .. } => "secret-unsafe-file",
            Self::Malformed { .. } | Self::NotAToken { .. } => "secret-malformed",
            Self::Hash(_) => "secret-hash-failed",
        }
    }
}

/// Load the passphrase from `path`, or generate one and store it there (0600, in a 0700
/// directory, written to a temporary file and renamed). Refuses a file others can read.
pub fn load_or_create(path: &Path) -> Result<Passphrase, SecretError> {
    load_or_store(path, None)
}

/// [`load_or_create`], storing `made` (a passphrase generated earlier, whose hash may already be
/// under way) instead of a new one when `path` holds none; `made` is dropped when it does.
pub fn load_or_store(path: &Path, made: Option<Passphrase>) -> Result<Passphrase, SecretError> {
    match read_private_file(path)? {
        Some(text) => {
            let passphrase = Passphrase::new(text.trim().to_owned());
            drop(Passphrase::new(text));
            if passphrase.expose().split(' ').count() != WORDS {
                return Err(SecretError::Malformed {
                    path: path.to_path_buf(),
                });
            }
            Ok(passphrase)
        }
        None => {
            let passphrase = made.unwrap_or_else(Passphrase::generate);
            store(path, &passphrase)?;
            Ok(passphrase)
        }
    }
}

/// The contents of the secret file `path`, or `None` when there is none. Refuses a file that is
/// not a regular file, that others can read or write, or that someone else owns.
pub(crate) fn read_private_file(path: &Path) -> Result<Option<String>, SecretError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            let expected_uid = nix::unistd::geteuid().as_raw();
            let mode = meta.permissions().mode() & 0o7777;
            if !meta.is_file() || mode & 0o077 != 0 || meta.uid() != expected_uid {
                return Err(SecretError::Unsafe {
                    path: path.to_path_buf(),
                    mode,
                    uid: meta.uid(),
                    expected_uid,
                });
            }
            std::fs::read_to_string(path)
                .map(Some)
                .map_err(|source| SecretError::Io {
                    action: "read",
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SecretError::Io {
            action: "inspect",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn store(path: &Path, passphrase: &Passphrase) -> Result<(), SecretError> {
    let mut contents = format!("{}\n", passphrase.expose());
    let stored = store_private_file(path, contents.as_bytes());
    // SAFETY: zero bytes keep the string valid UTF-8.
    unsafe { contents.as_bytes_mut() }.fill(0);
    stored
}

/// Store `contents` as the secret file `path`: 0600, in a 0700 directory, written to a
/// temporary file and renamed (removed on every failure, so a full disk leaves no stray copy).
pub(crate) fn store_private_file(path: &Path, contents: &[u8]) -> Result<(), SecretError> {
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| SecretError::Io {
            action,
            path,
            source,
        }
    };
    if let Some(dir) = path.parent() {
        crate::fsutil::ensure_dir(dir, 0o700).map_err(io("create", dir))?;
    }
    crate::fsutil::write_atomic(path, contents, 0o600, None).map_err(io("store", path))
}

/// The argon2id parameters of [`argon2_hash`]: 7 MiB, 5 passes, 1 lane, the lowest-memory row
/// of OWASP's equivalent argon2id minimums (Password Storage Cheat Sheet: 46 MiB/1, 19 MiB/2,
/// 12 MiB/3, 9 MiB/4, 7 MiB/5, all with 1 lane). The passphrase is 11 words drawn uniformly
/// from 2048 (121 bits), so guessing it is out of reach whatever the hash costs; the floor is
/// kept as policy, and of the equivalent rows this one does the least work (35 840 KiB-passes
/// against 38 912 for the 19 MiB row, the `argon2` crate's default) and touches the least
/// memory, which counts on a small instance at boot, where the hash gates JupyterLab's
/// configuration. Jupyter Server verifies with the parameters written in the hash (argon2-cffi's
/// `PasswordHasher.verify` reads them from the PHC string), not its own.
pub const ARGON2_PARAMS: (u32, u32, u32) = (7168, 5, 1);

/// The argon2id hasher with [`ARGON2_PARAMS`].
fn hasher() -> Result<argon2::Argon2<'static>, SecretError> {
    let (m_cost, t_cost, p_cost) = ARGON2_PARAMS;
    let params = argon2::Params::new(m_cost, t_cost, p_cost, None)
        .map_err(|e| SecretError::Hash(e.to_string()))?;
    Ok(argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        params,
    ))
}

/// The argon2id hash in the form Jupyter Server accepts for `PasswordIdentityProvider.hashed_password`:
/// `argon2:` followed by the PHC string.
pub fn argon2_hash(passphrase: &Passphrase) -> Result<String, SecretError> {
    let salt = SaltString::generate(&mut OsRng);
    let hash = hasher()?
        .hash_password(passphrase.expose().as_bytes(), &salt)
        .map_err(|e| SecretError::Hash(e.to_string()))?;
    Ok(format!("argon2:{hash}"))
}

/// Whether `hashed` (in [`argon2_hash`]'s form) is a hash of `passphrase`.
pub fn argon2_verify(passphrase: &Passphrase, hashed: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    let Some(parsed) = hashed
        .strip_prefix("argon2:")
        .and_then(|phc| PasswordHash::new(phc).ok())
    else {
        return false;
    };
    argon2::Argon2::default()
        .verify_password(passphrase.expose().as_bytes(), &parsed)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHash, PasswordVerifier};

    #[tokio::test]
    async fn clones_share_one_argon2_hash_started_early() {
        let passphrase = Passphrase::generate();
        let clone = passphrase.clone();
        passphrase.start_argon2();
        // Asked for while (or after) the blocking task computes it: one hash, the same for every
        // clone, and a hash of this passphrase.
        let asked = tokio::task::spawn_blocking(move || clone.argon2_once())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(passphrase.argon2_once().unwrap(), asked);
        assert!(argon2_verify(&passphrase, &asked));
        assert!(!argon2_verify(&Passphrase::generate(), &asked));
        // A fresh salt per passphrase, not per process.
        assert_ne!(Passphrase::generate().argon2_once().unwrap(), asked);
    }

    #[test]
    fn the_dictionary_is_rfc1751s() {
        let words = dictionary();
        assert_eq!(words.len(), 2048);
        let distinct: std::collections::BTreeSet<_> = words.iter().collect();
        assert_eq!(distinct.len(), 2048);
        assert!(words
            .iter()
            .all(|w| (1..=4).contains(&w.len()) && w.bytes().all(|b| b.is_ascii_uppercase())));
        assert_eq!(words[0], "A");
        assert_eq!(words[2047], "YOKE");
    }

    #[test]
    fn generated_passphrases_have_eleven_words_and_fit_a_tag() {
        let words = dictionary();
        for _ in 0..200 {
            let p = Passphrase::generate();
            let parts: Vec<&str> = p.expose().split(' ').collect();
            assert_eq!(parts.len(), WORDS);
            assert!(parts.iter().all(|w| words.contains(w)));
            assert!(p.expose().len() <= MAX_LEN);
            assert!(("exoPw:".len() + p.expose().len()) <= 60);
        }
        assert_eq!(MAX_LEN, 54);
        assert_ne!(
            Passphrase::generate().expose(),
            Passphrase::generate().expose()
        );
    }

    #[test]
    fn debug_is_redacted_and_matching_is_exact() {
        let p = Passphrase::new("A B C".into());
        assert_eq!(format!("{p:?}"), "Passphrase(<redacted>)");
        assert!(p.matches("A B C"));
        assert!(!p.matches("A B D"));
        assert!(!p.matches("A B"));
    }

    #[test]
    fn stored_once_with_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets/passphrase");
        let first = load_or_create(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let second = load_or_create(&path).unwrap();
        assert_eq!(first.expose(), second.expose());
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "no temp files left"
        );
    }

    #[test]
    fn a_readable_file_is_refused_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passphrase");
        std::fs::write(&path, "A B C D E F G H I J K\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&path).unwrap_err();
        assert_eq!(err.reason(), "secret-unsafe-file");
        assert!(err.to_string().contains("0644"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            load_or_create(&path).unwrap().expose(),
            "A B C D E F G H I J K"
        );
        std::fs::write(&path, "too short\n").unwrap();
        assert_eq!(
            load_or_create(&path).unwrap_err().reason(),
            "secret-malformed"
        );
    }

    #[test]
    fn the_hash_verifies_in_jupyters_form() {
        let p = Passphrase::generate();
        let hashed = argon2_hash(&p).unwrap();
        let phc = hashed.strip_prefix("argon2:").expect("jupyter's prefix");
        assert!(phc.starts_with("$argon2id$v=19$m=7168,t=5,p=1$"), "{phc}");
        let parsed = PasswordHash::new(phc).unwrap();
        assert!(argon2::Argon2::default()
            .verify_password(p.expose().as_bytes(), &parsed)
            .is_ok());
        assert!(argon2::Argon2::default()
            .verify_password(b"wrong", &parsed)
            .is_err());
        assert!(!hashed.contains(p.expose()));
        assert!(argon2_verify(&p, &hashed));
        assert!(!argon2_verify(&Passphrase::generate(), &hashed));
        assert!(!argon2_verify(&p, "argon2:not a hash"));
    }
}
