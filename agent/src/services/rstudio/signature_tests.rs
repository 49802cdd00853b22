//! The rpm signature check for real: a tiny rpm built with `rpmbuild` and signed with
//! `rpmsign` by a throwaway key made with `gpg` passes; another key, a key that is not the
//! pinned one, a tampered file and an unsigned package are refused with their reasons. The
//! tools come from Debian's `rpm` and `gpg` packages (`installer/dev/prereqs.sh`); under
//! `CI=true` a missing tool fails the test instead of skipping it.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::signature::{verify_rpm, Tools, POSIT_FINGERPRINT};
use super::*;
use crate::paths::Paths;
use crate::services::Account;

/// Whether every tool in `names` is on `PATH`; when one is not, the test is skipped, except
/// under CI, where it fails.
fn have_tools(names: &[&str]) -> bool {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| {
            std::env::var_os("PATH")
                .map(|path| std::env::split_paths(&path).any(|d| d.join(name).is_file()))
                != Some(true)
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let message = format!(
        "missing {} (Debian packages rpm and gpg; installer/dev/prereqs.sh installs them)",
        missing.join(", ")
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
    eprintln!("skipped: {message}");
    false
}

fn run(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A throwaway signing key in its own GnuPG home (its agent stopped on drop).
struct Key {
    home: PathBuf,
    fingerprint: String,
    /// The armored public key.
    public: PathBuf,
}

impl Key {
    fn generate(dir: &Path, name: &str) -> Self {
        let home = dir.join(format!("gnupg-{name}"));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let gpg = |args: &[&str]| {
            run(Command::new("gpg")
                .arg("--homedir")
                .arg(&home)
                .args(["--batch", "--no-tty"])
                .args(args))
        };
        gpg(&[
            "--passphrase",
            "",
            "--quick-gen-key",
            &format!("exoagent test {name} <{name}@example.invalid>"),
            "rsa2048",
            "sign",
            "never",
        ]);
        let colons = gpg(&["--with-colons", "--list-keys"]);
        let fingerprint = signature::primary_fingerprints(&colons).remove(0);
        let public = dir.join(format!("{name}.asc"));
        std::fs::write(&public, gpg(&["--armor", "--export", &fingerprint])).unwrap();
        Self {
            home,
            fingerprint,
            public,
        }
    }

    /// Sign `rpm` in place.
    fn sign(&self, rpm: &Path) {
        let gpg = which("gpg");
        run(Command::new("rpmsign")
            .arg("--define")
            .arg(format!("__gpg {}", gpg.display()))
            .arg("--define")
            .arg(format!("_gpg_name {}", self.fingerprint))
            .arg("--define")
            .arg(format!("_gpg_path {}", self.home.display()))
            .arg("--addsign")
            .arg(rpm)
            .stdin(std::process::Stdio::null()));
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(&self.home)
            .args(["--kill", "gpg-agent"])
            .output();
    }
}

fn which(name: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap()
}

/// A tiny unsigned noarch rpm built with `rpmbuild`.
fn build_rpm(dir: &Path) -> PathBuf {
    let top = dir.join("rpmbuild");
    std::fs::create_dir_all(top.join("SPECS")).unwrap();
    let spec = top.join("SPECS/exoagent-sigtest.spec");
    std::fs::write(
        &spec,
        "Name: exoagent-sigtest\nVersion: 1\nRelease: 1\nSummary: signature test\nLicense: MIT\n\
         BuildArch: noarch\n%description\nA package that only carries a signature.\n%files\n",
    )
    .unwrap();
    run(Command::new("rpmbuild")
        .arg("--define")
        .arg(format!("_topdir {}", top.display()))
        .arg("-bb")
        .arg(&spec));
    let built = top.join("RPMS/noarch/exoagent-sigtest-1-1.noarch.rpm");
    assert!(built.is_file());
    built
}

/// A signed rpm, its unsigned original and the key that signed it.
struct Fixture {
    dir: tempfile::TempDir,
    key: Key,
    signed: PathBuf,
    unsigned: PathBuf,
}

fn fixture() -> Option<Fixture> {
    if !have_tools(&["gpg", "gpgconf", "rpmbuild", "rpmsign", "rpmkeys"]) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = Key::generate(dir.path(), "signer");
    let built = build_rpm(dir.path());
    let unsigned = dir.path().join("unsigned.rpm");
    std::fs::copy(&built, &unsigned).unwrap();
    let signed = dir.path().join("signed.rpm");
    std::fs::copy(&built, &signed).unwrap();
    key.sign(&signed);
    Some(Fixture {
        dir,
        key,
        signed,
        unsigned,
    })
}

#[tokio::test]
async fn a_good_signature_by_the_pinned_key_passes_and_the_rest_is_refused() {
    let Some(f) = fixture() else { return };
    let tools = Tools::default();
    verify_rpm(&f.signed, &f.key.public, &f.key.fingerprint, &tools)
        .await
        .unwrap();
    // The pin compares case-insensitively.
    verify_rpm(
        &f.signed,
        &f.key.public,
        &f.key.fingerprint.to_ascii_lowercase(),
        &tools,
    )
    .await
    .unwrap();

    // Posit's pin refuses the throwaway key before it is imported.
    let err = verify_rpm(&f.signed, &f.key.public, POSIT_FINGERPRINT, &tools)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "rstudio-signing-key-mismatch", "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&f.key.fingerprint) && text.contains(POSIT_FINGERPRINT),
        "{text}"
    );

    // Another key, pinned correctly, did not sign it.
    let other = Key::generate(f.dir.path(), "other");
    let err = verify_rpm(&f.signed, &other.public, &other.fingerprint, &tools)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "rstudio-signature-invalid", "{err}");
    assert!(err.to_string().contains("nothing was installed"), "{err}");

    // A file with both keys is refused: only the pinned key may be trusted.
    let both = f.dir.path().join("both.asc");
    let mut text = std::fs::read_to_string(&f.key.public).unwrap();
    text += &std::fs::read_to_string(&other.public).unwrap();
    std::fs::write(&both, text).unwrap();
    let err = verify_rpm(&f.signed, &both, &f.key.fingerprint, &tools)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "rstudio-signing-key-mismatch", "{err}");

    // A byte changed after signing.
    let tampered = f.dir.path().join("tampered.rpm");
    let mut bytes = std::fs::read(&f.signed).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0xff;
    std::fs::write(&tampered, bytes).unwrap();
    let err = verify_rpm(&tampered, &f.key.public, &f.key.fingerprint, &tools)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "rstudio-signature-invalid", "{err}");

    // Good digests but no signature at all.
    let err = verify_rpm(&f.unsigned, &f.key.public, &f.key.fingerprint, &tools)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "rstudio-signature-invalid", "{err}");

    // Not a key at all.
    let err = verify_rpm(&f.signed, &f.signed, &f.key.fingerprint, &tools)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "rstudio-signing-key-invalid", "{err}");
}

