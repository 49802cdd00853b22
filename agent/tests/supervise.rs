//! Supervision with real processes: the real `exoagent shim`, `sh` and `python3 -m http.server`
//! services, real HTTP probes, real signals, real files and `/proc`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use exoagent::config::settings::SupervisePolicy;
use exoagent::model::ServiceKind;
use exoagent::platform::procfs;
use exoagent::state::{ServiceState, ServiceStatus, Snapshot, StateHub};
use exoagent::supervise::records::{self, RunRecord};
use exoagent::supervise::{
    has_live_shim, stop_recorded, Probe, RunAs, RunOutcome, RunReport, RunSpec, ServicePaths,
    ShimCommand, Supervisor,
};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const KIND: ServiceKind = ServiceKind::JupyterLab;
/// An upper bound for anything to happen, so a broken build fails instead of hanging. Never a
/// speed assertion.
const PATIENCE: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn policy() -> SupervisePolicy {
    SupervisePolicy {
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        crash_loop_restarts: 5,
        stable_after: Duration::from_secs(5),
        readiness_interval: Duration::from_millis(50),
        liveness_interval: Duration::from_millis(200),
        liveness_failures: 3,
        log_max_bytes: 1 << 20,
    }
}

/// A temp dir with a run dir and a log; kills whatever its records name when dropped, so a
/// failing test leaves no processes behind.
struct Fixture {
    dir: tempfile::TempDir,
    paths: ServicePaths,
    /// Whether `dir` is a tmpfs mount point to unmount when dropped.
    tmpfs: bool,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let paths = ServicePaths {
            run_dir: dir.path().join("state/run/jupyterlab"),
            log_file: dir.path().join("log/exoagent/jupyterlab.log"),
        };
        Self {
            dir,
            paths,
            tmpfs: false,
        }
    }

    /// A fixture on a tmpfs of `size_kib`, a disk that can really be filled; `None` when not
    /// root (mounting needs it; CI runs as root).
    fn on_tmpfs(size_kib: u32) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        let mut fx = Self::new();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_kib}k,mode=0755")])
            .arg("tmpfs")
            .arg(fx.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs failed");
        fx.tmpfs = true;
        Some(fx)
    }

    /// Write a filler file until the filesystem is full (ENOSPC); returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        loop {
            match file.write_all(&block) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return filler,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn run_record(&self) -> Option<RunRecord> {
        records::read_record(&records::run_file(&self.paths.run_dir)).unwrap()
    }

    fn supervisor(
        &self,
        spec: RunSpec,
        probe: Probe,
        policy: SupervisePolicy,
        hub: &StateHub,
    ) -> Supervisor {
        Supervisor::new(
            KIND,
            spec,
            probe,
            Duration::from_secs(30),
            policy,
            self.paths.clone(),
            ShimCommand {
                exe: PathBuf::from(env!("CARGO_BIN_EXE_exoagent")),
            },
            hub.clone(),
        )
    }

    async fn stop(&self) {
        stop_recorded(&self.paths.run_dir, Duration::from_secs(5))
            .await
            .unwrap();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let Ok(Some(run)) =
            records::read_record::<RunRecord>(&records::run_file(&self.paths.run_dir))
        else {
            return;
        };
        if procfs::is_alive(run.service_pid, run.service_start_ticks) && run.pgid > 1 {
            let _ = killpg(Pid::from_raw(run.pgid), Signal::SIGKILL);
        }
        if procfs::is_alive(run.shim_pid, run.shim_start_ticks) {
            let _ = kill(Pid::from_raw(run.shim_pid as i32), Signal::SIGKILL);
        }
    }
}

