//! cloud-init's progress through this boot, for the steps that must come after its config
//! stage: a package transaction (the stage writes apt's sources and proxy) and Guacamole's
//! readiness (the stage's `set-passwords` applies `ssh_pwauth` and restarts sshd).

use std::path::Path;
use std::time::{Duration, Instant};

/// cloud-init's status file, relative to the system root (on `/run`, so it describes this
/// boot).
pub const STATUS_FILE: &str = "run/cloud-init/status.json";

/// Longest wait for cloud-init's config stage before going ahead anyway (with a warning).
pub const CONFIG_STAGE_WAIT: Duration = Duration::from_secs(600);

/// Where cloud-init is in this boot, as far as the agent cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudConfigStage {
    /// No status file: cloud-init is not running this boot (or not installed).
    NotRunning,
    /// The config stage has not finished (or the file is being rewritten).
    Pending,
    /// The config stage has finished: apt's sources and proxy and sshd's settings are as the
    /// cloud wants them, and sshd has been restarted if they changed.
    Finished,
}

impl CloudConfigStage {
    /// Read from cloud-init's `status.json` (`v1."modules-config".finished`, a time once the
    /// stage has run; `null` before).
    pub fn read(path: &Path) -> Self {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::NotRunning,
            Err(_) => return Self::Pending,
        };
        let Ok(status) = serde_json::from_slice::<serde_json::Value>(&text) else {
            return Self::Pending;
        };
        match status.pointer("/v1/modules-config/finished") {
            Some(finished) if finished.is_number() => Self::Finished,
            _ => Self::Pending,
        }
    }
}

/// How a wait for the config stage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigStageWait {
    /// cloud-init is not running this boot: nothing to wait for.
    NotRunning,
    /// The stage had finished.
    Finished {
        /// How long the wait took.
        waited: Duration,
    },
    /// The stage had not finished after the longest wait: going ahead anyway.
    GaveUp {
        /// How long the wait took.
        waited: Duration,
    },
}

/// Wait (at most `longest`, reading `status` every 250 ms) while cloud-init runs and its config
/// stage has not finished. `before` names what waits, for the log lines ("installing
/// packages"); the wait is logged only when there is one.
pub async fn wait_for_config_stage(
    status: &Path,
    longest: Duration,
    before: &'static str,
) -> ConfigStageWait {
    let started = Instant::now();
    let mut said = false;
    loop {
        match CloudConfigStage::read(status) {
            CloudConfigStage::NotRunning => return ConfigStageWait::NotRunning,
            CloudConfigStage::Finished => {
                let waited = started.elapsed();
                if said {
                    tracing::info!(target: "exoagent::cloud_init", ?waited, "cloud-init's config stage finished; {before}");
                }
                return ConfigStageWait::Finished { waited };
            }
            CloudConfigStage::Pending => {}
        }
        let waited = started.elapsed();
        if waited >= longest {
            tracing::warn!(target: "exoagent::cloud_init", ?waited, "cloud-init's config stage has not finished; {before} without waiting longer");
            return ConfigStageWait::GaveUp { waited };
        }
        if !said {
            tracing::info!(target: "exoagent::cloud_init", "waiting for cloud-init's config stage before {before}");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(config_finished: Option<f64>) -> String {
        serde_json::json!({"v1": {
            "init": {"errors": [], "start": 1.0, "finished": 2.0},
            "modules-config": {"errors": [], "start": 3.0, "finished": config_finished},
            "stage": if config_finished.is_some() { serde_json::Value::Null } else { "modules-config".into() },
        }})
        .to_string()
    }

    #[tokio::test]
    async fn the_wait_ends_when_the_stage_has_finished_or_after_the_longest_wait() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("status.json");
        assert_eq!(
            wait_for_config_stage(&file, Duration::ZERO, "testing").await,
            ConfigStageWait::NotRunning
        );
        std::fs::write(&file, status(None)).unwrap();
        assert!(matches!(
            wait_for_config_stage(&file, Duration::from_millis(300), "testing").await,
            ConfigStageWait::GaveUp { waited } if waited >= Duration::from_millis(300)
        ));
        let waiting = tokio::spawn({
            let file = file.clone();
            async move { wait_for_config_stage(&file, Duration::from_secs(60), "testing").await }
        });
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!waiting.is_finished(), "the stage is still pending");
        std::fs::write(&file, status(Some(4.0))).unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(ended, ConfigStageWait::Finished { waited } if waited >= Duration::from_millis(500)),
            "{ended:?}"
        );
    }

    #[test]
    fn a_half_written_file_is_read_as_pending() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("status.json");
        std::fs::write(&file, "{\"v1\": {").unwrap();
        assert_eq!(CloudConfigStage::read(&file), CloudConfigStage::Pending);
        std::fs::write(&file, status(Some(4.0))).unwrap();
        assert_eq!(CloudConfigStage::read(&file), CloudConfigStage::Finished);
    }
}
