//! Reports setup and service state to Nova (DESIGN §4.3): one `exoagent:` tag per subject,
//! Exosphere's `exoSetup` metadata and a compact `exoAgent` summary. Writes happen only when the
//! wanted state differs from what was last written; intermediate states settle before they are
//! written, readiness and final states go out at once (DESIGN §7: ready on every channel within
//! 1 s); failures back off with jitter and honour `Retry-After`; a refused credential is reported
//! locally and not retried until the state changes again. Runs on its own task: services never
//! wait for it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cloud::nova::{Nova, NovaError, MAX_META_VALUE_LEN, MAX_TAG_LEN};
use crate::state::{
    IdleState, NovaReporting, NovaReportingState, Reason, ReloadOutcome, ServiceState, SetupState,
    Snapshot, StateHub, VolumeState,
};
use crate::volumes::LeaveReason;

/// Every tag the agent owns starts with this; others (Exosphere's `exoPw:`, the user's) are
/// never touched.
pub const TAG_PREFIX: &str = "exoagent:";
/// Exosphere's own metadata key for the setup status.
pub const EXO_SETUP_KEY: &str = "exoSetup";
/// The agent's summary metadata key.
pub const EXO_AGENT_KEY: &str = "exoAgent";

/// What Nova should show for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The tags, all starting with [`TAG_PREFIX`].
    pub tags: BTreeSet<String>,
    /// Metadata items.
    pub metadata: BTreeMap<String, String>,
}

impl Wanted {
    /// The tags and metadata for `snapshot`.
    pub fn of(snapshot: &Snapshot) -> Self {
        let mut tags = BTreeSet::new();
        tags.insert(format!(
            "{TAG_PREFIX}setup:{}",
            snapshot.setup.state.as_str()
        ));
        for service in &snapshot.services {
            if service.state != ServiceState::Pending {
                tags.insert(format!(
                    "{TAG_PREFIX}{}:{}",
                    service.service.as_str(),
                    service.state.as_str()
                ));
            }
        }
        // One tag per kind of alert: the tag says "look", exoAgent and the status say where.
        for alert in &snapshot.alerts {
            tags.insert(format!("{TAG_PREFIX}alert:{}", alert.resource.code()));
        }
        // A cloud request the agent refused (the previous one stays in effect).
        if snapshot
            .request
            .as_ref()
            .is_some_and(|r| r.outcome == ReloadOutcome::Rejected)
        {
            tags.insert(format!("{TAG_PREFIX}request:rejected"));
        }
        // Idle: one tag while idle, and one naming a pending or requested shelve.
        if let Some(idle) = snapshot.idle.as_ref().filter(|i| i.state.is_idle()) {
            tags.insert(format!("{TAG_PREFIX}idle"));
            if idle.state != IdleState::Idle {
                tags.insert(format!("{TAG_PREFIX}idle:{}", idle.state.as_str()));
            }
        }
        tags.retain(|t| t.len() <= MAX_TAG_LEN);
        let mut metadata = BTreeMap::new();
        metadata.insert(
            EXO_SETUP_KEY.to_owned(),
            json!({ "status": snapshot.setup.state.as_str(), "epoch": snapshot.setup.since_ms })
                .to_string(),
        );
        metadata.insert(EXO_AGENT_KEY.to_owned(), exo_agent_summary(snapshot));
        Self { tags, metadata }
    }
}

/// Volume counts for the summary: `{"m":2,"l":1,"f":0}` (mounted, left alone, failed), plus
/// `"w"` while some wait for their name; `None` without volumes. The root disk and partitioned
/// disks (whose partitions have entries of their own) are not counted: `"l"` above 0 means an
/// attached volume or partition was not mounted.
fn volume_counts(snapshot: &Snapshot) -> Option<serde_json::Value> {
    if snapshot.volumes.is_empty() {
        return None;
    }
    let count = |state: VolumeState| {
        snapshot
            .volumes
            .iter()
            .filter(|v| {
                v.state == state
                    && !v.reason.as_deref().is_some_and(|r| {
                        r == LeaveReason::RootDisk.as_str()
                            || r == LeaveReason::PartitionTable.as_str()
                    })
            })
            .count()
    };
    let mut counts = json!({
        "m": count(VolumeState::Mounted),
        "l": count(VolumeState::LeftAlone),
        "f": count(VolumeState::Failed),
    });
    let waiting = count(VolumeState::Waiting);
    if waiting > 0 {
        counts["w"] = waiting.into();
    }
    Some(counts)
}

