//! The certificate every front serves: the operator's pair (validated, then installed) or one
//! generated on first boot (rcgen, ECDSA P-256) for the instance's addresses and hostname, kept
//! across reboots and renewed before it expires. Its SHA-256 fingerprint is what a UAP pins.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;

use super::tls::{load_certificates, load_certified_key, TlsError};
use crate::fsutil;

/// How long a generated certificate is valid.
pub const GENERATED_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// A certificate expiring sooner than this is renewed (generated) or warned about (operator's).
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// The installed pair's file names inside the TLS directory.
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";

/// A certificate that cannot be used or made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file of the pair is unusable (unreadable, not PEM, key of another certificate).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The certificate is outside its validity period.
    #[error("certificate '{path}' {problem}")]
    Validity {
        /// The certificate file.
        path: PathBuf,
        /// `expired on …` or `is not valid before …`.
        problem: String,
    },
    /// The certificate could not be parsed as X.509.
    #[error("certificate '{path}' cannot be parsed: {detail}")]
    Parse {
        /// The certificate file.
        path: PathBuf,
        /// The parser's complaint.
        detail: String,
    },
    /// Generating a certificate failed.
    #[error("failed to generate a certificate: {0}")]
    Generate(String),
    /// Installing the pair failed.
    #[error("failed to {action} '{path}': {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl CertError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Tls(e) => e.reason(),
            Self::Validity { .. } => "tls-certificate-expired",
            Self::Parse { .. } => "tls-file-invalid",
            Self::Generate(_) => "tls-generate-failed",
            Self::Io { source, .. } if fsutil::is_disk_full(source) => "disk-full",
            Self::Io { .. } => "tls-install-failed",
        }
    }
}

/// The names a generated certificate carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertNames {
    /// The host name (also the subject's common name).
    pub hostname: String,
    /// Every address the instance is reached at (fixed, floating, loopback).
    pub addresses: Vec<IpAddr>,
}

impl CertNames {
    /// This machine's host name and interface addresses, with `extra` addresses (a floating IP
    /// from the metadata service) added.
    pub fn local(extra: &[IpAddr]) -> Self {
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        let mut addresses: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
            .map(|all| {
                all.filter_map(|ifa| ifa.address)
                    .filter_map(|a| {
                        a.as_sockaddr_in()
                            .map(|v4| IpAddr::V4(v4.ip()))
                            .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                    })
                    // Link-local IPv6 needs a zone to be used; no client names it.
                    .filter(
                        |ip| !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80),
                    )
                    .collect()
            })
            .unwrap_or_default();
        addresses.extend_from_slice(extra);
        addresses.sort();
        addresses.dedup();
        Self {
            hostname,
            addresses,
        }
    }
}

/// Where the fronts' certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// Generated and renewed by exoagent for these names.
    Generated(CertNames),
    /// The operator's pair (`[tls] cert_file`, `key_file`).
    Operator {
        /// The certificate chain, PEM, leaf first.
        cert: PathBuf,
        /// Its private key, PEM.
        key: PathBuf,
    },
}

/// The pair the fronts serve, as installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The certificate chain (mode 0644).
    pub cert: PathBuf,
    /// The private key (mode 0600, owned by the fronts' account).
    pub key: PathBuf,
    /// SHA-256 of the leaf certificate's DER, lowercase hex.
    pub fingerprint: String,
    /// When the leaf expires (seconds since the epoch).
    pub not_after: i64,
    /// Whether exoagent made it.
    pub generated: bool,
}

/// What a leaf certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafFacts {
    /// Validity start and end (seconds since the epoch).
    pub not_before: i64,
    /// Validity end (seconds since the epoch).
    pub not_after: i64,
    /// Its IP address names.
    pub addresses: Vec<IpAddr>,
    /// Its DNS names.
    pub dns_names: Vec<String>,
    /// SHA-256 of its DER, lowercase hex.
    pub fingerprint: String,
}

