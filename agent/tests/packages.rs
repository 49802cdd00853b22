//! The .deb and .rpm from `installer/package/build.sh` (the release binary, the unit, the
//! tmpfiles entry, man pages, completions, the vendor config directory), inspected with the
//! real tools: `dpkg-deb` (files, control, maintainer scripts), `dpkg --root … --unpack` into a
//! scratch root, and `rpm` (file list, scriptlets, requirements, an install into a scratch
//! root). Both hold the same paths. The
//! maintainer scripts and scriptlets are run for real with the system tools they call replaced
//! by recorders, in a mount namespace where `/run/systemd/system` exists (systemd is not PID 1
//! here, and the host must not change): install enables without starting, an upgrade
//! try-restarts and never stops, removal stops, nothing touches the services.
//!
//! Ignored by a plain `cargo test` (the release build and, the first time, the pinned tools take
//! minutes); `tests/run-all.sh` builds the packages and runs it with `EXOAGENT_PACKAGES_DIR`.
//! A missing tool or package fails it.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::shipped::{
    assert_bash_completes_subcommands_and_services, assert_pages_render_cleanly,
};
use common::{repo_root, run_ok};

/// What every package must hold (files; directories are implied).
const EXPECTED: &[&str] = &[
    "/usr/bin/exoagent",
    "/usr/lib/systemd/system/exoagent.service",
    "/usr/lib/systemd/system/exoagent-warm.service",
    "/usr/lib/tmpfiles.d/exoagent.conf",
    "/usr/lib/exoagent/config.d/README",
    "/usr/share/bash-completion/completions/exoagent",
    "/usr/share/zsh/vendor-completions/_exoagent",
    "/usr/share/fish/vendor_completions.d/exoagent.fish",
    "/usr/share/man/man1/exoagent.1.gz",
    "/usr/share/man/man1/exoagent-run.1.gz",
    "/usr/share/man/man1/exoagent-logs.1.gz",
    "/usr/share/doc/exoagent/operator-guide.md",
];

/// Debian policy's copyright file, which only the .deb has (rpm keeps the licence in a tag).
const DEB_ONLY: &[&str] = &["/usr/share/doc/exoagent/copyright"];

struct Packages {
    deb: PathBuf,
    rpm: PathBuf,
}

/// The packages: those in `EXOAGENT_PACKAGES_DIR` when set (`tests/run-all.sh` builds them just
/// before the suite), else built once per test process.
fn packages() -> &'static Packages {
    static BUILT: OnceLock<Packages> = OnceLock::new();
    BUILT.get_or_init(|| {
        let listed = match std::env::var_os("EXOAGENT_PACKAGES_DIR") {
            Some(dir) => fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("EXOAGENT_PACKAGES_DIR {dir:?}: {e}"))
                .map(|e| e.unwrap().path().display().to_string())
                .collect::<Vec<_>>()
                .join("\n"),
            None => {
                let out = run_ok(
                    Command::new("bash").arg(repo_root().join("installer/package/build.sh")),
                    "installer/package/build.sh",
                );
                String::from_utf8(out.stdout).unwrap()
            }
        };
        let find = |ext: &str| {
            let mut found = listed.lines().filter(|l| l.ends_with(ext));
            let path = found
                .next()
                .unwrap_or_else(|| panic!("no {ext} package: {listed}"));
            assert!(found.next().is_none(), "more than one {ext}: {listed}");
            PathBuf::from(path)
        };
        Packages {
            deb: find(".deb"),
            rpm: find(".rpm"),
        }
    })
}

/// A tool the test needs: a clear failure when it is missing, never a skip.
fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is missing: installer/dev/prereqs.sh installs it (apt: dpkg, rpm, man-db)"
    );
    Command::new(name)
}

fn stdout(command: &mut Command, what: &str) -> String {
    String::from_utf8(run_ok(command, what).stdout).unwrap()
}

/// The .deb's regular files and symlinks (not directories), as absolute paths.
fn deb_files(deb: &Path) -> BTreeSet<String> {
    stdout(tool("dpkg-deb").arg("-c").arg(deb), "dpkg-deb -c")
        .lines()
        .filter(|l| !l.starts_with('d'))
        .map(|l| {
            let path = l.split_whitespace().nth(5).unwrap();
            path.trim_start_matches('.').to_owned()
        })
        .collect()
}

