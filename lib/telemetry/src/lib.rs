//! Telemetry shared by every Sinew binary: log setup, the JSON-lines access log the agent
//! (one line per connection) and the waypoint (one line per request) write, and the workload
//! labels of Istio's standard metrics ([`labels`]).
#![forbid(unsafe_code)]

pub mod labels;
pub mod tcp;

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError},
    },
};

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), coloured only on a terminal so log
/// files stay plain text.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Now, in seconds since the Unix epoch (the access logs' `ts`); 0 on a clock set before it.
pub fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Lines queued for the writer thread; past this many, or [`QUEUE_BYTES`] (a stalled
/// stdout pipe, a slow disk), new lines are dropped and counted, and traffic goes on.
const QUEUE: usize = 16384;
/// Bytes queued at most: a waypoint line carries a path of up to 60 KiB, so a count alone
/// would let a stalled log hold a gigabyte.
const QUEUE_BYTES: usize = 16 << 20;
/// The writer wakes at most this often: lines are batched (Envoy flushes its access logs
/// every second) instead of costing a thread wake-up each, which on a busy 2-core machine
/// took a tenth of the waypoint's requests per second.
const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);
/// Dropped lines are reported this often at most.
const DROP_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Where access-log lines go: a file, stdout, or nowhere. One JSON object per line, written
/// by a thread of its own: the data path only queues them, so a log that cannot keep up
/// never holds a connection (Envoy's workers likewise hand lines to a flush thread).
#[derive(Clone)]
pub struct AccessLog(Option<Arc<Queue>>);

struct Queue {
    lines: SyncSender<Msg>,
    /// Bytes queued and not yet written.
    bytes: Arc<std::sync::atomic::AtomicUsize>,
    dropped: AtomicU64,
    /// When drops were last reported, in milliseconds since `born`.
    reported_ms: AtomicU64,
    born: std::time::Instant,
}

enum Msg {
    Line(Vec<u8>),
    /// Write out everything queued before, then answer.
    Flush(SyncSender<()>),
}

impl AccessLog {
    /// `-` for stdout, `off` for none, else a file appended to.
    pub fn open(target: &str) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            "off" => return Ok(Self(None)),
            "-" => Box::new(std::io::stdout()),
            path => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        };
        Ok(Self(Some(Arc::new(Queue::start(out)?))))
    }

    /// Whether lines go anywhere (callers skip building entries otherwise).
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Queues one line (errors writing the log never affect traffic).
    pub fn write(&self, entry: &impl serde::Serialize) {
        let Some(q) = &self.0 else { return };
        let Ok(mut line) = serde_json::to_vec(entry) else { return };
        line.push(b'\n');
        q.queue(line);
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.0.as_ref().map_or(0, |q| q.dropped.load(Ordering::Relaxed))
    }

    /// Waits (up to `wait`) until every line queued so far is written: at shutdown, so the
    /// last connections' lines are not lost with the process.
    pub fn flush(&self, wait: std::time::Duration) {
        let Some(q) = &self.0 else { return };
        let deadline = std::time::Instant::now() + wait;
        let (done, written) = std::sync::mpsc::sync_channel(1);
        let mut flush = Msg::Flush(done);
        // The queue may be full right now: try until there is room or time is up.
        loop {
            match q.lines.try_send(flush) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                    flush = back;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = written.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
    }
}

impl Queue {
    fn start(out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let (lines, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let written = bytes.clone();
        std::thread::Builder::new()
            .name("sinew-access-log".into())
            .spawn(move || write_lines(rx, out, &written))?;
        Ok(Self {
            lines,
            bytes,
            dropped: AtomicU64::new(0),
            reported_ms: AtomicU64::new(0),
            born: std::time::Instant::now(),
        })
    }

    fn queue(&self, line: Vec<u8>) {
        let len = line.len();
        let room = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                b.checked_add(len).filter(|total| *total <= QUEUE_BYTES)
            })
            .is_ok();
        if !room {
            return self.drop_line();
        }
        match self.lines.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.bytes.fetch_sub(len, Ordering::Relaxed);
                self.drop_line();
            }
            Err(TrySendError::Disconnected(_)) => {
                self.bytes.fetch_sub(len, Ordering::Relaxed);
            }
        }
    }

    /// Counts a dropped line, and says so every [`DROP_REPORT_EVERY`] at most (from the
    /// sender's side: the writer may be the one stuck).
    fn drop_line(&self) {
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.born.elapsed().as_millis() as u64;
        let last = self.reported_ms.load(Ordering::Relaxed);
        let due = dropped == 1 || now.saturating_sub(last) >= DROP_REPORT_EVERY.as_millis() as u64;
        if due
            && self
                .reported_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(dropped, "access log lines dropped: the log cannot keep up");
        }
    }
}

