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
                        [volumes]\nautomount = true\n";

/// Exosphere's experimental custom-workflow variables (repo2docker), which exoagent does not
/// run; asking for one is an error rather than being silently dropped.
const WORKFLOW_KEYS: [&str; 3] = [
    "workflow_source_repository",
    "workflow_repo_version",
    "workflow_path",
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
        } else if WORKFLOW_KEYS.contains(&key.as_str()) {
            // Exosphere leaves these out without a workflow; an empty value asks for nothing.
            if !matches!(value, Value::Null) && value.as_str() != Some("") {
                errors.push(error(
                    Some(key),
                    ErrorKind::Unavailable,
                    "custom workflows (repo2docker) are not available in exoagent; \
                     launch without a workflow and enable services.jupyterlab instead"
                        .to_owned(),
                ));
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

        let e = errors(r#"{"workflow_source_repository":"https://example.org/r.git"}"#);
        assert_eq!(e[0].kind, ErrorKind::Unavailable);
        assert!(e[0].message.contains("workflows"), "{}", e[0].message);

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
