//! `cargo xtask bench capture`: direct vs captured plain TCP, measured in one run.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use sinew_test_util::Cluster;

fn field(out: &str, key: &str) -> Result<f64> {
    let v: Value =
        serde_json::from_str(out.trim()).with_context(|| format!("bad output {out:?}"))?;
    v[key].as_f64().with_context(|| format!("no {key} in {out}"))
}

pub fn capture(bin_dir: &Path, out_file: &Path) -> Result<()> {
    let mut c = Cluster::new(&["mesh"])?;
    c.set_bin_dir(bin_dir);
    c.add_node()?;
    c.add_node()?;
    // The same two nodes carry both paths: a captured pair and a direct pair.
    let mc = c.add_pod(1, "mesh-client", "mesh")?;
    let ms = c.add_pod(2, "mesh-server", "mesh")?;
    let dc = c.add_pod(1, "direct-client", "plain")?;
    let ds = c.add_pod(2, "direct-server", "plain")?;
    c.start_agent(1)?;
    c.start_agent(2)?;
    for p in [&mc, &ms, &dc, &ds] {
        c.agent(p.node).enroll(p)?;
    }
    c.serve(&ms, &[8080])?;
    c.serve(&ds, &[8080])?;
    // The floor: the simplest relay (testapp's, tokio) at the places the agents sit, a
    // loopback listener in the client pod and a listener in the server pod that connects to
    // the app over loopback, on the plain pair. No capture, no policy, no telemetry.
    let local = |port: u16| Cluster::target(std::net::Ipv4Addr::LOCALHOST.into(), port);
    c.start_app(&ds, &["relay", &Cluster::target(ds.v4(), 9090), &local(8080)])?;
    c.start_app(&dc, &["relay", &local(9001), &Cluster::target(ds.v4(), 9090)])?;
    let paths = [
        ("direct", &dc, Cluster::target(ds.v4(), 8080)),
        ("captured", &mc, Cluster::target(ms.v4(), 8080)),
        ("one hop", &mc, Cluster::target(ds.v4(), 8080)),
        ("bare relays", &dc, local(9001)),
    ];
    for (_, client, target) in &paths {
        // Warm up (ARP, caches) before measuring.
        c.run_in(client, &["ping", target, "50"])?;
    }
    // Rounds interleave the paths so drift on a shared 2-core machine hits all of them alike;
    // each figure is the median of its rounds.
    const ROUNDS: usize = 3;
    let mut samples = vec![(Vec::new(), Vec::new(), Vec::new()); paths.len()];
    for _ in 0..ROUNDS {
        for (i, (_, client, target)) in paths.iter().enumerate() {
            samples[i].0.push(field(&c.run_in(client, &["sink", target, "3"])?, "bytes_per_sec")?);
            let ping = c.run_in(client, &["ping", target, "500"])?;
            samples[i].1.push(field(&ping, "mean_us")?);
            samples[i].2.push(field(&ping, "p50_us")?);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut results = Vec::new();
    for ((name, _, _), (t, m, p)) in paths.iter().zip(&mut samples) {
        let (tput, mean, p50) = (median(t), median(m), median(p));
        println!(
            "{name:>9}: single stream {:8.1} MiB/s   new connection + first byte: mean {mean:7.1} us, p50 {p50:7.1} us",
            tput / 1048576.0
        );
        results.push((tput, mean, p50));
    }
    let (d, m) = (results[0], results[1]);
    let report = json!({
        "suite": "capture",
        "direct": { "throughput_bytes_per_sec": d.0, "connect_mean_us": d.1, "connect_p50_us": d.2 },
        "captured": { "throughput_bytes_per_sec": m.0, "connect_mean_us": m.1, "connect_p50_us": m.2 },
        "client_side_only": { "throughput_bytes_per_sec": results[2].0, "connect_mean_us": results[2].1, "connect_p50_us": results[2].2 },
        "bare_relays": { "throughput_bytes_per_sec": results[3].0, "connect_mean_us": results[3].1, "connect_p50_us": results[3].2 },
        "bare_relays_connect_latency_ratio": results[3].1 / d.1,
        "throughput_ratio": m.0 / d.0,
        "connect_latency_ratio": m.1 / d.1,
        "goals": { "throughput_ratio": ">= 0.6", "connect_latency_ratio": "<= 1.5" },
        "method": "two nodes, both pods enrolled (client and server agents) vs a plain pair on the same nodes; \
                   throughput = one TCP stream for 3 s; connect latency = connect() until the first byte \
                   of the server's answer, mean of 500 sequential connections; median of 3 interleaved rounds; \
                   bare_relays = the plain pair through two minimal tokio relays placed where the agents sit \
                   (loopback listener in the client pod, listener in the server pod relaying to the app over \
                   loopback): the floor of any design with a user-space hop at each end",
    });
    println!(
        "throughput_ratio {:.3} (goal >= 0.6)   connect_latency_ratio {:.3} (goal <= 1.5)   \
         bare relays: connect_latency_ratio {:.3}",
        m.0 / d.0,
        m.1 / d.1,
        results[3].1 / d.1
    );
    std::fs::create_dir_all(out_file.parent().context("bench dir")?)?;
    std::fs::write(out_file, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", out_file.display());
    Ok(())
}
