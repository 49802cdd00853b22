//! Changing a running instance: the desired state read again on SIGHUP, on `exoagent reload`
//! (the status API's `POST /v1/reload`) and when the cloud's request (`exoAgentRequest` in the
//! instance metadata, polled with jitter) changes. A new configuration is validated in full
//! exactly as at start; a bad one is reported and changes nothing. A good one that differs from
//! the running one makes the agent start over with it: services no longer configured are
//! stopped, new ones installed and started, changed ones restarted, and unchanged ones adopted
//! untouched (their shims and processes never stop: the supervisor adopts a service whose run
//! spec is the same). Nothing is applied while the setup is still under way.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::cloud::MetadataService;
use crate::config::request::REQUEST_KEY;
use crate::config::{self, Pending, Settings};
use crate::fsutil;
use crate::paths::Paths;
use crate::state::{
    now_ms, Reason, ReloadOutcome, ReloadStatus, ReloadTrigger, RequestStatus, StateHub,
};

/// Longest wait between two looks at the metadata service after failures.
const MAX_POLL_BACKOFF: Duration = Duration::from_secs(600);

pub use crate::api::ReloadAsk;

/// What one run hands the next when it starts over: what the reload did, shown from the
/// start of the next run.
#[derive(Debug, Clone, Default)]
pub struct Carried {
    /// The reload that made the run start over.
    pub reload: Option<ReloadStatus>,
    /// The cloud's request then.
    pub request: Option<RequestStatus>,
    /// Services whose settings changed: stopped before the next run starts them again (a
    /// setting written to a file the service reads leaves its run spec as it was, and an
    /// unchanged run spec would be adopted with the old file in force).
    pub restart: Vec<crate::model::ServiceKind>,
    /// Whether `[tls]` changed: every TLS front is started again.
    pub restart_fronts: bool,
}

/// What the metadata service says of the cloud's request, once the identity side knows it.
#[derive(Debug, Clone)]
pub struct RequestSource {
    /// Polled for the request (`None`: no metadata service, or a config drive).
    pub metadata: Option<MetadataService>,
    /// The request in the metadata the identity was read from (`None`: none there), when
    /// that was the metadata service.
    pub at_start: Option<Option<String>>,
}

/// Reads and applies new desired state for one run of the agent.
#[derive(Debug)]
pub struct Controller {
    /// The layout (configuration files, the kept request).
    pub paths: Paths,
    /// The settings the run uses.
    pub running: Settings,
    /// Where reload and request states are published.
    pub hub: StateHub,
    /// SIGHUP, for the whole life of the process.
    pub hangup: Arc<Notify>,
    /// `POST /v1/reload`.
    pub asks: mpsc::Receiver<ReloadAsk>,
    /// Cancelled to make the run start over.
    pub restart: CancellationToken,
    /// Filled before `restart` is cancelled.
    pub carry: Arc<Mutex<Option<Carried>>>,
}

/// One thing to act on.
enum Work {
    Local(ReloadTrigger, Option<oneshot::Sender<ReloadStatus>>),
    Request(Option<String>),
}

