//! Embeds the Guacamole client page (`web/guacamole/dist`, built with npm from a lockfile by
//! `installer/dev/build-web.sh`) so the single exoagent binary can serve it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("txt") => "text/plain; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let dist = manifest.join("../web/guacamole/dist");
    println!("cargo:rerun-if-changed={}", dist.display());
    let index = dist.join("index.html");
    println!("cargo:rerun-if-changed={}", index.display());
    if !index.exists() {
        panic!(
            "the Guacamole client page is not built ({} is missing): run \
             `bash installer/dev/build-web.sh` (npm ci + build from the lockfile)",
            index.display()
        );
    }
    let mut files = Vec::new();
    walk(&dist, &mut files);
    files.sort();
    let mut code = String::from("/// (path under /guacamole/, content type, bytes)\npub static FILES: &[(&str, &str, &[u8])] = &[\n");
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
        let relative = file.strip_prefix(&dist).expect("walked from dist");
        let name = relative.to_string_lossy().replace('\\', "/");
        let absolute = file.canonicalize().expect("listed file exists");
        writeln!(
            code,
            "    ({name:?}, {:?}, include_bytes!({:?})),",
            content_type(file),
            absolute.display().to_string()
        )
        .expect("writing to a String");
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    std::fs::write(out.join("guacamole_assets.rs"), code).expect("OUT_DIR is writable");
}
