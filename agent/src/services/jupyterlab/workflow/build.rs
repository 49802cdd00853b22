//! Executing a workflow's build: the checkout ([`super::source`]), its recipe
//! ([`super::recipe`]), `apt.txt` through the package layer, then, as the instance user, the
//! environment under `<opt>/workflows/<key>/venv` (the JupyterLab lock with hashes,
//! `requirements.txt` or a pip-only `environment.yml`, the project itself) and `postBuild`.
//! A `built` marker is written last: a retry or restart at the same commit reuses the
//! environment without running anything again.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::recipe::{self, Files};
use super::run::{run, RunAs};
use super::source::{self, Checkout};
use super::{build_key, checkout_name, current_link, workflows_dir, WorkflowError, WorkflowSettings};
use crate::fsutil;
use crate::platform::os::Family;
use crate::platform::packages::{PackageInstaller, PackageItem, PackageSettings};
use crate::platform::exec::find_on_path;
use crate::platform::privileges::DropTo;
use crate::services::jupyterlab::PythonInstaller;
use crate::services::ServiceContext;

/// How long one install step may take.
const INSTALL_LIMIT: Duration = Duration::from_secs(1800);
/// How long `postBuild` may take.
const POSTBUILD_LIMIT: Duration = Duration::from_secs(1800);
/// The largest configuration file read.
const MAX_FILE: u64 = 1024 * 1024;

/// Variables of the agent's environment passed to build commands (proxies and certificate
/// settings; with `UV_*`/`PIP_*`, the package index settings, which the repository's code — its
/// `setup.py`, its `postBuild` — therefore sees, as it would under repo2docker); nothing else of
/// the agent's environment reaches the repository's code.
const PASSED: [&str; 9] = [
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "PYENV_ROOT",
];

/// What the build needs besides the workflow's settings.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The workflow.
    pub workflow: &'a WorkflowSettings,
    /// Where and as whom.
    pub ctx: &'a ServiceContext,
    /// The OS family (`apt.txt` is Debian's).
    pub family: Family,
    /// uv or pip.
    pub installer: PythonInstaller,
    /// uv's executable, when it is used.
    pub uv: Option<PathBuf>,
    /// The interpreter when the repository names no Python, or why there is none.
    pub default_python: Result<String, String>,
    /// JupyterLab's hash-pinned lock.
    pub lock: &'a str,
    /// The lock's fingerprint.
    pub lock_id: &'a str,
}

/// A finished (or reused) build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// The checkout and its commit.
    pub checkout: Checkout,
    /// The build's key (its directory under `<opt>/workflows`).
    pub key: String,
    /// The environment.
    pub venv: PathBuf,
    /// Whether this run built it (`false`: reused).
    pub fresh: bool,
}

/// The checkout's directory: `~/<repository name>`.
pub fn checkout_dir(ctx: &ServiceContext, workflow: &WorkflowSettings) -> PathBuf {
    ctx.account.home.join(checkout_name(&workflow.repository))
}

/// Where the configuration files are: `binder/` or `.binder/` when the repository has one.
pub fn config_dir(checkout: &Path) -> PathBuf {
    for name in ["binder", ".binder"] {
        let dir = checkout.join(name);
        if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            return dir;
        }
    }
    checkout.to_path_buf()
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WorkflowError {
    let path = path.to_path_buf();
    move |source| WorkflowError::Io {
        action,
        path,
        source,
    }
}

