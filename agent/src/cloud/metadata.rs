//! The OpenStack metadata service (`http://169.254.169.254/openstack/latest/…`): the instance
//! identity when there is no config drive, and the one-time passphrase publication.

use std::time::Duration;

use reqwest::StatusCode;

use crate::cloud::identity::{InstanceIdentity, NetworkData, VendorData};
use crate::platform::passphrase::Passphrase;

/// Longest body of an error answer kept in an error message.
const BODY_EXCERPT: usize = 200;
/// Nova stores at most 4 × 255 characters.
const MAX_PASSWORD_LEN: usize = 1020;
/// The largest document read from the metadata service (Nova's user data is at most 64 KiB;
/// the agent re-reads `meta_data.json` while a volume waits for its name).
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Why the metadata service could not answer.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// No connection, or no answer in time.
    #[error(
        "metadata service unreachable at '{url}': {}",
        super::error_chain(source)
    )]
    Unreachable {
        /// The URL requested.
        url: String,
        /// The transport error.
        source: reqwest::Error,
    },
    /// An answer other than success or "not found".
    #[error("metadata service answered {status} for '{url}': {body}")]
    Status {
        /// The URL requested.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// A document that is not the JSON expected.
    #[error("metadata service document '{url}' is not valid: {source}")]
    Parse {
        /// The URL requested.
        url: String,
        /// What is wrong.
        source: serde_json::Error,
    },
    /// The passphrase does not fit the password endpoint.
    #[error("the passphrase is longer than the {MAX_PASSWORD_LEN} characters Nova stores")]
    TooLong,
    /// A document larger than any the metadata service serves.
    #[error("metadata service document '{url}' is larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge {
        /// The URL requested.
        url: String,
    },
}

impl MetadataError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "metadata-unreachable",
            Self::Status { .. } => "metadata-error",
            Self::Parse { .. } => "metadata-invalid",
            Self::TooLong => "password-too-long",
            Self::TooLarge { .. } => "metadata-too-large",
        }
    }

    /// Whether trying again later may help (network trouble, server errors, throttling).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429,
            Self::Parse { .. } | Self::TooLong | Self::TooLarge { .. } => false,
        }
    }
}

/// What a password publication did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordOutcome {
    /// The endpoint stored it now.
    Stored,
    /// The endpoint already held a password (409): published earlier.
    AlreadyPublished,
}

/// A client for one metadata service; the base URL and HTTP client are injected.
#[derive(Debug, Clone)]
pub struct MetadataService {
    base: String,
    client: reqwest::Client,
}

impl MetadataService {
    /// A client for the service at `base_url` (e.g. `http://169.254.169.254`).
    pub fn new(base_url: &str, client: reqwest::Client) -> Self {
        Self {
            base: base_url.trim_end_matches('/').to_owned(),
            client,
        }
    }

    /// The HTTP client the metadata service wants: short timeouts, and never a proxy (the
    /// link-local address must not be sent to an HTTP proxy from the environment).
    pub fn default_client() -> Result<reqwest::Client, reqwest::Error> {
        Self::client_for("https://")
    }

    /// [`Self::default_client`] for a service at `base_url`: for a plain `http://` one (the
    /// usual link-local address) without the system's root certificates, which it never uses
    /// and whose reading and parsing is a noticeable part of a second at boot under emulation.
    pub fn client_for(base_url: &str) -> Result<reqwest::Client, reqwest::Error> {
        let plain_http = base_url
            .get(..7)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"));
        reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .user_agent(concat!("exoagent/", env!("CARGO_PKG_VERSION")))
            .tls_built_in_root_certs(!plain_http)
            .build()
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn url(&self, document: &str) -> String {
        format!("{}/openstack/latest/{document}", self.base)
    }

    /// GET a document; `None` when the service says it does not exist (404).
    async fn get(&self, document: &str) -> Result<Option<Vec<u8>>, MetadataError> {
        self.get_url(self.url(document)).await
    }

    /// GET `url`; `None` on 404.
    async fn get_url(&self, url: String) -> Result<Option<Vec<u8>>, MetadataError> {
        let unreachable = |source| MetadataError::Unreachable {
            url: url.clone(),
            source,
        };
        let mut response = self.client.get(&url).send().await.map_err(unreachable)?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        // Read at most the cap: a misbehaving endpoint cannot make the agent hold more.
        let too_large = || MetadataError::TooLarge { url: url.clone() };
        if response
            .content_length()
            .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            return Err(MetadataError::Status {
                url,
                status: status.as_u16(),
                body: excerpt(&body),
            });
        }
        Ok(Some(body))
    }

    /// `meta_data.json`: who this instance is.
    pub async fn identity(&self) -> Result<Option<InstanceIdentity>, MetadataError> {
        self.document("meta_data.json").await
    }

    /// `meta_data.json` as a JSON tree: its `meta` items and `devices` tags name volumes, and
    /// change after boot (the typed [`identity`](Self::identity) keeps only what does not).
    pub async fn meta_data(&self) -> Result<Option<serde_json::Value>, MetadataError> {
        self.document("meta_data.json").await
    }

    /// `network_data.json`, when the service has it.
    pub async fn network_data(&self) -> Result<Option<NetworkData>, MetadataError> {
        self.document("network_data.json").await
    }

    /// `vendor_data2.json`, when the service has it.
    pub async fn vendor_data(&self) -> Result<Option<VendorData>, MetadataError> {
        self.document("vendor_data2.json").await
    }

