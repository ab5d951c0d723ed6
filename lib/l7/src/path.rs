//! Request path normalization (RFC 3986), as Envoy's `normalize_path` does for Istio: applied
//! once before authorization and routing, and forwarded, so a policy on `/admin/*` cannot be
//! passed by `/public/../admin/x` or `/%61dmin/x` while the backend serves `/admin/x`.
//!
//! Istio's default, `BASE`: backslashes become slashes, percent-encoded unreserved characters
//! are decoded, the hex digits of the other escapes are upper-cased, and `.` and `..`
//! segments are removed; `%00` is refused. Encoded slashes (`%2F`) stay encoded: they are
//! data, not separators.

use std::borrow::Cow;

/// Why a path cannot be normalized (the request gets 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%` not followed by two hex digits.
    #[error("bad percent-encoding at byte {0} of the path")]
    BadEscape(usize),
    /// Not an absolute path (`*`, or no leading `/`).
    #[error("the path does not start with /")]
    NotAbsolute,
    /// `%00`, which Envoy refuses in any path.
    #[error("an encoded NUL (%00) at byte {0} of the path")]
    Nul(usize),
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The normalized form of `path` (no query); borrowed when it is already normal.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = path.as_bytes();
    let simple = !bytes.contains(&b'%')
        && !bytes.contains(&b'\\')
        && !path.split('/').any(|s| s == "." || s == "..");
    if simple {
        return Ok(Cow::Borrowed(path));
    }
    // Escapes first, so that `%2e%2e` is a `..` segment too.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let (Some(h), Some(l)) =
                (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
            else {
                return Err(PathError::BadEscape(i));
            };
            let b = h << 4 | l;
            if b == 0 {
                return Err(PathError::Nul(i));
            }
            if unreserved(b) {
                decoded.push(b as char);
            } else {
                decoded.push('%');
                decoded.push(bytes[i + 1].to_ascii_uppercase() as char);
                decoded.push(bytes[i + 2].to_ascii_uppercase() as char);
            }
            i += 3;
        } else if bytes[i] == b'\\' {
            // As Envoy's normalize_path: a backend may well read it as a separator.
            decoded.push('/');
            i += 1;
        } else {
            // Paths are ASCII in a valid URI; copy any other byte's char whole.
            let c = path[i..].chars().next().unwrap_or('\u{fffd}');
            decoded.push(c);
            i += c.len_utf8();
        }
    }
    // RFC 3986 section 5.2.4, on segments.
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "." | ".." => {
                if *seg == ".." {
                    out.pop();
                }
                // A trailing dot segment leaves the path ending in `/`.
                if n == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    Ok(Cow::Owned(format!("/{}", out.join("/"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> String {
        normalize(p).expect(p).into_owned()
    }

    #[test]
    fn normal_paths_are_borrowed_unchanged() {
        for p in ["/", "/a/b", "/a/b/", "/a//b", "/a.b/..c/c..", "/%2F"] {
            if !p.contains('%') {
                assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
            }
            assert_eq!(n(p), p, "{p}");
        }
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(n("/public/../admin/users"), "/admin/users");
        assert_eq!(n("/a/./b/../c"), "/a/c");
        assert_eq!(n("/../../admin"), "/admin");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/b/."), "/a/b/");
        assert_eq!(n("/.."), "/");
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_kept_in_upper_case() {
        assert_eq!(n("/%61dmin/users"), "/admin/users");
        assert_eq!(n("/public/%2e%2E/admin"), "/admin");
        assert_eq!(n("/a%2fb"), "/a%2Fb");
        assert_eq!(n("/a%20b"), "/a%20b");
        assert_eq!(n("/a%3a"), "/a%3A");
        assert_eq!(n("/%7e%41"), "/~A");
    }

    #[test]
    fn backslashes_are_separators() {
        assert_eq!(n("/public\\..\\admin"), "/admin");
        assert_eq!(n("/a\\b"), "/a/b");
        // Encoded, it is data.
        assert_eq!(n("/a%5cb"), "/a%5Cb");
    }

    #[test]
    fn bad_paths_are_refused() {
        assert_eq!(normalize("/a%"), Err(PathError::BadEscape(2)));
        assert_eq!(normalize("/a%g1"), Err(PathError::BadEscape(2)));
        assert_eq!(normalize("/%4"), Err(PathError::BadEscape(1)));
        assert_eq!(normalize("/a%00"), Err(PathError::Nul(2)));
        assert_eq!(normalize("*"), Err(PathError::NotAbsolute));
        assert_eq!(normalize(""), Err(PathError::NotAbsolute));
    }
}