/// Unmounts a fixture's tmpfs after [`Fixture`]'s own drop has killed its processes.
struct Unmount<'a>(&'a Fixture);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        if let Ok(Some(run)) =
            records::read_record::<RunRecord>(&records::run_file(&self.0.paths.run_dir))
        {
            if procfs::is_alive(run.service_pid, run.service_start_ticks) && run.pgid > 1 {
                let _ = killpg(Pid::from_raw(run.pgid), Signal::SIGKILL);
            }
            if procfs::is_alive(run.shim_pid, run.shim_start_ticks) {
                let _ = kill(Pid::from_raw(run.shim_pid as i32), Signal::SIGKILL);
            }
        }
        if self.0.tmpfs {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }
}

fn hub() -> StateHub {
    StateHub::new([(KIND, 8888, "http://127.0.0.1:8888/".to_owned())])
}

fn env() -> Vec<(String, String)> {
    vec![(
        "PATH".to_owned(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".to_owned()),
    )]
}

fn sh(script: &str, cwd: &Path) -> RunSpec {
    RunSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: env(),
        cwd: cwd.to_path_buf(),
        run_as: None,
    }
}

fn http_server(port: u16, cwd: &Path) -> RunSpec {
    RunSpec {
        argv: [
            "python3",
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ]
        .map(String::from)
        .to_vec(),
        env: env(),
        cwd: cwd.to_path_buf(),
        run_as: None,
    }
}

fn http_probe(port: u16) -> Probe {
    Probe::Http {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        path: "/".into(),
        host: format!("127.0.0.1:{port}"),
        expect_json_key: None,
        user_agent: None,
    }
}

fn start(sup: Supervisor) -> (CancellationToken, JoinHandle<RunReport>) {
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    (cancel, task)
}

async fn finish(cancel: CancellationToken, task: JoinHandle<RunReport>) -> RunReport {
    cancel.cancel();
    tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap()
}

/// A first agent run: the HTTP service is started, becomes ready, and the supervisor is
/// cancelled (the agent "goes away"; the service keeps running). Returns the service's pid.
async fn first_run_until_ready(fx: &Fixture, port: u16) -> u32 {
    let hub = hub();
    let mut rx = hub.subscribe();
    let (cancel, task) = start(fx.supervisor(
        http_server(port, fx.path()),
        http_probe(port),
        policy(),
        &hub,
    ));
    let pid = wait_for(&mut rx, "ready", ready).await.pid.unwrap();
    let report = finish(cancel, task).await;
    assert_eq!(report.outcome, RunOutcome::Cancelled);
    pid
}

async fn wait_for(
    rx: &mut watch::Receiver<Snapshot>,
    what: &str,
    pred: impl Fn(&ServiceStatus) -> bool,
) -> ServiceStatus {
    let result = tokio::time::timeout(PATIENCE, rx.wait_for(|s| pred(&s.services[0])))
        .await
        .map(|r| r.map(|s| s.services[0].clone()));
    match result {
        Ok(Ok(status)) => status,
        _ => panic!("never saw {what}; last: {:?}", rx.borrow().services[0]),
    }
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let waited = tokio::time::timeout(PATIENCE, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "never saw {what}");
}

