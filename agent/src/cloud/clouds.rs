//! `clouds.yaml`, the standard OpenStack client configuration: which Keystone, which
//! credential (application credential by id, or by name and user; or a password), region,
//! interface and CA bundle.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why a cloud's configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CloudsError {
    /// The file cannot be read.
    #[error("failed to read '{path}': {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid YAML of the expected shape.
    #[error("failed to parse '{path}': {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its location.
        message: String,
    },
    /// The named cloud is not in the file.
    #[error("cloud '{name}' is not in '{path}' (it has: {known})")]
    UnknownCloud {
        /// The file.
        path: PathBuf,
        /// The name asked for.
        name: String,
        /// The names present.
        known: String,
    },
    /// The cloud's entry lacks what its auth type needs.
    #[error("'{path}': clouds.{name}: {message}")]
    Incomplete {
        /// The file.
        path: PathBuf,
        /// The cloud.
        name: String,
        /// What is missing.
        message: String,
    },
}

impl CloudsError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Read { .. } => "clouds-yaml-unreadable",
            Self::Parse { .. } => "clouds-yaml-invalid",
            Self::UnknownCloud { .. } => "cloud-unknown",
            Self::Incomplete { .. } => "cloud-incomplete",
        }
    }
}

#[derive(Debug, Deserialize)]
struct File {
    #[serde(default)]
    clouds: BTreeMap<String, Entry>,
}

#[derive(Debug, Default, Deserialize)]
struct Entry {
    #[serde(default)]
    auth_type: Option<String>,
    #[serde(default)]
    auth: Auth,
    #[serde(default)]
    region_name: Option<String>,
    #[serde(default)]
    interface: Option<String>,
    #[serde(default)]
    cacert: Option<PathBuf>,
    #[serde(default)]
    verify: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
struct Auth {
    auth_url: Option<String>,
    application_credential_id: Option<String>,
    application_credential_name: Option<String>,
    application_credential_secret: Option<String>,
    username: Option<String>,
    user_id: Option<String>,
    password: Option<String>,
    user_domain_name: Option<String>,
    user_domain_id: Option<String>,
    project_name: Option<String>,
    project_id: Option<String>,
    project_domain_name: Option<String>,
    project_domain_id: Option<String>,
}

/// A user named for Keystone: by id, or by name within a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserRef {
    /// `user_id`.
    Id(String),
    /// `username` in `user_domain_name`/`user_domain_id` (default domain `Default`).
    Name {
        /// The user name.
        name: String,
        /// The domain, by name or id.
        domain: DomainRef,
    },
}

/// A domain by id or name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainRef {
    /// By id.
    Id(String),
    /// By name.
    Name(String),
}

/// How to authenticate. Secrets are kept here only; they are never logged (`Debug` redacts).
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// An application credential by id.
    ApplicationCredentialId {
        /// Its id.
        id: String,
        /// Its secret.
        secret: String,
    },
    /// An application credential by name and owner.
    ApplicationCredentialName {
        /// Its name.
        name: String,
        /// Its owner.
        user: UserRef,
        /// Its secret.
        secret: String,
    },
    /// A password, scoped to a project.
    Password {
        /// The user.
        user: UserRef,
        /// The password.
        password: String,
        /// The project: id, or name in a domain.
        project: ProjectRef,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ApplicationCredentialId { id, .. } => f
                .debug_struct("ApplicationCredentialId")
                .field("id", id)
                .finish_non_exhaustive(),
            Self::ApplicationCredentialName { name, user, .. } => f
                .debug_struct("ApplicationCredentialName")
                .field("name", name)
                .field("user", user)
                .finish_non_exhaustive(),
            Self::Password { user, project, .. } => f
                .debug_struct("Password")
                .field("user", user)
                .field("project", project)
                .finish_non_exhaustive(),
        }
    }
}