/// The .rpm's files (not directories).
fn rpm_files(rpm: &Path) -> BTreeSet<String> {
    let listed = stdout(
        tool("rpm")
            .args(["-qp", "--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]"])
            .arg(rpm),
        "rpm -qp filenames",
    );
    listed
        .lines()
        .filter(|l| !l.starts_with('d'))
        .map(|l| l.split_once(' ').unwrap().1.to_owned())
        .collect()
}

#[test]
#[ignore = "builds the release binary and both packages; run by tests/run-all.sh"]
fn the_deb_holds_the_agent_unit_pages_and_completions() {
    let deb = &packages().deb;
    let files = deb_files(deb);
    for path in EXPECTED {
        assert!(files.contains(*path), "{path} not in the .deb: {files:#?}");
    }
    let listing = stdout(tool("dpkg-deb").arg("-c").arg(deb), "dpkg-deb -c");
    let line = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(".{path}")))
            .unwrap()
            .to_owned()
    };
    assert!(line("/usr/bin/exoagent").starts_with("-rwxr-xr-x 0/0 "));
    assert!(line("/usr/lib/systemd/system/exoagent.service").starts_with("-rw-r--r-- 0/0 "));

    let info = stdout(tool("dpkg-deb").arg("-I").arg(deb), "dpkg-deb -I");
    assert!(info.contains(" Package: exoagent\n"), "{info}");
    assert!(info.contains(" Architecture: amd64\n"), "{info}");
    assert!(info.contains("init-system-helpers"), "{info}");
    for script in ["postinst", "prerm", "postrm"] {
        assert!(info.contains(script), "{script} missing: {info}");
    }

    // The unit as shipped points at the packaged binary.
    let root = unpacked_deb();
    let unit =
        fs::read_to_string(root.path().join("usr/lib/systemd/system/exoagent.service")).unwrap();
    assert!(
        unit.contains("\nExecStart=/usr/bin/exoagent run\n"),
        "{unit}"
    );
    assert!(
        unit.contains("\nKillMode=process\n"),
        "services outlive the agent"
    );
    assert!(unit.contains("\nWants=exoagent-warm.service\n"), "{unit}");
    let warm = fs::read_to_string(
        root.path()
            .join("usr/lib/systemd/system/exoagent-warm.service"),
    )
    .unwrap();
    assert!(
        warm.contains("\nExecStart=/bin/cat /usr/bin/exoagent\n"),
        "{warm}"
    );
    // The packaged binary runs, and its shipped pages and completions work.
    let version = stdout(
        Command::new(root.path().join("usr/bin/exoagent")).arg("--version"),
        "exoagent --version",
    );
    assert!(version.starts_with("exoagent "), "{version}");
    assert_pages_render_cleanly(&root.path().join("usr/share/man/man1"));
    assert_bash_completes_subcommands_and_services(
        &root
            .path()
            .join("usr/share/bash-completion/completions/exoagent"),
    );
}

/// The .deb's files extracted (`dpkg-deb -x`, no scripts) into a scratch directory.
fn unpacked_deb() -> tempfile::TempDir {
    deb_part("-x")
}

/// One part of the .deb extracted by `dpkg-deb <flag>` (`-x` its files, `-e` its control
/// scripts) into a scratch directory.
fn deb_part(flag: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    run_ok(
        tool("dpkg-deb")
            .arg(flag)
            .arg(&packages().deb)
            .arg(dir.path()),
        &format!("dpkg-deb {flag}"),
    );
    dir
}

