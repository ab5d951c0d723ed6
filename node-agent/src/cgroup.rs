//! cgroup v2: where it is mounted, joining the agent's own cgroup, finding a pod's cgroup.

use std::path::{Path, PathBuf};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 line in /proc/mounts.
    #[error("no cgroup v2 hierarchy is mounted (looked for a cgroup2 line in /proc/mounts)")]
    NoCgroup2,
    /// A path given as a pod cgroup is not a cgroup v2 directory.
    #[error("cgroup {path}: {reason}")]
    Invalid {
        /// The path.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// Discovery by UID found nothing.
    #[error("no cgroup found for pod uid {uid} under {root}")]
    NotFound {
        /// Pod UID.
        uid: String,
        /// Where we looked.
        root: PathBuf,
    },
    /// Discovery by UID found more than one cgroup of that name.
    #[error(
        "pod uid {uid}: {first} and {second} both look like its cgroup; pass cgroup explicitly"
    )]
    Ambiguous {
        /// Pod UID.
        uid: String,
        /// One match.
        first: PathBuf,
        /// Another.
        second: PathBuf,
    },
    /// An I/O error on a cgroup file.
    #[error("cgroup {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// The cgroup v2 mount point, read from /proc/mounts (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup).
pub fn v2_mount() -> Result<PathBuf, CgroupError> {
    let mounts = std::fs::read_to_string("/proc/mounts")
        .map_err(|source| CgroupError::Io { path: "/proc/mounts".into(), source })?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .ok_or(CgroupError::NoCgroup2)
}

/// Moves this whole process into `dir` (created if missing), so that its sockets are never
/// matched by programs attached to pod cgroups.
pub fn join(dir: &Path) -> Result<(), CgroupError> {
    let io = |source| CgroupError::Io { path: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).map_err(io)
}

/// Checks that `path` is a cgroup v2 directory below `root`.
pub fn validate(root: &Path, path: &Path) -> Result<PathBuf, CgroupError> {
    let invalid =
        |reason: &str| CgroupError::Invalid { path: path.to_path_buf(), reason: reason.into() };
    let canonical = path.canonicalize().map_err(|e| invalid(&format!("does not exist ({e})")))?;
    if !canonical.starts_with(root) {
        return Err(invalid(&format!(
            "is not inside the cgroup v2 hierarchy at {}",
            root.display()
        )));
    }
    if !canonical.join("cgroup.procs").exists() {
        return Err(invalid("is not a cgroup directory (no cgroup.procs)"));
    }
    if canonical == root {
        return Err(invalid("is the root cgroup; a pod needs its own"));
    }
    Ok(canonical)
}

/// Whether `inner` is `outer` or below it (programs attached to `outer` act on `inner`).
pub fn nested(outer: &Path, inner: &Path) -> bool {
    inner.starts_with(outer)
}

/// Finds a pod's cgroup from its UID the way kubelet names them: `pod<uid>` with the cgroupfs
/// driver, `...-pod<uid_with_underscores>.slice` with systemd. Depth-limited. Two directories
/// of that name (a decoy someone with a delegated subtree made, say) are refused rather than
/// guessed between: attaching to the wrong one would leave the pod uncaptured.
pub fn discover(root: &Path, uid: &str) -> Result<PathBuf, CgroupError> {
    let plain = format!("pod{uid}");
    let systemd = format!("pod{}.slice", uid.replace('-', "_"));
    let mut found: Option<PathBuf> = None;
    let mut stack = vec![(root.to_path_buf(), 0u32)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.filter_map(Result::ok) {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name == plain || name.ends_with(&systemd) {
                if let Some(first) = found {
                    return Err(CgroupError::Ambiguous {
                        uid: uid.into(),
                        first,
                        second: entry.path(),
                    });
                }
                found = Some(entry.path());
            } else if depth < 5 {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    found.ok_or_else(|| CgroupError::NotFound { uid: uid.into(), root: root.to_path_buf() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovers_kubelet_cgroup_names() {
        let root = tempfile::tempdir().unwrap();
        let cgroupfs = root.path().join("kubepods/besteffort/pod1234-ab");
        let systemd = root
            .path()
            .join("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod99_cd.slice");
        std::fs::create_dir_all(&cgroupfs).unwrap();
        std::fs::create_dir_all(&systemd).unwrap();
        assert_eq!(discover(root.path(), "1234-ab").unwrap(), cgroupfs);
        assert_eq!(discover(root.path(), "99-cd").unwrap(), systemd);
        let err = discover(root.path(), "nope").unwrap_err().to_string();
        assert!(err.contains("no cgroup found for pod uid nope"), "{err}");
        // A second directory of the same name elsewhere: refused, naming both.
        std::fs::create_dir_all(root.path().join("user.slice/decoy/pod1234-ab")).unwrap();
        let err = discover(root.path(), "1234-ab").unwrap_err().to_string();
        assert!(err.contains("both look like its cgroup") && err.contains("decoy"), "{err}");
        assert!(err.contains("besteffort/pod1234-ab"), "{err}");
    }

    #[test]
    fn nesting_is_by_whole_path_components() {
        let p = Path::new;
        assert!(nested(p("/sys/fs/cgroup/a"), p("/sys/fs/cgroup/a")));
        assert!(nested(p("/sys/fs/cgroup/a"), p("/sys/fs/cgroup/a/b")));
        assert!(!nested(p("/sys/fs/cgroup/a/b"), p("/sys/fs/cgroup/a")));
        assert!(!nested(p("/sys/fs/cgroup/a"), p("/sys/fs/cgroup/ab")));
    }

    #[test]
    fn validation_refuses_paths_outside_the_hierarchy() {
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join("pod");
        std::fs::create_dir_all(&pod).unwrap();
        std::fs::write(pod.join("cgroup.procs"), "").unwrap();
        let root_c = root.path().canonicalize().unwrap();
        assert!(validate(&root_c, &pod).is_ok());
        assert!(
            validate(&root_c, Path::new("/etc")).unwrap_err().to_string().contains("not inside")
        );
        assert!(
            validate(&root_c, &root_c.join("missing"))
                .unwrap_err()
                .to_string()
                .contains("does not exist")
        );
        std::fs::create_dir_all(root.path().join("plain")).unwrap();
        assert!(
            validate(&root_c, &root_c.join("plain"))
                .unwrap_err()
                .to_string()
                .contains("cgroup.procs")
        );
    }
}