fn alive(pid: u32) -> Option<u64> {
    procfs::start_ticks(pid).filter(|&t| procfs::is_alive(pid, t))
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn ready(s: &ServiceStatus) -> bool {
    s.state == ServiceState::Ready
}

#[tokio::test]
async fn http_server_becomes_ready_and_restarts_after_kill() {
    let fx = Fixture::new();
    let port = free_port();
    let hub = hub();
    let mut rx = hub.subscribe();
    let (cancel, task) = start(fx.supervisor(
        http_server(port, fx.path()),
        http_probe(port),
        policy(),
        &hub,
    ));

    let status = wait_for(&mut rx, "ready", ready).await;
    let pid = status.pid.expect("ready carries the pid");
    assert_eq!(status.restarts, 0);
    assert_eq!(status.reason, None);
    let run = fx.run_record().unwrap();
    assert_eq!(run.service_pid, pid);
    assert_eq!(run.pgid, pid as i32);
    assert!(cmdline(pid).contains("http.server"), "{}", cmdline(pid));
    assert!(procfs::is_alive(run.shim_pid, run.shim_start_ticks));
    assert!(
        cmdline(run.shim_pid).ends_with("exoagent shim "),
        "{}",
        cmdline(run.shim_pid)
    );
    // The service leads its own process group; the shim leads its own session.
    assert_eq!(procfs::read_stat(pid).unwrap().pgrp, pid as i32);
    assert_eq!(
        nix::unistd::getsid(Some(Pid::from_raw(run.shim_pid as i32))).unwrap(),
        Pid::from_raw(run.shim_pid as i32)
    );
    let dir_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&fx.paths.run_dir).unwrap().permissions(),
    );
    assert_eq!(dir_mode & 0o777, 0o700);
    // The probe's requests are logged by http.server on stderr, which the shim captures.
    wait_until("probe requests in the log", || {
        std::fs::read_to_string(&fx.paths.log_file)
            .is_ok_and(|log| log.contains("\"GET / HTTP/1.1\" 200"))
    })
    .await;

    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let restarting = wait_for(&mut rx, "starting again", |s| {
        s.state == ServiceState::Starting && s.restarts == 1
    })
    .await;
    let reason = restarting.reason.expect("restart carries the last exit");
    assert_eq!(reason.code, "exited");
    assert!(
        reason.detail.contains("killed by signal 9"),
        "{}",
        reason.detail
    );
    let status = wait_for(&mut rx, "ready again", |s| ready(s) && s.restarts == 1).await;
    let new_pid = status.pid.unwrap();
    assert_ne!(new_pid, pid);
    assert!(cmdline(new_pid).contains("http.server"));
    assert_eq!(fx.run_record().unwrap().service_pid, new_pid);

    let report = finish(cancel, task).await;
    assert_eq!(report.outcome, RunOutcome::Cancelled);
    assert_eq!(report.spawned, 2);
    assert_eq!(report.restart_delays, [Duration::from_millis(50)]);
    assert!(fx.run_record().is_some());
    fx.stop().await;
    assert!(alive(new_pid).is_none());
}

#[tokio::test]
async fn crash_loop_fails_with_status_stderr_and_capped_backoff() {
    let fx = Fixture::new();
    let hub = hub();
    let runs = fx.path().join("runs.txt");
    let spec = sh(
        &format!("echo run >> '{}'; echo boom >&2; exit 3", runs.display()),
        fx.path(),
    );
    let never = Probe::Tcp {
        addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
    };
    let sup = fx.supervisor(spec, never, policy(), &hub);
    let report = tokio::time::timeout(PATIENCE, sup.run(CancellationToken::new()))
        .await
        .unwrap();

    let RunOutcome::Failed(reason) = &report.outcome else {
        panic!("expected failure, got {report:?}");
    };
    assert_eq!(reason.code, "crash-loop");
    assert!(
        reason.detail.contains("exited with status 3"),
        "{}",
        reason.detail
    );
    assert!(
        reason.detail.contains("5 times in a row"),
        "{}",
        reason.detail
    );
    assert!(reason.detail.contains("boom"), "{}", reason.detail);
    assert_eq!(
        report.restart_delays,
        [50, 100, 200, 200].map(Duration::from_millis)
    );
    assert_eq!(report.spawned, 5);
    let lines = std::fs::read_to_string(&runs).unwrap();
    assert_eq!(lines.lines().count(), 5, "{lines}");

    let status = hub.snapshot().services[0].clone();
    assert_eq!(status.state, ServiceState::Failed);
    assert_eq!(status.restarts, 4);
    assert_eq!(status.pid, None);
    assert_eq!(status.reason.as_ref(), Some(reason));
    let setup = hub.snapshot().setup;
    assert_eq!(setup.step.as_deref(), Some("jupyterlab"));
    // stderr went to the log as well.
    let log = std::fs::read_to_string(&fx.paths.log_file).unwrap();
    assert_eq!(log.matches("boom").count(), 5, "{log}");
}

