//! The main job: validate everything, then provision (user, passphrase, one batched package
//! transaction, services concurrently), then supervise — while reporters publish every state
//! change. Services outlive the agent: stopping the agent leaves them running under their shims.

use std::path::Path;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::server::{bind_and_serve, ApiState};
use crate::cloud::discover::IdentitySource;
use crate::cloud::drive::{DriveFinder, DriveMount};
use crate::cloud::{discover_identity, ConfigDrive, Discovery, MetadataService};
use crate::fsutil;
use crate::host::{self, Stage};
use crate::model::ServiceKind;
use crate::paths::Paths;
use crate::platform::packages::{PackageInstaller, PackageItem};
use crate::platform::passphrase::Passphrase;
use crate::report::console::{ConsoleReporter, ConsoleSink};
use crate::report::load::LoadSampler;
use crate::report::notify::{run_status_notifier, SdNotify};
use crate::services::jupyterlab::link;
use crate::services::{Service, ServiceContext, ServiceError};
use crate::state::{
    InstanceStatus, Reason, ServiceState, ServiceUpdate, SetupPhase, SetupStep, StateHub,
};
use crate::supervise::{
    has_live_shim, jittered, retry_delay, stop_recorded, ServicePaths, ShimCommand, StandbyShim,
    Supervisor,
};

use super::plan::drive_identity;
use super::plan::packages_for;
use super::provision::{
    apply_host_touches, early_passphrase, exosphere_link, fetch_all, forget_previous_instance,
    groups_to_join, install_login_banner, install_packages, installed_early, installer,
    load_passphrase, metadata_service, nova_reporter, provision_account, provision_subids,
    provision_sudo, publish_passphrase, reserve_service_ports, set_password_once, Fetched,
};
use super::reload::{Carried, Controller, RequestSource};
use super::{plan, AgentError, AgentOptions, Mode, Plan};

/// The agent's background work: reporters, the status API's helpers, supervisors.
type Tasks = JoinSet<()>;

type SupervisorTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Run the main job until `cancel` fires, starting over each time a reload changes the
/// configuration (`reload.rs`). Services keep running afterwards.
pub async fn run(options: AgentOptions, cancel: CancellationToken) -> Result<(), AgentError> {
    if options.mode == Mode::System {
        require_root()?;
    }
    let mut carried = Carried::default();
    loop {
        match run_once(&options, &cancel, carried).await? {
            RunEnd::Stopped => return Ok(()),
            RunEnd::Reload(next) => {
                tracing::info!(target: "exoagent::agent", "starting over with the new configuration; unchanged services are adopted as they run");
                carried = *next;
            }
        }
    }
}

/// How one run ended.
enum RunEnd {
    /// Asked to stop.
    Stopped,
    /// A reload changed the configuration: start over with it.
    Reload(Box<Carried>),
}

