//! Bootstrap tokens (local mode): a file of `<node> <token>` lines. On Kubernetes this is where
//! a TokenReview of the agent's projected service-account token will plug in.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

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
    /// A token memory file that is not one ([`Memory`]).
    #[error("{path}: not a token memory file: {source}")]
    Memory {
        /// File.
        path: String,
        /// Cause.
        source: serde_json::Error,
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
    /// process saw it or as the last run remembered it ([`Tokens::after_restart`]); the
    /// epoch when unknown (a first start: every certificate counts). A node certificate
    /// issued before it is refused: a token replaced because it leaked must not leave a
    /// certificate obtained with it renewing itself.
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

    /// Digests of `node`'s tokens (SHA-256, hex): what [`Memory`] keeps in their place.
    fn digests(&self, node: &str) -> BTreeSet<String> {
        let hex = |t: &str| {
            let d = ring::digest::digest(&ring::digest::SHA256, t.as_bytes());
            d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
        };
        self.tokens_of(node).into_iter().map(hex).collect()
    }

    /// `self`, loaded at start, after the run that left `memory`, as [`SharedTokens::replace`]
    /// follows a change: a node that still has every token it remembers keeps its time (one
    /// added revokes nothing); one that lost a token while control was down, or that it did
    /// not list, stands from `now`. With no memory (a first start) every time is unknown, as
    /// [`Tokens::since`] says.
    pub fn after_restart(mut self, memory: Option<&Memory>, now: SystemTime) -> Self {
        let Some(memory) = memory else { return self };
        let nodes: BTreeSet<String> = self.0.values().cloned().collect();
        for node in nodes {
            let since = match memory.nodes.get(&node) {
                Some(m) if !m.digests.is_empty() && m.digests.is_subset(&self.digests(&node)) => {
                    SystemTime::UNIX_EPOCH + Duration::from_millis(m.since_ms)
                }
                _ => now,
            };
            self.1.insert(node, since);
        }
        self
    }

    /// What to keep of these tokens across a restart.
    pub fn memory(&self) -> Memory {
        let nodes: BTreeSet<&String> = self.0.values().collect();
        let nodes = nodes
            .into_iter()
            .map(|node| {
                let since = self.since(node).duration_since(SystemTime::UNIX_EPOCH);
                let since_ms = since.map_or(0, |d| d.as_millis() as u64);
                (node.clone(), NodeMemory { digests: self.digests(node), since_ms })
            })
            .collect();
        Memory { nodes }
    }
}

/// What control keeps of its tokens across restarts (in its state directory): per node, a
/// digest of its tokens and since when they stand. Without it a restart would forget that a
/// node's token was replaced, and take the certificates obtained with the old one again.
/// Digests, not tokens: the file is no second copy of the secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    nodes: BTreeMap<String, NodeMemory>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct NodeMemory {
    digests: BTreeSet<String>,
    /// Milliseconds since the epoch; 0: unknown.
    since_ms: u64,
}

impl Memory {
    /// Reads `path`; `None` when there is no such file (a first start).
    pub fn load(path: &Path) -> Result<Option<Self>, TokenError> {
        let p = || path.display().to_string();
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| TokenError::Memory { path: p(), source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TokenError::Io { path: p(), source }),
        }
    }

    /// Writes `path` whole or not at all (a temporary file renamed over it), readable by
    /// control only.
    pub fn save(&self, path: &Path) -> Result<(), TokenError> {
        let io = |source| TokenError::Io { path: path.display().to_string(), source };
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other).map_err(io)?;
        sinew_identity::write_atomic(path, &json, 0o600).map_err(io)
    }
}

/// The tokens loaded at start, after what the last run remembered in `path`, which then
/// holds them. A memory that cannot be read is named, and every node stands from now (its
/// older node certificates are refused; its token still works), the safe side.
pub fn restore(tokens: Tokens, path: &Path) -> Tokens {
    let now = SystemTime::now();
    let tokens = match Memory::load(path) {
        Ok(memory) => tokens.after_restart(memory.as_ref(), now),
        Err(e) => {
            tracing::warn!(error = %e, "token memory unreadable: every node's tokens stand from now");
            tokens.after_restart(Some(&Memory::default()), now)
        }
    };
    if let Err(e) = tokens.memory().save(path) {
        tracing::warn!(error = %e, "cannot keep the token memory");
    }
    tokens
}

