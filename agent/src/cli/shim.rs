//! `exoagent shim` (hidden): the per-service process shim, synchronous and small.

use std::process::ExitCode;

/// Run the shim with its spec on stdin.
pub fn run() -> ExitCode {
    crate::supervise::shim::main_from_stdin()
}