/// `{"v":"0.1.0","setup":"complete","svc":{"jupyterlab":"ready:8888"},"tls":"<sha256>",
/// "vol":{"m":1,"l":1,"f":0},"err":"…","alert":"memory,/media/volume/data",
/// "req":"applied:<12 hex>","idle":1796674503,"shelveAt":1796676303}`, at most 255 characters: the error and alert
/// texts are shortened first, then services are dropped from the end; the TLS fingerprint
/// (what a UAP pins, present with `[tls] enabled`), the volume counts (present with volumes),
/// the cloud request's outcome and digest (present with a request) and idleness (idle since, and when a shelve is due or was asked for, epoch seconds; only
/// while idle) always stay. `alert` names what is used up, not how much: a
/// percentage moving by one would be a metadata write each time.
pub fn exo_agent_summary(snapshot: &Snapshot) -> String {
    let services: Vec<(String, String)> = snapshot
        .services
        .iter()
        .map(|s| {
            (
                s.service.as_str().to_owned(),
                format!("{}:{}", s.state.as_str(), s.port),
            )
        })
        .collect();
    let error = match (
        &snapshot.setup.state,
        &snapshot.setup.step,
        &snapshot.setup.reason,
    ) {
        (SetupState::Error, step, Some(reason)) => Some(format!(
            "{}: {}",
            step.as_deref().unwrap_or("setup"),
            reason.code
        )),
        _ => None,
    };
    let alert = (!snapshot.alerts.is_empty()).then(|| {
        snapshot
            .alerts
            .iter()
            .map(|a| a.path.as_deref().unwrap_or(a.resource.as_str()))
            .collect::<Vec<_>>()
            .join(",")
    });
    let render = |services: &[(String, String)], error: Option<&str>, alert: Option<&str>| {
        let svc: serde_json::Map<String, serde_json::Value> = services
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
            .collect();
        let mut value = json!({
            "v": snapshot.agent_version,
            "setup": snapshot.setup.state.as_str(),
            "svc": svc,
        });
        if let Some(tls) = &snapshot.tls {
            value["tls"] = serde_json::Value::from(tls.fingerprint.as_str());
        }
        if let Some(counts) = volume_counts(snapshot) {
            value["vol"] = counts;
        }
        if let Some(error) = error {
            value["err"] = serde_json::Value::from(error);
        }
        if let Some(alert) = alert {
            value["alert"] = serde_json::Value::from(alert);
        }
        if let Some(request) = &snapshot.request {
            value["req"] =
                serde_json::Value::from(format!("{}:{}", request.outcome.as_str(), request.digest));
        }
        if let Some(idle) = snapshot.idle.as_ref().filter(|i| i.state.is_idle()) {
            value["idle"] = serde_json::Value::from(idle.last_activity_ms / 1000);
            if let Some(at) = idle.action_at_ms {
                value["shelveAt"] = serde_json::Value::from(at / 1000);
            }
        }
        value.to_string()
    };
    let mut kept = services.len();
    let short =
        |text: &Option<String>| text.as_deref().map(|t| crate::model::truncate_chars(t, 60));
    loop {
        let text = render(&services[..kept], error.as_deref(), alert.as_deref());
        if text.chars().count() <= MAX_META_VALUE_LEN {
            return text;
        }
        let (short_error, short_alert) = (short(&error), short(&alert));
        let text = render(
            &services[..kept],
            short_error.as_deref(),
            short_alert.as_deref(),
        );
        if text.chars().count() <= MAX_META_VALUE_LEN || kept == 0 {
            return crate::model::truncate_chars(&text, MAX_META_VALUE_LEN);
        }
        kept -= 1;
    }
}

/// What the reporter believes Nova holds.
#[derive(Debug, Default)]
struct Written {
    /// Our tags on the server; `None` until read once (a restarted agent must clean up what an
    /// earlier run left).
    tags: Option<BTreeSet<String>>,
    metadata: BTreeMap<String, String>,
}

/// Whether Nova should show `state` of the setup at once: the final states Exosphere waits for.
fn setup_is_prompt(state: SetupState) -> bool {
    match state {
        SetupState::Complete | SetupState::Error => true,
        SetupState::Starting | SetupState::Running => false,
    }
}

