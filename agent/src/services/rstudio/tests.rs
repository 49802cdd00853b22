//! The install plan per OS, the generated configuration, the run spec, and the probe against a
//! peer that answers like RStudio's sign-in endpoint.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::paths::Paths;
use crate::services::Account;

fn ctx(uid: u32) -> ServiceContext {
    ServiceContext {
        paths: Paths::sandbox(Path::new("/sb")),
        account: Account {
            name: "exouser".into(),
            uid,
            gid: uid,
            home: "/home/exouser".into(),
        },
        exe: "/usr/bin/exoagent".into(),
    }
}

fn os(id: &str, version_id: &str, family: Family) -> Os {
    Os {
        id: id.into(),
        version_id: version_id.into(),
        pretty_name: format!("{id} {version_id}"),
        family,
        supported: true,
    }
}

fn strings(argv: &[&str]) -> Vec<String> {
    argv.iter().map(|s| s.to_string()).collect()
}

const JAMMY_URL: &str =
    "https://download2.rstudio.org/server/jammy/amd64/rstudio-server-2026.07.0-139-amd64.deb";

#[test]
fn the_install_plan_on_debian_and_ubuntu_is_exact() {
    for (id, version) in [("debian", "12"), ("ubuntu", "22.04"), ("ubuntu", "24.04")] {
        let os = os(id, version, Family::Debian);
        let rstudio = RStudio::new(RStudioSettings::default(), os.clone());
        assert_eq!(rstudio.system_packages(&os), ["r-base"], "{id} {version}");
        let deb = "/sb/opt/exoagent/rstudio/rstudio-server-2026.07.0-139-amd64.deb";
        assert_eq!(
            rstudio.install_steps(&ctx(1000)),
            [
                Step::Download {
                    url: JAMMY_URL.into(),
                    sha256: Some(
                        "e7b310c9e46811635b8dea8df82c729686c3a78f35cfa7767d9567e30f528465"
                            .into()
                    ),
                    to: deb.into(),
                },
                // In the one batched apt transaction with r-base, never an apt-get of its own.
                Step::Batch(LocalPackage {
                    name: "rstudio-server".into(),
                    version: "2026.07.0+139".into(),
                    path: deb.into(),
                }),
                Step::Systemd(strings(&["systemctl", "disable", "--now", "rstudio-server"])),
                Step::Systemd(strings(&["systemctl", "mask", "rstudio-server"])),
            ],
            "{id} {version}"
        );
        let c = ctx(1000);
        assert_eq!(
            rstudio.batch_files(&c),
            [LocalPackage {
                name: "rstudio-server".into(),
                version: "2026.07.0+139".into(),
                path: deb.into(),
            }]
        );
        let plan = rstudio.plan(&c);
        assert!(plan[0].starts_with(&format!("download {JAMMY_URL} to {deb} and verify SHA-256 e7b3")), "{plan:?}");
        assert!(plan[0].ends_with("before the batched package transaction"), "{plan:?}");
        assert_eq!(
            plan[1],
            format!("install {deb} (rstudio-server 2026.07.0+139) in the one batched apt transaction, with R and every other service's packages")
        );
        assert!(plan[2].starts_with("run systemctl disable --now rstudio-server"), "{plan:?}");
        assert!(plan[3].starts_with("run systemctl mask rstudio-server"), "{plan:?}");
        assert!(plan[4].starts_with("write /sb/etc/rstudio/rserver.conf"), "{plan:?}");
        assert!(plan[5].starts_with("run /usr/lib/rstudio-server/bin/rserver"), "{plan:?}");
        assert_eq!(plan.len(), 6, "{plan:?}");
    }
}

