//! Telemetry shared by every Sinew binary: log setup, the JSON-lines access log the agent
//! (one line per connection) and the waypoint (one line per request) write, and the workload
//! labels of Istio's standard metrics ([`labels`]).
#![forbid(unsafe_code)]

pub mod labels;

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

/// Lines queued for the writer thread; past this many (a stalled stdout pipe, a slow disk)
/// new lines are dropped and counted, and traffic goes on.
const QUEUE: usize = 16384;
/// The writer wakes at most this often: lines are batched (Envoy flushes its access logs
/// every second) instead of costing a thread wake-up each, which on a busy 2-core machine
/// took a tenth of the waypoint's requests per second.
const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Where access-log lines go: a file, stdout, or nowhere. One JSON object per line, written
/// by a thread of its own: the data path only queues them, so a log that cannot keep up
/// never holds a connection (Envoy's workers likewise hand lines to a flush thread).
#[derive(Clone)]
pub struct AccessLog(Option<Arc<Queue>>);

struct Queue {
    lines: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
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
        let (lines, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let counted = dropped.clone();
        std::thread::Builder::new()
            .name("sinew-access-log".into())
            .spawn(move || write_lines(rx, out, &counted))?;
        Ok(Self(Some(Arc::new(Queue { lines, dropped }))))
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
        match q.lines.try_send(Msg::Line(line)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                q.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.0.as_ref().map_or(0, |q| q.dropped.load(Ordering::Relaxed))
    }

    /// Waits (up to `wait`) until every line queued so far is written: at shutdown, so the
    /// last connections' lines are not lost with the process.
    pub fn flush(&self, wait: std::time::Duration) {
        let Some(q) = &self.0 else { return };
        let (done, written) = std::sync::mpsc::sync_channel(1);
        if q.lines.try_send(Msg::Flush(done)).is_ok() {
            let _ = written.recv_timeout(wait);
        }
    }
}

/// The writer thread: writes what is queued, flushing whenever the queue runs dry, until
/// every sender is gone; says so (every 10 s at most) when lines were dropped.
fn write_lines(rx: Receiver<Msg>, out: Box<dyn Write + Send>, dropped: &AtomicU64) {
    let mut out = std::io::BufWriter::with_capacity(64 << 10, out);
    let (mut reported, mut last_report) = (0, std::time::Instant::now());
    let handle = |msg: Msg, out: &mut std::io::BufWriter<Box<dyn Write + Send>>| match msg {
        Msg::Line(line) => {
            let _ = out.write_all(&line);
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
        let now = dropped.load(Ordering::Relaxed);
        if now > reported && last_report.elapsed() >= std::time::Duration::from_secs(10) {
            tracing::warn!(
                dropped = now - reported,
                "access log lines dropped: the log cannot keep up"
            );
            (reported, last_report) = (now, std::time::Instant::now());
        }
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
        let (lines, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let counted = dropped.clone();
        std::thread::spawn(move || write_lines(rx, Box::new(Stalled(stalled)), &counted));
        let log = AccessLog(Some(Arc::new(Queue { lines, dropped })));
        let start = std::time::Instant::now();
        for i in 0..(QUEUE * 2 + 10_000) {
            log.write(&serde_json::json!({ "n": i }));
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(2), "writes blocked");
        // The queue and the writer's buffer full, the rest are dropped and counted.
        assert!(log.dropped() > 0, "dropped {}", log.dropped());
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
