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

/// Exosphere's touches on; the home and the deferred files (which need root to give files
/// away) have tests of their own below.
fn all_on() -> HostSettings {
    HostSettings {
        console_autologin: true,
        private_cloud_init_logs: true,
        default_user_group: true,
        base_packages: true,
        login_banner: true,
        home_ownership: false,
        deferred_write_files: false,
    }
}

/// Both stages, as the agent makes them: the ones before the services, then the others.
trait ApplyAll {
    async fn apply_all(
        &self,
        settings: &HostSettings,
        os: &Os,
        user: &str,
        users: &UserManager,
        marker: &Path,
    ) -> Vec<(Touch, Result<Outcome, HostError>)>;
}

impl ApplyAll for Host {
    async fn apply_all(
        &self,
        settings: &HostSettings,
        os: &Os,
        user: &str,
        users: &UserManager,
        marker: &Path,
    ) -> Vec<(Touch, Result<Outcome, HostError>)> {
        let mut done = Vec::new();
        for stage in [
            Stage::BeforeServices,
            Stage::WithAccount,
            Stage::BesideServices,
        ] {
            done.extend(self.apply(stage, settings, os, user, users, marker).await);
        }
        done
    }
}

/// Where the touches record the cloud-init instance whose deferred files were written.
fn marker(root: &Path) -> PathBuf {
    root.join("var/lib/exoagent/deferred-write-files")
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
    let joining = host.groups_to_join(&all_on(), &debian, "exouser", &users);
    assert_eq!(
        joining.unwrap(),
        [1000],
        "the gid of 'debian', to be joined"
    );

    let first = host
        .apply_all(&all_on(), &debian, "exouser", &users, &marker(root.path()))
        .await;
    let outcomes: Vec<_> = first
        .into_iter()
        .map(|(t, r)| (t, r.unwrap_or_else(|e| panic!("{t:?}: {e}"))))
        .collect();
    assert_eq!(
        outcomes,
        [
            (Touch::DefaultUserGroup, Outcome::Changed),
            (Touch::ConsoleAutologin, Outcome::Changed),
            (Touch::PrivateCloudInitLogs, Outcome::Changed),
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

    let joining = host.groups_to_join(&all_on(), &debian, "exouser", &users);
    assert!(joining.unwrap().is_empty(), "already a member");
    let off = HostSettings {
        default_user_group: false,
        ..all_on()
    };
    let groups_file = root.path().join("etc/group");
    let before = std::fs::read_to_string(&groups_file).unwrap();
    std::fs::write(&groups_file, before.replace(":exouser\n", ":\n")).unwrap();
    assert_eq!(
        host.groups_to_join(&all_on(), &debian, "exouser", &users)
            .unwrap(),
        [1000]
    );
    assert!(
        host.groups_to_join(&off, &debian, "exouser", &users)
            .unwrap()
            .is_empty(),
        "not asked for"
    );
    std::fs::write(&groups_file, before).unwrap();

    let again = host
        .apply_all(&all_on(), &debian, "exouser", &users, &marker(root.path()))
        .await;
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
        home_ownership: false,
        ..HostSettings::default()
    };
    let done = host
        .apply_all(
            &settings,
            &os("debian", Family::Debian),
            "exouser",
            &users,
            &marker(root.path()),
        )
        .await;
    let joining = host.groups_to_join(&settings, &os("debian", Family::Debian), "exouser", &users);
    assert!(joining.unwrap().is_empty(), "no 'debian' group to join");
    assert!(
        matches!(&done[0], (Touch::DefaultUserGroup, Ok(Outcome::Skipped(why))) if why.contains("'debian' does not exist")),
        "{done:?}"
    );
    // No logs yet: only the unit is written (it is what fixes them on later boots).
    assert!(matches!(
        &done[1],
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
        .apply_all(
            &HostSettings {
                home_ownership: false,
                ..HostSettings::default()
            },
            &os("debian", Family::Debian),
            "exouser",
            &UserManager::new(root.path()),
            &marker(root.path()),
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

/// Run a script this test has just written. Another test's thread may fork while the file is
/// still open for writing, and its child holds that descriptor until it execs: executing the
/// file meanwhile fails with ETXTBSY (directly, or as `sh`'s exit 126), so that is retried.
fn run_written(args: &[&str]) -> std::process::Output {
    for _ in 0..50 {
        let run = std::process::Command::new(args[0])
            .args(&args[1..])
            .stdin(std::process::Stdio::null())
            .output();
        match run {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {}
            Ok(out) if out.status.code() == Some(126) => {}
            run => return run.unwrap(),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{args:?}: text file busy for a second");
}

fn shell(args: &[&str]) -> (String, bool) {
    let out = run_written(args);
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
    let out = run_written(&[hook.to_str().unwrap()]);
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

/// Whether the test can run: giving files away needs root. Outside CI a non-root run says so
/// and skips; CI runs as root.
fn can_chown(name: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{name}: needs root (chown), and CI runs as root"
    );
    eprintln!("skipped {name}: needs root (chown)");
    false
}

fn owner(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.uid(), m.gid())
}

/// Debian 11 after cloud-init 20.4's first stage with Exosphere's credential files: the home
/// made by write_files (root's, 0755, nothing from /etc/skel), `openrc.sh` written and left
/// root's (the chown to exouser failed there, which ended the module), `clouds.yaml` missing;
/// cloud-init without the deferred module; its merged cloud-config as cloud-init dumps it.
fn debian11_after_cloud_init(defer_module: bool) -> tempfile::TempDir {
    let root = root_with_groups("root:x:0:\nexouser:x:1001:\ndebian:x:1000:\n");
    let r = root.path();
    let config = r.join("usr/lib/python3/dist-packages/cloudinit/config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("cc_write_files.py"), "").unwrap();
    if defer_module {
        std::fs::write(config.join("cc_write_files_deferred.py"), "").unwrap();
    }
    std::fs::create_dir_all(r.join("etc/skel/.config/autostart")).unwrap();
    std::fs::write(r.join("etc/skel/.bashrc"), "# skel bashrc\n").unwrap();
    std::fs::write(r.join("etc/skel/.profile"), "# skel profile\n").unwrap();
    std::fs::set_permissions(
        r.join("etc/skel/.profile"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::symlink(".bashrc", r.join("etc/skel/.bash_aliases")).unwrap();
    std::fs::create_dir_all(r.join("home/exouser")).unwrap();
    std::fs::set_permissions(
        r.join("home/exouser"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(
        r.join("home/exouser/openrc.sh"),
        "export OS_AUTH_TYPE=v3applicationcredential\n",
    )
    .unwrap();
    std::fs::set_permissions(
        r.join("home/exouser/openrc.sh"),
        std::fs::Permissions::from_mode(0o400),
    )
    .unwrap();
    std::fs::create_dir_all(r.join("var/lib/cloud/instance")).unwrap();
    std::fs::create_dir_all(r.join("var/lib/cloud/data")).unwrap();
    std::fs::write(r.join(deferred::INSTANCE_ID), "iid-first\n").unwrap();
    std::fs::write(
        r.join(deferred::CLOUD_CONFIG),
        "#cloud-config\n# from 2 files\n# part-001\n# part-002\n\n---\n\
         package_update: true\n\
         write_files:\n\
         -   content: '{\"guac_enabled\":true,\"gui_enabled\":true}'\n\
         \x20   owner: root:root\n\
         \x20   path: /etc/exoagent/exosphere-choices.json\n\
         \x20   permissions: '0644'\n\
         -   content: 'export OS_AUTH_TYPE=v3applicationcredential\n\n\
         \x20       '\n\
         \x20   defer: true\n\
         \x20   owner: exouser:exouser\n\
         \x20   path: /home/exouser/openrc.sh\n\
         \x20   permissions: '0400'\n\
         -   content: |\n\
         \x20       clouds:\n\
         \x20         demo_RegionOne:\n\
         \x20           auth_type: v3applicationcredential\n\
         \x20   defer: true\n\
         \x20   owner: exouser:exouser\n\
         \x20   path: /home/exouser/.config/openstack/clouds.yaml\n\
         \x20   permissions: '0400'\n",
    )
    .unwrap();
    root
}

/// The home and the deferred files (both stages) on the Debian tree at `r`, for exouser.
async fn home_and_deferred(r: &Path) -> Vec<(Touch, Result<Outcome, HostError>)> {
    let settings = HostSettings {
        home_ownership: true,
        deferred_write_files: true,
        ..HostSettings::default()
    };
    Host::new(r)
        .apply_all(
            &settings,
            &os("debian", Family::Debian),
            "exouser",
            &UserManager::new(r),
            &marker(r),
        )
        .await
}

#[tokio::test]
async fn on_debian_11_the_home_is_given_back_and_the_deferred_files_are_written_once() {
    if !can_chown("deferred files") {
        return;
    }
    let root = debian11_after_cloud_init(false);
    let r = root.path();
    let home = r.join("home/exouser");
    std::fs::write(home.join(".bashrc"), "# the user's own\n").unwrap();

    let done = home_and_deferred(r).await;
    let outcomes: Vec<_> = done
        .into_iter()
        .map(|(t, r)| (t, r.unwrap_or_else(|e| panic!("{t:?}: {e}"))))
        .collect();
    assert_eq!(
        outcomes,
        [
            (Touch::HomeOwnership, Outcome::Changed),
            (Touch::DeferredWriteFiles, Outcome::Changed),
        ]
    );
    assert_eq!(owner(&home), (1001, 1001));
    assert_eq!(mode(&home), 0o755, "only the owner changes");
    // /etc/skel's entries the home lacked, the user's; what was there is kept.
    assert_eq!(
        std::fs::read_to_string(home.join(".bashrc")).unwrap(),
        "# the user's own\n"
    );
    assert_eq!(
        std::fs::read_to_string(home.join(".profile")).unwrap(),
        "# skel profile\n"
    );
    assert_eq!(mode(&home.join(".profile")), 0o600);
    assert_eq!(owner(&home.join(".profile")), (1001, 1001));
    assert!(home.join(".config/autostart").is_dir());
    assert_eq!(owner(&home.join(".config/autostart")), (1001, 1001));
    assert_eq!(
        std::fs::read_link(home.join(".bash_aliases")).unwrap(),
        Path::new(".bashrc")
    );
    assert_eq!(owner(&home.join(".bash_aliases")), (1001, 1001));
    // The credential files as a cloud-init with `defer` writes them.
    let openrc = home.join("openrc.sh");
    assert_eq!(
        std::fs::read_to_string(&openrc).unwrap(),
        "export OS_AUTH_TYPE=v3applicationcredential\n"
    );
    assert_eq!((owner(&openrc), mode(&openrc)), ((1001, 1001), 0o400));
    let clouds = home.join(".config/openstack/clouds.yaml");
    assert_eq!(
        std::fs::read_to_string(&clouds).unwrap(),
        "clouds:\n  demo_RegionOne:\n    auth_type: v3applicationcredential\n"
    );
    assert_eq!((owner(&clouds), mode(&clouds)), ((1001, 1001), 0o400));
    assert_eq!(owner(&home.join(".config/openstack")), (1001, 1001));
    assert_eq!(mode(&home.join(".config/openstack")), 0o755);
    // Not deferred: cloud-init wrote it; exoagent leaves it alone.
    assert!(!r.join("etc/exoagent/exosphere-choices.json").exists());
    assert_eq!(std::fs::read_to_string(marker(r)).unwrap(), "iid-first");

    // A researcher's edit survives the agent's restarts: once per cloud-init instance.
    std::fs::set_permissions(&clouds, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&clouds, "edited\n").unwrap();
    let again = home_and_deferred(r).await;
    assert!(
        again
            .iter()
            .all(|(_, r)| matches!(r, Ok(Outcome::Unchanged))),
        "{again:?}"
    );
    assert_eq!(std::fs::read_to_string(&clouds).unwrap(), "edited\n");
    // A new instance (an image made from this one) gets its own files.
    std::fs::write(r.join(deferred::INSTANCE_ID), "iid-second\n").unwrap();
    let next = home_and_deferred(r).await;
    assert!(
        matches!(next[1], (Touch::DeferredWriteFiles, Ok(Outcome::Changed))),
        "{next:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&clouds).unwrap().lines().next(),
        Some("clouds:")
    );
}

#[tokio::test]
async fn a_cloud_init_that_defers_is_left_to_do_it() {
    if !can_chown("cloud-init defers") {
        return;
    }
    let root = debian11_after_cloud_init(true);
    let r = root.path();
    let done = home_and_deferred(r).await;
    assert!(
        matches!(done[1], (Touch::DeferredWriteFiles, Ok(Outcome::Unchanged))),
        "{done:?}"
    );
    assert!(!r.join("home/exouser/.config/openstack").exists());
    assert_eq!(owner(&r.join("home/exouser/openrc.sh")), (0, 0));
    assert!(!marker(r).exists());
}

#[tokio::test]
async fn a_bad_entry_is_named_and_nothing_is_written() {
    if !can_chown("bad entry") {
        return;
    }
    let root = debian11_after_cloud_init(false);
    let r = root.path();
    let config = r.join(deferred::CLOUD_CONFIG);
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "permissions: '0400'",
        "permissions: 'rw'",
        2,
    );
    std::fs::write(&config, text).unwrap();
    let done = home_and_deferred(r).await;
    let (Touch::DeferredWriteFiles, Err(e)) = &done[1] else {
        panic!("{done:?}");
    };
    assert_eq!(e.reason(), "cloud-config-invalid");
    let shown = e.to_string();
    assert!(shown.contains("cloud-config.txt"), "{shown}");
    assert!(shown.contains("write_files[1].permissions"), "{shown}");
    assert!(shown.contains("\"rw\" is not an octal mode"), "{shown}");
    assert!(!r.join("home/exouser/.config/openstack").exists());
    assert!(!marker(r).exists(), "tried again at the next start");
}

#[tokio::test]
async fn links_the_user_made_are_not_followed_and_a_home_of_its_own_is_left_alone() {
    if !can_chown("links") {
        return;
    }
    let root = debian11_after_cloud_init(false);
    let r = root.path();
    let home = r.join("home/exouser");
    std::os::unix::fs::lchown(&home, Some(1001), Some(1001)).unwrap();
    std::os::unix::fs::symlink(r.join("etc"), home.join(".config")).unwrap();
    std::os::unix::fs::lchown(home.join(".config"), Some(1001), Some(1001)).unwrap();
    let done = home_and_deferred(r).await;
    assert!(
        matches!(done[0], (Touch::HomeOwnership, Ok(Outcome::Unchanged))),
        "{done:?}"
    );
    assert!(
        !home.join(".profile").exists(),
        "skel is copied only into a reclaimed home"
    );
    let (Touch::DeferredWriteFiles, Err(e)) = &done[1] else {
        panic!("{done:?}");
    };
    assert!(
        e.to_string()
            .contains("symbolic link that root did not make"),
        "{e}"
    );
    assert!(!r.join("etc/openstack").exists());
}

#[test]
fn deferred_entries_decode_as_cloud_init_does() {
    let entries = deferred::deferred_entries(
        Path::new("cloud-config.txt"),
        "write_files:\n\
         - {path: a/../b/c, defer: 'yes', encoding: b64, content: 'aGk=', owner: exouser, permissions: 384}\n\
         - {path: /d, defer: true, encoding: base64, content: aGk=, append: true}\n\
         - {path: /e, content: x}\n",
    )
    .unwrap();
    assert_eq!(
        entries,
        [
            deferred::Entry {
                path: "/b/c".into(),
                contents: b"hi".to_vec(),
                user: "exouser".into(),
                group: None,
                mode: 0o600,
                append: false,
            },
            deferred::Entry {
                path: "/d".into(),
                contents: b"hi".to_vec(),
                user: "root".into(),
                group: Some("root".into()),
                mode: 0o644,
                append: true,
            },
        ]
    );
    for (bad, named) in [
        ("write_files: {}\n", "write_files: expected a list"),
        ("write_files:\n- {defer: true}\n", "write_files[0].path"),
        (
            "write_files:\n- {path: /x, defer: maybe}\n",
            "write_files[0].defer",
        ),
        (
            "write_files:\n- {path: /x, defer: true, encoding: gzip, content: x}\n",
            "not supported",
        ),
        (
            "write_files:\n- {path: /x, defer: true, owner: ':g'}\n",
            "write_files[0].owner",
        ),
        (
            "write_files:\n- {path: /x, defer: true, permissions: '77777'}\n",
            "not a file mode",
        ),
        ("write_files:\n- {path: /, defer: true}\n", "no file name"),
        ("write_files: [\n", "not valid YAML"),
        (
            "write_files:\n- {path: /x, defer: true, content: !!binary aGk=}\n",
            "`!!binary` value is not supported",
        ),
    ] {
        let e = deferred::deferred_entries(Path::new("cc.txt"), bad).unwrap_err();
        assert!(e.to_string().contains(named), "{bad:?}: {e}");
    }
    assert!(
        deferred::deferred_entries(Path::new("cc.txt"), "#cloud-config\n")
            .unwrap()
            .is_empty()
    );
}

#[test]
fn what_a_service_needs_comes_before_the_services_the_systemd_reloads_beside() {
    assert_eq!(Touch::HomeOwnership.stage(), Stage::BeforeServices);
    assert_eq!(Touch::DefaultUserGroup.stage(), Stage::WithAccount);
    for touch in [
        Touch::DeferredWriteFiles,
        Touch::ConsoleAutologin,
        Touch::PrivateCloudInitLogs,
    ] {
        assert_eq!(touch.stage(), Stage::BesideServices, "{touch:?}");
    }
}
