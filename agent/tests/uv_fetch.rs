//! The pinned uv fetched when a machine has none: from the real PyPI (its simple JSON index and
//! files.pythonhosted.org), verified and runnable; and from package indexes served on loopback
//! that offer the wrong bytes or no such file, which must install nothing.
//!
//! Needs PyPI (the registry this machine reaches through its proxy).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use exoagent::platform::uv::{pinned_wheel, UvSource, PYPI_SIMPLE, UV_VERSION};

fn client() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

/// A package index on 127.0.0.1 answering every request with the handler's (status, type,
/// body) for the request path; serves until the test ends.
fn serve(handler: impl Fn(&str) -> (u16, &'static str, Vec<u8>) + Send + Sync + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let handler = handler.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                if reader.read_line(&mut request).is_err() {
                    return;
                }
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let (status, kind, body) = handler(&path);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(&body);
            });
        }
    });
    base
}

fn pinned_file() -> &'static str {
    pinned_wheel().expect("a pin for this machine").file
}

fn nothing_installed(tools: &Path) {
    let dir = tools.join(format!("uv-{UV_VERSION}"));
    assert!(
        !dir.join("uv").exists(),
        "an unverified uv was left in {}",
        dir.display()
    );
}

#[tokio::test]
async fn the_pinned_uv_comes_from_pypi_verified_and_runs() {
    let tools = tempfile::tempdir().unwrap();
    let uv = UvSource::new(PYPI_SIMPLE, client())
        .ensure(tools.path())
        .await
        .expect("uv from PyPI");
    assert_eq!(uv, tools.path().join(format!("uv-{UV_VERSION}/uv")));
    let out = Command::new(&uv).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&format!("uv {UV_VERSION}")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&uv).unwrap().permissions().mode() & 0o777,
        0o755
    );
    // Once there, it is used without asking any index (this one answers nothing).
    let again = UvSource::new("http://127.0.0.1:9/simple", client())
        .ensure(tools.path())
        .await
        .expect("the fetched uv is reused");
    assert_eq!(again, uv);
}

#[tokio::test]
async fn wrong_bytes_from_an_index_install_nothing() {
    let file = pinned_file();
    // The right file name and size, but not the pinned bytes.
    let size = pinned_wheel().unwrap().size;
    let base = serve(move |path| {
        if path == "/simple/uv/" {
            let page = format!(
                r#"{{"files":[{{"filename":"{file}","url":"../../files/{file}#sha256=00"}}]}}"#
            );
            (
                200,
                "application/vnd.pypi.simple.v1+json",
                page.into_bytes(),
            )
        } else if path == format!("/files/{file}") {
            (200, "application/octet-stream", vec![0u8; size as usize])
        } else {
            (404, "text/plain", b"not here".to_vec())
        }
    });
    let tools = tempfile::tempdir().unwrap();
    let e = UvSource::new(&format!("{base}/simple"), client())
        .ensure(tools.path())
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "uv-checksum-mismatch", "{e}");
    assert!(
        e.to_string().contains(&format!("{base}/files/{file}")),
        "{e}"
    );
    nothing_installed(tools.path());
}

#[tokio::test]
async fn an_index_without_the_pinned_file_or_with_a_short_one_installs_nothing() {
    let file = pinned_file();
    let base = serve(move |path| match path {
        "/a/uv/" => (
            200,
            "text/html",
            br#"<a href="../../files/uv-0.0.1-py3-none-any.whl">uv-0.0.1</a>"#.to_vec(),
        ),
        "/b/uv/" => (
            200,
            "text/html",
            format!(r#"<a href="/files/{file}">{file}</a>"#).into_bytes(),
        ),
        _ => (200, "application/octet-stream", b"short".to_vec()),
    });
    let tools = tempfile::tempdir().unwrap();
    let e = UvSource::new(&format!("{base}/a"), client())
        .ensure(tools.path())
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "uv-not-listed", "{e}");
    assert!(e.to_string().contains(file), "{e}");
    let e = UvSource::new(&format!("{base}/b"), client())
        .ensure(tools.path())
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "uv-download-failed", "{e}");
    let e = UvSource::new("http://127.0.0.1:9/simple", client())
        .ensure(tools.path())
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "uv-index-unreachable", "{e}");
    nothing_installed(tools.path());
}
