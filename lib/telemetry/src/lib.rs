//! Telemetry shared by every Sinew binary. Today: log setup (the metrics registry and label
//! structs of the data plane land here with the `istio_*` metrics).
#![forbid(unsafe_code)]

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
