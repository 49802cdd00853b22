//! Exosphere-compatible console lines: setup status lines (re-emitted periodically) and load
//! lines, written to the console devices (or stdout in the sandbox) without ever blocking.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::truncate_chars;
use crate::report::load::{LoadSample, LoadSampler};
use crate::state::{IdleState, IdleStatus, ReloadStatus, SetupState, SetupStatus, Snapshot};

/// Longest `detail` put on an error line, in characters; the console is not a log.
pub const MAX_DETAIL_CHARS: usize = 300;

/// Lines waiting for the writer thread; beyond this, new lines are dropped (a stuck console).
const QUEUE_DEPTH: usize = 32;

/// Where console lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleSink {
    /// Character devices such as `/dev/console` and `/dev/kmsg` (files work too).
    Devices(Vec<PathBuf>),
    /// Standard output (the sandbox).
    Stdout,
}

/// The status line for `setup`: `{"status":..,"epoch":<ms>}`, plus `step`, `reason` and
/// `detail` on `error`. `epoch` is when the state was entered, so re-emitted lines keep
/// Exosphere's "setup time" right. Always one line: serde_json escapes every control character.
pub fn status_line(setup: &SetupStatus, epoch_ms: u64) -> String {
    let mut line = Map::new();
    line.insert("status".into(), Value::from(setup.state.as_str()));
    line.insert("epoch".into(), Value::from(epoch_ms));
    if setup.state == SetupState::Error {
        if let Some(step) = &setup.step {
            line.insert("step".into(), Value::from(step.as_str()));
        }
        if let Some(reason) = &setup.reason {
            line.insert("reason".into(), Value::from(reason.code.as_str()));
            line.insert(
                "detail".into(),
                Value::from(truncate_chars(&reason.detail, MAX_DETAIL_CHARS)),
            );
        }
    }
    Value::Object(line).to_string()
}

/// The load line: integers only, epoch in seconds, `gpuPctUsed` a list or null, no `status`.
pub fn load_line(sample: &LoadSample) -> String {
    json!({
        "epoch": sample.epoch_s,
        "cpuPctUsed": sample.cpu_pct,
        "memPctUsed": sample.mem_pct,
        "rootfsPctUsed": sample.rootfs_pct,
        "gpuPctUsed": sample.gpu_pct,
    })
    .to_string()
}

/// The idle line: `{"idle":"idle","idleSince":<ms>}`, with `"shelveAt":<ms>` while a shelve
/// is pending or asked for and `"reason"` when one failed; `{"idle":"active"}` once activity
/// ends an idle period. No `status` key: Exosphere's status parser skips it.
pub fn idle_line(idle: &IdleStatus) -> String {
    let mut line = Map::new();
    line.insert("idle".into(), Value::from(idle.state.as_str()));
    if idle.state.is_idle() {
        line.insert("idleSince".into(), Value::from(idle.last_activity_ms));
        if let Some(at) = idle.action_at_ms {
            line.insert("shelveAt".into(), Value::from(at));
        }
        if let Some(reason) = &idle.reason {
            line.insert("reason".into(), Value::from(reason.code.as_str()));
        }
    }
    Value::Object(line).to_string()
}

/// The reload line: `{"reload":"applied","trigger":"cloud-request","changes":["desktop:
/// added"]}`, or `"rejected"` with `"reason"` and `"detail"` (at most 300 characters). No
/// `status` key: Exosphere's status parser skips it.
pub fn reload_line(reload: &ReloadStatus) -> String {
    let mut line = Map::new();
    line.insert("reload".into(), Value::from(reload.outcome.as_str()));
    line.insert("trigger".into(), Value::from(reload.trigger.as_str()));
    if !reload.changes.is_empty() {
        line.insert("changes".into(), Value::from(reload.changes.clone()));
    }
    if let Some(reason) = &reload.reason {
        line.insert("reason".into(), Value::from(reason.code.as_str()));
        line.insert(
            "detail".into(),
            Value::from(truncate_chars(&reason.detail, MAX_DETAIL_CHARS)),
        );
    }
    Value::Object(line).to_string()
}

/// What makes a new idle line worth writing (activity kinds coming and going do not).
fn idle_key(snapshot: &Snapshot) -> Option<(IdleState, Option<u64>, Option<String>)> {
    snapshot.idle.as_ref().map(|i| {
        (
            i.state,
            i.action_at_ms,
            i.reason.as_ref().map(|r| r.code.clone()),
        )
    })
}

/// Write one line to `sink` now, synchronously: for the agent's last words when it cannot start
/// (an invalid configuration must still turn Exosphere's badge to Error, not leave it waiting).
pub fn write_now(sink: &ConsoleSink, line: &str) {
    let mut record = line.as_bytes().to_vec();
    record.push(b'\n');
    match sink {
        ConsoleSink::Stdout => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&record).and_then(|()| out.flush());
        }
        ConsoleSink::Devices(devices) => {
            let mut failing = HashSet::new();
            for device in devices {
                write_record(device, &record, &mut failing);
            }
        }
    }
}