    /// A JSON document, parsed by path (never by Content-Type: Nova serves some JSON as
    /// `text/plain`).
    async fn document<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, MetadataError> {
        let Some(body) = self.get(name).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|source| MetadataError::Parse {
                url: self.url(name),
                source,
            })
    }

    /// The instance's floating address, from the EC2-compatible document
    /// `latest/meta-data/public-ipv4` (the OpenStack documents carry fixed addresses only):
    /// `None` without one (Nova answers an empty body or 404) or when the body is no address.
    pub async fn public_ipv4(&self) -> Result<Option<std::net::IpAddr>, MetadataError> {
        let url = format!("{}/latest/meta-data/public-ipv4", self.base);
        let Some(body) = self.get_url(url).await? else {
            return Ok(None);
        };
        Ok(std::str::from_utf8(&body)
            .ok()
            .and_then(|text| text.trim().parse().ok()))
    }

    /// `user_data`, when the server was given any.
    pub async fn user_data(&self) -> Result<Option<String>, MetadataError> {
        Ok(self
            .get("user_data")
            .await?
            .map(|body| String::from_utf8_lossy(&body).into_owned()))
    }

    /// POST the passphrase to `password` (Exosphere reads it through Nova's
    /// `os-server-password`). 409 means a password is already there: published before.
    pub async fn publish_password(
        &self,
        passphrase: &Passphrase,
    ) -> Result<PasswordOutcome, MetadataError> {
        if passphrase.expose().len() > MAX_PASSWORD_LEN {
            return Err(MetadataError::TooLong);
        }
        let url = self.url("password");
        let response = self
            .client
            .post(&url)
            .body(passphrase.expose().to_owned())
            .send()
            .await
            .map_err(|source| MetadataError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let status = response.status();
        match status {
            s if s.is_success() => Ok(PasswordOutcome::Stored),
            StatusCode::CONFLICT => Ok(PasswordOutcome::AlreadyPublished),
            _ => {
                let body = response.bytes().await.unwrap_or_default();
                Err(MetadataError::Status {
                    url,
                    status: status.as_u16(),
                    body: excerpt(&body),
                })
            }
        }
    }
}

/// The start of a body for an error message, on one line.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    crate::model::truncate_chars(&one_line, BODY_EXCERPT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-route HTTP server on loopback answering every request with `status` and `body`;
    /// returns its base URL and the request targets it saw.
    async fn serve(
        status: &'static str,
        body: &str,
    ) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        let body = body.to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut head = vec![0u8; 4096];
                let n = stream.read(&mut head).await.unwrap_or(0);
                let text = String::from_utf8_lossy(&head[..n]).into_owned();
                let target = text.split(' ').nth(1).unwrap_or("").to_owned();
                log.lock().unwrap().push(target);
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            }
        });
        (base, seen)
    }

    #[tokio::test]
    async fn the_floating_address_comes_from_the_ec2_document() {
        let (base, seen) = serve("200 OK", "203.0.113.9\n").await;
        let service = MetadataService::new(&base, MetadataService::default_client().unwrap());
        assert_eq!(
            service.public_ipv4().await.unwrap(),
            Some("203.0.113.9".parse().unwrap())
        );
        assert_eq!(*seen.lock().unwrap(), vec!["/latest/meta-data/public-ipv4"]);
        // The client for a plain-HTTP address (no root certificates) reads it alike.
        assert!(base.starts_with("http://"), "{base}");
        let plain = MetadataService::new(&base, MetadataService::client_for(&base).unwrap());
        assert_eq!(
            plain.public_ipv4().await.unwrap(),
            Some("203.0.113.9".parse().unwrap())
        );

        // Nova without a floating address: an empty body, or 404; junk is no address either.
        for (status, body) in [
            ("200 OK", ""),
            ("404 Not Found", "nope"),
            ("200 OK", "<html>"),
        ] {
            let (base, _) = serve(status, body).await;
            let service = MetadataService::new(&base, MetadataService::default_client().unwrap());
            assert_eq!(
                service.public_ipv4().await.unwrap(),
                None,
                "{status} {body}"
            );
        }
        let (base, _) = serve("500 Internal Server Error", "boom").await;
        let service = MetadataService::new(&base, MetadataService::default_client().unwrap());
        assert!(service.public_ipv4().await.is_err());
    }

    #[tokio::test]
    async fn meta_data_is_read_whole_for_volume_names() {
        let body = r#"{"uuid":"u","meta":{"exoVolumes::v":"{\"name\":\"data\"}"},"devices":[]}"#;
        let (base, seen) = serve("200 OK", body).await;
        let service = MetadataService::new(&base, MetadataService::default_client().unwrap());
        let doc = service.meta_data().await.unwrap().unwrap();
        assert_eq!(doc["meta"]["exoVolumes::v"], "{\"name\":\"data\"}");
        assert!(doc["devices"].is_array());
        assert_eq!(
            *seen.lock().unwrap(),
            vec!["/openstack/latest/meta_data.json"]
        );
        let (base, _) = serve("404 Not Found", "").await;
        let service = MetadataService::new(&base, MetadataService::default_client().unwrap());
        assert!(service.meta_data().await.unwrap().is_none());
        let (base, _) = serve("200 OK", "not json").await;
        let service = MetadataService::new(&base, MetadataService::default_client().unwrap());
        assert_eq!(
            service.meta_data().await.unwrap_err().reason(),
            "metadata-invalid"
        );
        // A document beyond the cap is refused, not held.
        let huge = format!("{{\"uuid\":\"{}\"}}", "x".repeat(MAX_DOCUMENT_BYTES));
        let (base, _) = serve("200 OK", &huge).await;
        let service = MetadataService::new(&base, MetadataService::default_client().unwrap());
        assert_eq!(
            service.meta_data().await.unwrap_err().reason(),
            "metadata-too-large"
        );
    }
}
