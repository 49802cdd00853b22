//! The client page's files, embedded at build time from `web/guacamole/dist` (see build.rs).

include!(concat!(env!("OUT_DIR"), "/guacamole_assets.rs"));

/// The content type and bytes of `name` (`index.html`, `assets/app.js`, ...).
pub fn find(name: &str) -> Option<(&'static str, &'static [u8])> {
    FILES
        .iter()
        .find(|(path, _, _)| *path == name)
        .map(|(_, content_type, bytes)| (*content_type, *bytes))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_and_its_script_are_embedded() {
        let (kind, html) = super::find("index.html").unwrap();
        assert!(kind.starts_with("text/html"));
        assert!(String::from_utf8_lossy(html).contains("assets/app.js"));
        assert!(super::find("assets/app.js").is_some());
        assert!(super::find("../Cargo.toml").is_none());
    }
}
