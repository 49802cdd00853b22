//! `exoagent guacamole-web`: the Guacamole web side as its own supervised process (run by the
//! guacamole service as the instance user): token API, client page and tunnel to guacd. It
//! reads its files and binds its port, leaves guacd (when it runs it) to a keeper process, then
//! confines itself (platform/confine.rs) before any thread starts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use super::web::{serve, WebState};
use super::web_config::WebConfig;
use crate::platform::confine;

/// Arguments of `exoagent guacamole-web`.
#[derive(Debug, Args)]
pub struct GuacamoleWebArgs {
    /// The web side's configuration (JSON, written by the agent).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Serve until SIGTERM or SIGINT. Exit 78 on a bad configuration (restarting cannot help), 71
/// when the port cannot be bound or the process cannot be confined, 70 without a runtime.
pub fn run(args: GuacamoleWebArgs) -> ExitCode {
    let loaded = WebConfig::load(&args.config).and_then(|c| c.password().map(|p| (c, p)));
    let (config, password) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("exoagent guacamole-web: {e} [{}]", e.reason());
            return ExitCode::from(78);
        }
    };
    let listener = match confine::bind_listener(config.listen) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "exoagent guacamole-web: failed to listen on {}: {e}",
                config.listen
            );
            return ExitCode::from(71);
        }
    };
    if let Some(argv) = config.guacd_command.clone() {
        if let Err(e) = start_guacd_keeper(argv, &listener) {
            eprintln!("exoagent guacamole-web: cannot start the process that runs guacd: {e}");
            return ExitCode::from(71);
        }
    }
    // Who this process runs as, read before the confinement forbids reading the password
    // database; completed HTTP uploads are renamed into place beneath that user's home only.
    let rename_beneath = super::rename::OwnUser::current()
        .map(|own| own.home)
        .filter(|home| home.is_dir())
        .into_iter()
        .collect();
    // The agent's notices (the idle warning the page shows), when their directory exists.
    let read_beneath = config
        .idle_notice
        .as_ref()
        .and_then(|file| file.parent())
        .filter(|dir| dir.is_dir())
        .map(|dir| dir.to_path_buf())
        .into_iter()
        .collect();
    let allowed = confine::Allowed {
        read_beneath,
        rename_beneath,
        connect_ports: vec![config.guacd.port()],
    };
    confine::confine_then_run("guacamole-web", &allowed, 2, || async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tracing::info!(listen = %config.listen, guacd = %config.guacd, "guacamole web side serving");
        let shutdown = crate::platform::signals::stop_requested()?;
        serve(listener, WebState::new(config, password), shutdown).await
    })
}

/// Fork the keeper: it runs guacd in the foreground and restarts it when it exits, outside the
/// confinement the web side is about to take (guacd reads its plugins, runs SFTP and connects to
/// any port it is given). It ends when the web side ends: it holds the read end of a pipe
/// whose only write end the web side keeps, and a parent-death signal cannot do that job here
/// (the confined web side may not signal a process outside its domain, even by dying). guacd
/// ends with the keeper (its own parent-death signal); the shim's stop signals the whole
/// process group. The keeper closes its copy of the web side's `listener`.
fn start_guacd_keeper(argv: Vec<String>, listener: &std::net::TcpListener) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let (alive_read, alive_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the process is still single-threaded (no runtime yet; `confine` checks this right
    // after), so the child may run ordinary code.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(alive_read);
            // Kept open for the web side's whole life; closed by the kernel when it ends.
            std::mem::forget(alive_write);
            Ok(())
        }
        nix::unistd::ForkResult::Child => {
            drop(alive_write);
            // The web side's listening socket is not the keeper's: held here, it would keep
            // the port taken after the web side ends, and a restarted web side could not bind
            // it. (The child leaves through `exit`, so the parent's copy is never closed twice.)
            let _ = nix::unistd::close(listener.as_raw_fd());
            std::thread::spawn(move || {
                let mut byte = [0u8; 1];
                // Blocks until the web side is gone (EOF) — or fails, which ends it too.
                let _ = nix::unistd::read(alive_read.as_raw_fd(), &mut byte);
                tracing::info!("the web side ended; guacd goes with it");
                std::process::exit(0);
            });
            keep_guacd(&argv);
            std::process::exit(0);
        }
    }
}

/// Run guacd and restart it when it exits (1 s, doubling to 30 s; reset after a minute up).
fn keep_guacd(argv: &[String]) {
    use std::os::unix::process::CommandExt;
    let Some((program, args)) = argv.split_first() else {
        return;
    };
    let mut delay = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let mut command = std::process::Command::new(program);
        command.args(args).stdin(std::process::Stdio::null());
        // SAFETY: only an async-signal-safe prctl between fork and exec.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        match command.spawn() {
            Ok(mut child) => {
                tracing::info!(command = %argv.join(" "), pid = child.id(), "guacd started");
                match child.wait() {
                    Ok(status) => tracing::warn!(%status, "guacd exited"),
                    Err(e) => tracing::warn!("waiting for guacd failed: {e}"),
                }
            }
            Err(e) => tracing::warn!(command = %argv.join(" "), "failed to start guacd: {e}"),
        }
        if started.elapsed() > Duration::from_secs(60) {
            delay = Duration::from_secs(1);
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
