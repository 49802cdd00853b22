//! The login banner (`exoagent motd`, DESIGN §4.6): one short block with the setup state, each
//! service's state and URL, the reason of anything failed (steps, services, TLS fronts, volumes,
//! Nova reporting) and the command that shows more.
//! Pure rendering; `cli::motd` asks the agent within a hard deadline and `host` installs the
//! login hook (docs/status-api.md, "The login banner").
//!
//! Everything shown comes from the status snapshot, which never holds the passphrase or a
//! token; values that can come from outside (reason details, URLs, steps) are put on one line
//! with every control character removed, so a service's stderr cannot move the cursor, clear
//! the screen or set the terminal title of whoever logs in.

use crate::state::{
    relative, NovaReportingState, Reason, ServiceState, SetupState, Snapshot, VolumeState,
};
use crate::text::clean;

/// What the banner could learn from the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// The agent answered with its snapshot.
    Status(Box<Snapshot>),
    /// Nothing listens on the socket: the agent is not running (or not yet).
    NotRunning,
    /// The socket exists but this user may not connect (root and the instance user's group may).
    NoPermission,
    /// The agent did not answer within the banner's deadline, or answered something else.
    NoAnswer,
}

/// The command that shows everything.
pub const MORE: &str = "exoagent status";

/// Longest reason detail shown (the full one is in `exoagent status`).
const DETAIL_MAX: usize = 160;
/// Longest URL or step shown.
const VALUE_MAX: usize = 120;

/// The banner for `seen`, ending in a newline; `now` (ms since the epoch) dates the setup
/// state.
pub fn render(seen: &Seen, now: u64) -> String {
    match seen {
        Seen::Status(snapshot) => render_snapshot(snapshot, now),
        Seen::NotRunning => "exoagent is not running (sudo systemctl status exoagent)\n".into(),
        Seen::NoPermission => {
            format!("exoagent: the setup state is shown to root and the instance user ({MORE} as either)\n")
        }
        Seen::NoAnswer => {
            format!("exoagent did not answer in time ({MORE} shows the setup state)\n")
        }
    }
}

fn render_snapshot(snapshot: &Snapshot, now: u64) -> String {
    let setup = &snapshot.setup;
    let mut out = format!(
        "exoagent setup: {} (since {})\n",
        setup.state.as_str(),
        relative(setup.since_ms, now)
    );
    if setup.state == SetupState::Error {
        let step = setup.step.as_deref().unwrap_or("?");
        // A failed service or front shows its reason in its own row: said once is enough.
        let why = if shown_below(snapshot, step) {
            String::new()
        } else {
            reason(&setup.reason)
        };
        out.push_str(&format!("  failed step: {}{why}\n", clean(step, VALUE_MAX)));
    }
    let width = snapshot
        .services
        .iter()
        .map(|s| s.service.as_str().len())
        .max()
        .unwrap_or(0);
    for s in &snapshot.services {
        out.push_str(&format!(
            "  {:<width$}  {:<10}  {}\n",
            s.service.as_str(),
            s.state.as_str(),
            // Through the cloud's proxy when that is known: where a browser goes.
            clean(s.uap_url.as_deref().unwrap_or(&s.url), VALUE_MAX)
        ));
        if shows_reason(s.state) && s.reason.is_some() {
            out.push_str(&format!("  {:<width$}  {}\n", "", reason_text(&s.reason)));
        }
        if let Some(front) = s.front.as_ref().filter(|f| shows_reason(f.state)) {
            out.push_str(&format!(
                "  {:<width$}  TLS front {}{}\n",
                "",
                front.state.as_str(),
                reason(&front.reason)
            ));
        }
    }
    // Other failures a researcher meets: a volume that did not mount, reporting that stopped.
    for v in snapshot
        .volumes
        .iter()
        .filter(|v| v.state == VolumeState::Failed)
    {
        let name = v
            .name
            .as_deref()
            .map(|n| format!(" \"{}\"", clean(n, 64)))
            .unwrap_or_default();
        out.push_str(&format!(
            "  volume {}{name} failed: {}{}\n",
            clean(&v.device, 64),
            clean(v.reason.as_deref().unwrap_or("?"), VALUE_MAX),
            if v.detail.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", clean(&v.detail, DETAIL_MAX))
            }
        ));
    }
    // Memory or a disk running out: what kills a notebook without warning.
    for alert in &snapshot.alerts {
        out.push_str(&format!("  alert: {}\n", alert.describe(now)));
    }
    // A change the agent refused: the owner asked for something that did not happen.
    if let Some(request) = snapshot
        .request
        .as_ref()
        .filter(|r| r.outcome == crate::state::ReloadOutcome::Rejected)
    {
        out.push_str(&format!(
            "  cloud request refused{}\n",
            reason(&request.reason)
        ));
    } else if let Some(reload) = snapshot
        .reload
        .as_ref()
        .filter(|r| r.outcome == crate::state::ReloadOutcome::Rejected)
    {
        out.push_str(&format!("  reload refused{}\n", reason(&reload.reason)));
    }
    // Idle: said while it lasts; a pending shelve is a warning the owner must see.
    if let Some(idle) = snapshot.idle.as_ref().filter(|i| i.state.is_idle()) {
        let label = match idle.state {
            crate::state::IdleState::ShelvePending => "WARNING",
            _ => "idle",
        };
        out.push_str(&format!(
            "  {label}: {}\n",
            clean(&idle.describe(now), DETAIL_MAX)
        ));
    }
    if let Some(nova) = snapshot
        .nova
        .as_ref()
        .filter(|n| n.state == NovaReportingState::Failed)
    {
        out.push_str(&format!(
            "  reporting to Nova failed{}\n",
            reason(&nova.reason)
        ));
    }
    out.push_str(&format!("  more: {MORE}\n"));
    out
}

