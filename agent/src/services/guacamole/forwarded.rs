//! Which address a request comes from: the TCP peer, or, only when the peer is a configured
//! proxy (the cloud's UAP), the address that proxy put in `X-Forwarded-For`. Anyone else could
//! write any header, so from them it is ignored (DESIGN §8).

use std::net::IpAddr;

use axum::http::HeaderMap;

pub use crate::model::Cidr;

/// The client behind `peer`: when `peer` is in `trusted`, the rightmost `X-Forwarded-For`
/// entry that is not itself a trusted proxy (each proxy appends the address it saw); else, or
/// when there is none, the peer.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer.to_canonical();
    }
    let entries: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        // An entry that is not an address ends the chain: what lies left of it is unknown.
        .map_while(|s| s.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect();
    entries
        .into_iter()
        .find(|ip| !is_trusted(*ip))
        .unwrap_or(peer.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn blocks_parse_and_match() {
        let block: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(block.contains(ip("10.1.200.3")));
        assert!(!block.contains(ip("10.2.0.1")));
        assert!(block.contains(ip("::ffff:10.1.0.9")));
        let one: Cidr = "2001:db8::1".parse().unwrap();
        assert!(one.contains(ip("2001:db8::1")) && !one.contains(ip("2001:db8::2")));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        for bad in ["", "10.0.0.0/33", "x", "10.0.0.0/", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(block.to_string(), "10.1.0.0/16");
    }

    #[test]
    fn the_header_counts_only_from_a_trusted_proxy() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "203.0.113.9, 198.51.100.7".parse().unwrap(),
        );
        // Nobody trusted (the default): the peer, whatever the header says.
        assert_eq!(client_address(ip("10.0.0.5"), &headers, &[]), ip("10.0.0.5"));
        // A trusted peer: the address it saw.
        let uap = cidrs(&["10.0.0.0/24"]);
        assert_eq!(
            client_address(ip("10.0.0.5"), &headers, &uap),
            ip("198.51.100.7")
        );
        // A client that reaches the port directly cannot choose its address.
        assert_eq!(
            client_address(ip("192.0.2.50"), &headers, &uap),
            ip("192.0.2.50")
        );
        // A chain of trusted proxies is skipped from the right.
        let chain = cidrs(&["10.0.0.0/24", "198.51.100.7"]);
        assert_eq!(
            client_address(ip("10.0.0.5"), &headers, &chain),
            ip("203.0.113.9")
        );
        // A trusted peer without the header, or with garbage: the peer.
        assert_eq!(
            client_address(ip("10.0.0.5"), &HeaderMap::new(), &uap),
            ip("10.0.0.5")
        );
        headers.insert("x-forwarded-for", "nonsense".parse().unwrap());
        assert_eq!(client_address(ip("10.0.0.5"), &headers, &uap), ip("10.0.0.5"));
    }
}