#[test]
fn the_install_plan_on_rocky_8_and_9_is_exact() {
    for (version, build, repo) in [("8.10", "rhel8", "powertools"), ("9.4", "rhel9", "crb")] {
        let os = os("rocky", version, Family::RedHat);
        let rstudio = RStudio::new(RStudioSettings::default(), os.clone());
        // EPEL's R needs epel-release (and the config-manager plugin) from the batch first.
        assert_eq!(
            rstudio.system_packages(&os),
            ["epel-release", "dnf-plugins-core"]
        );
        let url = format!(
            "https://download2.rstudio.org/server/{build}/x86_64/rstudio-server-rhel-2026.07.0-139-x86_64.rpm"
        );
        let rpm = "/sb/opt/exoagent/rstudio/rstudio-server-rhel-2026.07.0-139-x86_64.rpm";
        assert_eq!(
            rstudio.install_steps(&ctx(1000)),
            [
                // No SHA-256 of the EL builds could be confirmed: the signature is the check.
                Step::Download {
                    url,
                    sha256: None,
                    to: rpm.into(),
                },
                Step::VerifySignature {
                    package: rpm.into(),
                    key_url: "https://dl.posit.co/public/open/gpg.51C0B5BB19F92D60.key".into(),
                    fingerprint: "8B65E5A107BBEFE3BA99C59751C0B5BB19F92D60".into(),
                },
                Step::Run(strings(&["dnf", "config-manager", "--set-enabled", repo])),
                Step::Run(strings(&["dnf", "-y", "install", "R", rpm])),
                Step::Systemd(strings(&["systemctl", "disable", "--now", "rstudio-server"])),
                Step::Systemd(strings(&["systemctl", "mask", "rstudio-server"])),
            ],
            "rocky {version}"
        );
        let fetch: Vec<bool> = rstudio
            .install_steps(&ctx(1000))
            .iter()
            .map(Step::is_fetch)
            .collect();
        assert_eq!(fetch, [true, true, false, false, false, false]);
        // Not in the batch: EPEL (where R comes from) exists only after the batch.
        assert!(rstudio.batch_files(&ctx(1000)).is_empty());
        let plan = rstudio.plan(&ctx(1000)).join("\n");
        assert!(
            plan.contains("signed by key 8B65E5A107BBEFE3BA99C59751C0B5BB19F92D60"),
            "{plan}"
        );
    }
    // Alma is planned like Rocky.
    let alma = RStudio::new(RStudioSettings::default(), os("almalinux", "9.4", Family::RedHat));
    assert_eq!(alma.pin().build, "rhel9");
}

#[test]
fn a_signing_key_mirror_keeps_the_pinned_fingerprint() {
    let rstudio = RStudio::new(
        RStudioSettings {
            signing_key_url: Some("https://mirror.example.org/posit.asc".into()),
            ..RStudioSettings::default()
        },
        os("rocky", "9.4", Family::RedHat),
    );
    let steps = rstudio.install_steps(&ctx(1000));
    assert!(
        matches!(&steps[1], Step::VerifySignature { key_url, fingerprint, .. }
            if key_url == "https://mirror.example.org/posit.asc"
                && fingerprint == signature::POSIT_FINGERPRINT),
        "{steps:?}"
    );
}

#[test]
fn rserver_conf_is_checked_key_by_key() {
    let rstudio = RStudio::new(RStudioSettings::default(), os("debian", "12", Family::Debian));
    let conf = rstudio.rserver_conf(&ctx(1001));
    let keys: Vec<&str> = conf.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        keys,
        [
            "www-address=0.0.0.0",
            "www-port=8787",
            "auth-minimum-user-id=1000",
            "auth-timeout-minutes=0",
            "auth-cookies-force-secure=1",
        ]
    );
    let custom = RStudio::new(
        RStudioSettings {
            port: 9000,
            bind: "127.0.0.1".parse().unwrap(),
            secure_cookies: false,
            auth_timeout_minutes: 60,
            session_timeout_minutes: 120,
            ..RStudioSettings::default()
        },
        os("debian", "12", Family::Debian),
    );
    let keys: Vec<String> = custom
        .rserver_conf(&ctx(500))
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        keys,
        [
            "www-address=127.0.0.1",
            "www-port=9000",
            "auth-minimum-user-id=500",
            "auth-timeout-minutes=60",
        ]
    );
    assert_eq!(
        custom
            .rsession_conf()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>(),
        ["session-timeout-minutes=120"]
    );
    assert!(rstudio.rsession_conf().contains("\nsession-timeout-minutes=0\n"));
}

