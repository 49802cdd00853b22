//! The few Nova calls the agent makes: server tags and metadata items, with the microversion
//! sent explicitly, one re-authentication on 401, and `Retry-After` surfaced to the caller.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::cloud::keystone::{Keystone, KeystoneError};

/// Tags need compute microversion 2.26 or later; asking for exactly that keeps the agent
/// working on older clouds.
pub const MICROVERSION: &str = "2.26";
/// Longest tag Nova accepts.
pub const MAX_TAG_LEN: usize = 60;
/// Longest metadata value Nova accepts.
pub const MAX_META_VALUE_LEN: usize = 255;

/// Why a Nova call failed.
#[derive(Debug, thiserror::Error)]
pub enum NovaError {
    /// No token or no compute endpoint.
    #[error(transparent)]
    Keystone(#[from] KeystoneError),
    /// Nova did not answer.
    #[error("Nova unreachable at '{url}': {}", super::error_chain(source))]
    Unreachable {
        /// The URL.
        url: String,
        /// The transport error.
        source: reqwest::Error,
    },
    /// 401 even with a fresh token, or 403: the credential may not make this call (Keystone
    /// access-rule denials come back as 401).
    #[error("Nova refused {method} {path} (HTTP {status}) even with a fresh token: the credential lacks permission for it")]
    NotPermitted {
        /// The method.
        method: String,
        /// The path below the compute endpoint.
        path: String,
        /// 401 or 403.
        status: u16,
    },
    /// Throttled or unavailable; try again after the delay when given.
    #[error("Nova answered HTTP {status} for {method} {path}; retry later")]
    Busy {
        /// The method.
        method: String,
        /// The path.
        path: String,
        /// 429 or 5xx.
        status: u16,
        /// `Retry-After`, when sent.
        retry_after: Option<Duration>,
    },
    /// 409: the server is in a state that refuses tag changes (building, shelved, …).
    #[error("Nova refused {method} {path} while the server is in its current state (HTTP 409)")]
    Conflict {
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
    /// Any other error status.
    #[error("Nova answered HTTP {status} for {method} {path}: {message}")]
    Status {
        /// The method.
        method: String,
        /// The path.
        path: String,
        /// The status.
        status: u16,
        /// Nova's message.
        message: String,
    },
}

impl NovaError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Keystone(e) => e.reason(),
            Self::Unreachable { .. } => "nova-unreachable",
            Self::NotPermitted { .. } => "credential-not-permitted",
            Self::Busy { .. } => "nova-busy",
            Self::Conflict { .. } => "server-state-conflict",
            Self::Status { .. } => "nova-error",
        }
    }

    /// Whether repeating the same call cannot help until something changes (the credential,
    /// the server, the wanted state): credential problems, Keystone set-up errors, and 4xx
    /// answers other than 409 (e.g. 400 when the server already has 50 tags).
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Keystone(e) => !e.is_transient(),
            Self::NotPermitted { .. } => true,
            Self::Status { status, .. } => (400..500).contains(status),
            Self::Unreachable { .. } | Self::Busy { .. } | Self::Conflict { .. } => false,
        }
    }

    /// The delay Nova asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Busy { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A Nova client acting on one server.
#[derive(Debug, Clone)]
pub struct Nova {
    keystone: Arc<Keystone>,
    client: reqwest::Client,
    calls: Arc<AtomicU64>,
}

