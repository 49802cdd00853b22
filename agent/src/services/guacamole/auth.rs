//! Logins to the Guacamole web side: the password check (constant time), the per-source
//! limit on failed attempts, and the session tokens that expire after inactivity.
//!
//! The limit (`docs/guacamole.md`): [`MAX_FAILURES`] failures from one source (an IPv4
//! address, or an IPv6 /64) within [`FAILURE_WINDOW`] make it wait until that window, counted
//! from its first failure, ends; a good login clears it. So a lockout never lasts longer than
//! the window after the last wrong guess, even for an owner who shares the proxy's address with
//! an attacker. At most [`MAX_SOURCES`] sources are remembered (the oldest goes first).
//!
//! Tokens are what Guacamole's own `SecureRandomAuthTokenGenerator` makes (32 random bytes as
//! 64 upper-case hex digits). A token stays valid while it is used: every authenticated call and
//! every tunnel message counts as activity, as in the Java web app.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;
use subtle::ConstantTimeEq;

/// Failed logins a source may make within [`FAILURE_WINDOW`] before it is refused.
pub const MAX_FAILURES: u32 = 5;
/// The window in which failures count, and how long a source that used them up waits.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// At most this many sources with recent failures are remembered; when full, the one whose
/// window started first is forgotten, so the map's memory is bounded whatever the sources.
pub const MAX_SOURCES: usize = 4096;
/// At most this many live tokens; the least recently used goes first. Exosphere makes one per
/// 55 minutes per open tab.
pub const MAX_TOKENS: usize = 1024;

/// The one account the web side knows: the instance user and its passphrase.
pub struct Credentials {
    username: String,
    password: String,
}

impl Credentials {
    /// The instance user's login.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: password.into(),
        }
    }

    /// The user name.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The passphrase (for guacd's `connect`).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Whether `username` and `password` match, in time that does not depend on where they
    /// differ (both are always compared).
    pub fn matches(&self, username: &str, password: &str) -> bool {
        let user_ok = self.username.as_bytes().ct_eq(username.as_bytes());
        let password_ok = self.password.as_bytes().ct_eq(password.as_bytes());
        (user_ok & password_ok).into()
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why a login was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// Wrong user name or password.
    #[error("invalid credentials")]
    InvalidCredentials,
    /// Too many failures from this source recently.
    #[error("too many failed logins; retry in {retry_after_s} s")]
    TooMany {
        /// Seconds until the source may try again.
        retry_after_s: u64,
    },
}

impl LoginError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidCredentials => "guacamole-invalid-credentials",
            Self::TooMany { .. } => "guacamole-too-many-logins",
        }
    }
}

struct Failures {
    count: u32,
    since: Instant,
}

struct Session {
    username: String,
    last_used: Instant,
}

/// Logins and live tokens, shared by every request.
pub struct Authenticator {
    credentials: Credentials,
    idle_timeout: Duration,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    sessions: Mutex<HashMap<String, Session>>,
}

