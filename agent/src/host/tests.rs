use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::platform::os::Family;

fn os(id: &str, family: Family) -> Os {
    Os {
        id: id.into(),
        version_id: "12".into(),
        pretty_name: id.into(),
        family,
        supported: true,
    }
}

fn all_on() -> HostSettings {
    HostSettings {
        console_autologin: true,
        private_cloud_init_logs: true,
        default_user_group: true,
        base_packages: true,
        login_banner: true,
    }
}

/// A system root with exouser and the groups cloud-init's default user would have.
fn root_with_groups(groups: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(
        root.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/bash\nexouser:x:1001:1001::/home/exouser:/bin/bash\n",
    )
    .unwrap();
    std::fs::write(root.path().join("etc/group"), groups).unwrap();
    std::fs::create_dir_all(root.path().join("var/log")).unwrap();
    root
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn the_autologin_dropin_is_exospheres_file_for_the_user() {
    // Exosphere's ansible/roles/console-setup/files/autologin.conf, byte for byte, as the
    // file on disk holds it (two backslashes: systemd turns them into agetty's one).
    assert_eq!(
        autologin_dropin("exouser"),
        "[Service]\nExecStart=\nExecStart=-/sbin/agetty -o '-p -f -- \\\\u' --noclear --autologin exouser %I $TERM\n"
    );
    assert!(autologin_dropin("exouser").contains(r"-- \\u'"));
}

#[test]
fn base_packages_follow_the_family_and_the_switch() {
    let on = all_on();
    assert_eq!(
        base_packages(&on, &os("debian", Family::Debian)),
        ["cron", "gnupg", "haveged", "python3-venv", "zip"]
    );
    assert_eq!(
        base_packages(&on, &os("rocky", Family::RedHat)),
        ["cronie", "gnupg2", "zip"]
    );
    assert!(base_packages(&HostSettings::default(), &os("debian", Family::Debian)).is_empty());
}

#[test]
fn default_user_groups_are_exospheres() {
    for (id, group) in [
        ("debian", "debian"),
        ("ubuntu", "ubuntu"),
        ("rocky", "rocky"),
        ("almalinux", "almalinux"),
    ] {
        assert_eq!(default_user_group(&os(id, Family::Debian)), Some(group));
    }
    assert_eq!(default_user_group(&os("gentoo", Family::Debian)), None);
}

#[test]
fn who_output_tells_a_session_on_tty1() {
    assert!(sessions_on_tty1(
        "exouser  tty1         2026-12-05 21:00\nroot pts/0 2026-12-05 21:01 (10.0.0.1)\n"
    ));
    assert!(!sessions_on_tty1(
        "root     pts/0        2026-12-05 21:01 (10.0.0.1)\nx tty10 2026-12-05 21:02\n"
    ));
    assert!(!sessions_on_tty1(""));
}

/// The real `usermod --root` changes a prepared tree; the files are checked afterwards.
#[tokio::test]
async fn every_touch_changes_the_tree_once_and_then_nothing() {
    let root = root_with_groups("root:x:0:\ndebian:x:1000:\nexouser:x:1001:\n");
    let log = root.path().join(CLOUD_INIT_LOGS[0]);
    let output = root.path().join(CLOUD_INIT_LOGS[1]);
    std::fs::write(&log, "user data may be here\n").unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&output, "").unwrap();
    std::fs::set_permissions(&output, std::fs::Permissions::from_mode(0o644)).unwrap();
    let host = Host::new(root.path());
    let users = UserManager::new(root.path());
    let debian = os("debian", Family::Debian);

    let first = host.apply(&all_on(), &debian, "exouser", &users).await;
    let outcomes: Vec<_> = first
        .into_iter()
        .map(|(t, r)| (t, r.unwrap_or_else(|e| panic!("{t:?}: {e}"))))
        .collect();
    assert_eq!(
        outcomes,
        [
            (Touch::ConsoleAutologin, Outcome::Changed),
            (Touch::PrivateCloudInitLogs, Outcome::Changed),
            (Touch::DefaultUserGroup, Outcome::Changed),
        ]
    );
    assert_eq!(
        std::fs::read_to_string(root.path().join(AUTOLOGIN_DROPIN)).unwrap(),
        autologin_dropin("exouser")
    );
    assert_eq!(mode(&log), 0o640);
    assert_eq!(mode(&output), 0o640);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "user data may be here\n",
        "only the mode changes"
    );
    let unit = std::fs::read_to_string(root.path().join(CLOUD_INIT_LOGS_UNIT)).unwrap();
    assert!(
        unit.contains("ExecStart=-/bin/chmod u=rw,g=r,o= /var/log/cloud-init.log /var/log/cloud-init-output.log"),
        "{unit}"
    );
    assert!(unit.contains("\nAfter=cloud-init.service\n"), "{unit}");
    // cloud-init 24.3 and later (Debian 13) name the network stage cloud-init-network.service.
    assert!(
        unit.contains("\nAfter=cloud-init-network.service\n"),
        "{unit}"
    );
    assert!(
        unit.contains("\nPartOf=cloud-init-network.service\n"),
        "{unit}"
    );
    assert!(
        !unit.contains("cloud-final"),
        "an ordering cycle with multi-user.target: {unit}"
    );
    let groups = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(groups.contains("debian:x:1000:exouser"), "{groups}");

    let again = host.apply(&all_on(), &debian, "exouser", &users).await;
    assert!(
        again
            .iter()
            .all(|(_, r)| matches!(r, Ok(Outcome::Unchanged))),
        "{again:?}"
    );
}

