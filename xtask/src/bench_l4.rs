//! `cargo xtask bench l4`: the mesh's L4 path (capture, HBONE with mutual TLS, policy) beside
//! the direct path, on the same two nodes in one run: single- and 8-stream throughput, HTTP
//! requests/s and latency with wrk against nginx, new-connection latency, and the agent's
//! idle memory.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use sinew_test_util::{Cluster, Pod};

fn field(out: &str, key: &str) -> Result<f64> {
    let v: Value =
        serde_json::from_str(out.trim()).with_context(|| format!("bad output {out:?}"))?;
    v[key].as_f64().with_context(|| format!("no {key} in {out}"))
}

/// nginx with one worker answering a short body on port 80.
pub(crate) fn nginx(c: &mut Cluster, pod: &Pod) -> Result<()> {
    nginx_with(
        c,
        pod,
        1,
        "server {\n    listen 80;\n    location / { return 200 \"hello from sinew bench\\n\"; }\n  }",
    )
}

/// Starts nginx in `pod` with `workers` worker processes and `body` inside its `http` block.
pub(crate) fn nginx_with(c: &mut Cluster, pod: &Pod, workers: u32, body: &str) -> Result<()> {
    let dir = c.dir().join(format!("nginx-{}", pod.name));
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let conf = format!(
        "worker_processes {workers};\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  \
         client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         {body}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    c.spawn_in(pod, Path::new("/usr/sbin/nginx"), &["-c", &path.to_string_lossy()]).map(drop)
}

fn agent_pid(c: &mut Cluster, node: u8) -> Result<u32> {
    c.agent(node).pid().with_context(|| format!("agent {node} is not running"))
}

/// User plus system CPU time of a process so far, in ms (from /proc).
pub(crate) fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start at state, field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("odd /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f
        .get(11)
        .zip(f.get(12))
        .map_or(Ok(0.0), |(u, s)| Ok::<_, anyhow::Error>(u.parse::<f64>()? + s.parse::<f64>()?))?;
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    Ok(ticks * 10.0)
}

/// CPU time of all of a process's threads so far, in us, at nanosecond resolution (the
/// scheduler's own count, /proc/PID/task/*/schedstat), for figures over short runs.
fn cpu_us_fine(pid: u32) -> Result<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("schedstat"))?;
        ns += stat.split_whitespace().next().context("empty schedstat")?.parse::<u64>()?;
    }
    Ok(ns as f64 / 1000.0)
}

/// `sinew-testapp ping` from `client` to `target`, 500 connections: (mean us, CPU us per
/// connection of the processes `pids`).
fn ping_with_cpu(c: &Cluster, client: &Pod, target: &str, pids: &[u32]) -> Result<(f64, f64)> {
    let cpu = || pids.iter().map(|p| cpu_us_fine(*p)).sum::<Result<f64>>();
    let before = cpu()?;
    let ping = c.run_in(client, &["ping", target, "500"])?;
    Ok((field(&ping, "mean_us")?, (cpu()? - before) / 500.0))
}

/// wrk's requests/s and p50/p99 latency (ms).
fn wrk(c: &Cluster, client: &Pod, server: &Pod, secs: u32) -> Result<(f64, f64, f64)> {
    wrk_url(c, client, &format!("http://{}/", Cluster::target(server.v4(), 80)), secs)
}

/// wrk (2 threads, 30 connections) against `url` from `client`: requests/s, p50 and p99 (ms).
pub(crate) fn wrk_url(c: &Cluster, client: &Pod, url: &str, secs: u32) -> Result<(f64, f64, f64)> {
    let out = c.exec_in(
        client,
        Path::new("/usr/bin/wrk"),
        &["-t2", "-c30", &format!("-d{secs}s"), "--latency", url],
    )?;
    let ms = |v: &str| -> Option<f64> {
        let (num, unit) = v.split_at(v.find(|ch: char| ch.is_ascii_alphabetic())?);
        let n: f64 = num.parse().ok()?;
        Some(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => return None,
        })
    };
    let mut rps = None;
    let (mut p50, mut p99) = (None, None);
    for line in out.lines().map(str::trim) {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => rps = v.parse().ok(),
            ["50%", v] => p50 = ms(v),
            ["99%", v] => p99 = ms(v),
            _ => {}
        }
    }
    if out.contains("Non-2xx") || out.contains("Socket errors") {
        bail!("wrk saw errors:\n{out}");
    }
    match (rps, p50, p99) {
        (Some(r), Some(a), Some(b)) => Ok((r, a, b)),
        _ => bail!("cannot read wrk's output:\n{out}"),
    }
}