#[tokio::test]
async fn configure_writes_both_files_under_the_system_root() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = ctx(nix::unistd::geteuid().as_raw());
    c.paths = Paths::sandbox(dir.path());
    c.account.home = dir.path().join("home/u");
    let rstudio = RStudio::new(RStudioSettings::default(), os("debian", "12", Family::Debian));
    rstudio
        .configure(&c, &Passphrase::generate())
        .await
        .unwrap();
    let etc = dir.path().join("etc/rstudio");
    assert_eq!(
        std::fs::read_to_string(etc.join("rserver.conf")).unwrap(),
        rstudio.rserver_conf(&c)
    );
    assert_eq!(
        std::fs::read_to_string(etc.join("rsession.conf")).unwrap(),
        rstudio.rsession_conf()
    );
}

#[test]
fn rserver_runs_in_the_foreground_without_an_account_switch() {
    let rstudio = RStudio::new(RStudioSettings::default(), os("debian", "12", Family::Debian));
    let spec = rstudio.run_spec(&ctx(1000));
    assert_eq!(
        spec.argv,
        [
            "/usr/lib/rstudio-server/bin/rserver",
            "--server-daemonize=0",
            "--config-file=/sb/etc/rstudio/rserver.conf"
        ]
    );
    assert_eq!(spec.run_as, None, "rserver needs root to start sessions");
    assert!(spec
        .env
        .contains(&("RSTUDIO_CONFIG_DIR".into(), "/sb/etc/rstudio".into())));
    assert_eq!(rstudio.url(), "http://127.0.0.1:8787/");
    match rstudio.probe() {
        Probe::Http {
            addr,
            path,
            user_agent,
            expect_json_key,
            ..
        } => {
            assert_eq!(addr.to_string(), "127.0.0.1:8787");
            assert_eq!(path, "/auth-sign-in");
            assert_eq!(user_agent.as_deref(), Some(BROWSER_USER_AGENT));
            assert_eq!(expect_json_key, None);
        }
        other => panic!("{other:?}"),
    }
}

/// Serve every connection with `respond(request head)` until dropped.
async fn serve(respond: fn(&str) -> Vec<u8>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let reply = respond(&String::from_utf8_lossy(&head));
                let _ = stream.write_all(&reply).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// Like rserver's sign-in page: 200 HTML for a supported browser, otherwise the redirect to
/// the unsupported-browser page (`ServerBrowser.cpp`).
fn sign_in(head: &str) -> Vec<u8> {
    let browser = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("user-agent:") && l.contains("Chrome/"));
    if head.starts_with("GET /auth-sign-in ") && browser {
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 6\r\nConnection: close\r\n\r\n<html>".to_vec()
    } else {
        b"HTTP/1.1 302 Found\r\nLocation: /unsupported_browser.htm\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
    }
}

#[tokio::test]
async fn the_probe_passes_as_a_browser_and_a_plain_client_is_redirected() {
    let addr = serve(sign_in).await;
    let rstudio = RStudio::new(
        RStudioSettings {
            port: addr.port(),
            bind: addr.ip(),
            ..RStudioSettings::default()
        },
        os("debian", "12", Family::Debian),
    );
    rstudio.probe().check(Duration::from_secs(5)).await.unwrap();
    let plain = Probe::Http {
        addr,
        path: "/auth-sign-in".into(),
        host: addr.to_string(),
        expect_json_key: None,
        user_agent: None,
    };
    let err = plain.check(Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(err.reason(), "probe-bad-status", "{err}");
}

fn not_the_package(_head: &str) -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\nnot a .deb!".to_vec()
}

