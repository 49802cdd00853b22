//! `[supervise]`: the restart, crash-loop, probe and log policy shared by all services.

use std::time::Duration;

/// `[supervise]`: the restart and probe policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisePolicy {
    /// First restart delay.
    pub backoff_initial: Duration,
    /// Restart delays double up to this cap.
    pub backoff_max: Duration,
    /// Consecutive failed runs (exits before `stable_after`) that end in `failed`.
    pub crash_loop_restarts: u32,
    /// A run that lasts this long resets the backoff and the crash-loop counter.
    pub stable_after: Duration,
    /// How often readiness is probed while a service is starting.
    pub readiness_interval: Duration,
    /// How often liveness is probed once ready (jittered by up to 10 %).
    pub liveness_interval: Duration,
    /// Consecutive liveness failures that turn `ready` into `degraded`.
    pub liveness_failures: u32,
    /// Size cap of each service log before it is rotated (one old copy kept).
    pub log_max_bytes: u64,
}

impl Default for SupervisePolicy {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            crash_loop_restarts: 5,
            stable_after: Duration::from_secs(60),
            readiness_interval: Duration::from_millis(250),
            liveness_interval: Duration::from_secs(10),
            liveness_failures: 3,
            log_max_bytes: 10 * 1024 * 1024,
        }
    }
}