#[tokio::test]
async fn missing_program_is_a_crash_loop_naming_the_program() {
    let fx = Fixture::new();
    let hub = hub();
    let spec = RunSpec {
        argv: vec!["/nonexistent/exoagent-test-program".into()],
        env: env(),
        cwd: fx.path().to_path_buf(),
        run_as: None,
    };
    let probe = Probe::Tcp {
        addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
    };
    let policy = SupervisePolicy {
        crash_loop_restarts: 2,
        ..policy()
    };
    let report = tokio::time::timeout(
        PATIENCE,
        fx.supervisor(spec, probe, policy, &hub)
            .run(CancellationToken::new()),
    )
    .await
    .unwrap();
    let RunOutcome::Failed(reason) = report.outcome else {
        panic!("expected failure");
    };
    assert_eq!(reason.code, "crash-loop");
    assert!(
        reason
            .detail
            .contains("failed to spawn '/nonexistent/exoagent-test-program'"),
        "{}",
        reason.detail
    );
    assert_eq!(report.spawned, 2);
}

#[tokio::test]
async fn start_timeout_kills_the_group_and_counts_as_a_failed_run() {
    let fx = Fixture::new();
    let hub = hub();
    let pids = fx.path().join("pids.txt");
    let spec = sh(
        &format!(
            "sleep 1000 & echo $! >> '{}'; exec sleep 1001",
            pids.display()
        ),
        fx.path(),
    );
    let never = Probe::Tcp {
        addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
    };
    let policy = SupervisePolicy {
        crash_loop_restarts: 2,
        ..policy()
    };
    let sup = Supervisor::new(
        KIND,
        spec,
        never,
        Duration::from_millis(300),
        policy,
        fx.paths.clone(),
        ShimCommand {
            exe: PathBuf::from(env!("CARGO_BIN_EXE_exoagent")),
        },
        hub.clone(),
    );
    let report = tokio::time::timeout(PATIENCE, sup.run(CancellationToken::new()))
        .await
        .unwrap();
    let RunOutcome::Failed(reason) = report.outcome else {
        panic!("expected failure");
    };
    assert_eq!(reason.code, "start-timeout");
    assert!(
        reason.detail.contains("not ready within 300ms"),
        "{}",
        reason.detail
    );
    assert!(
        reason.detail.contains("2 times in a row"),
        "{}",
        reason.detail
    );
    assert_eq!(report.restart_delays, [Duration::from_millis(50)]);
    // Both runs' background sleeps are gone with their groups.
    let pids = std::fs::read_to_string(&pids).unwrap();
    assert_eq!(pids.lines().count(), 2, "{pids}");
    for pid in pids.lines() {
        let pid: u32 = pid.trim().parse().unwrap();
        assert!(
            alive(pid).is_none() || !cmdline(pid).contains("sleep 1000"),
            "sleep {pid} survived"
        );
    }
}

#[tokio::test]
async fn restarted_agent_adopts_the_running_service_then_restarts_it_after_a_kill() {
    let fx = Fixture::new();
    let port = free_port();
    let pid = first_run_until_ready(&fx, port).await;
    let ticks = procfs::start_ticks(pid).unwrap();

    // The agent is "gone": the service keeps running and answering.
    assert!(procfs::is_alive(pid, ticks));
    http_probe(port)
        .check(Duration::from_secs(10))
        .await
        .expect("service still answers with no supervisor");

    // A new agent adopts it without spawning.
    let hub2 = hub();
    let mut rx2 = hub2.subscribe();
    let (cancel, task) = start(fx.supervisor(
        http_server(port, fx.path()),
        http_probe(port),
        policy(),
        &hub2,
    ));
    let status = wait_for(&mut rx2, "ready after adoption", ready).await;
    assert_eq!(status.pid, Some(pid));
    assert_eq!(status.restarts, 0);
    assert!(procfs::is_alive(pid, ticks));

    // Killing the adopted service is noticed through the shim's pidfd and it is restarted.
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let status = wait_for(&mut rx2, "ready after restart", |s| {
        ready(s) && s.restarts == 1
    })
    .await;
    assert_ne!(status.pid, Some(pid));
    let report = finish(cancel, task).await;
    assert!(report.adopted);
    assert_eq!(report.spawned, 1);
    assert_eq!(report.restart_delays, [Duration::from_millis(50)]);
    fx.stop().await;
}

