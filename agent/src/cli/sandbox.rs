//! `exoagent sandbox [DIR]`: the whole agent under one directory, as the invoking user, with a
//! config-drive-shaped identity and JupyterLab on loopback — no root, no cloud.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::agent::Mode;
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

/// Seed the sandbox directory (config, and unless told otherwise the fixture identity) without
/// overwriting anything.
pub fn seed(paths: &Paths, fixture_identity: bool) -> std::io::Result<()> {
    if let Some(parent) = paths.config_file.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if !paths.config_file.exists() {
        fsutil::write_atomic(&paths.config_file, SANDBOX_CONFIG.as_bytes(), 0o644, None)?;
    }
    let meta = paths.config_drive.join("openstack/latest/meta_data.json");
    if fixture_identity && !meta.exists() {
        if let Some(parent) = meta.parent() {
            std::fs::create_dir_all(parent)?;
        }
        fsutil::write_atomic(&meta, SANDBOX_META_DATA.as_bytes(), 0o644, None)?;
    }
    Ok(())
}

/// Seed, explain, run.
pub async fn run(args: SandboxArgs) -> anyhow::Result<ExitCode> {
    let root = crate::paths::absolute(&args.dir);
    let paths = Paths::sandbox(&root);
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
    super::run::run_agent(Mode::Sandbox, paths).await
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
    fn without_the_fixture_identity_no_drive_is_seeded() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::sandbox(dir.path());
        seed(&paths, false).unwrap();
        assert!(!paths.config_drive.exists());
    }
}
