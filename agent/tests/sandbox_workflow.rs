//! Workflows without Docker, end to end with real components: bare git repositories served on
//! loopback by a real `git daemon`, the `exoagent` binary in sandbox mode cloning one, building
//! its environment with real uv (the hash-pinned JupyterLab lock, then `requirements.txt`),
//! running its `postBuild`, and a real JupyterLab in that environment at the workflow's path
//! behind the repository's `start`. A repository with a `Dockerfile` and a ref that does not
//! exist end in `failed` with their reasons; a second start at the same commit reuses the
//! environment.
//!
//! Needs git, python3 with venv, uv (else pip builds, slower) and PyPI (or a warm cache). The sandbox runs builds with the
//! sandbox home as `HOME`, so the test points `UV_CACHE_DIR` at the invoking user's cache.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, run_ok, Sandbox};
use serde_json::Value;

/// `git daemon` serving every repository under its base path on 127.0.0.1; killed on drop.
/// Started as `git-daemon` itself (from `git --exec-path`): `git daemon` runs it as a child,
/// which killing `git` would leave running, listening, after the test.
struct GitDaemon {
    child: Child,
    port: u16,
}

impl GitDaemon {
    fn start(base: &Path) -> Self {
        let port = free_port();
        let exec_path = run_ok(Command::new("git").arg("--exec-path"), "git --exec-path");
        let exec_path = String::from_utf8(exec_path.stdout).unwrap();
        let child = Command::new(Path::new(exec_path.trim()).join("git-daemon"))
            .arg("--export-all")
            .arg("--reuseaddr")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "git daemon did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child, port }
    }

    fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}", self.port)
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bare repository `<base>/<name>.git` holding `files` (name, content, executable) in one
/// commit on `main`; its commit id.
fn bare_repo(base: &Path, name: &str, files: &[(&str, &str, bool)]) -> String {
    let work = base.join(format!("{name}-work"));
    fs::create_dir_all(&work).unwrap();
    let git = |args: &[&str]| {
        let out = run_ok(
            Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@t", "-C"])
                .arg(&work)
                .args(args),
            &format!("git {args:?}"),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    git(&["init", "-q", "-b", "main"]);
    for (file, content, executable) in files {
        let path = work.join(file);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, content).unwrap();
        if *executable {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "workflow"]);
    let commit = git(&["rev-parse", "HEAD"]);
    run_ok(
        Command::new("git")
            .args(["clone", "-q", "--bare"])
            .arg(&work)
            .arg(base.join(format!("{name}.git"))),
        "git clone --bare",
    );
    commit
}

fn config(repo: &str, git_ref: &str) -> String {
    format!(
        r#"
[services.jupyterlab]
enabled = true
bind = "127.0.0.1"
port = @PORT@
start_timeout_s = 300
workflow_repository = "{repo}"
workflow_ref = "{git_ref}"
workflow_path = "/lab/tree/demo.ipynb"

[supervise]
backoff_initial_ms = 200
backoff_max_ms = 2000

[console]
status_interval_s = 1
load_interval_s = 60
"#
    )
}

fn service(status: &Value) -> &Value {
    &status["services"][0]
}

fn wait_failed(sb: &Sandbox) -> Value {
    sb.wait_for("jupyterlab failed", Duration::from_secs(300), |s| {
        service(s)["state"] == "failed"
    })
}

/// The workflow's notebook: it imports the package `requirements.txt` names.
const NOTEBOOK: &str = r#"{"cells":[{"cell_type":"code","execution_count":null,"id":"c1","metadata":{},"outputs":[],"source":["import six, sys\n","print('six', six.__version__, 'from', sys.prefix)"]}],"metadata":{"kernelspec":{"display_name":"Python 3","language":"python","name":"python3"}},"nbformat":4,"nbformat_minor":5}"#;

/// The system Python's `major.minor` (what `runtime.txt` asks for: no download needed).
fn system_python() -> String {
    let out = run_ok(
        Command::new("python3").args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"]),
        "python3 version",
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// uv's cache of the invoking user, when uv is installed.
fn uv_cache() -> Option<String> {
    let out = Command::new("uv").args(["cache", "dir"]).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The tests that change this process's environment (which the agents and builds they start
/// inherit) take turns.
static ENVIRONMENT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Sets variables for one test; the old values come back on drop (a failing test included).
struct Env(Vec<(&'static str, Option<std::ffi::OsString>)>);

impl Env {
    fn set(vars: &[(&'static str, &std::ffi::OsStr)]) -> Self {
        let old = vars
            .iter()
            .map(|(k, _)| (*k, std::env::var_os(k)))
            .collect();
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        Self(old)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for (k, v) in &self.0 {
            match v {
                Some(v) => std::env::set_var(k, v),
                None => std::env::remove_var(k),
            }
        }
    }
}

#[test]
fn a_workflow_is_cloned_built_without_docker_run_and_reused() {
    let _turn = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
    // The builds run with the sandbox home as HOME: keep uv on the machine's cache.
    let _env = uv_cache().map(|cache| Env::set(&[("UV_CACHE_DIR", cache.as_ref())]));
    let python_version = system_python();
    let repos = tempfile::tempdir().unwrap();
    let commit = bare_repo(
        repos.path(),
        "demo",
        &[
            ("requirements.txt", "six==1.16.0\n", false),
            ("runtime.txt", &format!("python-{python_version}\n"), false),
            // Installed already (the sandbox installs no packages; it checks them).
            ("apt.txt", "# tools\ncoreutils\n\n", false),
            (
                "postBuild",
                "#!/bin/sh\nset -e\npython -c 'import six, sys; print(sys.prefix)' > postbuild-marker\ncommand -v pip > pip-marker\n",
                true,
            ),
            (
                "start",
                "#!/bin/sh\necho \"$VIRTUAL_ENV\" > start-marker\nexec \"$@\"\n",
                true,
            ),
            ("demo.ipynb", NOTEBOOK, false),
        ],
    );
    bare_repo(
        repos.path(),
        "docker",
        &[
            ("Dockerfile", "FROM scratch\n", false),
            ("requirements.txt", "six\n", false),
        ],
    );
    bare_repo(
        repos.path(),
        "failing",
        &[(
            "postBuild",
            "#!/bin/sh\necho 'about to fail'\necho 'the real cause' >&2\nexit 7\n",
            true,
        )],
    );
    bare_repo(
        repos.path(),
        "unresolvable",
        &[(
            "requirements.txt",
            "exoagent-no-such-package-zz==9.9.9\n",
            false,
        )],
    );
    bare_repo(
        repos.path(),
        "packages",
        &[("apt.txt", "coreutils\nexoagent-no-such-package\n", false)],
    );
    bare_repo(
        repos.path(),
        "future",
        &[("runtime.txt", "python-3.99\n", false)],
    );
    let daemon = GitDaemon::start(repos.path());

    // 1. The good workflow: cloned, built, JupyterLab ready in its environment.
    let mut sb = Sandbox::new(&config(&daemon.url("demo.git"), "main"));
    sb.start_agent();
    let status = sb.wait_complete(900);
    assert_eq!(service(&status)["state"], "ready", "{status}");
    let home = sb.root().join("home").join(whoami());
    let checkout = home.join("demo");
    let head = run_ok(
        Command::new("git")
            .arg("-C")
            .arg(&checkout)
            .args(["rev-parse", "HEAD"]),
        "rev-parse",
    );
    assert_eq!(String::from_utf8_lossy(&head.stdout).trim(), commit);

    // The environment: a venv under opt/exoagent/workflows/<key>, current → it.
    let workflows = sb.root().join("opt/exoagent/workflows");
    let key = fs::read_link(workflows.join("current")).unwrap();
    let venv = workflows.join(&key).join("venv");
    let python = venv.join("bin/python");
    let version = run_ok(
        Command::new(&python).args([
            "-c",
            "import six, sys; print(six.__version__, '%d.%d' % sys.version_info[:2])",
        ]),
        "import six in the workflow venv",
    );
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("1.16.0 {python_version}")
    );

    // The notebook at the workflow's path runs in a real kernel of that environment and
    // imports the package.
    let executed = run_ok(
        Command::new(venv.join("bin/jupyter"))
            .args([
                "nbconvert",
                "--to",
                "notebook",
                "--execute",
                "--stdout",
                "demo.ipynb",
            ])
            .current_dir(&checkout)
            .env(
                "PATH",
                format!("{}:/usr/bin:/bin", venv.join("bin").display()),
            )
            .env("HOME", sb.root()),
        "execute the workflow's notebook",
    );
    let executed = String::from_utf8_lossy(&executed.stdout);
    assert!(
        executed.contains(&format!("six 1.16.0 from {}", venv.display())),
        "{executed}"
    );

    // postBuild ran in the checkout, as the sandbox user, with the venv first on PATH.
    let marker = checkout.join("postbuild-marker");
    let meta = fs::metadata(&marker).expect("postBuild wrote its marker");
    assert_eq!(meta.uid(), nix_uid());
    assert_eq!(
        fs::read_to_string(&marker).unwrap().trim(),
        venv.to_string_lossy()
    );
    // `pip install` in a postBuild (binder's usual line) reaches the environment's own pip.
    assert_eq!(
        fs::read_to_string(checkout.join("pip-marker"))
            .unwrap()
            .trim(),
        venv.join("bin/pip").to_string_lossy()
    );
    // JupyterLab started through the repository's `start`, in the environment.
    assert_eq!(
        fs::read_to_string(checkout.join("start-marker"))
            .unwrap()
            .trim(),
        workflows.join("current/venv").to_string_lossy()
    );
    // /data for the user.
    let data = fs::metadata(sb.root().join("data")).unwrap();
    assert!(data.is_dir());
    assert_eq!(data.uid(), nix_uid());

    // The workflow's path answers once logged in with the passphrase, and its notebook is in
    // JupyterLab's root (the checkout).
    let client = login(&sb.base(), &sb.passphrase());
    let page = client
        .get(format!("{}/lab/tree/demo.ipynb", sb.base()))
        .send()
        .unwrap();
    assert_eq!(page.status(), 200, "GET the workflow path");
    let root = client.get(format!("{}/", sb.base())).send().unwrap();
    assert_eq!(root.status(), 302);
    let location = root.headers()["location"].to_str().unwrap();
    assert_eq!(
        location.trim_end_matches('?'),
        "/lab/tree/demo.ipynb",
        "JupyterLab's default URL is the workflow's path"
    );
    let contents = client
        .get(format!("{}/api/contents/demo.ipynb?content=0", sb.base()))
        .send()
        .unwrap();
    assert_eq!(
        contents.status(),
        200,
        "the notebook is in JupyterLab's root"
    );

    // 2. A second start at the same commit reuses the environment: nothing is rebuilt.
    let pid = service(&status)["pid"].as_i64().expect("a pid");
    assert_eq!(
        service(&status)["url"],
        format!("{}/lab/tree/demo.ipynb", sb.base()),
        "the status names where the workflow opens"
    );
    // postBuild rewrites its marker whenever it runs: an unchanged time means no rebuild.
    let postbuild_time = fs::metadata(&marker).unwrap().modified().unwrap();
    sb.kill_agent(libc::SIGTERM);
    sb.start_agent();
    let status = sb.wait_complete(300);
    assert_eq!(service(&status)["state"], "ready");
    assert_eq!(
        fs::metadata(&marker).unwrap().modified().unwrap(),
        postbuild_time
    );
    assert!(
        sb.agent_output()
            .contains("workflow environment already built; reused"),
        "the second start did not reuse the build"
    );
    assert_eq!(fs::read_link(workflows.join("current")).unwrap(), key);
    // The running JupyterLab was adopted, not restarted: a session survives agent restarts.
    assert_eq!(service(&status)["pid"].as_i64(), Some(pid), "{status}");
    assert!(
        sb.agent_output().contains("already built; reused"),
        "{}",
        sb.agent_output()
    );
    drop(sb);

    // 3. A ref that does not exist: failed, naming the ref.
    let mut sb = Sandbox::new(&config(&daemon.url("demo.git"), "no-such-branch"));
    sb.start_agent();
    let status = wait_failed(&sb);
    let reason = &service(&status)["reason"];
    assert_eq!(reason["code"], "workflow-ref-not-found", "{status}");
    let detail = reason["detail"].as_str().unwrap();
    assert!(detail.contains("no-such-branch"), "{detail}");
    assert!(
        console_error_has(&sb.agent_output(), "workflow-ref-not-found"),
        "{}",
        sb.agent_output()
    );
    // The clone stays; a retry with a fixed ref builds from it.
    let checkout = sb.root().join("home").join(whoami()).join("demo");
    assert!(checkout.join(".git").is_dir());
    sb.kill_agent(libc::SIGTERM);
    sb.rewrite_config(&config(&daemon.url("demo.git"), &commit));
    sb.start_agent();
    let status = sb.wait_complete(600);
    assert_eq!(service(&status)["state"], "ready", "{status}");
    drop(sb);

    // A postBuild that fails: its status and last lines, on the API and the console.
    let mut sb = Sandbox::new(&config(&daemon.url("failing.git"), "HEAD"));
    sb.start_agent();
    let status = wait_failed(&sb);
    let reason = &service(&status)["reason"];
    assert_eq!(reason["code"], "workflow-postbuild-failed", "{status}");
    let detail = reason["detail"].as_str().unwrap();
    assert!(
        detail.contains("exit status: 7") && detail.contains("about to fail | the real cause"),
        "{detail}"
    );
    assert!(console_error_has(
        &sb.agent_output(),
        "workflow-postbuild-failed"
    ));
    drop(sb);

    // A Python neither the system nor uv can provide.
    let mut sb = Sandbox::new(&config(&daemon.url("future.git"), "HEAD"));
    sb.start_agent();
    let status = wait_failed(&sb);
    let reason = &service(&status)["reason"];
    assert_eq!(reason["code"], "workflow-python-unavailable", "{status}");
    assert!(
        reason["detail"].as_str().unwrap().contains("3.99"),
        "{status}"
    );
    drop(sb);

    // apt.txt naming a package that is not there (the sandbox installs none).
    let mut sb = Sandbox::new(&config(&daemon.url("packages.git"), "HEAD"));
    sb.start_agent();
    let status = wait_failed(&sb);
    let reason = &service(&status)["reason"];
    assert_eq!(reason["code"], "workflow-packages-failed", "{status}");
    let detail = reason["detail"].as_str().unwrap();
    assert!(
        detail.contains("exoagent-no-such-package") && !detail.contains("coreutils"),
        "{detail}"
    );
    drop(sb);

    // A requirement that cannot be resolved.
    let mut sb = Sandbox::new(&config(&daemon.url("unresolvable.git"), "HEAD"));
    sb.start_agent();
    let status = wait_failed(&sb);
    let reason = &service(&status)["reason"];
    assert_eq!(reason["code"], "workflow-requirements-failed", "{status}");
    let detail = reason["detail"].as_str().unwrap();
    assert!(
        detail.contains("requirements.txt") && detail.contains("exoagent-no-such-package-zz"),
        "{detail}"
    );
    drop(sb);

    // 4. A repository with a Dockerfile: refused, naming the file.
    let mut sb = Sandbox::new(&config(&daemon.url("docker.git"), "HEAD"));
    sb.start_agent();
    let status = wait_failed(&sb);
    let reason = &service(&status)["reason"];
    assert_eq!(reason["code"], "workflow-unsupported", "{status}");
    assert!(
        reason["detail"].as_str().unwrap().contains("Dockerfile"),
        "{status}"
    );
    assert!(console_error_has(
        &sb.agent_output(),
        "workflow-unsupported"
    ));
    drop(sb);

    // 5. A repository that cannot be cloned.
    let mut sb = Sandbox::new(&config(&daemon.url("missing.git"), "HEAD"));
    sb.start_agent();
    let status = wait_failed(&sb);
    let reason = &service(&status)["reason"];
    assert_eq!(reason["code"], "workflow-clone-failed", "{status}");
    assert!(
        reason["detail"].as_str().unwrap().contains("git clone"),
        "{status}"
    );
}

/// Whether a console status line (stdout in the sandbox) is an `error` with `reason`.
fn console_error_has(output: &str, reason: &str) -> bool {
    output.lines().any(|line| {
        let (Some(start), Some(end)) = (line.find('{'), line.rfind('}')) else {
            return false;
        };
        serde_json::from_str::<Value>(&line[start..=end])
            .is_ok_and(|v| v["status"] == "error" && v["reason"] == reason)
    })
}

/// A client logged in through Jupyter's login form.
fn login(base: &str, password: &str) -> reqwest::blocking::Client {
    let client = reqwest::blocking::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = client.get(format!("{base}/login")).send().unwrap();
    assert_eq!(page.status(), 200, "GET /login");
    let xsrf = page
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| {
            c.split(';')
                .next()?
                .strip_prefix("_xsrf=")
                .map(str::to_owned)
        })
        .expect("an _xsrf cookie");
    let resp = client
        .post(format!("{base}/login"))
        .form(&[("_xsrf", xsrf.as_str()), ("password", password)])
        .send()
        .unwrap();
    assert_eq!(resp.status(), 302, "login with the passphrase");
    client
}

fn whoami() -> String {
    let out = run_ok(Command::new("id").arg("-un"), "id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn nix_uid() -> u32 {
    unsafe { libc::geteuid() }
}

/// The clone as another account (what `exouser` is on an instance; needs root): the checkout
/// belongs to that account, a ref moves it, and local changes in the way stop the checkout
/// instead of being lost.
#[tokio::test]
async fn the_checkout_is_the_accounts_and_never_forced() {
    use exoagent::platform::privileges::DropTo;
    use exoagent::services::jupyterlab::workflow::{run::RunAs, source};

    if nix_uid() != 0 {
        eprintln!("skipped: switching to another account needs root");
        return;
    }
    let repos = tempfile::tempdir().unwrap();
    let first = bare_repo(repos.path(), "moves", &[("notes.txt", "one\n", false)]);
    // A second commit on main, with v1 tagging the first.
    let work = repos.path().join("moves-work");
    let git = |args: &[&str]| {
        run_ok(
            Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@t", "-C"])
                .arg(&work)
                .args(args),
            "git",
        )
    };
    git(&["tag", "v1"]);
    fs::write(work.join("notes.txt"), "two\n").unwrap();
    git(&["commit", "-qam", "two"]);
    git(&["push", "-q", "--tags", "../moves.git", "main"]);
    let daemon = GitDaemon::start(repos.path());

    let top = tempfile::tempdir().unwrap();
    fs::set_permissions(top.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let home = top.path().join("home");
    fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    let who = RunAs {
        drop_to: Some(DropTo::with_groups_of("nobody", 65534, 65534).unwrap()),
        env: vec![
            ("PATH".into(), std::env::var("PATH").unwrap()),
            ("HOME".into(), home.to_string_lossy().into_owned()),
            ("GIT_TERMINAL_PROMPT".into(), "0".into()),
        ],
        cwd: home.clone(),
    };
    let dir = home.join("moves");
    let url = daemon.url("moves.git");
    let at_v1 = source::sync(&url, "v1", &dir, &who).await.unwrap();
    assert_eq!(at_v1.commit, first);
    assert_eq!(fs::metadata(&dir).unwrap().uid(), 65534);
    assert_eq!(fs::metadata(dir.join("notes.txt")).unwrap().uid(), 65534);
    assert_eq!(fs::read_to_string(dir.join("notes.txt")).unwrap(), "one\n");

    // A local edit the move to main would overwrite: the checkout stops, the edit stays.
    fs::write(dir.join("notes.txt"), "my work\n").unwrap();
    let e = source::sync(&url, "main", &dir, &who).await.unwrap_err();
    assert_eq!(e.reason(), "workflow-checkout-failed", "{e}");
    assert_eq!(
        fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "my work\n"
    );

    // Without the edit, main is checked out.
    fs::write(dir.join("notes.txt"), "one\n").unwrap();
    let at_main = source::sync(&url, "main", &dir, &who).await.unwrap();
    assert_ne!(at_main.commit, first);
    assert_eq!(fs::read_to_string(dir.join("notes.txt")).unwrap(), "two\n");

    // A tag moved upstream is followed (fetch updates tags).
    git(&["tag", "-f", "v1"]);
    git(&["push", "-q", "--force", "--tags", "../moves.git"]);
    let moved = source::sync(&url, "v1", &dir, &who).await.unwrap();
    assert_eq!(moved.commit, at_main.commit);

    // Another repository's checkout in the way is never touched.
    let head_before = fs::read_to_string(dir.join(".git/HEAD")).unwrap();
    let e = source::sync(&daemon.url("other.git"), "HEAD", &dir, &who)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "workflow-checkout-failed", "{e}");
    assert!(e.to_string().contains("not of"), "{e}");
    assert_eq!(fs::read_to_string(dir.join("notes.txt")).unwrap(), "two\n");
    assert_eq!(
        fs::read_to_string(dir.join(".git/HEAD")).unwrap(),
        head_before
    );

    // A checkout with no origin is said to be one, not "a checkout of" nothing.
    run_ok(
        Command::new("git")
            .args(["-c", "safe.directory=*", "-C"])
            .arg(&dir)
            .args(["remote", "remove", "origin"]),
        "git remote remove",
    );
    let e = source::sync(&url, "main", &dir, &who).await.unwrap_err();
    assert_eq!(e.reason(), "workflow-checkout-failed", "{e}");
    assert!(e.to_string().contains("no remote named origin"), "{e}");
    assert_eq!(fs::read_to_string(dir.join("notes.txt")).unwrap(), "two\n");
}

/// A whole build as another account (exouser on an instance; `nobody` here, needs root), the
/// agent being root: the checkout, the environment and postBuild's files are that account's,
/// and with a uv that account cannot run (the agent's is under /root) pip builds it.
#[test]
fn a_build_as_another_account_owns_its_files_and_falls_back_to_pip() {
    use exoagent::paths::Paths;
    use exoagent::platform::os::Family;
    use exoagent::services::jupyterlab::workflow::{build, WorkflowSettings};
    use exoagent::services::jupyterlab::PythonInstaller;
    use exoagent::services::{Account, ServiceContext};

    if nix_uid() != 0 {
        eprintln!("skipped: switching to another account needs root");
        return;
    }
    let _turn = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
    let version = system_python();
    let python = format!("/usr/bin/python{version}");
    if !Path::new(&python).exists() {
        eprintln!("skipped: no {python} (the account cannot reach the invoking user's Python)");
        return;
    }
    let top = tempfile::tempdir().unwrap();
    fs::set_permissions(top.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let home = top.path().join("home/nobody");
    fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    // The account's own caches; the system's interpreters only.
    let cache = home.join(".cache/uv");
    let _env = Env::set(&[
        ("UV_CACHE_DIR", cache.as_os_str()),
        ("PATH", "/usr/local/bin:/usr/bin:/bin".as_ref()),
    ]);

    let repos = tempfile::tempdir().unwrap();
    let commit = bare_repo(
        repos.path(),
        "owned",
        &[
            ("requirements.txt", "six==1.16.0\n", false),
            ("runtime.txt", &format!("python-{version}\n"), false),
            ("postBuild", "id -u > postbuild-uid\n", false),
        ],
    );
    let daemon = GitDaemon::start(repos.path());
    let ctx = ServiceContext {
        paths: Paths::sandbox(top.path()),
        account: Account {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
            home: home.clone(),
        },
        exe: common::exe().into(),
    };
    let workflow = WorkflowSettings {
        repository: daemon.url("owned.git"),
        git_ref: "HEAD".into(),
        path: "/lab".into(),
    };
    let lock = exoagent::services::jupyterlab::REQUIREMENTS;
    let inputs = build::Inputs {
        workflow: &workflow,
        ctx: &ctx,
        family: Family::Debian,
        installer: PythonInstaller::Auto,
        uv: Some("/root/.pyenv/shims/uv".into()),
        default_python: Ok(python.clone()),
        lock,
        lock_id: "test-lock",
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let built = runtime.block_on(build::build(&inputs)).unwrap();
    assert!(built.fresh);
    assert_eq!(built.checkout.commit, commit);
    let checkout = home.join("owned");
    for path in [
        checkout.clone(),
        checkout.join("requirements.txt"),
        checkout.join("postbuild-uid"),
        built.venv.clone(),
        built.venv.join("bin"),
        built.venv.join("pyvenv.cfg"),
        top.path().join("data"),
    ] {
        assert_eq!(
            fs::metadata(&path).unwrap().uid(),
            65534,
            "{}",
            path.display()
        );
    }
    // postBuild ran (through bash: it is not executable) as the account.
    assert_eq!(
        fs::read_to_string(checkout.join("postbuild-uid"))
            .unwrap()
            .trim(),
        "65534"
    );
    // pip built it (uv under /root is out of the account's reach): pip is in the venv.
    assert!(built.venv.join("bin/pip").exists());
    let six = run_ok(
        Command::new(built.venv.join("bin/python"))
            .args(["-c", "import six, jupyterlab; print(six.__version__)"]),
        "import",
    );
    assert_eq!(String::from_utf8_lossy(&six.stdout).trim(), "1.16.0");
    // The agent's own files stay root's.
    let marker = built.venv.parent().unwrap().join("built");
    assert_eq!(fs::metadata(&marker).unwrap().uid(), 0);

    // Again: reused, nothing run.
    let again = runtime.block_on(build::build(&inputs)).unwrap();
    assert!(!again.fresh);
    assert_eq!(again.key, built.key);
}
