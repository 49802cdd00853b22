//! JupyterLab's own account of activity, for idle detection: `last_activity` from
//! `{base_url}api/status` (kernels, terminals and the researcher's API calls) and whether a
//! kernel is busy now (`{base_url}api/kernels`: a cell that runs for hours without output moves
//! no timestamp). JupyterLab asks for a login: the agent signs in with the passphrase through
//! the login form, like a browser, and keeps the cookie; its own calls carry
//! `no_track_activity`, so watching never counts as activity.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::header::{HeaderMap, COOKIE, SET_COOKIE};
use reqwest::StatusCode;

use crate::platform::passphrase::Passphrase;

/// One request's limit: JupyterLab answers these from memory.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Cookies kept from JupyterLab at most (its login sets two).
const MAX_COOKIES: usize = 8;

/// What JupyterLab reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Its `last_activity` (ms since the epoch).
    pub last_activity_ms: u64,
    /// Kernels whose `execution_state` is `busy`.
    pub busy_kernels: usize,
}

/// Why JupyterLab's activity could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ActivityError {
    /// No answer (not started, restarting).
    #[error("JupyterLab at {addr} did not answer: {source}")]
    Unreachable {
        /// Where it was asked.
        addr: SocketAddr,
        /// What the client said.
        source: reqwest::Error,
    },
    /// The passphrase did not sign in.
    #[error("JupyterLab refused the passphrase at {path} (HTTP {status})")]
    LoginRefused {
        /// The login path.
        path: String,
        /// Its answer.
        status: u16,
    },
    /// An answer other than the documented one.
    #[error("JupyterLab answered {path} with {what}")]
    Unexpected {
        /// The path asked.
        path: String,
        /// What came back instead.
        what: String,
    },
}

impl ActivityError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "jupyterlab-unreachable",
            Self::LoginRefused { .. } => "jupyterlab-login-refused",
            Self::Unexpected { .. } => "jupyterlab-unexpected-reply",
        }
    }
}

/// Reads one JupyterLab's activity, signed in with the passphrase.
#[derive(Debug)]
pub struct ActivityClient {
    http: reqwest::Client,
    addr: SocketAddr,
    base_url: String,
    cookies: Vec<(String, String)>,
}

