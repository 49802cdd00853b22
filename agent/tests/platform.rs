//! The platform layer against real files and real tools: os-release fixtures, the shadow tools
//! on a temporary root, `chpasswd` on a throwaway account, `dpkg-query` on this machine, and apt.
//!
//! Doubles: the `apt-get` used for the lock/retry/batching tests is a script written by the test
//! (installing real packages in every run is slow and lock contention must be reproducible); one
//! test drives the real `apt-get` when `EXOAGENT_REAL_APT=1` (CI sets it).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use exoagent::config::settings::PackageSettings;
use exoagent::platform::os::{self, Family, PackageManager};
use exoagent::platform::packages::{InstallOutcome, PackageInstaller, PackageItem, PackageTools};
use exoagent::platform::passphrase::Passphrase;
use exoagent::platform::users::{UserManager, UserTools};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/os-release")
        .join(name)
}

/// A root directory holding only `etc/os-release` = the named fixture.
fn root_with(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("etc")).unwrap();
    std::fs::copy(fixture(name), dir.path().join("etc/os-release")).unwrap();
    dir
}

#[test]
fn supported_releases_are_detected_with_their_family() {
    for (name, family, version) in [
        ("ubuntu-20.04", Family::Debian, "20.04"),
        ("ubuntu-22.04", Family::Debian, "22.04"),
        ("ubuntu-24.04", Family::Debian, "24.04"),
        ("debian-11", Family::Debian, "11"),
        ("debian-12", Family::Debian, "12"),
        ("debian-13", Family::Debian, "13"),
        ("rocky-8", Family::RedHat, "8.10"),
        ("rocky-9", Family::RedHat, "9.4"),
        ("almalinux-8", Family::RedHat, "8.10"),
        ("almalinux-9", Family::RedHat, "9.4"),
    ] {
        let root = root_with(name);
        let found = os::detect(root.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(found.family, family, "{name}");
        assert_eq!(found.version_id, version, "{name}");
        assert!(found.supported);
        let manager = match family {
            Family::Debian => PackageManager::Apt,
            Family::RedHat => PackageManager::Dnf,
        };
        assert_eq!(found.family.package_manager(), manager);
    }
}

#[test]
fn unsupported_releases_are_refused_by_name() {
    for (name, pretty) in [
        ("ubuntu-18.04", "Ubuntu 18.04.6 LTS"),
        ("fedora-40", "Fedora Linux 40 (Cloud Edition)"),
    ] {
        let root = root_with(name);
        let err = os::detect(root.path()).unwrap_err();
        assert_eq!(err.reason(), "os-unsupported");
        let text = err.to_string();
        assert!(text.contains(pretty), "{text}");
        assert!(text.contains("etc/os-release"), "{text}");
        assert!(
            text.contains("Debian 11, 12, 13"),
            "lists what is supported: {text}"
        );
        // The sandbox still runs there.
        let lenient = os::detect_lenient(root.path()).unwrap();
        assert!(!lenient.supported);
        assert_eq!(lenient.pretty_name, pretty);
    }
    assert_eq!(
        os::detect_lenient(root_with("fedora-40").path())
            .unwrap()
            .family,
        Family::RedHat
    );
}

#[test]
fn usr_lib_os_release_is_the_fallback() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("usr/lib")).unwrap();
    std::fs::copy(fixture("debian-12"), dir.path().join("usr/lib/os-release")).unwrap();
    assert_eq!(os::detect(dir.path()).unwrap().id, "debian");
}

#[test]
fn this_machine_is_detected() {
    let found = os::detect_lenient(Path::new("/")).unwrap();
    assert_ne!(found.pretty_name, "unknown Linux");
}