fn shim_command() -> ShimCommand {
    ShimCommand {
        exe: PathBuf::from(env!("CARGO_BIN_EXE_exoagent")),
    }
}

/// Whether `pid` runs and is not a zombie waiting to be reaped.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

#[tokio::test]
async fn a_standby_shim_runs_the_first_launch_and_a_dropped_one_exits() {
    let fx = Fixture::new();
    let port = free_port();
    assert!(!has_live_shim(&fx.paths.run_dir));
    let standby = shim_command().standby().unwrap();
    let standby_pid = standby.id().unwrap();
    assert!(
        cmdline(standby_pid).ends_with("shim "),
        "{}",
        cmdline(standby_pid)
    );
    let hub = hub();
    let mut rx = hub.subscribe();
    let (cancel, task) = start(
        fx.supervisor(
            http_server(port, fx.path()),
            http_probe(port),
            policy(),
            &hub,
        )
        .with_standby(standby),
    );
    wait_for(&mut rx, "ready", ready).await;
    let report = finish(cancel, task).await;
    assert_eq!(report.spawned, 1);
    // The service runs under the shim started ahead.
    assert_eq!(fx.run_record().unwrap().shim_pid, standby_pid);
    assert!(has_live_shim(&fx.paths.run_dir));
    fx.stop().await;
    wait_until("the shim to end with its service", || !running(standby_pid)).await;
    assert!(!has_live_shim(&fx.paths.run_dir));

    // Started ahead and never handed a spec: it exits once dropped, recording nothing.
    let unused = shim_command().standby().unwrap();
    let unused_pid = unused.id().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(running(unused_pid), "a standby shim waits for its spec");
    drop(unused);
    wait_until("the unused standby shim to exit", || !running(unused_pid)).await;
    assert!(!has_live_shim(&fx.paths.run_dir));
}

#[tokio::test]
async fn changed_spec_is_not_adopted() {
    let fx = Fixture::new();
    let port = free_port();
    let pid = first_run_until_ready(&fx, port).await;
    let ticks = procfs::start_ticks(pid).unwrap();

    let mut changed = http_server(port, fx.path());
    changed.env.push(("EXOAGENT_TEST".into(), "changed".into()));
    let hub2 = hub();
    let mut rx2 = hub2.subscribe();
    let (cancel, task) = start(fx.supervisor(changed, http_probe(port), policy(), &hub2));
    let status = wait_for(&mut rx2, "ready with the new spec", ready).await;
    assert_ne!(status.pid, Some(pid));
    assert_eq!(status.restarts, 0);
    assert!(!procfs::is_alive(pid, ticks), "old service still running");
    let new_pid = status.pid.unwrap();
    let environ = std::fs::read(format!("/proc/{new_pid}/environ")).unwrap();
    assert!(String::from_utf8_lossy(&environ).contains("EXOAGENT_TEST=changed"));
    let report = finish(cancel, task).await;
    assert!(!report.adopted);
    assert_eq!(report.spawned, 1);
    fx.stop().await;
}