/// Read the facts of the leaf (first) certificate in `path`.
pub fn leaf_facts(path: &Path) -> Result<LeafFacts, CertError> {
    let chain = load_certificates(path, "certificate")?;
    facts_of(&chain[0], path)
}

fn facts_of(der: &CertificateDer<'_>, path: &Path) -> Result<LeafFacts, CertError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| CertError::Parse {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    let mut addresses = Vec::new();
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => addresses.push(IpAddr::from(
                        <[u8; 4]>::try_from(*bytes).unwrap_or_default(),
                    )),
                    16 => addresses.push(IpAddr::from(
                        <[u8; 16]>::try_from(*bytes).unwrap_or_default(),
                    )),
                    _ => {}
                },
                GeneralName::DNSName(name) => dns_names.push((*name).to_owned()),
                _ => {}
            }
        }
    }
    Ok(LeafFacts {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        addresses,
        dns_names,
        fingerprint: fingerprint(der.as_ref()),
    })
}

/// SHA-256 of `der`, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// `fingerprint` as OpenSSL prints it (`AB:CD:…`), for people comparing by eye.
pub fn colon_hex(fingerprint: &str) -> String {
    fingerprint
        .as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8_lossy(pair).to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

fn unix_seconds(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// `seconds` since the epoch as `YYYY-MM-DD hh:mm UTC`.
pub fn date(seconds: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(seconds)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02} UTC",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute()
            )
        })
        .unwrap_or_else(|_| seconds.to_string())
}

/// Check the operator's pair at `cert`/`key` without changing anything: readable, PEM, the
/// key belongs to the certificate, and valid at `now`.
pub fn validate_operator_pair(
    cert: &Path,
    key: &Path,
    now: SystemTime,
) -> Result<LeafFacts, CertError> {
    load_certified_key(cert, key)?;
    let facts = leaf_facts(cert)?;
    let now = unix_seconds(now);
    if facts.not_after <= now {
        return Err(CertError::Validity {
            path: cert.to_owned(),
            problem: format!("expired on {}", date(facts.not_after)),
        });
    }
    if facts.not_before > now {
        return Err(CertError::Validity {
            path: cert.to_owned(),
            problem: format!("is not valid before {}", date(facts.not_before)),
        });
    }
    Ok(facts)
}

/// Make sure `dir` holds the pair `source` asks for, valid at `now`, with the key readable
/// only by `owner` (uid, gid; `None` keeps the current user). A generated pair is kept while it
/// covers the names and has more than [`RENEW_BEFORE`] left; otherwise it is renewed with the
/// same key (so a public-key pin survives). Idempotent.
pub fn ensure(
    dir: &Path,
    source: &CertSource,
    now: SystemTime,
    owner: Option<(u32, u32)>,
) -> Result<Installed, CertError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| CertError::Io {
            action,
            path,
            source,
        }
    };
    fsutil::ensure_dir(dir, 0o700).map_err(io("create", dir))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(io("chown", dir))?;
    }
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    match source {
        CertSource::Operator { cert, key } => {
            let facts = validate_operator_pair(cert, key, now)?;
            let cert_pem = std::fs::read(cert).map_err(io("read", cert))?;
            let key_pem = std::fs::read(key).map_err(io("read", key))?;
            // Key first: a front re-reading between the two writes sees a mismatch and keeps
            // the old pair until both are in place.
            fsutil::write_if_changed(&key_path, &key_pem, 0o600, owner)
                .map_err(io("write", &key_path))?;
            fsutil::write_if_changed(&cert_path, &cert_pem, 0o644, owner)
                .map_err(io("write", &cert_path))?;
            Ok(Installed {
                cert: cert_path,
                key: key_path,
                fingerprint: facts.fingerprint,
                not_after: facts.not_after,
                generated: false,
            })
        }
        CertSource::Generated(names) => {
            if let Some(facts) = current_generated(&cert_path, &key_path, names, now) {
                // Ownership may have changed with the instance user; the mode never widens.
                if let Some((uid, gid)) = owner {
                    for path in [&cert_path, &key_path] {
                        std::os::unix::fs::chown(path, Some(uid), Some(gid))
                            .map_err(io("chown", path))?;
                    }
                }
                return Ok(Installed {
                    cert: cert_path,
                    key: key_path,
                    fingerprint: facts.fingerprint,
                    not_after: facts.not_after,
                    generated: true,
                });
            }
            let key_pair = std::fs::read_to_string(&key_path)
                .ok()
                .and_then(|pem| KeyPair::from_pem(&pem).ok())
                .filter(|k| k.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256);
            let key_pair = match key_pair {
                Some(k) => k,
                None => KeyPair::generate().map_err(|e| CertError::Generate(e.to_string()))?,
            };
            let (cert_pem, facts) = generate(names, &key_pair, now)?;
            fsutil::write_atomic(&key_path, key_pair.serialize_pem().as_bytes(), 0o600, owner)
                .map_err(io("write", &key_path))?;
            fsutil::write_atomic(&cert_path, cert_pem.as_bytes(), 0o644, owner)
                .map_err(io("write", &cert_path))?;
            tracing::info!(
                target: "exoagent::front",
                fingerprint = %colon_hex(&facts.fingerprint),
                expires = %date(facts.not_after),
                "generated the TLS certificate"
            );
            Ok(Installed {
                cert: cert_path,
                key: key_path,
                fingerprint: facts.fingerprint,
                not_after: facts.not_after,
                generated: true,
            })
        }
    }
}

