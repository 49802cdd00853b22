//! The exoagent binary. Minimal for now: `exoagent shim` runs the supervision shim (the full
//! clap command line replaces this dispatch later and keeps calling the shim the same way).

use std::process::ExitCode;

fn main() -> ExitCode {
    // The shim must run before any async runtime or thread exists.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new("shim")) {
        return exoagent::supervise::shim::main_from_stdin();
    }
    ExitCode::SUCCESS
}