#[tokio::test]
async fn a_missing_group_or_log_is_skipped_not_failed() {
    let root = root_with_groups("root:x:0:\nexouser:x:1001:\n");
    let host = Host::new(root.path());
    let users = UserManager::new(root.path());
    let settings = HostSettings {
        default_user_group: true,
        private_cloud_init_logs: true,
        ..HostSettings::default()
    };
    let done = host
        .apply(&settings, &os("debian", Family::Debian), "exouser", &users)
        .await;
    assert!(
        matches!(&done[1], (Touch::DefaultUserGroup, Ok(Outcome::Skipped(why))) if why.contains("'debian' does not exist")),
        "{done:?}"
    );
    // No logs yet: only the unit is written (it is what fixes them on later boots).
    assert!(matches!(
        &done[0],
        (Touch::PrivateCloudInitLogs, Ok(Outcome::Changed))
    ));
    assert!(!root.path().join(CLOUD_INIT_LOGS[0]).exists());
    assert!(
        !root.path().join(AUTOLOGIN_DROPIN).exists(),
        "autologin was not asked for"
    );
}

#[tokio::test]
async fn nothing_is_touched_when_nothing_is_asked() {
    let root = root_with_groups("root:x:0:\ndebian:x:1000:\n");
    let done = Host::new(root.path())
        .apply(
            &HostSettings::default(),
            &os("debian", Family::Debian),
            "exouser",
            &UserManager::new(root.path()),
        )
        .await;
    assert!(done.is_empty());
    assert!(!root.path().join("etc/systemd").exists());
}

/// A stand-in for the exoagent binary at `dir/name` that prints its arguments.
fn stub_exe(dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let exe = dir.join(name);
    std::fs::write(&exe, "#!/bin/sh\necho \"banner: $*\"\n").unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    exe
}

fn shell(args: &[&str]) -> (String, bool) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.success(),
    )
}

