//! `exoagent status`: the setup state and every service, as a table or JSON, optionally waiting
//! until setup has finished.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use crate::api::client::{ApiClient, ClientError};
use crate::delivery::install::{unit_state, UnitState, UNIT_NAME};
use crate::model::truncate_chars;
use crate::state::relative;
use crate::state::{now_ms, SetupState, Snapshot};
use crate::text::clean;

/// Exit status: setup complete (every service ready or degraded).
pub const EXIT_COMPLETE: u8 = 0;
/// Exit status: setup failed (a step or a service failed).
pub const EXIT_ERROR: u8 = 1;
/// Exit status: usage error (clap's own).
pub const EXIT_USAGE: u8 = 2;
/// Exit status: setup still in progress, or `--wait` timed out.
pub const EXIT_IN_PROGRESS: u8 = 3;
/// Exit status: the agent cannot be reached (not running, or permission denied).
pub const EXIT_UNREACHABLE: u8 = 4;

/// How often `--wait` asks.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Arguments of `exoagent status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the status snapshot as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Wait until setup is complete or has failed (also while the agent is still starting).
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this long ("90", "90s", "5m", "1h").
    #[arg(long, value_parser = parse_duration, requires = "wait")]
    pub timeout: Option<Duration>,
}

/// Parse "120" (seconds), or anything `humantime` reads: "120s", "5m", "2h", "1h 30m".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    // A bare number is seconds; humantime insists on a unit.
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("'{text}' is not a duration such as 90s, 5m or 1h: {e}"))
}

/// The exit status a snapshot stands for.
pub fn exit_status(snapshot: &Snapshot) -> u8 {
    match snapshot.setup.state {
        SetupState::Complete => EXIT_COMPLETE,
        SetupState::Error => EXIT_ERROR,
        SetupState::Starting | SetupState::Running => EXIT_IN_PROGRESS,
    }
}

/// How often `--wait` asks systemd about the unit while the agent does not answer.
const UNIT_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Ask once, or poll with `--wait`; print; exit with a stable status.
pub async fn run(args: StatusArgs, socket: &Path) -> anyhow::Result<ExitCode> {
    run_with(args, socket, None).await
}

