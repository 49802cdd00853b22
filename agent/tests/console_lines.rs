//! The console reporter's output, read back the way Exosphere reads it.
//!
//! The parsers below re-implement Exosphere's (`src/Helpers/ExoSetupStatus.elm` and
//! `src/Helpers/ServerResourceUsage.elm`, summarised in `shared/reference/exosphere.md` §2–3):
//! a status line is the text from a line's first `{` to its last `}`, decoded as JSON with a
//! top-level string `status` (or `exoSetup`) and an optional integer `epoch`; the last line that
//! decodes wins; unknown strings become `unknown`. A load line is everything after the first `{`,
//! with integer `epoch`, `cpuPctUsed`, `memPctUsed`, `rootfsPctUsed` and an optional
//! `gpuPctUsed`. A regular file stands in for `/dev/console` (the reporter opens, appends and
//! closes per line exactly as with the device).

use std::time::Duration;

use exoagent::config::settings::ConsoleSettings;
use exoagent::model::ServiceKind;
use exoagent::report::console::{ConsoleReporter, ConsoleSink};
use exoagent::report::load::{GpuQuery, LoadSampler};
use exoagent::state::{Reason, ServiceState, ServiceUpdate, SetupPhase, StateHub};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// One decoded status line: the status (normalised like Exosphere) and its epoch.
#[derive(Debug, Clone, PartialEq)]
struct ExoStatus {
    status: String,
    epoch: Option<i64>,
    line: Value,
}

fn exosphere_status_of_line(line: &str) -> Option<ExoStatus> {
    let start = line.find('{')?;
    let end = line.rfind('}')?;
    if end < start {
        return None;
    }
    let value: Value = serde_json::from_str(&line[start..=end]).ok()?;
    let status = value
        .get("status")
        .or_else(|| value.get("exoSetup"))?
        .as_str()?;
    let status = match status {
        "waiting" | "starting" | "running" | "complete" | "error" | "timeout" => status,
        _ => "unknown",
    };
    Some(ExoStatus {
        status: status.to_owned(),
        epoch: value.get("epoch").and_then(Value::as_i64),
        line: value,
    })
}

/// Exosphere's status: the last line that decodes.
fn exosphere_status(log: &str) -> Option<ExoStatus> {
    log.lines().rev().find_map(exosphere_status_of_line)
}

/// Exosphere's load-line decoder (integers required; gpu list, int or null).
fn exosphere_load_of_line(line: &str) -> Option<Value> {
    let start = line.find('{')?;
    let value: Value = serde_json::from_str(line[start..].trim_end()).ok()?;
    for key in ["epoch", "cpuPctUsed", "memPctUsed", "rootfsPctUsed"] {
        value.get(key)?.as_i64()?;
    }
    match value.get("gpuPctUsed") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if n.is_i64() => {}
        Some(Value::Array(items)) if items.iter().all(|i| i.is_i64()) => {}
        Some(_) => return None,
    }
    Some(value)
}

fn settings(device: &std::path::Path) -> ConsoleSettings {
    ConsoleSettings {
        devices: vec![device.to_path_buf()],
        status_interval: Duration::from_millis(100),
        load_interval: Duration::from_millis(150),
    }
}

/// A reporter writing to the file `console` at the test intervals, without a GPU query.
fn reporter(console: &std::path::Path) -> ConsoleReporter {
    ConsoleReporter::new(
        ConsoleSink::Devices(vec![console.to_path_buf()]),
        &settings(console),
        LoadSampler::with_gpu_query(std::path::Path::new("/"), GpuQuery::None),
    )
}

fn hub() -> StateHub {
    StateHub::new([(
        ServiceKind::JupyterLab,
        8888,
        "http://127.0.0.1:8888/".to_owned(),
    )])
}

