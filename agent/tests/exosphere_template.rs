//! The drop-in for Exosphere's user-data template, rendered as Exosphere renders it
//! (`tests/exosphere/userdata.py`: the same string replacements as `renderUserDataTemplate`)
//! for every combination of its choices, then split and merged by the real cloud-init's own
//! user-data processor and cloud-config part handler, and checked by `cloud-init schema` — both
//! Debian 12's installed cloud-init 22.4 (what the VM image runs) and Debian 13's 25.1
//! (unpacked by `tests/exosphere/newer-cloud-init.sh`, run by the prerequisites). The choices
//! file it writes is then read by the agent's own configuration loader.
//!
//! Booting it for real is the VM test's Exosphere scenario (`tests/vm/vm_test.py`).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{exe, repo_root, run_ok};
use exoagent::config;
use exoagent::paths::Paths;
use serde_json::Value;

const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExampleExample researcher@laptop";

/// The two cloud-inits: `None` is the installed one, `Some(site)` Debian 13's unpacked modules.
fn cloud_inits() -> Vec<Option<PathBuf>> {
    let out = run_ok(
        Command::new("bash").arg(repo_root().join("tests/exosphere/newer-cloud-init.sh")),
        "unpack Debian 13's cloud-init (installer/dev/prereqs.sh does this)",
    );
    let site = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    vec![None, Some(PathBuf::from(site))]
}

fn with_cloud_init(site: &Option<PathBuf>, script: &Path) -> Command {
    let mut command = Command::new("/usr/bin/python3");
    command.arg(script);
    if let Some(site) = site {
        command.env("PYTHONPATH", site);
    }
    command
}

fn schema_command(site: &Option<PathBuf>, file: &Path) -> Command {
    let mut command = match site {
        None => Command::new("cloud-init"),
        Some(site) => {
            let mut c = Command::new("/usr/bin/python3");
            c.arg(site.join("../../../bin/cloud-init"))
                .env("PYTHONPATH", site);
            c
        }
    };
    command.args(["schema", "--config-file"]).arg(file);
    command
}

/// `cloud-init schema` accepts `file`. One known exception, checked precisely rather than
/// skipped: Exosphere spells the exouser key `ssh-authorized-keys`, which cloud-init acts on in
/// every version but whose schema before 24.1 rejects inside a `users` entry (fixed upstream in
/// canonical/cloud-init#5162). For 22.4 the only complaint must be that entry, and the same
/// document with the key spelled `ssh_authorized_keys` must pass.
fn schema(site: &Option<PathBuf>, file: &Path) {
    let out = schema_command(site, file).output().unwrap();
    if out.status.success() {
        return;
    }
    let text = fs::read_to_string(file).unwrap();
    let report = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        site.is_none() && text.contains("    ssh-authorized-keys:\n"),
        "cloud-init schema ({site:?}) rejected {file:?}: {report}{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        report.contains("users.1:") && report.matches("users.").count() == 1,
        "{report}"
    );
    let respelled = file.with_extension("respelled.yaml");
    fs::write(
        &respelled,
        text.replace("    ssh-authorized-keys:\n", "    ssh_authorized_keys:\n"),
    )
    .unwrap();
    run_ok(
        &mut schema_command(site, &respelled),
        "cloud-init schema with the key respelled",
    );
    fs::remove_file(respelled).unwrap();
}

fn tool() -> PathBuf {
    repo_root().join("tests/exosphere/userdata.py")
}