/// Whether Nova should show `state` of a service at once: readiness is what users wait for
/// (a failed service is prompt through the setup's `error`).
fn service_is_prompt(state: ServiceState) -> bool {
    match state {
        ServiceState::Ready => true,
        ServiceState::Pending
        | ServiceState::Installing
        | ServiceState::Starting
        | ServiceState::Degraded
        | ServiceState::Failed => false,
    }
}

/// Whether `snapshot` holds a readiness or final state that Nova does not show yet.
fn has_prompt_news(snapshot: &Snapshot, written: &Written) -> bool {
    if has_setup_end_news(snapshot, written) {
        return true;
    }
    let shown = |tag: String| written.tags.as_ref().is_some_and(|t| t.contains(&tag));
    snapshot.services.iter().any(|s| {
        service_is_prompt(s.state)
            && !shown(format!(
                "{TAG_PREFIX}{}:{}",
                s.service.as_str(),
                s.state.as_str()
            ))
    })
}

/// Whether `snapshot`'s setup has ended (`complete` or `error`) and Nova does not show it yet.
fn has_setup_end_news(snapshot: &Snapshot, written: &Written) -> bool {
    let setup = &snapshot.setup.state;
    let tag = format!("{TAG_PREFIX}setup:{}", setup.as_str());
    setup_is_prompt(*setup) && !written.tags.as_ref().is_some_and(|t| t.contains(&tag))
}

/// When the reporter writes: after changes settle, and how it backs off after failures.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// How long to let a burst of changes settle before writing, so that states passed
    /// through in a moment (`installing → starting`) cost no calls.
    pub settle: Duration,
    /// How long a readiness or final state (a service `ready`, setup `complete` or `error`)
    /// waits instead, counted from when it appeared: long enough to take the states that come
    /// with it in the same moment (the last service ready and setup complete; a service and its
    /// front) into one write, short enough to keep Nova within 1 s of the service answering.
    /// The setup's end (`complete`, `error`) is written at once: nothing comes after it.
    pub prompt: Duration,
    /// First delay after a failed write.
    pub retry_initial: Duration,
    /// Longest delay after failed writes.
    pub retry_max: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Self {
            settle: Duration::from_secs(2),
            prompt: Duration::from_millis(100),
            retry_initial: Duration::from_secs(2),
            retry_max: Duration::from_secs(300),
        }
    }
}

/// Keeps one server's tags and metadata in step with the hub.
#[derive(Debug)]
pub struct NovaReporter {
    nova: Nova,
    server: String,
    pacing: Pacing,
    fixed: BTreeMap<String, String>,
}

impl NovaReporter {
    /// A reporter for `server` through `nova`.
    pub fn new(nova: Nova, server: String, pacing: Pacing) -> Self {
        Self {
            nova,
            server,
            pacing,
            fixed: BTreeMap::new(),
        }
    }

    /// The Nova client it reports through (the idle detector shelves through it too).
    pub fn nova(&self) -> &Nova {
        &self.nova
    }

    /// The server it reports on.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Also write the metadata item `key` = `value`, which does not follow the state (written
    /// with the first report, and again only if a write of it failed).
    pub fn with_fixed_metadata(mut self, key: &str, value: String) -> Self {
        self.fixed.insert(key.to_owned(), value);
        self
    }

