//! The system commands behind the decisions, as argv vectors (never a shell), each with a
//! timeout: probing (`blkid -p`, `wipefs --no-act`, `udevadm info`), `mkfs.ext4`, mounting
//! (`systemd-mount` when systemd is PID 1, else `mount`), ownership, unmounting, `rmdir`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::decide::Probe;

/// Probes and small tools.
const SHORT: Duration = Duration::from_secs(30);
/// Making a filesystem (lazy inode tables keep it short even on large volumes).
const MKFS: Duration = Duration::from_secs(600);
/// Mounting (a journal replay can take a while).
const MOUNT: Duration = Duration::from_secs(120);

/// Why a command on a volume failed.
#[derive(Debug, thiserror::Error)]
pub enum ActError {
    /// The program could not be started.
    #[error("failed to run '{command}': {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The error.
        source: std::io::Error,
    },
    /// It ran past its timeout and was killed.
    #[error("'{command}' did not finish within {}s", timeout.as_secs())]
    Timeout {
        /// The command line.
        command: String,
        /// The limit.
        timeout: Duration,
    },
    /// It exited unsuccessfully.
    #[error("'{command}' failed ({status}): {output}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The end of its output.
        output: String,
    },
    /// Its output was not what was expected.
    #[error("'{command}' printed something unexpected: {what}")]
    Output {
        /// The command line.
        command: String,
        /// What was wrong.
        what: String,
    },
    /// A filesystem operation on the mount point failed.
    #[error("failed to {what} '{path}': {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl ActError {
    /// Short stable reason (for logs; the status names the step that failed instead).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Spawn { .. } => "command-start",
            Self::Timeout { .. } => "command-timeout",
            Self::Failed { .. } => "command-failed",
            Self::Output { .. } => "command-output",
            Self::Io { .. } => "mount-point-io",
        }
    }
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    /// Its exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
}

fn shown(program: &str, args: &[String]) -> String {
    let mut text = program.to_owned();
    for arg in args {
        text.push(' ');
        text.push_str(&arg.escape_debug().to_string());
    }
    text
}

/// Run `program args…` with a timeout; the child is killed when the timeout passes.
/// `ok_codes` are the exit codes that count as success.
pub async fn run(
    program: &str,
    args: &[String],
    timeout: Duration,
    ok_codes: &[i32],
) -> Result<Output, ActError> {
    let command = shown(program, args);
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ActError::Spawn {
            command: command.clone(),
            source,
        })?;
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(source)) => return Err(ActError::Spawn { command, source }),
        Err(_) => return Err(ActError::Timeout { command, timeout }),
    };
    let code = output.status.code();
    if !code.is_some_and(|c| ok_codes.contains(&c)) {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let text = if stderr.trim().is_empty() {
            stdout
        } else {
            stderr
        };
        return Err(ActError::Failed {
            command,
            status: output.status.to_string(),
            // Tool output can echo on-disk text (a label): bounded and escaped for the logs.
            output: crate::model::truncate_chars(
                &crate::text::last_lines(&text, 3).join(" | "),
                300,
            )
            .escape_debug()
            .to_string(),
        });
    }
    Ok(Output {
        code,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
    })
}

/// `KEY=value` lines (blkid's and udevadm's export format) as pairs.
pub fn parse_export(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The signature types in `wipefs --no-act --json` output (empty output: none).
pub fn parse_wipefs(text: &str) -> Result<Vec<String>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let list = value
        .get("signatures")
        .and_then(|s| s.as_array())
        .ok_or("no \"signatures\" list")?;
    Ok(list
        .iter()
        // Every listed signature counts, named or not.
        .map(|s| {
            s.get("type")
                .and_then(|t| t.as_str())
                .unwrap_or("unknown")
                .to_owned()
        })
        .collect())
}

/// Probe `device` with both `blkid -p` (low-level superblock and partition-table probe, exit
/// status 2 = nothing found, 8 = contradicting signatures) and `wipefs --no-act`. Either failing is an error: a device whose
/// contents are unknown is never formatted.
pub async fn probe(device: &Path) -> Result<Probe, ActError> {
    let dev = device.display().to_string();
    let args = vec!["-p".into(), "-o".into(), "export".into(), dev.clone()];
    let blkid = run("blkid", &args, SHORT, &[0, 2, 8]).await?;
    let mut probe = Probe {
        ambivalent: blkid.code == Some(8),
        ..Probe::default()
    };
    if blkid.code == Some(0) {
        for (key, value) in parse_export(&blkid.stdout) {
            // DEVNAME names the device and PART_ENTRY_* its entry in its disk's table (an
            // empty partition has only those); any other key describes something found.
            if key != "DEVNAME" && !key.starts_with("PART_ENTRY_") {
                probe.blkid_found = true;
            }
            match key.as_str() {
                "TYPE" => probe.fs_type = Some(value),
                "USAGE" => probe.usage = Some(value),
                "LABEL" => probe.label = Some(value),
                "PTTYPE" => probe.pt_type = Some(value),
                _ => {}
            }
        }
    }
    let args = vec!["--no-act".into(), "--json".into(), dev];
    let wipefs = run("wipefs", &args, SHORT, &[0]).await?;
    probe.wipefs = parse_wipefs(&wipefs.stdout).map_err(|what| ActError::Output {
        command: shown("wipefs", &args),
        what,
    })?;
    Ok(probe)
}