/// One run of the main job, until `outer` fires (stop) or a reload asks to start over.
async fn run_once(
    options: &AgentOptions,
    outer: &CancellationToken,
    carried: Carried,
) -> Result<RunEnd, AgentError> {
    // Everything of this run stops with it; `outer` ends the agent.
    let cancel = outer.child_token();
    let carry = std::sync::Arc::new(std::sync::Mutex::new(None));
    // The config drive is looked for (and mounted) from the start, beside the configuration's
    // reading and validation and the services' side: only the identity side waits for it (the
    // plan's identity is read again once the drive is there, when the plan looked before).
    let drive = {
        let (system, paths) = (options.mode == Mode::System, options.paths.clone());
        tokio::spawn(async move { system && mount_config_drive(&paths).await })
    };
    // Validate fully before anything is created or changed; a stop asked for meanwhile is
    // answered at once, even if a read hangs.
    let Some(planned) = unless_cancelled(&cancel, plan_blocking(options)).await else {
        tracing::info!(target: "exoagent::agent", "stopped while reading the configuration");
        return Ok(RunEnd::Stopped);
    };
    let mut plan = planned?;
    tracing::info!(target: "exoagent::agent", os = %plan.os.pretty_name, services = plan.services.len(), "configuration valid");
    prepare_dirs(&plan.paths)?;

    let hub = StateHub::new(plan.services.iter().map(|s| (s.kind(), s.port(), s.url())));
    if let Some(reload) = carried.reload.clone() {
        hub.set_reload(reload);
    }
    hub.set_request(carried.request.clone());
    let mut tasks = Tasks::new();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);

    // The socket is bound before anything slow (the metadata service may take its time), so
    // systemd hears READY at once; it is root-only until the account is known. It is bound
    // before the console reporter starts: a second agent refused here must write no status
    // line, or Exosphere would show its state instead of the running agent's.
    let api_socket = plan.paths.api_socket();
    let api = bind_and_serve(
        ApiState {
            hub: hub.clone(),
            paths: plan.paths.clone(),
            reloads: Some(reload_tx),
        },
        &api_socket,
        None,
        cancel.clone(),
    )
    .await?;
    // The account (`useradd`: a process and its files' syncs) and the host touches it allows
    // (the default group's `usermod`, the longest step before a baked service can start), and
    // the batch's package query begin now, beside the local set-up that follows (the link
    // token's file, the reporters); not before the socket is bound, which keeps a second agent
    // from changing anything.
    // Services no longer configured (a reload removed them, or the files changed while the
    // agent was stopped) are stopped: the configuration is what runs.
    stop_unplanned(&plan).await;
    stop_changed(&plan, &carried.restart, carried.restart_fronts).await;
    let (request_tx, request_rx) = tokio::sync::oneshot::channel();
    tasks.spawn(
        Controller {
            paths: plan.paths.clone(),
            running: plan.settings.clone(),
            hub: hub.clone(),
            hangup: options.hangup.clone(),
            asks: reload_rx,
            restart: cancel.clone(),
            carry: carry.clone(),
        }
        .run(request_rx, cancel.clone()),
    );
    tasks.spawn(release_startup_pages(hub.clone(), cancel.clone()));
    let first_steps = FirstSteps::begin(plan.services_side(), &options.shim);
    // After the account's `useradd` has begun (it is the longest step before a service can
    // start): before any service binds (they start once the account exists), and before the
    // agent's own connections (the metadata service, below) take ephemeral ports.
    reserve_service_ports(&plan);
    let early = early_passphrase(&plan);
    // The services' side (account, host touches, fetches, batch, installs) needs neither the
    // instance's identity nor the passphrase until a service is configured: it runs beside the
    // identity lookup and waits for the passphrase there (a previous instance's state is
    // forgotten before the passphrase is handed over, so nothing reads it). It is a task of its
    // own, started before the local set-up below: that set-up's blocking steps (files, the
    // console) would otherwise hold it back on a small instance at boot.
    let (passphrase_tx, passphrase_rx) = tokio::sync::watch::channel(None);
    // The idle detector signs in to JupyterLab with the passphrase, and shelves through the
    // Nova client once the identity side has built it.
    let idle_passphrase = passphrase_rx.clone();
    let (shelver_tx, shelver_rx) = tokio::sync::watch::channel(None);
    // The metadata service's client (built after the start: a TLS set-up), for the fronts'
    // certificate.
    let (metadata_tx, metadata_rx) = tokio::sync::oneshot::channel();
    let mut services = JoinSet::new();
    services.spawn({
        let (plan, hub) = (plan.services_side(), hub.clone());
        let (shim, api_socket, cancel) = (options.shim.clone(), api_socket.clone(), cancel.clone());
        async move {
            let mut supervisors = Tasks::new();
            let setup = SetUp {
                plan: &plan,
                first_steps,
                hub: &hub,
                metadata: metadata_rx,
                shim: &shim,
                api_socket: &api_socket,
            };
            let started = setup.run(passphrase_rx, &mut supervisors, &cancel).await;
            (started, supervisors)
        }
    });
    let metadata = metadata_service(&plan);
    let _ = metadata_tx.send(metadata.clone());
    let link = exosphere_link(&plan);
    let token_line = link.as_ref().map(|(token, _)| link::token_line(token));
    let notify = start_local_reporters(&plan, &hub, token_line, &mut tasks, &cancel);
    if plan.settings.idle.enabled {
        let watch = crate::idle::Watch {
            settings: plan.settings.idle.clone(),
            // The machine's own kernel files, in the sandbox too: its services run on it (the
            // sandbox's stand-in root holds no /proc).
            reader: crate::idle::signals::HostReader::new(Path::new("/")),
            signs: plan.services.iter().flat_map(|s| s.activity()).collect(),
            passphrase: idle_passphrase,
            shelver: shelver_rx,
            wall: plan.mode == Mode::System,
            notice: Some(plan.paths.idle_notice_file()),
        };
        tasks.spawn(watch.run(hub.clone(), cancel.clone()));
    }
    if let Some(notify) = &notify {
        if let Err(e) = notify.ready() {
            tracing::debug!(target: "exoagent::agent", error = %e, "sd_notify READY failed");
        }
    }

    // On a first boot with no instance's state on disk (no passphrase, no instance marker: a
    // fresh image) the identity can make nothing forgotten, so the passphrase is stored and
    // handed to the services now rather than once the metadata service has answered.
    let early = match early {
        Some(passphrase) if !plan.paths.instance_id_file().exists() => {
            let loaded = load_passphrase(&plan, Some(passphrase));
            if let Ok(ready) = &loaded {
                passphrase_tx.send_replace(Some(ready.clone()));
            }
            EarlyPassphrase::Loaded(loaded)
        }
        made => EarlyPassphrase::Made(made),
    };
    // The identity side's background work (Nova reporter, UAP watch), joined at the stop.
    let mut identity_tasks = Tasks::new();
    let identity_side = async {
        // A stop asked for while a mount hangs is answered: the drive counts as absent.
        let mounted = tokio::select! {
            biased;
            () = cancel.cancelled() => false,
            done = drive => match done {
                Ok(mounted) => mounted,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => false,
            },
        };
        if mounted && plan.identity.is_none() {
            plan.identity = drive_identity(&plan.paths)?;
        }
        // On a fresh image's first boot nothing on the services' path waits for the identity:
        // its CPU and synced writes (the metadata calls, the Nova client's TLS set-up, the
        // instance marker, the banner, the publication) come once the services' processes
        // have started (at most SERVICES_FIRST), not beside the account and the spawn.
        if matches!(early, EarlyPassphrase::Loaded(_)) && plan.mode == Mode::System {
            services_started(&hub, SERVICES_FIRST).await;
        }
        let identity_source = resolve_identity(&mut plan, metadata.as_ref(), &hub).await?;
        forget_previous_instance(&plan)?;
        // The cloud's request: what the metadata held now, then polled (never with a config
        // drive, which cannot change).
        if identity_source == Some(IdentitySource::MetadataService) {
            let at_start = plan
                .identity
                .as_ref()
                .map(|i| i.meta.get(crate::config::request::REQUEST_KEY).cloned());
            let _ = request_tx.send(RequestSource {
                metadata: metadata
                    .clone()
                    .filter(|_| plan.settings.cloud.watch_request),
                at_start: at_start.filter(|_| plan.settings.cloud.watch_request),
            });
        } else {
            drop(request_tx);
        }
        if plan.settings.cloud.clouds_yaml.is_some() {
            // Exosphere shows the notebook link only with `exoCustomWorkflow`; one Exosphere set
            // (a workflow it launched) is never overwritten.
            let set_by_exosphere = plan
                .identity
                .as_ref()
                .is_some_and(|i| i.meta.contains_key(link::CUSTOM_WORKFLOW_KEY));
            let fixed = match (&link, set_by_exosphere) {
                (Some((_, value)), false) => Some(value.clone()),
                _ => None,
            };
            let (cloud, identity) = (plan.settings.cloud.clone(), plan.identity.clone());
            let shelves = plan.settings.idle.enabled
                && plan.settings.idle.action == crate::idle::IdleAction::Shelve;
            let (hub, cancel) = (hub.clone(), cancel.clone());
            // Reading the credential and building its TLS client (the system's root
            // certificates) is blocking work the services need not wait for: its own task.
            identity_tasks.spawn(async move {
                let building = hub.clone();
                let built = tokio::task::spawn_blocking(move || {
                    nova_reporter(&cloud, identity.as_ref(), &building)
                })
                .await;
                let reporter = match built {
                    Ok(Some(reporter)) => reporter,
                    Ok(None) => return,
                    // Only a panic ends a blocking task early: pass it on.
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                };
                if shelves {
                    shelver_tx.send_replace(Some(crate::idle::Shelver {
                        nova: reporter.nova().clone(),
                        server: reporter.server().to_owned(),
                    }));
                }
                let reporter = match fixed {
                    Some(value) => reporter.with_fixed_metadata(link::CUSTOM_WORKFLOW_KEY, value),
                    None => reporter,
                };
                reporter.run(hub, cancel).await;
            });
        }

        install_login_banner(&plan, &options.shim.exe);
        // The URLs a browser uses, for the banner and `exoagent status` (docs/configuration.md).
        if let (Some(host), Some(metadata)) = (&plan.settings.cloud.uap_hostname, &metadata) {
            identity_tasks.spawn(crate::cloud::uap::watch(
                metadata.clone(),
                host.clone(),
                hub.clone(),
                cancel.clone(),
            ));
        }
        let (loaded, handed) = match early {
            EarlyPassphrase::Loaded(loaded) => (loaded, true),
            EarlyPassphrase::Made(made) => (load_passphrase(&plan, made), false),
        };
        let published = match loaded {
            Ok((passphrase, fresh)) => {
                tracing::info!(target: "exoagent::agent", fresh, "passphrase ready");
                // A new passphrase has no hash yet: JupyterLab's is worked out when its
                // configuration is written (after its spawn on a first boot).
                if !handed {
                    passphrase_tx.send_replace(Some((passphrase.clone(), fresh)));
                }
                // The publication (a metadata-service call that may take its time) is off the
                // services' path: they start as soon as their own inputs exist. What is
                // *reported* keeps DESIGN §4.4's order: `running` only after the publication,
                // `complete` only after `running` (Supervising is set once both sides are
                // done).
                publish_passphrase(&plan, metadata.as_ref(), &passphrase, identity_source).await;
                hub.set_phase(SetupPhase::Provisioning);
                true
            }
            Err(reason) => {
                hub.fail_step(SetupStep::User, reason);
                // Closed without a value: services waiting for it fail their configuration.
                drop(passphrase_tx);
                false
            }
        };
        Ok::<_, AgentError>((identity_source, published))
    };
    let services = async {
        match services.join_next().await {
            Some(Ok((started, supervisors))) => started.map(|started| (started, supervisors)),
            Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: only the runtime's end does that.
            Some(Err(_)) | None => Ok((false, Tasks::new())),
        }
    };
    // An identity that cannot be read ends the run as before and aborts the services' task:
    // before any service is configured (that waits for the passphrase, made after it), except
    // on a fresh image's first boot, where the passphrase was handed over at once.
    let ((identity_source, published), (started, mut supervisors)) =
        tokio::try_join!(identity_side, services)?;
    // After the account exists (mounted volumes are given to it), whatever became of it.
    if let Some(watcher) = volume_watcher(&plan, metadata.as_ref(), identity_source) {
        tasks.spawn(watcher.watch(hub.clone(), cancel.clone()));
    }
    if published && started {
        hub.set_phase(SetupPhase::Supervising);
    }

    cancel.cancelled().await;
    let end = match carry.lock().ok().and_then(|mut slot| slot.take()) {
        Some(next) if !outer.is_cancelled() => RunEnd::Reload(Box::new(next)),
        _ => RunEnd::Stopped,
    };
    tracing::info!(target: "exoagent::agent", "stopping; services keep running");
    while tasks.join_next().await.is_some() {}
    while supervisors.join_next().await.is_some() {}
    while identity_tasks.join_next().await.is_some() {}
    if let Err(e) = api.await {
        tracing::debug!(target: "exoagent::agent", error = %e, "status API task ended abnormally");
    }
    remove_socket(&plan.paths.api_socket());
    Ok(end)
}