impl Controller {
    /// Handle reload triggers until the run ends or starts over; `source` arrives once the
    /// identity is known (dropped without a value: no polling).
    pub async fn run(
        mut self,
        source: oneshot::Receiver<RequestSource>,
        cancel: CancellationToken,
    ) {
        // What the running configuration was built with.
        let mut kept = read_kept(&self.paths);
        if let Some(text) = &kept {
            if self.hub.snapshot().request.is_none() {
                self.hub.set_request(Some(RequestStatus {
                    outcome: ReloadOutcome::Applied,
                    digest: digest(text),
                    since_ms: now_ms(),
                    reason: None,
                }));
            }
        }
        let mut source = Some(source);
        let mut metadata: Option<MetadataService> = None;
        let mut interval = Duration::from_secs(60);
        let mut next_poll: Option<tokio::time::Instant> = None;
        let mut failures = 0u32;
        // The last request value handled (so one rejected is reported once, not every poll).
        let mut seen: Option<Option<String>> = None;
        let mut asks_open = true;
        loop {
            let work = tokio::select! {
                () = cancel.cancelled() => return,
                () = self.hangup.notified() => Work::Local(ReloadTrigger::Signal, None),
                ask = self.asks.recv(), if asks_open => match ask {
                    Some((trigger, reply)) => Work::Local(trigger, Some(reply)),
                    None => {
                        asks_open = false;
                        continue;
                    }
                },
                found = async { source.as_mut().expect("guarded").await }, if source.is_some() => {
                    source = None;
                    let Ok(found) = found else { continue };
                    if let Some(service) = found.metadata {
                        interval = self.running.cloud.request_interval;
                        metadata = Some(service);
                        next_poll = Some(tokio::time::Instant::now() + jittered(interval));
                    }
                    match found.at_start {
                        Some(value) => Work::Request(value),
                        None => continue,
                    }
                }
                () = sleep_until(next_poll), if next_poll.is_some() => {
                    let Some(service) = &metadata else { continue };
                    match fetch_request(service).await {
                        Ok(value) => {
                            if failures > 0 {
                                tracing::info!(target: "exoagent::reload", "the metadata service answers again");
                            }
                            failures = 0;
                            next_poll = Some(tokio::time::Instant::now() + jittered(interval));
                            Work::Request(value)
                        }
                        Err(e) => {
                            if failures == 0 {
                                tracing::warn!(target: "exoagent::reload", reason = e.reason(), error = %e, "cannot read the cloud's request; trying again later");
                            }
                            failures = failures.saturating_add(1);
                            let backoff = interval
                                .saturating_mul(1 << failures.min(6))
                                .min(MAX_POLL_BACKOFF.max(interval));
                            next_poll = Some(tokio::time::Instant::now() + jittered(backoff));
                            continue;
                        }
                    }
                }
            };
            if let Work::Request(value) = &work {
                if seen.as_ref() == Some(value) {
                    continue;
                }
                seen = Some(value.clone());
                if *value == kept {
                    continue;
                }
            }
            // Nothing is applied while the setup is under way (an install is never cut short).
            if !self.hub.settled(&cancel).await {
                return;
            }
            let (trigger, request, reply) = match work {
                Work::Local(trigger, reply) => (trigger, None, reply),
                Work::Request(value) => (ReloadTrigger::CloudRequest, Some(value), None),
            };
            let decided = self.decide(trigger, request.clone()).await;
            if let Some(reply) = reply {
                let _ = reply.send(decided.status.clone());
            }
            if let (Some(value), true) = (&request, decided.request_ok) {
                match keep(&self.paths, value.as_deref()) {
                    Ok(()) => kept = value.clone(),
                    Err(e) => {
                        tracing::error!(target: "exoagent::reload", error = %e, "cannot keep the cloud's request; not applied");
                        continue;
                    }
                }
            }
            if decided.status.outcome == ReloadOutcome::Applied {
                let carried = Carried {
                    reload: Some(decided.status),
                    request: self.hub.snapshot().request,
                    restart: decided.restart,
                    restart_fronts: decided.restart_fronts,
                };
                if let Ok(mut slot) = self.carry.lock() {
                    *slot = Some(carried);
                }
                self.restart.cancel();
                return;
            }
        }
    }

    /// Validate the configuration with `request` (`None`: the kept one) and say what to do.
    async fn decide(&self, trigger: ReloadTrigger, request: Option<Option<String>>) -> Decided {
        let paths = self.paths.clone();
        let candidate = request.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let pending = Pending {
                request: candidate.as_ref().map(|value| value.as_deref()),
                ..Pending::default()
            };
            config::load_with(&paths, &pending)
        })
        .await;
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {
                return Decided::rejected(trigger, Reason::new("reload-cancelled", "the run ended"))
            }
        };
        let at_ms = now_ms();
        match loaded {
            Err(errors) => {
                let code = if trigger == ReloadTrigger::CloudRequest {
                    "invalid-request"
                } else {
                    "invalid-config"
                };
                let reason = Reason::new(code, errors.to_string());
                tracing::warn!(target: "exoagent::reload", trigger = trigger.as_str(), "new configuration rejected; nothing changed:\n{errors}");
                if let Some(Some(text)) = &request {
                    self.hub.set_request(Some(RequestStatus {
                        outcome: ReloadOutcome::Rejected,
                        digest: digest(text),
                        since_ms: at_ms,
                        reason: Some(reason.clone()),
                    }));
                }
                let status = ReloadStatus {
                    trigger,
                    outcome: ReloadOutcome::Rejected,
                    at_ms,
                    changes: Vec::new(),
                    reason: Some(reason),
                };
                self.hub.set_reload(status.clone());
                Decided {
                    status,
                    request_ok: false,
                    restart: Vec::new(),
                    restart_fronts: false,
                }
            }
            Ok(loaded) => {
                if let Some(value) = &request {
                    self.hub
                        .set_request(value.as_ref().map(|text| RequestStatus {
                            outcome: ReloadOutcome::Applied,
                            digest: digest(text),
                            since_ms: at_ms,
                            reason: None,
                        }));
                }
                let changes = changes(&self.running, &loaded.settings);
                let restart = service_changes(&self.running, &loaded.settings)
                    .filter(|(_, change)| *change == ServiceChange::Changed)
                    .map(|(kind, _)| kind)
                    .collect();
                let restart_fronts = self.running.tls != loaded.settings.tls;
                let outcome = if changes.is_empty() {
                    ReloadOutcome::Unchanged
                } else {
                    ReloadOutcome::Applied
                };
                tracing::info!(target: "exoagent::reload", trigger = trigger.as_str(), outcome = outcome.as_str(), changes = %changes.join("; "), "configuration read again");
                let status = ReloadStatus {
                    trigger,
                    outcome,
                    at_ms,
                    changes,
                    reason: None,
                };
                self.hub.set_reload(status.clone());
                Decided {
                    status,
                    request_ok: true,
                    restart,
                    restart_fronts,
                }
            }
        }
    }
}