#[tokio::test]
async fn a_missing_tool_is_a_clear_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let tools = Tools {
        gpg: dir.path().join("no-gpg"),
        rpmkeys: dir.path().join("no-rpmkeys"),
    };
    let err = verify_rpm(
        &dir.path().join("x.rpm"),
        &dir.path().join("k.asc"),
        POSIT_FINGERPRINT,
        &tools,
    )
    .await
    .unwrap_err();
    assert_eq!(err.reason(), "rstudio-signature-tool-missing", "{err}");
}

/// Serve `files` (path → bytes) over HTTP on loopback until the test ends.
fn serve(files: Vec<(&'static str, Vec<u8>)>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let reply = match files.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(body);
                    r
                }
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_vec(),
            };
            let _ = stream.write_all(&reply);
        }
    });
    addr
}

fn rocky9_with(addr: SocketAddr, root: &Path) -> (RStudio, ServiceContext) {
    let rstudio = RStudio::new(
        RStudioSettings {
            package_url: Some(format!("http://{addr}/rstudio.rpm")),
            signing_key_url: Some(format!("http://{addr}/key.asc")),
            ..RStudioSettings::default()
        },
        Os {
            id: "rocky".into(),
            version_id: "9.4".into(),
            pretty_name: "Rocky Linux 9.4".into(),
            family: Family::RedHat,
            supported: true,
        },
    );
    let ctx = ServiceContext {
        paths: Paths::sandbox(root),
        account: Account {
            name: "exouser".into(),
            uid: 1000,
            gid: 1000,
            home: root.join("home/exouser"),
        },
        exe: "/usr/bin/exoagent".into(),
    };
    (rstudio, ctx)
}

#[tokio::test]
async fn the_el_fetch_downloads_then_checks_the_signature_and_keeps_only_a_good_package() {
    let Some(f) = fixture() else { return };
    let signed = std::fs::read(&f.signed).unwrap();
    let key = std::fs::read(&f.key.public).unwrap();

    // The fetch step as the service runs it: Posit's pinned fingerprint refuses the
    // throwaway key served as the signing key, and the downloaded package is removed.
    let addr = serve(vec![("/rstudio.rpm", signed.clone()), ("/key.asc", key.clone())]);
    let root = tempfile::tempdir().unwrap();
    let (rstudio, ctx) = rocky9_with(addr, root.path());
    let err = rstudio.fetch(&ctx).await.unwrap_err();
    assert_eq!(err.reason(), "rstudio-signing-key-mismatch", "{err}");
    let payload = root.path().join("opt/exoagent/rstudio");
    let left: Vec<_> = std::fs::read_dir(&payload)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "nothing unverified is kept: {left:?}");

    // The same download and check with the throwaway key's fingerprint pinned.
    let to = payload.join("rstudio.rpm");
    let url = format!("http://{addr}/rstudio.rpm");
    let key_url = format!("http://{addr}/key.asc");
    package::download_verified(&url, None, &to).await.unwrap();
    package::verify_signature(&to, &key_url, &f.key.fingerprint, &Tools::default())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&to).unwrap(), signed);

    // A tampered package is refused and removed.
    let mut tampered = signed;
    let at = tampered.len() - 10;
    tampered[at] ^= 0xff;
    let addr = serve(vec![("/rstudio.rpm", tampered), ("/key.asc", key)]);
    let to = payload.join("tampered.rpm");
    package::download_verified(&format!("http://{addr}/rstudio.rpm"), None, &to)
        .await
        .unwrap();
    let err = package::verify_signature(
        &to,
        &format!("http://{addr}/key.asc"),
        &f.key.fingerprint,
        &Tools::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reason(), "rstudio-signature-invalid", "{err}");
    assert!(!to.exists(), "the refused package was kept");
}
