//! The observable state: one explicit state machine per service, the overall setup state derived
//! from them, and the hub that publishes snapshots to reporters without ever blocking writers.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::model::ServiceKind;

/// Milliseconds since the Unix epoch, the unit of every timestamp the agent reports.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// "12s ago", "3m ago", "2h ago", "4d ago": how long ago `since_ms` was at `now_ms`, in one
/// coarse unit (humantime would print "2h 1m 40s").
pub fn relative(since_ms: u64, now_ms: u64) -> String {
    let secs = now_ms.saturating_sub(since_ms) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// Why something failed or degraded: a short stable `code` (fits a 60-character tag) and a
/// human-readable `detail` (already free of secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    /// Short, stable, machine-matchable reason such as `crash-loop` or `start-timeout`.
    pub code: String,
    /// Free text for people: exit status, last stderr lines, the failing command.
    pub detail: String,
}

impl Reason {
    /// A reason from a stable code and a detail text.
    pub fn new(code: &str, detail: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            detail: detail.into(),
        }
    }
}

/// The lifecycle of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    /// Planned, nothing done yet.
    Pending,
    /// Packages, runtime or files are being installed.
    Installing,
    /// The process is (re)starting and has not yet passed its readiness probe.
    Starting,
    /// Running and passing its probe.
    Ready,
    /// Running but its liveness probe fails; it may recover.
    Degraded,
    /// Given up: install failed, start timed out, or a crash loop. Carries a reason.
    Failed,
}

impl ServiceState {
    /// The stable lowercase name used in tags, the API and the status table.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Installing => "installing",
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Degraded => "degraded",
            Self::Failed => "failed",
        }
    }

    /// Whether `self → next` is an allowed transition. Staying in the same state is allowed
    /// (a restart goes Starting → Starting).
    pub fn may_become(self, next: ServiceState) -> bool {
        use ServiceState::*;
        if next == Failed || self == next {
            return true;
        }
        matches!(
            (self, next),
            (Pending, Installing)
                | (Pending, Starting)
                | (Installing, Starting)
                | (Starting, Ready)
                | (Ready, Degraded)
                | (Degraded, Ready)
                | (Ready, Starting)
                | (Degraded, Starting)
                | (Failed, Installing)
                | (Failed, Starting)
        )
    }
}

/// What the reporters know about one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Which service.
    pub service: ServiceKind,
    /// Current state.
    pub state: ServiceState,
    /// When the current state was entered (ms since the epoch).
    pub since_ms: u64,
    /// The TCP port the service answers on.
    pub port: u16,
    /// Where a person on the instance can reach it.
    pub url: String,
    /// Where a browser reaches it through the cloud's User Application Proxy, when the UAP's
    /// host name is configured and the floating address known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uap_url: Option<String>,
    /// How often the process was restarted since the agent started supervising it.
    pub restarts: u32,
    /// The service's main process, when one runs.
    pub pid: Option<u32>,
    /// Why it is degraded or failed, or the last error seen while starting.
    pub reason: Option<Reason>,
    /// The TLS front on its public port, when `[tls]` puts one there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub front: Option<FrontStatus>,
}

/// The TLS front before a service: supervised like a service, with the same states.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontStatus {
    /// Current state.
    pub state: ServiceState,
    /// When the current state was entered (ms since the epoch).
    pub since_ms: u64,
    /// How often the front was restarted since the agent started supervising it.
    pub restarts: u32,
    /// The front's process, when one runs.
    pub pid: Option<u32>,
    /// Why it is degraded or failed.
    pub reason: Option<Reason>,
}

/// The certificate the fronts serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsStatus {
    /// SHA-256 of the leaf certificate's DER, lowercase hex (what a UAP pins).
    pub fingerprint: String,
    /// When it expires (seconds since the epoch).
    pub not_after: i64,
    /// Whether exoagent generated it (else the operator provided it).
    pub generated: bool,
}

/// What became of one attached volume (`volumes[].state` in the status API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// Mounted at its mount point.
    Mounted,
    /// Deliberately not touched (root disk, in use, a signature found, …): see `reason`.
    LeftAlone,
    /// Its serial matches no volume in the metadata yet; the metadata is read again.
    Waiting,
    /// Formatting, probing or mounting went wrong: see `reason`.
    Failed,
}

impl VolumeState {
    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mounted => "mounted",
            Self::LeftAlone => "left-alone",
            Self::Waiting => "waiting",
            Self::Failed => "failed",
        }
    }
}

