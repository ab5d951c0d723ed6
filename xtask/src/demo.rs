//! `cargo xtask demo`: a local mesh of two nodes and a control service, shown working:
//! capture, mutual TLS between the agents, an L4 policy denying a connection, and the
//! metrics and access log it produced.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use sinew_local_api::{Request, Response};
use sinew_test_util::Cluster;

fn show(e: &Value) -> String {
    format!(
        "{} {} {} -> {} [{}] decision={} {}bytes up/{} down",
        e["direction"].as_str().unwrap_or("?"),
        e["protocol"].as_str().unwrap_or("?"),
        e["src"]["identity"].as_str().or(e["src"]["addr"].as_str()).unwrap_or("?"),
        e["dst"]["addr"].as_str().unwrap_or("?"),
        e["dst"]["identity"].as_str().unwrap_or("-"),
        e["decision"].as_str().unwrap_or("-"),
        e["bytes_sent"],
        e["bytes_received"],
    )
}

pub fn run(bin_dir: &Path) -> Result<()> {
    println!(
        "\n== Sinew demo: a control service, two nodes with an agent each, pods as netns + cgroup v2 =="
    );
    let mut c = Cluster::new(&["shop"])?;
    c.set_bin_dir(bin_dir);
    c.add_node()?;
    c.add_node()?;
    let client = c.add_pod_as(1, "client", "shop", "web")?;
    let server = c.add_pod_as(2, "server", "shop", "api")?;
    let outsider = c.add_pod(1, "legacy", "plain")?;
    println!("node 1: pod shop/client {} {} (service account web)", client.v4(), client.v6());
    println!("node 1: pod plain/legacy {} (namespace not enrolled)", outsider.v4());
    println!("node 2: pod shop/server {} {} (service account api)", server.v4(), server.v6());
    c.start_control()?;
    println!(
        "control service on {} (TLS; agents bootstrap with a per-node token)",
        sinew_test_util::CONTROL_ADDR
    );
    c.start_agent(1)?;
    c.start_agent(2)?;
    println!("agents running; logs in {}", c.dir().display());
    for (node, pod) in [(1, &client), (1, &outsider), (2, &server)] {
        let s = c.agent(node).enroll(pod)?;
        match s.reason {
            None => println!("enrolled {}/{} on node {node}: captured", pod.namespace, pod.name),
            Some(r) => println!(
                "enrolled {}/{} on node {node}: not captured ({r})",
                pod.namespace, pod.name
            ),
        }
    }
    c.serve(&server, &[8080])?;
    let target = Cluster::target(server.v4(), 8080);

    for ip in [server.v4(), server.v6()] {
        let t = Cluster::target(ip, 8080);
        println!("\n$ (in shop/client) sinew-testapp xfer {t} 4MiB up, 4MiB down");
        print!("{}", c.run_in(&client, &["xfer", &t, "4194304", "4194304", "1"])?);
    }
    println!("\n$ (in plain/legacy) sinew-testapp xfer {target} (plaintext, PERMISSIVE admits it)");
    print!("{}", c.run_in(&outsider, &["xfer", &target, "65536", "65536", "2"])?);
    let (n1, n2) = (c.agent(1).status()?.counters, c.agent(2).status()?.counters);
    println!(
        "\nnode 1 agent: {} outbound, {} over HBONE on {} TLS connection(s)",
        n1.outbound, n1.hbone_outbound, n1.hbone_connections_opened
    );
    println!("node 2 agent: {} inbound, {} of them HBONE", n2.inbound, n2.hbone_inbound);
    ensure!(n1.hbone_outbound == 2, "expected shop/client's 2 connections over HBONE");
    println!("\nnode 2 access log (one JSON line per connection; shown abridged):");
    for e in c.agent(2).access_entries() {
        println!("  {}", show(&e));
    }

    println!("\nApplying a DENY for service account web (AuthorizationPolicy shop/deny-web):");
    c.write_config(
        "deny-web.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-web\n  namespace: shop\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"web\"]\n",
    )?;
    let mut denied = false;
    for _ in 0..50 {
        if c.run_in(&client, &["ping", &target, "1"]).is_err() {
            denied = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    ensure!(denied, "the DENY did not take effect");
    println!("$ (in shop/client) sinew-testapp ping {target}: connection reset (denied)");
    if let Some(e) = c.agent(2).access_entries().iter().rev().find(|e| e["decision"] == "deny") {
        println!(
            "  node 2 access log: {}  policy={} reason={:?}",
            show(e),
            e["policy"].as_str().unwrap_or("-"),
            e["reason"].as_str().unwrap_or("")
        );
    }
    if let Response::Explanation(v) = c.agent(2).client().call(&Request::Explain {
        source: "shop/client".into(),
        destination: target.clone(),
        method: None,
        path: None,
        host: None,
        headers: Vec::new(),
    })? {
        println!("$ sinew explain shop/client {target}");
        for ep in v["endpoints"].as_array().into_iter().flatten() {
            println!(
                "  {}: {} ({})",
                ep["workload"].as_str().unwrap_or("?"),
                ep["verdict"].as_str().unwrap_or("?"),
                ep["reason"].as_str().unwrap_or("")
            );
        }
    }
    println!("\nnode 2 metrics (curl http://127.0.0.1:15000/metrics, in node 2):");
    for l in c.agent(2).admin_get("/metrics")?.lines() {
        if (l.starts_with("istio_tcp_connections_opened_total")
            || l.starts_with("sinew_authorization_decisions_total"))
            && !l.starts_with('#')
        {
            println!("  {l}");
        }
    }
    c.remove_config("deny-web.yaml")?;

    println!("\nStopping node 1's agent: shop/client fails closed");
    c.agent(1).kill();
    let err = c.run_in(&client, &["xfer", &target, "1", "1", "3"]).unwrap_err();
    println!(
        "  {}",
        format!("{err:#}").lines().find(|l| l.contains("refused")).unwrap_or("refused")
    );
    c.agent(1).restart()?;
    let mut out = Err(anyhow::anyhow!("not tried"));
    for _ in 0..50 {
        out = c.run_in(&client, &["xfer", &target, "65536", "65536", "4"]);
        if out.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    print!("Restarted (policy removed): {}", out?);
    l7(&mut c, &client)?;
    println!("\nDemo done; tearing the cluster down.");
    Ok(())
}

const L7_CONFIG: &str = "
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop, labels: {sinew.io/use-waypoint: wp}}
spec: {clusterIPs: [\"198.18.200.20\"], ports: [{port: 80, targetPort: 8080}], selector: {app: reviews}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: shop}
spec: {clusterIPs: [\"198.18.200.21\"], ports: [{port: 80, targetPort: 8080}], selector: {version: v1}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: shop}
spec: {clusterIPs: [\"198.18.200.22\"], ports: [{port: 80, targetPort: 8080}], selector: {version: v2}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /flaky}}]
    backendRefs: [{name: reviews-v1, port: 80}]
    retry: {codes: [503], attempts: 2, backoff: 10ms}
  - matches: [{path: {type: PathPrefix, value: /limited}}]
    filters: [{type: LocalRateLimit, localRateLimit: {maxTokens: 5, tokensPerFill: 5, fillInterval: 60s}}]
    backendRefs: [{name: reviews-v1, port: 80}]
  - backendRefs: [{name: reviews-v1, port: 80, weight: 90}, {name: reviews-v2, port: 80, weight: 10}]
";

/// The waypoint part: a service with two versions behind waypoint `wp`.
fn l7(c: &mut Cluster, client: &sinew_test_util::Pod) -> Result<()> {
    println!("\n== L7: a waypoint in front of shop/reviews (v1 and v2) ==");
    let v1 = c.add_pod_labeled(
        2,
        "reviews-1",
        "shop",
        "reviews",
        &[("app", "reviews"), ("version", "v1")],
    )?;
    let v2 = c.add_pod_labeled(
        2,
        "reviews-2",
        "shop",
        "reviews",
        &[("app", "reviews"), ("version", "v2")],
    )?;
    c.write_config("reviews.yaml", L7_CONFIG)?;
    c.start_waypoint(1, "wp", "shop")?;
    for p in [&v1, &v2] {
        c.agent(2).enroll(p)?;
    }
    c.serve_http(&v1, 8080, "v1")?;
    c.serve_http(&v2, 8080, "v2")?;
    println!(
        "service shop/reviews 198.18.200.20:80, labelled sinew.io/use-waypoint=wp; HTTPRoute: 90 % v1, 10 % v2,"
    );
    println!(
        "/flaky retried on 503 (the backend fails every other request), /limited at 5 requests per minute"
    );
    let curl = |args: &[&str]| -> Result<String> {
        let mut all = vec!["-sS", "--max-time", "20", "-o", "/dev/null"];
        all.extend_from_slice(args);
        c.exec_in(client, Path::new("/usr/bin/curl"), &all)
    };
    let mut ready = false;
    for _ in 0..100 {
        if curl(&["-f", "http://198.18.200.20/"]).is_ok() {
            ready = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    ensure!(ready, "the waypoint path did not come up");
    let tally = |out: &str| {
        let mut m = std::collections::BTreeMap::new();
        for l in out.lines().filter(|l| !l.is_empty()) {
            *m.entry(l.trim().to_owned()).or_insert(0) += 1;
        }
        m
    };
    let fmt = "%{http_code} %header{x-served-by}\\n";
    println!("\n$ (in shop/client) curl http://198.18.200.20/?n=[1-500]   (500 requests)");
    for (k, n) in tally(&curl(&["-w", fmt, "http://198.18.200.20/?n=[1-500]"])?) {
        println!("  {n:4} x {k}");
    }
    println!(
        "$ (in shop/client) curl http://198.18.200.20/flaky?n=[1-10]   (the backend fails every other request with 503)"
    );
    for (k, n) in tally(&curl(&["-w", fmt, "http://198.18.200.20/flaky?n=[1-10]"])?) {
        println!("  {n:4} x {k}");
    }
    println!("$ (in shop/client) curl http://198.18.200.20/limited?n=[1-8]   (a burst of 8)");
    for (k, n) in tally(&curl(&[
        "-w",
        "%{http_code} remaining=%header{x-ratelimit-remaining}\\n",
        "http://198.18.200.20/limited?n=[1-8]",
    ])?) {
        println!("  {n:4} x {k}");
    }
    let wp = c.pods.iter().find(|p| p.name == "wp").cloned().context("waypoint pod")?;
    println!("\nwaypoint metrics (istio_requests_total by response code):");
    for l in c.pod_get(&wp, "http://127.0.0.1:15000/metrics")?.lines() {
        if let Some(rest) = l.strip_prefix("istio_requests_total{") {
            let code = rest
                .split("response_code=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("?");
            let dst = rest
                .split("destination_workload=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("?");
            println!(
                "  response_code={code} destination_workload={dst}: {}",
                l.rsplit(' ').next().unwrap_or("?")
            );
        }
    }
    Ok(())
}
