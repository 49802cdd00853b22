//! Exosphere's launch choices — the JSON its user-data template fills in for
//! `{ansible-extra-vars}` (`{"guac_enabled":true,"gui_enabled":false}`) — read from the file the
//! drop-in template writes, and turned into a configuration layer.
//!
//! The layer sits after `/etc/exoagent/config.toml` and before the drop-ins, so an operator's
//! drop-in still wins. Problems are reported against the JSON file and the JSON key, not the
//! generated TOML.

use std::path::Path;

use serde_json::Value;

use crate::schema::{quote, ConfigError, ErrorKind};

/// The choices exoagent understands, and the configuration key each one sets.
const CHOICES: [(&str, &str, &str); 2] = [
    ("guac_enabled", "guacamole", "services.guacamole.enabled"),
    ("gui_enabled", "desktop", "services.desktop.enabled"),
];

/// What Exosphere's playbook does on every instance besides the services (its console-setup,
/// cloud-init-tweaks, base-setup and auto-mount-volumes roles): on whenever Exosphere's choices are present, so the
/// drop-in loses none of it; an operator's drop-in can still turn each off.
const PLAYBOOK: &str = "[host]\nconsole_autologin = true\nprivate_cloud_init_logs = true\n\
                        default_user_group = true\nbase_packages = true\n\
                        deferred_write_files = true\n\
                        [volumes]\nautomount = true\n";

/// Exosphere's custom-workflow variables and the `[services.jupyterlab]` key each sets: a
/// workflow is built natively (`services::jupyterlab::workflow`), and enables JupyterLab.
const WORKFLOW_KEYS: [(&str, &str); 3] = [
    ("workflow_source_repository", "workflow_repository"),
    ("workflow_repo_version", "workflow_ref"),
    ("workflow_path", "workflow_path"),
];

/// Translate the choices file's `text` into TOML for the loader, or report what is wrong with
/// it, naming `path` and the JSON key.
pub(crate) fn layer(path: &Path, text: &str) -> Result<String, Vec<ConfigError>> {
    let error = |key: Option<&str>, kind: ErrorKind, message: String| ConfigError {
        file: path.to_path_buf(),
        line: None,
        key: key.map(str::to_owned),
        message,
        kind,
    };
    let value: Value = serde_json::from_str(text).map_err(|e| {
        vec![ConfigError {
            line: Some(e.line()),
            ..error(
                None,
                ErrorKind::Syntax,
                format!("not valid JSON ({e}); expected Exosphere's choices such as {{\"guac_enabled\":true,\"gui_enabled\":false}}"),
            )
        }]
    })?;
    let Value::Object(object) = value else {
        return Err(vec![error(
            None,
            ErrorKind::WrongType,
            "expected a JSON object such as {\"guac_enabled\":true,\"gui_enabled\":false}"
                .to_owned(),
        )]);
    };
    let mut toml = PLAYBOOK.to_owned();
    let mut errors = Vec::new();
    // Exosphere leaves the workflow keys out without a workflow; an empty repository asks for
    // nothing (and then its ref and path mean nothing either).
    let workflow = object
        .get("workflow_source_repository")
        .is_some_and(|v| !matches!(v, Value::Null) && v.as_str() != Some(""));
    let mut workflow_toml = String::new();
    for (key, value) in &object {
        if let Some((_, service, _)) = CHOICES.iter().find(|(name, _, _)| name == key) {
            match value {
                Value::Bool(on) => {
                    toml.push_str(&format!("[services.{service}]\nenabled = {on}\n"))
                }
                other => errors.push(error(
                    Some(key),
                    ErrorKind::WrongType,
                    format!("expected true or false, found {}", shown(other)),
                )),
            }
        } else if let Some((_, toml_key)) = WORKFLOW_KEYS.iter().find(|(name, _)| name == key) {
            match value {
                // Empty: the default (or, for the repository, no workflow).
                Value::Null => {}
                Value::String(v) if v.is_empty() => {}
                Value::String(v) if workflow => {
                    // A path Exosphere's way ("lab/tree/x.ipynb") is a URL path from the root.
                    let v = if *toml_key == "workflow_path" && !v.starts_with('/') {
                        format!("/{v}")
                    } else {
                        v.clone()
                    };
                    workflow_toml.push_str(&format!("{toml_key} = {}\n", toml::Value::String(v)));
                }
                Value::String(_) => {}
                other => errors.push(error(
                    Some(key),
                    ErrorKind::WrongType,
                    format!("expected a string, found {}", shown(other)),
                )),
            }
        } else {
            let known: Vec<&str> = CHOICES.iter().map(|(name, _, _)| *name).collect();
            errors.push(error(
                Some(key),
                ErrorKind::UnknownKey,
                format!("unknown choice, expected one of: {}", known.join(", ")),
            ));
        }
    }
    if !workflow_toml.is_empty() {
        toml.push_str("[services.jupyterlab]\nenabled = true\n");
        toml.push_str(&workflow_toml);
    }
    if errors.is_empty() {
        Ok(toml)
    } else {
        Err(errors)
    }
}