/// Stop the services (and TLS fronts) that run under a shim of ours but are not in `plan`.
async fn stop_unplanned(plan: &Plan) {
    let planned: Vec<ServiceKind> = plan.services.iter().map(|s| s.kind()).collect();
    for kind in ServiceKind::ALL {
        if planned.contains(&kind) {
            continue;
        }
        for (what, run_dir) in [
            ("service", plan.paths.service_run_dir(kind)),
            ("tls front", plan.paths.front_run_dir(kind)),
        ] {
            match stop_recorded(&run_dir, UNPLANNED_STOP_GRACE).await {
                Ok(true) => {
                    tracing::info!(target: "exoagent::agent", service = kind.as_str(), what, "stopped: no longer configured");
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(target: "exoagent::agent", service = kind.as_str(), what, error = %e, "could not stop what is no longer configured");
                }
            }
        }
    }
}

/// Stop the services in `restart` (and their fronts; every front with `fronts`) so this run
/// starts them with their new settings instead of adopting them.
async fn stop_changed(plan: &Plan, restart: &[ServiceKind], fronts: bool) {
    for kind in ServiceKind::ALL {
        let mut dirs = Vec::new();
        if restart.contains(&kind) {
            dirs.push(("service", plan.paths.service_run_dir(kind)));
        }
        if fronts || restart.contains(&kind) {
            dirs.push(("tls front", plan.paths.front_run_dir(kind)));
        }
        for (what, run_dir) in dirs {
            match stop_recorded(&run_dir, UNPLANNED_STOP_GRACE).await {
                Ok(true) => {
                    tracing::info!(target: "exoagent::agent", service = kind.as_str(), what, "stopped to start again with its new settings");
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(target: "exoagent::agent", service = kind.as_str(), what, error = %e, "could not stop for its new settings");
                }
            }
        }
    }
}

/// How long after the setup settles the start-up's pages are released.
const RELEASE_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Once the setup is complete or failed (and a moment more for its reports), release the
/// executable's pages only the start-up used from the agent's resident set
/// (`platform::resident`): the agent then idles on what its steady work touches.
async fn release_startup_pages(hub: StateHub, cancel: CancellationToken) {
    if !hub.settled(&cancel).await {
        return;
    }
    tokio::select! {
        () = cancel.cancelled() => return,
        () = tokio::time::sleep(RELEASE_AFTER) => {}
    }
    match tokio::task::spawn_blocking(crate::platform::resident::release_executable_pages).await {
        Ok(Ok(bytes)) => {
            tracing::debug!(target: "exoagent::agent", mapped_bytes = bytes, "start-up pages released from the resident set");
        }
        Ok(Err(e)) => {
            tracing::debug!(target: "exoagent::agent", error = %e, "start-up pages not released");
        }
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => {}
    }
}

/// How long a service no longer configured has between SIGTERM and SIGKILL.
const UNPLANNED_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The passphrase once the identity side has it (with whether it is new), `None` until then;
/// closed without one when it could not be had.
type PassphraseWatch = tokio::sync::watch::Receiver<Option<(Passphrase, bool)>>;

/// The passphrase made before the identity was known: already stored and handed to the
/// services (with whether it is new, or why it could not be), or still to be stored
/// ([`load_passphrase`]) once a previous instance's state is forgotten.
enum EarlyPassphrase {
    Loaded(Result<(Passphrase, bool), Reason>),
    Made(Option<Passphrase>),
}

/// The steps begun as soon as the agent holds its socket: the account services run as, then
/// the host touches that need it (the home, marked done when made: before any service is
/// installed; beside it the groups, whose ids are known before the join so that no service
/// process waits for it); beside them the batch's packages found installed
/// ([`installed_early`]: on a baked image all the batch does); and a standby shim for each
/// service, its process start beside the account's.
struct FirstSteps {
    account: tokio::sync::oneshot::Receiver<Result<crate::platform::users::Account, Reason>>,
    home_ready: tokio::sync::watch::Receiver<bool>,
    joining: JoiningGroups,
    touches: tokio::task::JoinHandle<()>,
    installed: tokio::task::JoinHandle<Option<std::collections::HashSet<String>>>,
    standby: Standby,
}

/// The shims started ahead of their services ([`ShimCommand::standby`]), each taken by its
/// service's first launch; those never taken exit when dropped.
type Standby = std::collections::HashMap<ServiceKind, StandbyShim>;

/// A standby shim for each service, unless a live shim is recorded for it (an agent started
/// again adopts or replaces what runs). One that cannot be started is not an error: the
/// service's launch starts its shim itself, and reports it if that fails too.
fn standby_shims(plan: &Plan, shim: &ShimCommand) -> Standby {
    let mut standby = Standby::new();
    for service in &plan.services {
        let kind = service.kind();
        if has_live_shim(&plan.paths.service_run_dir(kind)) {
            continue;
        }
        match shim.standby() {
            Ok(started) => {
                standby.insert(kind, started);
            }
            Err(e) => {
                tracing::debug!(target: "exoagent::agent", service = kind.as_str(), error = %e, "no standby shim");
            }
        }
    }
    standby
}

