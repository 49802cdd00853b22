//! Idle detection (`[idle]`, DESIGN §4): the instance is idle once, for `after_s`, no one used
//! a service (an open Guacamole tunnel or VNC viewer, JupyterLab's own `last_activity` or a
//! busy kernel, an RStudio session), no login was typed at, and CPU, disk and network stayed
//! under their thresholds. Idleness is published in the status snapshot (status API,
//! `exoagent status`, the login banner, console lines, Nova's `exoagent:idle` tag and
//! `exoAgent`); with `action = "shelve"` the owner is warned (console, banner, `wall`) and the
//! instance is shelved through Nova after `grace_s` unless something happens meanwhile.

pub mod settings;
pub mod signals;

use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

pub use settings::{IdleAction, IdleSettings, Section, KEYS};
use signals::{Counters, HostReader};

use crate::cloud::nova::Nova;
use crate::platform::passphrase::Passphrase;
use crate::report::nova::TAG_PREFIX;
use crate::services::jupyterlab::activity::ActivityClient;
use crate::services::ActivitySign;
use crate::state::{now_ms, ActivityKind, IdleState, IdleStatus, Reason, SetupState, StateHub};

/// How long one round of reading the kernel's files may take (they answer from memory).
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `wall` may take.
const WALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What one sample found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// The kinds of activity going on now.
    pub activity: Vec<ActivityKind>,
    /// JupyterLab's own `last_activity` (ms since the epoch), when it could be read.
    pub jupyterlab_last_activity_ms: Option<u64>,
}

/// What a step asks of the watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Nothing to do beyond publishing.
    Nothing,
    /// The instance just became idle (no action configured).
    WentIdle,
    /// The instance just became idle; it will be shelved at this time (ms) unless something
    /// happens: warn the owner.
    Warned {
        /// When.
        at_ms: u64,
    },
    /// Activity came back while the instance was idle.
    Resumed {
        /// Whether a pending shelve was cancelled by it.
        cancelled: bool,
    },
    /// The grace period is over: shelve now.
    Shelve,
}

/// The detector's state machine; [`Detector::status`] is what is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detector {
    state: IdleState,
    last_activity_ms: u64,
    activity: Vec<ActivityKind>,
    action_at_ms: Option<u64>,
    reason: Option<Reason>,
}

impl Detector {
    /// Active, as of `now_ms` (the agent's start counts as activity).
    pub fn new(now_ms: u64) -> Self {
        Self {
            state: IdleState::Active,
            last_activity_ms: now_ms,
            activity: Vec::new(),
            action_at_ms: None,
            reason: None,
        }
    }

    /// What is published.
    pub fn status(&self) -> IdleStatus {
        IdleStatus {
            state: self.state,
            last_activity_ms: self.last_activity_ms,
            activity: self.activity.clone(),
            action_at_ms: self.action_at_ms,
            reason: self.reason.clone(),
        }
    }

    /// One sample's transition at `now_ms`.
    pub fn step(&mut self, seen: &Observation, now_ms: u64, settings: &IdleSettings) -> Event {
        if let Some(at) = seen.jupyterlab_last_activity_ms {
            // A clock ahead of the agent's cannot push activity into the future.
            self.last_activity_ms = self.last_activity_ms.max(at.min(now_ms));
        }
        if !seen.activity.is_empty() {
            self.last_activity_ms = now_ms;
        }
        self.activity = seen.activity.clone();
        let quiet_for = now_ms.saturating_sub(self.last_activity_ms);
        let active = u128::from(quiet_for) < settings.after.as_millis();
        match (self.state, active) {
            (IdleState::Active, true) => Event::Nothing,
            (previous, true) => {
                self.state = IdleState::Active;
                self.action_at_ms = None;
                self.reason = None;
                Event::Resumed {
                    cancelled: previous == IdleState::ShelvePending,
                }
            }
            (IdleState::Active, false) => match settings.action {
                IdleAction::None => {
                    self.state = IdleState::Idle;
                    Event::WentIdle
                }
                IdleAction::Shelve => {
                    let at_ms = now_ms.saturating_add(millis(settings.grace));
                    self.state = IdleState::ShelvePending;
                    self.action_at_ms = Some(at_ms);
                    Event::Warned { at_ms }
                }
            },
            (IdleState::ShelvePending, false) => match self.action_at_ms {
                Some(at) if now_ms < at => Event::Nothing,
                _ => {
                    self.state = IdleState::Shelving;
                    self.action_at_ms = Some(now_ms);
                    Event::Shelve
                }
            },
            (IdleState::Idle | IdleState::Shelving, false) => Event::Nothing,
        }
    }