/// Turn on unlimited `/dev/kmsg` writes for user space (best effort): the default rate limit
/// would drop status lines.
pub fn enable_devkmsg(root: &Path) {
    let knob = root.join("proc/sys/kernel/printk_devkmsg");
    if let Err(e) = std::fs::write(&knob, b"on\n") {
        tracing::debug!(target: "exoagent::report", path = %knob.display(), error = %e, "could not enable printk_devkmsg");
    }
}

/// Writes status and load lines for as long as the agent runs.
#[derive(Debug)]
pub struct ConsoleReporter {
    sink: ConsoleSink,
    status_interval: Duration,
    load_interval: Duration,
    sampler: LoadSampler,
    token_line: Option<String>,
}

/// What makes a new status line worth writing at once (the epoch alone does not).
#[derive(Debug, PartialEq, Eq)]
struct StatusKey {
    state: SetupState,
    step: Option<String>,
    reason: Option<String>,
}

impl StatusKey {
    fn of(setup: &SetupStatus) -> Self {
        Self {
            state: setup.state,
            step: setup.step.clone(),
            reason: setup.reason.as_ref().map(|r| r.code.clone()),
        }
    }
}

impl ConsoleReporter {
    /// A reporter writing to `sink` at the intervals in `settings`.
    pub fn new(sink: ConsoleSink, settings: &ConsoleSettings, sampler: LoadSampler) -> Self {
        Self {
            sink,
            status_interval: settings.status_interval,
            load_interval: settings.load_interval,
            sampler,
            token_line: None,
        }
    }

    /// Also write `line` (Exosphere's `exoWorkflowToken` line) once JupyterLab is ready, and
    /// again after every status line from then on, so the console's tail always holds it.
    pub fn with_token_line(mut self, line: Option<String>) -> Self {
        self.token_line = line;
        self
    }

    /// Write the current status at once, again on every change and every `status_interval`,
    /// and a load line every `load_interval`, until `cancel` fires or the hub goes away.
    pub async fn run(mut self, mut rx: watch::Receiver<Snapshot>, cancel: CancellationToken) {
        let mut writer = spawn_writer(self.sink.clone());
        let (mut setup, mut linked, mut idle) = {
            let snapshot = rx.borrow_and_update();
            (
                snapshot.setup.clone(),
                jupyterlab_ready(&snapshot),
                snapshot.idle.clone(),
            )
        };
        let mut idle_seen = idle_key(&rx.borrow());
        // A reload carried over from the run before is said once more at the start of this
        // one: the previous run may have ended before its line was written.
        let mut reload_seen = rx.borrow().reload.as_ref().map(|r| r.at_ms);
        if let Some(reload) = &rx.borrow().reload {
            writer.send(reload_line(reload));
        }
        let mut key = StatusKey::of(&setup);
        writer.send(status_line(&setup, setup.since_ms));
        let token_line = self.token_line.take();
        let send_token = |writer: &mut LineQueue, linked: bool| {
            if let (true, Some(line)) = (linked, &token_line) {
                writer.send(line.clone());
            }
        };
        send_token(&mut writer, linked);
        // While idle, the idle line follows every status line: the console's tail says it.
        let send_idle = |writer: &mut LineQueue, idle: &Option<IdleStatus>| {
            if let Some(idle) = idle.as_ref().filter(|i| i.state.is_idle()) {
                writer.send(idle_line(idle));
            }
        };

        let mut next_status = after_jittered(self.status_interval);
        let mut next_load = after_jittered(self.load_interval);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let (now_linked, now_idle_seen);
                    (setup, now_linked, idle, now_idle_seen) = {
                        let snapshot = rx.borrow_and_update();
                        (
                            snapshot.setup.clone(),
                            jupyterlab_ready(&snapshot),
                            snapshot.idle.clone(),
                            idle_key(&snapshot),
                        )
                    };
                    let next = StatusKey::of(&setup);
                    if next != key {
                        key = next;
                        writer.send(status_line(&setup, setup.since_ms));
                        send_token(&mut writer, now_linked);
                        send_idle(&mut writer, &idle);
                        next_status = after_jittered(self.status_interval);
                    } else if now_linked && !linked {
                        send_token(&mut writer, now_linked);
                    }
                    linked = now_linked;
                    let reload = rx.borrow().reload.clone();
                    if reload.as_ref().map(|r| r.at_ms) != reload_seen {
                        reload_seen = reload.as_ref().map(|r| r.at_ms);
                        if let Some(reload) = &reload {
                            writer.send(reload_line(reload));
                        }
                    }
                    if now_idle_seen != idle_seen {
                        // Into idleness, a warning, a failure, or back to activity.
                        let was_idle = idle_seen.as_ref().is_some_and(|k| k.0.is_idle());
                        if let Some(now) = idle.as_ref().filter(|i| was_idle || i.state.is_idle()) {
                            writer.send(idle_line(now));
                        }
                        idle_seen = now_idle_seen;
                    }
                }
                _ = tokio::time::sleep_until(next_status) => {
                    writer.send(status_line(&setup, setup.since_ms));
                    send_token(&mut writer, linked);
                    send_idle(&mut writer, &idle);
                    next_status = after_jittered(self.status_interval);
                }
                _ = tokio::time::sleep_until(next_load) => {
                    next_load = after_jittered(self.load_interval);
                    let sample = self.sampler.sample().await;
                    writer.send(load_line(&sample));
                }
            }
        }
    }
}