#[test]
fn the_debian_hook_is_an_executable_update_motd_script_that_runs_the_banner() {
    let root = tempfile::tempdir().unwrap();
    let host = Host::new(root.path());
    // A quote in the path must stay inside the shell word.
    let exe = stub_exe(&root.path().join("opt/it's here"), "exoagent");
    let debian = os("debian", Family::Debian);
    assert_eq!(
        host.login_banner(true, &debian, &exe).unwrap(),
        Outcome::Changed
    );
    let hook = root.path().join(MOTD_HOOK);
    assert_eq!(mode(&hook), 0o755);
    assert!(!root.path().join(PROFILE_HOOK).exists());
    let (out, ok) = shell(&[hook.to_str().unwrap()]);
    assert!(ok);
    assert_eq!(out, "banner: motd\n");
    assert_eq!(
        host.login_banner(true, &debian, &exe).unwrap(),
        Outcome::Unchanged,
        "{:?}",
        std::fs::read_to_string(&hook)
    );
    // Silenced the Debian way: left so.
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(
        host.login_banner(true, &debian, &exe).unwrap(),
        Outcome::Unchanged
    );
    assert_eq!(mode(&hook), 0o644);
    // Rewritten for a moved executable: still silenced.
    let moved = stub_exe(&root.path().join("usr/bin"), "exoagent");
    assert_eq!(
        host.login_banner(true, &debian, &moved).unwrap(),
        Outcome::Changed
    );
    assert_eq!(mode(&hook), 0o644);
    assert!(std::fs::read_to_string(&hook)
        .unwrap()
        .contains("usr/bin/exoagent"));
    // The binary gone (uninstalled): a login sees nothing, and no error.
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::remove_file(&moved).unwrap();
    let out = std::process::Command::new(&hook).output().unwrap();
    assert!(out.status.success());
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    // Turned off: removed.
    assert_eq!(
        host.login_banner(false, &debian, &exe).unwrap(),
        Outcome::Changed
    );
    assert!(!hook.exists());
    assert_eq!(
        host.login_banner(false, &debian, &exe).unwrap(),
        Outcome::Unchanged
    );
}

#[test]
fn the_el_hook_speaks_to_interactive_login_shells_only() {
    let root = tempfile::tempdir().unwrap();
    let host = Host::new(root.path());
    let exe = stub_exe(&root.path().join("usr/bin"), "exoagent");
    let rocky = os("rocky", Family::RedHat);
    assert_eq!(
        host.login_banner(true, &rocky, &exe).unwrap(),
        Outcome::Changed
    );
    let hook = root.path().join(PROFILE_HOOK);
    assert_eq!(mode(&hook), 0o644, "sourced, not run");
    assert!(!root.path().join(MOTD_HOOK).exists());
    let source = format!(". '{}'", hook.display());
    for (argv, shown) in [
        // Non-interactive (scp, rsync, `ssh host command`, scripts): nothing.
        (vec!["sh", "-c", &source], false),
        (vec!["bash", "--login", "--noprofile", "-c", &source], false),
        // Interactive but not a login (a new terminal; EL's bashrc sources profile.d): nothing.
        (vec!["sh", "-i", "-c", &source], false),
        (vec!["bash", "--norc", "-i", "-c", &source], false),
        // A login: bash knows; sh's login shells are named "-sh".
        (
            vec!["bash", "--login", "--noprofile", "-i", "-c", &source],
            true,
        ),
        (vec!["sh", "-i", "-c", &source, "-sh"], true),
    ] {
        let (out, ok) = shell(&argv);
        assert!(ok, "{argv:?}: the sourced hook must end with status 0");
        let expected = if shown { "banner: motd\n" } else { "" };
        assert_eq!(out, expected, "{argv:?}");
    }
}

#[test]
fn someone_elses_file_is_never_replaced_or_removed() {
    let root = tempfile::tempdir().unwrap();
    let host = Host::new(root.path());
    let exe = stub_exe(&root.path().join("usr/bin"), "exoagent");
    let hook = root.path().join(MOTD_HOOK);
    std::fs::create_dir_all(hook.parent().unwrap()).unwrap();
    std::fs::write(&hook, "#!/bin/sh\necho mine\n").unwrap();
    let debian = os("ubuntu", Family::Debian);
    assert!(matches!(
        host.login_banner(true, &debian, &exe).unwrap(),
        Outcome::Skipped(why) if why.contains("is not exoagent's")
    ));
    assert_eq!(
        host.login_banner(false, &debian, &exe).unwrap(),
        Outcome::Unchanged
    );
    assert_eq!(
        std::fs::read_to_string(&hook).unwrap(),
        "#!/bin/sh\necho mine\n"
    );
    // A path a script cannot hold safely is refused, not written.
    let odd = root.path().join("usr/bin/exo\nagent");
    std::fs::remove_file(&hook).unwrap();
    assert!(matches!(
        host.login_banner(true, &debian, &odd).unwrap(),
        Outcome::Skipped(_)
    ));
    assert!(!hook.exists());
}

#[test]
fn the_banner_is_on_by_default_and_the_other_touches_off() {
    let d = HostSettings::default();
    assert!(d.login_banner);
    assert!(!(d.console_autologin || d.private_cloud_init_logs || d.default_user_group));
}
