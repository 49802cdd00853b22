//! Configuration errors from real files: one test per class of bad input, each checking that the
//! message names the file, the dotted key and the line.

use std::fs;
use std::path::{Path, PathBuf};

use exoagent::config::{self, ConfigError, ErrorKind};
use exoagent::paths::Paths;

/// A sandbox root with the config directories created.
struct Sandbox {
    _dir: tempfile::TempDir,
    paths: Paths,
}

impl Sandbox {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::sandbox(dir.path());
        fs::create_dir_all(&paths.vendor_config_dir).unwrap();
        fs::create_dir_all(&paths.config_dropin_dir).unwrap();
        Self { _dir: dir, paths }
    }

    fn dropin(&self, name: &str, text: &str) -> PathBuf {
        let path = self.paths.config_dropin_dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    fn errors(&self) -> Vec<ConfigError> {
        match config::load(&self.paths) {
            Ok(loaded) => panic!("expected errors, got {:?}", loaded.settings),
            Err(e) => {
                assert_eq!(e.reason(), "config-invalid");
                // Display is one line per error, in the same order.
                let shown = e.to_string();
                assert_eq!(shown.lines().count(), e.errors.len(), "{shown}");
                e.errors
            }
        }
    }

    /// The only error, after checking it names `file`, `line` and `key` in the display too.
    fn single(&self, file: &Path, line: Option<usize>, key: Option<&str>) -> ConfigError {
        let errors = self.errors();
        assert_eq!(errors.len(), 1, "{errors:#?}");
        let e = errors.into_iter().next().unwrap();
        assert_eq!(e.file, file, "{e}");
        assert_eq!(e.line, line, "{e}");
        assert_eq!(e.key.as_deref(), key, "{e}");
        let shown = e.to_string();
        let mut prefix = file.display().to_string();
        if let Some(line) = line {
            prefix.push_str(&format!(":{line}"));
        }
        if let Some(key) = key {
            prefix.push_str(&format!(": {key}"));
        }
        assert!(shown.starts_with(&format!("{prefix}: ")), "{shown}");
        e
    }
}

#[test]
fn unknown_key() {
    let sb = Sandbox::new();
    let file = sb.dropin(
        "10-x.toml",
        "# comment\n[services.jupyterlab]\nenabled = true\nprot = 8888\n",
    );
    let e = sb.single(&file, Some(4), Some("services.jupyterlab.prot"));
    assert_eq!(e.kind, ErrorKind::UnknownKey);
    assert!(e.message.contains("unknown key"), "{e}");
    assert!(e.message.contains("port"), "the known keys are listed: {e}");
}

#[test]
fn unknown_top_level_section() {
    let sb = Sandbox::new();
    let file = sb.dropin("10-x.toml", "\n\n[servics.jupyterlab]\nenabled = true\n");
    let e = sb.single(&file, Some(3), Some("servics"));
    assert_eq!(e.kind, ErrorKind::UnknownKey);
    assert!(e.message.contains("services"), "{e}");
}

#[test]
fn unknown_service_lists_the_known_ones() {
    let sb = Sandbox::new();
    let file = sb.dropin(
        "10-x.toml",
        "[services.jupyterlab]\nenabled = true\n\n[services.foo]\nenabled = true\n",
    );
    let e = sb.single(&file, Some(4), Some("services.foo"));
    assert_eq!(e.kind, ErrorKind::UnknownKey);
    for known in ["jupyterlab", "rstudio", "desktop", "guacamole"] {
        assert!(e.message.contains(known), "{e}");
    }
}

#[test]
fn wrong_type() {
    let sb = Sandbox::new();
    let file = sb.dropin(
        "10-x.toml",
        "[services.jupyterlab]\nenabled = true\nport = \"x\"\n",
    );
    let e = sb.single(&file, Some(3), Some("services.jupyterlab.port"));
    assert_eq!(e.kind, ErrorKind::WrongType);
    assert_eq!(
        e.message,
        "invalid type string \"x\", expected a port 1-65535"
    );
}

#[test]
fn out_of_range_port_too_high() {
    let sb = Sandbox::new();
    let file = sb.dropin(
        "10-x.toml",
        "[services.jupyterlab]\nenabled = true\n\nport = 70000\n",
    );
    let e = sb.single(&file, Some(4), Some("services.jupyterlab.port"));
    assert_eq!(e.kind, ErrorKind::OutOfRange);
    assert_eq!(
        e.to_string(),
        format!(
            "{}:4: services.jupyterlab.port: invalid value 70000, expected a port 1-65535",
            file.display()
        )
    );
}

