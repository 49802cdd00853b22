//! Value checks shared by several sections: URLs, user names, URL prefixes, paths.

use std::borrow::Cow;
use std::path::PathBuf;

/// `s` with the userinfo of a URL (`scheme://user:password@host`) replaced by `***`, for
/// messages and displays: a password must not reach a log or the console. Text that is not
/// such a URL is returned unchanged.
pub fn redact_userinfo(s: &str) -> Cow<'_, str> {
    let Some(scheme_end) = s.find("://") else {
        return Cow::Borrowed(s);
    };
    let authority_start = scheme_end + 3;
    let rest = &s[authority_start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_len].rfind('@') {
        Some(at) => Cow::Owned(format!("{}***{}", &s[..authority_start], &rest[at..])),
        None => Cow::Borrowed(s),
    }
}

/// An `http(s)://host[:port][/path]` URL without query, fragment or credentials, with any
/// trailing `/` removed (paths are appended to it).
pub fn normalise_http_url(s: &str) -> Option<String> {
    let url = reqwest::Url::parse(s).ok()?;
    let plain = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some()
        && url.query().is_none()
        && url.fragment().is_none()
        && url.username().is_empty()
        && url.password().is_none();
    plain.then(|| url.as_str().trim_end_matches('/').to_owned())
}

/// Whether `s` is a portable POSIX user name: `^[a-z_][a-z0-9_-]{0,31}$`.
pub fn valid_user_name(s: &str) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    s.len() <= 32
        && (first.is_ascii_lowercase() || first == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// A checked URL prefix, always starting and ending with `/`; `None` when not acceptable.
pub fn normalise_base_url(s: &str) -> Option<String> {
    let rest = s.strip_prefix('/')?;
    if rest.is_empty() {
        return Some("/".to_owned());
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    for segment in rest.split('/') {
        let fine = !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~'));
        if !fine {
            return None;
        }
    }
    Some(format!("/{rest}/"))
}

/// An absolute path without NUL bytes.
pub fn absolute_path(s: &str) -> Option<PathBuf> {
    (s.starts_with('/') && !s.contains('\0')).then(|| PathBuf::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_redacted() {
        assert_eq!(
            redact_userinfo("http://u:p@h:1/x?q@z"),
            "http://***@h:1/x?q@z"
        );
        assert_eq!(redact_userinfo("https://tok@h"), "https://***@h");
        assert_eq!(redact_userinfo("http://h/a@b"), "http://h/a@b");
        assert_eq!(redact_userinfo("no url"), "no url");
        assert!(normalise_http_url("http://u:p@h").is_none());
    }

    #[test]
    fn user_names() {
        for good in ["exouser", "_x", "a", "a-b_c9", &"a".repeat(32)] {
            assert!(valid_user_name(good), "{good}");
        }
        for bad in [
            "",
            "9a",
            "-a",
            "Exouser",
            "a b",
            "a.b",
            &"a".repeat(33),
            "é",
        ] {
            assert!(!valid_user_name(bad), "{bad}");
        }
    }

    #[test]
    fn http_urls() {
        assert_eq!(
            normalise_http_url("http://169.254.169.254/").as_deref(),
            Some("http://169.254.169.254")
        );
        assert_eq!(
            normalise_http_url("https://meta.example:8443/x/").as_deref(),
            Some("https://meta.example:8443/x")
        );
        for bad in [
            "ftp://x",
            "169.254.169.254",
            "http://u:p@x",
            "http://x/?q=1",
            "http://x/#f",
            "",
        ] {
            assert_eq!(normalise_http_url(bad), None, "{bad}");
        }
    }

    #[test]
    fn base_urls() {
        assert_eq!(normalise_base_url("/").as_deref(), Some("/"));
        assert_eq!(normalise_base_url("/lab").as_deref(), Some("/lab/"));
        assert_eq!(normalise_base_url("/a/b-c/").as_deref(), Some("/a/b-c/"));
        for bad in [
            "",
            "lab",
            "//",
            "//evil.example/",
            "/a/../b",
            "/./",
            "/a b",
            "/a\t",
            "/a?x",
        ] {
            assert_eq!(normalise_base_url(bad), None, "{bad:?}");
        }
    }
}
