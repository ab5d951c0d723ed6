//! Telemetry shared by every Sinew binary: log setup, the JSON-lines access log the agent
//! (one line per connection) and the waypoint (one line per request) write, and the workload
//! labels of Istio's standard metrics ([`labels`]).
#![forbid(unsafe_code)]

pub mod labels;

use std::{
    io::Write,
    sync::{Arc, Mutex},
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

/// Where access-log lines go: a file, stdout, or nowhere. One JSON object per line.
#[derive(Clone)]
pub struct AccessLog(Option<Arc<Mutex<Box<dyn Write + Send>>>>);

impl AccessLog {
    /// `-` for stdout, `off` for none, else a file appended to.
    pub fn open(target: &str) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            "off" => return Ok(Self(None)),
            "-" => Box::new(std::io::stdout()),
            path => Box::new(std::io::LineWriter::new(
                std::fs::OpenOptions::new().create(true).append(true).open(path)?,
            )),
        };
        Ok(Self(Some(Arc::new(Mutex::new(out)))))
    }

    /// Whether lines go anywhere (callers skip building entries otherwise).
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Writes one line (errors writing the log never affect traffic).
    pub fn write(&self, entry: &impl serde::Serialize) {
        let Some(out) = &self.0 else { return };
        let Ok(mut line) = serde_json::to_vec(entry) else { return };
        line.push(b'\n');
        if let Ok(mut out) = out.lock() {
            let _ = out.write_all(&line);
        }
    }
}