impl FirstSteps {
    fn begin(plan: Plan, shim: &ShimCommand) -> Self {
        let plan = std::sync::Arc::new(plan);
        let (account_tx, account) = tokio::sync::oneshot::channel();
        let (home_tx, home_ready) = tokio::sync::watch::channel(false);
        let (joining_tx, joining) = tokio::sync::watch::channel(None);
        let touches = tokio::spawn({
            let plan = plan.clone();
            async move {
                let account = provision_account(&plan).await;
                let exists = account.is_ok();
                let _ = account_tx.send(account);
                if !exists {
                    return;
                }
                // Read before the join starts: services started while `usermod` runs (≈ 0.5 s
                // on a small instance at boot) are given these groups themselves.
                joining_tx.send_replace(Some(groups_to_join(&plan)));
                // Side by side: the groups' `usermod` touches neither the home nor its files.
                tokio::join!(
                    async {
                        apply_host_touches(&plan, Stage::BeforeServices).await;
                        home_tx.send_replace(true);
                    },
                    apply_host_touches(&plan, Stage::WithAccount),
                );
            }
        });
        let standby = standby_shims(&plan, shim);
        let installed = tokio::spawn(async move { installed_early(&plan).await });
        Self {
            account,
            home_ready,
            joining,
            touches,
            installed,
            standby,
        }
    }
}

/// The ids of the groups the account is being added to, once they are known (`None` before).
type JoiningGroups = tokio::sync::watch::Receiver<Option<Vec<u32>>>;

/// The groups from `joining`, waited for; none when the account step ended without them.
async fn joining_groups(joining: &JoiningGroups) -> Vec<u32> {
    let mut joining = joining.clone();
    let known = joining.wait_for(Option::is_some).await;
    known
        .ok()
        .and_then(|groups| groups.clone())
        .unwrap_or_default()
}

/// Until `stage` is marked done (or its sender is gone: the task ended without it, and its
/// end is looked at where it is joined).
async fn stage_done(stage: &tokio::sync::watch::Receiver<bool>) {
    let mut stage = stage.clone();
    let _ = stage.wait_for(|done| *done).await;
}

/// The output of a task, a panic passed on; `None` when it was cancelled (the runtime's end).
async fn joined<T>(task: tokio::task::JoinHandle<T>) -> Option<T> {
    match task.await {
        Ok(done) => Some(done),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => None,
    }
}

/// The passphrase from `watch`, waited for; `None` when it could not be had.
async fn passphrase_from(watch: &PassphraseWatch) -> Option<(Passphrase, bool)> {
    let mut watch = watch.clone();
    let got = watch.wait_for(Option::is_some).await.ok()?;
    got.clone()
}

/// What the services' side of the set-up needs: the account, then beside each other its
/// password and the host touches, the batch, the fronts and every service installed, configured
/// (once the passphrase is there) and handed to its supervisor.
struct SetUp<'a> {
    plan: &'a Plan,
    /// The account, the host touches and the package query, begun early ([`FirstSteps`]).
    first_steps: FirstSteps,
    hub: &'a StateHub,
    /// The metadata service's client, once built (for the fronts' certificate).
    metadata: tokio::sync::oneshot::Receiver<Option<MetadataService>>,
    shim: &'a ShimCommand,
    api_socket: &'a Path,
}

impl SetUp<'_> {
    /// Run the services' side; `Ok(true)` when the services were started (their supervisors
    /// are in `tasks`), `Ok(false)` when a set-up step failed (reported on the hub).
    async fn run(
        self,
        passphrase: PassphraseWatch,
        tasks: &mut Tasks,
        cancel: &CancellationToken,
    ) -> Result<bool, AgentError> {
        let SetUp {
            plan,
            first_steps,
            hub,
            metadata,
            shim,
            api_socket,
        } = self;
        let FirstSteps {
            account,
            home_ready,
            joining,
            touches,
            installed,
            standby,
        } = first_steps;
        let account = match account.await {
            Ok(account) => account,
            // The task ended without an answer: a panic (passed on here), or the runtime's end.
            Err(_) => {
                joined(touches).await;
                let reason = Reason::new("account-unknown", "the account step ended early");
                hub.fail_step(SetupStep::User, reason);
                return Ok(false);
            }
        };
        let account = match account {
            Ok(account) => account,
            Err(reason) => {
                hub.fail_step(SetupStep::User, reason);
                return Ok(false);
            }
        };
        tracing::info!(target: "exoagent::agent", user = %account.name, "account ready");
        set_socket_group(api_socket, account.gid)?;
        let ctx = ServiceContext {
            paths: plan.paths.clone(),
            account,
            exe: shim.exe.clone(),
        };
        for service in &plan.services {
            service.configure_early(&ctx);
        }
        let home_after = home_ready.clone();
        // The password (chpasswd) and the sudo drop-in (its `visudo` check) are for logins
        // (SSH, Guacamole, RStudio's PAM); no service needs them to start, so they run beside
        // the services, and provisioning is over only with them.
        let password = async {
            // Both are CPU work (a yescrypt hash, a sudoers parse) that no service needs: begun
            // once the services' processes have started, not beside their start on a small
            // instance at boot.
            if plan.mode == Mode::System {
                services_started(hub, SERVICES_FIRST).await;
            }
            let password = async {
                match passphrase_from(&passphrase).await {
                    Some((passphrase, fresh)) => set_password_once(plan, &passphrase, fresh).await,
                    // The user step has failed already (the passphrase could not be had).
                    None => Ok(()),
                }
            };
            let (sudo, password, ()) =
                tokio::join!(provision_sudo(plan), password, provision_subids(plan));
            sudo.and(password)
        };
        let services = async {
            // Independent of each other, so side by side: the host touches a service's install
            // depends on (the user's home and its files) and the services' fetches (vendor
            // packages downloaded and verified before the batch: a service refused here keeps
            // its packages out of it). The groups are awaited only before a service starts.
            let ((), mut fetched, installed) = tokio::join!(
                stage_done(&home_ready),
                fetch_all(&plan.services, &ctx),
                joined(installed),
            );
            fetched.host_packages = host::base_packages(&plan.settings.host, &plan.os);
            if !install_packages(plan, hub, &fetched, installed.flatten()).await {
                for (service, e) in fetched.refused {
                    record_transition(
                        hub,
                        service.kind(),
                        ServiceState::Failed,
                        ServiceUpdate {
                            reason: Some(Reason::new(e.reason(), e.to_string())),
                            ..Default::default()
                        },
                    );
                }
                return false;
            }
            let metadata = metadata.await.ok().flatten();
            let fronts = Fronts {
                plan,
                ctx: &ctx,
                metadata: metadata.as_ref(),
                shim,
                hub,
            };
            fronts.start(tasks, cancel).await;
            start_services(
                plan,
                ctx.clone(),
                passphrase.clone(),
                joining,
                fetched,
                standby,
                shim,
                hub,
                tasks,
                cancel,
            )
            .await;
            true
        };
        // The touches no service needs (cloud-init's deferred files; a getty restart, a unit
        // enabled: systemd reloads) go beside the services' start, not before it.
        let beside = async {
            // After the home is the user's: deferred files go into it.
            stage_done(&home_after).await;
            apply_host_touches(plan, Stage::BesideServices).await;
        };
        let (password, started, (), _) = tokio::join!(password, services, beside, joined(touches));
        if let Err(reason) = password {
            hub.fail_step(SetupStep::User, reason);
            return Ok(false);
        }
        Ok(started)
    }
}

