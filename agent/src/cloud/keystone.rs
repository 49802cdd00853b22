//! Keystone v3: a token from the clouds.yaml credential, cached and renewed before it
//! expires, and endpoints from its catalog (interface and region honoured).

use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::cloud::clouds::{CloudConfig, Credential, DomainRef, ProjectRef, UserRef};

/// Renew a token this long before Keystone says it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(300);

/// Why Keystone could not give a token or an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum KeystoneError {
    /// The CA bundle named in clouds.yaml cannot be used.
    #[error("failed to load the CA bundle '{path}': {message}")]
    CaBundle {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// No HTTP client could be built.
    #[error("failed to set up HTTPS: {0}")]
    Client(String),
    /// Keystone did not answer.
    #[error("Keystone unreachable at '{url}': {}", super::error_chain(source))]
    Unreachable {
        /// The URL.
        url: String,
        /// The transport error.
        source: reqwest::Error,
    },
    /// The credential was refused (401).
    #[error("Keystone refused the credential of cloud '{cloud}' (HTTP 401): {message}")]
    Rejected {
        /// The cloud name.
        cloud: String,
        /// Keystone's message.
        message: String,
    },
    /// Another error status.
    #[error("Keystone answered HTTP {status} at '{url}': {message}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
        /// Keystone's message.
        message: String,
    },
    /// An answer that is not a token.
    #[error("Keystone sent an unexpected answer: {0}")]
    Invalid(String),
    /// The catalog has no such endpoint.
    #[error("no '{service_type}' endpoint with interface '{interface}'{region} in the catalog")]
    NoEndpoint {
        /// The service type asked for.
        service_type: String,
        /// The interface.
        interface: String,
        /// ` in region R`, or empty.
        region: String,
    },
}

impl KeystoneError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::CaBundle { .. } | Self::Client(_) => "cloud-tls-setup-failed",
            Self::Unreachable { .. } => "keystone-unreachable",
            Self::Rejected { .. } => "credential-rejected",
            Self::Status { .. } => "keystone-error",
            Self::Invalid(_) => "keystone-invalid",
            Self::NoEndpoint { .. } => "endpoint-missing",
        }
    }

    /// Whether trying again later may help.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429,
            Self::CaBundle { .. }
            | Self::Client(_)
            | Self::Rejected { .. }
            | Self::Invalid(_)
            | Self::NoEndpoint { .. } => false,
        }
    }
}

/// An issued token. `Debug` does not show it.
#[derive(Clone)]
pub struct Token {
    value: String,
    expires_at: Option<SystemTime>,
    catalog: Vec<CatalogService>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// The value for `X-Auth-Token`.
    pub fn value(&self) -> &str {
        &self.value
    }

    fn fresh(&self, now: SystemTime) -> bool {
        match self.expires_at {
            Some(expiry) => now + RENEW_BEFORE < expiry,
            None => true,
        }
    }

    /// The URL of `service_type` for `interface` (and `region`, when given).
    pub fn endpoint(
        &self,
        service_type: &str,
        interface: &str,
        region: Option<&str>,
    ) -> Result<String, KeystoneError> {
        self.catalog
            .iter()
            .filter(|s| s.service_type == service_type)
            .flat_map(|s| s.endpoints.iter())
            .find(|e| {
                e.interface == interface
                    && match region {
                        None => true,
                        Some(r) => {
                            e.region_id.as_deref() == Some(r) || e.region.as_deref() == Some(r)
                        }
                    }
            })
            .map(|e| e.url.trim_end_matches('/').to_owned())
            .ok_or_else(|| KeystoneError::NoEndpoint {
                service_type: service_type.to_owned(),
                interface: interface.to_owned(),
                region: region
                    .map(|r| format!(" in region {r}"))
                    .unwrap_or_default(),
            })
    }
}

#[derive(Debug, Clone, Deserialize)]
struct CatalogService {
    #[serde(rename = "type")]
    service_type: String,
    #[serde(default)]
    endpoints: Vec<CatalogEndpoint>,
}

#[derive(Debug, Clone, Deserialize)]
struct CatalogEndpoint {
    interface: String,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    region_id: Option<String>,
    url: String,
}

/// A Keystone client for one cloud; the HTTP client is injected.
pub struct Keystone {
    config: CloudConfig,
    client: reqwest::Client,
    cached: tokio::sync::Mutex<Option<Token>>,
    issued: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Keystone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keystone")
            .field("cloud", &self.config.name)
            .field("auth_url", &self.config.auth_url)
            .finish_non_exhaustive()
    }
}

