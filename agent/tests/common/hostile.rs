//! Hostile HTTP clients for the servers' limits: loopback or a Unix socket only, each bounded
//! in time by its caller's `bound`, so a server that never closes fails the test, not hangs it.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Send the start of a request head, then one more header byte every 500 ms, until the server
/// closes the connection: how long that took, or `None` if it was still open after `bound`.
pub async fn trickle_until_closed<S>(mut s: S, bound: Duration) -> Option<Duration>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let _ = s
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await;
    let mut buf = [0u8; 1024];
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let deadline = tokio::time::sleep(bound);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            read = s.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Some(start.elapsed()),
                Ok(_) => {}
            },
            _ = tick.tick() => {
                let _ = s.write_all(b"a").await;
            }
            () = &mut deadline => return None,
        }
    }
}

/// Send nothing (or `first`, then nothing) until the server closes: how long that took, or
/// `None` if still open after `bound`.
pub async fn idle_until_closed<S>(mut s: S, first: &[u8], bound: Duration) -> Option<Duration>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    if !first.is_empty() && s.write_all(first).await.is_err() {
        return Some(start.elapsed());
    }
    let mut buf = [0u8; 4096];
    let read_to_end = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(bound, read_to_end)
        .await
        .ok()
        .map(|()| start.elapsed())
}

/// Send `request` and return the response head (up to the blank line) if one arrives within
/// `bound`.
pub async fn response_head<S>(mut s: S, request: &[u8], bound: Duration) -> Option<String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = s.write_all(request).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read_head = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                return;
            }
        }
    };
    tokio::time::timeout(bound, read_head).await.ok()?;
    (!got.is_empty()).then(|| String::from_utf8_lossy(&got).into_owned())
}

/// A request announcing a body of 100 GB that sends five bytes of it.
pub fn huge_content_length(path: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: 100000000000\r\n\r\nshort"
    )
    .into_bytes()
}