fn template(args: &[&str]) -> String {
    let out = run_ok(
        Command::new(exe())
            .args(["userdata", "--exosphere-template"])
            .args(args),
        "userdata --exosphere-template",
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_committed_templates_are_current() {
    let update = std::env::var("EXOAGENT_UPDATE_EXAMPLES").as_deref() == Ok("1");
    let dir = repo_root().join("cloud-init/exosphere");
    for (name, args) in [
        ("user-data.template", vec![]),
        (
            "user-data-bootstrap.template",
            vec![
                "--delivery",
                "bootstrap",
                "--binary-url",
                "https://downloads.example.org/exoagent/0.1.0/exoagent-x86_64-linux",
                "--binary-sha256",
                SHA,
            ],
        ),
    ] {
        let rendered = template(&args);
        let path = dir.join(name);
        if update {
            fs::create_dir_all(&dir).unwrap();
            fs::write(&path, &rendered).unwrap();
        }
        assert_eq!(
            fs::read_to_string(&path).unwrap_or_default(),
            rendered,
            "cloud-init/exosphere/{name} is stale; rerun with EXOAGENT_UPDATE_EXAMPLES=1"
        );
    }
}

/// What the agent makes of the choices file the userdata writes.
fn agent_config(choices: &str) -> Result<config::Loaded, config::ConfigErrors> {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::sandbox(dir.path());
    fs::create_dir_all(paths.exosphere_choices_file.parent().unwrap()).unwrap();
    fs::write(&paths.exosphere_choices_file, choices).unwrap();
    config::load(&paths)
}

#[test]
fn every_rendering_is_valid_and_means_what_exosphere_asked() {
    let sites = cloud_inits();
    let work = tempfile::tempdir().unwrap();
    let clouds = work.path().join("clouds.yaml");
    fs::write(
        &clouds,
        "clouds:\n  demo_RegionOne:\n    auth_type: v3applicationcredential\n    auth:\n      \
         auth_url: https://keystone.example.org:5000/v3\n      application_credential_id: a\n      \
         application_credential_secret: s\n    region_name: RegionOne\n",
    )
    .unwrap();
    let mut renderings = 0;
    for delivery in [
        vec![],
        vec![
            "--delivery",
            "bootstrap",
            "--binary-url",
            "https://d.example.org/exoagent",
            "--binary-sha256",
            SHA,
        ],
    ] {
        let template_file = work.path().join("template");
        fs::write(&template_file, template(&delivery)).unwrap();
        // Every value of every choice, and every pair of Guacamole/desktop, at least once.
        for (key, updates, guac, gui, credentials) in [
            (false, true, false, false, false),
            (true, false, true, false, true),
            (true, true, true, true, false),
            (false, false, false, true, true),
        ] {
            let mut render = Command::new("python3");
            render.arg(tool()).arg("render").arg(&template_file);
            if key {
                render.args(["--ssh-key", KEY]);
            }
            if !updates {
                render.arg("--no-os-updates");
            }
            if guac {
                render.arg("--guac");
            }
            if gui {
                render.arg("--gui");
            }
            if credentials {
                render.arg("--credentials").arg(&clouds);
            }
            let userdata = run_ok(&mut render, "render as Exosphere does").stdout;
            let file = work.path().join("userdata");
            fs::write(&file, &userdata).unwrap();
            renderings += 1;
            for site in &sites {
                let parts = work.path().join("parts");
                let _ = fs::remove_dir_all(&parts);
                fs::create_dir(&parts).unwrap();
                run_ok(
                    with_cloud_init(site, &tool())
                        .arg("parts")
                        .arg(&file)
                        .arg(&parts),
                    "split",
                );
                let mut found = 0;
                for part in fs::read_dir(&parts).unwrap() {
                    schema(site, &part.unwrap().path());
                    found += 1;
                }
                assert_eq!(found, 2, "two cloud-config parts");
                let merged = run_ok(
                    with_cloud_init(site, &tool()).arg("merged").arg(&file),
                    "merge",
                );
                let merged: Value = serde_json::from_slice(&merged.stdout).unwrap();
                assert_eq!(merged["users"][0], "default");
                let exouser = &merged["users"][1];
                assert_eq!(exouser["name"], "exouser");
                assert_eq!(exouser["shell"], "/bin/bash");
                assert_eq!(exouser["sudo"], "ALL=(ALL) NOPASSWD:ALL");
                if key {
                    assert_eq!(exouser["ssh-authorized-keys"][0], KEY);
                } else {
                    assert!(exouser.get("ssh-authorized-keys").is_none());
                }
                assert_eq!(merged["package_upgrade"], updates);
                assert_eq!(merged["ssh_pwauth"], true);
                let files = merged["write_files"].as_array().unwrap();
                assert_eq!(files.len(), if credentials { 3 } else { 1 }, "{merged}");
                assert_eq!(files[0]["path"], "/etc/exoagent/exosphere-choices.json");
                for file in &files[1..] {
                    assert_eq!(file["owner"], "exouser:exouser");
                    assert_eq!(file["permissions"], "0400");
                    assert_eq!(file["defer"], true);
                }
                let choices = files[0]["content"].as_str().unwrap();
                let asked: Value = serde_json::from_str(choices).unwrap();
                assert_eq!(asked["guac_enabled"], guac);
                assert_eq!(asked["gui_enabled"], gui);
                let loaded = agent_config(choices).unwrap_or_else(|e| panic!("{choices}: {e}"));
                let kinds: Vec<&str> = loaded
                    .settings
                    .services
                    .iter()
                    .map(|s| s.kind().as_str())
                    .collect();
                let mut expected = Vec::new();
                if gui {
                    expected.push("desktop");
                }
                if guac {
                    expected.push("guacamole");
                }
                assert_eq!(kinds, expected, "{choices}");
                // Exosphere's images mount attached volumes.
                assert!(loaded.settings.volumes.automount, "{choices}");
                let runcmd = &merged["runcmd"][0];
                if delivery.is_empty() {
                    assert_eq!(runcmd[0], "systemctl");
                } else {
                    assert_eq!(runcmd[4], "https://d.example.org/exoagent");
                    assert_eq!(runcmd[5], SHA);
                }
            }
        }
    }
    assert_eq!(renderings, 8);
}

#[test]
fn a_workflow_enables_jupyterlab_with_it() {
    let work = tempfile::tempdir().unwrap();
    let template_file = work.path().join("template");
    fs::write(&template_file, template(&[])).unwrap();
    let render = |repo: &str| {
        let userdata = run_ok(
            Command::new("python3")
                .arg(tool())
                .arg("render")
                .arg(&template_file)
                .args(["--workflow", repo]),
            "render",
        )
        .stdout;
        let file = work.path().join("userdata");
        fs::write(&file, userdata).unwrap();
        let merged = run_ok(
            with_cloud_init(&None, &tool()).arg("merged").arg(&file),
            "merge",
        );
        let merged: Value = serde_json::from_slice(&merged.stdout).unwrap();
        agent_config(merged["write_files"][0]["content"].as_str().unwrap())
    };
    let loaded = render("https://github.com/example/binder-repo").unwrap();
    let jupyterlab = loaded
        .settings
        .services
        .iter()
        .find_map(|s| match s {
            exoagent::services::ServiceSettings::JupyterLab(j) => Some(j),
            _ => None,
        })
        .expect("a workflow enables JupyterLab");
    let workflow = jupyterlab.workflow.as_ref().expect("the workflow");
    assert_eq!(
        workflow.repository,
        "https://github.com/example/binder-repo"
    );
    assert_eq!(workflow.git_ref, "HEAD");
    assert_eq!(workflow.path, "/lab");
    assert!(jupyterlab.exosphere_link);

    // A repository URL with credentials is refused at the JSON key, without the secret.
    let e = render("https://user:hunter2@github.com/example/binder-repo").unwrap_err();
    assert_eq!(e.errors.len(), 1, "{e}");
    assert_eq!(
        e.errors[0].key.as_deref(),
        Some("workflow_source_repository")
    );
    assert!(e.to_string().contains("exosphere-choices.json"), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[test]
fn the_schema_check_still_fails_on_a_real_mistake() {
    let work = tempfile::tempdir().unwrap();
    let part = work.path().join("part.yaml");
    // The known 22.4 complaint (the key's spelling) plus a real mistake in the same entry.
    fs::write(
        &part,
        "#cloud-config\nusers:\n  - default\n  - name: exouser\n    shel: /bin/bash\n    \
         ssh-authorized-keys:\n      - ssh-ed25519 AAAA x\n",
    )
    .unwrap();
    for site in cloud_inits() {
        let result = std::panic::catch_unwind(|| schema(&site, &part));
        assert!(result.is_err(), "{site:?} accepted an unknown key");
    }
}