/// One block device the volume watcher looked at (disk or partition), and what it did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    /// The kernel device, e.g. `/dev/vdb` or `/dev/vdb1`.
    pub device: String,
    /// The OpenStack volume UUID its serial matches, when one does.
    pub volume_id: Option<String>,
    /// The volume's name (from the metadata, else the kernel device name), when known.
    pub name: Option<String>,
    /// What became of it.
    pub state: VolumeState,
    /// Where it is mounted (only when `mounted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<String>,
    /// Short stable reason (only when `left-alone` or `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human text: what was found, what failed.
    pub detail: String,
}

/// What a resource alert is about (`alerts[].resource` in the status API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum AlertResource {
    /// The instance's memory: total minus what the kernel counts as available.
    Memory,
    /// A filesystem: the root disk, a mounted volume, or one holding a path in `[alerts] paths`.
    Filesystem,
}

impl AlertResource {
    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Filesystem => "filesystem",
        }
    }

    /// The alert's stable code (`alerts[].code`, the Nova tag `exoagent:alert:<code>`).
    pub fn code(self) -> &'static str {
        match self {
            Self::Memory => "memory-high",
            Self::Filesystem => "disk-high",
        }
    }
}

/// One resource used at or above its `[alerts]` threshold (`alerts[]` in the status API). It
/// stays until use falls a margin below the threshold (`alerts::CLEAR_MARGIN`), so a value
/// hovering at the line does not raise and clear it every sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceAlert {
    /// What is used up.
    pub resource: AlertResource,
    /// The stable code: `memory-high` or `disk-high`.
    pub code: String,
    /// The filesystem's mount point (or the watched path on it); absent for memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Use at the latest sample, in percent (filesystems counted like `df`).
    pub used_percent: u8,
    /// The threshold it reached.
    pub threshold_percent: u8,
    /// When it was raised (ms since the epoch).
    pub since_ms: u64,
}

impl ResourceAlert {
    /// "memory 93% used (alert at 90%, since 3m ago)", "/media/volume/data 95% used (…)" at
    /// `now_ms`: the path escaped onto one line (mount points decode to any byte).
    pub fn describe(&self, now_ms: u64) -> String {
        let what = match &self.path {
            Some(path) => crate::text::clean(path, 120),
            None => self.resource.as_str().to_owned(),
        };
        format!(
            "{what} {}% used (alert at {}%, since {})",
            self.used_percent,
            self.threshold_percent,
            relative(self.since_ms, now_ms)
        )
    }
}

/// What started a reload (`reload.trigger` in the status API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReloadTrigger {
    /// SIGHUP.
    Signal,
    /// `exoagent reload`, `exoagent enable` or `exoagent disable` (the status API's
    /// `POST /v1/reload`).
    Command,
    /// A new or changed request in the instance metadata (`exoAgentRequest`).
    CloudRequest,
}

impl ReloadTrigger {
    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signal => "signal",
            Self::Command => "command",
            Self::CloudRequest => "cloud-request",
        }
    }
}

/// What a reload did (`reload.outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReloadOutcome {
    /// The configuration changed: applied (the agent started over with it; unchanged services
    /// were adopted untouched).
    Applied,
    /// Valid, and the same as the one running: nothing was done.
    Unchanged,
    /// Invalid: nothing was changed; `reason` says why.
    Rejected,
}

impl ReloadOutcome {
    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
            Self::Rejected => "rejected",
        }
    }
}

/// The latest reload (`reload` in the status API; absent until one happened).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadStatus {
    /// What started it.
    pub trigger: ReloadTrigger,
    /// What it did.
    pub outcome: ReloadOutcome,
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// What changed: `desktop: added`, `jupyterlab: changed`, `rstudio: removed`, `idle:
    /// changed` (only `applied`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<String>,
    /// Why it was rejected: code `invalid-config` or `invalid-request`, the errors as detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
}

/// The cloud's request as last read (`request` in the status API; absent when the metadata
/// holds none and none is kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestStatus {
    /// Applied (in effect) or rejected (the previous one stays in effect).
    pub outcome: ReloadOutcome,
    /// The first 12 hex digits of the request text's SHA-256: which request this is about.
    pub digest: String,
    /// Since when (ms since the epoch).
    pub since_ms: u64,
    /// Why it was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
}