impl Authenticator {
    /// Tokens expire after `idle_timeout` without use.
    pub fn new(credentials: Credentials, idle_timeout: Duration) -> Self {
        Self {
            credentials,
            idle_timeout,
            failures: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The account's credentials.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Check a login from `source`; on success, a new token.
    pub fn login(
        &self,
        source: IpAddr,
        username: &str,
        password: &str,
    ) -> Result<String, LoginError> {
        self.login_at(source, username, password, Instant::now())
    }

    fn login_at(
        &self,
        source: IpAddr,
        username: &str,
        password: &str,
        now: Instant,
    ) -> Result<String, LoginError> {
        let source = source_key(source);
        let mut failures = lock(&self.failures);
        failures.retain(|_, f| now.duration_since(f.since) < FAILURE_WINDOW);
        if let Some(f) = failures.get(&source) {
            if f.count >= MAX_FAILURES {
                let left = FAILURE_WINDOW.saturating_sub(now.duration_since(f.since));
                return Err(LoginError::TooMany {
                    retry_after_s: left.as_secs().max(1),
                });
            }
        }
        if !self.credentials.matches(username, password) {
            if failures.len() >= MAX_SOURCES && !failures.contains_key(&source) {
                let oldest = failures.iter().min_by_key(|(_, f)| f.since).map(|(ip, _)| *ip);
                if let Some(oldest) = oldest {
                    failures.remove(&oldest);
                }
            }
            let entry = failures.entry(source).or_insert(Failures {
                count: 0,
                since: now,
            });
            entry.count += 1;
            return Err(LoginError::InvalidCredentials);
        }
        failures.remove(&source);
        drop(failures);
        let token = new_token();
        let mut sessions = lock(&self.sessions);
        self.expire(&mut sessions, now);
        if sessions.len() >= MAX_TOKENS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(t, _)| t.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            token.clone(),
            Session {
                username: self.credentials.username.clone(),
                last_used: now,
            },
        );
        Ok(token)
    }

    /// The user a live token belongs to; using it counts as activity.
    pub fn touch(&self, token: &str) -> Option<String> {
        self.touch_at(token, Instant::now())
    }

    fn touch_at(&self, token: &str, now: Instant) -> Option<String> {
        let mut sessions = lock(&self.sessions);
        self.expire(&mut sessions, now);
        let session = sessions.get_mut(token)?;
        session.last_used = now;
        Some(session.username.clone())
    }

    /// Whether `token` is live, without counting this as its use.
    pub fn is_live(&self, token: &str) -> bool {
        let mut sessions = lock(&self.sessions);
        self.expire(&mut sessions, Instant::now());
        sessions.contains_key(token)
    }

    /// End a token (`DELETE /api/session`).
    pub fn revoke(&self, token: &str) -> bool {
        lock(&self.sessions).remove(token).is_some()
    }

    fn expire(&self, sessions: &mut HashMap<String, Session>, now: Instant) {
        sessions.retain(|_, s| now.duration_since(s.last_used) < self.idle_timeout);
    }
}

/// What the limit counts: an IPv4 address, or an IPv6 address's /64 (one host usually owns a
/// whole /64, so counting single addresses would let it rotate through them).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps inconsistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// 32 random bytes as 64 upper-case hex digits.
fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(
            Credentials::new("exouser", "correct horse battery staple"),
            Duration::from_secs(3600),
        )
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn a_good_login_gets_a_stock_shaped_token() {
        let auth = auth();
        let token = auth
            .login(A, "exouser", "correct horse battery staple")
            .unwrap();
        assert_eq!(token.len(), 64);
        assert!(token
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase()));
        assert_eq!(auth.touch(&token).as_deref(), Some("exouser"));
        let other = auth
            .login(A, "exouser", "correct horse battery staple")
            .unwrap();
        assert_ne!(token, other);
        assert!(auth.revoke(&token));
        assert_eq!(auth.touch(&token), None);
        assert!(auth.touch(&other).is_some());
    }

    #[test]
    fn wrong_user_or_password_is_refused() {
        let auth = auth();
        for (u, p) in [
            ("exouser", "correct horse battery stapl"),
            ("exouser", ""),
            ("root", "correct horse battery staple"),
            ("", ""),
        ] {
            assert_eq!(auth.login(B, u, p), Err(LoginError::InvalidCredentials));
        }
    }

    #[test]
    fn failures_are_limited_per_source_and_forgotten_after_the_window() {
        let auth = auth();
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert_eq!(
                auth.login_at(A, "exouser", "nope", t0),
                Err(LoginError::InvalidCredentials)
            );
        }
        // Even the right password waits: the limit is checked first.
        assert!(matches!(
            auth.login_at(A, "exouser", "correct horse battery staple", t0),
            Err(LoginError::TooMany { retry_after_s: 60 })
        ));
        // Another source is not affected.
        assert!(auth
            .login_at(B, "exouser", "correct horse battery staple", t0)
            .is_ok());
        let later = t0 + FAILURE_WINDOW;
        assert!(auth
            .login_at(A, "exouser", "correct horse battery staple", later)
            .is_ok());
    }

    #[test]
    fn the_failure_map_stays_bounded_and_a_lockout_expires() {
        let auth = auth();
        let t0 = Instant::now();
        // Ten times the capacity of distinct sources, all within one window.
        for i in 0..(10 * MAX_SOURCES as u32) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(
                auth.login_at(ip, "exouser", "nope", t0),
                Err(LoginError::InvalidCredentials)
            );
            assert!(lock(&auth.failures).len() <= MAX_SOURCES);
        }
        // A locked-out source waits at most the window after its first failure.
        for _ in 0..MAX_FAILURES {
            let _ = auth.login_at(A, "exouser", "nope", t0);
        }
        let later = t0 + FAILURE_WINDOW;
        for step in 0..3u32 {
            // Every later wrong guess locks it again, but never for longer than the window.
            let at = later + FAILURE_WINDOW * step;
            for _ in 0..MAX_FAILURES {
                let _ = auth.login_at(A, "exouser", "nope", at);
            }
            match auth.login_at(A, "exouser", "correct horse battery staple", at) {
                Err(LoginError::TooMany { retry_after_s }) => {
                    assert!(retry_after_s <= FAILURE_WINDOW.as_secs())
                }
                other => panic!("expected a lockout, got {other:?}"),
            }
        }
        assert!(auth
            .login_at(
                A,
                "exouser",
                "correct horse battery staple",
                later + FAILURE_WINDOW * 3
            )
            .is_ok());
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        let auth = auth();
        let t0 = Instant::now();
        for i in 0..u128::from(MAX_FAILURES) {
            let ip = IpAddr::V6(Ipv6Addr::from(0x2001_0db8_0000_0001_0000_0000_0000_0000 + i));
            let _ = auth.login_at(ip, "exouser", "nope", t0);
        }
        let same_64: IpAddr = "2001:db8:0:1::ffff".parse().unwrap();
        assert!(matches!(
            auth.login_at(same_64, "exouser", "nope", t0),
            Err(LoginError::TooMany { .. })
        ));
    }

    #[test]
    fn tokens_expire_after_inactivity_and_use_keeps_them() {
        let auth = Authenticator::new(Credentials::new("u", "p"), Duration::from_secs(3600));
        let t0 = Instant::now();
        let token = auth.login_at(A, "u", "p", t0).unwrap();
        let t1 = t0 + Duration::from_secs(3000);
        assert!(auth.touch_at(&token, t1).is_some());
        // 3000 s + 3000 s after login, but only 3000 s after the last use.
        assert!(auth
            .touch_at(&token, t1 + Duration::from_secs(3000))
            .is_some());
        assert!(auth
            .touch_at(&token, t1 + Duration::from_secs(3000 + 3600))
            .is_none());
    }

    #[test]
    fn the_password_is_not_in_debug_output() {
        let text = format!("{:?}", Credentials::new("exouser", "secret words"));
        assert!(!text.contains("secret"), "{text}");
    }
}