/// How long the logins' password and sudo steps let the services' start go first, at most.
const SERVICES_FIRST: std::time::Duration = std::time::Duration::from_secs(2);

/// Until every service's process has started, or the service has failed, been adopted or
/// become ready (at most `limit`: a slow install must not hold anything else back for long).
async fn services_started(hub: &StateHub, limit: std::time::Duration) {
    let mut snapshots = hub.subscribe();
    let started = snapshots.wait_for(|snapshot| {
        snapshot.services.iter().all(|service| match service.state {
            ServiceState::Pending | ServiceState::Installing => false,
            ServiceState::Starting => service.pid.is_some(),
            ServiceState::Ready | ServiceState::Degraded | ServiceState::Failed => true,
        })
    });
    let _ = tokio::time::timeout(limit, started).await;
}

/// The volume watcher, with `[volumes] automount = true` on a real instance only: the sandbox
/// never touches the host's disks. Names come from the metadata service, else the config drive.
fn volume_watcher(
    plan: &Plan,
    metadata: Option<&MetadataService>,
    source: Option<IdentitySource>,
) -> Option<crate::volumes::Watcher> {
    let settings = &plan.settings.volumes;
    if plan.mode != Mode::System || !settings.automount {
        return None;
    }
    let names = crate::volumes::NameSource {
        service: metadata.cloned(),
        file: (source == Some(IdentitySource::ConfigDrive)).then(|| {
            plan.paths
                .config_drive
                .join("openstack/latest/meta_data.json")
        }),
    };
    tracing::info!(target: "exoagent::agent", mount_root = %settings.mount_root.display(), "mounting attached volumes");
    let setup =
        crate::volumes::Setup::system(settings, &plan.paths, names, &plan.settings.instance.user);
    Some(crate::volumes::Watcher::new(setup))
}

/// `work`, unless `cancel` fires first (then `None`, and `work` is dropped).
async fn unless_cancelled<T>(
    cancel: &CancellationToken,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => None,
        done = work => Some(done),
    }
}

/// [`plan`] on a blocking thread. Reading files is blocking I/O; on the async side it would
/// keep the stop signal from being acted on until the read ends.
async fn plan_blocking(options: &AgentOptions) -> Result<Plan, AgentError> {
    let (mode, paths) = (options.mode.clone(), options.paths.clone());
    match tokio::task::spawn_blocking(move || plan(mode, paths)).await {
        Ok(planned) => planned,
        // Only a panic ends a blocking task early: pass it on.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// System mode changes users, packages and services: it needs root.
fn require_root() -> Result<(), AgentError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(AgentError::NotRoot)
    }
}

/// A config drive is a labelled block device nobody has mounted yet; read-only under /run, so
/// this changes nothing durable before validation. Without one, the metadata service is tried.
/// Whether the drive's documents are there now.
async fn mount_config_drive(paths: &Paths) -> bool {
    match DriveFinder::system()
        .ensure_mounted(&paths.config_drive)
        .await
    {
        Ok(found) => {
            tracing::info!(target: "exoagent::agent", drive = ?found, "config drive");
            found != DriveMount::NotFound
        }
        Err(e) => {
            tracing::warn!(target: "exoagent::agent", reason = e.reason(), error = %e, "config drive not mounted; the metadata service is tried instead");
            false
        }
    }
}

/// The state, runtime, notice and log directories.
fn prepare_dirs(paths: &Paths) -> Result<(), AgentError> {
    for dir in [
        &paths.state_dir,
        &paths.runtime_dir,
        &paths.notice_dir(),
        &paths.log_dir,
    ] {
        fsutil::ensure_dir(dir, 0o755).map_err(|source| AgentError::Io {
            path: dir.clone(),
            source,
        })?;
    }
    Ok(())
}

/// The console reporter and, under systemd, the status notifier; returns the notifier so the
/// caller can send READY once the API is up.
fn start_local_reporters(
    plan: &Plan,
    hub: &StateHub,
    token_line: Option<String>,
    tasks: &mut Tasks,
    cancel: &CancellationToken,
) -> Option<SdNotify> {
    let sink = match plan.mode {
        Mode::System => {
            crate::report::console::enable_devkmsg(&plan.paths.system_root);
            ConsoleSink::Devices(plan.settings.console.devices.clone())
        }
        Mode::Sandbox => ConsoleSink::Stdout,
    };
    let reporter = ConsoleReporter::new(
        sink,
        &plan.settings.console,
        LoadSampler::new(&plan.paths.system_root),
    )
    .with_token_line(token_line);
    tasks.spawn(reporter.run(hub.subscribe(), cancel.clone()));
    if plan.settings.alerts.enabled {
        tasks.spawn(crate::alerts::watch(
            plan.settings.alerts.clone(),
            crate::alerts::MEMINFO.into(),
            plan.paths.system_root.clone(),
            hub.clone(),
            cancel.clone(),
        ));
    }
    let notify = SdNotify::from_env();
    if let Some(notify) = notify.clone() {
        tasks.spawn(run_status_notifier(notify, hub.subscribe(), cancel.clone()));
    }
    notify
}

/// Which instance this is: the config drive read while planning, else discovery (config drive
/// again, then the metadata service), else local-only. Published to the hub and kept in the
/// plan; returns where it came from.
async fn resolve_identity(
    plan: &mut Plan,
    metadata: Option<&MetadataService>,
    hub: &StateHub,
) -> Result<Option<IdentitySource>, AgentError> {
    let discovery = match plan.identity.take() {
        Some(identity) => Discovery::Found(identity, IdentitySource::ConfigDrive),
        None => {
            discover_identity(
                &ConfigDrive::new(&plan.paths.config_drive),
                metadata,
                plan.settings.cloud.metadata_timeout,
            )
            .await?
        }
    };
    let (instance, source) = match discovery {
        Discovery::Found(identity, source) => {
            tracing::info!(target: "exoagent::agent", uuid = %identity.uuid, source = source.as_str(), "instance identity");
            let status = InstanceStatus::found(&identity.uuid, source.into());
            plan.identity = Some(identity);
            (status, Some(source))
        }
        Discovery::LocalOnly(why) => {
            tracing::info!(target: "exoagent::agent", "no instance identity, running local-only: {why}");
            (InstanceStatus::local_only(why), None)
        }
    };
    hub.set_instance(instance);
    Ok(source)
}

/// A service whose fetch was refused before the batch: the refusal, and the system packages
/// the batch left out for it (installed by its retries, with the files its fetch then offers;
/// `None` in the sandbox).
struct Held {
    refusal: ServiceError,
    packages: Option<(PackageInstaller, Vec<String>)>,
}