/// The serial udev knows (`ID_SERIAL_SHORT`: SCSI and others sysfs has no `serial` for).
pub async fn udev_serial(device: &Path) -> Option<String> {
    let args = vec![
        "info".into(),
        "--query=property".into(),
        format!("--name={}", device.display()),
    ];
    let out = run("udevadm", &args, SHORT, &[0]).await.ok()?;
    parse_export(&out.stdout)
        .into_iter()
        .find(|(k, _)| k == "ID_SERIAL_SHORT")
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// Wait for udev to finish with queued events (best effort; absent without udevd).
pub async fn udev_settle() {
    let args = vec!["settle".into(), "--timeout=10".into()];
    if let Err(e) = run("udevadm", &args, Duration::from_secs(15), &[0]).await {
        tracing::debug!(target: "exoagent::volumes", error = %e, "udevadm settle");
    }
}

/// Exosphere's `mkfs.ext4`: label, the volume UUID as the filesystem UUID when known, 256-byte
/// inodes, no reserved blocks, no discard, lazy inode tables, 4 KiB blocks.
pub fn mkfs_args(device: &Path, label: &str, uuid: Option<&str>) -> Vec<String> {
    let mut args = vec!["-q".into(), "-L".into(), label.to_owned()];
    if let Some(uuid) = uuid {
        args.extend(["-U".into(), uuid.to_owned()]);
    }
    args.extend(
        [
            "-I",
            "256",
            "-m",
            "0",
            "-E",
            "nodiscard,lazy_itable_init=1",
            "-b",
            "4096",
        ]
        .map(str::to_owned),
    );
    args.push(device.display().to_string());
    args
}

/// Make an ext4 filesystem on a blank `device`.
pub async fn format(device: &Path, label: &str, uuid: Option<&str>) -> Result<(), ActError> {
    // No `-F`: mke2fs's own checks (it refuses a mounted device, and asks, with no one to
    // answer, before overwriting what it recognises) stay a second line of defence.
    run("mkfs.ext4", &mkfs_args(device, label, uuid), MKFS, &[0]).await?;
    Ok(())
}

/// How mounts are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mounter {
    /// `systemd-mount` (systemd is PID 1): the mount unit is bound to the device, so systemd
    /// unmounts it when the volume is detached.
    Systemd,
    /// `mount`/`umount` (no systemd: containers, tests).
    Plain,
}

impl Mounter {
    /// `Systemd` when systemd runs the machine (`/run/systemd/system` exists).
    pub fn detect(system_root: &Path) -> Self {
        if system_root.join("run/systemd/system").is_dir() {
            Self::Systemd
        } else {
            Self::Plain
        }
    }

    /// The mount command line for `device` at `mount_point`, the owner named in the options.
    pub fn mount_argv(
        self,
        device: &Path,
        mount_point: &Path,
        owner: &str,
    ) -> (String, Vec<String>) {
        let dev = device.display().to_string();
        let at = mount_point.display().to_string();
        match self {
            Self::Systemd => (
                "systemd-mount".into(),
                vec![
                    "--options".into(),
                    format!(
                        "user,exec,rw,auto,nofail,X-mount.owner={owner},X-mount.group={owner},\
                         x-systemd.device-timeout=1s"
                    ),
                    "--collect".into(),
                    dev,
                    at,
                ],
            ),
            Self::Plain => (
                "mount".into(),
                vec!["-o".into(), "rw,exec,nosuid,nodev".into(), dev, at],
            ),
        }
    }

