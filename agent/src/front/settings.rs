//! `[tls]`: whether the web services sit behind the TLS front, and with which certificate,
//! client CA and trusted proxies; its keys and the checks that read the operator's files before
//! anything on the machine changes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::SystemTime;

use super::cert::{validate_operator_pair, CertError};
use super::tls::{load_certificates, TlsError};
use crate::model::{Cidr, Endpoint};
use crate::schema::values::absolute_path;
use crate::schema::{set, value, Checker, ErrorKind, Key, Located};

/// A fronted service listens on loopback this far above its public port.
pub const BACKEND_PORT_OFFSET: u16 = 10_000;

/// The loopback port a service behind a front on `public` listens on, when there is one.
pub fn backend_port(public: u16) -> Option<u16> {
    public.checked_add(BACKEND_PORT_OFFSET)
}

/// Where the fronts' certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertChoice {
    /// Generated on first boot and renewed by exoagent.
    Generated,
    /// The operator's pair.
    Operator {
        /// `cert_file`.
        cert: PathBuf,
        /// `key_file`.
        key: PathBuf,
    },
}

/// `[tls]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Put a TLS front on every web service's port.
    pub enabled: bool,
    /// Refuse plain HTTP on those ports.
    pub require: bool,
    /// The certificate served.
    pub certificate: CertChoice,
    /// Require client certificates from this CA (mutual TLS with the UAP).
    pub client_ca: Option<PathBuf>,
    /// Peers whose `X-Forwarded-For` the fronts extend rather than replace.
    pub trusted_proxies: Vec<Cidr>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            require: false,
            certificate: CertChoice::Generated,
            client_ca: None,
            trusted_proxies: Vec::new(),
        }
    }
}

impl TlsSettings {
    /// Where a web service whose configured address is `public` is reached and listens: behind
    /// a front when TLS is enabled (the service on loopback at [`backend_port`]), else directly.
    /// A port without a backend port was refused by validation; it stays direct here.
    pub fn endpoint(&self, public: SocketAddr) -> Endpoint {
        match backend_port(public.port()).filter(|_| self.enabled) {
            Some(port) => Endpoint {
                public_port: public.port(),
                listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
                front: Some(public),
            },
            None => Endpoint::direct(public),
        }
    }
}

/// What the files say about `[tls]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Section {
    enabled: Option<Located<bool>>,
    require: Option<Located<bool>>,
    cert_file: Option<Located<PathBuf>>,
    key_file: Option<Located<PathBuf>>,
    client_ca_file: Option<Located<PathBuf>>,
    trusted_proxies: Option<Located<Vec<Cidr>>>,
}

/// The keys of `[tls]`.
pub const KEYS: &[Key<Section>] = &[
    Key {
        name: "enabled",
        example: "true",
        read: |w, f, s| set(&mut s.enabled, w.boolean(f)),
    },
    Key {
        name: "require",
        example: "true",
        read: |w, f, s| set(&mut s.require, w.boolean(f)),
    },
    Key {
        name: "cert_file",
        example: "\"/etc/exoagent/tls/cert.pem\"",
        read: |w, f, s| {
            set(
                &mut s.cert_file,
                w.parsed(f, "an absolute path", absolute_path),
            )
        },
    },
    Key {
        name: "key_file",
        example: "\"/etc/exoagent/tls/key.pem\"",
        read: |w, f, s| {
            set(
                &mut s.key_file,
                w.parsed(f, "an absolute path", absolute_path),
            )
        },
    },
    Key {
        name: "client_ca_file",
        example: "\"/etc/exoagent/tls/uap-ca.pem\"",
        read: |w, f, s| {
            set(
                &mut s.client_ca_file,
                w.parsed(f, "an absolute path", absolute_path),
            )
        },
    },
    Key {
        name: "trusted_proxies",
        example: "[\"10.0.0.7\", \"192.168.0.0/24\"]",
        read: |w, f, s| set(&mut s.trusted_proxies, w.cidrs(f)),
    },
];