/// A refused JSON value for a one-line message: strings quoted, shortened and with URL
/// credentials masked as in the TOML files' errors; containers only named (they may be huge).
fn shown(value: &Value) -> String {
    match value {
        Value::String(s) => format!("string {}", quote(s)),
        Value::Array(_) => "an array".to_owned(),
        Value::Object(_) => "an object".to_owned(),
        other => other.to_string(),
    }
}

/// Re-locate an error the merged configuration produced about the generated layer: the JSON
/// key instead of the TOML key, and no line (the TOML's lines are not the file's).
pub(crate) fn relocate(error: &mut ConfigError) {
    error.line = None;
    if let Some(key) = &error.key {
        if let Some((name, _, _)) = CHOICES.iter().find(|(_, _, toml)| toml == key) {
            error.key = Some((*name).to_owned());
        } else if let Some((name, _)) = WORKFLOW_KEYS
            .iter()
            .find(|(_, toml)| key.strip_prefix("services.jupyterlab.") == Some(*toml))
        {
            error.key = Some((*name).to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<ConfigError> {
        match layer(Path::new("/c.json"), text) {
            Ok(toml) => panic!("expected errors, got {toml:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn refused_values_are_shortened_and_masked() {
        let long = "x".repeat(10_000);
        let text =
            format!(r#"{{"guac_enabled":"http://u:hunter2@h/{long}","gui_enabled":[{long:?}]}}"#);
        let e = errors(&text);
        assert_eq!(e.len(), 2, "{e:?}");
        for e in &e {
            assert!(e.message.len() < 200, "{e}");
            assert!(!e.message.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn choices_become_service_switches() {
        let toml = layer(
            Path::new("/c.json"),
            r#"{"guac_enabled":true,"gui_enabled":false}"#,
        )
        .unwrap();
        assert_eq!(
            toml,
            format!("{PLAYBOOK}[services.guacamole]\nenabled = true\n[services.desktop]\nenabled = false\n")
        );
        assert_eq!(layer(Path::new("/c.json"), "{}").unwrap(), PLAYBOOK);
        // Exosphere's workflow keys, present but empty, ask for nothing.
        assert_eq!(
            layer(Path::new("/c.json"), r#"{"workflow_source_repository":""}"#).unwrap(),
            PLAYBOOK
        );
    }

    #[test]
    fn bad_choices_name_the_file_and_key() {
        let e = errors(r#"{"guac_enabled":"yes","desktop":true}"#);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].file, Path::new("/c.json"));
        let keys: Vec<_> = e.iter().map(|e| e.key.clone().unwrap()).collect();
        assert!(keys.contains(&"guac_enabled".to_owned()), "{e:?}");
        assert!(keys.contains(&"desktop".to_owned()), "{e:?}");
        assert!(e.iter().any(|e| e.kind == ErrorKind::WrongType));
        assert!(e.iter().any(|e| e.kind == ErrorKind::UnknownKey));

        let e = errors(r#"{"workflow_source_repository":true}"#);
        assert_eq!(e[0].kind, ErrorKind::WrongType);
        assert_eq!(e[0].key.as_deref(), Some("workflow_source_repository"));

        let e = errors("{\"guac_enabled\":\n tru}");
        assert_eq!(e[0].kind, ErrorKind::Syntax);
        assert_eq!(e[0].line, Some(2));
        assert_eq!(errors("[true]")[0].kind, ErrorKind::WrongType);
        // Still shell-escaped (the template put it where quotes are not undone).
        assert_eq!(
            errors(r#"{\"guac_enabled\":true}"#)[0].kind,
            ErrorKind::Syntax
        );
    }

    #[test]
    fn a_workflow_enables_jupyterlab_with_its_repository_ref_and_path() {
        let toml = layer(
            Path::new("/c.json"),
            r#"{"guac_enabled":false,"workflow_source_repository":"https://github.com/org/demo.git","workflow_repo_version":"v1\"\\x","workflow_path":"/lab/tree/a.ipynb"}"#,
        )
        .unwrap();
        assert!(toml.starts_with(PLAYBOOK), "{toml}");
        // The layer is TOML the loader reads (quotes in values stay inside the string).
        let parsed: toml::Table = toml.parse().unwrap();
        let jl = &parsed["services"]["jupyterlab"];
        assert_eq!(jl["enabled"].as_bool(), Some(true));
        assert_eq!(
            jl["workflow_repository"].as_str(),
            Some("https://github.com/org/demo.git")
        );
        assert_eq!(jl["workflow_ref"].as_str(), Some("v1\"\\x"));
        assert_eq!(jl["workflow_path"].as_str(), Some("/lab/tree/a.ipynb"));
        let toml = layer(
            Path::new("/c.json"),
            r#"{"workflow_source_repository":"https://h/r","workflow_path":"lab/tree/b.ipynb"}"#,
        )
        .unwrap();
        assert!(
            toml.contains("\nworkflow_path = \"/lab/tree/b.ipynb\"\n"),
            "{toml}"
        );
        // No repository: the ref and path ask for nothing.
        assert_eq!(
            layer(
                Path::new("/c.json"),
                r#"{"workflow_source_repository":"","workflow_repo_version":"main","workflow_path":"/lab"}"#
            )
            .unwrap(),
            PLAYBOOK
        );
    }

    #[test]
    fn a_workflow_through_the_loader_is_checked_and_reported_at_the_json_key() {
        let dir = tempfile::tempdir().unwrap();
        let paths = crate::paths::Paths::sandbox(dir.path());
        std::fs::create_dir_all(paths.exosphere_choices_file.parent().unwrap()).unwrap();
        let load = |json: &str| {
            std::fs::write(&paths.exosphere_choices_file, json).unwrap();
            crate::config::load(&paths)
        };
        let loaded = load(r#"{"workflow_source_repository":"https://github.com/org/demo.git","workflow_repo_version":"main"}"#).unwrap();
        match loaded.settings.services.first() {
            Some(crate::services::ServiceSettings::JupyterLab(j)) => {
                let w = j.workflow.as_ref().unwrap();
                assert_eq!(w.repository, "https://github.com/org/demo.git");
                assert_eq!(w.git_ref, "main");
                assert_eq!(w.path, "/lab");
            }
            other => panic!("{other:?}"),
        }
        let e =
            load(r#"{"workflow_source_repository":"https://u:hunter2@github.com/org/demo.git"}"#)
                .unwrap_err();
        assert_eq!(
            e.errors[0].key.as_deref(),
            Some("workflow_source_repository"),
            "{:?}",
            e.errors
        );
        assert!(
            !e.errors[0].message.contains("hunter2"),
            "{}",
            e.errors[0].message
        );
        let e = load(r#"{"workflow_source_repository":"https://h/r","workflow_repo_version":"--upload-pack=x"}"#).unwrap_err();
        assert_eq!(
            e.errors[0].key.as_deref(),
            Some("workflow_repo_version"),
            "{:?}",
            e.errors
        );
    }

    #[test]
    fn relocate_names_the_json_key() {
        let mut e = ConfigError {
            file: "/c.json".into(),
            line: Some(2),
            key: Some("services.desktop.enabled".into()),
            message: "m".into(),
            kind: ErrorKind::Unavailable,
        };
        relocate(&mut e);
        assert_eq!(e.key.as_deref(), Some("gui_enabled"));
        assert_eq!(e.line, None);
    }
}
