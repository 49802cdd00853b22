//! Process lifecycle: spawn each service through a detached shim in its own process group,
//! capture capped logs, restart with capped backoff, detect crash loops, probe readiness, and
//! re-adopt running services after the agent restarts.