    /// Mount and wait until the kernel shows the mount.
    pub async fn mount(
        self,
        device: &Path,
        mount_point: &Path,
        owner: &str,
        mountinfo: &Path,
    ) -> Result<(), ActError> {
        let (program, args) = self.mount_argv(device, mount_point, owner);
        run(&program, &args, MOUNT, &[0]).await?;
        // The kernel may show the mount a moment after the tool returns.
        for _ in 0..100 {
            let text = std::fs::read_to_string(mountinfo).unwrap_or_default();
            if super::discover::parse_mountinfo(&text)
                .iter()
                .any(|m| m.mount_point == mount_point)
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(ActError::Output {
            command: shown(&program, &args),
            what: "the mount did not appear within 10s".into(),
        })
    }

    /// Unmount `mount_point` lazily (its device is gone; nothing can be flushed anyway).
    pub async fn unmount(self, mount_point: &Path) -> Result<(), ActError> {
        let at = mount_point.display().to_string();
        if self == Self::Systemd {
            let args = vec!["--unmount".into(), at.clone()];
            if run("systemd-mount", &args, MOUNT, &[0]).await.is_ok() {
                return Ok(());
            }
        }
        run("umount", &["-l".into(), at], MOUNT, &[0]).await?;
        Ok(())
    }
}

/// Give the mounted filesystem's top directory to the instance user (uid, gid).
pub fn chown(mount_point: &Path, owner: (u32, u32)) -> Result<(), ActError> {
    std::os::unix::fs::chown(mount_point, Some(owner.0), Some(owner.1)).map_err(|source| {
        ActError::Io {
            what: "chown",
            path: mount_point.to_owned(),
            source,
        }
    })
}

/// Create a mount point (0755, parents too).
pub fn make_dir(path: &Path) -> Result<(), ActError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|source| ActError::Io {
            what: "create",
            path: path.to_owned(),
            source,
        })
}

/// Remove a mount point when it is an empty directory (never anything else).
pub fn remove_empty_dir(path: &Path) -> Result<(), ActError> {
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ActError::Io {
            what: "remove",
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_fail_with_their_reason_and_are_killed_at_the_timeout() {
        let started = std::time::Instant::now();
        let slow = run("sleep", &["5".into()], Duration::from_millis(200), &[0]).await;
        assert_eq!(slow.unwrap_err().reason(), "command-timeout");
        assert!(started.elapsed() < Duration::from_secs(2));
        let failed = run(
            "sh",
            &["-c".into(), "echo nope >&2; exit 3".into()],
            SHORT,
            &[0],
        )
        .await;
        let failed = failed.unwrap_err();
        assert_eq!(failed.reason(), "command-failed");
        assert!(failed.to_string().contains("nope"), "{failed}");
        let missing = run("/nonexistent/blkid", &[], SHORT, &[0]).await;
        assert_eq!(missing.unwrap_err().reason(), "command-start");
        let two = run("sh", &["-c".into(), "exit 2".into()], SHORT, &[0, 2]).await;
        assert_eq!(two.unwrap().code, Some(2));
    }

    #[test]
    fn export_and_wipefs_output_are_read() {
        let pairs = parse_export("DEVNAME=/dev/vdb\nTYPE=ext4\nLABEL=my data\nUSAGE=filesystem\n");
        assert!(pairs.contains(&("LABEL".into(), "my data".into())));
        assert_eq!(parse_wipefs(""), Ok(vec![]));
        let json = r#"{"signatures": [
            {"device":"loop0","offset":"0x218","type":"LVM2_member","uuid":"x","label":null},
            {"device":"loop0","offset":"0x1fe","type":"dos","uuid":null,"label":null}]}"#;
        assert_eq!(
            parse_wipefs(json),
            Ok(vec!["LVM2_member".to_owned(), "dos".to_owned()])
        );
        assert!(parse_wipefs("garbage").is_err());
    }

    #[test]
    fn mkfs_gets_exospheres_options_and_no_shell() {
        let args = mkfs_args(Path::new("/dev/vdb"), "data; rm -rf /", Some("0b7d-8c41"));
        assert_eq!(
            args.join(" "),
            "-q -L data; rm -rf / -U 0b7d-8c41 -I 256 -m 0 -E nodiscard,lazy_itable_init=1 \
             -b 4096 /dev/vdb"
        );
        assert_eq!(args[2], "data; rm -rf /");
        assert!(!mkfs_args(Path::new("/dev/vdb"), "vdb", None).contains(&"-U".to_owned()));
    }

    #[test]
    fn systemd_mounts_only_where_systemd_runs_the_machine() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(Mounter::detect(root.path()), Mounter::Plain);
        std::fs::create_dir_all(root.path().join("run/systemd/system")).unwrap();
        assert_eq!(Mounter::detect(root.path()), Mounter::Systemd);
    }

    #[test]
    fn systemd_mounts_carry_exospheres_options() {
        let (program, args) = Mounter::Systemd.mount_argv(
            Path::new("/dev/vdb"),
            Path::new("/media/volume/d"),
            "exouser",
        );
        assert_eq!(program, "systemd-mount");
        assert!(args[1].contains("X-mount.owner=exouser"), "{args:?}");
        assert_eq!(args[args.len() - 2..], ["/dev/vdb", "/media/volume/d"]);
        let (program, _) =
            Mounter::Plain.mount_argv(Path::new("/dev/vdb"), Path::new("/m"), "exouser");
        assert_eq!(program, "mount");
    }
}