/// A root for the shadow tools: the host's account files and login.defs, nothing else.
fn shadow_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("etc/sudoers.d")).unwrap();
    std::fs::create_dir_all(dir.path().join("home")).unwrap();
    for file in ["passwd", "group", "shadow", "gshadow", "login.defs"] {
        std::fs::copy(
            Path::new("/etc").join(file),
            dir.path().join("etc").join(file),
        )
        .unwrap();
    }
    dir
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Held by the tests that change the host's user database or check that it is unchanged, so
/// one's throwaway account never shows up in the other's "host untouched" check.
static HOST_USERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn the_instance_user_is_created_once_with_sudo() {
    if !is_root() {
        eprintln!("skipped: needs root for useradd --root");
        return;
    }
    let _host = HOST_USERS.lock().await;
    let host_passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let root = shadow_root();
    let users = UserManager::new(root.path());
    assert_eq!(users.lookup("exouser").unwrap(), None);
    let info = users.ensure_user("exouser", Family::Debian).await.unwrap();
    assert_eq!(info.shell, Path::new("/bin/bash"));
    assert_eq!(info.home, Path::new("/home/exouser"));
    assert!(root.path().join("home/exouser").is_dir(), "home created");

    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    assert_eq!(
        passwd.lines().filter(|l| l.starts_with("exouser:")).count(),
        1
    );
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    let sudo = group.lines().find(|l| l.starts_with("sudo:")).unwrap();
    assert!(
        sudo.split(':')
            .nth(3)
            .unwrap()
            .split(',')
            .any(|m| m == "exouser"),
        "{sudo}"
    );

    let sudoers = root.path().join("etc/sudoers.d/90-exoagent-exouser");
    let text = std::fs::read_to_string(&sudoers).unwrap();
    assert!(text.contains("exouser ALL=(ALL) NOPASSWD:ALL"));
    assert_eq!(
        std::fs::metadata(&sudoers).unwrap().permissions().mode() & 0o777,
        0o440
    );

    // Idempotent: nothing changes on a second run.
    let before: Vec<String> = ["etc/passwd", "etc/group", "etc/shadow"]
        .iter()
        .map(|f| std::fs::read_to_string(root.path().join(f)).unwrap())
        .collect();
    let again = users.ensure_user("exouser", Family::Debian).await.unwrap();
    assert_eq!(again, info);
    let after: Vec<String> = ["etc/passwd", "etc/group", "etc/shadow"]
        .iter()
        .map(|f| std::fs::read_to_string(root.path().join(f)).unwrap())
        .collect();
    assert_eq!(before, after);
    assert_eq!(
        std::fs::read_dir(root.path().join("etc/sudoers.d"))
            .unwrap()
            .count(),
        1
    );
    assert_eq!(
        std::fs::read_to_string("/etc/passwd").unwrap(),
        host_passwd,
        "host untouched"
    );

    let err = users
        .ensure_user("Bad Name", Family::Debian)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "user-invalid-name");
}

/// The account's line in `<root>/etc/<file>`.
fn subid_line(root: &Path, file: &str, name: &str) -> Option<String> {
    std::fs::read_to_string(root.join("etc").join(file))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .map(str::to_owned)
}