/// Install and configure every service concurrently, each in a task of `tasks` that goes on
/// to supervise it; returns once each has been installed and configured once (or failed to
/// be). Services refused by their fetch start failed and retry on the supervisor's schedule
/// (fetch, their own packages, install, configure).
#[allow(clippy::too_many_arguments)]
async fn start_services(
    plan: &Plan,
    ctx: ServiceContext,
    passphrase: PassphraseWatch,
    joining: JoiningGroups,
    fetched: Fetched,
    mut standby: Standby,
    shim: &ShimCommand,
    hub: &StateHub,
    tasks: &mut Tasks,
    cancel: &CancellationToken,
) {
    let mut first_attempts = Vec::new();
    let ready = fetched.ready.into_iter().map(|s| (s, None));
    let refused = fetched.refused.into_iter().map(|(service, refusal)| {
        let packages = (plan.mode == Mode::System).then(|| {
            (
                installer(plan),
                packages_for(std::slice::from_ref(&service), &plan.os),
            )
        });
        (service, Some(Held { refusal, packages }))
    });
    for (service, held) in ready.chain(refused) {
        let ctx = ctx.clone();
        let hub = hub.clone();
        let passphrase = passphrase.clone();
        let joining = joining.clone();
        let policy = plan.settings.supervise.clone();
        let shim = shim.clone();
        let cancel = cancel.clone();
        let standby = standby.remove(&service.kind());
        let (attempted, first_attempt) = tokio::sync::oneshot::channel::<()>();
        first_attempts.push(first_attempt);
        // One task from the install to the supervision: the service's process is started
        // straight after its configuration, with no hand-over to wait for a worker between.
        tasks.spawn(async move {
            let inputs = Inputs {
                passphrase,
                joining,
                standby,
            };
            let started = start_service(service, held, ctx, hub, inputs, policy, shim, cancel);
            let supervise = started.await;
            let _ = attempted.send(());
            if let Some(supervise) = supervise {
                supervise.await;
            }
        });
    }
    // Returns once every service has been installed and configured once (or failed to be).
    for first_attempt in first_attempts {
        let _ = first_attempt.await;
    }
}

/// What starting the TLS fronts needs.
struct Fronts<'a> {
    plan: &'a Plan,
    ctx: &'a ServiceContext,
    metadata: Option<&'a MetadataService>,
    shim: &'a ShimCommand,
    hub: &'a StateHub,
}

impl Fronts<'_> {
    /// With `[tls] enabled`: install the certificate (named also for the floating address the
    /// metadata service knows), then supervise a front on each web service's public port.
    /// Fronts start before their services (they answer 502 until the service is up), so the
    /// port is served from the first moment. A certificate that cannot be installed fails the
    /// `tls` step; the services still start on loopback.
    async fn start(self, tasks: &mut Tasks, cancel: &CancellationToken) {
        let Fronts {
            plan,
            ctx,
            metadata,
            shim,
            hub,
        } = self;
        let tls = &plan.settings.tls;
        let fronted: Vec<(ServiceKind, crate::model::Endpoint)> = plan
            .services
            .iter()
            .filter_map(|s| s.endpoint().front.map(|_| (s.kind(), s.endpoint())))
            .collect();
        if !tls.enabled || fronted.is_empty() {
            return;
        }
        let owner = ctx.run_as().map(|r| (r.uid, r.gid));
        let dir = plan.paths.tls_dir();
        let settings = tls.clone();
        // A front bound to one address is reached at it even when it is no interface's (a VIP).
        let mut bound: Vec<std::net::IpAddr> = fronted
            .iter()
            .filter_map(|(_, e)| e.front.map(|a| a.ip()))
            .filter(|ip| !ip.is_unspecified())
            .collect();
        // The floating address is on no interface; only the metadata service knows it.
        if let Some(metadata) = metadata {
            match tokio::time::timeout(FLOATING_LOOKUP, metadata.public_ipv4()).await {
                Ok(Ok(Some(floating))) => bound.push(floating),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::info!(target: "exoagent::agent", reason = e.reason(), "no floating address for the certificate: {e}")
                }
                Err(_) => {
                    tracing::info!(target: "exoagent::agent", "no floating address for the certificate: the metadata service did not answer in time")
                }
            }
        }
        let certificate = TlsCertificate {
            dir,
            settings,
            bound,
            owner,
        };
        let files = match certificate.prepare().await {
            Ok((installed, files)) => {
                hub.set_tls(tls_status(&installed));
                files
            }
            Err(e) => {
                tracing::error!(target: "exoagent::agent", reason = e.reason(), "{e}");
                hub.fail_step(SetupStep::Tls, Reason::new(e.reason(), e.to_string()));
                return;
            }
        };
        if tls.certificate == crate::config::CertChoice::Generated {
            tasks.spawn(certificate.keep_renewed(hub.clone(), cancel.clone()));
        }
        for (kind, endpoint) in fronted {
            let Some(public) = endpoint.front else {
                continue;
            };
            let run = crate::front::FrontRun {
                exe: &ctx.exe,
                public,
                backend: endpoint.listen,
                files: &files,
                settings: tls,
            };
            hub.expect_front(kind);
            let supervisor = Supervisor::new(
                kind,
                run.run_spec(plan.paths.tls_dir(), ctx.run_as()),
                run.probe(),
                crate::front::START_TIMEOUT,
                plan.settings.supervise.clone(),
                ServicePaths {
                    run_dir: plan.paths.front_run_dir(kind),
                    log_file: plan.paths.front_log(kind),
                },
                shim.clone(),
                hub.clone(),
            )
            .for_front();
            // The same installing → starting path as a service, so the state machine holds.
            if let Err(refused) =
                hub.front_transition(kind, ServiceState::Installing, ServiceUpdate::default())
            {
                tracing::warn!(target: "exoagent::agent", "front: {refused}");
            }
            let cancel = cancel.clone();
            tasks.spawn(async move {
                supervisor.run_retrying(cancel).await;
            });
        }
    }
}

/// How long the floating-address lookup for the certificate may take.
const FLOATING_LOOKUP: std::time::Duration = std::time::Duration::from_secs(5);

/// How often a running agent looks whether the generated certificate is due for renewal (the
/// fronts pick a renewed pair up from the files on their own).
const CERTIFICATE_CHECK: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// Where and for whom the fronts' certificate is kept.
struct TlsCertificate {
    dir: std::path::PathBuf,
    settings: crate::config::TlsSettings,
    bound: Vec<std::net::IpAddr>,
    owner: Option<(u32, u32)>,
}