#[tokio::test]
async fn a_wrong_checksum_stops_before_anything_is_installed() {
    let addr = serve(not_the_package).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = ctx(1000);
    c.paths = Paths::sandbox(dir.path());
    let rstudio = RStudio::new(
        RStudioSettings {
            package_url: Some(format!("http://{addr}/rstudio-server.deb")),
            ..RStudioSettings::default()
        },
        os("debian", "12", Family::Debian),
    );
    // The served file replaces Posit's; the pinned checksum still applies.
    let steps = rstudio.install_steps(&c);
    assert!(matches!(&steps[0], Step::Download { url, .. } if url.starts_with("http://127.0.0.1")));
    // The fetch, before the batch, is where the .deb is verified (and refused).
    let err = rstudio.fetch(&c).await.unwrap_err();
    assert_eq!(err.reason(), "rstudio-checksum-mismatch", "{err}");
    assert!(err.to_string().contains("nothing was installed"), "{err}");
    let payload = dir.path().join("opt/exoagent/rstudio");
    let left: Vec<_> = std::fs::read_dir(&payload)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "no package or marker kept: {left:?}");
}

#[tokio::test]
async fn the_right_checksum_keeps_the_file() {
    let addr = serve(not_the_package).await;
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("x.deb");
    // SHA-256 of "not a .deb!".
    let sum = {
        let d = ring::digest::digest(&ring::digest::SHA256, b"not a .deb!");
        data_encoding::HEXLOWER.encode(d.as_ref())
    };
    package::download_verified(&format!("http://{addr}/x.deb"), Some(&sum), &to)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&to).unwrap(), b"not a .deb!");
}

#[tokio::test]
async fn a_verified_deb_is_offered_to_the_batch_and_checked_after_it() {
    let addr = serve(not_the_package).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = ctx(1000);
    c.paths = Paths::sandbox(dir.path());
    let rstudio = RStudio::new(
        RStudioSettings {
            package_url: Some(format!("http://{addr}/rstudio-server.deb")),
            ..RStudioSettings::default()
        },
        os("ubuntu", "24.04", Family::Debian),
    )
    .pinned_to(b"not a .deb!");
    let deb = dir
        .path()
        .join("opt/exoagent/rstudio/rstudio-server-2026.07.0-139-amd64.deb");

    // The fetch verifies the file and offers it, by package name and version, to the batch.
    let offered = rstudio.fetch(&c).await.unwrap();
    assert_eq!(
        offered,
        [LocalPackage {
            name: "rstudio-server".into(),
            version: "2026.07.0+139".into(),
            path: deb.clone(),
        }]
    );
    assert_eq!(std::fs::read(&deb).unwrap(), b"not a .deb!");

    // After a batch that did not install it (the sandbox installs nothing): a clear failure,
    // no marker.
    let err = rstudio.install(&c).await.unwrap_err();
    assert_eq!(err.reason(), "service-install-failed", "{err}");
    assert!(
        err.to_string()
            .contains("the batched package transaction did not install rstudio-server"),
        "{err}"
    );
    let marker = dir.path().join("opt/exoagent/rstudio/installed");
    assert!(!marker.exists());

    // After a batch that did (its rserver is there): the vendor unit steps (skipped: no
    // systemd under this root), then the marker; the fetch then offers nothing.
    let rserver = dir.path().join("usr/lib/rstudio-server/bin/rserver");
    std::fs::create_dir_all(rserver.parent().unwrap()).unwrap();
    std::fs::write(&rserver, "").unwrap();
    rstudio.install(&c).await.unwrap();
    assert!(std::fs::read_to_string(&marker).unwrap().starts_with("2026.07.0-139 jammy "));
    assert!(rstudio.fetch(&c).await.unwrap().is_empty());
    assert!(rstudio.batch_files(&c).len() == 1, "the plan still shows the file");
}