/// Where the instance stands on idleness (`idle.state` in the status API, DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdleState {
    /// Something happened within `[idle] after_s`.
    Active,
    /// Nothing happened for `[idle] after_s`; no action is configured (or it failed).
    Idle,
    /// Idle, and the instance will be shelved at `action_at_ms` unless something happens.
    ShelvePending,
    /// Nova was asked to shelve the instance.
    Shelving,
}

impl IdleState {
    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Idle => "idle",
            Self::ShelvePending => "shelve-pending",
            Self::Shelving => "shelving",
        }
    }

    /// Idle in any form (reported as idle on every channel).
    pub fn is_idle(self) -> bool {
        self != Self::Active
    }
}

/// A kind of activity that keeps the instance from being idle (`idle.activity[]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActivityKind {
    /// exoagent is still setting the instance up (the setup is `starting` or `running`).
    Setup,
    /// A Guacamole tunnel is open (a connection to guacd), or a VNC client is connected.
    Desktop,
    /// JupyterLab saw kernel, terminal or API activity, or a kernel is busy.
    Jupyterlab,
    /// An RStudio session process (`rsession`) runs.
    Rstudio,
    /// Someone is logged in (SSH or console) and typed within the idle time.
    Login,
    /// CPU use at or above `[idle] cpu_percent`.
    Cpu,
    /// Disk traffic at or above `[idle] disk_kib_per_s`.
    Disk,
    /// Network traffic at or above `[idle] network_kib_per_s`.
    Network,
}

impl ActivityKind {
    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Setup => "setup",
            Self::Desktop => "desktop",
            Self::Jupyterlab => "jupyterlab",
            Self::Rstudio => "rstudio",
            Self::Login => "login",
            Self::Cpu => "cpu",
            Self::Disk => "disk",
            Self::Network => "network",
        }
    }
}

/// Idleness as the detector last published it (`idle` in the status API; absent with
/// `[idle] enabled = false`). It changes with the state and the kinds of activity seen, not
/// with every sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleStatus {
    /// Where it stands.
    pub state: IdleState,
    /// When the last activity was seen (ms since the epoch): idle since then, when idle.
    pub last_activity_ms: u64,
    /// What the latest sample found going on (empty when nothing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub activity: Vec<ActivityKind>,
    /// When the instance will be shelved (only `shelve-pending`) or was asked to be
    /// (`shelving`), ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_at_ms: Option<u64>,
    /// Why the last shelve request failed (cleared by activity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
}

impl IdleStatus {
    /// "idle since 1h ago", "idle since 1h ago; shelving in 25m unless there is activity",
    /// "active (jupyterlab, login)" at `now_ms`.
    pub fn describe(&self, now_ms: u64) -> String {
        let mut text = match self.state {
            IdleState::Active if self.activity.is_empty() => {
                format!(
                    "active (last activity {})",
                    relative(self.last_activity_ms, now_ms)
                )
            }
            IdleState::Active => {
                let kinds: Vec<&str> = self.activity.iter().map(|k| k.as_str()).collect();
                format!("active ({})", kinds.join(", "))
            }
            _ => format!("idle since {}", relative(self.last_activity_ms, now_ms)),
        };
        match (self.state, self.action_at_ms) {
            (IdleState::ShelvePending, Some(at)) => text.push_str(&format!(
                "; the instance will be shelved in {} unless there is activity",
                remaining(now_ms, at)
            )),
            (IdleState::Shelving, _) => text.push_str("; shelving the instance"),
            _ => {}
        }
        if let Some(reason) = &self.reason {
            text.push_str(&format!(
                "; shelving failed ({}: {})",
                reason.code, reason.detail
            ));
        }
        text
    }
}

/// "25m", "40s", "2h" from `now_ms` until `at_ms` (0s when past).
pub fn remaining(now_ms: u64, at_ms: u64) -> String {
    let secs = at_ms.saturating_sub(now_ms).div_ceil(1000);
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs / 60),
        _ => format!("{}h", secs / 3600),
    }
}

/// The overall setup state, in Exosphere's vocabulary (`status` values of console lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetupState {
    /// The agent has started and is validating its input.
    Starting,
    /// Setting up: users, packages, services installing or starting.
    Running,
    /// Every requested service is ready.
    Complete,
    /// A setup step or a service failed.
    Error,
}

impl SetupState {
    /// The stable name Exosphere understands.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Complete => "complete",
            Self::Error => "error",
        }
    }
}

