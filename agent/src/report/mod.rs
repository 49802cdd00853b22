//! Sinks for state changes: Exosphere console lines, load lines, systemd notifications.
