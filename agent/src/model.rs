//! The vocabulary every layer shares: service kinds, endpoints, and how outside values are
//! shortened for reports.
//! A leaf: it imports nothing from the crate, so any module may use it without a cycle.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Declares [`ServiceKind`] from one line per service: variant, stable name, default port, and
/// what it is. The name is used in config, tags, the API and log file names.
macro_rules! service_kinds {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal, port $port:literal;)*) => {
        /// Every service exoagent knows by name. Only some are implemented in this version (see
        /// `services::implemented`); the others are refused by name when enabled.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum ServiceKind {
            $(
                $(#[doc = $doc])*
                #[serde(rename = $name)]
                $variant,
            )*
        }

        impl ServiceKind {
            /// All kinds, in report order.
            pub const ALL: [ServiceKind; [$($name),*].len()] = [$(ServiceKind::$variant),*];

            /// The stable lowercase name used in config, tags, the API and log file names.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }

            /// The port the service answers on when its `port` key is not set (DESIGN §4.5:
            /// what Exosphere builds its links from).
            pub fn default_port(self) -> u16 {
                match self {
                    $(Self::$variant => $port,)*
                }
            }
        }
    };
}

service_kinds! {
    /// JupyterLab in a virtual environment.
    JupyterLab = "jupyterlab", port 8888;
    /// RStudio Server.
    RStudio = "rstudio", port 8787;
    /// A VNC desktop on display :1.
    Desktop = "desktop", port 5901;
    /// guacd plus the web side served by the agent.
    Guacamole = "guacamole", port 49528;
}

impl fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A service name that is not one of [`ServiceKind::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown service '{0}' (known: {known})", known = known_names())]
pub struct UnknownService(pub String);

fn known_names() -> String {
    let names: Vec<&str> = ServiceKind::ALL.iter().map(|k| k.as_str()).collect();
    names.join(", ")
}

impl FromStr for ServiceKind {
    type Err = UnknownService;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServiceKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownService(s.to_owned()))
    }
}

/// Where a service is reached: the public port that the UAP (and Exosphere's links) connect
/// to, the address the service process itself listens on, and the TLS front between them when
/// there is one (the front owns the public address; the service listens on loopback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// The port reported everywhere and reached from outside.
    pub public_port: u16,
    /// Where the service listens.
    pub listen: SocketAddr,
    /// Where the TLS front listens (the public address), when the service is behind one.
    pub front: Option<SocketAddr>,
}

impl Endpoint {
    /// A service reached directly where it listens.
    pub fn direct(listen: SocketAddr) -> Self {
        Self {
            public_port: listen.port(),
            listen,
            front: None,
        }
    }

    /// Where probes reach the service: its listening address, with loopback for "all
    /// addresses".
    pub fn probe_addr(&self) -> SocketAddr {
        loopback_for_any(self.listen)
    }

    /// Where a person on the instance reaches it: the front when there is one, else the
    /// service (loopback for "all addresses").
    pub fn local_addr(&self) -> SocketAddr {
        loopback_for_any(self.front.unwrap_or(self.listen))
    }

    /// The URL of `path` (starting with `/`) for a person on the instance: the front over
    /// https when there is one, else the service over http.
    pub fn local_url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme(), self.local_addr())
    }

    /// `https` behind a front (which also accepts plain HTTP unless told not to), else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.front.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

fn loopback_for_any(addr: SocketAddr) -> SocketAddr {
    let host = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(host, addr.port())
}

/// An address block: `10.0.0.0/8`, `2001:db8::/32`, or one address (`192.0.2.7`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the block (an IPv4 address written as IPv6, `::ffff:a.b.c.d`, counts
    /// as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let network = IpAddr::to_canonical(&addr.parse::<IpAddr>().map_err(|_| ())?);
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or(())?,
        };
        Ok(Self { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(|()| {
            serde::de::Error::custom(format!(
                "'{}' is not an IP address or CIDR block",
                text.escape_debug()
            ))
        })
    }
}

/// At most `max` characters (for values from outside shown in reports: errors, bodies) of `text`, cut on a character boundary, marked with `…` when cut.
pub fn truncate_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((cut, _)) => {
            let mut short = text[..cut].to_owned();
            short.pop();
            short.push('…');
            short
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in ServiceKind::ALL {
            assert_eq!(kind.as_str().parse::<ServiceKind>().unwrap(), kind);
            assert_eq!(
                serde_json::to_string(&kind).unwrap(),
                format!("\"{}\"", kind.as_str())
            );
        }
        assert!("jupyter".parse::<ServiceKind>().is_err());
    }

    #[test]
    fn endpoints_probe_loopback_for_all_addresses() {
        let all = Endpoint::direct("0.0.0.0:8888".parse().unwrap());
        assert_eq!(all.public_port, 8888);
        assert_eq!(all.probe_addr(), "127.0.0.1:8888".parse().unwrap());
        let v6 = Endpoint::direct("[::]:1".parse().unwrap());
        assert_eq!(v6.probe_addr(), "[::1]:1".parse().unwrap());
        let one = Endpoint::direct("10.0.0.5:2".parse().unwrap());
        assert_eq!(one.probe_addr(), one.listen);
        assert_eq!(all.local_url("/x/"), "http://127.0.0.1:8888/x/");
        let fronted = Endpoint {
            public_port: 8888,
            listen: "127.0.0.1:18888".parse().unwrap(),
            front: Some("0.0.0.0:8888".parse().unwrap()),
        };
        assert_eq!(fronted.local_url("/"), "https://127.0.0.1:8888/");
        assert_eq!(fronted.probe_addr(), fronted.listen);
    }

    #[test]
    fn truncation_is_on_characters() {
        assert_eq!(truncate_chars("abc", 3), "abc");
        assert_eq!(truncate_chars("abcd", 3), "ab…");
        assert_eq!(truncate_chars("éééé", 2), "é…");
    }
}