/// `sinew_access_log_lines_dropped_total` of an [`AccessLog`], read at each scrape.
#[derive(Clone)]
pub struct DroppedLines(AccessLog);

impl std::fmt::Debug for DroppedLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DroppedLines").field(&self.0.dropped()).finish()
    }
}

impl prometheus_client::collector::Collector for DroppedLines {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        let m = prometheus_client::metrics::counter::ConstCounter::new(self.0.dropped());
        m.encode(enc.encode_descriptor(
            "sinew_access_log_lines_dropped",
            "Access-log lines dropped because the log could not keep up",
            None,
            m.metric_type(),
        )?)
    }
}

impl AccessLog {
    /// Its dropped-lines counter, to register with a metrics registry.
    pub fn dropped_lines(&self) -> DroppedLines {
        DroppedLines(self.clone())
    }
}

/// The writer thread: writes what is queued, flushing whenever the queue runs dry, until
/// every sender is gone.
fn write_lines(
    rx: Receiver<Msg>,
    out: Box<dyn Write + Send>,
    queued: &std::sync::atomic::AtomicUsize,
) {
    let mut out = std::io::BufWriter::with_capacity(64 << 10, out);
    let handle = |msg: Msg, out: &mut std::io::BufWriter<Box<dyn Write + Send>>| match msg {
        Msg::Line(line) => {
            let _ = out.write_all(&line);
            queued.fetch_sub(line.len(), Ordering::Relaxed);
        }
        Msg::Flush(done) => {
            let _ = out.flush();
            let _ = done.try_send(());
        }
    };
    while let Ok(msg) = rx.recv() {
        handle(msg, &mut out);
        while let Ok(more) = rx.try_recv() {
            handle(more, &mut out);
        }
        let _ = out.flush();
        // Not waiting in `recv` meanwhile: senders queue without waking this thread.
        std::thread::sleep(FLUSH_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that blocks until released, as a stalled pipe does.
    struct Stalled(std::sync::mpsc::Receiver<()>);

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_log_drops_lines_and_never_blocks_the_writer_of_a_line() {
        let (_release, stalled) = std::sync::mpsc::channel();
        let log = AccessLog(Some(Arc::new(Queue::start(Box::new(Stalled(stalled))).unwrap())));
        let start = std::time::Instant::now();
        for i in 0..(QUEUE * 2 + 10_000) {
            log.write(&serde_json::json!({ "n": i }));
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(2), "writes blocked");
        // The queue and the writer's buffer full, the rest are dropped and counted.
        assert!(log.dropped() > 0, "dropped {}", log.dropped());
    }

    #[test]
    fn a_stalled_log_holds_a_bounded_number_of_bytes() {
        let (_release, stalled) = std::sync::mpsc::channel();
        let log = AccessLog(Some(Arc::new(Queue::start(Box::new(Stalled(stalled))).unwrap())));
        let path = "x".repeat(100 << 10);
        for _ in 0..400 {
            log.write(&serde_json::json!({ "path": path }));
        }
        // 400 lines of 100 KiB would be 40 MiB: past 16 MiB queued they are dropped.
        assert!(log.dropped() >= 200, "dropped {}", log.dropped());
    }

    #[test]
    fn dropped_lines_are_a_prometheus_counter() {
        let (_release, stalled) = std::sync::mpsc::channel();
        let log = AccessLog(Some(Arc::new(Queue::start(Box::new(Stalled(stalled))).unwrap())));
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(log.dropped_lines()));
        let path = "x".repeat(1 << 20);
        for _ in 0..40 {
            log.write(&serde_json::json!({ "path": path }));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        let line = format!("sinew_access_log_lines_dropped_total {}", log.dropped());
        assert!(log.dropped() > 0 && out.contains(&line), "{out}");
    }

    #[test]
    fn lines_reach_the_file_in_order() {
        let dir = std::env::temp_dir().join(format!("sinew-log-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let log = AccessLog::open(dir.to_str().unwrap()).unwrap();
        for i in 0..100 {
            log.write(&serde_json::json!({ "n": i }));
        }
        // At shutdown: everything queued is written before this returns.
        log.flush(std::time::Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(&dir).unwrap().lines().count(), 100);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&dir).unwrap_or_default();
            if text.lines().count() == 100 {
                let n: Vec<u64> = text
                    .lines()
                    .map(|l| {
                        serde_json::from_str::<serde_json::Value>(l).unwrap()["n"].as_u64().unwrap()
                    })
                    .collect();
                assert_eq!(n, (0..100).collect::<Vec<u64>>());
                break;
            }
            assert!(std::time::Instant::now() < deadline, "lines missing: {text}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&dir);
    }
}