/// Whether `step` is a service (or its TLS front, `<service>-front`) whose row shows a reason.
fn shown_below(snapshot: &Snapshot, step: &str) -> bool {
    snapshot.services.iter().any(|s| {
        let name = s.service.as_str();
        if step == name {
            shows_reason(s.state) && s.reason.is_some()
        } else {
            step.strip_suffix("-front") == Some(name)
                && s.front.as_ref().is_some_and(|f| shows_reason(f.state))
        }
    })
}

/// Failed and degraded services show why; a reason kept while (re)starting is history.
fn shows_reason(state: ServiceState) -> bool {
    matches!(state, ServiceState::Failed | ServiceState::Degraded)
}

/// ": code: detail", or nothing.
fn reason(reason: &Option<Reason>) -> String {
    match reason {
        Some(_) => format!(": {}", reason_text(reason)),
        None => String::new(),
    }
}

fn reason_text(reason: &Option<Reason>) -> String {
    match reason {
        Some(r) if r.detail.trim().is_empty() => clean(&r.code, VALUE_MAX),
        Some(r) => format!(
            "{}: {}",
            clean(&r.code, VALUE_MAX),
            clean(&r.detail, DETAIL_MAX)
        ),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceKind;
    use crate::state::{FrontStatus, ServiceStatus, SetupStatus};

    fn service(kind: ServiceKind, state: ServiceState, reason: Option<Reason>) -> ServiceStatus {
        ServiceStatus {
            service: kind,
            state,
            since_ms: 1_000,
            port: kind.default_port(),
            url: format!("http://127.0.0.1:{}/", kind.default_port()),
            uap_url: None,
            restarts: 0,
            pid: None,
            reason,
            front: None,
        }
    }

    fn snapshot(state: SetupState, services: Vec<ServiceStatus>) -> Snapshot {
        Snapshot {
            agent_version: "0".into(),
            setup: SetupStatus {
                state,
                since_ms: 0,
                step: None,
                reason: None,
            },
            services,
            nova: None,
            instance: None,
            tls: None,
            volumes: Vec::new(),
            alerts: Vec::new(),
            idle: None,
            reload: None,
            request: None,
        }
    }

    fn banner(snapshot: Snapshot) -> String {
        render(&Seen::Status(Box::new(snapshot)), 125_000)
    }

    #[test]
    fn complete_setup_lists_every_service_and_the_command() {
        let text = banner(snapshot(
            SetupState::Complete,
            vec![
                service(ServiceKind::JupyterLab, ServiceState::Ready, None),
                service(ServiceKind::Guacamole, ServiceState::Ready, None),
            ],
        ));
        assert_eq!(
            text,
            "exoagent setup: complete (since 2m ago)\n\
             \x20 jupyterlab  ready       http://127.0.0.1:8888/\n\
             \x20 guacamole   ready       http://127.0.0.1:49528/\n\
             \x20 more: exoagent status\n"
        );
    }

    #[test]
    fn the_uap_url_is_shown_when_known() {
        let mut jl = service(ServiceKind::JupyterLab, ServiceState::Ready, None);
        jl.uap_url = Some("https://http-149-165-1-23-8888.uap.example.org/".into());
        let text = banner(snapshot(
            SetupState::Complete,
            vec![jl, service(ServiceKind::RStudio, ServiceState::Ready, None)],
        ));
        assert!(
            text.contains(
                "  jupyterlab  ready       https://http-149-165-1-23-8888.uap.example.org/\n\
                 \x20 rstudio     ready       http://127.0.0.1:8787/\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn every_setup_and_service_state_is_shown_by_name() {
        for setup in [
            SetupState::Starting,
            SetupState::Running,
            SetupState::Complete,
            SetupState::Error,
        ] {
            let text = banner(snapshot(setup, vec![]));
            assert!(
                text.starts_with(&format!("exoagent setup: {} (since", setup.as_str())),
                "{text}"
            );
        }
        for state in [
            ServiceState::Pending,
            ServiceState::Installing,
            ServiceState::Starting,
            ServiceState::Ready,
            ServiceState::Degraded,
            ServiceState::Failed,
        ] {
            let text = banner(snapshot(
                SetupState::Running,
                vec![service(ServiceKind::RStudio, state, None)],
            ));
            let row = text.lines().nth(1).unwrap();
            assert!(
                row.starts_with(&format!("  rstudio  {}", state.as_str())),
                "{row}"
            );
        }
    }

    #[test]
    fn a_failure_shows_the_step_and_every_reason() {
        let mut snap = snapshot(
            SetupState::Error,
            vec![
                service(
                    ServiceKind::JupyterLab,
                    ServiceState::Failed,
                    Some(Reason::new(
                        "crash-loop",
                        "exit status 1\nModuleNotFoundError",
                    )),
                ),
                service(
                    ServiceKind::RStudio,
                    ServiceState::Degraded,
                    Some(Reason::new("probe-failed", "")),
                ),
                // A reason kept while restarting is not shown: the service is on its way.
                service(
                    ServiceKind::Guacamole,
                    ServiceState::Starting,
                    Some(Reason::new("crash-loop", "old")),
                ),
            ],
        );
        snap.setup.step = Some("jupyterlab".into());
        snap.setup.reason = Some(Reason::new(
            "crash-loop",
            "exit status 1\nModuleNotFoundError",
        ));
        let text = banner(snap);
        assert_eq!(
            text,
            "exoagent setup: error (since 2m ago)\n\
             \x20 failed step: jupyterlab\n\
             \x20 jupyterlab  failed      http://127.0.0.1:8888/\n\
             \x20             crash-loop: exit status 1 ModuleNotFoundError\n\
             \x20 rstudio     degraded    http://127.0.0.1:8787/\n\
             \x20             probe-failed\n\
             \x20 guacamole   starting    http://127.0.0.1:49528/\n\
             \x20 more: exoagent status\n"
        );
    }

    #[test]
    fn a_failed_tls_front_is_shown_under_its_service() {
        let mut jl = service(ServiceKind::JupyterLab, ServiceState::Ready, None);
        jl.front = Some(FrontStatus {
            state: ServiceState::Failed,
            since_ms: 0,
            restarts: 5,
            pid: None,
            reason: Some(Reason::new("crash-loop", "bind: address in use")),
        });
        let mut snap = snapshot(SetupState::Error, vec![jl]);
        snap.setup.step = Some("jupyterlab-front".into());
        snap.setup.reason = Some(Reason::new("crash-loop", "bind: address in use"));
        let text = banner(snap);
        assert!(
            text.contains("\n  failed step: jupyterlab-front\n"),
            "{text}"
        );
        assert!(
            text.contains("\n              TLS front failed: crash-loop: bind: address in use\n"),
            "{text}"
        );
    }

    #[test]
    fn a_failed_machine_step_shows_its_reason() {
        let mut snap = snapshot(
            SetupState::Error,
            vec![service(
                ServiceKind::JupyterLab,
                ServiceState::Pending,
                None,
            )],
        );
        snap.setup.step = Some("packages".into());
        snap.setup.reason = Some(Reason::new(
            "package-lock-timeout",
            "apt lock held for 600 s",
        ));
        let text = banner(snap);
        assert!(
            text.contains(
                "\n  failed step: packages: package-lock-timeout: apt lock held for 600 s\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn resource_alerts_are_shown_with_their_use_and_start() {
        let mut s = snapshot(
            SetupState::Complete,
            vec![service(ServiceKind::JupyterLab, ServiceState::Ready, None)],
        );
        s.alerts = vec![crate::state::ResourceAlert {
            resource: crate::state::AlertResource::Filesystem,
            code: "disk-high".into(),
            path: Some("/media/volume/\x1b[2Jdata".into()),
            used_percent: 97,
            threshold_percent: 90,
            since_ms: 65_000,
        }];
        let text = banner(s);
        assert!(
            text.contains("  alert: /media/volume/[2Jdata 97% used (alert at 90%, since 1m ago)\n"),
            "{text}"
        );
        assert!(text.starts_with("exoagent setup: complete"), "{text}");
    }

    #[test]
    fn idleness_is_shown_while_it_lasts_and_a_pending_shelve_is_a_warning() {
        use crate::state::{IdleState, IdleStatus};
        let mut s = snapshot(
            SetupState::Complete,
            vec![service(ServiceKind::JupyterLab, ServiceState::Ready, None)],
        );
        let idle = |state, action_at_ms, reason| IdleStatus {
            state,
            last_activity_ms: 5_000,
            activity: Vec::new(),
            action_at_ms,
            reason,
        };
        s.idle = Some(idle(IdleState::Active, None, None));
        assert!(!banner(s.clone()).contains("idle"));
        s.idle = Some(idle(IdleState::Idle, None, None));
        assert!(banner(s.clone()).contains("\n  idle: idle since 2m ago\n"));
        s.idle = Some(idle(IdleState::ShelvePending, Some(425_000), None));
        let text = banner(s.clone());
        assert!(
            text.contains(
                "\n  WARNING: idle since 2m ago; the instance will be shelved in 5m unless \
                 there is activity\n"
            ),
            "{text}"
        );
        let refused = Reason::new("credential-not-permitted", "HTTP 403\x1b[2J");
        s.idle = Some(idle(IdleState::Idle, None, Some(refused)));
        let text = banner(s);
        assert!(
            text.contains("shelving failed (credential-not-permitted: HTTP 403[2J)"),
            "{text}"
        );
    }

    #[test]
    fn a_failed_volume_and_failed_reporting_are_shown_the_rest_is_not() {
        use crate::state::{NovaReporting, VolumeStatus};
        let volume = |device: &str, state, reason: Option<&str>| VolumeStatus {
            device: device.into(),
            volume_id: None,
            name: Some("data".into()),
            state,
            mount_point: None,
            reason: reason.map(Into::into),
            detail: "mount: wrong fs type\n".into(),
        };
        let mut snap = snapshot(
            SetupState::Complete,
            vec![service(ServiceKind::JupyterLab, ServiceState::Ready, None)],
        );
        snap.volumes = vec![
            volume("/dev/vdb", VolumeState::Failed, Some("mount-failed")),
            volume("/dev/vdc", VolumeState::LeftAlone, Some("signature")),
            volume("/dev/vdd", VolumeState::Mounted, None),
        ];
        snap.nova = Some(NovaReporting {
            state: NovaReportingState::Failed,
            reason: Some(Reason::new("credential-rejected", "HTTP 401")),
        });
        let text = banner(snap.clone());
        assert!(
            text.ends_with(
                "  volume /dev/vdb \"data\" failed: mount-failed: mount: wrong fs type\n\
                 \x20 reporting to Nova failed: credential-rejected: HTTP 401\n\
                 \x20 more: exoagent status\n"
            ),
            "{text}"
        );
        assert!(!text.contains("vdc") && !text.contains("vdd"), "{text}");
        snap.nova = Some(NovaReporting {
            state: NovaReportingState::Pending,
            reason: None,
        });
        assert!(!banner(snap).contains("Nova"));
    }

    #[test]
    fn the_agent_down_or_silent_is_one_line() {
        for (seen, expected) in [
            (
                Seen::NotRunning,
                "exoagent is not running (sudo systemctl status exoagent)\n",
            ),
            (
                Seen::NoAnswer,
                "exoagent did not answer in time (exoagent status shows the setup state)\n",
            ),
            (
                Seen::NoPermission,
                "exoagent: the setup state is shown to root and the instance user (exoagent status as either)\n",
            ),
        ] {
            let text = render(&seen, 0);
            assert_eq!(text, expected);
            assert_eq!(text.lines().count(), 1);
        }
    }

    #[test]
    fn control_characters_from_outside_never_reach_the_terminal() {
        let hostile = "\x1b]0;pwned\x07\x1b[2J\x1b[1;31mred\r\nline\u{9b}31m\u{7f}\ttab\0end";
        let mut jl = service(
            ServiceKind::JupyterLab,
            ServiceState::Failed,
            Some(Reason::new("crash\x1b[5m-loop", hostile)),
        );
        jl.url = format!("http://127.0.0.1:8888/\x1b[8m{hostile}");
        let mut snap = snapshot(SetupState::Error, vec![jl]);
        snap.setup.step = Some("jupyter\x1b[0mlab\n".into());
        snap.setup.reason = Some(Reason::new("crash-loop", hostile));
        let text = banner(snap);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert_eq!(text.lines().count(), 5, "{text}");
        assert!(
            text.contains("crash-loop: ]0;pwned[2J[1;31mred line31m tabend"),
            "{text:?}"
        );
        assert!(text.contains("failed step: jupyter[0mlab: "), "{text:?}");
    }

    #[test]
    fn long_details_are_cut() {
        let text = clean(&"x".repeat(1000), DETAIL_MAX);
        assert_eq!(text.chars().count(), DETAIL_MAX);
        assert!(text.ends_with('…'));
        assert_eq!(clean("  a \n\n b\t", 10), "a b");
    }
}