#[tokio::test]
async fn a_service_that_recovers_after_the_agent_gave_up_shows_no_restart() {
    // The first agent sees a crash loop and gives up; after the cause is fixed, a new agent
    // starts the service: a first start, not a restart of the run the old agent already saw.
    let fx = Fixture::new();
    let hub1 = hub();
    let crash = sh("exit 3", fx.path());
    let never = Probe::Tcp {
        addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
    };
    let mut quick = policy();
    quick.crash_loop_restarts = 2;
    let report = tokio::time::timeout(
        PATIENCE,
        fx.supervisor(crash, never, quick, &hub1)
            .run(CancellationToken::new()),
    )
    .await
    .unwrap();
    assert!(
        matches!(report.outcome, RunOutcome::Failed(_)),
        "{report:?}"
    );

    let port = free_port();
    let hub2 = hub();
    let mut rx2 = hub2.subscribe();
    let (cancel, task) = start(fx.supervisor(
        http_server(port, fx.path()),
        http_probe(port),
        policy(),
        &hub2,
    ));
    let status = wait_for(&mut rx2, "ready", ready).await;
    assert_eq!(status.restarts, 0, "{status:?}");
    assert_eq!(status.reason, None, "{status:?}");
    let report = finish(cancel, task).await;
    assert!(report.restart_delays.is_empty(), "{report:?}");
    fx.stop().await;
}

#[tokio::test]
async fn service_that_died_while_the_agent_was_away_is_restarted() {
    let fx = Fixture::new();
    let port = free_port();
    let pid = first_run_until_ready(&fx, port).await;
    let run = fx.run_record().unwrap();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    wait_until("the shim to record the exit and end", || {
        records::exit_file(&fx.paths.run_dir).exists()
            && !procfs::is_alive(run.shim_pid, run.shim_start_ticks)
    })
    .await;

    let hub2 = hub();
    let mut rx2 = hub2.subscribe();
    let (cancel, task) = start(fx.supervisor(
        http_server(port, fx.path()),
        http_probe(port),
        policy(),
        &hub2,
    ));
    let status = wait_for(&mut rx2, "ready after restart", |s| {
        ready(s) && s.restarts == 1
    })
    .await;
    assert_ne!(status.pid, Some(pid));
    let report = finish(cancel, task).await;
    assert!(!report.adopted);
    assert_eq!(report.spawned, 1);
    assert_eq!(report.restart_delays, [Duration::from_millis(50)]);
    fx.stop().await;
}