impl Keystone {
    /// A client for `config`, speaking through `client`.
    pub fn new(config: CloudConfig, client: reqwest::Client) -> Self {
        Self {
            config,
            client,
            cached: tokio::sync::Mutex::new(None),
            issued: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The HTTPS client a cloud's configuration asks for: system roots plus its `cacert`,
    /// verification off only when clouds.yaml says `verify: false`.
    pub fn http_client(config: &CloudConfig) -> Result<reqwest::Client, KeystoneError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("exoagent/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &config.cacert {
            let pem = std::fs::read(path).map_err(|e| KeystoneError::CaBundle {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                KeystoneError::CaBundle {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if !config.verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        builder
            .build()
            .map_err(|e| KeystoneError::Client(e.to_string()))
    }

    /// The cloud's configuration.
    pub fn config(&self) -> &CloudConfig {
        &self.config
    }

    /// How many tokens this client has been issued (for benchmarks and tests).
    pub fn tokens_issued(&self) -> u64 {
        self.issued.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A valid token: the cached one unless it is about to expire.
    pub async fn token(&self) -> Result<Token, KeystoneError> {
        let mut cached = self.cached.lock().await;
        if let Some(token) = cached.as_ref() {
            if token.fresh(SystemTime::now()) {
                return Ok(token.clone());
            }
        }
        let token = self.issue().await?;
        *cached = Some(token.clone());
        Ok(token)
    }

    /// Forget the cached token (after a 401 from a service).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    async fn issue(&self) -> Result<Token, KeystoneError> {
        let url = format!("{}/auth/tokens", self.config.auth_url);
        let response = self
            .client
            .post(&url)
            .json(&auth_body(&self.config.credential))
            .send()
            .await
            .map_err(|source| KeystoneError::Unreachable {
                url: url.clone(),
                source,
            })?;
        self.issued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let status = response.status();
        let subject = response
            .headers()
            .get("X-Subject-Token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let message = body["error"]["message"].as_str().unwrap_or("").to_owned();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(KeystoneError::Rejected {
                cloud: self.config.name.clone(),
                message,
            });
        }
        if !status.is_success() {
            return Err(KeystoneError::Status {
                url,
                status: status.as_u16(),
                message,
            });
        }
        let value =
            subject.ok_or_else(|| KeystoneError::Invalid("no X-Subject-Token header".into()))?;
        let catalog: Vec<CatalogService> = serde_json::from_value(body["token"]["catalog"].clone())
            .map_err(|e| KeystoneError::Invalid(format!("catalog: {e}")))?;
        let expires_at = body["token"]["expires_at"].as_str().and_then(parse_rfc3339);
        Ok(Token {
            value,
            expires_at,
            catalog,
        })
    }
}

fn domain_json(domain: &DomainRef) -> Value {
    match domain {
        DomainRef::Id(id) => json!({ "id": id }),
        DomainRef::Name(name) => json!({ "name": name }),
    }
}

fn user_json(user: &UserRef) -> Value {
    match user {
        UserRef::Id(id) => json!({ "id": id }),
        UserRef::Name { name, domain } => json!({ "name": name, "domain": domain_json(domain) }),
    }
}

/// The `POST /v3/auth/tokens` body for a credential.
fn auth_body(credential: &Credential) -> Value {
    match credential {
        Credential::ApplicationCredentialId { id, secret } => json!({"auth": {"identity": {
            "methods": ["application_credential"],
            "application_credential": { "id": id, "secret": secret },
        }}}),
        Credential::ApplicationCredentialName { name, user, secret } => {
            json!({"auth": {"identity": {
                "methods": ["application_credential"],
                "application_credential": { "name": name, "user": user_json(user), "secret": secret },
            }}})
        }
        Credential::Password {
            user,
            password,
            project,
        } => {
            let mut user = user_json(user);
            user["password"] = Value::from(password.as_str());
            let project = match project {
                ProjectRef::Id(id) => json!({ "id": id }),
                ProjectRef::Name { name, domain } => {
                    json!({ "name": name, "domain": domain_json(domain) })
                }
            };
            json!({"auth": {
                "identity": { "methods": ["password"], "password": { "user": user } },
                "scope": { "project": project },
            }})
        }
    }
}

/// `2026-11-24T03:00:00.000000Z` (or with a `+hh:mm` offset) as a time.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339);
    at.ok().map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn timestamps_parse() {
        let t = parse_rfc3339("2026-11-24T03:00:00.000000Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_795_489_200
        );
        let t = parse_rfc3339("1970-01-01T01:00:00+01:00").unwrap();
        assert_eq!(t, UNIX_EPOCH);
        assert!(parse_rfc3339("yesterday").is_none());
        assert!(parse_rfc3339("2026-13-01T00:00:00Z").is_none());
        assert!(parse_rfc3339("2026-02-30T00:00:00Z").is_none());
    }

    #[test]
    fn a_token_is_renewed_five_minutes_before_it_expires() {
        let now = SystemTime::now();
        let token = |left: u64| Token {
            value: "t".into(),
            expires_at: Some(now + Duration::from_secs(left)),
            catalog: Vec::new(),
        };
        assert!(token(3600).fresh(now));
        assert!(token(301).fresh(now));
        assert!(
            !token(299).fresh(now),
            "renewed within the last five minutes"
        );
        assert!(!token(0).fresh(now));
        let forever = Token {
            expires_at: None,
            ..token(0)
        };
        assert!(forever.fresh(now), "no expiry given: used until a 401");
    }

    #[test]
    fn auth_bodies_match_keystone_v3() {
        let body = auth_body(&Credential::ApplicationCredentialId {
            id: "i".into(),
            secret: "s".into(),
        });
        assert_eq!(
            body["auth"]["identity"]["application_credential"],
            json!({"id": "i", "secret": "s"})
        );
        let body = auth_body(&Credential::Password {
            user: UserRef::Name {
                name: "u".into(),
                domain: DomainRef::Name("Default".into()),
            },
            password: "p".into(),
            project: ProjectRef::Id("proj".into()),
        });
        assert_eq!(
            body["auth"]["identity"]["password"]["user"]["password"],
            "p"
        );
        assert_eq!(body["auth"]["scope"]["project"]["id"], "proj");
    }
}