/// A machine-wide setup step that is not one service's (users, packages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetupPhase {
    /// Config validated, nothing changed yet.
    Validating,
    /// Users, packages and services are being set up.
    Provisioning,
    /// Provisioning is over; services are supervised.
    Supervising,
}

/// A machine-wide setup step that can fail on its own, outside any one service; its name is
/// the `step` of an error status (console line, `exoSetup`/`exoAgent`, the status API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetupStep {
    /// Loading and validating the configuration.
    Config,
    /// Detecting a supported OS.
    Os,
    /// Reading the instance identity.
    Identity,
    /// Anything else that stops the agent before setup starts.
    Agent,
    /// The instance user and its passphrase.
    User,
    /// The batched system package transaction.
    Packages,
    /// The TLS front's certificate.
    Tls,
}

impl SetupStep {
    /// The stable name reported as `step`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Os => "os",
            Self::Identity => "identity",
            Self::Agent => "agent",
            Self::User => "user",
            Self::Packages => "packages",
            Self::Tls => "tls",
        }
    }
}

/// The overall setup status with its failing step, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetupStatus {
    /// Derived overall state.
    pub state: SetupState,
    /// When it was entered (ms since the epoch).
    pub since_ms: u64,
    /// The failing step (`packages`, `user`, or a service name), when in error.
    pub step: Option<String>,
    /// Why, when in error.
    pub reason: Option<Reason>,
}

/// Everything the reporters see, published as one consistent value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// exoagent's version.
    pub agent_version: String,
    /// The overall setup status.
    pub setup: SetupStatus,
    /// Every requested service, in a stable order.
    pub services: Vec<ServiceStatus>,
    /// How reporting to Nova goes (absent when it is not configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nova: Option<NovaReporting>,
    /// Which instance this is (absent until the agent has looked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceStatus>,
    /// The fronts' certificate (absent without `[tls] enabled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsStatus>,
    /// Attached volumes and what became of them (absent when none were looked at).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeStatus>,
    /// Resources at or above their thresholds (absent when none is).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<ResourceAlert>,
    /// Idleness (absent when the detector is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleStatus>,
    /// The latest reload (absent until one happened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadStatus>,
    /// The cloud's request (absent when there is none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestStatus>,
}

/// Where the agent learnt which instance it runs on (`instance.source` in the status API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceSource {
    /// `openstack/latest/meta_data.json` on the config drive.
    ConfigDrive,
    /// The metadata service.
    MetadataService,
    /// Neither: the agent runs without an instance identity.
    LocalOnly,
}

impl InstanceSource {
    /// The stable name used in the status API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConfigDrive => "config-drive",
            Self::MetadataService => "metadata-service",
            Self::LocalOnly => "local-only",
        }
    }
}

impl std::fmt::Display for InstanceSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which instance the agent runs on, and where it learnt that.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// The server UUID; absent when running local-only.
    pub uuid: Option<String>,
    /// Where the identity came from, or `local-only`.
    pub source: InstanceSource,
    /// Why the agent runs local-only.
    pub detail: Option<String>,
}

impl InstanceStatus {
    /// Server `uuid`, learnt from `source` (the config drive or the metadata service).
    pub fn found(uuid: &str, source: InstanceSource) -> Self {
        Self {
            uuid: Some(uuid.to_owned()),
            source,
            detail: None,
        }
    }

    /// No identity: the agent runs local-only, for the reason given.
    pub fn local_only(why: String) -> Self {
        Self {
            uuid: None,
            source: InstanceSource::LocalOnly,
            detail: Some(why),
        }
    }
}

/// How reporting to Nova goes (`nova.state` in the status API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NovaReportingState {
    /// Nova shows the current state.
    Ok,
    /// Writing, or retrying after a transient failure.
    Pending,
    /// A problem retrying cannot fix, such as a refused credential.
    Failed,
}

impl NovaReportingState {
    /// The stable name used in the status API and `exoagent status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Pending => "pending",
            Self::Failed => "failed",
        }
    }
}