impl Section {
    /// The settings, with every problem reported at the key that caused it. When the front is
    /// enabled, the operator's certificate, key and client CA are read and checked now (at
    /// `now`), so a bad file stops the agent before it changes anything.
    pub fn settings(&self, check: &mut Checker<'_>, now: SystemTime) -> TlsSettings {
        let d = TlsSettings::default();
        let enabled = value(&self.enabled).unwrap_or(d.enabled);
        let require = value(&self.require).unwrap_or(d.require);
        if !enabled {
            for (key, set_at) in [
                (
                    "require",
                    self.require.as_ref().filter(|l| l.value).map(|l| l.origin),
                ),
                (
                    "client_ca_file",
                    self.client_ca_file.as_ref().map(|l| l.origin),
                ),
                ("cert_file", self.cert_file.as_ref().map(|l| l.origin)),
            ] {
                if let Some(origin) = set_at {
                    check.error(
                        origin,
                        format!("tls.{key}"),
                        ErrorKind::Conflict,
                        format!("tls.{key} has no effect unless tls.enabled = true"),
                    );
                }
            }
        }
        let certificate = match (&self.cert_file, &self.key_file) {
            (None, None) => CertChoice::Generated,
            (Some(cert), None) => {
                check.error(
                    cert.origin,
                    "tls.cert_file".into(),
                    ErrorKind::Conflict,
                    "tls.cert_file needs tls.key_file (the certificate's private key)".into(),
                );
                CertChoice::Generated
            }
            (None, Some(key)) => {
                check.error(
                    key.origin,
                    "tls.key_file".into(),
                    ErrorKind::Conflict,
                    "tls.key_file needs tls.cert_file (the certificate it belongs to)".into(),
                );
                CertChoice::Generated
            }
            (Some(cert), Some(key)) => {
                if enabled {
                    if let Err(e) = validate_operator_pair(&cert.value, &key.value, now) {
                        let at = match &e {
                            CertError::Tls(TlsError::Read {
                                what: "private key",
                                ..
                            })
                            | CertError::Tls(TlsError::Invalid {
                                what: "private key",
                                ..
                            })
                            | CertError::Tls(TlsError::Mismatch { .. }) => key,
                            _ => cert,
                        };
                        let name = if std::ptr::eq(at, key) {
                            "key_file"
                        } else {
                            "cert_file"
                        };
                        check.error(
                            at.origin,
                            format!("tls.{name}"),
                            ErrorKind::InvalidValue,
                            format!("{e} [{}]", e.reason()),
                        );
                    }
                }
                CertChoice::Operator {
                    cert: cert.value.clone(),
                    key: key.value.clone(),
                }
            }
        };
        if let (true, Some(ca)) = (enabled, &self.client_ca_file) {
            if let Err(e) = load_certificates(&ca.value, "client CA") {
                check.error(
                    ca.origin,
                    "tls.client_ca_file".into(),
                    ErrorKind::InvalidValue,
                    format!("{e} [{}]", e.reason()),
                );
            }
        }
        TlsSettings {
            enabled,
            require,
            certificate,
            client_ca: value(&self.client_ca_file),
            trusted_proxies: value(&self.trusted_proxies).unwrap_or_default(),
        }
    }

    /// Where `enabled` was set, for errors about the fronts' ports.
    pub fn enabled_at(&self) -> Option<crate::schema::Origin> {
        self.enabled.as_ref().filter(|l| l.value).map(|l| l.origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::key_table_problems;

    #[test]
    fn every_key_is_read_into_its_own_field() {
        let problems = key_table_problems("tls", KEYS);
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn fronted_services_move_to_loopback_above_their_port() {
        let on = TlsSettings {
            enabled: true,
            ..TlsSettings::default()
        };
        let public: SocketAddr = "0.0.0.0:8888".parse().unwrap();
        let e = on.endpoint(public);
        assert_eq!(e.public_port, 8888);
        assert_eq!(e.listen, "127.0.0.1:18888".parse().unwrap());
        assert_eq!(e.front, Some(public));
        assert_eq!(
            TlsSettings::default().endpoint(public),
            Endpoint::direct(public)
        );
        assert_eq!(backend_port(55_535), Some(65_535));
        assert_eq!(backend_port(55_536), None);
    }
}