/// JupyterLab answers: the moment Exosphere's link leads somewhere.
fn jupyterlab_ready(snapshot: &Snapshot) -> bool {
    snapshot.services.iter().any(|s| {
        s.service == crate::model::ServiceKind::JupyterLab
            && s.state == crate::state::ServiceState::Ready
    })
}

/// `interval` plus 0–10 % from now: many instances booted together do not write in lockstep.
fn after_jittered(interval: Duration) -> tokio::time::Instant {
    use rand::Rng;
    let jitter = rand::thread_rng().gen_range(0.0..=0.1);
    tokio::time::Instant::now() + interval.mul_f64(1.0 + jitter)
}

/// The async side of the writer thread: a bounded queue that never blocks.
struct LineQueue {
    tx: SyncSender<String>,
    dropped_warned: bool,
}

impl LineQueue {
    fn send(&mut self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => self.dropped_warned = false,
            Err(TrySendError::Full(_)) => {
                if !self.dropped_warned {
                    tracing::warn!(target: "exoagent::report", "console writes are stuck; dropping lines until they drain");
                    self.dropped_warned = true;
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// One thread does every device write, so a console that blocks in `write(2)` stalls only
/// that thread, never the async runtime or the services.
fn spawn_writer(sink: ConsoleSink) -> LineQueue {
    let (tx, rx) = mpsc::sync_channel::<String>(QUEUE_DEPTH);
    let spawned = std::thread::Builder::new()
        .name("console-writer".into())
        .spawn(move || {
            let mut failing: HashSet<PathBuf> = HashSet::new();
            while let Ok(line) = rx.recv() {
                let mut record = line.into_bytes();
                record.push(b'\n');
                match &sink {
                    ConsoleSink::Stdout => {
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(&record).and_then(|()| out.flush());
                    }
                    ConsoleSink::Devices(devices) => {
                        for device in devices {
                            write_record(device, &record, &mut failing);
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(target: "exoagent::report", error = %e, "cannot start the console writer; console lines are off");
    }
    LineQueue {
        tx,
        dropped_warned: false,
    }
}

/// Open, write the whole record with one `write(2)` (kmsg takes one record per write), close.
/// A failing device is warned about once, then again only after it has recovered.
fn write_record(device: &Path, record: &[u8], failing: &mut HashSet<PathBuf>) {
    let result = std::fs::OpenOptions::new()
        .append(true)
        .open(device)
        .and_then(|mut file| {
            let written = file.write(record)?;
            if written == record.len() {
                wait_until_sent(&file);
                Ok(())
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!("short write ({written} of {} bytes)", record.len()),
                ))
            }
        });
    match result {
        Ok(()) => {
            if failing.remove(device) {
                tracing::info!(target: "exoagent::report", device = %device.display(), "console device writable again");
            }
        }
        Err(e) => {
            if failing.insert(device.to_path_buf()) {
                tracing::warn!(target: "exoagent::report", device = %device.display(), error = %e, "cannot write console line; skipping this device");
            }
        }
    }
}

/// Longest wait for a terminal to send a line on before the next device gets it.
const SEND_WAIT: Duration = Duration::from_millis(250);

/// On a terminal, wait (at most [`SEND_WAIT`]) until the line has left its output queue. The
/// same line goes to `/dev/kmsg` next, and the kernel prints that copy straight to the serial
/// port, past the terminal's queue: without the wait it can land inside the first copy, and
/// then neither is a line Exosphere can read (seen in the VM test: `{"exoWorkflowToken":"…1909[
/// 160.829921] {"exoWorkflowToken":…}`). The kernel's own console writer waits for the UART's
/// FIFO, so an empty queue is enough. Not a terminal (a file, `/dev/kmsg`): no wait.
fn wait_until_sent(file: &std::fs::File) {
    use std::io::IsTerminal as _;
    use std::os::fd::AsRawFd as _;
    if !file.is_terminal() {
        return;
    }
    let fd = file.as_raw_fd();
    let deadline = std::time::Instant::now() + SEND_WAIT;
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int through the pointer, which outlives the call.
        let asked = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
        if asked != 0 || queued <= 0 || std::time::Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `[console]`: Exosphere status and load lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSettings {
    /// Devices the lines are written to (ignored in sandbox mode, which writes to stdout).
    pub devices: Vec<PathBuf>,
    /// How often the latest status line is written again.
    pub status_interval: Duration,
    /// How often a load line is written.
    pub load_interval: Duration,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            devices: vec!["/dev/console".into(), "/dev/kmsg".into()],
            status_interval: Duration::from_secs(60),
            load_interval: Duration::from_secs(60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Reason;

    fn setup(state: SetupState, reason: Option<Reason>) -> SetupStatus {
        SetupStatus {
            state,
            since_ms: 1_700_000_000_123,
            step: reason.as_ref().map(|_| "jupyterlab".to_owned()),
            reason,
        }
    }

    /// A line goes whole to a terminal and then to the next device, and a terminal nobody reads
    /// does not hold the writer beyond [`SEND_WAIT`]. A pseudo-terminal reports an empty output
    /// queue at once, so the wait for a serial port's queue (the race it prevents) is shown
    /// only by the VM test's real serial console, where it cannot be forced.
    #[test]
    fn a_terminal_then_a_file_each_get_the_whole_line_without_the_writer_stalling() {
        use std::io::Read as _;
        let pty = nix::pty::openpty(None, None).unwrap();
        let terminal = nix::unistd::ttyname(&pty.slave).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kmsg");
        std::fs::write(&file, "").unwrap();
        let sink = ConsoleSink::Devices(vec![terminal, file.clone()]);
        let (done_tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            write_now(&sink, r#"{"exoWorkflowToken":"abc"}"#);
            let _ = done_tx.send(());
        });
        done.recv_timeout(Duration::from_secs(5))
            .expect("the writer stalled on a terminal nobody reads");
        let mut master = std::fs::File::from(pty.master);
        let mut got = [0u8; 64];
        let n = master.read(&mut got).unwrap();
        // The terminal's line discipline turns the newline into CR LF.
        assert_eq!(&got[..n], b"{\"exoWorkflowToken\":\"abc\"}\r\n");
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "{\"exoWorkflowToken\":\"abc\"}\n"
        );
    }

    #[test]
    fn plain_states_have_only_status_and_epoch() {
        let line = status_line(&setup(SetupState::Running, None), 42);
        assert_eq!(line, r#"{"epoch":42,"status":"running"}"#);
    }

    #[test]
    fn error_lines_stay_one_line_and_carry_the_reason() {
        let reason = Reason::new("crash-loop", "exit 1\n}{\"status\":\"complete\"}");
        let line = status_line(&setup(SetupState::Error, Some(reason)), 7);
        assert!(!line.contains('\n'));
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["status"], "error");
        assert_eq!(value["reason"], "crash-loop");
        assert_eq!(value["step"], "jupyterlab");
        assert_eq!(value["detail"], "exit 1\n}{\"status\":\"complete\"}");
    }

    #[test]
    fn truncation_respects_character_boundaries() {
        assert_eq!(truncate_chars("abc", 3), "abc");
        assert_eq!(truncate_chars("abcd", 3), "ab…");
        let long = "é".repeat(400);
        let short = truncate_chars(&long, MAX_DETAIL_CHARS);
        assert_eq!(short.chars().count(), MAX_DETAIL_CHARS);
        assert!(short.ends_with('…'));
    }

    #[test]
    fn load_lines_are_integers_with_null_gpu() {
        let sample = LoadSample {
            epoch_s: 1_700_000_000,
            cpu_pct: 3,
            mem_pct: 40,
            rootfs_pct: 71,
            gpu_pct: None,
        };
        assert_eq!(
            load_line(&sample),
            r#"{"cpuPctUsed":3,"epoch":1700000000,"gpuPctUsed":null,"memPctUsed":40,"rootfsPctUsed":71}"#
        );
        let with_gpu = LoadSample {
            gpu_pct: Some(vec![5, 100]),
            ..sample
        };
        assert!(load_line(&with_gpu).contains(r#""gpuPctUsed":[5,100]"#));
    }

    #[test]
    fn a_missing_device_is_skipped_and_others_still_written() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("console");
        std::fs::write(&good, b"").unwrap();
        let missing = dir.path().join("no-such-device");
        let mut failing = HashSet::new();
        write_record(&missing, b"x\n", &mut failing);
        write_record(&good, b"x\n", &mut failing);
        write_record(&good, b"y\n", &mut failing);
        assert!(failing.contains(&missing));
        assert_eq!(std::fs::read_to_string(&good).unwrap(), "x\ny\n");
        assert!(!missing.exists(), "devices are never created");
    }
}
