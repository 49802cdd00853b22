//! JupyterLab one click away in the unmodified Exosphere UI: the token Exosphere's notebook link
//! carries (random, 0600), the `{"exoWorkflowToken":…}` console line Exosphere reads it from, and
//! the `exoCustomWorkflow` server metadata that makes Exosphere show the link at all.
//!
//! Exosphere builds the link as `https://http-<floating ip>-8888.<uap host><path>/?token=<token>`
//! (`src/Helpers/Interaction.elm`): the port is always 8888, so the link is only offered when
//! JupyterLab's public port is 8888.

use std::path::Path;

use serde_json::json;

use crate::platform::passphrase::{read_private_file, store_private_file, SecretError};

/// The only port Exosphere's notebook link leads to.
pub const EXOSPHERE_PORT: u16 = 8888;

/// Exosphere's metadata key for a custom workflow.
pub const CUSTOM_WORKFLOW_KEY: &str = "exoCustomWorkflow";

/// The JSON key of Exosphere's token console line.
pub const TOKEN_LINE_KEY: &str = "exoWorkflowToken";

/// Hex characters in a token (Jupyter Server's own tokens have 48).
const TOKEN_HEX_LEN: usize = 48;

/// The token in Exosphere's notebook link. Its `Debug` shows no secret.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkToken(String);

impl std::fmt::Debug for LinkToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkToken(..)")
    }
}

impl LinkToken {
    /// A fresh random token (24 bytes from the OS, hex).
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut bytes = [0u8; TOKEN_HEX_LEN / 2];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(data_encoding::HEXLOWER.encode(&bytes))
    }

    /// The token, for the places that must hold it: JupyterLab's 0600 configuration and the
    /// console line.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A short digest that tells tokens apart without revealing them: in JupyterLab's run
    /// spec, so a rotated token restarts JupyterLab with it.
    pub fn fingerprint(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.0.as_bytes());
        data_encoding::HEXLOWER.encode(&digest.as_ref()[..8])
    }

    /// The token stored at `path`, if there is one (a file others can read is refused).
    pub fn load(path: &Path) -> Result<Option<Self>, SecretError> {
        let Some(text) = read_private_file(path)? else {
            return Ok(None);
        };
        let token = text.trim();
        if token.len() != TOKEN_HEX_LEN
            || !token
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(SecretError::NotAToken {
                path: path.to_path_buf(),
                what: "48 lower-case hex digits",
            });
        }
        Ok(Some(Self(token.to_owned())))
    }

    /// The token at `path`, or a new one stored there (0600).
    pub fn load_or_create(path: &Path) -> Result<Self, SecretError> {
        match Self::load(path)? {
            Some(token) => Ok(token),
            None => Self::rotate(path),
        }
    }

    /// Replace whatever is at `path` with a new token.
    pub fn rotate(path: &Path) -> Result<Self, SecretError> {
        let token = Self::generate();
        store_private_file(path, format!("{}\n", token.0).as_bytes())?;
        Ok(token)
    }
}

/// Before JupyterLab starts: the link's token when `settings` offer the link (kept, or created
/// on first use), else `None` with any earlier token removed so it stops working.
pub fn prepare(
    settings: &super::JupyterLabSettings,
    paths: &crate::paths::Paths,
) -> Result<Option<LinkToken>, SecretError> {
    let path = paths.jupyterlab_link_token();
    if settings.exosphere_link {
        return LinkToken::load_or_create(&path).map(Some);
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SecretError::Io {
            action: "remove",
            path,
            source,
        }),
    }
}

/// `{"exoWorkflowToken":"<token>"}`: the line Exosphere's `parseConsoleLogForWorkflowToken`
/// decodes (from the first `{`; the last decodable line wins).
pub fn token_line(token: &LinkToken) -> String {
    json!({ TOKEN_LINE_KEY: token.expose() }).to_string()
}

/// The `exoCustomWorkflow` value, in Exosphere's exact encoding (`encodeCustomWorkflowSource`:
/// `v`, `repo`, `ref`, `path` in that order, no spaces): what runs is JupyterLab at its pinned
/// version, and `path` is its URL path under `base_url` (Exosphere appends `/?token=…`).
pub fn custom_workflow_value(jupyterlab_version: &str, base_url: &str) -> String {
    // serde_json keeps insertion order only with `preserve_order`; build the text explicitly.
    format!(
        "{{\"v\":1,\"repo\":{},\"ref\":{},\"path\":{}}}",
        json!("https://github.com/jupyterlab/jupyterlab"),
        json!(format!("v{jupyterlab_version}")),
        json!(format!("{base_url}lab")),
    )
}

/// The `exoCustomWorkflow` value for a workflow exoagent builds, in the same encoding: its
/// repository, ref, and path under `base_url`. (When Exosphere launched the workflow it has set
/// its own value, which is kept.)
pub fn workflow_value(workflow: &super::workflow::WorkflowSettings, base_url: &str) -> String {
    format!(
        "{{\"v\":1,\"repo\":{},\"ref\":{},\"path\":{}}}",
        json!(workflow.repository),
        json!(workflow.git_ref),
        json!(format!("{}{}", base_url.trim_end_matches('/'), workflow.path)),
    )
}