#[test]
fn out_of_range_port_zero() {
    let sb = Sandbox::new();
    let file = sb.dropin("10-x.toml", "[services.jupyterlab]\nport = 0\n");
    let e = sb.single(&file, Some(2), Some("services.jupyterlab.port"));
    assert_eq!(e.kind, ErrorKind::OutOfRange);
    assert!(e.message.contains("invalid value 0"), "{e}");
}

#[test]
fn invalid_bind_address() {
    let sb = Sandbox::new();
    let file = sb.dropin("10-x.toml", "[services.jupyterlab]\nbind = \"nope\"\n");
    let e = sb.single(&file, Some(2), Some("services.jupyterlab.bind"));
    assert_eq!(e.kind, ErrorKind::InvalidValue);
    assert_eq!(e.message, "invalid value \"nope\", expected an IP address");
}

#[test]
fn invalid_installer() {
    let sb = Sandbox::new();
    let file = sb.dropin(
        "10-x.toml",
        "[services.jupyterlab]\nenabled = true\ninstaller = \"conda\"\n",
    );
    let e = sb.single(&file, Some(3), Some("services.jupyterlab.installer"));
    assert_eq!(e.kind, ErrorKind::InvalidValue);
    assert!(e.message.contains("\"conda\""), "{e}");
    assert!(e.message.contains("auto, uv, pip"), "{e}");
}

#[test]
fn root_or_a_malformed_name_is_not_an_instance_user() {
    let sb = Sandbox::new();
    let file = sb.dropin("10-x.toml", "[instance]\nuser = \"root\"\n");
    let e = sb.single(&file, Some(2), Some("instance.user"));
    assert_eq!(e.kind, ErrorKind::InvalidValue);
    assert!(e.message.contains("unprivileged"), "{e}");

    let sb = Sandbox::new();
    let file = sb.dropin("10-x.toml", "[instance]\nuser = \"Bad User\"\n");
    let e = sb.single(&file, Some(2), Some("instance.user"));
    assert!(e.message.contains("\"Bad User\""), "{e}");
}

#[test]
fn toml_syntax_error() {
    let sb = Sandbox::new();
    let file = sb.dropin(
        "10-x.toml",
        "[services.jupyterlab]\nenabled = true\nport = = 1\n",
    );
    let e = sb.single(&file, Some(3), None);
    assert_eq!(e.kind, ErrorKind::Syntax);
    assert!(e.message.starts_with("TOML syntax error: "), "{e}");
    assert!(!e.message.contains('\n'), "{e:?}");
}

#[test]
fn duplicate_key_is_a_syntax_error_on_its_line() {
    let sb = Sandbox::new();
    let file = sb.dropin("10-x.toml", "[services.jupyterlab]\nport = 1\nport = 2\n");
    let e = sb.single(&file, Some(3), None);
    assert_eq!(e.kind, ErrorKind::Syntax);
}

#[test]
fn unreadable_file_that_is_a_directory() {
    // Tests run as root, and root reads a chmod 000 file anyway; a directory named like a
    // config file fails to read for everyone (EISDIR).
    let sb = Sandbox::new();
    let dir = sb.paths.config_dropin_dir.join("20-dir.toml");
    fs::create_dir(&dir).unwrap();
    let e = sb.single(&dir, None, None);
    assert_eq!(e.kind, ErrorKind::Unreadable);
    assert!(e.message.starts_with("failed to read config file: "), "{e}");
    assert!(
        e.message.contains("os error 21"),
        "the OS error is named: {e}"
    );
}

#[test]
fn unreadable_file_that_is_a_dangling_symlink() {
    // Root can read any mode, so a dangling symlink stands in for "cannot be opened": it is
    // listed as a config file but opening it fails with ENOENT.
    let sb = Sandbox::new();
    let link = sb.paths.config_dropin_dir.join("30-gone.toml");
    std::os::unix::fs::symlink(sb.paths.config_dropin_dir.join("missing"), &link).unwrap();
    let e = sb.single(&link, None, None);
    assert_eq!(e.kind, ErrorKind::Unreadable);
    assert!(e.message.contains("os error 2"), "{e}");
}