/// The names in `dir` (none when it cannot be read).
fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A configuration file's text: a regular file (never through a symlink: the agent may be
/// root and the repository is anyone's) of at most 1 MiB; `None` when absent.
fn read_config(dir: &Path, name: &str) -> Result<Option<String>, WorkflowError> {
    let path = dir.join(name);
    let Ok(meta) = std::fs::symlink_metadata(&path) else {
        return Ok(None);
    };
    let invalid = |why: &str| WorkflowError::Invalid {
        file: name.to_owned(),
        why: why.to_owned(),
    };
    if !meta.is_file() {
        return Err(invalid("is not a regular file (a symlink or a directory)"));
    }
    if meta.len() > MAX_FILE {
        return Err(invalid("is larger than 1 MiB"));
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .map_err(io("read", &path))?;
    let mut text = String::new();
    file.by_ref()
        .take(MAX_FILE)
        .read_to_string(&mut text)
        .map_err(|_| invalid("is not UTF-8 text"))?;
    Ok(Some(text))
}

/// What [`recipe::plan`] reads, from the checkout.
pub fn files(checkout: &Path) -> Result<Files, WorkflowError> {
    let config = config_dir(checkout);
    let mut contents = BTreeMap::new();
    for name in ["runtime.txt", "environment.yml", "environment.yaml", "apt.txt"] {
        if let Some(text) = read_config(&config, name)? {
            contents.insert(name.to_owned(), text);
        }
    }
    Ok(Files {
        config: names(&config),
        root: names(checkout),
        contents,
    })
}

/// The environment build commands run with: the account's login variables, `PATH` with
/// `path_first` in front, no terminal prompts, and [`PASSED`] plus `UV_*`/`PIP_*`.
fn user_env(ctx: &ServiceContext, path_first: Option<&Path>) -> Vec<(String, String)> {
    let base = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    let path = match path_first {
        Some(first) => format!("{}:{base}", first.display()),
        None => base,
    };
    let mut env = ctx.login_env(&path);
    env.push(("GIT_TERMINAL_PROMPT".into(), "0".into()));
    env.push(("GIT_SSH_COMMAND".into(), "ssh -o BatchMode=yes".into()));
    env.push(("PYTHONUNBUFFERED".into(), "1".into()));
    for (key, value) in std::env::vars() {
        if PASSED.contains(&key.as_str()) || key.starts_with("UV_") || key.starts_with("PIP_") {
            env.push((key, value));
        }
    }
    env
}

fn as_user(ctx: &ServiceContext, cwd: &Path, path_first: Option<&Path>) -> Result<RunAs, WorkflowError> {
    let drop_to = match ctx.run_as() {
        Some(ids) => Some(
            DropTo::with_groups_of(&ctx.account.name, ids.uid, ids.gid).map_err(|e| {
                WorkflowError::Io {
                    action: "look up the groups of",
                    path: ctx.account.home.clone(),
                    source: std::io::Error::other(e.to_string()),
                }
            })?,
        ),
        None => None,
    };
    Ok(RunAs {
        drop_to,
        env: user_env(ctx, path_first),
        cwd: cwd.to_path_buf(),
    })
}

fn strings(argv: &[&str]) -> Vec<String> {
    argv.iter().map(|a| a.to_string()).collect()
}

/// Run one install step as the user; a failure is `workflow-requirements-failed` naming it.
async fn install_step(step: &'static str, argv: &[&str], who: &RunAs) -> Result<(), WorkflowError> {
    let ran = run(&strings(argv), who, INSTALL_LIMIT)
        .await
        .map_err(|e| WorkflowError::Requirements {
            step,
            detail: format!("failed to run '{}': {e}", argv.join(" ")),
        })?;
    if ran.success {
        Ok(())
    } else {
        Err(WorkflowError::Requirements {
            step,
            detail: super::mask(&ran.failure(&argv.join(" "))),
        })
    }
}

/// The uv the settings allow, if the instance user can run it (the agent's may be in a
/// directory only root can enter): with `installer = "auto"` pip takes over when it cannot.
async fn usable_uv(inputs: &Inputs<'_>, who: &RunAs) -> Result<Option<String>, WorkflowError> {
    let Some(uv) = inputs.uv.as_ref().map(|u| u.to_string_lossy().into_owned()) else {
        return Ok(None);
    };
    let runs = run(&strings(&[&uv, "--version"]), who, Duration::from_secs(60))
        .await
        .map(|ran| ran.success);
    match runs {
        Ok(true) => Ok(Some(uv)),
        _ if inputs.installer == PythonInstaller::Auto => {
            tracing::warn!(target: "exoagent::services", service = "jupyterlab", uv = %uv, "the instance user cannot run uv; building the workflow with pip");
            Ok(None)
        }
        Ok(false) => Err(WorkflowError::Python {
            detail: format!("installer = \"uv\" but {uv} --version failed as the instance user"),
        }),
        Err(e) => Err(WorkflowError::Python {
            detail: format!("installer = \"uv\" but the instance user cannot run {uv}: {e}"),
        }),
    }
}

/// `apt.txt`'s packages through the package layer, in one transaction (on Debian and Ubuntu;
/// in the sandbox nothing is installed, so missing ones are an error naming them).
async fn apt(inputs: &Inputs<'_>, packages: &[String]) -> Result<(), WorkflowError> {
    if packages.is_empty() {
        return Ok(());
    }
    if inputs.family != Family::Debian {
        return Err(WorkflowError::Unsupported {
            file: "apt.txt".into(),
            why: "names Debian packages; this is an Enterprise Linux system".into(),
        });
    }
    let items: Vec<PackageItem> = packages.iter().cloned().map(PackageItem::Named).collect();
    let installer = PackageInstaller::new(inputs.family.package_manager(), &PackageSettings::default());
    let packages_failed = |e: crate::platform::packages::PackageError| WorkflowError::Packages {
        detail: e.to_string(),
    };
    if inputs.ctx.paths.system_root != Path::new("/") {
        let missing = installer.missing(&items).await.map_err(packages_failed)?;
        if !missing.is_empty() {
            let names: Vec<&str> = missing.iter().map(PackageItem::name).collect();
            return Err(WorkflowError::Packages {
                detail: format!(
                    "not installed, and the sandbox installs no packages: {}",
                    names.join(" ")
                ),
            });
        }
        return Ok(());
    }
    installer.install(&items).await.map(drop).map_err(packages_failed)
}

/// `/data` for the instance user, as Exosphere's workflow role makes it (left alone when it
/// exists).
fn data_dir(ctx: &ServiceContext) -> Result<(), WorkflowError> {
    let data = ctx.paths.system_root.join("data");
    if data.exists() {
        return Ok(());
    }
    fsutil::ensure_dir(&data, 0o755).map_err(io("create", &data))?;
    nix::unistd::chown(
        &data,
        Some(nix::unistd::Uid::from_raw(ctx.account.uid)),
        Some(nix::unistd::Gid::from_raw(ctx.account.gid)),
    )
    .map_err(|e| WorkflowError::Io {
        action: "chown",
        path: data.clone(),
        source: e.into(),
    })
}

/// Point `<opt>/workflows/current` at `key` (atomically: a new link renamed over the old).
fn point_current(opt: &Path, key: &str) -> Result<(), WorkflowError> {
    let link = current_link(opt);
    let tmp = workflows_dir(opt).join(format!(".current.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(key, &tmp).map_err(io("create", &tmp))?;
    std::fs::rename(&tmp, &link).map_err(io("replace", &link))
}

/// Remove the builds under `<opt>/workflows` that never finished (no `built` marker), but
/// `keep`: a failed build of another commit is not reused, only rebuilt. Finished builds stay
/// for reuse. Failures to remove are logged, never fatal.
pub fn remove_unfinished(opt: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(workflows_dir(opt)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_build = name.len() == 16 && name.chars().all(|c| c.is_ascii_hexdigit());
        let dir = entry.path();
        if !is_build || name == keep || dir.join("built").exists() {
            continue;
        }
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!(target: "exoagent::services", service = "jupyterlab", dir = %dir.display(), "removed an unfinished workflow build"),
            Err(e) => tracing::warn!(target: "exoagent::services", service = "jupyterlab", dir = %dir.display(), error = %e, "could not remove an unfinished workflow build"),
        }
    }
}

/// The build's directory for `key` (its `venv` and `built` marker live in it).
pub fn build_dir(opt: &Path, key: &str) -> PathBuf {
    workflows_dir(opt).join(key)
}

/// Clone or fetch, plan, and build (or reuse) the workflow's environment.
pub async fn build(inputs: &Inputs<'_>) -> Result<Built, WorkflowError> {
    let ctx = inputs.ctx;
    let workflow = inputs.workflow;
    ctx.ensure_home(crate::model::ServiceKind::JupyterLab)
        .map_err(|e| WorkflowError::Io {
            action: "create",
            path: ctx.account.home.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
    data_dir(ctx)?;
    let dir = checkout_dir(ctx, workflow);
    let home = as_user(ctx, &ctx.account.home, None)?;
    let checkout = source::sync(&workflow.repository, &workflow.git_ref, &dir, &home).await?;
    let recipe = recipe::plan(&files(&checkout.dir)?)?;
    tracing::info!(target: "exoagent::services", service = "jupyterlab", commit = %checkout.commit, recipe = ?recipe, "workflow recipe");

    // The key needs only what was asked for: a reused environment costs no uv or interpreter
    // probe.
    let python_id = match recipe.python {
        Some(version) => format!("{}.{}", version.0, version.1),
        None => inputs
            .default_python
            .clone()
            .map_err(|detail| WorkflowError::Python { detail })?,
    };
    let opt = &ctx.paths.opt_dir;
    let key = build_key(&workflow.repository, &checkout.commit, &python_id, inputs.lock_id);
    let base = build_dir(opt, &key);
    let venv = base.join("venv");
    let marker = base.join("built");
    let built = |fresh| Built {
        checkout: checkout.clone(),
        key: key.clone(),
        venv: venv.clone(),
        fresh,
    };
    if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == checkout.commit) {
        tracing::info!(target: "exoagent::services", service = "jupyterlab", key = %key, "workflow environment already built; reused");
        point_current(opt, &key)?;
        return Ok(built(false));
    }

    let uv = usable_uv(inputs, &home).await?;
    let python = match recipe.python {
        Some(version) => match find_on_path(&format!("python{}.{}", version.0, version.1)) {
            Some(path) => path.to_string_lossy().into_owned(),
            None if uv.is_some() => format!("{}.{}", version.0, version.1),
            None => {
                return Err(WorkflowError::Python {
                    detail: format!(
                        "runtime.txt asks for Python {}.{}: no python{}.{} on this system, and \
                         pip cannot provide one (uv can, when installed and allowed to \
                         download interpreters)",
                        version.0, version.1, version.0, version.1
                    ),
                })
            }
        },
        None => python_id.clone(),
    };

    apt(inputs, &recipe.apt).await?;

    // A partial environment from an interrupted build goes; the build starts over.
    if venv.exists() {
        std::fs::remove_dir_all(&venv).map_err(io("remove", &venv))?;
    }
    fsutil::ensure_dir(&base, 0o755).map_err(io("create", &base))?;
    fsutil::ensure_dir(&venv, 0o755).map_err(io("create", &venv))?;
    nix::unistd::chown(
        &venv,
        Some(nix::unistd::Uid::from_raw(ctx.account.uid)),
        Some(nix::unistd::Gid::from_raw(ctx.account.gid)),
    )
    .map_err(|e| WorkflowError::Io {
        action: "chown",
        path: venv.clone(),
        source: e.into(),
    })?;
    let lock = base.join("jupyterlab-requirements.txt");
    fsutil::write_if_changed(&lock, inputs.lock.as_bytes(), 0o644, None).map_err(io("write", &lock))?;

    let bin = venv.join("bin");
    let mut who = as_user(ctx, &checkout.dir, Some(&bin))?;
    if uv.is_some() {
        who.env.extend(crate::platform::uv::tls_env());
    }
    let who = who;
    let venv_s = venv.to_string_lossy().into_owned();
    let venv_python = bin.join("python").to_string_lossy().into_owned();
    let lock_s = lock.to_string_lossy().into_owned();
    // One install: `-r <file>` or `.`, with uv or the venv's pip.
    let install = |what: Vec<String>| -> Vec<String> {
        let mut argv = match &uv {
            Some(uv) => strings(&[
                uv,
                "pip",
                "install",
                "--compile-bytecode",
                "--python",
                &venv_python,
            ]),
            None => strings(&[
                &venv_python,
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
            ]),
        };
        argv.extend(what);
        argv
    };
    match &uv {
        Some(uv) => {
            let ran = run(
                // --seed: pip in the environment, as repo2docker's has, for postBuild's
                // `pip install` (else the system's pip would be found on PATH).
                &strings(&[uv, "venv", "--quiet", "--seed", "--python", &python, &venv_s]),
                &who,
                INSTALL_LIMIT,
            )
            .await
            .map_err(|e| WorkflowError::Python {
                detail: format!("failed to run uv: {e}"),
            })?;
            if !ran.success {
                return Err(WorkflowError::Python {
                    detail: super::mask(&ran.failure(&format!(
                        "uv venv --python {python} (uv finds the interpreter on the system, or \
                         downloads it when its settings allow)"
                    ))),
                });
            }
        }
        None => install_step("venv", &[&python, "-m", "venv", &venv_s], &who).await?,
    }
    let step = |name: &'static str, what: Vec<String>| {
        let argv = install(what);
        let who = who.clone();
        async move {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            install_step(name, &argv, &who).await
        }
    };
    step("jupyterlab", strings(&["--require-hashes", "-r", &lock_s])).await?;
    let config = config_dir(&checkout.dir);
    if recipe.requirements {
        let file = config.join("requirements.txt").to_string_lossy().into_owned();
        step("requirements.txt", strings(&["-r", &file])).await?;
    }
    if !recipe.environment.is_empty() {
        let file = base.join("environment-requirements.txt");
        let mut text = recipe.environment.join("\n");
        text.push('\n');
        fsutil::write_if_changed(&file, text.as_bytes(), 0o644, None).map_err(io("write", &file))?;
        let file = file.to_string_lossy().into_owned();
        step("environment.yml", strings(&["-r", &file])).await?;
    }
    if recipe.project {
        step("project", strings(&["."])).await?;
    }
    if recipe.post_build {
        post_build(&config, &venv, &who).await?;
    }
    fsutil::write_if_changed(&marker, format!("{}\n", checkout.commit).as_bytes(), 0o644, None)
        .map_err(io("write", &marker))?;
    point_current(opt, &key)?;
    remove_unfinished(opt, &key);
    Ok(built(true))
}

/// The argv that runs a repository script: itself when executable, else through bash (as
/// repo2docker makes it executable first).
pub fn script_argv(script: &Path) -> Vec<String> {
    let executable = std::fs::metadata(script).is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
    let script = script.to_string_lossy().into_owned();
    if executable {
        vec![script]
    } else {
        vec!["bash".into(), script]
    }
}

/// `postBuild` as the user in the checkout, with the environment first on `PATH`.
async fn post_build(config: &Path, venv: &Path, who: &RunAs) -> Result<(), WorkflowError> {
    let script = config.join("postBuild");
    if !std::fs::symlink_metadata(&script).is_ok_and(|m| m.is_file()) {
        return Err(WorkflowError::Invalid {
            file: "postBuild".into(),
            why: "is not a regular file".into(),
        });
    }
    let mut who = who.clone();
    who.env
        .push(("VIRTUAL_ENV".into(), venv.to_string_lossy().into_owned()));
    let argv = script_argv(&script);
    let ran = run(&argv, &who, POSTBUILD_LIMIT)
        .await
        .map_err(|e| WorkflowError::PostBuild {
            detail: format!("failed to run postBuild: {e}"),
        })?;
    if ran.success {
        Ok(())
    } else {
        Err(WorkflowError::PostBuild {
            detail: super::mask(&ran.failure("postBuild")),
        })
    }
}

/// The plan for `exoagent validate`.
pub fn plan_lines(ctx: &ServiceContext, workflow: &WorkflowSettings) -> Vec<String> {
    vec![
        format!(
            "clone {} at {} into {} as {} (git, no prompts), then build from its repo2docker files: apt.txt (package layer), runtime.txt, requirements.txt / pip-only environment.yml, setup.py / pyproject.toml, postBuild (as {}); Dockerfile, install.R, Julia and conda-only packages are refused",
            super::mask(&workflow.repository),
            workflow.git_ref,
            checkout_dir(ctx, workflow).display(),
            ctx.account.name,
            ctx.account.name,
        ),
        format!(
            "environment under {}/<key>/venv (key: repository, commit, Python, lock), reused while its `built` marker matches; {} for {}",
            workflows_dir(&ctx.paths.opt_dir).display(),
            ctx.paths.system_root.join("data").display(),
            ctx.account.name,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binder_directory_holds_the_configuration_and_the_root_the_project() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("requirements.txt"), "ignored\n").unwrap();
        std::fs::write(root.join("setup.py"), "").unwrap();
        assert_eq!(config_dir(root), root);
        std::fs::create_dir(root.join("binder")).unwrap();
        std::fs::write(root.join("binder/runtime.txt"), "python-3.12\n").unwrap();
        std::fs::write(root.join("binder/apt.txt"), "curl\n").unwrap();
        assert_eq!(config_dir(root), root.join("binder"));
        let files = files(root).unwrap();
        assert!(!files.config.contains("requirements.txt"));
        assert!(files.root.contains("setup.py"));
        let recipe = recipe::plan(&files).unwrap();
        assert_eq!(recipe.python, Some((3, 12)));
        assert_eq!(recipe.apt, ["curl"]);
        assert!(recipe.project && !recipe.requirements);
    }

    #[test]
    fn configuration_files_are_never_read_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "python-3.11 top secret\n").unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        std::os::unix::fs::symlink(&secret, repo.join("runtime.txt")).unwrap();
        let e = files(&repo).unwrap_err();
        assert_eq!(e.reason(), "workflow-invalid");
        assert!(e.to_string().contains("runtime.txt"), "{e}");
        assert!(!e.to_string().contains("top secret"), "{e}");
        // A symlinked binder directory is not followed either.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::remove_file(repo.join("runtime.txt")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, repo.join("binder")).unwrap();
        assert_eq!(config_dir(&repo), repo);
    }

    #[test]
    fn unfinished_builds_go_finished_ones_stay() {
        let opt = tempfile::tempdir().unwrap();
        let dir = workflows_dir(opt.path());
        for (key, built) in [
            ("aaaaaaaaaaaaaaaa", true),
            ("bbbbbbbbbbbbbbbb", false),
            ("cccccccccccccccc", false),
        ] {
            std::fs::create_dir_all(dir.join(key).join("venv")).unwrap();
            if built {
                std::fs::write(dir.join(key).join("built"), "abc\n").unwrap();
            }
        }
        std::fs::create_dir_all(dir.join("not-a-build")).unwrap();
        std::os::unix::fs::symlink("aaaaaaaaaaaaaaaa", dir.join("current")).unwrap();
        remove_unfinished(opt.path(), "cccccccccccccccc");
        assert!(dir.join("aaaaaaaaaaaaaaaa/venv").is_dir());
        assert!(!dir.join("bbbbbbbbbbbbbbbb").exists());
        assert!(dir.join("cccccccccccccccc/venv").is_dir());
        assert!(dir.join("not-a-build").is_dir());
        assert!(dir.join("current").is_symlink());
    }

    #[test]
    fn scripts_run_themselves_when_executable_else_through_bash() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("postBuild");
        std::fs::write(&script, "echo hi\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            script_argv(&script),
            ["bash".to_owned(), script.to_string_lossy().into_owned()]
        );
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(script_argv(&script), [script.to_string_lossy().into_owned()]);
    }
}
