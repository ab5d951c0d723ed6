//! `cargo xtask demo`: a local mesh of two nodes, shown working.

use std::path::Path;

use anyhow::{Result, ensure};
use sinew_test_util::Cluster;

pub fn run(bin_dir: &Path) -> Result<()> {
    println!("\n== Sinew demo: two nodes, one agent each, pods as netns + cgroup v2 ==");
    let mut c = Cluster::new(&["shop"])?;
    c.set_bin_dir(bin_dir);
    c.add_node()?;
    c.add_node()?;
    let client = c.add_pod(1, "client", "shop")?;
    let server = c.add_pod(2, "server", "shop")?;
    let outsider = c.add_pod(1, "legacy", "plain")?;
    println!("node 1: pod shop/client {} {}", client.v4(), client.v6());
    println!("node 1: pod plain/legacy {} (namespace not enrolled)", outsider.v4());
    println!("node 2: pod shop/server {} {}", server.v4(), server.v6());
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

    for ip in [server.v4(), server.v6()] {
        let target = Cluster::target(ip, 8080);
        println!("\n$ (in shop/client) sinew-testapp xfer {target} 4MiB up, 4MiB down");
        let out = c.run_in(&client, &["xfer", &target, "4194304", "4194304", "1"])?;
        print!("{out}");
    }
    println!("\n$ (in plain/legacy) sinew-testapp xfer {}:8080", server.v4());
    print!(
        "{}",
        c.run_in(&outsider, &["xfer", &Cluster::target(server.v4(), 8080), "65536", "65536", "2"])?
    );

    println!("\nWhere the traffic went (agent counters):");
    let (n1, n2) = (c.agent(1).status()?.counters, c.agent(2).status()?.counters);
    println!("  node 1 agent: captured outbound {}, inbound {}", n1.outbound, n1.inbound);
    println!("  node 2 agent: captured outbound {}, inbound {}", n2.outbound, n2.inbound);
    ensure!(n1.outbound == 2, "expected the client's 2 connections to be captured on node 1");
    ensure!(n2.inbound == 3, "expected 3 inbound connections captured on node 2");
    println!("  shop/client's two connections left through node 1's agent; all three arrivals at");
    println!("  shop/server, including plain/legacy's, came in through node 2's agent.");
    for node in [1, 2] {
        println!(
            "\nnode {node} agent access log (src is the app's socket, dst the original destination):"
        );
        for l in c.agent(node).log_text().lines().filter(|l| l.contains(" access:")) {
            println!("  {}", l.split_once(" access: ").map_or(l, |(_, rest)| rest));
        }
    }

    println!("\nStopping node 1's agent: shop/client fails closed");
    c.agent(1).kill();
    let err = c
        .run_in(&client, &["xfer", &Cluster::target(server.v4(), 8080), "1", "1", "3"])
        .unwrap_err();
    println!(
        "  {}",
        format!("{err:#}").lines().find(|l| l.contains("refused")).unwrap_or("refused")
    );
    c.agent(1).restart()?;
    print!(
        "Restarted: {}",
        c.run_in(&client, &["xfer", &Cluster::target(server.v4(), 8080), "65536", "65536", "4"])?
    );
    println!("\nDemo done; tearing the cluster down.");
    Ok(())
}
