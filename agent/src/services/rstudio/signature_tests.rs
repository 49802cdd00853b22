//! The rpm signature check for real: a tiny rpm built with `rpmbuild` and signed with
//! `rpmsign` by a throwaway key made with `gpg` passes; another key, a key that is not the
//! pinned one, a tampered file and an unsigned package are refused with their reasons. The
//! tools come from Debian's `rpm` and `gpg` packages (`installer/dev/prereqs.sh`); under
//! `CI=true` a missing tool fails the test instead of skipping it.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::signature::{self, verify_rpm, Tools, POSIT_FINGERPRINT};

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