/// Runs the benchmark with the binaries in `bin_dir`; writes `out_file`.
pub fn run(bin_dir: &Path, out_file: &Path) -> Result<()> {
    let mut c = Cluster::new(&["mesh"])?;
    c.set_bin_dir(bin_dir);
    c.add_node()?;
    c.add_node()?;
    let mc = c.add_pod_as(1, "mesh-client", "mesh", "client")?;
    let ms = c.add_pod_as(2, "mesh-server", "mesh", "server")?;
    let dc = c.add_pod(1, "direct-client", "plain")?;
    let ds = c.add_pod(2, "direct-server", "plain")?;
    c.start_control()?;
    c.start_agent(1)?;
    c.start_agent(2)?;
    for p in [&mc, &ms, &dc, &ds] {
        c.agent(p.node).enroll(p)?;
    }
    c.serve(&ms, &[8080])?;
    c.serve(&ds, &[8080])?;
    nginx(&mut c, &ms)?;
    nginx(&mut c, &ds)?;
    // The floor of new-connection latency for any design with an agent relaying on each node:
    // the simplest relay (testapp's, tokio) where the agents sit, on the plain pair, as in
    // `bench capture`. No capture, TLS, HTTP/2, policy or telemetry.
    let local = |port: u16| Cluster::target(std::net::Ipv4Addr::LOCALHOST.into(), port);
    c.start_app(&ds, &["relay", &Cluster::target(ds.v4(), 9090), &local(8080)])?;
    c.start_app(&dc, &["relay", &local(9001), &Cluster::target(ds.v4(), 9090)])?;
    // The same with the tunnel's shape: the cross-node connection opened ahead (as a pooled
    // HBONE connection is), the far relay connecting to the app on the first bytes (as the
    // destination agent does on a CONNECT).
    c.start_app(&ds, &["relay", &Cluster::target(ds.v4(), 9091), &local(8080), "lazy"])?;
    c.start_app(&dc, &["relay", &local(9002), &Cluster::target(ds.v4(), 9091), "warm"])?;
    // And the same shape speaking HBONE with this project's library (TLS 1.3, HTTP/2 CONNECT
    // over a pooled connection, the 200 sent with the app's first answer): what the tunnel's
    // protocol adds to the floor, without capture, policy, telemetry or pod namespaces.
    let certs = c.dir().join("hbone-relays");
    let certs = certs.to_str().context("cluster dir is not UTF-8")?;
    let testapp = c.binary("sinew-testapp");
    sinew_test_util::sh(testapp.to_str().context("odd path")?, &["hbone-certs", certs])?;
    c.start_app(&ds, &["relay", &Cluster::target(ds.v4(), 9093), &local(8080), "hbone-in", certs])?;
    c.start_app(
        &dc,
        &["relay", &local(9003), &Cluster::target(ds.v4(), 9093), "hbone-out", certs],
    )?;
    let paths = [("direct", &dc, &ds), ("mesh", &mc, &ms)];
    for (name, client, server) in paths {
        // Warm up (ARP, certificates, pooled connection) and wait for nginx.
        let target = Cluster::target(server.v4(), 8080);
        let mut ready = false;
        for _ in 0..100 {
            let ping = c.run_in(client, &["ping", &target, "20"]).is_ok();
            let http = c
                .exec_in(
                    client,
                    Path::new("/usr/bin/curl"),
                    &[
                        "-sf",
                        "--max-time",
                        "2",
                        &format!("http://{}/", Cluster::target(server.v4(), 80)),
                    ],
                )
                .is_ok();
            if ping && http {
                ready = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        ensure!(ready, "{name} path not ready");
    }
    let n1 = c.agent(1).status()?.counters;
    ensure!(n1.hbone_outbound > 0, "the mesh path must go over HBONE: {n1:?}");
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle_kib = c.agent(1).rss_kib()?.max(c.agent(2).rss_kib()?);

    // Rounds interleave the paths so drift on a shared 2-core machine hits both alike; each
    // figure is the median of its rounds.
    const ROUNDS: usize = 3;
    let mut s: Vec<[Vec<f64>; 6]> = vec![Default::default(), Default::default()];
    // CPU both agents spend per GiB of one stream: a figure of the mesh alone, steadier than
    // ratios against a direct path that moves by tens of percent between runs.
    let pids = [agent_pid(&mut c, 1)?, agent_pid(&mut c, 2)?];
    let mut cpu_per_gib = Vec::new();
    let (mut relays_us, mut warm_us, mut hbone_us) = (Vec::new(), Vec::new(), Vec::new());
    // CPU per new connection of both agents, and of the warm and HBONE relays: where the
    // mesh's extra latency is not extra work, it is on the critical path.
    let (mut agents_cpu, mut warm_cpu, mut hbone_cpu) = (Vec::new(), Vec::new(), Vec::new());
    c.run_in(&dc, &["ping", &local(9002), "20"])?;
    c.run_in(&dc, &["ping", &local(9003), "20"])?;
    let relay_pids = |ports: [&str; 2], modes: &str| {
        ports
            .iter()
            .map(|port| {
                // Anchored on the listen address: a relay's target may have the same port.
                let pattern = format!("relay [^ ]*:{port} .*({modes})");
                let out = sinew_test_util::sh("pgrep", &["-f", &pattern])?;
                let pid = out.lines().next().with_context(|| format!("no relay on {port}"))?;
                Ok(pid.trim().parse()?)
            })
            .collect::<Result<Vec<u32>>>()
    };
    let warm_pids = relay_pids(["9002", "9091"], "warm|lazy")?;
    let hbone_pids = relay_pids(["9003", "9093"], "hbone-out|hbone-in")?;
    for _ in 0..ROUNDS {
        relays_us.push(field(&c.run_in(&dc, &["ping", &local(9001), "500"])?, "mean_us")?);
        let (us, cpu) = ping_with_cpu(&c, &dc, &local(9002), &warm_pids)?;
        warm_us.push(us);
        warm_cpu.push(cpu);
        let (us, cpu) = ping_with_cpu(&c, &dc, &local(9003), &hbone_pids)?;
        hbone_us.push(us);
        hbone_cpu.push(cpu);
        for (i, (_, client, server)) in paths.iter().enumerate() {
            let target = Cluster::target(server.v4(), 8080);
            let before = cpu_ms(pids[0])? + cpu_ms(pids[1])?;
            let sink = c.run_in(client, &["sink", &target, "3"])?;
            let spent = cpu_ms(pids[0])? + cpu_ms(pids[1])? - before;
            if i == 1 {
                cpu_per_gib.push(spent / (field(&sink, "bytes")? / (1u64 << 30) as f64));
            }
            s[i][0].push(field(&sink, "bytes_per_sec")?);
            s[i][1].push(field(&c.run_in(client, &["sink", &target, "3", "8"])?, "bytes_per_sec")?);
            let (us, cpu) = ping_with_cpu(&c, client, &target, &pids)?;
            s[i][2].push(us);
            if i == 1 {
                agents_cpu.push(cpu);
            }
            let (rps, p50, p99) = wrk(&c, client, server, 5)?;
            s[i][3].push(rps);
            s[i][4].push(p50);
            s[i][5].push(p99);
        }
    }
    let rss_loaded_kib = c.agent(1).rss_kib()?.max(c.agent(2).rss_kib()?);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let cpu_per_gib = median(&mut cpu_per_gib);
    let relays_us = median(&mut relays_us);
    let warm_us = median(&mut warm_us);
    let hbone_us = median(&mut hbone_us);
    let (agents_cpu, warm_cpu) = (median(&mut agents_cpu), median(&mut warm_cpu));
    let hbone_cpu = median(&mut hbone_cpu);
    let m: Vec<[f64; 6]> = s
        .iter_mut()
        .map(|r| {
            let mut out = [0.0; 6];
            for (o, v) in out.iter_mut().zip(r.iter_mut()) {
                *o = median(v);
            }
            out
        })
        .collect();
    for ((name, _, _), r) in paths.iter().zip(&m) {
        println!(
            "{name:>7}: 1 stream {:7.1} MiB/s   8 streams {:7.1} MiB/s   connect+first byte {:6.1} us   HTTP {:8.0} req/s p50 {:.3} ms p99 {:.3} ms",
            r[0] / 1048576.0,
            r[1] / 1048576.0,
            r[2],
            r[3],
            r[4],
            r[5]
        );
    }
    println!(
        "  bare relays: connect+first byte {relays_us:6.1} us   warm bare relays: {warm_us:6.1} us   \
         HBONE relays: {hbone_us:6.1} us   CPU per new connection: agents {agents_cpu:.0} us, \
         warm relays {warm_cpu:.0} us, HBONE relays {hbone_cpu:.0} us"
    );
    let (d, x) = (m[0], m[1]);
    let report = json!({
        "suite": "l4",
        "direct": { "throughput_1_bytes_per_sec": d[0], "throughput_8_bytes_per_sec": d[1], "connect_mean_us": d[2], "http_rps": d[3], "http_p50_ms": d[4], "http_p99_ms": d[5] },
        "mesh": { "throughput_1_bytes_per_sec": x[0], "throughput_8_bytes_per_sec": x[1], "connect_mean_us": x[2], "http_rps": x[3], "http_p50_ms": x[4], "http_p99_ms": x[5] },
        "throughput_1_ratio": x[0] / d[0],
        "throughput_8_ratio": x[1] / d[1],
        "http_rps_ratio": x[3] / d[3],
        "http_p99_added_ms": x[5] - d[5],
        "connect_latency_ratio": x[2] / d[2],
        "bare_relays": { "connect_mean_us": relays_us },
        "bare_relays_connect_latency_ratio": relays_us / d[2],
        "warm_bare_relays": { "connect_mean_us": warm_us, "cpu_us_per_connection": warm_cpu },
        "agents_cpu_us_per_connection": agents_cpu,
        "warm_bare_relays_connect_latency_ratio": warm_us / d[2],
        "hbone_relays": { "connect_mean_us": hbone_us, "cpu_us_per_connection": hbone_cpu },
        "hbone_relays_connect_latency_ratio": hbone_us / d[2],
        "agent_rss_idle_mib": rss_idle_kib as f64 / 1024.0,
        "agent_rss_loaded_mib": rss_loaded_kib as f64 / 1024.0,
        "agents_cpu_ms_per_gib_1_stream": cpu_per_gib,
        "goals": {
            "throughput_1_ratio": ">= 0.45", "http_rps_ratio": ">= 0.7", "http_p99_added_ms": "<= 0.7",
            "connect_latency_ratio": "<= 2.0", "agent_rss_idle_mib": "<= 12",
        },
        "istio_ztunnel_on_this_machine": {
            "throughput_1_ratio": 0.22, "http_rps_ratio": 0.46, "http_p99_added_ms": 1.46, "connect_latency_ratio": 4.0,
        },
        "method": "two nodes; mesh = both pods enrolled, control service running, HBONE with mutual TLS between the agents (their default worker count: 1 on 2 CPUs); \
                   direct = a plain pair on the same nodes. Throughput: sinew-testapp sink for 3 s on 1 and on 8 streams. \
                   Connect: connect() until the first answer byte, mean of 500 sequential connections. \
                   bare_relays = the plain pair through two minimal tokio relays placed where the agents sit (loopback listener \
                   in the client pod, listener in the server pod relaying to the app), a new TCP connection between them per connection: \
                   the floor of connect latency with a user-space hop on each node, without capture, TLS, HTTP/2, policy or telemetry. \
                   warm_bare_relays = the same in the tunnel's shape: the cross-node connection opened before the client comes \
                   (as a pooled HBONE connection), the far relay connecting to the app once the first bytes are in. \
                   hbone_relays = the warm relays' shape speaking HBONE through sinew-hbone (TLS 1.3, HTTP/2 CONNECT on a pooled \
                   connection, optimistic, the 200 with the app's first answer): the protocol's own cost, without capture, \
                   policy, telemetry or pod namespaces. \
                   CPU per connection: both agents' (or both warm relays') scheduler time over the 500-connection loop. \
                   HTTP: wrk -t2 -c30 for 5 s against nginx (1 worker). CPU per GiB: both agents' user+system time during the 1-stream run. RSS: the larger agent's VmRSS, idle after warm-up and after the load. \
                   Median of 3 interleaved rounds.",
    });
    println!(
        "throughput_1_ratio {:.3} (goal >= 0.45)  throughput_8_ratio {:.3}  http_rps_ratio {:.3} (goal >= 0.7)  \
         http_p99_added_ms {:.3} (goal <= 0.7)  connect_latency_ratio {:.2} (goal <= 2.0; bare relays {:.2}, warm {:.2}, HBONE {:.2})  agent_rss_idle_mib {:.1} (goal <= 12)  agents_cpu_ms_per_gib_1_stream {:.0}",
        x[0] / d[0],
        x[1] / d[1],
        x[3] / d[3],
        x[5] - d[5],
        x[2] / d[2],
        relays_us / d[2],
        warm_us / d[2],
        hbone_us / d[2],
        rss_idle_kib as f64 / 1024.0,
        cpu_per_gib
    );
    std::fs::create_dir_all(out_file.parent().context("bench dir")?)?;
    std::fs::write(out_file, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", out_file.display());
    Ok(())
}
