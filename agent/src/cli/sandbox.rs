//! `exoagent sandbox [DIR]`: the whole agent under one directory, as the invoking user, with a
//! config-drive-shaped identity and JupyterLab on loopback — no root, no cloud.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use crate::agent::{AgentError, Mode};
use crate::config::{self, ConfigErrors};
use crate::fsutil;
use crate::paths::Paths;

/// The sandbox's built-in configuration, written once to `DIR/etc/exoagent/config.toml`.
pub const SANDBOX_CONFIG: &str = r#"# exoagent sandbox configuration (written once; edit freely).
# Services bind to loopback in the sandbox.
[services.jupyterlab]
enabled = true
bind = "127.0.0.1"
port = 8888
"#;

/// The sandbox's instance identity, shaped like a config drive's `meta_data.json` (product
/// data: the tests' config-drive fixture is their own copy).
pub const SANDBOX_META_DATA: &str = include_str!("sandbox_meta_data.json");

/// Arguments of `exoagent sandbox`.
#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// The sandbox directory (created if missing).
    #[arg(default_value = "exoagent-sandbox")]
    pub dir: PathBuf,
    /// Do not seed the fixture identity: the instance is then found as on a cloud, from
    /// DIR/config-drive or else the configured `[cloud] metadata_url`, or not at all.
    #[arg(long)]
    pub no_fixture_identity: bool,
}

/// Whether anything is at `path`, not following a symlink: a dangling or looping symlink is
/// something someone put there, not a place to write.
fn occupied(path: &Path) -> bool {
    match std::fs::symlink_metadata(path) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

/// Seed the sandbox directory (config, and unless told otherwise the fixture identity) without
/// overwriting or replacing anything, whatever it is.
pub fn seed(paths: &Paths, fixture_identity: bool) -> std::io::Result<()> {
    if let Some(parent) = paths.config_file.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if !occupied(&paths.config_file) {
        fsutil::write_atomic(&paths.config_file, SANDBOX_CONFIG.as_bytes(), 0o644, None)?;
    }
    let meta = paths.config_drive.join("openstack/latest/meta_data.json");
    if fixture_identity && !occupied(&meta) {
        if let Some(parent) = meta.parent() {
            std::fs::create_dir_all(parent)?;
        }
        fsutil::write_atomic(&meta, SANDBOX_META_DATA.as_bytes(), 0o644, None)?;
    }
    Ok(())
}

/// Check the configuration the sandbox would run with (the files there, and the built-in one
/// if there is no `config.toml`), without writing anything.
pub fn check(paths: &Paths) -> Result<(), ConfigErrors> {
    config::load_with_main_default(paths, Some(SANDBOX_CONFIG)).map(|_| ())
}

/// Validate, seed, explain, run: nothing is written before the configuration is valid.
pub async fn run(args: SandboxArgs) -> anyhow::Result<ExitCode> {
    let cancel = super::run::stop_on_signal()?;
    let root = crate::paths::absolute(&args.dir);
    let paths = Paths::sandbox(&root);
    let checking = tokio::task::spawn_blocking({
        let paths = paths.clone();
        move || check(&paths)
    });
    let checked = tokio::select! {
        biased;
        () = cancel.cancelled() => return Ok(ExitCode::SUCCESS),
        checked = checking => checked?,
    };
    if let Err(errors) = checked {
        let sink = super::run::sink(&Mode::Sandbox);
        return Ok(super::run::fail(&sink, &AgentError::Config(errors)));
    }
    seed(&paths, !args.no_fixture_identity)?;
    let dir = root.display();
    eprintln!("exoagent sandbox in {dir}");
    eprintln!("  config:      {}", paths.config_file.display());
    eprintln!(
        "  passphrase:  {} (0600)",
        paths.passphrase_file().display()
    );
    eprintln!("  status:      exoagent --sandbox-dir {dir} status");
    eprintln!("  logs:        exoagent --sandbox-dir {dir} logs jupyterlab");
    eprintln!("  stop all:    exoagent --sandbox-dir {dir} down   (Ctrl-C stops only the agent)");
    super::run::run_agent_until(Mode::Sandbox, paths, cancel).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::ConfigDrive;

    #[test]
    fn the_seeded_identity_reads_as_a_config_drive() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::sandbox(dir.path());
        seed(&paths, true).unwrap();
        let id = ConfigDrive::new(&paths.config_drive).identity().unwrap();
        assert_eq!(id.uuid, "6d8c2f0e-3b1a-4c55-9f0e-2a7d1c9b4e11");
        assert_eq!(id.name.as_deref(), Some("sandbox-instance"));
        assert!(paths.config_file.exists());
    }

    #[test]
    fn an_existing_config_file_is_never_replaced() {
        use std::os::unix::fs::symlink;
        for target in ["elsewhere.toml", "config.toml", "missing/x.toml"] {
            let dir = tempfile::tempdir().unwrap();
            let paths = Paths::sandbox(dir.path());
            std::fs::create_dir_all(paths.config_file.parent().unwrap()).unwrap();
            let elsewhere = paths.config_file.with_file_name("elsewhere.toml");
            std::fs::write(&elsewhere, "# mine\n").unwrap();
            // A symlink to a file, a looping one, a dangling one.
            symlink(target, &paths.config_file).unwrap();
            let _ = seed(&paths, true);
            let link = std::fs::read_link(&paths.config_file)
                .unwrap_or_else(|e| panic!("{target}: the symlink was replaced: {e}"));
            assert_eq!(link, Path::new(target));
            assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "# mine\n");
        }
    }

    #[test]
    fn a_config_that_cannot_be_read_fails_the_check() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::sandbox(dir.path());
        // Nothing there yet: the built-in configuration is what would run, and it is valid.
        check(&paths).unwrap();
        std::fs::create_dir_all(paths.config_file.parent().unwrap()).unwrap();
        symlink("config.toml", &paths.config_file).unwrap();
        let errors = check(&paths).unwrap_err();
        assert_eq!(errors.errors[0].file, paths.config_file);
        // Checking wrote nothing.
        assert!(!paths.config_drive.exists());
    }

    #[test]
    fn without_the_fixture_identity_no_drive_is_seeded() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::sandbox(dir.path());
        seed(&paths, false).unwrap();
        assert!(!paths.config_drive.exists());
    }
}
