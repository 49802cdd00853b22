//! Workflows without Docker: a git repository cloned at a ref as the instance user, its
//! environment built natively from the repo2docker conventions exoagent can honour
//! (`requirements.txt`, `runtime.txt`, `pyproject.toml`/`setup.py`, `apt.txt`, `postBuild`,
//! `start`, a pip-only `environment.yml`), and JupyterLab run in it at the workflow's path.
//! Conventions it cannot honour (a `Dockerfile`, conda-only packages, Julia, R) are refused
//! with the file and the reason.
//!
//! repo2docker's conventions: <https://repo2docker.readthedocs.io/en/latest/config_files.html>.

pub mod build;
pub mod recipe;
pub mod run;
pub mod source;

use std::path::{Path, PathBuf};

/// `workflow_*` under `[services.jupyterlab]`: the repository, its ref and the URL path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowSettings {
    /// The git URL (validated: `https://`, `http://`, `git://`, `ssh://` or scp-like, without
    /// credentials).
    pub repository: String,
    /// A branch, tag or commit; `HEAD` is the repository's default branch.
    pub git_ref: String,
    /// Where in JupyterLab the workflow opens (a URL path, `/lab` by default).
    pub path: String,
}

/// The default ref: the repository's default branch.
pub const DEFAULT_REF: &str = "HEAD";
/// The default URL path.
pub const DEFAULT_PATH: &str = "/lab";

/// Whether `s` is a git URL exoagent clones: `https://`, `http://`, `git://`, `ssh://` with a
/// host, or scp-like `[user@]host:path`; no password (a user name only for ssh), no whitespace
/// or control characters, no leading `-` (never an option to git), no other transport
/// (`ext::`, `file://`, local paths).
pub fn valid_repository(s: &str) -> bool {
    if s.is_empty()
        || s.len() > 2048
        || s.starts_with('-')
        || s.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return false;
    }
    if let Some((scheme, _)) = s.split_once("://") {
        let Ok(url) = reqwest::Url::parse(s) else {
            return false;
        };
        let host_ok = url.host_str().is_some_and(|h| !h.is_empty() && !h.starts_with('-'));
        let path_ok = url.path().len() > 1;
        return match scheme {
            "https" | "http" | "git" => {
                host_ok && path_ok && url.username().is_empty() && url.password().is_none()
            }
            "ssh" => host_ok && path_ok && url.password().is_none(),
            _ => false,
        };
    }
    // scp-like: [user@]host:path, the user plain (no password), the host without '/'.
    let (user_ok, rest) = match s.split_once('@') {
        Some((user, rest)) => (
            !user.is_empty()
                && user
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')),
            rest,
        ),
        None => (true, s),
    };
    let Some((host, path)) = rest.split_once(':') else {
        return false;
    };
    user_ok
        && host.len() > 1
        && !host.starts_with('-')
        && !path.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']'))
}

/// Whether `s` is a ref exoagent passes to git: a branch, tag or commit name without
/// whitespace, control characters, `..`, `~^:?*[\`, a leading `-` or `/`, at most 255 bytes.
pub fn valid_ref(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.starts_with(['-', '/', '.'])
        && !s.ends_with(['/', '.'])
        && !s.contains("..")
        && !s.contains("@{")
        && !s.ends_with(".lock")
        && s
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !"~^:?*[\\".contains(c))
}

/// A URL path for the workflow (`/lab`, `/lab/tree/index.ipynb`): segments of letters,
/// digits, `-._~%`, no empty, `.` or `..` segment; a trailing `/` removed (Exosphere appends
/// `/?token=`).
pub fn normalise_path(s: &str) -> Option<String> {
    let rest = s.strip_prefix('/')?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Some("/".to_owned());
    }
    let fine = rest.split('/').all(|segment| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | '%'))
    });
    (fine && s.len() <= 1024).then(|| format!("/{rest}"))
}

/// `text` with the credentials of any URL in it masked (`scheme://***@host`, and a password in
/// scp-like `user:password@host`), for every message: git and pip echo URLs.
pub fn mask(text: &str) -> String {
    text.split_inclusive(|c: char| c.is_whitespace() || c == '\'' || c == '"')
        .map(|word| {
            let masked = crate::schema::values::redact_userinfo(word);
            masked.into_owned()
        })
        .collect()
}

/// The directory name of the checkout: the repository's last path segment without `.git`,
/// made of safe characters; `workflow` when nothing usable is left.
pub fn checkout_name(repository: &str) -> String {
    let trimmed = repository.trim_end_matches('/');
    let last = trimmed
        .rsplit(['/', ':'])
        .next()
        .unwrap_or("")
        .trim_end_matches(".git");
    let fine = !last.is_empty()
        && !last.starts_with('.')
        && last.len() <= 100
        && last
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if fine {
        last.to_owned()
    } else {
        "workflow".to_owned()
    }
}

