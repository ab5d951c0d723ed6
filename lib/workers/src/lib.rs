//! Thread-per-core data-plane workers, shared by the agent and the waypoint.
//!
//! Each worker is one OS thread running its own single-threaded tokio runtime. A connection
//! accepted by a worker is served start to end on that thread, together with the pooled
//! upstream connections it uses, so a request's wake-ups never cross cores. Measured on the
//! 2-core benchmark machine (`cargo xtask bench l7`), the waypoint's HTTP engine served 28%
//! more requests/s this way than on one multi-threaded runtime with the same thread count,
//! whose work stealing and cross-thread wake-ups cost more than they balanced. Listeners are
//! one socket per worker in an `SO_REUSEPORT` group, so the kernel spreads connections, and
//! [`serve_balanced`] evens out what its hash leaves uneven.
//!
//! State that must be one per process (rate-limit buckets, configuration) stays shared;
//! state that is cheap to keep per worker (connection pools) uses [`PerWorker`].

use std::{
    cell::Cell,
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    runtime::Handle,
    sync::{mpsc, oneshot},
};

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the worker running the caller, `None` off the workers.
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// Whether workers are pinned to CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pinning {
    /// With one worker per CPU the process may run on, each worker is pinned to its own CPU;
    /// with fewer workers than CPUs (or one), none is, and the scheduler places them.
    #[default]
    Auto,
    /// Never pinned.
    Off,
}

impl std::str::FromStr for Pinning {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            other => Err(format!("{other:?}: expected auto or off")),
        }
    }
}

impl std::fmt::Display for Pinning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Off => "off",
        })
    }
}

/// Running workers; dropping this stops them (their tasks are cancelled).
pub struct Workers {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    cpus: Vec<Option<usize>>,
}