/// A decision: what is published, whether a request read may be kept, and what the next run
/// must start again.
struct Decided {
    status: ReloadStatus,
    request_ok: bool,
    restart: Vec<crate::model::ServiceKind>,
    restart_fronts: bool,
}

impl Decided {
    fn rejected(trigger: ReloadTrigger, reason: Reason) -> Self {
        Self {
            status: ReloadStatus {
                trigger,
                outcome: ReloadOutcome::Rejected,
                at_ms: now_ms(),
                changes: Vec::new(),
                reason: Some(reason),
            },
            request_ok: false,
            restart: Vec::new(),
            restart_fronts: false,
        }
    }
}

/// What differs between two configurations, by service and by section.
pub fn changes(old: &Settings, new: &Settings) -> Vec<String> {
    let mut out: Vec<String> = service_changes(old, new)
        .map(|(kind, change)| format!("{kind}: {}", change.as_str()))
        .collect();
    let sections: [(&str, bool); 10] = [
        ("instance", old.instance != new.instance),
        ("supervise", old.supervise != new.supervise),
        ("console", old.console != new.console),
        ("packages", old.packages != new.packages),
        ("cloud", old.cloud != new.cloud),
        ("tls", old.tls != new.tls),
        ("host", old.host != new.host),
        ("volumes", old.volumes != new.volumes),
        ("alerts", old.alerts != new.alerts),
        ("idle", old.idle != new.idle),
    ];
    out.extend(
        sections
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(name, _)| format!("{name}: changed")),
    );
    out
}

/// How a service's settings differ between two configurations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServiceChange {
    /// Configured now, not before.
    Added,
    /// Configured before, not now.
    Removed,
    /// Configured in both, with other settings.
    Changed,
}

impl ServiceChange {
    /// The word in a reload's change list (`"desktop: added"`).
    fn as_str(self) -> &'static str {
        match self {
            Self::Added => "added",
            Self::Removed => "removed",
            Self::Changed => "changed",
        }
    }
}

/// Each service whose settings differ, and how.
fn service_changes<'a>(
    old: &'a Settings,
    new: &'a Settings,
) -> impl Iterator<Item = (crate::model::ServiceKind, ServiceChange)> + 'a {
    crate::model::ServiceKind::ALL
        .into_iter()
        .filter_map(|kind| {
            let before = old.services.iter().find(|s| s.kind() == kind);
            let after = new.services.iter().find(|s| s.kind() == kind);
            match (before, after) {
                (None, Some(_)) => Some((kind, ServiceChange::Added)),
                (Some(_), None) => Some((kind, ServiceChange::Removed)),
                (Some(a), Some(b)) if a != b => Some((kind, ServiceChange::Changed)),
                _ => None,
            }
        })
}

/// The request now in the metadata service (`None`: none there).
async fn fetch_request(
    service: &MetadataService,
) -> Result<Option<String>, crate::cloud::metadata::MetadataError> {
    let document = service.meta_data().await?;
    Ok(document
        .as_ref()
        .and_then(|d| d["meta"][REQUEST_KEY].as_str())
        .map(str::to_owned))
}

/// The request kept from the last run, if any.
fn read_kept(paths: &Paths) -> Option<String> {
    crate::input::read_capped(&paths.cloud_request_file(), config::MAX_CONFIG_FILE_BYTES).ok()
}

/// Keep `request` (or forget it) for the next start.
fn keep(paths: &Paths, request: Option<&str>) -> std::io::Result<()> {
    let path = paths.cloud_request_file();
    match request {
        Some(text) => fsutil::write_atomic(&path, text.as_bytes(), 0o644, None),
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// The first 12 hex digits of `text`'s SHA-256.
pub fn digest(text: &str) -> String {
    let sum = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    data_encoding::HEXLOWER.encode(&sum.as_ref()[..6])
}

/// `interval` ± 25 %: instances booted together do not ask in lockstep.
fn jittered(interval: Duration) -> Duration {
    use rand::Rng;
    interval.mul_f64(rand::thread_rng().gen_range(0.75..=1.25))
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_name_each_service_and_section() {
        let old = Settings::default();
        assert!(changes(&old, &old).is_empty());
        let mut new = old.clone();
        new.idle.after = Duration::from_secs(5);
        new.alerts.enabled = false;
        assert_eq!(changes(&old, &new), ["alerts: changed", "idle: changed"]);
    }

    #[test]
    fn digests_tell_requests_apart_without_showing_them() {
        let a = digest(r#"{"v":1,"services":{"desktop":{"enabled":true}}}"#);
        assert_eq!(a.len(), 12);
        assert_ne!(
            a,
            digest(r#"{"v":1,"services":{"desktop":{"enabled":false}}}"#)
        );
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(60));
            assert!(
                d >= Duration::from_secs(45) && d <= Duration::from_secs(75),
                "{d:?}"
            );
        }
    }
}