/// The generated pair in place, when it loads, matches, covers `names` and is not due for
/// renewal at `now`.
fn current_generated(
    cert: &Path,
    key: &Path,
    names: &CertNames,
    now: SystemTime,
) -> Option<LeafFacts> {
    load_certified_key(cert, key).ok()?;
    let facts = leaf_facts(cert).ok()?;
    let now = unix_seconds(now);
    let renew_at = facts.not_after - i64::try_from(RENEW_BEFORE.as_secs()).unwrap_or(0);
    let covers = names
        .addresses
        .iter()
        .all(|a| facts.addresses.contains(a) && facts.dns_names.contains(&a.to_string()))
        && facts.dns_names.contains(&names.hostname);
    (facts.not_before <= now && now < renew_at && covers).then_some(facts)
}

/// A self-signed server certificate for `names`, valid from an hour before `now` (clock skew)
/// for [`GENERATED_VALIDITY`].
fn generate(
    names: &CertNames,
    key: &KeyPair,
    now: SystemTime,
) -> Result<(String, LeafFacts), CertError> {
    let start = unix_seconds(now) - 3600;
    let end = start + 3600 + i64::try_from(GENERATED_VALIDITY.as_secs()).unwrap_or(0);
    let at = |s: i64| {
        time::OffsetDateTime::from_unix_timestamp(s).map_err(|e| CertError::Generate(e.to_string()))
    };
    let mut params = CertificateParams::default();
    params.not_before = at(start)?;
    params.not_after = at(end)?;
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, names.hostname.clone());
    subject.push(DnType::OrganizationName, "exoagent");
    params.distinguished_name = subject;
    let mut sans = Vec::new();
    if let Ok(dns) = names.hostname.clone().try_into() {
        sans.push(SanType::DnsName(dns));
    }
    sans.extend(names.addresses.iter().copied().map(SanType::IpAddress));
    // Each address also as a DNS name: nginx (the UAP) checks `proxy_ssl_name`, by default the
    // upstream's address as text, against DNS names only (X509_check_host), never IP names.
    for address in &names.addresses {
        if let Ok(text) = address.to_string().try_into() {
            sans.push(SanType::DnsName(text));
        }
    }
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .self_signed(key)
        .map_err(|e| CertError::Generate(e.to_string()))?;
    let facts = facts_of(cert.der(), Path::new("(generated)"))?;
    Ok((cert.pem(), facts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn names() -> CertNames {
        CertNames {
            hostname: "instance-1".into(),
            addresses: vec!["10.0.0.7".parse().unwrap(), "127.0.0.1".parse().unwrap()],
        }
    }

    #[test]
    fn a_generated_certificate_is_kept_then_renewed_with_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let now = SystemTime::now();
        let first = ensure(&tls, &CertSource::Generated(names()), now, None).unwrap();
        assert!(first.generated);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&first.key), 0o600);
        assert_eq!(mode(&tls), 0o700);
        let facts = leaf_facts(&first.cert).unwrap();
        // The host name, and each address also as a DNS name for nginx's name check.
        assert_eq!(facts.dns_names, vec!["instance-1", "10.0.0.7", "127.0.0.1"]);
        assert_eq!(facts.addresses.len(), 2);
        assert_eq!(facts.fingerprint, first.fingerprint);
        assert_eq!(first.fingerprint.len(), 64);

        // A reboot: the same pair.
        let again = ensure(&tls, &CertSource::Generated(names()), now, None).unwrap();
        assert_eq!(again, first);

        // Inside the renewal window: a new certificate, the same key.
        let key_before = std::fs::read(&first.key).unwrap();
        let late = now + GENERATED_VALIDITY - RENEW_BEFORE + Duration::from_secs(3600);
        let renewed = ensure(&tls, &CertSource::Generated(names()), late, None).unwrap();
        assert_ne!(renewed.fingerprint, first.fingerprint);
        assert!(renewed.not_after > first.not_after);
        assert_eq!(std::fs::read(&renewed.key).unwrap(), key_before);

        // A new address (a floating IP attached): re-issued to cover it.
        let mut more = names();
        more.addresses.push("203.0.113.9".parse().unwrap());
        let covered = ensure(&tls, &CertSource::Generated(more), late, None).unwrap();
        assert!(leaf_facts(&covered.cert)
            .unwrap()
            .addresses
            .contains(&"203.0.113.9".parse().unwrap()));
    }

    #[test]
    fn operator_pairs_are_checked_before_anything_is_installed() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        // Two real pairs to mix up.
        let a = ensure(
            &dir.path().join("a"),
            &CertSource::Generated(names()),
            now,
            None,
        )
        .unwrap();
        let b = ensure(
            &dir.path().join("b"),
            &CertSource::Generated(names()),
            now,
            None,
        )
        .unwrap();
        let target = dir.path().join("installed");

        let mismatch = CertSource::Operator {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let e = ensure(&target, &mismatch, now, None).unwrap_err();
        assert_eq!(e.reason(), "tls-key-mismatch", "{e}");
        assert!(!target.join(CERT_FILE).exists());

        let missing = CertSource::Operator {
            cert: dir.path().join("nope.pem"),
            key: a.key.clone(),
        };
        let e = ensure(&target, &missing, now, None).unwrap_err();
        assert_eq!(e.reason(), "tls-file-unreadable");
        assert!(e.to_string().contains("nope.pem"), "{e}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let e = ensure(
            &target,
            &CertSource::Operator {
                cert: garbage,
                key: a.key.clone(),
            },
            now,
            None,
        )
        .unwrap_err();
        assert_eq!(e.reason(), "tls-file-invalid", "{e}");

        let expired_at = now + GENERATED_VALIDITY + Duration::from_secs(7200);
        let good = CertSource::Operator {
            cert: a.cert.clone(),
            key: a.key.clone(),
        };
        let e = ensure(&target, &good, expired_at, None).unwrap_err();
        assert_eq!(e.reason(), "tls-certificate-expired");
        assert!(e.to_string().contains("expired on"), "{e}");

        let installed = ensure(&target, &good, now, None).unwrap();
        assert!(!installed.generated);
        assert_eq!(installed.fingerprint, a.fingerprint);
        assert_eq!(
            std::fs::read(&installed.key).unwrap(),
            std::fs::read(&a.key).unwrap()
        );
    }

    #[test]
    fn fingerprints_print_like_openssl() {
        assert_eq!(colon_hex("ab01ff"), "AB:01:FF");
    }
}