impl Workers {
    /// Starts `n` workers (at least one) named `<name>-<index>`.
    ///
    /// Also caps glibc's malloc arenas at one per worker plus the main thread's: by default
    /// each thread that allocates gets an arena of its own (up to 8 per core), and their
    /// fragmentation cost the waypoint under load (`cargo xtask bench l7`, 2 workers) peak RSS
    /// of 30.1 MiB. Fewer arenas than threads is worse: with one arena for two workers, the
    /// workers contended for its lock on every allocation that missed glibc's per-thread
    /// cache, some 45,000 `futex` calls a second at 34,000 requests/s, and served 15% fewer
    /// requests with a p99 twice as long as with an arena each, which made no `futex` call.
    /// glibc gives a thread a new arena while the count is under the cap, so each worker's
    /// first allocation creates its own.
    ///
    /// With [`Pinning::Auto`] and as many workers as allowed CPUs, worker `i` is pinned to the
    /// `i`-th. Measured with the waypoint's HTTP engine under wrk on 2 cores (2 workers, wrk
    /// and nginx sharing the cores): unpinned, the two workers now and then queued on one
    /// CPU and waited up to 4-8 ms to run (`perf sched latency`: max delay 4.0-8.0 ms for the
    /// workers against 0.8-1.3 for wrk and nginx), p99 4.4-4.6 ms; pinned, p99 1.5-1.7 ms at
    /// the same or higher requests/s. A pin that fails leaves that worker unpinned.
    pub fn start(n: usize, name: &str, pinning: Pinning) -> io::Result<Self> {
        let n = n.max(1);
        let arenas = i32::try_from(n.saturating_add(1)).unwrap_or(i32::MAX);
        // SAFETY: mallopt only tunes the allocator and may be called at any time; a failure
        // (0) leaves glibc's default in place.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
        let cpus = match pinning {
            Pinning::Auto => allowed_cpus().ok().filter(|c| n >= 2 && c.len() == n),
            Pinning::Off => None,
        };
        let mut workers =
            Self { handles: Vec::new(), stops: Vec::new(), threads: Vec::new(), cpus: Vec::new() };
        let (pinned_tx, pinned_rx) = std::sync::mpsc::channel();
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            let cpu = cpus.as_ref().map(|c| c[i]);
            let pinned_tx = pinned_tx.clone();
            workers.handles.push(runtime.handle().clone());
            workers.stops.push(stop);
            workers.threads.push(std::thread::Builder::new().name(format!("{name}-{i}")).spawn(
                move || {
                    INDEX.with(|c| c.set(Some(i)));
                    let pinned = cpu.filter(|&c| pin_current_thread(c).is_ok());
                    let _ = pinned_tx.send((i, pinned));
                    let _ = runtime.block_on(stopped);
                },
            )?);
        }
        drop(pinned_tx);
        workers.cpus = vec![None; n];
        for (i, cpu) in pinned_rx.iter().take(n) {
            workers.cpus[i] = cpu;
        }
        Ok(workers)
    }

    /// The CPU each worker is pinned to, by worker index (`None`: not pinned).
    pub fn cpus(&self) -> &[Option<usize>] {
        &self.cpus
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Always false: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The runtime handles, by worker index.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Spawns `make(index)` on every worker.
    pub fn spawn_each<F, Fut>(&self, make: F)
    where
        F: Fn(usize) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        for (i, h) in self.handles.iter().enumerate() {
            h.spawn(make(i));
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stops.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The CPUs this thread may run on (its affinity mask, which a container's cpuset narrows).
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `set`, which the kernel fills.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET only reads the set, for indexes below CPU_SETSIZE.
    Ok((0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect())
}

/// Pins the calling thread to `cpu`.
fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes inside the set for indexes below CPU_SETSIZE, which `cpu` (from
    // `allowed_cpus`) is.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: thread id 0 is the calling thread; the pointer and size describe `set`.
    let rc = unsafe {
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One value per worker; [`PerWorker::get`] gives the calling worker's (the first one's off
/// the workers).
#[derive(Debug)]
pub struct PerWorker<T>(Vec<T>);

impl<T> PerWorker<T> {
    /// `n` values (at least one) made by `make(index)`.
    pub fn new(n: usize, make: impl FnMut(usize) -> T) -> Self {
        Self((0..n.max(1)).map(make).collect())
    }

    /// The caller's value.
    pub fn get(&self) -> &T {
        &self.0[current().unwrap_or(0) % self.0.len()]
    }

    /// Every worker's value.
    pub fn all(&self) -> &[T] {
        &self.0
    }
}

/// Serves the connections accepted on `group` (one listener per worker, as from
/// [`reuseport_group`]) with `serve`, keeping the workers' live connection counts even.
///
/// `SO_REUSEPORT` spreads connections by a hash of their addresses, which is even only on
/// average: 30 connections land 18/12 or worse on two workers about a third of the time, and
/// a few long-lived ones (a gRPC client's) can all land on one worker while the other idles.
/// So a worker that accepts a connection while it serves more than `SLACK` (1) connections
/// beyond the least loaded worker hands it to that worker, much as Envoy's exact connection balance
/// does: the counts stay within `SLACK + 1` of each other. The slack spares short-lived
/// connections a handoff (an `epoll_ctl` on each side and a cross-thread wake-up) each time
/// the counts differ by one, which with them is most of the time.
pub fn serve_balanced<F, Fut>(workers: &Workers, group: Vec<std::net::TcpListener>, serve: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let live: Arc<[AtomicUsize]> = (0..workers.len()).map(|_| AtomicUsize::new(0)).collect();
    let mut inboxes = Vec::with_capacity(workers.len());
    for (i, handle) in workers.handles().iter().enumerate() {
        let (tx, mut rx) = mpsc::unbounded_channel::<(std::net::TcpStream, SocketAddr)>();
        inboxes.push(tx);
        let (serve, live) = (serve.clone(), live.clone());
        handle.spawn(async move {
            while let Some((std, peer)) = rx.recv().await {
                match tokio::net::TcpStream::from_std(std) {
                    Ok(tcp) => run(&live, i, serve(tcp, peer)),
                    Err(_) => {
                        live[i].fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    let inboxes: Arc<[_]> = inboxes.into();
    for (i, (handle, listener)) in workers.handles().iter().zip(group).enumerate() {
        let (serve, live, inboxes) = (serve.clone(), live.clone(), inboxes.clone());
        handle.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => return tracing::warn!(error = %e, worker = i, "listener"),
            };
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let to = least_loaded(&live, i);
                live[to].fetch_add(1, Ordering::Relaxed);
                if to == i {
                    run(&live, i, serve(tcp, peer));
                    continue;
                }
                // Registered with this worker's reactor: unregister to move it.
                let moved = tcp.into_std().map(|std| inboxes[to].send((std, peer)));
                if !matches!(moved, Ok(Ok(()))) {
                    live[to].fetch_sub(1, Ordering::Relaxed);
                }
            }
        });
    }
}

/// How many more live connections than the least loaded worker a worker keeps before it hands
/// new ones over.
const SLACK: usize = 1;

/// The worker a connection accepted by `me` should go to: `me` unless another serves more
/// than `SLACK` fewer.
fn least_loaded(live: &[AtomicUsize], me: usize) -> usize {
    let mine = live[me].load(Ordering::Relaxed);
    let mut best = (mine, me);
    for (j, n) in live.iter().enumerate() {
        let n = n.load(Ordering::Relaxed);
        if n < best.0 {
            best = (n, j);
        }
    }
    if mine > best.0 + SLACK { best.1 } else { me }
}

/// Spawns `conn` on the calling worker (`me`), counted live until it ends.
fn run(live: &Arc<[AtomicUsize]>, me: usize, conn: impl Future<Output = ()> + Send + 'static) {
    struct Live(Arc<[AtomicUsize]>, usize);
    impl Drop for Live {
        fn drop(&mut self) {
            self.0[self.1].fetch_sub(1, Ordering::Relaxed);
        }
    }
    let guard = Live(live.clone(), me);
    tokio::spawn(async move {
        let _guard = guard;
        conn.await;
    });
}

/// `n` listening sockets on `addr` in one `SO_REUSEPORT` group (one per worker), non-blocking,
/// ready for `tokio::net::TcpListener::from_std` on their workers. The address must be free:
/// another process's socket there, reuseport or not, is an error (`AddrInUse`) instead of a
/// group that shares connections with it.
pub fn reuseport_group(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    // A bind without SO_REUSEPORT fails on any socket listening there (SO_REUSEADDR only lets
    // it past connections of an earlier run in TIME_WAIT); it is closed before the group binds
    // (port 0 picks a free port for the whole group).
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    if addr.is_ipv6() {
        probe.set_only_v6(false)?;
    }
    probe.bind(&addr.into())?;
    let addr = match addr.port() {
        0 => probe.local_addr()?.as_socket().unwrap_or(addr),
        _ => addr,
    };
    drop(probe);
    (0..n.max(1)).map(|_| reuseport_listener(addr)).collect()
}

/// A listening socket that joins the `SO_REUSEPORT` group on `addr`; non-blocking, ready for
/// `tokio::net::TcpListener::from_std` on a worker.
pub fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // `[::]` serves both families, as tokio's bind does by default on Linux.
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_knows_its_index_and_picks_its_own_value() {
        let workers = Workers::start(3, "test", Pinning::Off).expect("workers");
        assert_eq!(workers.len(), 3);
        assert_eq!(current(), None);
        let values = std::sync::Arc::new(PerWorker::new(3, |i| i * 10));
        let (tx, rx) = std::sync::mpsc::channel();
        workers.spawn_each(|i| {
            let (tx, values) = (tx.clone(), values.clone());
            async move {
                tx.send((i, current(), *values.get())).expect("send");
            }
        });
        let mut seen: Vec<_> = (0..3).map(|_| rx.recv().expect("recv")).collect();
        seen.sort();
        assert_eq!(seen, vec![(0, Some(0), 0), (1, Some(1), 10), (2, Some(2), 20)]);
    }

    /// The CPUs the calling worker may run on, as each worker reports them.
    fn affinities(workers: &Workers) -> Vec<Vec<usize>> {
        let (tx, rx) = std::sync::mpsc::channel();
        workers.spawn_each(|i| {
            let tx = tx.clone();
            async move {
                tx.send((i, allowed_cpus().expect("affinity"))).expect("send");
            }
        });
        let mut seen: Vec<_> = (0..workers.len()).map(|_| rx.recv().expect("recv")).collect();
        seen.sort();
        seen.into_iter().map(|(_, cpus)| cpus).collect()
    }

    #[test]
    fn one_worker_per_cpu_pins_each_to_its_own_and_fewer_stay_free() {
        let all = allowed_cpus().expect("affinity");
        assert!(!all.is_empty());
        // As many workers as CPUs (at least two): each on its own CPU.
        let n = all.len().max(2);
        let workers = Workers::start(n, "pin", Pinning::Auto).expect("workers");
        if all.len() >= 2 {
            let want: Vec<Vec<usize>> = all.iter().map(|&c| vec![c]).collect();
            assert_eq!(affinities(&workers), want);
            assert_eq!(workers.cpus(), all.iter().map(|&c| Some(c)).collect::<Vec<_>>());
        } else {
            // One CPU: two workers are more than CPUs, so neither is pinned.
            assert_eq!(affinities(&workers), vec![all.clone(); n]);
        }
        drop(workers);
        // One worker, or pinning off: the workers keep the process's CPUs.
        let one = Workers::start(1, "pin", Pinning::Auto).expect("workers");
        assert_eq!(affinities(&one), vec![all.clone()]);
        assert_eq!(one.cpus(), &[None]);
        let off = Workers::start(n, "pin", Pinning::Off).expect("workers");
        assert_eq!(affinities(&off), vec![all.clone(); n]);
    }

    #[test]
    fn reuseport_listeners_share_an_address_and_all_accept() {
        let first = reuseport_listener("127.0.0.1:0".parse().expect("addr")).expect("first");
        let addr = first.local_addr().expect("addr");
        let second = reuseport_listener(addr).expect("a second socket joins the group");
        assert_eq!(second.local_addr().expect("addr"), addr);
        // A plain bind (no SO_REUSEPORT) is refused: the group is real.
        assert!(std::net::TcpListener::bind(addr).is_err());
    }

    #[test]
    fn a_group_is_refused_where_another_socket_listens() {
        let group = reuseport_group("127.0.0.1:0".parse().expect("addr"), 2).expect("group");
        assert_eq!(group.len(), 2);
        let addr = group[0].local_addr().expect("addr");
        assert_eq!(group[1].local_addr().expect("addr"), addr);
        // Someone else's reuseport socket (as a second instance would open) is found...
        let err = reuseport_group(addr, 2).expect_err("the address is taken");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // ...and so is a plain one.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").expect("plain");
        let err = reuseport_group(plain.local_addr().expect("addr"), 1).expect_err("taken");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn balanced_serving_keeps_live_connections_even() {
        use std::time::Duration;
        let workers = Workers::start(2, "balance", Pinning::Off).expect("workers");
        let group = reuseport_group("127.0.0.1:0".parse().expect("addr"), 2).expect("group");
        let addr = group[0].local_addr().expect("addr");
        // (worker, true) when a connection is served, (worker, false) when it has ended.
        let (tx, rx) = std::sync::mpsc::channel();
        serve_balanced(&workers, group, move |tcp, _peer| {
            let tx = tx.clone();
            async move {
                let w = current().expect("on a worker");
                let _ = tx.send((w, true));
                // Held until the client closes.
                let mut buf = [0u8; 16];
                while tcp.readable().await.is_ok() {
                    match tcp.try_read(&mut buf) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Ok(n) if n > 0 => {}
                        _ => break,
                    }
                }
                drop(tcp);
                let _ = tx.send((w, false));
            }
        });
        let served = || rx.recv_timeout(Duration::from_secs(5)).expect("served");
        let mut per = [0usize; 2];
        let mut open = Vec::new();
        // Each connection is served before the next opens: after every one the two workers
        // serve counts at most SLACK + 1 apart, whatever the SO_REUSEPORT hash picked.
        for _ in 0..24 {
            let c = std::net::TcpStream::connect(addr).expect("connect");
            let (w, started) = served();
            assert!(started);
            per[w] += 1;
            assert!(per[0].abs_diff(per[1]) <= SLACK + 1, "{per:?}");
            open.push((w, c));
        }
        // Worker 0's connections close: the next ones all go to worker 0 until it is within
        // SLACK of worker 1.
        let (zero, mut rest): (Vec<_>, Vec<_>) = open.into_iter().partition(|(w, _)| *w == 0);
        let closing = zero.len();
        drop(zero);
        for _ in 0..closing {
            assert_eq!(served(), (0, false));
        }
        assert!(rest.len() >= SLACK + 6, "{} on worker 1", rest.len());
        for _ in 0..rest.len() - SLACK {
            let c = std::net::TcpStream::connect(addr).expect("connect");
            assert_eq!(served(), (0, true));
            rest.push((0, c));
        }
    }
}