impl TlsCertificate {
    /// Install (or keep, or renew) the certificate now; key generation and file writes are
    /// blocking work, done off the runtime.
    async fn prepare(
        &self,
    ) -> Result<
        (crate::front::cert::Installed, crate::front::TlsFiles),
        crate::front::cert::CertError,
    > {
        let (dir, settings, bound, owner) = (
            self.dir.clone(),
            self.settings.clone(),
            self.bound.clone(),
            self.owner,
        );
        let prepared = tokio::task::spawn_blocking(move || {
            crate::front::prepare(
                &dir,
                &settings,
                crate::front::cert::CertNames::local(&bound),
                owner,
                std::time::SystemTime::now(),
            )
        })
        .await;
        match prepared {
            Ok(done) => done,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Renew the generated certificate when it is due (or the addresses changed) while the
    /// agent runs for months; a failure is logged and tried again at the next check.
    async fn keep_renewed(self, hub: StateHub, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(CERTIFICATE_CHECK) => {}
            }
            match self.prepare().await {
                Ok((installed, _)) => hub.set_tls(tls_status(&installed)),
                Err(e) => {
                    tracing::warn!(target: "exoagent::agent", reason = e.reason(), "certificate renewal: {e}")
                }
            }
        }
    }
}

fn tls_status(installed: &crate::front::cert::Installed) -> crate::state::TlsStatus {
    crate::state::TlsStatus {
        fingerprint: installed.fingerprint.clone(),
        not_after: installed.not_after,
        generated: installed.generated,
    }
}

/// What a service's start waits for besides its own steps: the passphrase (for its
/// configuration) and the groups the account is joining (for its process).
struct Inputs {
    passphrase: PassphraseWatch,
    joining: JoiningGroups,
    /// A shim started ahead for the service's first launch.
    standby: Option<StandbyShim>,
}

/// Install and configure one service, then hand back its supervisor to run. A failed install
/// or configuration is retried inside the returned task on the supervisor's retry schedule, so a
/// fixed cause (space freed, a mirror back) recovers without an agent restart; a service whose
/// shim already runs the same spec is adopted even when its configuration cannot be rewritten.
#[allow(clippy::too_many_arguments)]
async fn start_service(
    service: Service,
    held: Option<Held>,
    ctx: ServiceContext,
    hub: StateHub,
    inputs: Inputs,
    policy: crate::config::SupervisePolicy,
    shim: ShimCommand,
    cancel: CancellationToken,
) -> Option<SupervisorTask> {
    let kind = service.kind();
    record_transition(
        &hub,
        kind,
        ServiceState::Installing,
        ServiceUpdate::default(),
    );
    let Inputs {
        passphrase,
        joining,
        standby,
    } = inputs;
    let (first, held_packages) = match held {
        Some(Held { refusal, packages }) => (Err(refusal), packages),
        None => (
            prepare_service(&service, &ctx, &passphrase, None).await,
            None,
        ),
    };
    // After the install: what it installed shapes the run spec (a workflow's environment).
    let supervisor = Supervisor::new(
        kind,
        service.run_spec(&ctx),
        service.probe(),
        service.start_timeout(),
        policy.clone(),
        ServicePaths {
            run_dir: ctx.paths.service_run_dir(kind),
            log_file: ctx.paths.service_log(kind),
        },
        shim,
        hub.clone(),
    );
    let mut supervisor = match standby {
        Some(standby) => supervisor.with_standby(standby),
        None => supervisor,
    };
    Some(Box::pin(async move {
        let mut prepared = first;
        let mut retries = 0u32;
        while let Err(e) = prepared {
            let reason = Reason::new(e.reason(), e.to_string());
            if supervisor.finds_running_service() {
                // Never abandon a healthy session to a transient error (DESIGN §8): the files it
                // runs from are still there, only rewriting them failed.
                tracing::warn!(target: "exoagent::agent", service = kind.as_str(), error = %e, "setup failed; adopting the running service");
                supervisor = supervisor.with_note(reason);
                break;
            }
            tracing::error!(target: "exoagent::agent", service = kind.as_str(), error = %e, "setup failed");
            record_transition(
                &hub,
                kind,
                ServiceState::Failed,
                ServiceUpdate {
                    reason: Some(reason),
                    ..Default::default()
                },
            );
            retries += 1;
            let delay = jittered(retry_delay(&policy, retries));
            tracing::info!(target: "exoagent::agent", service = kind.as_str(), delay_ms = delay.as_millis() as u64, "setup retry scheduled");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            record_transition(
                &hub,
                kind,
                ServiceState::Installing,
                ServiceUpdate::default(),
            );
            prepared = prepare_service(&service, &ctx, &passphrase, held_packages.as_ref()).await;
        }
        // A process's groups are fixed when it starts: it is given those being joined (known
        // as soon as the account is, long before this).
        let groups = tokio::select! {
            _ = cancel.cancelled() => return,
            groups = joining_groups(&joining) => groups,
        };
        supervisor
            .with_joining_groups(groups)
            .run_retrying(cancel)
            .await;
    }))
}

/// Install, then configure (both idempotent: only what changed is rewritten). A service the
/// batch left out (`held`: its fetch was refused) fetches first, then installs its own
/// packages and the verified files its fetch offers in one transaction of its own.
async fn prepare_service(
    service: &Service,
    ctx: &ServiceContext,
    passphrase: &PassphraseWatch,
    held: Option<&(PackageInstaller, Vec<String>)>,
) -> Result<(), ServiceError> {
    if let Some((installer, packages)) = held {
        let files = service.fetch(ctx).await?;
        let items: Vec<PackageItem> = packages
            .iter()
            .cloned()
            .map(PackageItem::Named)
            .chain(files.into_iter().map(PackageItem::Local))
            .collect();
        if !items.is_empty() {
            installer
                .install(&items)
                .await
                .map_err(|e| ServiceError::Refused {
                    service: service.kind(),
                    reason: e.reason(),
                    detail: e.to_string(),
                })?;
        }
    }
    service.install(ctx).await?;
    tracing::info!(target: "exoagent::agent", service = service.kind().as_str(), "installed");
    // Made (or read) once the instance is known, beside the install.
    let Some((passphrase, _)) = passphrase_from(passphrase).await else {
        return Err(ServiceError::Configure {
            service: service.kind(),
            detail: "no passphrase: the user step failed".into(),
        });
    };
    service.configure(ctx, &passphrase).await?;
    tracing::info!(target: "exoagent::agent", service = service.kind().as_str(), "configured");
    Ok(())
}

/// Move `kind` to `next`. A refused transition means the steps ran out of order (a bug, not a
/// runtime condition): the service keeps its state and the refusal is logged, never hidden.
fn record_transition(hub: &StateHub, kind: ServiceKind, next: ServiceState, update: ServiceUpdate) {
    if let Err(refused) = hub.transition(kind, next, update) {
        tracing::warn!(
            target: "exoagent::agent",
            service = refused.service,
            from = refused.from,
            to = refused.to,
            "service state transition refused"
        );
    }
}

