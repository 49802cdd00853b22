//! Embeds the Guacamole client page (`web/guacamole/dist`, built with npm from a lockfile by
//! `installer/dev/build-web.sh`) so the single exoagent binary can serve it. Without it (a fresh
//! checkout, no npm) a plain page saying how to build it is embedded instead, so `cargo build`,
//! `cargo clippy` and `cargo test --lib` need no Node.js; `CLIENT_PAGE_BUILT` says which.

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
    let index = dist.join("index.html");
    let placeholder = manifest.join("src/services/guacamole/client-page-not-built.html");
    println!("cargo:rerun-if-changed={}", placeholder.display());
    let built = index.exists();
    if built {
        println!("cargo:rerun-if-changed={}", dist.display());
        println!("cargo:rerun-if-changed={}", index.display());
    } else {
        // A path that does not exist would rerun this (and rebuild the crate) on every build;
        // the folder dist appears in exists, and changes when it does.
        let web = dist.parent().expect("dist has a parent");
        println!("cargo:rerun-if-changed={}", web.display());
    }
    // (path under /guacamole/, file on disk)
    let files: Vec<(String, PathBuf)> = if built {
        let mut files = Vec::new();
        walk(&dist, &mut files);
        files.sort();
        files
            .into_iter()
            .map(|file| {
                println!("cargo:rerun-if-changed={}", file.display());
                let relative = file.strip_prefix(&dist).expect("walked from dist");
                let name = relative.to_string_lossy().replace('\\', "/");
                (name, file)
            })
            .collect()
    } else {
        vec![("index.html".to_owned(), placeholder)]
    };
    let mut code = format!(
        "/// Whether `web/guacamole/dist` was embedded (otherwise only a page saying how to \
         build it).\npub const CLIENT_PAGE_BUILT: bool = {built};\n\
         /// (path under /guacamole/, content type, bytes)\n\
         pub static FILES: &[(&str, &str, &[u8])] = &[\n"
    );
    for (name, file) in &files {
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
