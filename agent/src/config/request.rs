//! The cloud's request: the instance metadata item [`REQUEST_KEY`] (set through Nova's server
//! metadata, read back from the metadata service's `meta_data.json` → `meta`), a versioned JSON
//! object changing the configuration of a running instance:
//! `{"v":1,"services":{"desktop":{"enabled":true},"jupyterlab":{"base_url":"/lab/"}}}`.
//!
//! It is turned into a configuration layer above every file, so it is checked exactly like a
//! file's keys. Problems are reported against the metadata key and the JSON key, not the
//! generated TOML. The accepted request is kept in [`Paths::cloud_request_file`] so a restart
//! or a reboot applies it before the metadata service is asked again.

use std::path::Path;

use serde_json::Value;

use crate::schema::{ConfigError, ErrorKind};

/// The metadata key holding the request.
pub const REQUEST_KEY: &str = "exoAgentRequest";

/// The request format's version this agent reads.
pub const REQUEST_VERSION: u64 = 1;

/// The sections a request may change (each as in a configuration file).
pub const REQUEST_SECTIONS: [&str; 3] = ["services", "idle", "alerts"];

/// The name problems with a request are reported under (no file holds it on the cloud side).
pub fn display_name() -> &'static Path {
    Path::new("exoAgentRequest (instance metadata)")
}

/// Translate the request's `text` into TOML for the loader, or report what is wrong with it.
pub(crate) fn layer(text: &str) -> Result<String, Vec<ConfigError>> {
    let error = |key: Option<String>, kind: ErrorKind, message: String| {
        vec![ConfigError {
            file: display_name().to_path_buf(),
            line: None,
            key,
            message,
            kind,
        }]
    };
    let value: Value = serde_json::from_str(text).map_err(|e| {
        error(
            None,
            ErrorKind::Syntax,
            format!(
                "not valid JSON ({e}); expected {{\"v\":{REQUEST_VERSION},\"services\":{{\"desktop\":{{\"enabled\":true}}}}}}"
            ),
        )
    })?;
    let Value::Object(mut object) = value else {
        return Err(error(
            None,
            ErrorKind::WrongType,
            "expected a JSON object".to_owned(),
        ));
    };
    match object.remove("v") {
        Some(Value::Number(n)) if n.as_u64() == Some(REQUEST_VERSION) => {}
        Some(other) => {
            return Err(error(
                Some("v".into()),
                ErrorKind::InvalidValue,
                format!(
                    "unsupported version {other}; this exoagent reads version {REQUEST_VERSION}"
                ),
            ))
        }
        None => {
            return Err(error(
                Some("v".into()),
                ErrorKind::InvalidValue,
                format!("missing; expected \"v\":{REQUEST_VERSION}"),
            ))
        }
    }
    let mut problems = Vec::new();
    for (key, section) in &object {
        if !REQUEST_SECTIONS.contains(&key.as_str()) {
            problems.extend(error(
                Some(key.clone()),
                ErrorKind::UnknownKey,
                format!(
                    "unknown key; a request may set {}",
                    REQUEST_SECTIONS.join(", ")
                ),
            ));
        } else if !section.is_object() {
            problems.extend(error(
                Some(key.clone()),
                ErrorKind::WrongType,
                "expected a JSON object".to_owned(),
            ));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let table = toml::Value::try_from(Value::Object(object)).map_err(|e| {
        error(
            None,
            ErrorKind::InvalidValue,
            format!("a value TOML cannot hold (JSON null?): {e}"),
        )
    })?;
    toml::to_string(&table).map_err(|e| {
        error(
            None,
            ErrorKind::InvalidValue,
            format!("cannot be written as configuration: {e}"),
        )
    })
}

/// A request's errors from the generated TOML, reported against the request: no line numbers
/// (they are the generated text's).
pub(crate) fn relocate(error: &mut ConfigError) {
    error.line = None;
    error.file = display_name().to_path_buf();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_becomes_the_layer_its_keys_say() {
        let toml = layer(r#"{"v":1,"services":{"desktop":{"enabled":true,"geometry":"1280x800"}},"idle":{"after_s":600}}"#).unwrap();
        let parsed: toml::Table = toml.parse().unwrap();
        assert_eq!(
            parsed["services"]["desktop"]["enabled"].as_bool(),
            Some(true)
        );
        assert_eq!(
            parsed["services"]["desktop"]["geometry"].as_str(),
            Some("1280x800")
        );
        assert_eq!(parsed["idle"]["after_s"].as_integer(), Some(600));
        assert!(parsed.get("v").is_none());
    }

    #[test]
    fn a_bad_request_names_what_is_wrong() {
        let first = |text: &str| layer(text).unwrap_err().remove(0);
        let e = first("{not json");
        assert_eq!(e.kind, ErrorKind::Syntax);
        assert_eq!(e.file, display_name());
        let e = first(r#"{"services":{}}"#);
        assert_eq!(e.key.as_deref(), Some("v"));
        let e = first(r#"{"v":2,"services":{}}"#);
        assert!(e.message.contains("unsupported version 2"), "{e}");
        let e = first(r#"{"v":1,"cloud":{"clouds_yaml":"/x"}}"#);
        assert_eq!(e.key.as_deref(), Some("cloud"));
        assert_eq!(e.kind, ErrorKind::UnknownKey);
        let e = first(r#"{"v":1,"services":[]}"#);
        assert_eq!(e.kind, ErrorKind::WrongType);
        let e = first(r#"{"v":1,"services":{"desktop":{"enabled":null}}}"#);
        assert_eq!(e.kind, ErrorKind::InvalidValue);
        assert!(matches!(layer("[1]"), Err(e) if e[0].kind == ErrorKind::WrongType));
    }
}
