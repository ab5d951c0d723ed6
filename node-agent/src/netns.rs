//! Network namespaces: the agent creates its listeners and upstream sockets inside each pod's
//! namespace, so traffic leaves with the pod's address and routes whatever the CNI is.

use std::{
    fs::File,
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The path could not be opened.
    #[error("network namespace {path}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The path is not a network namespace.
    #[error("network namespace {path}: not a network namespace ({source})")]
    NotNetns {
        /// The path.
        path: PathBuf,
        /// Cause.
        source: nix::Error,
    },
}

/// An open network namespace, and the agent's own to return to.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
    home: File,
    cookie: u64,
}

impl Netns {
    /// Opens `path` and checks that it is a network namespace by entering it once.
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        // Non-blocking: a FIFO given as the path would otherwise block the open for ever,
        // and every pod change behind it.
        let open = |p: &Path| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
                .open(p)
                .map_err(|source| NetnsError::Open { path: path.to_path_buf(), source })
        };
        let file = open(path)?;
        let home = open(Path::new("/proc/thread-self/ns/net"))?;
        let mut ns = Self { path: path.to_path_buf(), file, home, cookie: 0 };
        let probe = ns
            .run(|| Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)))
            .map_err(|source| NetnsError::NotNetns { path: path.to_path_buf(), source })?
            .map_err(|source| NetnsError::Open { path: path.to_path_buf(), source })?;
        ns.cookie = netns_cookie(&probe)
            .map_err(|source| NetnsError::Open { path: path.to_path_buf(), source })?;
        Ok(ns)
    }

    /// The path this namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace file, for attaching programs to it.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The kernel's cookie for this namespace (`SO_NETNS_COOKIE`).
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` on this thread inside the namespace, then returns to the agent's own.
    ///
    /// Only the calling thread switches, and `f` must not yield: sockets created inside stay
    /// in the pod's namespace for their whole life, whichever thread drives them later.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, nix::Error> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)?;
        let out = f();
        if let Err(e) = setns(self.home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A worker thread stuck in a pod's namespace would send other pods' traffic from
            // the wrong place: there is no safe way to go on.
            eprintln!("sinew-agent: cannot return to the agent's network namespace: {e}");
            std::process::abort();
        }
        Ok(out)
    }

    /// A new non-blocking TCP socket of `domain` inside this namespace (one syscall: the
    /// flag is set at creation).
    pub fn tcp_socket(&self, domain: Domain) -> io::Result<Socket> {
        self.run(|| Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP)))
            .map_err(io::Error::from)?
    }
}

/// `SO_NETNS_COOKIE` of a socket: the identity of the namespace it lives in.
pub fn netns_cookie(sock: &impl std::os::fd::AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer is a valid u64 and `len` says so; the kernel writes at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_at_once_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(Netns::open(&fifo).map(|_| ()));
        });
        let opened = rx.recv_timeout(std::time::Duration::from_secs(2)).expect("not blocked");
        assert!(opened.is_err(), "a FIFO is no network namespace");
    }
}