/// A project by id, or by name within a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectRef {
    /// By id.
    Id(String),
    /// By name.
    Name {
        /// The project name.
        name: String,
        /// Its domain.
        domain: DomainRef,
    },
}

/// Everything needed to talk to one cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudConfig {
    /// The cloud's name in the file.
    pub name: String,
    /// Keystone, e.g. `https://keystone.example:5000/v3`.
    pub auth_url: String,
    /// How to authenticate.
    pub credential: Credential,
    /// Region to pick endpoints from (any when `None`).
    pub region: Option<String>,
    /// Endpoint interface: `public` (default), `internal` or `admin`.
    pub interface: String,
    /// Extra CA bundle (PEM), trusted on top of the system roots.
    pub cacert: Option<PathBuf>,
    /// TLS verification (`verify: false` in clouds.yaml turns it off; discouraged).
    pub verify: bool,
}

/// Read cloud `name` from the clouds.yaml at `path`.
pub fn load(path: &Path, name: &str) -> Result<CloudConfig, CloudsError> {
    let text = std::fs::read_to_string(path).map_err(|source| CloudsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text, name)
}

/// Parse clouds.yaml `text` (read from `path`, for messages) and pick cloud `name`.
pub fn parse(path: &Path, text: &str, name: &str) -> Result<CloudConfig, CloudsError> {
    let file: File = serde_norway::from_str(text).map_err(|e| CloudsError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let known = file.clouds.keys().cloned().collect::<Vec<_>>().join(", ");
    let Some(entry) = file.clouds.get(name) else {
        return Err(CloudsError::UnknownCloud {
            path: path.to_path_buf(),
            name: name.to_owned(),
            known: if known.is_empty() {
                "none".into()
            } else {
                known
            },
        });
    };
    let incomplete = |message: String| CloudsError::Incomplete {
        path: path.to_path_buf(),
        name: name.to_owned(),
        message,
    };
    let auth = &entry.auth;
    let auth_url = auth
        .auth_url
        .clone()
        .ok_or_else(|| incomplete("auth.auth_url is missing".into()))?;
    let domain = |id: &Option<String>, name: &Option<String>| match (id, name) {
        (Some(id), _) => DomainRef::Id(id.clone()),
        (None, Some(name)) => DomainRef::Name(name.clone()),
        (None, None) => DomainRef::Name("Default".into()),
    };
    let user = || -> Result<UserRef, CloudsError> {
        match (&auth.user_id, &auth.username) {
            (Some(id), _) => Ok(UserRef::Id(id.clone())),
            (None, Some(name)) => Ok(UserRef::Name {
                name: name.clone(),
                domain: domain(&auth.user_domain_id, &auth.user_domain_name),
            }),
            (None, None) => Err(incomplete(
                "auth.username or auth.user_id is missing".into(),
            )),
        }
    };
    let auth_type =
        entry
            .auth_type
            .as_deref()
            .unwrap_or(if auth.application_credential_secret.is_some() {
                "v3applicationcredential"
            } else {
                "password"
            });
    let credential = match auth_type {
        "v3applicationcredential" | "applicationcredential" => {
            let secret = auth.application_credential_secret.clone().ok_or_else(|| {
                incomplete("auth.application_credential_secret is missing".into())
            })?;
            match (
                &auth.application_credential_id,
                &auth.application_credential_name,
            ) {
                (Some(id), _) => Credential::ApplicationCredentialId {
                    id: id.clone(),
                    secret,
                },
                (None, Some(cred_name)) => Credential::ApplicationCredentialName {
                    name: cred_name.clone(),
                    user: user()?,
                    secret,
                },
                (None, None) => return Err(incomplete(
                    "auth.application_credential_id or auth.application_credential_name is missing"
                        .into(),
                )),
            }
        }
        "password" | "v3password" => {
            let password = auth
                .password
                .clone()
                .ok_or_else(|| incomplete("auth.password is missing".into()))?;
            let project = match (&auth.project_id, &auth.project_name) {
                (Some(id), _) => ProjectRef::Id(id.clone()),
                (None, Some(project)) => ProjectRef::Name {
                    name: project.clone(),
                    domain: domain(&auth.project_domain_id, &auth.project_domain_name),
                },
                (None, None) => {
                    return Err(incomplete(
                        "auth.project_name or auth.project_id is missing".into(),
                    ))
                }
            };
            Credential::Password {
                user: user()?,
                password,
                project,
            }
        }
        other => {
            return Err(incomplete(format!(
                "auth_type '{other}' is not supported (use v3applicationcredential or password)"
            )))
        }
    };
    let interface = entry.interface.clone().unwrap_or_else(|| "public".into());
    if !["public", "internal", "admin"].contains(&interface.as_str()) {
        return Err(incomplete(format!(
            "interface '{interface}' must be public, internal or admin"
        )));
    }
    Ok(CloudConfig {
        name: name.to_owned(),
        auth_url: auth_url.trim_end_matches('/').to_owned(),
        credential,
        region: entry.region_name.clone(),
        interface,
        cacert: entry.cacert.clone(),
        verify: entry.verify.unwrap_or(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
clouds:
  by-id:
    auth_type: v3applicationcredential
    auth:
      auth_url: https://keystone.example:5000/v3/
      application_credential_id: abc
      application_credential_secret: s3cret
    region_name: RegionOne
    interface: public
    cacert: /etc/ssl/cloud-ca.pem
  by-name:
    auth_type: v3applicationcredential
    auth:
      auth_url: https://keystone.example:5000/v3
      application_credential_name: agent
      application_credential_secret: s3cret
      username: demo
      user_domain_name: Default
  pw:
    auth:
      auth_url: http://127.0.0.1:5000/v3
      username: admin
      password: hunter2
      project_name: admin
      project_domain_id: default
  weird:
    auth_type: token
    auth:
      auth_url: http://x/v3
"#;

    fn load(name: &str) -> Result<CloudConfig, CloudsError> {
        parse(Path::new("/etc/openstack/clouds.yaml"), FILE, name)
    }

    #[test]
    fn application_credentials_by_id_and_by_name() {
        let c = load("by-id").unwrap();
        assert_eq!(c.auth_url, "https://keystone.example:5000/v3");
        assert_eq!(
            c.credential,
            Credential::ApplicationCredentialId {
                id: "abc".into(),
                secret: "s3cret".into()
            }
        );
        assert_eq!(c.region.as_deref(), Some("RegionOne"));
        assert_eq!(c.cacert, Some(PathBuf::from("/etc/ssl/cloud-ca.pem")));
        assert!(c.verify);
        let c = load("by-name").unwrap();
        assert!(matches!(
            c.credential,
            Credential::ApplicationCredentialName { ref name, user: UserRef::Name { .. }, .. } if name == "agent"
        ));
        assert_eq!(c.interface, "public");
    }

    #[test]
    fn passwords_need_a_project() {
        let c = load("pw").unwrap();
        assert!(matches!(
            c.credential,
            Credential::Password { project: ProjectRef::Name { domain: DomainRef::Id(ref d), .. }, .. } if d == "default"
        ));
    }

    #[test]
    fn errors_name_the_file_cloud_and_problem() {
        let e = load("nope").unwrap_err();
        assert_eq!(e.reason(), "cloud-unknown");
        assert!(e.to_string().contains("by-id, by-name, pw, weird"), "{e}");
        let e = load("weird").unwrap_err();
        assert!(
            e.to_string().contains("clouds.weird: auth_type 'token'"),
            "{e}"
        );
        let e = parse(Path::new("/c.yaml"), "clouds: [1, 2", "x").unwrap_err();
        assert_eq!(e.reason(), "clouds-yaml-invalid");
        assert!(
            e.to_string().starts_with("failed to parse '/c.yaml'"),
            "{e}"
        );
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let c = load("by-id").unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        let c = load("pw").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