    /// The shelve request's outcome: accepted (the instance goes down), refused for good (idle
    /// without an action until activity comes back) or for now (tried again next sample).
    pub fn shelve_outcome(&mut self, outcome: Result<(), (Reason, bool)>, now_ms: u64) {
        match outcome {
            Ok(()) => self.reason = None,
            Err((reason, permanent)) => {
                self.reason = Some(reason);
                if permanent {
                    self.state = IdleState::Idle;
                    self.action_at_ms = None;
                } else {
                    self.state = IdleState::ShelvePending;
                    self.action_at_ms = Some(now_ms);
                }
            }
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// What may shelve this instance: the Nova client and the server's id.
#[derive(Debug, Clone)]
pub struct Shelver {
    /// Nova, through `[cloud] clouds_yaml`'s credential.
    pub nova: Nova,
    /// This instance's server id.
    pub server: String,
}

/// Everything the watcher reads and acts through.
#[derive(Debug)]
pub struct Watch {
    /// `[idle]`.
    pub settings: IdleSettings,
    /// The kernel's files.
    pub reader: HostReader,
    /// How the enabled services show use.
    pub signs: Vec<ActivitySign>,
    /// The passphrase, once known (JupyterLab's login).
    pub passphrase: tokio::sync::watch::Receiver<Option<(Passphrase, bool)>>,
    /// Nova, once the identity side has built its client (only with `action = "shelve"`).
    pub shelver: tokio::sync::watch::Receiver<Option<Shelver>>,
    /// Whether to tell logged-in users with `wall` (the system service only: a sandbox must not
    /// write to its developer's terminals).
    pub wall: bool,
    /// Where the Guacamole page reads idleness (world-readable, no secret in it).
    pub notice: Option<std::path::PathBuf>,
}

/// What the host part of a sample found (read on the blocking pool).
#[derive(Debug)]
struct HostSample {
    counters: Counters,
    connections: usize,
    processes: bool,
    logins: usize,
}

impl Watch {
    /// Sample every `interval`, publish to `hub`, warn and act, until `cancel` fires.
    pub async fn run(mut self, hub: StateHub, cancel: CancellationToken) {
        let settings = self.settings.clone();
        let mut detector = Detector::new(now_ms());
        let mut noticed = None;
        self.publish(&hub, &detector, &mut noticed);
        let ports: Vec<u16> = self
            .signs
            .iter()
            .filter_map(|sign| match sign {
                ActivitySign::Connection(port) => Some(*port),
                _ => None,
            })
            .collect();
        let processes: Vec<&'static str> = self
            .signs
            .iter()
            .filter_map(|sign| match sign {
                ActivitySign::Process(name) => Some(*name),
                _ => None,
            })
            .collect();
        let mut jupyterlab = self.signs.iter().find_map(|sign| match sign {
            ActivitySign::JupyterLab { addr, base_url } => {
                Some(ActivityClient::new(*addr, base_url))
            }
            _ => None,
        });
        let mut previous = self.host_sample(&ports, &processes).await;
        let mut previous_at = tokio::time::Instant::now();
        let mut jupyterlab_said: Option<&'static str> = None;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(settings.interval) => {}
            }
            let Some(host) = self.host_sample(&ports, &processes).await else {
                continue;
            };
            let elapsed = previous_at.elapsed();
            previous_at = tokio::time::Instant::now();
            let mut seen = Observation::default();
            if let Some(before) = &previous {
                let rates = host.counters.rates_since(&before.counters, elapsed);
                if rates.cpu_percent >= f64::from(settings.cpu_percent) {
                    seen.activity.push(ActivityKind::Cpu);
                }
                if rates.disk_kib_per_s >= f64::from(settings.disk_kib_per_s) {
                    seen.activity.push(ActivityKind::Disk);
                }
                if rates.network_kib_per_s >= f64::from(settings.network_kib_per_s) {
                    seen.activity.push(ActivityKind::Network);
                }
            }
            if matches!(
                hub.snapshot().setup.state,
                SetupState::Starting | SetupState::Running
            ) {
                seen.activity.push(ActivityKind::Setup);
            }
            if host.connections > 0 {
                seen.activity.push(ActivityKind::Desktop);
            }
            if host.processes {
                seen.activity.push(ActivityKind::Rstudio);
            }
            if host.logins > 0 {
                seen.activity.push(ActivityKind::Login);
            }
            if let Some(client) = &mut jupyterlab {
                let passphrase = self.passphrase.borrow().as_ref().map(|(p, _)| p.clone());
                if let Some(passphrase) = passphrase {
                    match client.sample(&passphrase).await {
                        Ok(found) => {
                            jupyterlab_said = None;
                            seen.jupyterlab_last_activity_ms = Some(found.last_activity_ms);
                            if found.busy_kernels > 0 {
                                seen.activity.push(ActivityKind::Jupyterlab);
                            }
                        }
                        Err(e) => {
                            // Said once per kind of failure: JupyterLab restarting is normal.
                            if jupyterlab_said != Some(e.reason()) {
                                jupyterlab_said = Some(e.reason());
                                tracing::warn!(target: "exoagent::idle", reason = e.reason(), error = %e, "JupyterLab's activity could not be read; it counts as none until it can");
                            }
                        }
                    }
                }
            }
            seen.activity.sort();
            previous = Some(host);
            let now = now_ms();
            let event = detector.step(&seen, now, &settings);
            // Published before acting: `shelving` is on every channel before Nova is asked.
            self.publish(&hub, &detector, &mut noticed);
            self.act(event, &mut detector, now).await;
            self.publish(&hub, &detector, &mut noticed);
        }
    }

    /// Publish to the hub, and to the notice file when the state or the action's time changed
    /// (`noticed`: what the file last said).
    fn publish(&self, hub: &StateHub, detector: &Detector, noticed: &mut Option<String>) {
        let status = detector.status();
        hub.set_idle(status.clone());
        let Some(path) = &self.notice else { return };
        let text = notice_json(&status);
        if noticed.as_deref() == Some(text.as_str()) {
            return;
        }
        match crate::fsutil::write_atomic(path, text.as_bytes(), 0o644, None) {
            Ok(()) => *noticed = Some(text),
            Err(e) => {
                if noticed.is_some() || !matches!(e.kind(), std::io::ErrorKind::NotFound) {
                    tracing::warn!(target: "exoagent::idle", path = %path.display(), error = %e, "cannot write the idle notice");
                }
                *noticed = Some(text);
            }
        }
    }

    /// The host part of a sample, on the blocking pool (`None` when it took too long).
    async fn host_sample(&self, ports: &[u16], processes: &[&'static str]) -> Option<HostSample> {
        let reader = self.reader.clone();
        let (ports, processes) = (ports.to_vec(), processes.to_vec());
        let within = self.settings.after;
        let work = tokio::task::spawn_blocking(move || HostSample {
            counters: reader.counters(),
            connections: reader.connections_on(&ports),
            processes: processes.iter().any(|name| reader.process_runs(name)),
            logins: reader.recent_logins(SystemTime::now(), within),
        });
        match tokio::time::timeout(SAMPLE_TIMEOUT, work).await {
            Ok(Ok(sample)) => Some(sample),
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            _ => {
                tracing::warn!(target: "exoagent::idle", "reading the kernel's activity files took too long; sample skipped");
                None
            }
        }
    }

    /// Say and do what `event` asks; every action is logged.
    async fn act(&mut self, event: Event, detector: &mut Detector, now: u64) {
        match event {
            Event::Nothing => {}
            Event::WentIdle => {
                tracing::info!(target: "exoagent::idle", idle_since = %clock(detector.last_activity_ms), "the instance is idle");
            }
            Event::Warned { at_ms } => {
                tracing::warn!(target: "exoagent::idle", idle_since = %clock(detector.last_activity_ms), shelve_at = %clock(at_ms), "the instance is idle and will be shelved unless there is activity");
                self.tell_users(&warning_text(detector.last_activity_ms, at_ms))
                    .await;
            }
            Event::Resumed { cancelled } => {
                let status = detector.status();
                let kinds: Vec<&str> = status.activity.iter().map(|k| k.as_str()).collect();
                let activity = if kinds.is_empty() {
                    "jupyterlab (last_activity)".to_owned()
                } else {
                    kinds.join(", ")
                };
                tracing::info!(target: "exoagent::idle", cancelled, %activity, "activity again; the instance is no longer idle");
                if cancelled {
                    self.tell_users(CANCELLED_TEXT).await;
                }
            }
            Event::Shelve => {
                let shelver = self.shelver.borrow().clone();
                let outcome = match shelver {
                    Some(shelver) => {
                        // Written here, not left to the reporter: Nova refuses tag changes
                        // (409) once the server is shelving, and a shelved server should say
                        // why it was shelved.
                        let tag = format!("{TAG_PREFIX}idle:{}", IdleState::Shelving.as_str());
                        if let Err(e) = shelver.nova.add_tag(&shelver.server, &tag).await {
                            tracing::warn!(target: "exoagent::idle", reason = e.reason(), error = %e, "could not tag the server before shelving it");
                        }
                        tracing::warn!(target: "exoagent::idle", server = %shelver.server, "shelving the idle instance through Nova");
                        shelver.nova.shelve(&shelver.server).await.map_err(|e| {
                            (Reason::new(e.reason(), e.to_string()), e.is_permanent())
                        })
                    }
                    None => Err((
                        Reason::new(
                            "nova-unavailable",
                            "no Nova client: [cloud] clouds_yaml could not be used (see nova in the status)",
                        ),
                        true,
                    )),
                };
                match &outcome {
                    Ok(()) => {
                        tracing::warn!(target: "exoagent::idle", "Nova accepted the shelve request");
                    }
                    Err((reason, permanent)) => {
                        tracing::error!(target: "exoagent::idle", reason = %reason.code, permanent, "shelving failed: {}", reason.detail);
                    }
                }
                detector.shelve_outcome(outcome, now);
            }
        }
    }

    /// `wall` to everyone logged in (the message on its standard input, never in its argv).
    async fn tell_users(&self, text: &str) {
        if !self.wall {
            return;
        }
        let child = tokio::process::Command::new("wall")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                tracing::warn!(target: "exoagent::idle", error = %e, "could not run wall");
                return;
            }
        };
        if let Some(mut stdin) = child.stdin.take() {
            use tokio::io::AsyncWriteExt;
            let _ = stdin.write_all(text.as_bytes()).await;
        }
        match tokio::time::timeout(WALL_TIMEOUT, child.wait_with_output()).await {
            Ok(Ok(out)) if out.status.success() => {}
            Ok(Ok(out)) => {
                tracing::warn!(target: "exoagent::idle", status = %out.status, stderr = %crate::text::clean(&String::from_utf8_lossy(&out.stderr), 200), "wall failed");
            }
            Ok(Err(e)) => tracing::warn!(target: "exoagent::idle", error = %e, "wall failed"),
            Err(_) => tracing::warn!(target: "exoagent::idle", "wall took too long"),
        }
    }
}