/// The token file in force, shared by the CA and discovery and replaced when the file
/// changes ([`watch_file`]); with a memory file, each change is kept there ([`Memory`]).
#[derive(Debug, Clone, Default)]
pub struct SharedTokens(Arc<RwLock<Arc<Tokens>>>, Option<Arc<(PathBuf, Mutex<()>)>>);

impl SharedTokens {
    /// Starting with `tokens`.
    pub fn new(tokens: Tokens) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(tokens))), None)
    }

    /// Keeps every change in `path` (see [`restore`]).
    pub fn remembered_in(self, path: PathBuf) -> Self {
        Self(self.0, Some(Arc::new((path, Mutex::new(())))))
    }

    /// The tokens in force now.
    pub fn current(&self) -> Arc<Tokens> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `tokens` in force (see [`Tokens::since`]).
    pub fn replace(&self, tokens: Tokens) {
        {
            let mut current = self.0.write().unwrap_or_else(|e| e.into_inner());
            *current = Arc::new(tokens.following(&current, SystemTime::now()));
        }
        // Written outside the lock every authentication reads; one writer at a time, each
        // writing what is in force when it gets its turn, so the last change is the one kept.
        if let Some(memory) = &self.1 {
            let _writer = memory.1.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = self.current().memory().save(&memory.0) {
                tracing::warn!(error = %e, "cannot keep the token memory: a restart would forget this change");
            }
        }
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
                // Off the runtime's threads: the memory file is written and synced.
                let shared = tokens.clone();
                let _ = tokio::task::spawn_blocking(move || shared.replace(t)).await;
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

    #[test]
    fn a_restart_remembers_whose_tokens_changed_and_when() {
        let dir = tempfile::tempdir().unwrap();
        let memory = dir.path().join("token-times.json");
        let parse = |text: &str| Tokens::parse("t", text).unwrap();
        let ab = "a aaaaaaaaaaaaaaaa\nb bbbbbbbbbbbbbbbb\n";
        // A first start: nothing remembered, every time unknown.
        let first = restore(parse(ab), &memory);
        assert_eq!(first.since("a"), SystemTime::UNIX_EPOCH);
        let kept = std::fs::read_to_string(&memory).unwrap();
        assert!(!kept.contains("aaaaaaaaaaaaaaaa"), "digests, not tokens: {kept}");
        // While it runs, b's token is replaced: b stands from then, and the memory says so.
        let shared = SharedTokens::new(first).remembered_in(memory.clone());
        shared.replace(parse("a aaaaaaaaaaaaaaaa\nb bbbbbbbbbbbbbbb2\n"));
        let replaced = shared.current().since("b");
        assert!(replaced > SystemTime::UNIX_EPOCH);
        // Restarted with the same file: b's time is not forgotten.
        let again = restore(parse("a aaaaaaaaaaaaaaaa\nb bbbbbbbbbbbbbbb2\n"), &memory);
        assert_eq!(again.since("a"), SystemTime::UNIX_EPOCH);
        let ms = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis();
        assert_eq!(ms(again.since("b")), ms(replaced));
        // Restarted after b gained a token (which revokes nothing), a's token was replaced
        // and c was added while control was down: a and c stand from the restart.
        let before = SystemTime::now();
        let later = restore(
            parse(
                "a aaaaaaaaaaaaaaa3\nb bbbbbbbbbbbbbbb2\nb bbbbbbbbbbbbbbb4\nc cccccccccccccccc\n",
            ),
            &memory,
        );
        assert!(later.since("a") >= before && later.since("c") >= before);
        assert_eq!(ms(later.since("b")), ms(replaced), "a token added revokes nothing");
        // A memory that is not one: named, and every node stands from now (the safe side).
        std::fs::write(&memory, "not json").unwrap();
        let e = Memory::load(&memory).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: not a token memory file", memory.display())), "{e}");
        let after = restore(parse(ab), &memory);
        assert!(after.since("a") >= before && after.since("b") >= before);
        assert!(Memory::load(&memory).unwrap().is_some(), "rewritten whole");
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
