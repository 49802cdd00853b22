//! The repository at its ref: cloned (or fetched, when the checkout is already there) into the
//! instance user's home as that user, then checked out at the commit the ref names. git runs
//! with argv vectors, no terminal prompt and a time limit; a checkout of another repository, or
//! a directory that is not a checkout, is never touched.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::run::{run, Ran, RunAs};
use super::{mask, WorkflowError};

/// How long a clone or fetch may take.
const NETWORK_LIMIT: Duration = Duration::from_secs(900);
/// How long a local git command may take.
const LOCAL_LIMIT: Duration = Duration::from_secs(120);

/// The checkout at the resolved commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    /// Where it is.
    pub dir: PathBuf,
    /// The full commit id the ref resolved to.
    pub commit: String,
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

async fn git(dir: &Path, args: &[&str], who: &RunAs, limit: Duration) -> Result<Ran, WorkflowError> {
    let mut argv = vec![
        "git".to_owned(),
        "-c".into(),
        "advice.detachedHead=false".into(),
        "-C".into(),
        s(dir),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    run(&argv, who, limit).await.map_err(|e| WorkflowError::Checkout {
        dir: dir.to_path_buf(),
        detail: format!("failed to run git: {e}"),
    })
}

/// The commit `candidate` names in `dir`, if any.
async fn resolve(dir: &Path, candidate: &str, who: &RunAs) -> Result<Option<String>, WorkflowError> {
    let spec = format!("{candidate}^{{commit}}");
    let ran = git(
        dir,
        &["rev-parse", "--verify", "--quiet", "--end-of-options", &spec],
        who,
        LOCAL_LIMIT,
    )
    .await?;
    let commit = ran.output.trim();
    Ok((ran.success && commit.len() >= 40 && commit.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| commit.to_owned()))
}

fn is_full_commit_id(r: &str) -> bool {
    r.len() == 40 && r.chars().all(|c| c.is_ascii_hexdigit())
}

/// Bring `dir` (the checkout of `repository`) to the commit `git_ref` names, cloning first when
/// it is missing. Runs as `who` (the instance user).
pub async fn sync(
    repository: &str,
    git_ref: &str,
    dir: &Path,
    who: &RunAs,
) -> Result<Checkout, WorkflowError> {
    let shown = mask(repository);
    let clone_failed = |ran: &Ran, what: &str| WorkflowError::Clone {
        repository: shown.clone(),
        detail: mask(&ran.failure(what)),
    };
    let parent = dir.parent().unwrap_or(Path::new("/"));
    // The agent reads the checkout's configuration files; a symlink could point it elsewhere.
    if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(WorkflowError::Checkout {
            dir: dir.to_path_buf(),
            detail: "is a symlink; move it away to let exoagent clone the workflow there".into(),
        });
    }
    if !dir.exists() {
        let argv: Vec<String> = ["git", "clone", "--quiet", "--", repository, &s(dir)]
            .iter()
            .map(|a| a.to_string())
            .collect();
        let who_here = RunAs {
            cwd: parent.to_path_buf(),
            ..who.clone()
        };
        let ran = run(&argv, &who_here, NETWORK_LIMIT)
            .await
            .map_err(|e| WorkflowError::Clone {
                repository: shown.clone(),
                detail: format!("failed to run git: {e}"),
            })?;
        if !ran.success {
            return Err(clone_failed(&ran, "git clone"));
        }
    } else {
        if !dir.join(".git").is_dir() {
            return Err(WorkflowError::Checkout {
                dir: dir.to_path_buf(),
                detail: "exists and is not a git checkout; move it away to let exoagent clone \
                         the workflow there"
                    .into(),
            });
        }
        let origin = git(dir, &["config", "--get", "remote.origin.url"], who, LOCAL_LIMIT).await?;
        if !origin.success {
            // `git config --get` exits 1, saying nothing, when the key is unset; anything else
            // is git failing to read the checkout at all.
            let detail = if origin.output.trim().is_empty() {
                "is a git checkout with no remote named origin; move it away to let exoagent \
                 clone the workflow there"
                    .to_owned()
            } else {
                format!(
                    "could not be read as a git checkout: {}",
                    origin.failure("git config --get remote.origin.url")
                )
            };
            return Err(WorkflowError::Checkout {
                dir: dir.to_path_buf(),
                detail,
            });
        }
        if origin.output.trim() != repository {
            return Err(WorkflowError::Checkout {
                dir: dir.to_path_buf(),
                detail: format!(
                    "is a checkout of {}, not of {shown}; move it away to let exoagent clone \
                     the workflow there",
                    mask(origin.output.trim())
                ),
            });
        }
        // A commit already here needs no network (a retry after a failed build).
        let known = is_full_commit_id(git_ref) && resolve(dir, git_ref, who).await?.is_some();
        if !known {
            let ran = git(
                dir,
                &["fetch", "--prune", "--tags", "--force", "origin"],
                who,
                NETWORK_LIMIT,
            )
            .await?;
            if !ran.success {
                return Err(clone_failed(&ran, "git fetch origin"));
            }
            if git_ref == super::DEFAULT_REF {
                // The default branch may have changed since the clone.
                let _ = git(dir, &["remote", "set-head", "origin", "--auto"], who, NETWORK_LIMIT).await;
            }
        }
    }
    let candidates: Vec<String> = if git_ref == super::DEFAULT_REF {
        vec!["refs/remotes/origin/HEAD".into()]
    } else {
        vec![
            format!("refs/remotes/origin/{git_ref}"),
            format!("refs/tags/{git_ref}"),
            git_ref.to_owned(),
        ]
    };
    let mut commit = None;
    for candidate in &candidates {
        if let Some(found) = resolve(dir, candidate, who).await? {
            commit = Some(found);
            break;
        }
    }
    let commit = match commit {
        Some(commit) => commit,
        None => {
            // Not a branch or tag of origin's: a commit or a ref outside the default refspec.
            let ran = git(dir, &["fetch", "origin", git_ref], who, NETWORK_LIMIT).await?;
            let fetched = if ran.success {
                resolve(dir, "FETCH_HEAD", who).await?
            } else {
                None
            };
            fetched.ok_or_else(|| WorkflowError::RefNotFound {
                git_ref: git_ref.to_owned(),
                repository: shown.clone(),
                detail: mask(&ran.failure(&format!("git fetch origin {git_ref}"))),
            })?
        }
    };
    let head = resolve(dir, "HEAD", who).await?;
    if head.as_deref() != Some(commit.as_str()) {
        // Without --force: local changes in the way stop the checkout instead of being lost.
        let ran = git(dir, &["checkout", "--quiet", "--detach", &commit], who, LOCAL_LIMIT).await?;
        if !ran.success {
            return Err(WorkflowError::Checkout {
                dir: dir.to_path_buf(),
                detail: mask(&ran.failure(&format!("git checkout --detach {commit}"))),
            });
        }
    }
    Ok(Checkout {
        dir: dir.to_path_buf(),
        commit,
    })
}