/// The JupyterLab version the lock `requirements` pins for the newest Pythons: the
/// `jupyterlab==X \` line with no environment marker, or whose marker puts no upper bound on
/// the Python (`jupyterlab==X ; python_full_version >= '3.10' \`, not the `< '3.10'` one).
pub fn pinned_version(requirements: &str) -> Option<&str> {
    requirements.lines().find_map(|line| {
        let rest = line.strip_prefix("jupyterlab==")?.trim_end_matches(['\\', ' ']);
        match rest.split_once(';') {
            None => Some(rest.trim()),
            Some((version, marker)) => (!marker.contains('<')).then_some(version.trim()),
        }
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_workflow_is_described_by_its_own_repository_ref_and_path() {
        let workflow = crate::services::jupyterlab::workflow::WorkflowSettings {
            repository: "https://github.com/org/demo".into(),
            git_ref: "main".into(),
            path: "/lab/tree/a.ipynb".into(),
        };
        assert_eq!(
            workflow_value(&workflow, "/"),
            r#"{"v":1,"repo":"https://github.com/org/demo","ref":"main","path":"/lab/tree/a.ipynb"}"#
        );
        assert_eq!(
            workflow_value(&workflow, "/jl/"),
            r#"{"v":1,"repo":"https://github.com/org/demo","ref":"main","path":"/jl/lab/tree/a.ipynb"}"#
        );
    }

    /// Exosphere's `parseConsoleLogForWorkflowToken` (src/Helpers/Helpers.elm): per line, drop
    /// everything before the first `{`, decode the rest as a JSON object with a string
    /// `exoWorkflowToken` (the whole rest must be JSON), and keep the last that decodes.
    pub(crate) fn exosphere_parse_token(console: &str) -> Option<String> {
        console
            .split('\n')
            // The last line that decodes wins: look from the end.
            .rev()
            .map(|line| line.find('{').map_or(line, |i| &line[i..]))
            .find_map(|rest| {
                let value: serde_json::Value = serde_json::from_str(rest).ok()?;
                value.get(TOKEN_LINE_KEY)?.as_str().map(str::to_owned)
            })
    }

    #[test]
    fn the_line_decodes_with_exospheres_rules_and_the_last_one_wins() {
        let old = LinkToken::generate();
        let new = LinkToken::generate();
        assert_ne!(old, new);
        let console = format!(
            "[    5.1] cloud-init: ...\n{}\n{{\"status\":\"complete\",\"epoch\":1}}\n\
             [ 3600.0] {}\n{{\"exoWorkflowToken\": 5}}\n{{\"exoWorkflowToken\":\"x\"}} trailing\n",
            token_line(&old),
            token_line(&new)
        );
        assert_eq!(exosphere_parse_token(&console).as_deref(), Some(new.expose()));
        assert_eq!(exosphere_parse_token("no token here\n"), None);
    }

    #[test]
    fn the_workflow_value_is_exospheres_encoding() {
        let value = custom_workflow_value("4.6.6", "/");
        assert_eq!(
            value,
            r#"{"v":1,"repo":"https://github.com/jupyterlab/jupyterlab","ref":"v4.6.6","path":"/lab"}"#
        );
        // Exosphere's decoder: `repo`, `ref`, `path` strings.
        let decoded: serde_json::Value = serde_json::from_str(&value).unwrap();
        for key in ["repo", "ref", "path"] {
            assert!(decoded[key].is_string(), "{key}");
        }
        assert!(value.len() <= 255, "Nova's metadata value limit");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&custom_workflow_value("4.6.6", "/x/"))
                .unwrap()["path"],
            "/x/lab"
        );
    }

    #[test]
    fn the_lock_names_the_version() {
        assert_eq!(
            pinned_version("anyio==4 \\\n    --hash=sha256:00\njupyterlab==4.6.6 \\\n    --hash=sha256:11\n"),
            Some("4.6.6")
        );
        // One lock for every Python: the newest Pythons' pin, whatever the line order.
        let forked = "jupyterlab==4.5.11 ; python_full_version < '3.10' \\\n    --hash=sha256:22\n\
                      jupyterlab==4.6.6 ; python_full_version >= '3.10' \\\n    --hash=sha256:11\n";
        assert_eq!(pinned_version(forked), Some("4.6.6"));
        assert_eq!(pinned_version("jupyterlab==4.5.11 ; python_full_version < '3.10' \\\n"), None);
        assert_eq!(pinned_version(super::super::REQUIREMENTS), Some("4.6.6"));
    }

    #[test]
    fn tokens_are_stored_private_kept_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets/jupyterlab-link-token");
        let first = LinkToken::load_or_create(&path).unwrap();
        assert_eq!(first.expose().len(), 48);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(LinkToken::load_or_create(&path).unwrap(), first);
        assert!(!format!("{first:?}").contains(first.expose()));
        let second = LinkToken::rotate(&path).unwrap();
        assert_ne!(second, first);
        assert_ne!(second.fingerprint(), first.fingerprint());
        assert_eq!(LinkToken::load(&path).unwrap(), Some(second));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            LinkToken::load(&path).unwrap_err().reason(),
            "secret-unsafe-file"
        );
        std::fs::write(&path, "not a token\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(LinkToken::load(&path).unwrap_err().reason(), "secret-malformed");
    }
}