/// The build's identity: SHA-256 over the repository URL, the resolved commit, the Python
/// asked for and the JupyterLab lock's fingerprint, 16 hex digits. The same inputs reuse the
/// environment already built; any change builds a new one.
pub fn build_key(repository: &str, commit: &str, python: &str, lock: &str) -> String {
    let mut input = Vec::new();
    for part in [repository, commit, python, lock] {
        input.extend_from_slice(part.as_bytes());
        input.push(0);
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    data_encoding::HEXLOWER.encode(&digest.as_ref()[..8])
}

/// How JupyterLab is launched for a workflow: `sh -c START_SCRIPT _ <checkout> <argv…>` runs
/// the repository's `start` (from `binder/` or `.binder/` when there is one, as repo2docker
/// does; itself when executable, else with bash) with JupyterLab's argv, or JupyterLab
/// directly when there is none. Constant text: repository data only ever arrives as arguments.
pub const START_SCRIPT: &str = r#"d=$1; shift
if [ -d "$d/binder" ] && [ ! -L "$d/binder" ]; then c=$d/binder
elif [ -d "$d/.binder" ] && [ ! -L "$d/.binder" ]; then c=$d/.binder
else c=$d; fi
if [ -f "$c/start" ]; then
  if [ -x "$c/start" ]; then exec "$c/start" "$@"; fi
  exec bash "$c/start" "$@"
fi
exec "$@""#;

/// Where workflow environments live: `<opt>/workflows`.
pub fn workflows_dir(opt_dir: &Path) -> PathBuf {
    opt_dir.join("workflows")
}

/// The link to the environment in use: `<opt>/workflows/current` → `<key>`.
pub fn current_link(opt_dir: &Path) -> PathBuf {
    workflows_dir(opt_dir).join("current")
}

/// A workflow step that failed, with its stable reason.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// The repository could not be cloned or fetched.
    #[error("workflow step 'clone' failed for {repository}: {detail}")]
    Clone {
        /// The repository (masked).
        repository: String,
        /// The command's status and the last lines of its output.
        detail: String,
    },
    /// The ref names no branch, tag or commit of the repository.
    #[error("workflow step 'checkout' failed: ref '{git_ref}' was not found in {repository}: {detail}")]
    RefNotFound {
        /// The ref.
        git_ref: String,
        /// The repository (masked).
        repository: String,
        /// The last lines of git's output.
        detail: String,
    },
    /// The checkout could not be brought to the commit (local changes in the way, say).
    #[error("workflow step 'checkout' failed in {dir}: {detail}")]
    Checkout {
        /// The checkout.
        dir: PathBuf,
        /// The last lines of git's output.
        detail: String,
    },
    /// A repository file asks for something exoagent does not do.
    #[error("workflow: {file}: {why}")]
    Unsupported {
        /// The file.
        file: String,
        /// Why it cannot be honoured.
        why: String,
    },
    /// A repository file could not be understood.
    #[error("workflow: {file}: {why}")]
    Invalid {
        /// The file.
        file: String,
        /// What is wrong.
        why: String,
    },
    /// The Python the repository asks for is not available.
    #[error("workflow step 'python' failed: {detail}")]
    Python {
        /// What was tried and why it failed.
        detail: String,
    },
    /// `apt.txt`'s packages could not be installed.
    #[error("workflow step 'apt.txt' failed: {detail}")]
    Packages {
        /// The package layer's error.
        detail: String,
    },
    /// Creating the environment or installing into it failed.
    #[error("workflow step '{step}' failed: {detail}")]
    Requirements {
        /// The step (`venv`, `jupyterlab`, `requirements.txt`, `environment.yml`, `project`).
        step: &'static str,
        /// The command's status and the last lines of its output.
        detail: String,
    },
    /// `postBuild` failed.
    #[error("workflow step 'postBuild' failed: {detail}")]
    PostBuild {
        /// Its status and the last lines of its output.
        detail: String,
    },
    /// A file or directory of the build could not be written.
    #[error("workflow: failed to {action} '{path}': {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl WorkflowError {
    /// Short stable reason for reports.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Clone { .. } => "workflow-clone-failed",
            Self::RefNotFound { .. } => "workflow-ref-not-found",
            Self::Checkout { .. } => "workflow-checkout-failed",
            Self::Unsupported { .. } => "workflow-unsupported",
            Self::Invalid { .. } => "workflow-invalid",
            Self::Python { .. } => "workflow-python-unavailable",
            Self::Packages { .. } => "workflow-packages-failed",
            Self::Requirements { .. } => "workflow-requirements-failed",
            Self::PostBuild { .. } => "workflow-postbuild-failed",
            Self::Io { source, .. } if crate::fsutil::is_disk_full(source) => {
                crate::services::DISK_FULL
            }
            Self::Io { .. } => "workflow-io-failed",
        }
    }

    /// As a service error of JupyterLab (its message masked).
    pub fn into_service_error(self) -> crate::services::ServiceError {
        crate::services::ServiceError::Refused {
            service: crate::model::ServiceKind::JupyterLab,
            reason: self.reason(),
            detail: mask(&self.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_are_git_urls_without_credentials() {
        for good in [
            "https://github.com/org/repo",
            "https://github.com/org/repo.git",
            "http://127.0.0.1:9418/r.git",
            "git://127.0.0.1:9999/r.git",
            "ssh://git@github.com/org/repo.git",
            "git@github.com:org/repo.git",
            "github.com:org/repo",
        ] {
            assert!(valid_repository(good), "{good}");
        }
        for bad in [
            "",
            "https://user:pw@github.com/org/repo",
            "https://token@github.com/org/repo",
            "ssh://git:pw@github.com/org/repo",
            "git:pw@github.com:org/repo",
            "ext::sh -c touch% /tmp/pwned",
            "file:///etc",
            "/srv/repo.git",
            "-uhttps://x/y",
            "https://github.com/org/repo name",
            "https://github.com",
            "ftp://h/r",
            "c:repo",
        ] {
            assert!(!valid_repository(bad), "{bad}");
        }
    }

    #[test]
    fn refs_are_names_git_cannot_take_for_options() {
        for good in ["HEAD", "main", "v1.2.3", "feature/x", "0123abcd"] {
            assert!(valid_ref(good), "{good}");
        }
        for bad in ["", "-b", "--upload-pack=x", "a..b", "a b", "a~1", "x^", "a:b", "/x", "x.lock", "a@{1}"] {
            assert!(!valid_ref(bad), "{bad}");
        }
    }

    #[test]
    fn paths_are_url_paths_without_a_trailing_slash() {
        assert_eq!(normalise_path("/lab").as_deref(), Some("/lab"));
        assert_eq!(normalise_path("/lab/").as_deref(), Some("/lab"));
        assert_eq!(
            normalise_path("/lab/tree/index.ipynb").as_deref(),
            Some("/lab/tree/index.ipynb")
        );
        assert_eq!(normalise_path("/").as_deref(), Some("/"));
        for bad in ["lab", "/a//b", "/../x", "/a b", "/a?x=1", "/a#f", "/\"x"] {
            assert_eq!(normalise_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn messages_mask_credentials() {
        let text = "fatal: unable to access 'https://user:hunter2@h/r.git/': 403";
        let masked = mask(text);
        assert!(!masked.contains("hunter2"), "{masked}");
        assert!(masked.contains("https://***@h/r.git/"), "{masked}");
        assert_eq!(mask("plain text, no url"), "plain text, no url");
    }

    #[test]
    fn checkout_names_come_from_the_last_segment() {
        assert_eq!(checkout_name("https://github.com/org/demo.git"), "demo");
        assert_eq!(checkout_name("https://github.com/org/demo/"), "demo");
        assert_eq!(checkout_name("git@github.com:org/demo.git"), "demo");
        assert_eq!(checkout_name("git@github.com:demo"), "demo");
        assert_eq!(checkout_name("https://h/.git"), "workflow");
        assert_eq!(checkout_name("https://h/%2e%2e"), "workflow");
    }

    #[test]
    fn the_build_key_changes_with_every_input_and_only_then() {
        let base = build_key("https://h/r", "abc", "3.11", "lock1");
        assert_eq!(base, build_key("https://h/r", "abc", "3.11", "lock1"));
        assert_eq!(base.len(), 16);
        for other in [
            build_key("https://h/r2", "abc", "3.11", "lock1"),
            build_key("https://h/r", "abd", "3.11", "lock1"),
            build_key("https://h/r", "abc", "3.12", "lock1"),
            build_key("https://h/r", "abc", "3.11", "lock2"),
            // No ambiguity between fields.
            build_key("https://h/ra", "bc", "3.11", "lock1"),
        ] {
            assert_ne!(base, other);
        }
    }

    /// Run [`START_SCRIPT`] on `checkout` with `echo ran` as the argv.
    fn start(checkout: &Path) -> String {
        let out = std::process::Command::new("/bin/sh")
            .args(["-c", START_SCRIPT, "t"])
            .arg(checkout)
            .args(["echo", "ran"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn the_start_script_wraps_jupyterlab_as_repo2docker_does() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path();
        // No start: JupyterLab directly.
        assert_eq!(start(repo), "ran\n");
        // An executable start that execs its arguments.
        let script = repo.join("start");
        std::fs::write(&script, "#!/bin/sh\necho started\nexec \"$@\"\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(start(repo), "started\nran\n");
        // Not executable: through bash.
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(start(repo), "started\nran\n");
        // A binder/ directory: only its start counts.
        std::fs::create_dir(repo.join("binder")).unwrap();
        assert_eq!(start(repo), "ran\n");
        std::fs::write(repo.join("binder/start"), "echo binder\nexec \"$@\"\n").unwrap();
        assert_eq!(start(repo), "binder\nran\n");
        // Odd names are data, never code.
        let odd = dir.path().join("a b;$(touch pwned)");
        std::fs::create_dir(&odd).unwrap();
        assert_eq!(start(&odd), "ran\n");
        assert!(!Path::new("pwned").exists());
    }

    #[test]
    fn reasons_are_stable() {
        let e = WorkflowError::Unsupported {
            file: "Dockerfile".into(),
            why: "needs Docker".into(),
        };
        assert_eq!(e.reason(), "workflow-unsupported");
        let s = e.into_service_error();
        assert_eq!(s.reason(), "workflow-unsupported");
        assert!(s.to_string().contains("Dockerfile"), "{s}");
    }
}
