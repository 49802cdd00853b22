//! From the merged fragment to [`Settings`]: defaults for what no file set, and the checks that
//! involve more than one value (backoff bounds, unavailable services, shared ports), each
//! reported at the file and line that set the winning value.

use std::path::PathBuf;
use std::time::Duration;

use super::fragment::Fragment;
use super::{
    CloudSettings, ConsoleSettings, IdleAction, InstanceSettings, PackageSettings, ServiceSettings,
    Settings, SupervisePolicy,
};
use crate::model::ServiceKind;
use crate::schema::{value, Checker, ConfigError, ErrorKind, Located, Origin};
use crate::services;

/// Build the settings from the merged fragment of `files`, or report every cross-value problem.
pub(crate) fn settings(merged: &Fragment, files: &[PathBuf]) -> (Settings, Vec<ConfigError>) {
    let mut check = Checker::new(files);
    let defaults = Settings::default();

    let instance = InstanceSettings {
        user: value(&merged.instance.user).unwrap_or(defaults.instance.user),
        create_user: value(&merged.instance.create_user).unwrap_or(defaults.instance.create_user),
    };

    if let Some(user) = &merged.instance.user {
        if user.value == "root" {
            check.error(
                user.origin,
                "instance.user".to_owned(),
                ErrorKind::InvalidValue,
                "invalid value \"root\": the instance user gets the passphrase as its password \
                 and runs the services; use an unprivileged account such as \"exouser\""
                    .to_owned(),
            );
        }
    }

    let s = &merged.supervise;
    let d = SupervisePolicy::default();
    let ms = |v: &Option<Located<u64>>, dflt: Duration| {
        value(v).map(Duration::from_millis).unwrap_or(dflt)
    };
    let secs = |v: &Option<Located<u64>>, dflt: Duration| {
        value(v).map(Duration::from_secs).unwrap_or(dflt)
    };
    let supervise = SupervisePolicy {
        backoff_initial: ms(&s.backoff_initial_ms, d.backoff_initial),
        backoff_max: ms(&s.backoff_max_ms, d.backoff_max),
        crash_loop_restarts: value(&s.crash_loop_restarts).unwrap_or(d.crash_loop_restarts),
        stable_after: secs(&s.stable_after_s, d.stable_after),
        readiness_interval: ms(&s.readiness_interval_ms, d.readiness_interval),
        liveness_interval: secs(&s.liveness_interval_s, d.liveness_interval),
        liveness_failures: value(&s.liveness_failures).unwrap_or(d.liveness_failures),
        log_max_bytes: value(&s.log_max_bytes).unwrap_or(d.log_max_bytes),
    };
    if supervise.backoff_max < supervise.backoff_initial {
        let initial_ms = supervise.backoff_initial.as_millis();
        let max_ms = supervise.backoff_max.as_millis();
        // Report at the value a file set; prefer the maximum. Defaults alone never conflict.
        if let Some(max) = &s.backoff_max_ms {
            let initial_at = match &s.backoff_initial_ms {
                Some(l) => format!(" set at {}", check.at(l.origin)),
                None => " by default".to_owned(),
            };
            check.error(
                max.origin,
                "supervise.backoff_max_ms".to_owned(),
                ErrorKind::InvalidValue,
                format!(
                    "invalid value {max_ms}, expected at least backoff_initial_ms \
                     ({initial_ms}{initial_at})"
                ),
            );
        } else if let Some(initial) = &s.backoff_initial_ms {
            check.error(
                initial.origin,
                "supervise.backoff_initial_ms".to_owned(),
                ErrorKind::InvalidValue,
                format!(
                    "invalid value {initial_ms}, expected at most backoff_max_ms \
                     ({max_ms} by default)"
                ),
            );
        }
    }

    let c = &merged.console;
    let d = ConsoleSettings::default();
    let console = ConsoleSettings {
        devices: value(&c.devices).unwrap_or(d.devices),
        status_interval: secs(&c.status_interval_s, d.status_interval),
        load_interval: secs(&c.load_interval_s, d.load_interval),
    };

    let p = &merged.packages;
    let d = PackageSettings::default();
    let packages = PackageSettings {
        lock_timeout: secs(&p.lock_timeout_s, d.lock_timeout),
        attempts: value(&p.attempts).unwrap_or(d.attempts),
    };

    let c = &merged.cloud;
    let d = CloudSettings::default();
    let cloud = CloudSettings {
        metadata_url: value(&c.metadata_url),
        metadata_timeout: secs(&c.metadata_timeout_s, d.metadata_timeout),
        publish_password: value(&c.publish_password).unwrap_or(d.publish_password),
        clouds_yaml: value(&c.clouds_yaml),
        cloud_name: value(&c.cloud_name).unwrap_or(d.cloud_name),
        uap_hostname: value(&c.uap_hostname).unwrap_or(d.uap_hostname),
        watch_request: value(&c.watch_request).unwrap_or(d.watch_request),
        request_interval: secs(&c.request_interval_s, d.request_interval),
    };

    let host = merged.host.settings();

    let tls = merged
        .tls
        .settings(&mut check, std::time::SystemTime::now());
    let volumes = merged.volumes.settings();
    let alerts = merged.alerts.settings();
    let idle = merged.idle.settings();
    // Shelving acts through Nova: it needs the credential, and detection to act on.
    if let Some(action) = merged
        .idle
        .action
        .as_ref()
        .filter(|a| a.value == IdleAction::Shelve)
    {
        let problem = if !idle.enabled {
            Some("idle.action = \"shelve\" needs idle.enabled = true (nothing would be idle)")
        } else if cloud.clouds_yaml.is_none() {
            Some(
                "idle.action = \"shelve\" needs [cloud] clouds_yaml: the instance is shelved \
                 through that credential",
            )
        } else {
            None
        };
        if let Some(problem) = problem {
            check.error(
                action.origin,
                "idle.action".to_owned(),
                ErrorKind::Conflict,
                format!("invalid value \"shelve\": {problem}"),
            );
        }
    }

    // Enabled services, in report order, with where they were enabled and got their port.
    let mut enabled: Vec<(ServiceKind, u16, Origin)> = Vec::new();
    // Ports they occupy besides their own (guacd's), with where they were set.
    let mut occupied: Vec<(ServiceKind, services::OccupiedPort, Origin)> = Vec::new();
    let mut services = Vec::new();
    for kind in ServiceKind::ALL {
        let Some(frag) = merged.services.get(&kind) else {
            continue;
        };
        let Some(on) = frag.common.enabled.as_ref().filter(|l| l.value) else {
            continue;
        };
        let port = match &frag.common.port {
            Some(p) => p.clone(),
            None => Located {
                value: kind.default_port(),
                origin: on.origin,
            },
        };
        enabled.push((kind, port.value, port.origin));
        match &frag.own {
            Some(section) if services::implemented(kind) => {
                for extra in section.occupied_ports() {
                    // A default is charged to the line that enabled the service.
                    let at = extra.origin.unwrap_or(on.origin);
                    occupied.push((kind, extra, at));
                }
                services.push(section.settings(port, &mut check))
            }
            _ => check.error(
                on.origin,
                format!("services.{kind}.enabled"),
                ErrorKind::Unavailable,
                format!("service '{kind}' is not available in this version of exoagent"),
            ),
        }
    }
    ServiceSettings::link_all(&mut services);
    for (i, &(kind, port, origin)) in enabled.iter().enumerate() {
        if let Some(&(first, _, first_origin)) = enabled[..i].iter().find(|e| e.1 == port) {
            let first_at = check.at(first_origin);
            check.error(
                origin,
                format!("services.{kind}.port"),
                ErrorKind::Conflict,
                format!(
                    "port {port} is used by both services.{first} ({first_at}) and \
                     services.{kind}"
                ),
            );
        }
    }

    // A service's other local ports (guacd) must not be any enabled service's port either: the
    // two would fight over the socket, or guacd's client would reach the wrong server.
    for (kind, extra, at) in &occupied {
        if let Some(&(other, port, other_origin)) = enabled.iter().find(|e| e.1 == extra.port) {
            let other_at = check.at(other_origin);
            check.error(
                *at,
                format!("services.{kind}.{}", extra.key),
                ErrorKind::Conflict,
                format!(
                    "port {port} of services.{kind}.{} is also the port of services.{other} \
                     ({other_at})",
                    extra.key
                ),
            );
        }
    }

    // Behind the front, each web service listens on loopback at its port + 10000: that port
    // must exist and be no other use's.
    if tls.enabled {
        let tls_at = merged.tls.enabled_at();
        for &(kind, port, origin) in &enabled {
            if !services::serves_web(kind) {
                continue;
            }
            let at = tls_at.unwrap_or(origin);
            let Some(backend) = crate::front::settings::backend_port(port) else {
                check.error(
                    origin,
                    format!("services.{kind}.port"),
                    ErrorKind::OutOfRange,
                    format!(
                        "port {port} cannot sit behind the TLS front: the service would listen \
                         on port {port} + 10000, above 65535; choose a port below 55536 or set \
                         tls.enabled = false"
                    ),
                );
                continue;
            };
            let taken_by = enabled
                .iter()
                .find(|e| e.1 == backend)
                .map(|e| format!("services.{}", e.0))
                .or_else(|| {
                    occupied
                        .iter()
                        .find(|o| o.1.port == backend)
                        .map(|o| format!("services.{}.{}", o.0, o.1.key))
                });
            if let Some(other) = taken_by {
                check.error(
                    at,
                    format!("services.{kind}.port"),
                    ErrorKind::Conflict,
                    format!(
                        "behind the TLS front, services.{kind} listens on 127.0.0.1:{backend} \
                         (its port + 10000), which {other} also uses"
                    ),
                );
            }
        }
    }

    let settings = Settings {
        instance,
        services,
        supervise,
        console,
        packages,
        cloud,
        tls,
        host,
        volumes,
        alerts,
        idle,
    };
    (settings, check.finish())
}