/// The notice the Guacamole page reads: `{"state","idle_since_ms","action_at_ms"}`
/// (`idle_since_ms` only while idle, `action_at_ms` only with a shelve pending or asked for).
pub fn notice_json(status: &IdleStatus) -> String {
    let mut notice = serde_json::json!({ "state": status.state.as_str() });
    if status.state.is_idle() {
        notice["idle_since_ms"] = status.last_activity_ms.into();
        if let Some(at) = status.action_at_ms {
            notice["action_at_ms"] = at.into();
        }
    }
    notice.to_string()
}

/// What logged-in users are told when a shelve is pending.
pub fn warning_text(idle_since_ms: u64, at_ms: u64) -> String {
    format!(
        "exoagent: this instance has been idle since {} and will be SHELVED at {} unless \
         there is activity (a login typed at, a Guacamole, JupyterLab or RStudio session, or \
         work using the CPU, disk or network). A shelved instance is stopped; unshelve it from \
         Exosphere or Horizon to use it again.\n",
        clock(idle_since_ms),
        clock(at_ms)
    )
}

/// What logged-in users are told when activity cancels a pending shelve.
pub const CANCELLED_TEXT: &str =
    "exoagent: activity seen; the instance will not be shelved (it is no longer idle).\n";

/// `2026-12-07 14:02 UTC` for `ms` since the epoch.
pub fn clock(ms: u64) -> String {
    let at = i64::try_from(ms / 1000)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok());
    match at {
        Some(at) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute()
        ),
        None => format!("{ms} ms after the epoch"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(action: IdleAction) -> IdleSettings {
        IdleSettings {
            after: Duration::from_secs(60),
            grace: Duration::from_secs(30),
            action,
            ..IdleSettings::default()
        }
    }

    fn quiet() -> Observation {
        Observation::default()
    }

    fn busy(kind: ActivityKind) -> Observation {
        Observation {
            activity: vec![kind],
            jupyterlab_last_activity_ms: None,
        }
    }

    #[test]
    fn quiet_for_the_idle_time_is_idle_and_any_activity_ends_it() {
        let s = settings(IdleAction::None);
        let mut d = Detector::new(1_000);
        assert_eq!(d.step(&quiet(), 30_000, &s), Event::Nothing);
        assert_eq!(d.status().state, IdleState::Active);
        assert_eq!(d.step(&quiet(), 61_000, &s), Event::WentIdle);
        assert_eq!(d.status().state, IdleState::Idle);
        assert_eq!(
            d.status().last_activity_ms,
            1_000,
            "idle since the last activity"
        );
        assert_eq!(d.step(&quiet(), 120_000, &s), Event::Nothing);
        assert_eq!(
            d.step(&busy(ActivityKind::Login), 130_000, &s),
            Event::Resumed { cancelled: false }
        );
        let status = d.status();
        assert_eq!(status.state, IdleState::Active);
        assert_eq!(status.activity, vec![ActivityKind::Login]);
        assert_eq!(status.last_activity_ms, 130_000);
    }

    #[test]
    fn jupyterlabs_last_activity_counts_but_never_from_the_future() {
        let s = settings(IdleAction::None);
        let mut d = Detector::new(0);
        let jl = |at| Observation {
            activity: Vec::new(),
            jupyterlab_last_activity_ms: Some(at),
        };
        assert_eq!(d.step(&jl(50_000), 100_000, &s), Event::Nothing);
        assert_eq!(d.step(&jl(50_000), 109_000, &s), Event::Nothing);
        assert_eq!(d.step(&jl(50_000), 110_000, &s), Event::WentIdle);
        // A timestamp ahead of the agent's clock counts as now, not later.
        assert_eq!(
            d.step(&jl(10_000_000), 120_000, &s),
            Event::Resumed { cancelled: false }
        );
        assert_eq!(d.status().last_activity_ms, 120_000);
        // An older timestamp never moves idleness back.
        d.step(&jl(5), 121_000, &s);
        assert_eq!(d.status().last_activity_ms, 120_000);
    }

    #[test]
    fn shelving_waits_the_grace_period_and_activity_cancels_it() {
        let s = settings(IdleAction::Shelve);
        let mut d = Detector::new(0);
        assert_eq!(
            d.step(&quiet(), 60_000, &s),
            Event::Warned { at_ms: 90_000 }
        );
        assert_eq!(d.status().state, IdleState::ShelvePending);
        assert_eq!(d.status().action_at_ms, Some(90_000));
        assert_eq!(d.step(&quiet(), 89_999, &s), Event::Nothing);
        assert_eq!(
            d.step(&busy(ActivityKind::Desktop), 89_999, &s),
            Event::Resumed { cancelled: true }
        );
        assert_eq!(d.status().action_at_ms, None);
        // A new idle period warns again with a new grace period, then shelves.
        assert_eq!(
            d.step(&quiet(), 150_000, &s),
            Event::Warned { at_ms: 180_000 }
        );
        assert_eq!(d.step(&quiet(), 180_000, &s), Event::Shelve);
        assert_eq!(d.status().state, IdleState::Shelving);
        d.shelve_outcome(Ok(()), 180_000);
        assert_eq!(d.step(&quiet(), 240_000, &s), Event::Nothing, "asked once");
        assert_eq!(d.status().state, IdleState::Shelving);
    }

    #[test]
    fn a_refused_shelve_is_reported_and_retried_only_when_it_may_help() {
        let s = settings(IdleAction::Shelve);
        let mut d = Detector::new(0);
        d.step(&quiet(), 60_000, &s);
        assert_eq!(d.step(&quiet(), 90_000, &s), Event::Shelve);
        let busy_nova = Reason::new("nova-busy", "HTTP 503");
        d.shelve_outcome(Err((busy_nova.clone(), false)), 90_000);
        assert_eq!(d.status().state, IdleState::ShelvePending);
        assert_eq!(d.status().reason, Some(busy_nova));
        assert_eq!(d.step(&quiet(), 91_000, &s), Event::Shelve, "tried again");
        let refused = Reason::new("credential-not-permitted", "HTTP 403");
        d.shelve_outcome(Err((refused.clone(), true)), 91_000);
        assert_eq!(d.status().state, IdleState::Idle);
        assert_eq!(d.status().reason, Some(refused));
        assert_eq!(d.step(&quiet(), 500_000, &s), Event::Nothing, "not again");
        // Activity clears the failure; the next idle period tries again.
        d.step(&busy(ActivityKind::Cpu), 501_000, &s);
        assert_eq!(d.status().reason, None);
        assert_eq!(
            d.step(&quiet(), 561_000, &s),
            Event::Warned { at_ms: 591_000 }
        );
    }

    #[test]
    fn the_warning_names_both_times_in_utc() {
        let text = warning_text(1_796_674_503_000, 1_796_676_303_000);
        assert!(
            text.contains(
                "idle since 2026-12-07 20:15 UTC and will be SHELVED at 2026-12-07 20:45 UTC"
            ),
            "{text}"
        );
    }
}