#[test]
fn main_config_file_that_is_a_dangling_symlink_is_an_error_not_skipped() {
    let sb = Sandbox::new();
    fs::create_dir_all(sb.paths.config_file.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink("/nonexistent/exoagent.toml", &sb.paths.config_file).unwrap();
    let e = sb.single(&sb.paths.config_file, None, None);
    assert_eq!(e.kind, ErrorKind::Unreadable);
}

#[test]
fn invalid_utf8_is_unreadable() {
    let sb = Sandbox::new();
    let path = sb.paths.config_dropin_dir.join("10-x.toml");
    fs::write(&path, b"[instance]\nuser = \"\xff\"\n").unwrap();
    let e = sb.single(&path, None, None);
    assert_eq!(e.kind, ErrorKind::Unreadable);
}

#[test]
fn config_dir_that_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::sandbox(dir.path());
    fs::create_dir_all(paths.config_dropin_dir.parent().unwrap()).unwrap();
    fs::write(&paths.config_dropin_dir, "").unwrap();
    let e = match config::load(&paths) {
        Ok(_) => panic!("a file where the drop-in directory belongs must fail"),
        Err(e) => e.errors,
    };
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].file, paths.config_dropin_dir);
    assert!(e[0].message.starts_with("failed to list config directory"));
}

#[test]
fn enabling_an_unknown_service() {
    let sb = Sandbox::new();
    let file = sb.dropin(
        "10-x.toml",
        "\n[services.notaservice]\nport = 8787\nenabled = true\n",
    );
    let e = sb.single(&file, Some(2), Some("services.notaservice"));
    assert_eq!(e.kind, ErrorKind::UnknownKey);
    assert!(
        e.message
            .starts_with("unknown service, known services: jupyterlab, "),
        "{}",
        e.message
    );
}

#[test]
fn semantic_errors_point_at_the_file_that_set_the_winning_value() {
    let sb = Sandbox::new();
    // The vendor file asks for root, the main file for another user, a drop-in for root again:
    // the drop-in holds the winning value.
    fs::write(
        sb.paths.vendor_config_dir.join("10-image.toml"),
        "[instance]\nuser = \"root\"\n",
    )
    .unwrap();
    fs::create_dir_all(sb.paths.config_file.parent().unwrap()).unwrap();
    fs::write(&sb.paths.config_file, "[instance]\nuser = \"alice\"\n").unwrap();
    let file = sb.dropin("50-x.toml", "\n\n[instance]\nuser = \"root\"\n");
    let e = sb.single(&file, Some(4), Some("instance.user"));
    assert_eq!(e.kind, ErrorKind::InvalidValue);
}

#[test]
fn every_file_and_every_error_is_reported() {
    let sb = Sandbox::new();
    fs::write(
        sb.paths.vendor_config_dir.join("10-image.toml"),
        "[services.jupyterlab]\nport = 0\n",
    )
    .unwrap();
    let dir = sb.paths.config_dropin_dir.join("20-dir.toml");
    fs::create_dir(&dir).unwrap();
    let a = sb.dropin(
        "10-a.toml",
        "[services.jupyterlab]\nenabled = true\nbind = \"nope\"\nport = \"x\"\n",
    );
    let b = sb.dropin("30-b.toml", "[instance]\nuser = \"root\"\n");
    let errors = sb.errors();
    let got: Vec<(PathBuf, Option<usize>, Option<&str>, ErrorKind)> = errors
        .iter()
        .map(|e| (e.file.clone(), e.line, e.key.as_deref(), e.kind))
        .collect();
    let vendor = sb.paths.vendor_config_dir.join("10-image.toml");
    let want = vec![
        (
            vendor,
            Some(2),
            Some("services.jupyterlab.port"),
            ErrorKind::OutOfRange,
        ),
        (
            a.clone(),
            Some(3),
            Some("services.jupyterlab.bind"),
            ErrorKind::InvalidValue,
        ),
        (
            a,
            Some(4),
            Some("services.jupyterlab.port"),
            ErrorKind::WrongType,
        ),
        (dir, None, None, ErrorKind::Unreadable),
        (b, Some(2), Some("instance.user"), ErrorKind::InvalidValue),
    ];
    assert_eq!(got, want, "{errors:#?}");
}

#[test]
fn a_valid_layout_loads() {
    let sb = Sandbox::new();
    fs::write(
        sb.paths.vendor_config_dir.join("10-image.toml"),
        config::EXAMPLE_CONFIG,
    )
    .unwrap();
    sb.dropin(
        "50-jupyterlab.toml",
        "[services.jupyterlab]\nenabled = true\nbase_url = \"/lab\"\n",
    );
    let loaded = config::load(&sb.paths).unwrap();
    assert_eq!(loaded.files.len(), 2);
    let [config::ServiceSettings::JupyterLab(j)] = loaded.settings.services.as_slice() else {
        panic!("{:?}", loaded.settings.services);
    };
    assert_eq!(j.base_url, "/lab/");
    assert_eq!(j.port, 8888);
}