#[tokio::test]
async fn stop_recorded_kills_grandchildren_too() {
    let fx = Fixture::new();
    let port = free_port();
    let hub = hub();
    let mut rx = hub.subscribe();
    let sleep_file = fx.path().join("sleep.pid");
    let spec = sh(
        &format!(
            "sleep 1000 & echo $! > '{}'; exec python3 -m http.server --bind 127.0.0.1 {port}",
            sleep_file.display()
        ),
        fx.path(),
    );
    let (cancel, task) = start(fx.supervisor(spec, http_probe(port), policy(), &hub));
    let pid = wait_for(&mut rx, "ready", ready).await.pid.unwrap();
    let sleep_pid: u32 = std::fs::read_to_string(&sleep_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let python_ticks = alive(pid).expect("python runs");
    let sleep_ticks = alive(sleep_pid).expect("sleep runs");
    assert!(cmdline(sleep_pid).contains("sleep 1000"));
    assert_eq!(procfs::read_stat(sleep_pid).unwrap().pgrp, pid as i32);
    let run = fx.run_record().unwrap();
    finish(cancel, task).await;

    assert!(stop_recorded(&fx.paths.run_dir, Duration::from_secs(5))
        .await
        .unwrap());
    for (what, pid, ticks) in [
        ("python", pid, python_ticks),
        ("sleep", sleep_pid, sleep_ticks),
        ("shim", run.shim_pid, run.shim_start_ticks),
    ] {
        // Gone entirely, not even a zombie: the shim reaps its whole tree.
        let stat = procfs::read_stat(pid).filter(|s| s.start_ticks == ticks);
        assert!(
            stat.is_none() || (what == "shim" && stat.unwrap().state == 'Z'),
            "{what} {pid} remains: {stat:?}"
        );
    }
    // Nothing left to stop.
    assert!(!stop_recorded(&fx.paths.run_dir, Duration::from_secs(1))
        .await
        .unwrap());
}

#[tokio::test]
async fn log_is_capped_and_rotated() {
    let fx = Fixture::new();
    let port = free_port();
    let hub = hub();
    let mut rx = hub.subscribe();
    let spec = sh(
        &format!(
            "i=0; while [ $i -lt 500 ]; do echo \"line $i: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"; \
             i=$((i+1)); done; exec python3 -m http.server --bind 127.0.0.1 {port}"
        ),
        fx.path(),
    );
    let policy = SupervisePolicy {
        log_max_bytes: 4096,
        ..policy()
    };
    let (cancel, task) = start(fx.supervisor(spec, http_probe(port), policy, &hub));
    wait_for(&mut rx, "ready", ready).await;
    finish(cancel, task).await;
    fx.stop().await;

    let rotated = PathBuf::from(format!("{}.1", fx.paths.log_file.display()));
    let old = std::fs::read_to_string(&rotated).expect("rotated log exists");
    let current = std::fs::read_to_string(&fx.paths.log_file).unwrap();
    let longest = old
        .lines()
        .chain(current.lines())
        .map(|l| l.len() + 1)
        .max()
        .unwrap();
    assert!(
        current.len() <= 4096 + longest,
        "current log {} bytes",
        current.len()
    );
    assert!(
        old.len() <= 4096 + longest,
        "rotated log {} bytes",
        old.len()
    );
    assert!(
        current.starts_with("[exoagent] log rotated at "),
        "{current}"
    );
    assert!(
        old.starts_with("[exoagent] log rotated at "),
        "rotated more than once"
    );
    // Lines are whole and in order across the two files.
    assert!(current.contains("line 499: a") || current.contains("GET / HTTP/1.1"));
    for line in old.lines().chain(current.lines()).skip(1) {
        assert!(
            line.starts_with("line ") || line.starts_with("[exoagent]") || line.contains("HTTP/1."),
            "mangled line {line:?}"
        );
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&fx.paths.log_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o640);
}

#[tokio::test]
async fn runs_as_the_given_user_when_root() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let fx = Fixture::new();
    let port = free_port();
    let hub = hub();
    let mut rx = hub.subscribe();
    let mut spec = sh(
        &format!(
            "echo \"ids uid=$(id -u) gid=$(id -g) groups=$(id -G)\"; \
             exec python3 -m http.server --bind 127.0.0.1 {port}"
        ),
        Path::new("/"),
    );
    spec.run_as = Some(RunAs {
        uid: 65534,
        gid: 65534,
    });
    // A group the account is being added to (no group database lists it) is given as well,
    // once; it is not part of the spec, so an agent that no longer gives it adopts the service.
    let supervisor = fx
        .supervisor(spec.clone(), http_probe(port), policy(), &hub)
        .with_joining_groups(vec![4242, 65534]);
    let (cancel, task) = start(supervisor);
    let pid = wait_for(&mut rx, "ready", ready).await.pid.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().skip(1).all(|v| v == "65534")),
        "{status}"
    );
    let log = std::fs::read_to_string(&fx.paths.log_file).unwrap();
    assert!(
        log.contains("ids uid=65534 gid=65534 groups=65534 4242\n"),
        "{log}"
    );
    let later = fx.supervisor(spec, http_probe(port), policy(), &hub);
    assert!(
        later.finds_running_service(),
        "the joining group changed the spec's hash"
    );
    finish(cancel, task).await;
    fx.stop().await;
}

