//! The client page's files, embedded at build time from `web/guacamole/dist` (see build.rs), or
//! when that was not built, a single page saying how to build it ([`CLIENT_PAGE_BUILT`]).

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
        if !super::CLIENT_PAGE_BUILT {
            // CI (tests/run-all.sh) builds the page and sets this, so it cannot skip unnoticed.
            assert!(
                std::env::var_os("EXOAGENT_REQUIRE_CLIENT_PAGE").is_none(),
                "EXOAGENT_REQUIRE_CLIENT_PAGE is set but the client page was not embedded"
            );
            eprintln!(
                "NOT RUN: the Guacamole client page is not built \
                 (`bash installer/dev/build-web.sh`); CI builds it"
            );
            return;
        }
        let (kind, html) = super::find("index.html").unwrap();
        assert!(kind.starts_with("text/html"));
        assert!(String::from_utf8_lossy(html).contains("assets/app.js"));
        assert!(super::find("assets/app.js").is_some());
        assert!(super::find("../Cargo.toml").is_none());
    }

    #[test]
    fn without_the_built_page_a_page_says_how_to_build_it() {
        let (kind, html) = super::find("index.html").unwrap();
        assert!(kind.starts_with("text/html"));
        let html = String::from_utf8_lossy(html);
        assert_eq!(
            html.contains("bash installer/dev/build-web.sh"),
            !super::CLIENT_PAGE_BUILT,
            "{html}"
        );
        if !super::CLIENT_PAGE_BUILT {
            assert_eq!(super::FILES.len(), 1);
        }
    }
}
