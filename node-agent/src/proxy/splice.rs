//! Forwarding with `splice(2)`: bytes move socket -> pipe -> socket inside the kernel, never
//! through user-space buffers. Measured by `cargo xtask bench capture`.

use std::{
    io,
    net::Shutdown,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::Mutex,
};

use socket2::SockRef;
use tokio::{io::Interest, net::TcpStream};

/// Pipe capacity asked for (the default 64 KiB means more syscalls per megabyte); the kernel's
/// `fs.pipe-max-size` (1 MiB by default) caps it, and a refusal just keeps the default.
const PIPE_SIZE: i32 = 1 << 20;

/// A non-blocking pipe used as the in-kernel buffer of one direction.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// A new pipe with the larger capacity when the kernel allows it.
    pub fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ on a pipe we own; it returns the new size or -1.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        let capacity = if size > 0 { size as usize } else { 64 * 1024 };
        Ok(Self { read, write, capacity })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call; null offsets mean "use
    // the file position", as pipes and sockets require.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Moves bytes from `from` to `to` until EOF, then half-closes `to`. Returns the byte count;
/// `progress` is told each chunk moved.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    progress: &(dyn Fn(u64) + Sync),
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        // The pipe is empty here, so EAGAIN can only mean the socket has nothing to read.
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write.as_raw_fd(), pipe.capacity)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // EOF: pass the half-close on; the other direction keeps going. The FIN crosses
            // the kernel's stack on this thread (10-25 us measured over veth), so connections
            // that are ready to start go first: a worker busy closing the last connection
            // otherwise held the next one's accept back by up to 70 us (perf trace of bench
            // capture's connect loop).
            tokio::task::yield_now().await;
            SockRef::from(to).shutdown(Shutdown::Write)?;
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to
                .try_io(Interest::WRITABLE, || splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left))
            {
                Ok(m) => {
                    left -= m;
                    total += m as u64;
                    progress(m as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// The two pipes of one connection.
pub struct Pipes(Pipe, Pipe);

/// Drained pipes kept for the next connections: creating and sizing two pipes costs four
/// syscalls, and closing them four more, on every new connection otherwise.
static POOL: Mutex<Vec<Pipes>> = Mutex::new(Vec::new());
/// At most this many pairs are kept (each holds four descriptors).
const POOL_MAX: usize = 256;

impl Pipes {
    /// A drained pair from the pool, or a new one.
    pub fn take() -> io::Result<Self> {
        if let Some(p) = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(p);
        }
        Ok(Self(Pipe::new()?, Pipe::new()?))
    }

    /// Returns a pair for reuse. Only for pipes known to be empty: after [`copy`] succeeded.
    pub fn give_back(self) {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }
}

/// Copies both ways through two pipes; returns (a -> b, b -> a) byte counts, or the first
/// error (the caller resets both sides and drops the pipes, which may hold data).
/// `progress` is told each chunk, (a -> b, b -> a).
pub async fn copy(
    a: &TcpStream,
    b: &TcpStream,
    pipes: &Pipes,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> io::Result<(u64, u64)> {
    let (forth, back) = (|n| progress(n, 0), |n| progress(0, n));
    tokio::try_join!(one_way(a, b, &pipes.0, &forth), one_way(b, a, &pipes.1, &back))
}