#[tokio::test]
async fn failing_liveness_probe_degrades_and_recovers() {
    let fx = Fixture::new();
    let port = free_port();
    let hub = hub();
    let mut rx = hub.subscribe();
    let health = fx.path().join("health.txt");
    std::fs::write(&health, "ok").unwrap();
    let probe = Probe::Http {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        path: "/health.txt".into(),
        host: format!("127.0.0.1:{port}"),
        expect_json_key: None,
        user_agent: None,
    };
    let (cancel, task) = start(fx.supervisor(http_server(port, fx.path()), probe, policy(), &hub));
    let pid = wait_for(&mut rx, "ready", ready).await.pid.unwrap();

    // http.server now answers 404: three failed liveness probes make it degraded.
    std::fs::remove_file(&health).unwrap();
    let status = wait_for(&mut rx, "degraded", |s| s.state == ServiceState::Degraded).await;
    let reason = status.reason.unwrap();
    assert_eq!(reason.code, "probe-failed");
    assert!(reason.detail.contains("status 404"), "{}", reason.detail);
    assert!(
        reason.detail.contains("3 times in a row"),
        "{}",
        reason.detail
    );
    assert_eq!(status.pid, Some(pid), "a degraded service is not restarted");

    std::fs::write(&health, "ok").unwrap();
    let status = wait_for(&mut rx, "ready again", ready).await;
    assert_eq!(status.pid, Some(pid));
    assert_eq!(status.restarts, 0);
    assert_eq!(status.reason, None);
    finish(cancel, task).await;
    fx.stop().await;
}

fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect()
}

fn disk_full(s: &ServiceStatus) -> bool {
    s.state == ServiceState::Failed && s.reason.as_ref().is_some_and(|r| r.code == "disk-full")
}

#[tokio::test]
async fn full_disk_is_reported_as_disk_full_and_recovers_once_space_is_freed() {
    let Some(fx) = Fixture::on_tmpfs(2048) else {
        return;
    };
    let _unmount = Unmount(&fx);
    let port = free_port();
    let spec = || http_server(port, Path::new("/"));
    let retrying = |hub: &StateHub| {
        let cancel = CancellationToken::new();
        let sup = fx.supervisor(spec(), http_probe(port), policy(), hub);
        (cancel.clone(), tokio::spawn(sup.run_retrying(cancel)))
    };

    // The agent runs the service; then the disk fills up and the service is killed.
    let hub1 = hub();
    let mut rx1 = hub1.subscribe();
    let (cancel1, task1) = retrying(&hub1);
    let pid = wait_for(&mut rx1, "ready", ready).await.pid.unwrap();
    let run = fx.run_record().unwrap();
    let filler = fx.fill();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let status = wait_for(&mut rx1, "disk-full while the agent runs", disk_full).await;
    let detail = &status.reason.unwrap().detail;
    assert!(
        detail.contains(&fx.paths.run_dir.display().to_string()),
        "names the path: {detail}"
    );
    assert!(!procfs::is_alive(run.shim_pid, run.shim_start_ticks));
    assert_eq!(temporaries(&fx.paths.run_dir), Vec::<String>::new());
    assert_eq!(hub1.snapshot().setup.reason.unwrap().code, "disk-full");
    finish(cancel1, task1).await;

    // The agent restarts while the disk is still full: still disk-full, not shim-lost.
    let hub2 = hub();
    let mut rx2 = hub2.subscribe();
    let (cancel2, task2) = retrying(&hub2);
    wait_for(&mut rx2, "disk-full after an agent restart", disk_full).await;
    // A few retries while still full keep it failed and leave no temporaries behind.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(disk_full(&hub2.snapshot().services[0]));
    assert_eq!(temporaries(&fx.paths.run_dir), Vec::<String>::new());

    // Space is freed: the same agent recovers the service on its own.
    std::fs::remove_file(&filler).unwrap();
    let status = wait_for(&mut rx2, "ready once space is freed", ready).await;
    assert_ne!(status.pid, Some(pid));
    assert_eq!(status.reason, None);
    let report = finish(cancel2, task2).await;
    assert_eq!(report.outcome, RunOutcome::Cancelled);
    assert!(report.spawned >= 1);
    fx.stop().await;
}