/// The newest `GLIBC_x.y` symbol version an ELF file needs (`objdump -T`), as (x, y).
fn newest_glibc_needed(binary: &Path) -> (u32, u32) {
    let symbols = stdout(tool("objdump").arg("-T").arg(binary), "objdump -T");
    symbols
        .split("GLIBC_")
        .skip(1)
        .filter_map(|rest| {
            let version: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .max()
        .unwrap_or_else(|| panic!("no GLIBC_ symbol versions in {}", binary.display()))
}

/// Debian 11's root (glibc 2.31), which `tests/guacamole/guacd-bullseye.sh build` makes and
/// `tests/run-all.sh` builds before this suite.
const BULLSEYE_ROOT: &str = "/var/tmp/exoagent-guacd-bullseye";

#[test]
#[ignore = "builds the release binary and both packages; run by tests/run-all.sh"]
fn the_packaged_binary_runs_on_the_oldest_glibc_it_claims() {
    // exoagent claims Debian 11 and Ubuntu 20.04 (glibc 2.31) and EL 8 (2.28). A binary
    // linked against this machine's glibc 2.36 needs 2.34 and fails there at once
    // ("version `GLIBC_2.34' not found").
    let root = unpacked_deb();
    let binary = root.path().join("usr/bin/exoagent");
    let newest = newest_glibc_needed(&binary);
    assert!(
        newest <= (2, 28),
        "the packaged binary needs GLIBC_{}.{}; EL 8 has 2.28",
        newest.0,
        newest.1
    );
    // And it runs on a real Debian 11 userland (its glibc 2.31), not only on paper.
    let bullseye = Path::new(BULLSEYE_ROOT);
    assert!(
        bullseye.join("usr/sbin/guacd").is_file(),
        "{BULLSEYE_ROOT} is missing: bash tests/guacamole/guacd-bullseye.sh build"
    );
    let inside = format!("/tmp/exoagent-packaged-{}", std::process::id());
    fs::copy(&binary, bullseye.join(inside.trim_start_matches('/'))).unwrap();
    let ran = Command::new("chroot")
        .arg(bullseye)
        .arg(&inside)
        .arg("--version")
        .output();
    let _ = fs::remove_file(bullseye.join(inside.trim_start_matches('/')));
    let ran = ran.expect("chroot runs (as root)");
    let libc = stdout(
        Command::new("chroot")
            .arg(bullseye)
            .args(["ldd", "--version"]),
        "ldd --version in the bullseye root",
    );
    assert!(
        libc.lines().next().unwrap_or("").ends_with(" 2.31"),
        "{libc}"
    );
    assert!(
        ran.status.success() && String::from_utf8_lossy(&ran.stdout).starts_with("exoagent "),
        "the packaged binary did not run on Debian 11's glibc: {:?} {} {}",
        ran.status,
        String::from_utf8_lossy(&ran.stdout),
        String::from_utf8_lossy(&ran.stderr)
    );
    // The .deb says what it needs: libc6 no newer than the floor.
    let info = stdout(
        tool("dpkg-deb").arg("-I").arg(&packages().deb),
        "dpkg-deb -I",
    );
    let depends = info
        .lines()
        .find(|l| l.trim_start().starts_with("Depends:"))
        .unwrap_or_else(|| panic!("no Depends: {info}"));
    assert!(depends.contains("libc6 (>= 2.28)"), "{depends}");
    let needed = stdout(tool("readelf").arg("-d").arg(&binary), "readelf -d");
    let libraries: BTreeSet<&str> = needed
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.split(']').next())
        .collect();
    // All of glibc's own: nothing else for the .deb to depend on.
    for library in &libraries {
        assert!(
            [
                "libc.so.6",
                "libm.so.6",
                "libpthread.so.0",
                "libdl.so.2",
                "ld-linux-x86-64.so.2"
            ]
            .contains(library),
            "the binary needs {library}, which libc6 does not provide: {libraries:?}"
        );
    }
}

#[test]
#[ignore = "builds the release binary and both packages; run by tests/run-all.sh"]
fn the_deb_unpacks_into_a_scratch_root() {
    // `--unpack` runs only a preinst (there is none): nothing runs on or changes the host.
    let root = tempfile::tempdir().unwrap();
    let dpkg_dir = root.path().join("var/lib/dpkg");
    for dir in ["info", "updates"] {
        fs::create_dir_all(dpkg_dir.join(dir)).unwrap();
    }
    for file in ["status", "available"] {
        fs::write(dpkg_dir.join(file), "").unwrap();
    }
    let root_arg = format!("--root={}", root.path().display());
    run_ok(
        tool("dpkg")
            .args([root_arg.as_str(), "--force-depends", "--unpack"])
            .arg(&packages().deb),
        "dpkg --root --unpack",
    );
    let owned = stdout(
        tool("dpkg").args([root_arg.as_str(), "-L", "exoagent"]),
        "dpkg -L",
    );
    for path in EXPECTED {
        assert!(owned.lines().any(|l| l == *path), "{path}: {owned}");
    }
    assert_landed(root.path());
}

/// Every expected file is under `root`, and the binary is 0755.
fn assert_landed(root: &Path) {
    for path in EXPECTED {
        assert!(
            root.join(path.trim_start_matches('/')).is_file(),
            "{path} did not land"
        );
    }
    let mode = fs::metadata(root.join("usr/bin/exoagent"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
}

#[test]
#[ignore = "builds the release binary and both packages; run by tests/run-all.sh"]
fn the_rpm_holds_the_same_paths_and_installs_into_a_scratch_root() {
    let Packages { deb, rpm } = packages();
    let rpm_listed = rpm_files(rpm);
    let mut deb_listed = deb_files(deb);
    for only in DEB_ONLY {
        assert!(deb_listed.remove(*only), "{only}");
    }
    assert_eq!(
        rpm_listed, deb_listed,
        "the .rpm and the .deb hold the same files"
    );
    for path in EXPECTED {
        assert!(rpm_listed.contains(*path), "{path}");
    }
    // Man pages and docs are marked as documentation.
    let docs = stdout(tool("rpm").arg("-qdp").arg(rpm), "rpm -qdp");
    assert!(docs.contains("/usr/share/man/man1/exoagent.1.gz"), "{docs}");

    let requires = stdout(tool("rpm").arg("-qpR").arg(rpm), "rpm -qpR");
    assert!(
        requires.contains("/bin/sh"),
        "the scriptlets' shell: {requires}"
    );
    assert!(requires.contains("libc.so.6"), "{requires}");

    let root = tempfile::tempdir().unwrap();
    run_ok(
        tool("rpm")
            .arg("--root")
            .arg(root.path())
            .args(["-i", "--nodeps", "--noscripts"])
            .arg(rpm),
        "rpm --root -i",
    );
    assert_landed(root.path());
    // The scratch root's database knows the package and its files.
    let owned = stdout(
        tool("rpm")
            .arg("--root")
            .arg(root.path())
            .args(["-qf", "/usr/bin/exoagent"]),
        "rpm -qf",
    );
    assert!(owned.starts_with("exoagent-"), "{owned}");
    let unit =
        fs::read_to_string(root.path().join("usr/lib/systemd/system/exoagent.service")).unwrap();
    assert!(
        unit.contains("\nExecStart=/usr/bin/exoagent run\n"),
        "{unit}"
    );
}

/// Run `script` (text) with `args` under `sh`, the tools it may call replaced by recorders,
/// in a mount namespace with a private `/run` holding `/run/systemd/system` (so the script
/// believes systemd runs). Returns the recorded calls, one per line.
fn run_recorded(script: &str, args: &[&str]) -> Vec<String> {
    let bin = tempfile::tempdir().unwrap();
    let calls = bin.path().join("calls");
    for name in [
        "systemctl",
        "deb-systemd-helper",
        "deb-systemd-invoke",
        "systemd-tmpfiles",
        "exoagent",
    ] {
        let stub = bin.path().join(name);
        fs::write(
            &stub,
            format!("#!/bin/sh\necho \"{name} $*\" >> '{}'\n", calls.display()),
        )
        .unwrap();
        fs::set_permissions(&stub, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let file = bin.path().join("script");
    fs::write(&file, script).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap()
    );
    run_ok(
        tool("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec sh "$@""#)
            .arg("sh")
            .arg(&file)
            .args(args)
            .env("PATH", path),
        &format!("script {args:?}"),
    );
    fs::read_to_string(&calls)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn assert_never_starts_or_stops_on_upgrade(calls: &[String], what: &str) {
    for call in calls {
        let starts =
            call.contains(" start ") || call.contains("--now") || call.contains(" restart ");
        assert!(!starts, "{what}: {call}");
        assert!(!call.contains(" stop"), "{what}: {call}");
        assert!(
            !call.starts_with("exoagent"),
            "{what} touched the services: {call}"
        );
    }
}

#[test]
#[ignore = "builds the release binary and both packages; run by tests/run-all.sh"]
fn deb_scripts_enable_on_install_and_try_restart_on_upgrade() {
    let dir = deb_part("-e");
    let script = |name: &str| fs::read_to_string(dir.path().join(name)).unwrap();

    let install = run_recorded(&script("postinst"), &["configure", ""]);
    assert!(
        install.contains(&"deb-systemd-helper enable exoagent.service".into()),
        "{install:?}"
    );
    assert!(
        install.contains(&"systemd-tmpfiles --create exoagent.conf".into()),
        "{install:?}"
    );
    assert!(
        install.contains(&"systemctl --system daemon-reload".into()),
        "{install:?}"
    );
    assert_never_starts_or_stops_on_upgrade(&install, "first install");
    assert!(
        !install.iter().any(|c| c.contains("try-restart")),
        "{install:?}"
    );

    let upgrade = run_recorded(&script("postinst"), &["configure", "0.0.9-1"]);
    assert_eq!(
        upgrade.last().map(String::as_str),
        Some("systemctl try-restart exoagent.service"),
        "{upgrade:?}"
    );
    assert_never_starts_or_stops_on_upgrade(&upgrade[..upgrade.len() - 1], "upgrade");

    assert_eq!(
        run_recorded(&script("prerm"), &["upgrade", "0.1.1-1"]),
        Vec::<String>::new()
    );
    assert_eq!(
        run_recorded(&script("prerm"), &["remove"]),
        ["systemctl stop exoagent.service"]
    );
    // postrm deletes only on purge (not run here: it would delete the host's directories).
    let postrm = script("postrm");
    let purge = postrm.find("if [ \"$1\" = purge ]").unwrap();
    let rm = postrm
        .find(r#"rm -rf "$DPKG_ROOT/etc/exoagent" "$DPKG_ROOT/var/lib/exoagent" "$DPKG_ROOT/var/log/exoagent""#)
        .unwrap();
    assert!(purge < rm, "{postrm}");
    assert_eq!(postrm.matches("rm -").count(), 1, "{postrm}");
}

#[test]
#[ignore = "builds the release binary and both packages; run by tests/run-all.sh"]
fn rpm_scriptlets_enable_on_install_and_try_restart_on_upgrade() {
    let text = stdout(
        tool("rpm").args(["-qp", "--scripts"]).arg(&packages().rpm),
        "rpm -qp --scripts",
    );
    // `rpm --scripts` prints a line "<name> scriptlet:" (or "… (using PROG):") before each body.
    let section = |name: &str| {
        let is_head = |line: &str| line.contains(" scriptlet") && line.ends_with(':');
        let mut lines = text
            .lines()
            .skip_while(|l| !(is_head(l) && l.starts_with(name)));
        assert!(lines.next().is_some(), "no {name} scriptlet: {text}");
        let body: Vec<&str> = lines.take_while(|l| !is_head(l)).collect();
        body.join("\n") + "\n"
    };
    let (post, preun, postun) = (
        section("postinstall"),
        section("preuninstall"),
        section("postuninstall"),
    );

    let install = run_recorded(&post, &["1"]);
    assert!(
        install.contains(&"systemctl --no-reload enable exoagent.service".into()),
        "{install:?}"
    );
    assert!(
        install.contains(&"systemd-tmpfiles --create exoagent.conf".into()),
        "{install:?}"
    );
    assert_never_starts_or_stops_on_upgrade(&install, "first install");

    let upgrade_post = run_recorded(&post, &["2"]);
    assert!(
        !upgrade_post.iter().any(|c| c.contains("enable")),
        "an operator's disable stays: {upgrade_post:?}"
    );
    assert_eq!(
        run_recorded(&preun, &["1"]),
        Vec::<String>::new(),
        "no stop on upgrade"
    );
    let upgrade = run_recorded(&postun, &["1"]);
    assert_eq!(
        upgrade,
        [
            "systemctl daemon-reload",
            "systemctl try-restart exoagent.service"
        ]
    );

    assert_eq!(
        run_recorded(&preun, &["0"]),
        ["systemctl --no-reload disable --now exoagent.service"]
    );
    assert_eq!(run_recorded(&postun, &["0"]), ["systemctl daemon-reload"]);
}