/// Give the instance user's group access to the status socket once the account exists.
fn set_socket_group(socket: &Path, gid: u32) -> Result<(), AgentError> {
    nix::unistd::chown(socket, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(|errno| {
        AgentError::Io {
            path: socket.to_path_buf(),
            source: std::io::Error::from(errno),
        }
    })
}

/// The socket is gone with the agent; a stale one would only mislead `exoagent status`.
fn remove_socket(socket: &Path) {
    if let Err(e) = std::fs::remove_file(socket) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::debug!(target: "exoagent::agent", path = %socket.display(), error = %e, "cannot remove the status socket");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::fixtures;
    use crate::state::InstanceSource;

    fn options(paths: Paths) -> AgentOptions {
        AgentOptions {
            mode: Mode::Sandbox,
            paths,
            shim: ShimCommand {
                exe: "/nonexistent/exoagent".into(),
            },
            hangup: std::sync::Arc::new(tokio::sync::Notify::new()),
        }
    }

    #[tokio::test]
    async fn the_logins_wait_for_every_service_process_or_the_limit() {
        let hub = StateHub::new([(ServiceKind::JupyterLab, 8888, "http://x/".to_owned())]);
        let waiting = tokio::spawn({
            let hub = hub.clone();
            async move { services_started(&hub, std::time::Duration::from_secs(3600)).await }
        });
        // Installing, then starting without a process yet: still waiting.
        for state in [ServiceState::Installing, ServiceState::Starting] {
            hub.transition(ServiceKind::JupyterLab, state, ServiceUpdate::default())
                .unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            !waiting.is_finished(),
            "went on before the service's process started"
        );
        // Its process has started: the wait ends.
        hub.transition(
            ServiceKind::JupyterLab,
            ServiceState::Starting,
            ServiceUpdate {
                pid: Some(Some(4242)),
                ..Default::default()
            },
        )
        .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("still waiting once the process had started")
            .unwrap();

        // A service that never starts holds nothing back longer than the limit.
        let stuck = StateHub::new([(ServiceKind::JupyterLab, 8888, "http://x/".to_owned())]);
        let limit = std::time::Duration::from_millis(300);
        let began = std::time::Instant::now();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            services_started(&stuck, limit),
        )
        .await
        .expect("the limit did not end the wait");
        assert!(began.elapsed() >= limit);
    }

    /// The sandbox never touches the host's disks, whatever the configuration says.
    #[test]
    fn volumes_are_watched_only_on_an_instance_that_asks() {
        let (_dir, paths) = fixtures::sandbox();
        fixtures::write_config(&paths, "[volumes]\nautomount = true\n");
        let mut plan = plan(Mode::Sandbox, paths.clone()).unwrap();
        assert!(volume_watcher(&plan, None, None).is_none());
        plan.mode = Mode::System;
        assert!(volume_watcher(&plan, None, None).is_some());
        plan.settings.volumes.automount = false;
        assert!(volume_watcher(&plan, None, None).is_none());
    }

    #[tokio::test]
    async fn invalid_config_fails_before_anything_is_created() {
        let (_dir, paths) = fixtures::sandbox();
        fixtures::write_config(&paths, "[services.jupyterlab]\nprot = 8888\n");
        let result = run(options(paths.clone()), CancellationToken::new()).await;
        let error = result.unwrap_err();
        assert!(matches!(error, AgentError::Config(_)), "{error:?}");
        assert_eq!(error.exit_code(), 78);
        assert!(!paths.state_dir.exists());
        assert!(!paths.runtime_dir.exists());
    }

    #[tokio::test]
    async fn a_stop_before_planning_ends_the_run_and_creates_nothing() {
        let (_dir, paths) = fixtures::sandbox();
        fixtures::write_config_drive(&paths, fixtures::fixture_meta_data());
        let cancel = CancellationToken::new();
        cancel.cancel();
        run(options(paths.clone()), cancel).await.unwrap();
        assert!(!paths.state_dir.exists());
        assert!(!paths.api_socket().exists());
    }

    #[tokio::test]
    async fn a_stop_is_answered_while_a_read_blocks() {
        // A read that never returns by itself, like one on a hung mount: it ends only when the
        // sender is dropped after the assertion, so the runtime can shut down.
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let cancel = CancellationToken::new();
        let stopper = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            stopper.cancel();
        });
        let reading = tokio::task::spawn_blocking(move || blocked.recv().is_ok());
        // The bound only stops a hang; the answer itself comes as soon as the stop does.
        let answered = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            unless_cancelled(&cancel, reading),
        )
        .await;
        assert!(matches!(answered, Ok(None)), "{answered:?}");
        drop(release);
    }

    #[tokio::test]
    async fn empty_sandbox_runs_until_cancelled_and_removes_its_socket() {
        let (_dir, paths) = fixtures::sandbox();
        fixtures::write_config_drive(&paths, fixtures::fixture_meta_data());
        let cancel = CancellationToken::new();
        let agent = tokio::spawn(run(options(paths.clone()), cancel.clone()));
        // Provisioning is over once the passphrase exists and the instance is recorded.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !(paths.passphrase_file().exists() && paths.instance_id_file().exists()) {
            assert!(
                std::time::Instant::now() < deadline,
                "agent did not provision"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(paths.api_socket().exists());
        cancel.cancel();
        agent.await.unwrap().unwrap();
        assert!(!paths.api_socket().exists());
        assert_eq!(
            std::fs::read_to_string(paths.instance_id_file()).unwrap(),
            fixtures::FIXTURE_UUID
        );
    }

    #[tokio::test]
    async fn identity_from_the_planned_config_drive_is_published() {
        let (_dir, paths) = fixtures::sandbox();
        fixtures::write_config_drive(&paths, fixtures::fixture_meta_data());
        let mut plan = plan(Mode::Sandbox, paths).unwrap();
        let hub = StateHub::new([]);
        let source = resolve_identity(&mut plan, None, &hub).await.unwrap();
        assert_eq!(source, Some(IdentitySource::ConfigDrive));
        assert_eq!(plan.identity.as_ref().unwrap().uuid, fixtures::FIXTURE_UUID);
        let instance = hub.snapshot().instance.unwrap();
        assert_eq!(instance.uuid.as_deref(), Some(fixtures::FIXTURE_UUID));
        assert_eq!(instance.source, InstanceSource::ConfigDrive);
    }

    #[tokio::test]
    async fn no_identity_runs_local_only() {
        let (_dir, paths) = fixtures::sandbox();
        let mut plan = plan(Mode::Sandbox, paths).unwrap();
        let hub = StateHub::new([]);
        let source = resolve_identity(&mut plan, None, &hub).await.unwrap();
        assert_eq!(source, None);
        let instance = hub.snapshot().instance.unwrap();
        assert_eq!(instance.uuid, None);
        assert_eq!(instance.source, InstanceSource::LocalOnly);
    }

    #[test]
    fn a_refused_transition_keeps_the_state() {
        let hub = StateHub::new([(ServiceKind::JupyterLab, 8888, "http://x/".to_owned())]);
        record_transition(
            &hub,
            ServiceKind::JupyterLab,
            ServiceState::Ready,
            ServiceUpdate::default(),
        );
        assert_eq!(hub.snapshot().services[0].state, ServiceState::Pending);
        record_transition(
            &hub,
            ServiceKind::JupyterLab,
            ServiceState::Installing,
            ServiceUpdate::default(),
        );
        assert_eq!(hub.snapshot().services[0].state, ServiceState::Installing);
    }
}
