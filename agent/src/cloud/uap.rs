//! The URLs a browser uses through the cloud's User Application Proxy (Exosphere's
//! `buildProxyUrl`, `../../shared/reference/exosphere.md` §9):
//! `https://http-A-B-C-D-PORT.<uap host><path>`, A.B.C.D the instance's floating address.
//! The UAP's host name comes from `[cloud] uap_hostname`; the floating address only from the
//! metadata service, and a floating IP is often attached after boot, so it is asked again
//! until found and then now and then (it can be moved).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cloud::MetadataService;
use crate::state::StateHub;

/// How often the floating address is asked for while there is none.
const UNTIL_FOUND: Duration = Duration::from_secs(60);
/// How often once found (a floating IP can be moved to another server and back).
const ONCE_FOUND: Duration = Duration::from_secs(600);
/// How long one question may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// The UAP URL of a web service answering at `local_url` (`http(s)://addr:port/path`) on
/// public `port`, or `None` for what the UAP does not carry (the desktop's `vnc://`).
pub fn url(host: &str, floating: Ipv4Addr, port: u16, local_url: &str) -> Option<String> {
    let rest = local_url
        .strip_prefix("http://")
        .or_else(|| local_url.strip_prefix("https://"))?;
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    let [a, b, c, d] = floating.octets();
    Some(format!("https://http-{a}-{b}-{c}-{d}-{port}.{host}{path}"))
}

/// Keep every service's `uap_url` in the hub current for `host`, until `cancel`.
pub async fn watch(
    metadata: MetadataService,
    host: String,
    hub: StateHub,
    cancel: CancellationToken,
) {
    let mut current: Option<Ipv4Addr> = None;
    loop {
        let asked = tokio::time::timeout(ASK_TIMEOUT, metadata.public_ipv4()).await;
        let floating = match asked {
            Ok(Ok(Some(IpAddr::V4(v4)))) => Some(v4),
            Ok(Ok(_)) => None,
            // Unanswered: keep what is known rather than flap the URLs.
            Ok(Err(e)) => {
                tracing::debug!(target: "exoagent::uap", reason = e.reason(), "no floating address: {e}");
                current
            }
            Err(_) => {
                tracing::debug!(target: "exoagent::uap", "no floating address: the metadata service did not answer in time");
                current
            }
        };
        if floating != current {
            tracing::info!(target: "exoagent::uap", floating = ?floating, "UAP URLs updated");
            hub.set_uap_urls(|port, local| floating.and_then(|ip| url(&host, ip, port, local)));
            current = floating;
        }
        let wait = if current.is_some() {
            ONCE_FOUND
        } else {
            UNTIL_FOUND
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(crate::supervise::jittered(wait)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_take_exospheres_form_and_keep_the_path() {
        let ip = Ipv4Addr::new(149, 165, 1, 23);
        let host = "proxy-js2-iu.exosphere.app";
        assert_eq!(
            url(host, ip, 8888, "http://127.0.0.1:8888/").as_deref(),
            Some("https://http-149-165-1-23-8888.proxy-js2-iu.exosphere.app/")
        );
        assert_eq!(
            url(host, ip, 49528, "https://0.0.0.0:49528/guacamole/").as_deref(),
            Some("https://http-149-165-1-23-49528.proxy-js2-iu.exosphere.app/guacamole/")
        );
        assert_eq!(
            url(host, ip, 8888, "http://127.0.0.1:8888").as_deref(),
            Some("https://http-149-165-1-23-8888.proxy-js2-iu.exosphere.app/")
        );
        assert_eq!(
            url(host, ip, 5901, "vnc://127.0.0.1:5901 (display :1)"),
            None
        );
    }

    #[test]
    fn only_plain_host_names_are_taken() {
        use crate::cloud::uap_hostname;
        assert_eq!(
            uap_hostname("Proxy-JS2-IU.exosphere.app.").as_deref(),
            Some("proxy-js2-iu.exosphere.app")
        );
        for bad in [
            "localhost",
            "https://proxy.example.org",
            "proxy.example.org/x",
            "-a.example.org",
            "a..example.org",
            "proxy example.org",
            "proxy.example.org\u{1b}[2J",
        ] {
            assert_eq!(uap_hostname(bad), None, "{bad}");
        }
    }
}
