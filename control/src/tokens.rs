//! Bootstrap tokens (local mode): a file of `<node> <token>` lines. On Kubernetes this is where
//! a TokenReview of the agent's projected service-account token will plug in.

use std::{collections::BTreeMap, path::Path};

/// Errors reading the token file, naming file and line.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Unreadable file.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A bad line.
    #[error("{path}:{line}: {reason}")]
    Line {
        /// File.
        path: String,
        /// 1-based line.
        line: usize,
        /// Why.
        reason: String,
    },
}

/// Token -> node.
#[derive(Debug, Clone, Default)]
pub struct Tokens(BTreeMap<String, String>);

impl Tokens {
    /// Parses a token file.
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| TokenError::Io { path: p.clone(), source })?;
        Self::parse(&p, &text)
    }

    /// Parses token-file text; `path` names it in errors.
    pub fn parse(path: &str, text: &str) -> Result<Self, TokenError> {
        let mut map = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: &str| TokenError::Line {
                path: path.into(),
                line: line_no,
                reason: reason.into(),
            };
            let mut f = line.split_whitespace();
            let (Some(node), Some(token), None) = (f.next(), f.next(), f.next()) else {
                return Err(bad("expected `<node> <token>`"));
            };
            if !sinew_model::is_dns_subdomain(node) {
                return Err(bad("the node name is not an RFC 1123 subdomain"));
            }
            if token.len() < 16 {
                return Err(bad("tokens must be at least 16 characters"));
            }
            if map.insert(token.to_owned(), node.to_owned()).is_some() {
                return Err(bad("this token is already given to another node"));
            }
        }
        Ok(Self(map))
    }

    /// The node a token belongs to.
    pub fn node(&self, token: &str) -> Option<&str> {
        self.0.get(token).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_bad_lines() {
        let t = Tokens::parse("t", "# nodes\nnode-1 aaaaaaaaaaaaaaaa\n\nnode-2 bbbbbbbbbbbbbbbb\n")
            .unwrap();
        assert_eq!(t.node("aaaaaaaaaaaaaaaa"), Some("node-1"));
        assert_eq!(t.node("nope"), None);
        let e = Tokens::parse("t", "node-1 short\n").unwrap_err().to_string();
        assert_eq!(e, "t:1: tokens must be at least 16 characters");
        let e =
            Tokens::parse("t", "n aaaaaaaaaaaaaaaa\nm aaaaaaaaaaaaaaaa\n").unwrap_err().to_string();
        assert!(e.starts_with("t:2:"), "{e}");
    }
}
