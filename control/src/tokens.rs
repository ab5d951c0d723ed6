//! Bootstrap tokens (local mode): a file of `<node> <token>` lines. On Kubernetes this is where
//! a TokenReview of the agent's projected service-account token will plug in.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, RwLock},
    time::SystemTime,
};

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

/// Token -> node, and since when each node's tokens stand.
#[derive(Debug, Clone, Default)]
pub struct Tokens(BTreeMap<String, String>, BTreeMap<String, SystemTime>);

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
        Ok(Self(map, BTreeMap::new()))
    }

    fn tokens_of(&self, node: &str) -> BTreeSet<&str> {
        self.0.iter().filter(|(_, n)| *n == node).map(|(t, _)| t.as_str()).collect()
    }

    /// Since when `node`'s tokens stand: when it was (re-)listed or lost a token, as this
    /// process saw it; the epoch for nodes listed as loaded at start (unknown, so every
    /// certificate counts). A node certificate issued before it is refused: a token replaced
    /// because it leaked must not leave a certificate obtained with it renewing itself.
    pub fn since(&self, node: &str) -> SystemTime {
        self.1.get(node).copied().unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// `self` following `old` at `now`: a node new to the file, or one that lost a token,
    /// stands from `now`; others keep their time (adding a token revokes nothing).
    fn following(mut self, old: &Tokens, now: SystemTime) -> Self {
        let nodes: BTreeSet<String> = self.0.values().cloned().collect();
        for node in nodes {
            let before = old.tokens_of(&node);
            let kept = !before.is_empty() && before.is_subset(&self.tokens_of(&node));
            let since = if kept { old.since(&node) } else { now };
            self.1.insert(node, since);
        }
        self
    }

    /// The node a token belongs to.
    pub fn node(&self, token: &str) -> Option<&str> {
        self.0.get(token).map(String::as_str)
    }

    /// Whether `node` is listed (a node taken out of the file is revoked).
    pub fn has_node(&self, node: &str) -> bool {
        self.0.values().any(|n| n == node)
    }
}

/// The token file in force, shared by the CA and discovery and replaced when the file
/// changes ([`watch_file`]).
#[derive(Debug, Clone, Default)]
pub struct SharedTokens(Arc<RwLock<Arc<Tokens>>>);

impl SharedTokens {
    /// Starting with `tokens`.
    pub fn new(tokens: Tokens) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(tokens))))
    }

    /// The tokens in force now.
    pub fn current(&self) -> Arc<Tokens> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `tokens` in force (see [`Tokens::since`]).
    pub fn replace(&self, tokens: Tokens) {
        let mut current = self.0.write().unwrap_or_else(|e| e.into_inner());
        *current = Arc::new(tokens.following(&current, SystemTime::now()));
    }
}

/// Re-reads `path` every 2 s and puts it in force when its content changed (it is small; a
/// timestamp can miss two writes in one clock tick); a file that does not parse is named and
/// the last good tokens stay. `tokens` must hold what the file held when it was loaded.
pub async fn watch_file(path: std::path::PathBuf, tokens: SharedTokens) {
    let mut last: Option<Vec<u8>> = None;
    let mut seen: Option<Vec<u8>> = None;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = std::fs::read(&path).ok();
        // A file being rewritten (truncated, then filled) is read once it holds still for a
        // poll, and an empty one never: either would revoke every node it lacks.
        let settled = now == seen;
        seen.clone_from(&now);
        if !settled || now.as_ref().is_none_or(|t| t.trim_ascii().is_empty()) {
            continue;
        }
        // The first settled look always applies: `tokens` came from the file, or from an
        // older version of it if it changed before this task ran.
        if last.is_some() && now == last {
            continue;
        }
        // The bytes just checked, not a second read that could catch another rewrite.
        let text = String::from_utf8_lossy(now.as_deref().unwrap_or_default()).into_owned();
        last = now;
        match Tokens::parse(&path.display().to_string(), &text) {
            Ok(t) => {
                tracing::info!(file = %path.display(), nodes = t.0.len(), "token file reloaded");
                tokens.replace(t);
            }
            Err(e) => tracing::warn!(error = %e, "token file rejected; the last good one stays"),
        }
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

    #[test]
    fn a_node_that_loses_a_token_or_comes_back_stands_anew() {
        let (t0, t1) = (SystemTime::UNIX_EPOCH, SystemTime::now());
        let parse = |text: &str| Tokens::parse("t", text).unwrap();
        let start = parse("a aaaaaaaaaaaaaaaa\nb bbbbbbbbbbbbbbbb\nc cccccccccccccccc\n");
        assert_eq!(start.since("a"), t0, "listed at start: unknown, every certificate counts");
        // a: a token added; b: its token replaced; c: taken out; d: new.
        let next = parse(
            "a aaaaaaaaaaaaaaaa\na aaaaaaaaaaaaaaa2\nb bbbbbbbbbbbbbbb2\nd dddddddddddddddd\n",
        )
        .following(&start, t1);
        assert_eq!(next.since("a"), t0);
        assert_eq!(next.since("b"), t1);
        assert_eq!(next.since("d"), t1);
        // c back with its old token: certificates from before it was taken out stay refused.
        let back =
            parse("c cccccccccccccccc\n").following(&next, t1 + std::time::Duration::from_secs(9));
        assert_eq!(back.since("c"), t1 + std::time::Duration::from_secs(9));
    }

    #[tokio::test]
    async fn a_changed_file_is_put_in_force_and_a_bad_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "node-1 aaaaaaaaaaaaaaaa\n").unwrap();
        let shared = SharedTokens::new(Tokens::load(&path).unwrap());
        let task = tokio::spawn(watch_file(path.clone(), shared.clone()));
        let wait = |want: bool| {
            let shared = shared.clone();
            async move {
                for _ in 0..200 {
                    if shared.current().has_node("node-2") == want {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                panic!("node-2 listed: never {want}");
            }
        };
        std::fs::write(&path, "node-2 bbbbbbbbbbbbbbbb\n").unwrap();
        wait(true).await;
        assert!(!shared.current().has_node("node-1"), "node-1 revoked");
        std::fs::write(&path, "node-3 short\n").unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(4500)).await;
        assert!(shared.current().has_node("node-2"), "the last good file stays");
        // An empty file (a rewrite caught between truncate and write) is never applied.
        std::fs::write(&path, "").unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(4500)).await;
        assert!(shared.current().has_node("node-2"), "an empty file revokes nobody");
        task.abort();
    }
}