    /// Run until `cancel` fires; publishes its own health through `hub`.
    pub async fn run(self, hub: StateHub, cancel: CancellationToken) {
        let mut rx: watch::Receiver<Snapshot> = hub.subscribe();
        let mut written = Written::default();
        let mut delay = self.pacing.retry_initial;
        let mut given_up: Option<Wanted> = None;
        loop {
            let mut wanted = Wanted::of(&rx.borrow_and_update());
            wanted.metadata.extend(self.fixed.clone());
            let in_step =
                written.tags.as_ref() == Some(&wanted.tags) && written.metadata == wanted.metadata;
            if !in_step && given_up.as_ref() != Some(&wanted) {
                match self.sync(&wanted, &mut written).await {
                    Ok(()) => {
                        delay = self.pacing.retry_initial;
                        given_up = None;
                        set(&hub, NovaReportingState::Ok, None);
                    }
                    Err(e) if e.is_permanent() => {
                        tracing::error!(target: "exoagent::nova", reason = e.reason(), error = %e, "reporting to Nova stopped until the state changes: retrying cannot help");
                        set(
                            &hub,
                            NovaReportingState::Failed,
                            Some(Reason::new(e.reason(), e.to_string())),
                        );
                        // Try again only when there is something new to say.
                        given_up = Some(wanted);
                    }
                    Err(e) => {
                        let wait = jittered(e.retry_after().unwrap_or(delay).max(delay));
                        tracing::warn!(target: "exoagent::nova", reason = e.reason(), error = %e, retry_in = ?wait, "reporting to Nova failed; will retry");
                        set(
                            &hub,
                            NovaReportingState::Pending,
                            Some(Reason::new(e.reason(), e.to_string())),
                        );
                        delay = (delay * 2).min(self.pacing.retry_max);
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                        // The newest state is read again at the top of the loop.
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
            // Let the burst settle, or only briefly once it reaches a state users wait for; the
            // newest state is read at the top of the loop.
            if !self.settle(&mut rx, &written, &cancel).await {
                return;
            }
        }
    }

    /// Wait until the changes that started a moment ago are worth writing: `settle` after the
    /// first of them, cut short to `prompt` after a readiness or final state shows up. Coalesces
    /// whatever arrives meanwhile; `false` when the reporter should stop.
    async fn settle(
        &self,
        rx: &mut watch::Receiver<Snapshot>,
        written: &Written,
        cancel: &CancellationToken,
    ) -> bool {
        let settled = Instant::now() + self.pacing.settle;
        let mut prompt: Option<Instant> = None;
        loop {
            let (setup_end, news) = {
                let snapshot = rx.borrow();
                (
                    has_setup_end_news(&snapshot, written),
                    has_prompt_news(&snapshot, written),
                )
            };
            if setup_end {
                // The setup's end comes last (every service has got where it was going):
                // nothing is left to wait for.
                prompt = Some(Instant::now());
            } else if prompt.is_none() && news {
                prompt = Some(Instant::now() + self.pacing.prompt);
            }
            let until = prompt.map_or(settled, |p| p.min(settled));
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep_until(until) => {
                    // A readiness state already left again (ready → degraded) is no reason to
                    // write before the burst has settled.
                    if until == settled || has_prompt_news(&rx.borrow(), written) {
                        return true;
                    }
                    prompt = None;
                }
                changed = rx.changed() => if changed.is_err() { return false },
            }
        }
    }

    /// Bring Nova to `wanted`: new tags first, then stale ones removed (a subject is never
    /// without a tag in between), then changed metadata. The new tags are written side by
    /// side, then the stale ones removed side by side (a service's readiness and the setup's
    /// `complete` arrive together: one round trip, not two).
    async fn sync(&self, wanted: &Wanted, written: &mut Written) -> Result<(), NovaError> {
        if written.tags.is_none() {
            let ours: BTreeSet<String> = self
                .nova
                .tags(&self.server)
                .await?
                .into_iter()
                .filter(|t| t.starts_with(TAG_PREFIX))
                .collect();
            written.tags = Some(ours);
        }
        let current = written.tags.get_or_insert_with(BTreeSet::new);
        let added: Vec<String> = wanted.tags.difference(current).cloned().collect();
        for tag in self.side_by_side(added, TagChange::Add).await? {
            current.insert(tag);
        }
        let stale: Vec<String> = current.difference(&wanted.tags).cloned().collect();
        for tag in self.side_by_side(stale, TagChange::Remove).await? {
            current.remove(&tag);
        }
        for (key, value) in &wanted.metadata {
            if written.metadata.get(key) != Some(value) {
                self.nova.set_metadata(&self.server, key, value).await?;
                written.metadata.insert(key.clone(), value.clone());
            }
        }
        Ok(())
    }
}

/// What [`NovaReporter::side_by_side`] does to each tag.
#[derive(Debug, Clone, Copy)]
enum TagChange {
    Add,
    Remove,
}

impl NovaReporter {
    /// Make `change` for every tag at once: the tags changed, or the first error once every
    /// call has ended (the next sync then works from the recorded tags again; adding or
    /// removing a tag twice changes nothing).
    async fn side_by_side(
        &self,
        tags: Vec<String>,
        change: TagChange,
    ) -> Result<Vec<String>, NovaError> {
        let mut calls = tokio::task::JoinSet::new();
        for tag in tags {
            let (nova, server) = (self.nova.clone(), self.server.clone());
            calls.spawn(async move {
                let done = match change {
                    TagChange::Add => nova.add_tag(&server, &tag).await,
                    TagChange::Remove => nova.remove_tag(&server, &tag).await,
                };
                done.map(|()| tag)
            });
        }
        let (mut changed, mut failed) = (Vec::new(), None);
        while let Some(joined) = calls.join_next().await {
            match joined {
                Ok(Ok(tag)) => changed.push(tag),
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {}
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(changed),
        }
    }
}

fn set(hub: &StateHub, state: NovaReportingState, reason: Option<Reason>) {
    hub.set_nova_reporting(NovaReporting { state, reason });
}

/// `delay` plus up to 25 % random jitter, so many instances do not retry in lockstep.
fn jittered(delay: Duration) -> Duration {
    use rand::Rng;
    delay.mul_f64(1.0 + rand::thread_rng().gen_range(0.0..0.25))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceKind;
    use crate::state::{ServiceUpdate, SetupPhase, SetupStep};

    fn hub() -> StateHub {
        StateHub::new([(ServiceKind::JupyterLab, 8888, "http://x/".to_owned())])
    }

    #[test]
    fn tags_follow_the_state_one_per_subject() {
        let hub = hub();
        let w = Wanted::of(&hub.snapshot());
        assert_eq!(
            w.tags.iter().collect::<Vec<_>>(),
            ["exoagent:setup:starting"]
        );
        hub.set_phase(SetupPhase::Provisioning);
        hub.transition(
            ServiceKind::JupyterLab,
            ServiceState::Installing,
            ServiceUpdate::default(),
        )
        .unwrap();
        let w = Wanted::of(&hub.snapshot());
        assert_eq!(
            w.tags.iter().collect::<Vec<_>>(),
            ["exoagent:jupyterlab:installing", "exoagent:setup:running"]
        );
        let setup: serde_json::Value = serde_json::from_str(&w.metadata["exoSetup"]).unwrap();
        assert_eq!(setup["status"], "running");
        assert!(setup["epoch"].as_u64().unwrap() > 1_700_000_000_000);
    }

    #[test]
    fn idleness_is_a_tag_and_its_times_in_the_summary_only_while_idle() {
        use crate::state::{ActivityKind, IdleStatus};
        let hub = hub();
        let idle = |state: IdleState, action_at_ms: Option<u64>| IdleStatus {
            state,
            last_activity_ms: 1_796_674_503_123,
            activity: Vec::new(),
            action_at_ms,
            reason: None,
        };
        hub.set_idle(IdleStatus {
            activity: vec![ActivityKind::Jupyterlab],
            ..idle(IdleState::Active, None)
        });
        let w = Wanted::of(&hub.snapshot());
        assert!(!w.tags.iter().any(|t| t.contains("idle")), "{:?}", w.tags);
        assert!(!w.metadata["exoAgent"].contains("idle"));
        hub.set_idle(idle(IdleState::Idle, None));
        let w = Wanted::of(&hub.snapshot());
        assert!(w.tags.contains("exoagent:idle"), "{:?}", w.tags);
        let summary: serde_json::Value = serde_json::from_str(&w.metadata["exoAgent"]).unwrap();
        assert_eq!(summary["idle"], 1_796_674_503);
        assert!(summary.get("shelveAt").is_none());
        hub.set_idle(idle(IdleState::ShelvePending, Some(1_796_676_303_000)));
        let w = Wanted::of(&hub.snapshot());
        assert!(w.tags.contains("exoagent:idle"), "{:?}", w.tags);
        assert!(
            w.tags.contains("exoagent:idle:shelve-pending"),
            "{:?}",
            w.tags
        );
        let summary: serde_json::Value = serde_json::from_str(&w.metadata["exoAgent"]).unwrap();
        assert_eq!(summary["shelveAt"], 1_796_676_303);
        hub.set_idle(idle(IdleState::Shelving, Some(1_796_676_303_000)));
        let w = Wanted::of(&hub.snapshot());
        assert!(w.tags.contains("exoagent:idle:shelving"), "{:?}", w.tags);
        assert!(
            !w.tags.contains("exoagent:idle:shelve-pending"),
            "{:?}",
            w.tags
        );
    }

    #[test]
    fn alerts_are_a_tag_per_kind_and_named_in_the_summary_without_their_use() {
        use crate::state::{AlertResource, ResourceAlert};
        let alert = |resource: AlertResource, path: Option<&str>, used: u8| ResourceAlert {
            resource,
            code: resource.code().to_owned(),
            path: path.map(str::to_owned),
            used_percent: used,
            threshold_percent: 90,
            since_ms: 1,
        };
        let hub = hub();
        hub.set_alerts(vec![
            alert(AlertResource::Memory, None, 91),
            alert(AlertResource::Filesystem, Some("/"), 95),
            alert(AlertResource::Filesystem, Some("/media/volume/data"), 99),
        ]);
        let w = Wanted::of(&hub.snapshot());
        assert_eq!(
            w.tags.iter().collect::<Vec<_>>(),
            [
                "exoagent:alert:disk-high",
                "exoagent:alert:memory-high",
                "exoagent:setup:starting"
            ]
        );
        let summary: serde_json::Value = serde_json::from_str(&w.metadata["exoAgent"]).unwrap();
        assert_eq!(summary["alert"], "memory,/,/media/volume/data");
        // Use moving within a standing alert writes nothing new to Nova.
        hub.set_alerts(vec![
            alert(AlertResource::Memory, None, 92),
            alert(AlertResource::Filesystem, Some("/"), 96),
            alert(AlertResource::Filesystem, Some("/media/volume/data"), 100),
        ]);
        assert_eq!(Wanted::of(&hub.snapshot()), w);
        // Many long mount points are shortened, never past the value's limit.
        let long: Vec<_> = (0..20)
            .map(|i| {
                let path = format!("/media/volume/{}{i}", "v".repeat(40));
                alert(AlertResource::Filesystem, Some(path.as_str()), 99)
            })
            .collect();
        hub.set_alerts(long);
        let summary = &Wanted::of(&hub.snapshot()).metadata["exoAgent"];
        assert!(summary.chars().count() <= MAX_META_VALUE_LEN, "{summary}");
        let value: serde_json::Value = serde_json::from_str(summary).unwrap();
        assert!(value["alert"]
            .as_str()
            .unwrap()
            .starts_with("/media/volume/v"));
        assert_eq!(value["svc"]["jupyterlab"], "pending:8888");
        hub.set_alerts(Vec::new());
        let w = Wanted::of(&hub.snapshot());
        assert!(!w.tags.iter().any(|t| t.contains("alert")), "{:?}", w.tags);
        assert!(!w.metadata["exoAgent"].contains("alert"));
    }

    #[tokio::test]
    async fn a_burst_of_changes_costs_only_its_final_state() {
        let (nova, calls) = crate::cloud::nova::stand_in::nova(201, None).await;
        let hub = hub();
        let pacing = Pacing {
            settle: Duration::from_millis(300),
            ..Pacing::default()
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(
            NovaReporter::new(nova, "srv".into(), pacing).run(hub.clone(), cancel.clone()),
        );
        let wait_for_quiet = || async {
            let mut last = usize::MAX;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let now = calls.lock().unwrap().len();
                if now == last {
                    return;
                }
                last = now;
            }
        };
        wait_for_quiet().await;
        let first: Vec<String> = calls.lock().unwrap().drain(..).collect();
        assert_eq!(first[0], "GET /v2.1/servers/srv/tags", "{first:?}");
        assert!(first.contains(&"PUT /v2.1/servers/srv/tags/exoagent:setup:starting".into()));

        // installing → starting → ready, 60 ms apart: well within the settle window.
        hub.set_phase(SetupPhase::Supervising);
        for state in [
            ServiceState::Installing,
            ServiceState::Starting,
            ServiceState::Ready,
        ] {
            hub.transition(ServiceKind::JupyterLab, state, ServiceUpdate::default())
                .unwrap();
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        wait_for_quiet().await;
        let burst: Vec<String> = calls.lock().unwrap().drain(..).collect();
        let tag_puts: Vec<&String> = burst
            .iter()
            .filter(|c| c.starts_with("PUT") && c.contains("/tags/"))
            .collect();
        assert_eq!(
            tag_puts,
            [
                "PUT /v2.1/servers/srv/tags/exoagent:jupyterlab:ready",
                "PUT /v2.1/servers/srv/tags/exoagent:setup:complete"
            ],
            "only the final state is written: {burst:?}"
        );
        assert!(burst.contains(&"DELETE /v2.1/servers/srv/tags/exoagent:setup:starting".into()));
        assert!(
            !burst.iter().any(|c| c.starts_with("GET")),
            "tags are read once per start"
        );

        // Idle: no calls at all.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(calls.lock().unwrap().is_empty());
        cancel.cancel();
        task.await.unwrap();
    }

    /// The calls Nova received until they stop for a moment, drained.
    async fn calls_until_quiet(calls: &crate::cloud::nova::stand_in::Calls) -> Vec<String> {
        let mut last = usize::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = calls.lock().unwrap().len();
            if now == last {
                return calls.lock().unwrap().drain(..).collect();
            }
            last = now;
        }
    }

    /// Waits (bounded only against a hang) until Nova has received `call`.
    async fn wait_for_call(calls: &crate::cloud::nova::stand_in::Calls, call: &str) {
        let waited = tokio::time::timeout(Duration::from_secs(60), async {
            while !calls.lock().unwrap().iter().any(|c| c == call) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "{call} never came: {:?}",
            calls.lock().unwrap()
        );
    }

    /// A settle window far longer than the test may run: whatever is written during the test
    /// was written without waiting for it.
    const AN_HOUR: Duration = Duration::from_secs(3600);

    /// The default pacing with [`AN_HOUR`] to settle.
    fn an_hour_settle() -> Pacing {
        Pacing {
            settle: AN_HOUR,
            ..Pacing::default()
        }
    }

    /// A reporter for `hub` with `pacing`, writing to a stand-in Nova: its calls, the token
    /// that stops it and its task.
    async fn reporting(
        hub: &StateHub,
        pacing: Pacing,
    ) -> (
        crate::cloud::nova::stand_in::Calls,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let (nova, calls) = crate::cloud::nova::stand_in::nova(201, None).await;
        let cancel = CancellationToken::new();
        let task = tokio::spawn(
            NovaReporter::new(nova, "srv".into(), pacing).run(hub.clone(), cancel.clone()),
        );
        (calls, cancel, task)
    }

    #[tokio::test]
    async fn readiness_is_written_without_waiting_for_the_settle() {
        let hub = hub();
        // The prompt window an hour long too: readiness that ends the setup does not wait for
        // it (nothing comes after the setup's end).
        let (calls, cancel, task) = reporting(
            &hub,
            Pacing {
                prompt: AN_HOUR,
                ..an_hour_settle()
            },
        )
        .await;
        let first = calls_until_quiet(&calls).await;
        assert!(first.contains(&"PUT /v2.1/servers/srv/tags/exoagent:setup:starting".into()));

        // Intermediate states wait for the settle: nothing is written for them.
        hub.set_phase(SetupPhase::Supervising);
        for state in [ServiceState::Installing, ServiceState::Starting] {
            hub.transition(ServiceKind::JupyterLab, state, ServiceUpdate::default())
                .unwrap();
        }
        assert_eq!(calls_until_quiet(&calls).await, Vec::<String>::new());

        // Ready (and with it setup complete) goes out long before the hour is up, and only the
        // final state is written: the intermediate ones never reach Nova.
        hub.transition(
            ServiceKind::JupyterLab,
            ServiceState::Ready,
            ServiceUpdate::default(),
        )
        .unwrap();
        wait_for_call(&calls, "PUT /v2.1/servers/srv/tags/exoagent:setup:complete").await;
        let burst = calls_until_quiet(&calls).await;
        assert_eq!(
            burst,
            [
                "PUT /v2.1/servers/srv/tags/exoagent:jupyterlab:ready",
                "PUT /v2.1/servers/srv/tags/exoagent:setup:complete",
                "DELETE /v2.1/servers/srv/tags/exoagent:setup:starting",
                "PUT /v2.1/servers/srv/metadata/exoAgent",
                "PUT /v2.1/servers/srv/metadata/exoSetup",
            ],
            "one write of the final state"
        );

        // Leaving ready is not prompt: it waits for the settle again.
        hub.transition(
            ServiceKind::JupyterLab,
            ServiceState::Degraded,
            ServiceUpdate::default(),
        )
        .unwrap();
        assert_eq!(calls_until_quiet(&calls).await, Vec::<String>::new());
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn an_error_is_written_without_waiting_for_the_settle() {
        let hub = hub();
        let (calls, cancel, task) = reporting(&hub, an_hour_settle()).await;
        calls_until_quiet(&calls).await;
        hub.fail_step(
            SetupStep::User,
            Reason::new("user-failed", "useradd exited 1"),
        );
        wait_for_call(&calls, "PUT /v2.1/servers/srv/tags/exoagent:setup:error").await;
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn readiness_arriving_together_is_one_write() {
        let hub = StateHub::new([
            (ServiceKind::JupyterLab, 8888, "http://x/".to_owned()),
            (ServiceKind::RStudio, 8787, "http://y/".to_owned()),
        ]);
        // A wide prompt window, so that the second service's readiness surely falls inside it.
        let (calls, cancel, task) = reporting(
            &hub,
            Pacing {
                settle: AN_HOUR,
                prompt: Duration::from_secs(2),
                ..Pacing::default()
            },
        )
        .await;
        calls_until_quiet(&calls).await;
        hub.set_phase(SetupPhase::Supervising);
        for kind in [ServiceKind::JupyterLab, ServiceKind::RStudio] {
            // The second one a moment later: the first one's prompt write must wait for it.
            tokio::time::sleep(Duration::from_millis(100)).await;
            for state in [
                ServiceState::Installing,
                ServiceState::Starting,
                ServiceState::Ready,
            ] {
                hub.transition(kind, state, ServiceUpdate::default())
                    .unwrap();
            }
        }
        wait_for_call(&calls, "PUT /v2.1/servers/srv/tags/exoagent:setup:complete").await;
        let burst = calls_until_quiet(&calls).await;
        let summaries = burst
            .iter()
            .filter(|c| *c == "PUT /v2.1/servers/srv/metadata/exoAgent")
            .count();
        assert_eq!(summaries, 1, "two writes where one would do: {burst:?}");
        assert_eq!(burst.len(), 6, "{burst:?}");
        cancel.cancel();
        task.await.unwrap();
    }

    #[test]
    fn the_summary_fits_a_metadata_value() {
        let hub = hub();
        hub.transition(
            ServiceKind::JupyterLab,
            ServiceState::Failed,
            ServiceUpdate {
                reason: Some(Reason::new(&"x".repeat(400), "detail")),
                ..Default::default()
            },
        )
        .unwrap();
        let summary = exo_agent_summary(&hub.snapshot());
        assert!(summary.chars().count() <= MAX_META_VALUE_LEN, "{summary}");
        let plain = exo_agent_summary(&super::tests::hub().snapshot());
        let value: serde_json::Value = serde_json::from_str(&plain).unwrap();
        assert_eq!(value["svc"]["jupyterlab"], "pending:8888");
        assert_eq!(value["setup"], "starting");
        assert!(value.get("tls").is_none(), "{plain}");
    }

    #[test]
    fn the_summary_keeps_the_tls_fingerprint_whatever_else_is_cut() {
        let hub = StateHub::new(
            ServiceKind::ALL
                .into_iter()
                .map(|k| (k, k.default_port(), String::new())),
        );
        let fingerprint = "0123456789abcdef".repeat(4);
        hub.set_tls(crate::state::TlsStatus {
            fingerprint: fingerprint.clone(),
            not_after: 0,
            generated: true,
        });
        hub.transition(
            ServiceKind::Guacamole,
            ServiceState::Failed,
            ServiceUpdate {
                reason: Some(Reason::new(&"y".repeat(200), "detail")),
                ..Default::default()
            },
        )
        .unwrap();
        let volume = |state: VolumeState| crate::state::VolumeStatus {
            device: "/dev/vdb".into(),
            volume_id: None,
            name: Some("x".repeat(300)),
            state,
            mount_point: None,
            reason: None,
            detail: "d".repeat(300),
        };
        let root_disk = crate::state::VolumeStatus {
            reason: Some("root-disk".into()),
            ..volume(VolumeState::LeftAlone)
        };
        let partitioned = crate::state::VolumeStatus {
            reason: Some("partition-table".into()),
            ..volume(VolumeState::LeftAlone)
        };
        hub.set_volumes(vec![
            root_disk,
            partitioned,
            volume(VolumeState::Mounted),
            volume(VolumeState::Mounted),
            volume(VolumeState::LeftAlone),
            volume(VolumeState::Waiting),
        ]);
        let summary = exo_agent_summary(&hub.snapshot());
        assert!(summary.chars().count() <= MAX_META_VALUE_LEN, "{summary}");
        let value: serde_json::Value = serde_json::from_str(&summary).expect(&summary);
        assert_eq!(value["tls"], fingerprint.as_str(), "{summary}");
        assert_eq!(
            value["vol"],
            serde_json::json!({"m": 2, "l": 1, "f": 0, "w": 1}),
            "{summary}"
        );
    }
}