impl Nova {
    /// Nova through `keystone`'s catalog, speaking through `client`.
    pub fn new(keystone: Arc<Keystone>, client: reqwest::Client) -> Self {
        Self {
            keystone,
            client,
            calls: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Compute API calls made so far (benchmarks count them).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Keystone token requests made so far.
    pub fn token_requests(&self) -> u64 {
        self.keystone.tokens_issued()
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), NovaError> {
        let mut reauthenticated = false;
        loop {
            let token = self.keystone.token().await?;
            let config = self.keystone.config();
            let base = token.endpoint("compute", &config.interface, config.region.as_deref())?;
            let url = format!("{base}{path}");
            let mut request = self
                .client
                .request(method.clone(), &url)
                .header("X-Auth-Token", token.value())
                .header("OpenStack-API-Version", format!("compute {MICROVERSION}"))
                .header("X-OpenStack-Nova-API-Version", MICROVERSION);
            if let Some(body) = body {
                request = request.json(body);
            }
            self.calls.fetch_add(1, Ordering::Relaxed);
            let response = request
                .send()
                .await
                .map_err(|source| NovaError::Unreachable {
                    url: url.clone(),
                    source,
                })?;
            let status = response.status();
            let request_id = response
                .headers()
                .get("x-openstack-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let text = response.text().await.unwrap_or_default();
            tracing::debug!(target: "exoagent::nova", %method, path, status = status.as_u16(), request_id, "nova call");
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let shown_method = method.to_string();
            match status.as_u16() {
                200..=299 => return Ok((status, value)),
                401 if !reauthenticated => {
                    // An expired token and an access-rule denial look the same: try once more
                    // with a fresh token before blaming the credential.
                    self.keystone.invalidate().await;
                    reauthenticated = true;
                }
                401 | 403 => {
                    return Err(NovaError::NotPermitted {
                        method: shown_method,
                        path: path.to_owned(),
                        status: status.as_u16(),
                    })
                }
                409 => {
                    return Err(NovaError::Conflict {
                        method: shown_method,
                        path: path.to_owned(),
                    })
                }
                429 | 500..=599 => {
                    return Err(NovaError::Busy {
                        method: shown_method,
                        path: path.to_owned(),
                        status: status.as_u16(),
                        retry_after,
                    })
                }
                code => {
                    let message = value
                        .as_object()
                        .and_then(|o| o.values().next())
                        .and_then(|inner| inner["message"].as_str())
                        .map(str::to_owned)
                        .unwrap_or_else(|| text.chars().take(200).collect());
                    return Err(NovaError::Status {
                        method: shown_method,
                        path: path.to_owned(),
                        status: code,
                        message,
                    });
                }
            }
        }
    }

    /// The server's tags.
    pub async fn tags(&self, server: &str) -> Result<Vec<String>, NovaError> {
        let (_, body) = self
            .request(
                Method::GET,
                &format!("/servers/{}/tags", segment(server)),
                None,
            )
            .await?;
        Ok(body["tags"]
            .as_array()
            .map(|tags| {
                tags.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Add one tag (present already is fine).
    pub async fn add_tag(&self, server: &str, tag: &str) -> Result<(), NovaError> {
        let path = format!("/servers/{}/tags/{}", segment(server), segment(tag));
        self.request(Method::PUT, &path, None).await.map(|_| ())
    }

    /// Remove one tag (absent already is fine).
    pub async fn remove_tag(&self, server: &str, tag: &str) -> Result<(), NovaError> {
        let path = format!("/servers/{}/tags/{}", segment(server), segment(tag));
        ignore_not_found(self.request(Method::DELETE, &path, None).await)
    }

    /// Set one metadata item.
    pub async fn set_metadata(
        &self,
        server: &str,
        key: &str,
        value: &str,
    ) -> Result<(), NovaError> {
        let path = format!("/servers/{}/metadata/{}", segment(server), segment(key));
        let body = json!({ "meta": { key: value } });
        self.request(Method::PUT, &path, Some(&body))
            .await
            .map(|_| ())
    }

    /// Remove one metadata item (absent already is fine).
    pub async fn delete_metadata(&self, server: &str, key: &str) -> Result<(), NovaError> {
        let path = format!("/servers/{}/metadata/{}", segment(server), segment(key));
        ignore_not_found(self.request(Method::DELETE, &path, None).await)
    }

    /// Ask Nova to shelve the server (`POST /servers/{id}/action` `{"shelve": null}`; 202:
    /// Nova stops and offloads it in the background). Needs that call in the credential's
    /// access rules.
    pub async fn shelve(&self, server: &str) -> Result<(), NovaError> {
        let path = format!("/servers/{}/action", segment(server));
        let body = json!({ "shelve": null });
        self.request(Method::POST, &path, Some(&body))
            .await
            .map(|_| ())
    }
}

fn ignore_not_found(result: Result<(StatusCode, Value), NovaError>) -> Result<(), NovaError> {
    match result {
        Ok(_) => Ok(()),
        Err(NovaError::Status { status: 404, .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Percent-encode one path segment (tags may hold spaces, e.g. Exosphere's `exoPw:` tags).
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~:".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A stand-in for Keystone and Nova on loopback, for unit tests of answers real Nova does not
/// give on demand (an overloaded API's 503 with `Retry-After`, a 409 from a shelved server) and
/// of the reporter's pacing; every other behaviour is tested against real Nova in
/// `tests/openstack.rs`.
#[cfg(test)]
pub(crate) mod stand_in {
    use std::sync::{Arc, Mutex};

    use axum::http::{HeaderMap, Method, StatusCode, Uri};

    use super::{Keystone, Nova};

    /// The calls the stand-in's Nova received, as `METHOD /path`.
    pub(crate) type Calls = Arc<Mutex<Vec<String>>>;

    /// Nova answering every tag and metadata write with `write_status` (and `Retry-After`
    /// when given), and `GET …/tags` with no tags.
    pub(crate) async fn nova(
        write_status: u16,
        retry_after: Option<&'static str>,
    ) -> (Nova, Calls) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let catalog = serde_json::json!({"token": {
            "expires_at": "2099-01-01T00:00:00.000000Z",
            "catalog": [{"type": "compute", "endpoints": [
                {"interface": "public", "region_id": "RegionOne", "url": format!("{base}/v2.1")}
            ]}],
        }});
        let calls: Calls = Arc::default();
        let seen = calls.clone();
        let app = axum::Router::new()
            .route(
                "/v3/auth/tokens",
                axum::routing::post(move || {
                    let body = catalog.clone();
                    async move {
                        let mut headers = HeaderMap::new();
                        headers.insert("X-Subject-Token", "tok".parse().unwrap());
                        (StatusCode::CREATED, headers, axum::Json(body))
                    }
                }),
            )
            .fallback(move |method: Method, uri: Uri| {
                let seen = seen.clone();
                async move {
                    seen.lock()
                        .unwrap()
                        .push(format!("{method} {}", uri.path()));
                    let mut headers = HeaderMap::new();
                    if method == Method::GET {
                        return (StatusCode::OK, headers, r#"{"tags": []}"#.to_owned());
                    }
                    if let Some(value) = retry_after {
                        headers.insert("Retry-After", value.parse().unwrap());
                    }
                    let status = StatusCode::from_u16(write_status).unwrap();
                    (status, headers, "{}".to_owned())
                }
            });
        tokio::spawn(async move { axum::serve(listener, app).await });
        let yaml = format!(
            "clouds:\n  c:\n    auth_type: v3applicationcredential\n    auth:\n      \
             auth_url: {base}/v3\n      application_credential_id: i\n      \
             application_credential_secret: s\n    region_name: RegionOne\n"
        );
        let config =
            crate::cloud::clouds::parse(std::path::Path::new("c.yaml"), &yaml, "c").unwrap();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let nova = Nova::new(Arc::new(Keystone::new(config, client.clone())), client);
        (nova, calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn stand_in(status: u16, retry_after: Option<&'static str>) -> Nova {
        stand_in::nova(status, retry_after).await.0
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(
            segment("exoagent:setup:complete"),
            "exoagent:setup:complete"
        );
        assert_eq!(segment("exoPw:A B"), "exoPw:A%20B");
        assert_eq!(segment("a/b?c#d%"), "a%2Fb%3Fc%23d%25");
    }

    #[tokio::test]
    async fn busy_answers_carry_retry_after() {
        let nova = stand_in(503, Some("7")).await;
        let err = nova.add_tag("s", "t").await.unwrap_err();
        assert_eq!(err.reason(), "nova-busy");
        assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
        assert!(!err.is_permanent());
        let nova = stand_in(429, None).await;
        let err = nova.add_tag("s", "t").await.unwrap_err();
        assert_eq!(err.reason(), "nova-busy");
        assert_eq!(err.retry_after(), None);
    }

    #[tokio::test]
    async fn conflicts_and_refusals_are_told_apart() {
        let err = stand_in(409, None)
            .await
            .add_tag("s", "t")
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "server-state-conflict");
        let nova = stand_in(403, None).await;
        let err = nova.add_tag("s", "t").await.unwrap_err();
        assert_eq!(err.reason(), "credential-not-permitted");
        assert!(err.is_permanent());
        assert_eq!(
            nova.token_requests(),
            1,
            "403 is not retried with a new token"
        );
        let nova = stand_in(401, None).await;
        let err = nova.add_tag("s", "t").await.unwrap_err();
        assert!(err.is_permanent());
        assert_eq!(
            nova.token_requests(),
            2,
            "401: exactly one re-authentication"
        );
        assert_eq!(nova.calls(), 2);
    }
}