impl ActivityClient {
    /// A client for the JupyterLab at `addr` under `base_url` (ends with `/`).
    pub fn new(addr: SocketAddr, base_url: &str) -> Self {
        // Plain HTTP on loopback: no root certificates loaded (parsing the system's bundle
        // would cost the agent's resident memory for nothing).
        let http = reqwest::Client::builder()
            .no_proxy()
            .tls_built_in_root_certs(false)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REQUEST_TIMEOUT)
            .build()
            .unwrap_or_default();
        Self {
            http,
            addr,
            base_url: base_url.to_owned(),
            cookies: Vec::new(),
        }
    }

    fn url(&self, rest: &str) -> String {
        format!("http://{}{}{rest}", self.addr, self.base_url)
    }

    /// Its activity now, signing in first when it asks (once per call).
    pub async fn sample(&mut self, passphrase: &Passphrase) -> Result<Seen, ActivityError> {
        let status = match self.get_json("api/status?no_track_activity=1").await? {
            Some(status) => status,
            None => {
                self.sign_in(passphrase).await?;
                self.get_json("api/status?no_track_activity=1")
                    .await?
                    .ok_or_else(|| self.unexpected("api/status", "a login prompt after signing in"))?
            }
        };
        let last_activity_ms = status["last_activity"]
            .as_str()
            .and_then(epoch_ms)
            .ok_or_else(|| self.unexpected("api/status", "no readable last_activity"))?;
        let kernels = self
            .get_json("api/kernels?no_track_activity=1")
            .await?
            .ok_or_else(|| self.unexpected("api/kernels", "a login prompt"))?;
        let busy_kernels = kernels
            .as_array()
            .ok_or_else(|| self.unexpected("api/kernels", "no list of kernels"))?
            .iter()
            .filter(|kernel| kernel["execution_state"] == "busy")
            .count();
        Ok(Seen {
            last_activity_ms,
            busy_kernels,
        })
    }

    fn unexpected(&self, path: &str, what: &str) -> ActivityError {
        ActivityError::Unexpected {
            path: format!("{}{path}", self.base_url),
            what: what.to_owned(),
        }
    }

    /// `rest`'s JSON, or `None` when JupyterLab asks for a login (403, or a redirect to it).
    async fn get_json(&self, rest: &str) -> Result<Option<serde_json::Value>, ActivityError> {
        let reply = self
            .http
            .get(self.url(rest))
            .header(COOKIE, self.cookie_header())
            .send()
            .await
            .map_err(|source| ActivityError::Unreachable {
                addr: self.addr,
                source,
            })?;
        let status = reply.status();
        if matches!(
            status,
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED | StatusCode::FOUND
        ) {
            return Ok(None);
        }
        let path = rest.split('?').next().unwrap_or(rest);
        if !status.is_success() {
            return Err(self.unexpected(path, &format!("HTTP {}", status.as_u16())));
        }
        let text = reply
            .text()
            .await
            .map_err(|source| ActivityError::Unreachable {
                addr: self.addr,
                source,
            })?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|_| self.unexpected(path, "a body that is not JSON"))
    }

    /// The login form, as a browser fills it: its `_xsrf` cookie from the form's page, then
    /// the passphrase posted with it; the session cookie is kept.
    async fn sign_in(&mut self, passphrase: &Passphrase) -> Result<(), ActivityError> {
        self.cookies.clear();
        let unreachable = |addr, source| ActivityError::Unreachable { addr, source };
        let page = self
            .http
            .get(self.url("login"))
            .send()
            .await
            .map_err(|e| unreachable(self.addr, e))?;
        self.keep_cookies(page.headers());
        let xsrf = self
            .cookies
            .iter()
            .find(|(name, _)| name == "_xsrf")
            .map(|(_, value)| value.clone())
            .ok_or_else(|| self.unexpected("login", "no _xsrf cookie"))?;
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("_xsrf", &xsrf)
            .append_pair("password", passphrase.expose())
            .finish();
        let reply = self
            .http
            .post(self.url("login"))
            .header(COOKIE, self.cookie_header())
            .header("X-XSRFToken", &xsrf)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form)
            .send()
            .await
            .map_err(|e| unreachable(self.addr, e))?;
        let status = reply.status();
        if !status.is_redirection() {
            return Err(ActivityError::LoginRefused {
                path: format!("{}login", self.base_url),
                status: status.as_u16(),
            });
        }
        self.keep_cookies(reply.headers());
        Ok(())
    }

    fn keep_cookies(&mut self, headers: &HeaderMap) {
        for header in headers.get_all(SET_COOKIE) {
            let Some((name, value)) = header
                .to_str()
                .ok()
                .and_then(|text| text.split(';').next())
                .and_then(|pair| pair.split_once('='))
            else {
                continue;
            };
            let (name, value) = (name.trim(), value.trim());
            self.cookies.retain(|(kept, _)| kept != name);
            if self.cookies.len() < MAX_COOKIES {
                self.cookies.push((name.to_owned(), value.to_owned()));
            }
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Jupyter's ISO 8601 time (`2026-12-07T20:15:03.123456Z`) as ms since the epoch.
fn epoch_ms(text: &str) -> Option<u64> {
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()?;
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jupyters_timestamps_read_as_epoch_milliseconds() {
        assert_eq!(
            epoch_ms("2026-12-07T20:15:03.123456Z"),
            Some(1_796_674_503_123)
        );
        assert_eq!(epoch_ms("2026-12-07T20:15:03+00:00"), Some(1_796_674_503_000));
        assert_eq!(epoch_ms("yesterday"), None);
    }

    #[test]
    fn cookies_are_kept_by_name_and_bounded() {
        let mut client = ActivityClient::new("127.0.0.1:1".parse().unwrap(), "/");
        let mut headers = HeaderMap::new();
        headers.append(SET_COOKIE, "_xsrf=2|ab|cd|1; Path=/".parse().unwrap());
        headers.append(
            SET_COOKIE,
            "username-127-0-0-1-8888=\"2|1:0|x\"; expires=Wed; HttpOnly; Path=/"
                .parse()
                .unwrap(),
        );
        client.keep_cookies(&headers);
        let mut again = HeaderMap::new();
        again.append(SET_COOKIE, "_xsrf=new; Path=/".parse().unwrap());
        client.keep_cookies(&again);
        assert_eq!(
            client.cookie_header(),
            "username-127-0-0-1-8888=\"2|1:0|x\"; _xsrf=new"
        );
        let mut many = HeaderMap::new();
        for n in 0..20 {
            many.append(SET_COOKIE, format!("c{n}=v").parse().unwrap());
        }
        client.keep_cookies(&many);
        assert_eq!(client.cookies.len(), MAX_COOKIES);
    }
}