impl std::fmt::Display for NovaReportingState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of reporting to Nova, for the instance owner (`exoagent status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NovaReporting {
    /// Whether Nova shows the current state.
    pub state: NovaReportingState,
    /// Why, when not `ok`.
    pub reason: Option<Reason>,
}

/// The mutable truth behind the snapshots.
#[derive(Debug)]
struct Model {
    phase: SetupPhase,
    step_failure: Option<(SetupStep, Reason)>,
    services: BTreeMap<ServiceKind, ServiceStatus>,
    setup: SetupStatus,
    nova: Option<NovaReporting>,
    instance: Option<InstanceStatus>,
    tls: Option<TlsStatus>,
    volumes: Vec<VolumeStatus>,
    alerts: Vec<ResourceAlert>,
    idle: Option<IdleStatus>,
    reload: Option<ReloadStatus>,
    request: Option<RequestStatus>,
}

impl Model {
    fn derive_setup(&self) -> (SetupState, Option<String>, Option<Reason>) {
        if let Some((step, reason)) = &self.step_failure {
            return (
                SetupState::Error,
                Some(step.as_str().to_owned()),
                Some(reason.clone()),
            );
        }
        if let Some(failed) = self
            .services
            .values()
            .find(|s| s.state == ServiceState::Failed)
        {
            return (
                SetupState::Error,
                Some(failed.service.as_str().to_owned()),
                failed.reason.clone(),
            );
        }
        // A front that failed leaves its service unreachable from outside.
        if let Some((kind, front)) = self.services.values().find_map(|s| {
            s.front
                .as_ref()
                .filter(|f| f.state == ServiceState::Failed)
                .map(|f| (s.service, f))
        }) {
            return (
                SetupState::Error,
                Some(format!("{kind}-front")),
                front.reason.clone(),
            );
        }
        match self.phase {
            SetupPhase::Validating => (SetupState::Starting, None, None),
            SetupPhase::Provisioning => (SetupState::Running, None, None),
            SetupPhase::Supervising => {
                let up = |state: ServiceState| {
                    matches!(state, ServiceState::Ready | ServiceState::Degraded)
                };
                let all_up = self
                    .services
                    .values()
                    .all(|s| up(s.state) && s.front.as_ref().map_or(true, |f| up(f.state)));
                if all_up {
                    (SetupState::Complete, None, None)
                } else {
                    (SetupState::Running, None, None)
                }
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            setup: self.setup.clone(),
            services: self.services.values().cloned().collect(),
            nova: self.nova.clone(),
            instance: self.instance.clone(),
            tls: self.tls.clone(),
            volumes: self.volumes.clone(),
            alerts: self.alerts.clone(),
            idle: self.idle.clone(),
            reload: self.reload.clone(),
            request: self.request.clone(),
        }
    }
}

/// An attempted state change that the state machine does not allow.
#[derive(Debug, thiserror::Error)]
#[error("service {service}: transition {from} -> {to} is not allowed")]
pub struct IllegalTransition {
    /// The service.
    pub service: &'static str,
    /// Its state before.
    pub from: &'static str,
    /// The refused target state.
    pub to: &'static str,
}

/// The single writer-side handle: services and provisioning steps update it, reporters
/// subscribe. Publishing goes through a `watch` channel, so a slow reporter only ever sees the
/// latest snapshot and can never block a writer.
#[derive(Debug, Clone)]
pub struct StateHub {
    inner: std::sync::Arc<std::sync::Mutex<Model>>,
    tx: watch::Sender<Snapshot>,
}

/// What a service supervisor reports alongside a transition.
#[derive(Debug, Clone, Default)]
pub struct ServiceUpdate {
    /// The process id, when it changed.
    pub pid: Option<Option<u32>>,
    /// The restart counter, when it changed.
    pub restarts: Option<u32>,
    /// The reason to record (cleared when `None` and the new state is Ready).
    pub reason: Option<Reason>,
}

impl StateHub {
    /// A hub for the given services, all `pending`, setup `starting`.
    pub fn new(services: impl IntoIterator<Item = (ServiceKind, u16, String)>) -> Self {
        let now = now_ms();
        let services = services
            .into_iter()
            .map(|(kind, port, url)| {
                (
                    kind,
                    ServiceStatus {
                        service: kind,
                        state: ServiceState::Pending,
                        since_ms: now,
                        port,
                        url,
                        uap_url: None,
                        restarts: 0,
                        pid: None,
                        reason: None,
                        front: None,
                    },
                )
            })
            .collect();
        let mut model = Model {
            phase: SetupPhase::Validating,
            step_failure: None,
            services,
            setup: SetupStatus {
                state: SetupState::Starting,
                since_ms: now,
                step: None,
                reason: None,
            },
            nova: None,
            instance: None,
            tls: None,
            volumes: Vec::new(),
            alerts: Vec::new(),
            idle: None,
            reload: None,
            request: None,
        };
        let (state, step, reason) = model.derive_setup();
        model.setup = SetupStatus {
            state,
            since_ms: now,
            step,
            reason,
        };
        let (tx, _) = watch::channel(model.snapshot());
        Self {
            inner: std::sync::Arc::new(std::sync::Mutex::new(model)),
            tx,
        }
    }

    /// A receiver that always holds the latest snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.tx.subscribe()
    }

    /// Until the setup is complete or failed (`false`: `cancel` came first, or the hub is
    /// gone).
    pub async fn settled(&self, cancel: &tokio_util::sync::CancellationToken) -> bool {
        let mut snapshots = self.subscribe();
        let done = snapshots
            .wait_for(|s| matches!(s.setup.state, SetupState::Complete | SetupState::Error));
        tokio::select! {
            () = cancel.cancelled() => false,
            done = done => done.is_ok(),
        }
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Snapshot {
        self.tx.borrow().clone()
    }

    fn with_model(&self, change: impl FnOnce(&mut Model)) {
        let mut model = match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        change(&mut model);
        let (state, step, reason) = model.derive_setup();
        if state != model.setup.state || step != model.setup.step || reason != model.setup.reason {
            let since_ms = if state != model.setup.state {
                now_ms()
            } else {
                model.setup.since_ms
            };
            model.setup = SetupStatus {
                state,
                since_ms,
                step,
                reason,
            };
        }
        let snapshot = model.snapshot();
        self.tx.send_if_modified(|current| {
            if *current == snapshot {
                false
            } else {
                *current = snapshot;
                true
            }
        });
    }

    /// Move the machine-wide phase forward.
    pub fn set_phase(&self, phase: SetupPhase) {
        self.with_model(|m| m.phase = phase);
    }

    /// Record how reporting to Nova goes (never affects the setup state: services do not
    /// depend on the cloud API).
    pub fn set_nova_reporting(&self, reporting: NovaReporting) {
        self.with_model(|m| m.nova = Some(reporting));
    }

    /// Record which instance this is (or that there is none to know).
    pub fn set_instance(&self, instance: InstanceStatus) {
        self.with_model(|m| m.instance = Some(instance));
    }

    /// Set every service's UAP URL from its public port and local URL (`None`: unknown).
    pub fn set_uap_urls(&self, build: impl Fn(u16, &str) -> Option<String>) {
        self.with_model(|m| {
            for status in m.services.values_mut() {
                status.uap_url = build(status.port, &status.url);
            }
        });
    }

    /// Record the certificate the fronts serve.
    pub fn set_tls(&self, tls: TlsStatus) {
        self.with_model(|m| m.tls = Some(tls));
    }

    /// Record the attached volumes and what became of them (never affects the setup state: a
    /// volume left alone is not a failed setup).
    pub fn set_volumes(&self, volumes: Vec<VolumeStatus>) {
        self.with_model(|m| m.volumes = volumes);
    }

    /// Record the resources now at or above their thresholds (never affects the setup state:
    /// a full disk is the researcher's to act on, not a failed setup).
    pub fn set_alerts(&self, alerts: Vec<ResourceAlert>) {
        self.with_model(|m| m.alerts = alerts);
    }

    /// Record what the latest reload did.
    pub fn set_reload(&self, reload: ReloadStatus) {
        self.with_model(|m| m.reload = Some(reload));
    }

    /// Record the cloud's request and what became of it (`None`: there is none).
    pub fn set_request(&self, request: Option<RequestStatus>) {
        self.with_model(|m| m.request = request);
    }

    /// Record idleness (never affects the setup state). Unchanged, nothing is published.
    pub fn set_idle(&self, idle: IdleStatus) {
        let model = match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if model.idle.as_ref() == Some(&idle) {
            return;
        }
        drop(model);
        self.with_model(|m| m.idle = Some(idle));
    }

    /// Expect a TLS front before `service` (pending until its supervisor reports).
    pub fn expect_front(&self, service: ServiceKind) {
        self.with_model(|m| {
            if let Some(status) = m.services.get_mut(&service) {
                status.front.get_or_insert(FrontStatus {
                    state: ServiceState::Pending,
                    since_ms: now_ms(),
                    restarts: 0,
                    pid: None,
                    reason: None,
                });
            }
        });
    }

    /// Move the front before `service` to `next`, by the same rules as a service.
    pub fn front_transition(
        &self,
        service: ServiceKind,
        next: ServiceState,
        update: ServiceUpdate,
    ) -> Result<(), IllegalTransition> {
        let mut result = Ok(());
        self.with_model(|m| {
            let Some(front) = m.services.get_mut(&service).and_then(|s| s.front.as_mut()) else {
                return;
            };
            result = apply(
                service,
                Lifecycle {
                    state: &mut front.state,
                    since_ms: &mut front.since_ms,
                    pid: &mut front.pid,
                    restarts: &mut front.restarts,
                    reason: &mut front.reason,
                },
                next,
                update,
            );
        });
        result
    }

    /// Record that a machine-wide step (`user`, `packages`, ...) failed.
    pub fn fail_step(&self, step: SetupStep, reason: Reason) {
        self.with_model(|m| m.step_failure = Some((step, reason)));
    }

    /// Move a service to `next`, refusing transitions the state machine does not allow.
    pub fn transition(
        &self,
        service: ServiceKind,
        next: ServiceState,
        update: ServiceUpdate,
    ) -> Result<(), IllegalTransition> {
        let mut result = Ok(());
        self.with_model(|m| {
            let Some(status) = m.services.get_mut(&service) else {
                return;
            };
            result = apply(
                service,
                Lifecycle {
                    state: &mut status.state,
                    since_ms: &mut status.since_ms,
                    pid: &mut status.pid,
                    restarts: &mut status.restarts,
                    reason: &mut status.reason,
                },
                next,
                update,
            );
        });
        result
    }
}

/// The supervised fields of a service or of its front.
struct Lifecycle<'a> {
    state: &'a mut ServiceState,
    since_ms: &'a mut u64,
    pid: &'a mut Option<u32>,
    restarts: &'a mut u32,
    reason: &'a mut Option<Reason>,
}

/// Move `to` to `next` with `update`, refusing what the state machine does not allow.
fn apply(
    service: ServiceKind,
    to: Lifecycle<'_>,
    next: ServiceState,
    update: ServiceUpdate,
) -> Result<(), IllegalTransition> {
    if !to.state.may_become(next) {
        return Err(IllegalTransition {
            service: service.as_str(),
            from: to.state.as_str(),
            to: next.as_str(),
        });
    }
    if *to.state != next {
        *to.since_ms = now_ms();
        *to.state = next;
    }
    if let Some(pid) = update.pid {
        *to.pid = pid;
    }
    if let Some(restarts) = update.restarts {
        *to.restarts = restarts;
    }
    match (update.reason, next) {
        (Some(reason), _) => *to.reason = Some(reason),
        (None, ServiceState::Ready) => *to.reason = None,
        (None, _) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> StateHub {
        StateHub::new([(
            ServiceKind::JupyterLab,
            8888,
            "http://127.0.0.1:8888/".to_owned(),
        )])
    }

    #[test]
    fn happy_path_reaches_complete() {
        let hub = hub();
        let rx = hub.subscribe();
        assert_eq!(rx.borrow().setup.state, SetupState::Starting);
        hub.set_phase(SetupPhase::Provisioning);
        assert_eq!(hub.snapshot().setup.state, SetupState::Running);
        for next in [
            ServiceState::Installing,
            ServiceState::Starting,
            ServiceState::Ready,
        ] {
            hub.transition(ServiceKind::JupyterLab, next, ServiceUpdate::default())
                .unwrap();
        }
        // Still provisioning: not complete until the phase says so.
        assert_eq!(hub.snapshot().setup.state, SetupState::Running);
        hub.set_phase(SetupPhase::Supervising);
        let snap = hub.snapshot();
        assert_eq!(snap.setup.state, SetupState::Complete);
        assert_eq!(snap.services[0].state, ServiceState::Ready);
    }

    #[test]
    fn a_failed_service_may_be_retried() {
        use ServiceState::*;
        // The retry schedule brings failed services back without an agent restart.
        assert!(Failed.may_become(Installing));
        assert!(Failed.may_become(Starting));
        // ...but only through a fresh start, never straight to ready.
        assert!(!Failed.may_become(Ready));
        assert!(!Failed.may_become(Degraded));
    }

    #[test]
    fn illegal_transition_is_refused_and_state_kept() {
        let hub = hub();
        let err = hub
            .transition(
                ServiceKind::JupyterLab,
                ServiceState::Ready,
                ServiceUpdate::default(),
            )
            .unwrap_err();
        assert_eq!(err.from, "pending");
        assert_eq!(hub.snapshot().services[0].state, ServiceState::Pending);
    }

    #[test]
    fn failed_service_makes_setup_error_with_reason() {
        let hub = hub();
        hub.set_phase(SetupPhase::Supervising);
        hub.transition(
            ServiceKind::JupyterLab,
            ServiceState::Failed,
            ServiceUpdate {
                reason: Some(Reason::new("crash-loop", "exit status 1")),
                ..Default::default()
            },
        )
        .unwrap();
        let setup = hub.snapshot().setup;
        assert_eq!(setup.state, SetupState::Error);
        assert_eq!(setup.step.as_deref(), Some("jupyterlab"));
        assert_eq!(setup.reason.unwrap().code, "crash-loop");
    }

    #[test]
    fn step_failure_wins() {
        let hub = hub();
        hub.set_phase(SetupPhase::Provisioning);
        hub.fail_step(
            SetupStep::Packages,
            Reason::new("package-install-failed", "apt-get"),
        );
        let setup = hub.snapshot().setup;
        assert_eq!(setup.state, SetupState::Error);
        assert_eq!(setup.step.as_deref(), Some("packages"));
    }

    #[test]
    fn setup_steps_serialise_to_their_published_names() {
        for step in [
            SetupStep::Config,
            SetupStep::Os,
            SetupStep::Identity,
            SetupStep::Agent,
            SetupStep::User,
            SetupStep::Packages,
        ] {
            let json = serde_json::to_value(step).unwrap();
            assert_eq!(json, step.as_str());
        }
    }

    #[test]
    fn published_enums_serialise_to_their_documented_names() {
        for (source, name) in [
            (InstanceSource::ConfigDrive, "config-drive"),
            (InstanceSource::MetadataService, "metadata-service"),
            (InstanceSource::LocalOnly, "local-only"),
        ] {
            assert_eq!(serde_json::to_value(source).unwrap(), name);
            assert_eq!(source.as_str(), name);
            assert_eq!(
                serde_json::from_value::<InstanceSource>(name.into()).unwrap(),
                source
            );
        }
        for (state, name) in [
            (NovaReportingState::Ok, "ok"),
            (NovaReportingState::Pending, "pending"),
            (NovaReportingState::Failed, "failed"),
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), name);
            assert_eq!(state.to_string(), name);
        }
        let instance = InstanceStatus::found("u", InstanceSource::MetadataService);
        assert_eq!(
            serde_json::to_string(&instance).unwrap(),
            r#"{"uuid":"u","source":"metadata-service","detail":null}"#
        );
    }

    /// The published shape of `volumes[]` (docs/contracts.md, "Volumes"; the VM test reads it).
    #[test]
    fn volumes_serialise_to_the_published_shape() {
        let hub = StateHub::new([]);
        assert!(!serde_json::to_string(&hub.snapshot())
            .unwrap()
            .contains("volumes"));
        hub.set_volumes(vec![
            VolumeStatus {
                device: "/dev/vdb".into(),
                volume_id: Some("0b7d2f7c-0a88-4c3f-9d59-3f6e0a5b8c41".into()),
                name: Some("data".into()),
                state: VolumeState::Mounted,
                mount_point: Some("/media/volume/data".into()),
                reason: None,
                detail: String::new(),
            },
            VolumeStatus {
                device: "/dev/vdc".into(),
                volume_id: None,
                name: Some("vdc".into()),
                state: VolumeState::LeftAlone,
                mount_point: None,
                reason: Some("signature".into()),
                detail: "TYPE=LVM2_member".into(),
            },
        ]);
        let json = serde_json::to_value(hub.snapshot()).unwrap();
        assert_eq!(
            json["volumes"],
            serde_json::json!([
                {"device": "/dev/vdb", "volume_id": "0b7d2f7c-0a88-4c3f-9d59-3f6e0a5b8c41",
                 "name": "data", "state": "mounted", "mount_point": "/media/volume/data",
                 "detail": ""},
                {"device": "/dev/vdc", "volume_id": null, "name": "vdc", "state": "left-alone",
                 "reason": "signature", "detail": "TYPE=LVM2_member"}
            ])
        );
        for (state, name) in [
            (VolumeState::Mounted, "mounted"),
            (VolumeState::LeftAlone, "left-alone"),
            (VolumeState::Waiting, "waiting"),
            (VolumeState::Failed, "failed"),
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), name);
            assert_eq!(state.as_str(), name);
        }
        // The setup state does not depend on volumes.
        assert_eq!(hub.snapshot().setup.state, SetupState::Starting);
    }
}