/// [`run`]; with `systemctl`, a `--wait` that cannot reach the agent also asks systemd about
/// the unit and stops waiting once it has failed for good or does not exist (an agent that
/// exited on an invalid configuration would otherwise be waited for until the timeout).
/// With `--wait`, an ending other than `complete` is also one line on stderr: what cloud-init
/// keeps in `/var/log/cloud-init-output.log` (docs/contracts.md, "cloud-init waits").
pub async fn run_with(
    args: StatusArgs,
    socket: &Path,
    systemctl: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let client = ApiClient::new(socket);
    let started = Instant::now();
    let deadline = args.timeout.map(|t| started + t);
    // First asked 2 s in: a start job queued just before (`systemctl start --no-block`) still
    // shows the unit's previous `failed` until systemd runs it.
    let mut unit_checked = started;
    loop {
        let answer = client.status().await;
        let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
        match answer {
            Ok(snapshot) => {
                let code = exit_status(&snapshot);
                if !args.wait || code != EXIT_IN_PROGRESS || timed_out {
                    print_snapshot(&snapshot, args.json)?;
                    if args.wait && code == EXIT_ERROR {
                        eprintln!("exoagent: {}", error_line(&snapshot));
                    }
                    if timed_out && code == EXIT_IN_PROGRESS {
                        eprintln!(
                            "exoagent: setup still {} after the timeout of {}s (exoagent status shows more)",
                            snapshot.setup.state.as_str(),
                            started.elapsed().as_secs()
                        );
                    }
                    return Ok(ExitCode::from(code));
                }
            }
            Err(e @ ClientError::Unreachable { .. }) => {
                if !args.wait || timed_out {
                    eprintln!("exoagent: {e}");
                    return Ok(ExitCode::from(EXIT_UNREACHABLE));
                }
                if let Some(systemctl) = systemctl {
                    if unit_checked.elapsed() >= UNIT_CHECK_INTERVAL {
                        unit_checked = Instant::now();
                        let why = match unit_state(systemctl).await {
                            UnitState::Pending => None,
                            UnitState::Failed => Some("has failed and will not be restarted"),
                            UnitState::Missing => Some("is not installed"),
                        };
                        if let Some(why) = why {
                            eprintln!(
                                "exoagent: the agent does not answer and {UNIT_NAME} {why} (journalctl -u {UNIT_NAME} says why)"
                            );
                            return Ok(ExitCode::from(EXIT_UNREACHABLE));
                        }
                    }
                }
            }
            Err(e) => {
                eprintln!("exoagent: {e}");
                return Ok(ExitCode::from(EXIT_ERROR));
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// "setup error: <step>: <code>: <detail>", on one line without control characters (it ends
/// up in cloud-init's log and on the console).
pub fn error_line(snapshot: &Snapshot) -> String {
    let setup = &snapshot.setup;
    let mut line = format!(
        "setup error: {}",
        clean(setup.step.as_deref().unwrap_or("?"), 60)
    );
    if let Some(reason) = &setup.reason {
        line.push_str(&format!(": {}", clean(&reason.code, 60)));
        if !reason.detail.trim().is_empty() {
            line.push_str(&format!(": {}", clean(&reason.detail, 300)));
        }
    }
    line
}

fn print_snapshot(snapshot: &Snapshot, json: bool) -> anyhow::Result<()> {
    let text = if json {
        let mut text = serde_json::to_string(snapshot)?;
        text.push('\n');
        text
    } else {
        render_table(snapshot, now_ms())
    };
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// The human-readable table.
pub fn render_table(snapshot: &Snapshot, now: u64) -> String {
    let setup = &snapshot.setup;
    let mut out = format!(
        "setup: {} (since {})\n",
        setup.state.as_str(),
        relative(setup.since_ms, now)
    );
    if setup.state == SetupState::Error {
        let step = setup.step.as_deref().unwrap_or("?");
        match &setup.reason {
            Some(reason) => out.push_str(&format!(
                "failed step: {}: {}: {}\n",
                clean(step, 60),
                clean(&reason.code, 60),
                // Its lines kept apart by " | ", as before.
                clean(&reason.detail.replace('\n', " | "), 200)
            )),
            None => out.push_str(&format!("failed step: {}\n", clean(step, 60))),
        }
    }
    if let Some(instance) = &snapshot.instance {
        match (&instance.uuid, &instance.detail) {
            (Some(uuid), _) => out.push_str(&format!(
                "instance: {uuid} (from the {})\n",
                instance.source.as_str().replace('-', " ")
            )),
            (None, Some(why)) => {
                out.push_str(&format!("instance: local-only: {}\n", clean(why, 200)))
            }
            (None, None) => out.push_str(&format!("instance: {}\n", instance.source)),
        }
    }
    if let Some(nova) = &snapshot.nova {
        match &nova.reason {
            Some(reason) => out.push_str(&format!(
                "nova reporting: {}: {}: {}\n",
                nova.state,
                clean(&reason.code, 60),
                clean(&reason.detail, 200)
            )),
            None => out.push_str(&format!("nova reporting: {}\n", nova.state)),
        }
    }
    if let Some(tls) = &snapshot.tls {
        out.push_str(&format!(
            "tls certificate: sha256 {} ({}, expires {})\n",
            crate::front::cert::colon_hex(&tls.fingerprint),
            if tls.generated {
                "generated"
            } else {
                "operator's"
            },
            crate::front::cert::date(tls.not_after),
        ));
    }
    let header = [
        "SERVICE",
        "STATE",
        "SINCE",
        "RESTARTS",
        "PID",
        "URL",
        "LAST ERROR",
    ];
    let last_error = |reason: &Option<crate::state::Reason>| {
        reason.as_ref().map_or_else(
            || "-".to_owned(),
            |r| clean(&format!("{}: {}", r.code, r.detail), 60),
        )
    };
    let pid = |pid: Option<u32>| pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
    let mut rows: Vec<[String; 7]> = Vec::new();
    for s in &snapshot.services {
        rows.push([
            s.service.as_str().to_owned(),
            s.state.as_str().to_owned(),
            relative(s.since_ms, now),
            s.restarts.to_string(),
            pid(s.pid),
            clean(s.uap_url.as_deref().unwrap_or(&s.url), 200),
            last_error(&s.reason),
        ]);
        // The TLS front on the service's public port, right under it.
        if let Some(front) = &s.front {
            rows.push([
                format!("{}/tls", s.service.as_str()),
                front.state.as_str().to_owned(),
                relative(front.since_ms, now),
                front.restarts.to_string(),
                pid(front.pid),
                format!("TLS front on port {}", s.port),
                last_error(&front.reason),
            ]);
        }
    }
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    render_volumes(&snapshot.volumes, &mut out);
    render_alerts(&snapshot.alerts, now, &mut out);
    if let Some(idle) = &snapshot.idle {
        let text = crate::text::clean(&idle.describe(now), 400);
        out.push_str(&format!("idle: {text}\n"));
    }
    if let Some(request) = &snapshot.request {
        out.push_str(&format!(
            "cloud request {}: {} ({}){}\n",
            request.digest,
            request.outcome.as_str(),
            crate::state::relative(request.since_ms, now),
            reason_suffix(request.reason.as_ref())
        ));
    }
    if let Some(reload) = &snapshot.reload {
        let changes = if reload.changes.is_empty() {
            String::new()
        } else {
            format!(": {}", reload.changes.join(", "))
        };
        out.push_str(&format!(
            "last reload: {} ({}, {}){changes}{}\n",
            reload.outcome.as_str(),
            reload.trigger.as_str(),
            crate::state::relative(reload.at_ms, now),
            reason_suffix(reload.reason.as_ref())
        ));
    }
    out
}

/// ` — code: detail` on one line, the detail cut to 300 characters.
fn reason_suffix(reason: Option<&crate::state::Reason>) -> String {
    reason
        .map(|r| {
            format!(
                " — {}: {}",
                r.code,
                crate::text::clean(&r.detail.replace('\n', "; "), 300)
            )
        })
        .unwrap_or_default()
}

/// One line per resource alert under the table: `disk-high: /data 95% used (alert at 90%,
/// since 3m ago)`.
fn render_alerts(alerts: &[crate::state::ResourceAlert], now: u64, out: &mut String) {
    if alerts.is_empty() {
        return;
    }
    out.push_str("alerts:\n");
    for alert in alerts {
        out.push_str(&format!("  {}: {}\n", alert.code, alert.describe(now)));
    }
}

/// One line per volume under the table: `volume /dev/vdb "data": mounted at /media/volume/data`.
/// Names and details come from outside, so they are escaped onto one line.
fn render_volumes(volumes: &[crate::state::VolumeStatus], out: &mut String) {
    use crate::state::VolumeState;
    if volumes.is_empty() {
        return;
    }
    out.push_str("volumes:\n");
    for v in volumes {
        let name = v
            .name
            .as_deref()
            .map(|n| format!(" {:?}", truncate_chars(n, 64)))
            .unwrap_or_default();
        let what = match (v.state, &v.mount_point, &v.reason) {
            // Mount points come from mountinfo, whose escapes decode to any byte.
            (VolumeState::Mounted, Some(at), _) => format!("mounted at {}", at.escape_debug()),
            (_, _, Some(reason)) => format!(
                "{}: {reason}: {}",
                v.state.as_str(),
                truncate_chars(&v.detail, 120).escape_debug()
            ),
            _ => format!(
                "{}: {}",
                v.state.as_str(),
                truncate_chars(&v.detail, 120).escape_debug()
            ),
        };
        out.push_str(&format!("  {}{name}: {what}\n", v.device.escape_debug()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceKind;
    use crate::state::{Reason, ServiceState, ServiceStatus, SetupStatus};

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-3s").is_err());
    }

    #[test]
    fn the_table_shows_state_and_the_failure() {
        let snapshot = Snapshot {
            agent_version: "0".into(),
            setup: SetupStatus {
                state: SetupState::Error,
                since_ms: 10_000,
                step: Some("jupyterlab".into()),
                reason: Some(Reason::new("crash-loop", "exit status 1\nboom")),
            },
            services: vec![ServiceStatus {
                service: ServiceKind::JupyterLab,
                state: ServiceState::Failed,
                since_ms: 10_000,
                port: 8888,
                url: "http://127.0.0.1:8888/".into(),
                uap_url: None,
                restarts: 5,
                pid: None,
                reason: Some(Reason::new("crash-loop", "exit status 1\nboom")),
                front: None,
            }],
            nova: Some(crate::state::NovaReporting {
                state: crate::state::NovaReportingState::Failed,
                reason: Some(Reason::new("credential-not-permitted", "HTTP 401")),
            }),
            instance: Some(crate::state::InstanceStatus {
                uuid: None,
                source: crate::state::InstanceSource::LocalOnly,
                detail: Some("no config drive (/x) and no metadata service configured".into()),
            }),
            tls: None,
            volumes: vec![
                crate::state::VolumeStatus {
                    device: "/dev/vdb".into(),
                    volume_id: Some("a1b2".into()),
                    name: Some("data".into()),
                    state: crate::state::VolumeState::Mounted,
                    mount_point: Some("/media/volume/data".into()),
                    reason: None,
                    detail: String::new(),
                },
                crate::state::VolumeStatus {
                    device: "/dev/vdc".into(),
                    volume_id: None,
                    name: None,
                    state: crate::state::VolumeState::LeftAlone,
                    mount_point: None,
                    reason: Some("signature".into()),
                    detail: "LVM2_member\nfound".into(),
                },
            ],
            alerts: vec![
                crate::state::ResourceAlert {
                    resource: crate::state::AlertResource::Memory,
                    code: "memory-high".into(),
                    path: None,
                    used_percent: 93,
                    threshold_percent: 90,
                    since_ms: 15_000,
                },
                crate::state::ResourceAlert {
                    resource: crate::state::AlertResource::Filesystem,
                    code: "disk-high".into(),
                    path: Some("/media/volume/x\ny".into()),
                    used_percent: 100,
                    threshold_percent: 95,
                    since_ms: 70_000,
                },
            ],
            idle: Some(crate::state::IdleStatus {
                state: crate::state::IdleState::ShelvePending,
                last_activity_ms: 5_000,
                activity: Vec::new(),
                action_at_ms: Some(1_875_000),
                reason: None,
            }),
            reload: None,
            request: None,
        };
        let table = render_table(&snapshot, 75_000);
        assert!(
            table.ends_with(
                "volumes:\n  /dev/vdb \"data\": mounted at /media/volume/data\n  \
                 /dev/vdc: left-alone: signature: LVM2_member\\nfound\n\
                 alerts:\n  memory-high: memory 93% used (alert at 90%, since 1m ago)\n  \
                 disk-high: /media/volume/x y 100% used (alert at 95%, since 5s ago)\n\
                 idle: idle since 1m ago; the instance will be shelved in 30m unless there is \
                 activity\n"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "instance: local-only: no config drive (/x) and no metadata service configured\n"
            ),
            "{table}"
        );
        assert!(
            table.contains("nova reporting: failed: credential-not-permitted: HTTP 401\n"),
            "{table}"
        );
        assert!(
            table.starts_with("setup: error (since 1m ago)\n"),
            "{table}"
        );
        assert!(table.contains("failed step: jupyterlab: crash-loop: exit status 1 | boom"));
        let row = table.lines().nth(5).unwrap();
        assert!(row.starts_with("jupyterlab  failed  1m ago"), "{row}");
        assert!(row.ends_with("crash-loop: exit status 1 boom"), "{row}");
        assert_eq!(exit_status(&snapshot), EXIT_ERROR);
        // A service's output may hold terminal sequences: none reaches the table.
        let mut hostile = snapshot.clone();
        hostile.setup.reason = Some(Reason::new("crash-loop", "\x1b[2J\u{9b}31mred\x07"));
        hostile.services[0].reason = Some(Reason::new("crash-loop", "\x1b]0;title\x07x"));
        let table = render_table(&hostile, 75_000);
        assert!(
            !table.chars().any(|c| c.is_control() && c != '\n'),
            "{table:?}"
        );
        assert!(
            table.contains("failed step: jupyterlab: crash-loop: [2J31mred\n"),
            "{table:?}"
        );
        assert_eq!(
            error_line(&snapshot),
            "setup error: jupyterlab: crash-loop: exit status 1 boom"
        );
    }

    #[test]
    fn the_tls_front_and_its_certificate_are_shown() {
        let snapshot = Snapshot {
            agent_version: "0".into(),
            setup: SetupStatus {
                state: SetupState::Complete,
                since_ms: 10_000,
                step: None,
                reason: None,
            },
            services: vec![ServiceStatus {
                service: ServiceKind::JupyterLab,
                state: ServiceState::Ready,
                since_ms: 10_000,
                port: 8888,
                url: "https://127.0.0.1:8888/".into(),
                uap_url: None,
                restarts: 0,
                pid: Some(40),
                reason: None,
                front: Some(crate::state::FrontStatus {
                    state: ServiceState::Ready,
                    since_ms: 5_000,
                    restarts: 1,
                    pid: Some(41),
                    reason: None,
                }),
            }],
            nova: None,
            instance: None,
            tls: Some(crate::state::TlsStatus {
                fingerprint: "ab".repeat(32),
                not_after: 1_893_456_000,
                generated: true,
            }),
            volumes: Vec::new(),
            alerts: Vec::new(),
            idle: None,
            reload: None,
            request: None,
        };
        let table = render_table(&snapshot, 75_000);
        assert!(
            table.contains(&format!(
                "tls certificate: sha256 {} (generated, expires 2030-01-01 00:00 UTC)\n",
                ["AB"; 32].join(":")
            )),
            "{table}"
        );
        let front = table
            .lines()
            .find(|l| l.starts_with("jupyterlab/tls"))
            .expect(&table);
        assert!(front.contains("ready") && front.contains("41"), "{front}");
        assert!(front.contains("TLS front on port 8888"), "{front}");
    }

    #[test]
    fn relative_times_pick_a_unit() {
        assert_eq!(relative(0, 5_000), "5s ago");
        assert_eq!(relative(0, 125_000), "2m ago");
        assert_eq!(relative(0, 7_300_000), "2h ago");
        assert_eq!(relative(10, 0), "0s ago");
    }
}