/// One change to the hub and the status Exosphere must read afterwards.
type Step = (Box<dyn FnOnce(&StateHub)>, &'static str);

/// Run a reporter on a fresh file, apply each step once the previous status has been read
/// back, and return the console text and the sequence of statuses seen.
async fn console_after(steps: Vec<Step>) -> (String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console");
    // Something else wrote to the console first, kmsg style.
    std::fs::write(&console, "[    0.000000] Linux version 6.1.0\n").unwrap();
    let hub = hub();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(reporter(&console).run(hub.subscribe(), cancel.clone()));
    let mut seen = Vec::new();
    let wait_for = |want: &str, seen: &mut Vec<String>| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            if let Some(s) = exosphere_status(&text) {
                if seen.last() != Some(&s.status) {
                    seen.push(s.status.clone());
                }
                if s.status == want {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never saw {want}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("starting", &mut seen);
    for (change, want) in steps {
        change(&hub);
        wait_for(want, &mut seen);
    }
    // Let re-emission and load lines happen.
    tokio::time::sleep(Duration::from_millis(450)).await;
    cancel.cancel();
    task.await.unwrap();
    (std::fs::read_to_string(&console).unwrap(), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_running_complete_as_exosphere_reads_it() {
    let (text, seen) = console_after(vec![
        (
            Box::new(|hub: &StateHub| {
                hub.set_phase(SetupPhase::Provisioning);
                hub.transition(
                    ServiceKind::JupyterLab,
                    ServiceState::Installing,
                    ServiceUpdate::default(),
                )
                .unwrap();
                hub.transition(
                    ServiceKind::JupyterLab,
                    ServiceState::Starting,
                    ServiceUpdate::default(),
                )
                .unwrap();
            }),
            "running",
        ),
        (
            Box::new(|hub: &StateHub| {
                hub.set_phase(SetupPhase::Supervising);
                hub.transition(
                    ServiceKind::JupyterLab,
                    ServiceState::Ready,
                    ServiceUpdate::default(),
                )
                .unwrap();
            }),
            "complete",
        ),
    ])
    .await;
    assert_eq!(seen, ["starting", "running", "complete"], "{text}");
    assert_eq!(seen.last().map(String::as_str), Some("complete"), "{text}");
    let final_status = exosphere_status(&text).unwrap();
    assert_eq!(final_status.status, "complete");
    let epoch = final_status
        .epoch
        .expect("status lines carry an integer epoch");
    assert!(
        epoch > 1_700_000_000_000,
        "epoch is in milliseconds: {epoch}"
    );

    let complete_lines = text
        .lines()
        .filter(|l| exosphere_status_of_line(l).is_some_and(|s| s.status == "complete"))
        .count();
    assert!(
        complete_lines >= 2,
        "the final status is re-emitted:\n{text}"
    );
    let complete_epochs: Vec<_> = text
        .lines()
        .filter_map(exosphere_status_of_line)
        .filter(|s| s.status == "complete")
        .map(|s| s.epoch)
        .collect();
    assert!(
        complete_epochs.windows(2).all(|w| w[0] == w[1]),
        "re-emitted lines keep the epoch of completion: {complete_epochs:?}"
    );

    let load_lines: Vec<&str> = text.lines().filter(|l| l.contains("cpuPctUsed")).collect();
    assert!(!load_lines.is_empty(), "load lines are written:\n{text}");
    for line in load_lines {
        let load = exosphere_load_of_line(line).unwrap_or_else(|| panic!("load line {line}"));
        assert_eq!(load["gpuPctUsed"], Value::Null, "no GPU here");
        let epoch = load["epoch"].as_i64().unwrap();
        assert!(
            (1_700_000_000..4_000_000_000).contains(&epoch),
            "seconds: {epoch}"
        );
        assert!(
            exosphere_status_of_line(line).is_none(),
            "a load line is never a status"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_carries_the_service_and_reason_even_with_hostile_text() {
    let detail = "exit status 1; last stderr:\n}{\"status\":\"complete\"} boom";
    let (text, seen) = console_after(vec![(
        // Still validating (no `running` in between, so the sequence is deterministic): the
        // service fails during its install.
        Box::new(move |hub: &StateHub| {
            hub.transition(
                ServiceKind::JupyterLab,
                ServiceState::Installing,
                ServiceUpdate::default(),
            )
            .unwrap();
            hub.transition(
                ServiceKind::JupyterLab,
                ServiceState::Failed,
                ServiceUpdate {
                    reason: Some(Reason::new("crash-loop", detail)),
                    ..Default::default()
                },
            )
            .unwrap();
        }),
        "error",
    )])
    .await;
    assert_eq!(seen, ["starting", "error"], "{text}");
    let final_status = exosphere_status(&text).unwrap();
    assert_eq!(final_status.status, "error", "{text}");
    assert_eq!(final_status.line["step"], "jupyterlab");
    assert_eq!(final_status.line["reason"], "crash-loop");
    assert_eq!(final_status.line["detail"], detail);
    assert!(
        !text
            .lines()
            .any(|l| exosphere_status_of_line(l).is_some_and(|s| s.status == "complete")),
        "the hostile detail must not produce a complete line:\n{text}"
    );
}

#[test]
fn the_parser_here_follows_exosphere_rules() {
    // Guard the test's own parser: kmsg prefixes, the last line wins, unknown strings.
    let log =
        "[ 1.2] {\"status\":\"running\",\"epoch\":5}\nnoise\n<6>[ 2.0] {\"status\":\"weird\"}\n";
    assert_eq!(exosphere_status(log).unwrap().status, "unknown");
    assert_eq!(
        exosphere_status("{\"exoSetup\":\"complete\"}")
            .unwrap()
            .status,
        "complete"
    );
    assert!(exosphere_load_of_line(
        "{\"epoch\":1,\"cpuPctUsed\":1.5,\"memPctUsed\":1,\"rootfsPctUsed\":1}"
    )
    .is_none());
}

/// Exosphere's `parseConsoleLogForWorkflowToken` (src/Helpers/Helpers.elm): per line, drop what
/// precedes the first `{`, decode the rest (all of it) as an object with a string
/// `exoWorkflowToken`; the last line that decodes wins.
fn exosphere_workflow_token(log: &str) -> Option<String> {
    log.split('\n')
        // The last line that decodes wins: look from the end.
        .rev()
        .map(|line| line.find('{').map_or(line, |i| &line[i..]))
        .find_map(|rest| {
            let value: Value = serde_json::from_str(rest).ok()?;
            value.get("exoWorkflowToken")?.as_str().map(str::to_owned)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workflow_token_line_appears_once_jupyterlab_is_ready_and_stays_in_the_tail() {
    use exoagent::services::jupyterlab::link::{token_line, LinkToken};
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console");
    // The reporter appends to a device; it never creates one.
    std::fs::write(&console, "").unwrap();
    let token = LinkToken::generate();
    let hub = hub();
    let cancel = CancellationToken::new();
    let reporter = reporter(&console).with_token_line(Some(token_line(&token)));
    let task = tokio::spawn(reporter.run(hub.subscribe(), cancel.clone()));
    hub.set_phase(SetupPhase::Provisioning);
    for state in [ServiceState::Installing, ServiceState::Starting] {
        hub.transition(ServiceKind::JupyterLab, state, ServiceUpdate::default())
            .unwrap();
    }
    // Several status re-emissions while JupyterLab starts: no token yet (the link would lead
    // to a port nothing answers on).
    tokio::time::sleep(Duration::from_millis(350)).await;
    let before = std::fs::read_to_string(&console).unwrap();
    assert!(
        exosphere_status(&before).is_some_and(|s| s.status == "running"),
        "{before}"
    );
    assert_eq!(exosphere_workflow_token(&before), None, "{before}");

    hub.transition(
        ServiceKind::JupyterLab,
        ServiceState::Ready,
        ServiceUpdate::default(),
    )
    .unwrap();
    hub.set_phase(SetupPhase::Supervising);
    tokio::time::sleep(Duration::from_millis(450)).await;
    cancel.cancel();
    task.await.unwrap();
    let text = std::fs::read_to_string(&console).unwrap();
    assert_eq!(
        exosphere_workflow_token(&text).as_deref(),
        Some(token.expose()),
        "{text}"
    );
    let lines = text
        .lines()
        .filter(|l| l.contains("exoWorkflowToken"))
        .count();
    assert!(lines >= 2, "re-emitted with the status lines:\n{text}");
    // The status is still read right: a token line is not a status line.
    assert_eq!(
        exosphere_status(&text).unwrap().status,
        "complete",
        "{text}"
    );
    // The last lines of the console (what a `length`-limited console read returns) hold both.
    let tail: Vec<&str> = text.lines().rev().take(4).collect();
    assert!(
        tail.iter().any(|l| l.contains("exoWorkflowToken")),
        "{tail:?}"
    );
}

/// NVML is dlopened when the load sampler starts: the binary must start on a host without the
/// NVIDIA driver, so libnvidia-ml is never a link-time dependency.
#[test]
fn the_binary_does_not_link_against_nvml() {
    let out = std::process::Command::new("ldd")
        .arg(env!("CARGO_BIN_EXE_exoagent"))
        .output()
        .expect("ldd (libc-bin) is installed");
    let libraries = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{libraries}");
    assert!(libraries.contains("libc.so"), "{libraries}");
    assert!(!libraries.contains("nvidia"), "{libraries}");
}

/// Idle lines: written when the instance goes idle, when a shelve is pending (with its time),
/// and when activity ends idleness; repeated after each status line while idle; never read by
/// Exosphere's status or load parsers, so the badge stays what the status lines say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_lines_follow_idleness_and_exosphere_skips_them() {
    use exoagent::state::{IdleState, IdleStatus};
    let idle = |state, action_at_ms| IdleStatus {
        state,
        last_activity_ms: 1_796_674_503_000,
        activity: Vec::new(),
        action_at_ms,
        reason: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console");
    // A device exists before anyone writes to it; the reporter never creates one.
    std::fs::write(&console, "").unwrap();
    let hub = hub();
    hub.set_phase(SetupPhase::Provisioning);
    hub.set_idle(idle(IdleState::Active, None));
    let cancel = CancellationToken::new();
    let task = tokio::spawn(reporter(&console).run(hub.subscribe(), cancel.clone()));
    let went_idle = r#"{"idle":"idle","idleSince":1796674503000}"#;
    let pending = r#"{"idle":"shelve-pending","idleSince":1796674503000,"shelveAt":1796676303000}"#;
    let back = r#"{"idle":"active"}"#;
    let wait_for_line = |want: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            if text.lines().any(|l| l == want) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no line {want}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Let status lines be re-emitted while active: no idle line follows them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    hub.set_idle(idle(IdleState::Idle, None));
    wait_for_line(went_idle);
    hub.set_idle(idle(IdleState::ShelvePending, Some(1_796_676_303_000)));
    wait_for_line(pending);
    // Re-emitted after the next status lines while pending.
    tokio::time::sleep(Duration::from_millis(300)).await;
    hub.set_idle(idle(IdleState::Active, None));
    wait_for_line(back);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.cancel();
    task.await.unwrap();
    let text = std::fs::read_to_string(&console).unwrap();
    let status = exosphere_status(&text).expect("a status line");
    assert_eq!(status.status, "running", "{text}");
    let idle_lines: Vec<&str> = text.lines().filter(|l| l.contains("\"idle\"")).collect();
    assert!(
        idle_lines
            .iter()
            .all(|l| exosphere_status_of_line(l).is_none() && exosphere_load_of_line(l).is_none()),
        "{idle_lines:?}"
    );
    let position = |want: &str| text.lines().position(|l| l == want).unwrap();
    let (first_idle, first_pending, first_back) =
        (position(went_idle), position(pending), position(back));
    assert!(
        first_idle < first_pending && first_pending < first_back,
        "{text}"
    );
    assert!(
        text.lines().filter(|l| *l == pending).count() >= 2,
        "repeated after status lines while pending:\n{text}"
    );
    assert_eq!(text.lines().filter(|l| *l == back).count(), 1, "{text}");
    assert!(
        !text
            .lines()
            .take(first_idle)
            .any(|l| l.contains("\"idle\"")),
        "nothing said while active before:\n{text}"
    );
    assert!(
        !text
            .lines()
            .skip(first_back + 1)
            .any(|l| l.contains("\"idle\"")),
        "nothing said while active after:\n{text}"
    );
}
