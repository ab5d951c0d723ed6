//! `cargo xtask bench control`: 10,000 workloads, 1,000 clients through the real gRPC server
//! of a real `sinew-control` process, one policy change (load from `control/examples/load.rs`).

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

const WORKLOADS: usize = 10_000;
const NAMESPACES: usize = 100;
const CLIENTS: usize = 1_000;
/// Streams share connections, as many agents behind one proxy would.
const CONNECTIONS: usize = 10;

fn policy(sa: &str) -> String {
    format!(
        "apiVersion: security.sinew.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bench, namespace: ns-0}}\nspec:\n  action: DENY\n  rules: [{{from: [{{source: {{serviceAccounts: [ns-0/{sa}]}}}}]}}]\n"
    )
}

fn write_config(dir: &Path) -> Result<()> {
    let mut text = String::new();
    for n in 0..NAMESPACES {
        write!(
            text,
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns-{n}\n  labels: {{sinew.io/dataplane-mode: ambient}}\n"
        )?;
    }
    for i in 0..WORKLOADS {
        write!(
            text,
            "---\napiVersion: sinew.io/v1alpha1\nkind: Workload\nmetadata: {{name: w-{i}, namespace: ns-{}, labels: {{app: app-{}}}}}\nspec: {{serviceAccount: sa-{}, node: node-{}, ips: [198.18.{}.{}]}}\n",
            i % NAMESPACES,
            i % 50,
            i % 50,
            i % CLIENTS,
            i / 250,
            i % 250 + 1
        )?;
    }
    std::fs::write(dir.join("workloads.yaml"), text)?;
    std::fs::write(dir.join("policy.yaml"), policy("a"))?;
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmHWM")?
        .parse()?;
    Ok(kb / 1024.0)
}

pub fn run(bin_dir: &Path, out_file: &Path) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("sinew-bench-control-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = dir.join("config");
    std::fs::create_dir_all(&config)?;
    write_config(&config)?;
    std::fs::write(dir.join("policy-b.yaml.txt"), policy("b"))?;
    let tokens: String =
        (0..CLIENTS).map(|i| format!("node-{i} node-{i}-token-0123456789\n")).collect();
    std::fs::write(dir.join("tokens"), tokens)?;
    let (grpc, admin) = (free_port()?, free_port()?);
    let mut control = Command::new(bin_dir.join("sinew-control"))
        .arg("--config-dir")
        .arg(&config)
        .arg("--ca-dir")
        .arg(dir.join("ca"))
        .arg("--tokens")
        .arg(dir.join("tokens"))
        .args(["--listen", &format!("127.0.0.1:{grpc}"), "--admin", &format!("127.0.0.1:{admin}")])
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting sinew-control")?;
    // The control service writes its generated root before it listens.
    let roots = dir.join("ca/ca-cert.pem");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !roots.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let load = Command::new(bin_dir.join("examples").join("load"))
        .arg(format!("https://127.0.0.1:{grpc}"))
        .arg(&roots)
        .args([
            CLIENTS.to_string(),
            CONNECTIONS.to_string(),
            (NAMESPACES + WORKLOADS + 1).to_string(),
        ])
        .arg(config.join("policy.yaml"))
        .arg(dir.join("policy-b.yaml.txt"))
        .stderr(Stdio::inherit())
        .output();
    let rss = peak_rss_mib(control.id());
    let _ = control.kill();
    let _ = control.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let load = load.context("running the load generator")?;
    if !load.status.success() {
        bail!("the load generator failed: {}", String::from_utf8_lossy(&load.stdout));
    }
    let figures: Value = serde_json::from_slice(&load.stdout).context("load generator output")?;
    let rss = rss?;
    let f = |k: &str| figures[k].as_f64().unwrap_or(f64::NAN);
    println!("control: {WORKLOADS} workloads, {CLIENTS} clients over {CONNECTIONS} connections");
    println!("  initial sync of all clients: {:8.1} ms", f("initial_sync_ms"));
    println!(
        "  policy change until received and ACKed: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (goal: all within 1000 ms)",
        f("push_ms_p50"),
        f("push_ms_p99"),
        f("push_ms_max")
    );
    println!("  control peak RSS: {rss:.1} MiB (goal < 300 MiB)");
    let report = json!({
        "suite": "control",
        "workloads": WORKLOADS,
        "clients": CLIENTS,
        "connections": CONNECTIONS,
        "push_all_acked_ms_p99": f("push_ms_p99"),
        "push_all_acked_ms_max": f("push_ms_max"),
        "push_all_acked_ms_p50": f("push_ms_p50"),
        "initial_sync_ms": f("initial_sync_ms"),
        "control_rss_mib": rss,
        "goals": { "push_all_acked_ms_max": "<= 1000", "control_rss_mib": "< 300" },
        "method": "release sinew-control with a directory of 10,000 Workloads in 100 namespaces; 1,000 discovery streams (TLS, token-authenticated) from one process over 10 connections; the policy file is rewritten and each client's time from the write to receiving the update (it ACKs at once) is recorded; the directory is polled every 250 ms",
    });
    std::fs::create_dir_all(out_file.parent().context("bench dir")?)?;
    std::fs::write(out_file, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", out_file.display());
    Ok(())
}