/// The account is created without subordinate ids (a third of useradd's synchronous writes,
/// while a service waits for it) and given them afterwards: the same ranges the real `useradd`
/// gives in an identical root, and nothing more on a second call.
#[tokio::test]
async fn subordinate_ids_come_after_the_account_and_match_useradds() {
    if !is_root() {
        eprintln!("skipped: needs root for useradd --root");
        return;
    }
    let _host = HOST_USERS.lock().await;
    // Taken ranges with a hole too small (165536..200000) before a large one.
    let taken = "debian:100000:65536\nother:200000:65536\n";
    let roots = [shadow_root(), shadow_root()];
    for root in &roots {
        for file in ["subuid", "subgid"] {
            std::fs::write(root.path().join("etc").join(file), taken).unwrap();
        }
    }
    let [by_useradd, by_agent] = &roots;
    let status = std::process::Command::new("useradd")
        .args(["--root", &by_useradd.path().display().to_string()])
        .args([
            "--create-home",
            "--shell",
            "/bin/bash",
            "--user-group",
            "exouser",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let expected: Vec<String> = ["subuid", "subgid"]
        .iter()
        .map(|f| subid_line(by_useradd.path(), f, "exouser").expect("useradd gave subordinate ids"))
        .collect();
    assert_eq!(expected[0], "exouser:265536:65536");

    let users = UserManager::new(by_agent.path());
    users.ensure_user("exouser", Family::Debian).await.unwrap();
    assert_eq!(subid_line(by_agent.path(), "subuid", "exouser"), None);
    assert_eq!(subid_line(by_agent.path(), "subgid", "exouser"), None);
    assert!(users.ensure_subordinate_ids("exouser").await.unwrap());
    let given: Vec<String> = ["subuid", "subgid"]
        .iter()
        .map(|f| subid_line(by_agent.path(), f, "exouser").unwrap())
        .collect();
    assert_eq!(given, expected);
    let files = |root: &Path| -> Vec<String> {
        ["etc/subuid", "etc/subgid", "etc/passwd"]
            .iter()
            .map(|f| std::fs::read_to_string(root.join(f)).unwrap())
            .collect()
    };
    let before = files(by_agent.path());
    assert!(!users.ensure_subordinate_ids("exouser").await.unwrap());
    assert_eq!(files(by_agent.path()), before);

    // A system account gets none, as from useradd.
    let status = std::process::Command::new("useradd")
        .args([
            "--root",
            &by_agent.path().display().to_string(),
            "--system",
            "svc",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(!users.ensure_subordinate_ids("svc").await.unwrap());
    assert_eq!(subid_line(by_agent.path(), "subuid", "svc"), None);
}

/// Debian 11's `useradd` (shadow 4.8.1) fails on `SUB_UID_COUNT=0` ("Can't get unique
/// subordinate UID range", exit 16) before writing anything, as its VM scenario showed; this
/// host's shadow is newer, so that answer comes from a wrapper around the real `useradd` (a
/// double of the old one's refusal only: the account itself is the real tool's). The account
/// is then made by a plain `useradd`, which gives the subordinate ids itself.
#[tokio::test]
async fn an_older_useradd_that_refuses_no_subordinate_ids_gives_them_itself() {
    if !is_root() {
        eprintln!("skipped: needs root for useradd --root");
        return;
    }
    let _host = HOST_USERS.lock().await;
    let root = shadow_root();
    for file in ["subuid", "subgid"] {
        std::fs::write(root.path().join("etc").join(file), "debian:100000:65536\n").unwrap();
    }
    let tools = tempfile::tempdir().unwrap();
    let old = tools.path().join("useradd");
    std::fs::write(
        &old,
        "#!/bin/sh\ncase \" $* \" in *SUB_UID_COUNT=0*) echo \"useradd: Can't get unique subordinate UID range\" >&2; echo \"useradd: can't create subordinate user IDs\" >&2; exit 16;; esac\nexec useradd \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    let users = UserManager::with_tools(
        root.path(),
        UserTools {
            useradd: old,
            ..UserTools::default()
        },
    );
    users.ensure_user("exouser", Family::Debian).await.unwrap();
    assert_eq!(
        subid_line(root.path(), "subuid", "exouser").as_deref(),
        Some("exouser:165536:65536")
    );
    assert!(subid_line(root.path(), "subgid", "exouser").is_some());
    assert!(!users.ensure_subordinate_ids("exouser").await.unwrap());
}

#[tokio::test]
async fn an_existing_user_gets_groups_without_being_recreated() {
    if !is_root() {
        eprintln!("skipped: needs root for useradd --root");
        return;
    }
    let root = shadow_root();
    let users = UserManager::new(root.path());
    // Rocky's group is wheel; the host (Debian) has none, so add one to the temporary root.
    let group_file = root.path().join("etc/group");
    let mut groups = std::fs::read_to_string(&group_file).unwrap();
    groups.push_str("wheel:x:10:\n");
    std::fs::write(&group_file, groups).unwrap();
    let info = users.ensure_user("rocky", Family::RedHat).await.unwrap();
    let group = std::fs::read_to_string(&group_file).unwrap();
    assert!(group.lines().any(|l| l == "wheel:x:10:rocky"), "{group}");
    assert!(!group
        .lines()
        .any(|l| l.starts_with("sudo:") && l.contains("rocky")));
    assert_eq!(
        users
            .ensure_user("rocky", Family::RedHat)
            .await
            .unwrap()
            .uid,
        info.uid
    );
}

/// `chpasswd` needs PAM, which only works on the real root: this test creates a throwaway
/// account on the host and removes it afterwards.
#[tokio::test]
async fn the_password_is_set_through_stdin_and_verifies() {
    if !is_root() {
        eprintln!("skipped: needs root for chpasswd");
        return;
    }
    let _host = HOST_USERS.lock().await;
    let name = format!("exot{}", std::process::id() % 100_000);
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("userdel")
                .args(["--remove", &self.0])
                .output();
        }
    }
    let status = std::process::Command::new("useradd")
        .args(["--create-home", &name])
        .status()
        .unwrap();
    assert!(status.success());
    let _cleanup = Cleanup(name.clone());
    let passphrase = Passphrase::generate();
    UserManager::new(Path::new("/"))
        .set_password(&name, &passphrase)
        .await
        .unwrap();
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap();
    let hash = shadow
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .unwrap()
        .split(':')
        .nth(1)
        .unwrap()
        .to_owned();
    assert!(hash.starts_with("$y$") || hash.starts_with("$6$"), "{hash}");
    assert!(!shadow.contains(passphrase.expose()));
    assert!(
        crypt_verifies(passphrase.expose(), &hash),
        "the password verifies"
    );
    assert!(!crypt_verifies("WRONG", &hash));

    let err = UserManager::new(Path::new("/"))
        .set_password("no-such-user-xyz", &passphrase)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "password-set-failed");
    assert!(!err.to_string().contains(passphrase.expose()), "{err}");
}

/// Check `password` against a crypt(3) hash with libc's crypt (via Python's crypt module, the
/// password on stdin).
fn crypt_verifies(password: &str, hash: &str) -> bool {
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args([
            "-W",
            "ignore",
            "-c",
            "import crypt,sys; h=sys.argv[1]; p=sys.stdin.read(); sys.exit(0 if crypt.crypt(p,h)==h else 1)",
            hash,
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(password.as_bytes())
        .unwrap();
    child.wait().unwrap().success()
}

#[tokio::test]
async fn dpkg_query_tells_what_is_missing() {
    if which("dpkg-query").is_none() {
        eprintln!("skipped: not a dpkg system");
        return;
    }
    let installer = PackageInstaller::new(PackageManager::Apt, &PackageSettings::default());
    let missing = installer
        .missing(&["coreutils".into(), "surely-not-a-pkg-xyz".into()])
        .await
        .unwrap();
    assert_eq!(missing, vec![PackageItem::from("surely-not-a-pkg-xyz")]);
    let err = installer.missing(&["--force".into()]).await.unwrap_err();
    assert_eq!(err.reason(), "package-install-failed");
    assert!(err.to_string().contains("--force"));
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A fake `apt-get` (a shell script) that records its argv, one line per call, and fails with
/// `failure` on the first `failures` install calls.
fn fake_apt(dir: &Path, failures: u32, failure: &str) -> PackageTools {
    let script = dir.join("apt-get");
    let calls = dir.join("calls");
    let count = dir.join("count");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
echo "$*" >> '{calls}'
case "$*" in *update*) exit 0;; esac
n=$(cat '{count}' 2>/dev/null || echo 0); n=$((n+1)); echo $n > '{count}'
if [ $n -le {failures} ]; then echo '{failure}' >&2; exit 100; fi
exit 0
"#,
            calls = calls.display(),
            count = count.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Fresh package lists, so no `apt-get update` runs first.
    let lists = dir.join("lists");
    std::fs::create_dir_all(&lists).unwrap();
    std::fs::write(
        lists.join("deb_dists_bookworm_main_binary-amd64_Packages"),
        "",
    )
    .unwrap();
    PackageTools {
        apt_get: script,
        apt_lists: lists,
        cloud_init_status: None,
        ..PackageTools::default()
    }
}

/// An installer whose `apt-get` is [`fake_apt`], retrying after 10 ms, 20 ms, …
fn fake_apt_installer(dir: &Path, failures: u32, failure: &str, attempts: u32) -> PackageInstaller {
    PackageInstaller::with_tools(
        PackageManager::Apt,
        &settings(attempts),
        fake_apt(dir, failures, failure),
        Duration::from_millis(10),
    )
}

fn calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn settings(attempts: u32) -> PackageSettings {
    PackageSettings {
        lock_timeout: Duration::from_secs(123),
        attempts,
    }
}

const MISSING: [&str; 2] = ["surely-not-a-pkg-xyz", "surely-not-a-pkg-abc"];

#[tokio::test]
async fn a_held_lock_is_waited_out_and_everything_goes_in_one_transaction() {
    if which("dpkg-query").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let installer = fake_apt_installer(
        dir.path(),
        2,
        "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 (apt-get)",
        3,
    );
    let packages: Vec<PackageItem> = MISSING
        .iter()
        .map(|s| PackageItem::from(*s))
        .chain(["coreutils".into()])
        .collect();
    let outcome = installer.install(&packages).await.unwrap();
    assert_eq!(
        outcome,
        InstallOutcome::Installed {
            packages: MISSING.iter().map(|s| PackageItem::from(*s)).collect(),
            attempts: 3
        }
    );
    let calls = calls(dir.path());
    assert_eq!(calls.len(), 3, "{calls:?}");
    for call in &calls {
        assert_eq!(
            call,
            "-y -q -o DPkg::Lock::Timeout=123 install --no-install-recommends -- surely-not-a-pkg-xyz surely-not-a-pkg-abc",
            "one transaction with every missing package, nothing already installed"
        );
    }
}

#[tokio::test]
async fn a_lock_held_too_long_is_a_lock_timeout() {
    if which("dpkg-query").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let installer = fake_apt_installer(
        dir.path(),
        99,
        "E: Could not get lock /var/lib/dpkg/lock-frontend",
        2,
    );
    let err = installer.install(&[MISSING[0].into()]).await.unwrap_err();
    assert_eq!(err.reason(), "package-lock-timeout");
    assert_eq!(calls(dir.path()).len(), 2);
}

#[tokio::test]
async fn a_permanent_failure_is_not_retried_and_keeps_the_stderr() {
    if which("dpkg-query").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let installer = fake_apt_installer(
        dir.path(),
        99,
        "E: Sub-process /usr/bin/dpkg returned an error code (1)",
        5,
    );
    let err = installer.install(&[MISSING[0].into()]).await.unwrap_err();
    assert_eq!(err.reason(), "package-install-failed");
    assert!(
        err.to_string().contains("returned an error code (1)"),
        "{err}"
    );
    assert_eq!(calls(dir.path()).len(), 1, "not retried");
}

#[tokio::test]
async fn stale_lists_are_refreshed_before_retrying() {
    if which("dpkg-query").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let installer = fake_apt_installer(
        dir.path(),
        1,
        "E: Unable to locate package surely-not-a-pkg-xyz",
        3,
    );
    installer.install(&[MISSING[0].into()]).await.unwrap();
    let calls = calls(dir.path());
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(calls[1].ends_with("update"), "{calls:?}");
}

#[tokio::test]
async fn nothing_runs_when_everything_is_installed() {
    if which("dpkg-query").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let installer = fake_apt_installer(dir.path(), 0, "", 3);
    assert_eq!(
        installer.install(&["coreutils".into()]).await.unwrap(),
        InstallOutcome::AlreadyInstalled
    );
    assert!(calls(dir.path()).is_empty());
}

/// The real apt-get, installing a tiny real package through the installer (CI sets
/// EXOAGENT_REAL_APT=1; it needs root and the Debian mirror).
#[tokio::test]
async fn real_apt_installs_a_real_package() {
    if std::env::var("EXOAGENT_REAL_APT").as_deref() != Ok("1") {
        eprintln!("skipped: set EXOAGENT_REAL_APT=1 (and run as root) to install a real package");
        return;
    }
    assert!(is_root(), "EXOAGENT_REAL_APT=1 needs root");
    let package = PackageItem::from("sl");
    let _ = std::process::Command::new("apt-get")
        .args(["-y", "-q", "remove", "sl"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output();
    let installer = PackageInstaller::new(PackageManager::Apt, &PackageSettings::default());
    assert_eq!(
        installer
            .missing(std::slice::from_ref(&package))
            .await
            .unwrap(),
        vec![package.clone()]
    );
    let outcome = installer
        .install(std::slice::from_ref(&package))
        .await
        .unwrap();
    assert!(
        matches!(outcome, InstallOutcome::Installed { .. }),
        "{outcome:?}"
    );
    assert!(Path::new("/usr/games/sl").exists());
    assert_eq!(
        installer
            .install(std::slice::from_ref(&package))
            .await
            .unwrap(),
        InstallOutcome::AlreadyInstalled
    );
}

/// A throwaway local user, removed on drop.
struct ThrowawayUser(String);

impl ThrowawayUser {
    fn create(prefix: &str) -> Self {
        let name = format!("{prefix}{}", std::process::id() % 100_000);
        let status = std::process::Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/bash", &name])
            .status()
            .unwrap();
        assert!(status.success(), "useradd {name}");
        Self(name)
    }
}

impl Drop for ThrowawayUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("userdel")
            .args(["--remove", &self.0])
            .output();
    }
}

/// RStudio's R: the service's own system packages for this OS (Debian 12: `r-base`) through the
/// agent's package layer, then `Rscript` run as an instance-like user.
#[tokio::test]
async fn real_apt_installs_r_for_rstudio_and_rscript_runs_as_the_user() {
    if std::env::var("EXOAGENT_REAL_APT").as_deref() != Ok("1") {
        eprintln!("skipped: set EXOAGENT_REAL_APT=1 (and run as root) to install r-base");
        return;
    }
    assert!(is_root(), "EXOAGENT_REAL_APT=1 needs root");
    use exoagent::services::rstudio::{RStudio, RStudioSettings};
    use exoagent::services::ServiceImpl;
    let host = os::detect(Path::new("/")).unwrap();
    let rstudio = RStudio::new(RStudioSettings::default(), host.clone());
    let packages: Vec<PackageItem> = rstudio
        .system_packages(&host)
        .into_iter()
        .map(PackageItem::Named)
        .collect();
    assert_eq!(packages, ["r-base".into()]);
    let installer = PackageInstaller::new(PackageManager::Apt, &PackageSettings::default());
    installer.install(&packages).await.unwrap();
    assert!(installer.missing(&packages).await.unwrap().is_empty());

    let _host = HOST_USERS.lock().await;
    let user = ThrowawayUser::create("exor");
    let out = std::process::Command::new("runuser")
        .args([
            "-u",
            &user.0,
            "--",
            "Rscript",
            "-e",
            "cat(Sys.info()[['user']], sum(1:10), '\\n')",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.trim(), format!("{} 55", user.0));
}

/// The stack Posit's Debian/Ubuntu package installs as `/etc/pam.d/rstudio`
/// (`src/cpp/server/extras/pam/debian/rstudio`), which exoagent relies on and does not replace.
const PACKAGE_PAM_STACK: &str =
    "#%PAM-1.0\n@include common-auth\n@include common-account\n@include common-session\n";

fn pamtester(user: &str, password: &str) -> bool {
    use std::io::Write;
    let mut child = std::process::Command::new("pamtester")
        .args(["rstudio", user, "authenticate"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    child.wait().unwrap().success()
}

/// RStudio's PAM sign-in accepts the passphrase the agent sets and refuses a wrong one, checked
/// with a real PAM client. Without the package, its default stack is written for the test
/// (and removed afterwards).
#[tokio::test]
async fn rstudio_pam_accepts_the_passphrase_and_refuses_a_wrong_one() {
    if !is_root() {
        eprintln!("skipped: needs root for useradd and PAM");
        return;
    }
    if std::process::Command::new("pamtester")
        .arg("-v")
        .output()
        .is_err()
    {
        eprintln!("skipped: pamtester is not installed (installer/dev/prereqs.sh installs it)");
        return;
    }
    let _host = HOST_USERS.lock().await;
    let stack = Path::new("/etc/pam.d/rstudio");
    struct RemoveStack(Option<&'static Path>);
    impl Drop for RemoveStack {
        fn drop(&mut self) {
            if let Some(path) = self.0 {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    let _remove = if stack.exists() {
        RemoveStack(None)
    } else {
        std::fs::write(stack, PACKAGE_PAM_STACK).unwrap();
        RemoveStack(Some(Path::new("/etc/pam.d/rstudio")))
    };
    let user = ThrowawayUser::create("exop");
    let passphrase = Passphrase::generate();
    UserManager::new(Path::new("/"))
        .set_password(&user.0, &passphrase)
        .await
        .unwrap();
    assert!(
        pamtester(&user.0, passphrase.expose()),
        "the passphrase signs in"
    );
    assert!(
        !pamtester(&user.0, "not the passphrase"),
        "a wrong one is refused"
    );
}

/// cloud-init's `status.json` for a boot whose config stage has `finished` (a time) or not
/// (`null`): the shape cloud-init writes (`cmd/main.py`, `status_wrapper`).
fn cloud_init_status(config_finished: Option<f64>) -> String {
    let stage = |finished: Option<f64>| serde_json::json!({"errors": [], "recoverable_errors": {}, "start": finished.map(|f| f - 5.0), "finished": finished});
    serde_json::json!({"v1": {
        "datasource": "DataSourceOpenStackLocal [net,ver=2]",
        "init-local": stage(Some(1_765_000_000.0)),
        "init": stage(Some(1_765_000_010.0)),
        "modules-config": stage(config_finished),
        "modules-final": stage(None),
        "stage": if config_finished.is_some() { serde_json::Value::Null } else { "modules-config".into() },
    }})
    .to_string()
}

/// The agent starts right after cloud-init's network stage; a package transaction waits until
/// cloud-init's config stage (apt sources, proxy) has finished, and not at all without
/// cloud-init. Nothing to install: no wait either (a baked image never waits).
#[tokio::test]
async fn packages_wait_for_cloud_inits_config_stage() {
    use exoagent::platform::cloud_init::CloudConfigStage;
    if which("dpkg-query").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let status = dir.path().join("status.json");
    assert_eq!(
        CloudConfigStage::read(&status),
        CloudConfigStage::NotRunning
    );
    std::fs::write(&status, cloud_init_status(None)).unwrap();
    assert_eq!(CloudConfigStage::read(&status), CloudConfigStage::Pending);
    std::fs::write(&status, "{\"v1\": {").unwrap();
    assert_eq!(
        CloudConfigStage::read(&status),
        CloudConfigStage::Pending,
        "half written"
    );
    std::fs::write(&status, cloud_init_status(None)).unwrap();

    let installer = PackageInstaller::with_tools(
        PackageManager::Apt,
        &settings(1),
        PackageTools {
            cloud_init_status: Some(status.clone()),
            ..fake_apt(dir.path(), 0, "")
        },
        Duration::from_millis(10),
    );
    assert_eq!(
        installer.install(&["coreutils".into()]).await.unwrap(),
        InstallOutcome::AlreadyInstalled,
        "nothing missing: no wait"
    );
    let task = tokio::spawn({
        let installer = installer.clone();
        async move { installer.install(&[MISSING[0].into()]).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !task.is_finished(),
        "installed before the config stage finished"
    );
    assert!(calls(dir.path()).is_empty(), "{:?}", calls(dir.path()));
    std::fs::write(&status, cloud_init_status(Some(1_765_000_030.0))).unwrap();
    assert_eq!(CloudConfigStage::read(&status), CloudConfigStage::Finished);
    let outcome = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the transaction goes ahead once the stage has finished")
        .unwrap()
        .unwrap();
    assert!(
        matches!(outcome, InstallOutcome::Installed { .. }),
        "{outcome:?}"
    );
    assert_eq!(calls(dir.path()).len(), 1);

    // Without a status file (no cloud-init this boot) nothing waits.
    std::fs::remove_file(&status).unwrap();
    let started = std::time::Instant::now();
    installer.install(&[MISSING[1].into()]).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
}
