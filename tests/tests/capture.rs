//! Root tier: eBPF capture of enrolled pods into the node agent, end to end.

use anyhow::{Context, Result, ensure};
use sinew_local_api::{Request, Response};
use sinew_test_util::{Cluster, Pod, must_be_root};

const MIB: usize = 1024 * 1024;

/// Two nodes with agents, an enrolled client on node 1 and an enrolled server on node 2.
fn two_nodes() -> Result<(Cluster, Pod, Pod)> {
    must_be_root();
    let mut c = Cluster::new(&["demo"])?;
    c.add_node()?;
    c.add_node()?;
    let client = c.add_pod(1, "client", "demo")?;
    let server = c.add_pod(2, "server", "demo")?;
    c.start_agent(1)?;
    c.start_agent(2)?;
    ensure!(c.agent(1).enroll(&client)?.captured);
    ensure!(c.agent(2).enroll(&server)?.captured);
    c.serve(&server, &[8080, 9090])?;
    Ok((c, client, server))
}

fn xfer(c: &Cluster, from: &Pod, to: &str, up: usize, down: usize) -> Result<String> {
    c.run_in(from, &["xfer", to, &up.to_string(), &down.to_string(), "7"])
}

#[test]
fn cross_node_16_mib_each_way_ipv4_and_ipv6() -> Result<()> {
    let (mut c, client, server) = two_nodes()?;
    for ip in [server.v4(), server.v6()] {
        let out = xfer(&c, &client, &Cluster::target(ip, 8080), 16 * MIB, 16 * MIB)?;
        ensure!(out.contains("checksums match"), "{out}");
    }
    // Both ends went through an agent: outbound on node 1, inbound on node 2.
    let (n1, n2) = (c.agent(1).status()?.counters, c.agent(2).status()?.counters);
    ensure!(n1.outbound == 2 && n2.inbound == 2, "node1 {n1:?} node2 {n2:?}");
    ensure!(n1.upstream_errors == 0 && n1.original_dst_errors == 0, "{n1:?}");
    Ok(())
}

#[test]
fn resets_propagate_through_both_agents() -> Result<()> {
    let (c, client, server) = two_nodes()?;
    for ip in [server.v4(), server.v6()] {
        let out = c.run_in(&client, &["reset", &Cluster::target(ip, 8080)])?;
        ensure!(out.contains("ok reset propagated"), "{out}");
    }
    Ok(())
}

#[test]
fn thousand_concurrent_connections_keep_their_original_destinations() -> Result<()> {
    must_be_root();
    let mut c = Cluster::new(&["demo"])?;
    c.add_node()?;
    c.add_node()?;
    let clients =
        [c.add_pod(1, "c1", "demo")?, c.add_pod(1, "c2", "demo")?, c.add_pod(2, "c3", "demo")?];
    let servers = [c.add_pod(1, "s1", "demo")?, c.add_pod(2, "s2", "demo")?];
    c.start_agent(1)?;
    c.start_agent(2)?;
    for p in clients.iter().chain(&servers) {
        c.agent(p.node).enroll(p)?;
    }
    let mut targets = Vec::new();
    for s in &servers {
        c.serve(s, &[8001, 8002, 8003])?;
        for port in [8001, 8002, 8003] {
            targets.push(Cluster::target(s.v4(), port));
            targets.push(Cluster::target(s.v6(), port));
        }
    }
    let targets = targets.join(",");
    // Three pods at once, 1,002 connections open together.
    let results: Vec<Result<String>> = std::thread::scope(|s| {
        let handles: Vec<_> =
            clients.iter().map(|p| s.spawn(|| c.run_in(p, &["many", &targets, "334"]))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results {
        let out = r?;
        ensure!(out.contains("ok 334 connections"), "{out}");
    }
    let (n1, n2) = (c.agent(1).status()?.counters, c.agent(2).status()?.counters);
    ensure!(n1.outbound + n2.outbound == 1002, "node1 {n1:?} node2 {n2:?}");
    ensure!(n1.inbound + n2.inbound == 1002, "node1 {n1:?} node2 {n2:?}");
    Ok(())
}

#[test]
fn inbound_capture_on_any_port_including_the_applications() -> Result<()> {
    let (mut c, _client, server) = two_nodes()?;
    // A client outside the mesh: only the server's inbound capture sees its connections.
    let outsider = c.add_pod(1, "outsider", "plain")?;
    let status = c.agent(1).enroll(&outsider)?;
    ensure!(!status.captured, "a pod of a plain namespace must not be captured");
    for port in [8080, 9090] {
        let before = c.agent(2).status()?.counters.inbound;
        let out = xfer(&c, &outsider, &Cluster::target(server.v4(), port), MIB, MIB)?;
        ensure!(out.contains("checksums match"), "{out}");
        let after = c.agent(2).status()?.counters.inbound;
        ensure!(after == before + 1, "port {port}: inbound {before} -> {after}");
    }
    // The agent's own port: refused, not looped back into the agent.
    let before = c.agent(2).status()?.counters.inbound;
    ensure!(xfer(&c, &outsider, &Cluster::target(server.v4(), 15006), 1, 1).is_err());
    let after = c.agent(2).status()?.counters.inbound;
    ensure!(after == before + 1, "a connection to :15006 looped: inbound {before} -> {after}");
    // A port nothing listens on: captured, then refused by the application's namespace.
    let err = xfer(&c, &outsider, &Cluster::target(server.v4(), 7777), 1, 1).unwrap_err();
    ensure!(
        // A reset that lands while the client writes can surface as a broken pipe or an early
        // end of the download instead.
        ["refused", "reset", "broken pipe", "early eof"]
            .iter()
            .any(|w| format!("{err:#}").contains(w)),
        "{err:#}"
    );
    Ok(())
}

#[test]
fn a_process_in_the_pod_cannot_take_captured_connections() -> Result<()> {
    let (mut c, _client, server) = two_nodes()?;
    let outsider = c.add_pod(1, "outsider", "plain")?;
    c.agent(1).enroll(&outsider)?;
    // A root process in the server pod joins the reuseport group of the agent's plaintext
    // inbound listeners (same address, same user): the kernel would hand it a share of the
    // connections if sk_lookup let it choose.
    // It listens until its standard input closes (60 s at most), so it is there throughout.
    let mut stealer = server
        .command(&c.binary("sinew-testapp"), &["steal", "15006", "60"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut out = std::io::BufReader::new(stealer.stdout.take().context("stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    ensure!(line.trim() == "bound", "the stealer could not join the group: {line:?}");
    let before = c.agent(2).status()?.counters.inbound;
    for _ in 0..40 {
        let out = xfer(&c, &outsider, &Cluster::target(server.v4(), 8080), 1024, 1024)?;
        ensure!(out.contains("checksums match"), "{out}");
    }
    let after = c.agent(2).status()?.counters.inbound;
    ensure!(after == before + 40, "the agent carried {} of 40", after - before);
    drop(stealer.stdin.take());
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    stealer.wait()?;
    ensure!(line.contains("\"accepted\":0"), "the stealer got connections: {line}");
    Ok(())
}

#[test]
fn agent_connections_are_not_captured_and_plain_namespaces_stay_direct() -> Result<()> {
    let (mut c, client, server) = two_nodes()?;
    let outsider = c.add_pod(1, "outsider", "plain")?;
    let plain_server = c.add_pod(2, "plainsrv", "plain")?;
    c.agent(1).enroll(&outsider)?;
    ensure!(!c.agent(2).enroll(&plain_server)?.captured);
    c.serve(&plain_server, &[8080])?;
    ensure!(!c.pod_has_links(&outsider)? && !c.pod_has_links(&plain_server)?);
    ensure!(c.pod_has_links(&client)? && c.pod_has_links(&server)?);

    // Plain to plain: no agent sees it.
    xfer(&c, &outsider, &Cluster::target(plain_server.v4(), 8080), 4096, 4096)?;
    let (n1, n2) = (c.agent(1).status()?.counters, c.agent(2).status()?.counters);
    ensure!(n1.outbound == 0 && n2.inbound == 0, "node1 {n1:?} node2 {n2:?}");

    // Captured client to a plain server: exactly one outbound connection per client
    // connection, so the agent's own upstream connection was not captured again (no loop).
    for _ in 0..3 {
        xfer(&c, &client, &Cluster::target(plain_server.v6(), 8080), 4096, 4096)?;
    }
    let n1 = c.agent(1).status()?.counters;
    ensure!(n1.outbound == 3 && n1.inbound == 0, "{n1:?}");
    Ok(())
}

#[test]
fn agent_down_fails_closed_and_restart_readopts() -> Result<()> {
    let (mut c, client, server) = two_nodes()?;
    let outsider = c.add_pod(1, "outsider", "plain")?;
    let to_server = Cluster::target(server.v4(), 8080);
    xfer(&c, &client, &to_server, 4096, 4096)?;

    c.agent(1).kill();
    c.agent(2).kill();
    // Outbound from an enrolled pod is refused, not sent around the mesh...
    let err = xfer(&c, &client, &to_server, 4096, 4096).unwrap_err();
    ensure!(format!("{err:#}").contains("refused"), "{err:#}");
    // ...and so is inbound to one.
    let err = xfer(&c, &outsider, &to_server, 4096, 4096).unwrap_err();
    ensure!(format!("{err:#}").contains("refused"), "{err:#}");
    ensure!(
        c.pod_has_links(&client)? && c.pod_has_links(&server)?,
        "pins must keep capture in place"
    );
    let old_programs = c.pod_link_programs(&client)?;

    c.agent(1).restart()?;
    // Same links, now running the restarted agent's programs (BPF_LINK_UPDATE).
    let new_programs = c.pod_link_programs(&client)?;
    ensure!(new_programs.len() == 6, "links of the client pod: {new_programs:?}");
    ensure!(
        old_programs.iter().all(|p| !new_programs.contains(p)),
        "{old_programs:?} -> {new_programs:?}"
    );
    c.agent(2).restart()?;
    let pods = c.agent(1).status()?.pods;
    ensure!(pods.len() == 1 && pods[0].captured, "re-adopted pods: {pods:?}");
    let out = xfer(&c, &client, &to_server, MIB, MIB)?;
    ensure!(out.contains("checksums match"), "{out}");
    ensure!(c.agent(1).status()?.counters.outbound == 1);
    xfer(&c, &outsider, &to_server, 4096, 4096)?;
    ensure!(c.agent(2).status()?.counters.inbound == 2);
    Ok(())
}

#[test]
fn unenroll_goes_direct_and_leaves_nothing_attached() -> Result<()> {
    let (mut c, client, server) = two_nodes()?;
    let to_server = Cluster::target(server.v6(), 8080);
    xfer(&c, &client, &to_server, 4096, 4096)?;
    c.agent(1).unenroll(&client)?;
    c.agent(2).unenroll(&server)?;
    ensure!(!c.pod_has_links(&client)? && !c.pod_has_links(&server)?, "links left attached");
    let pins = c.agent(1).bpffs_dir.join("pods/uid-client");
    ensure!(!pins.exists(), "{} left behind", pins.display());
    let before = (c.agent(1).status()?.counters, c.agent(2).status()?.counters);
    let out = xfer(&c, &client, &to_server, MIB, MIB)?;
    ensure!(out.contains("checksums match"), "{out}");
    let after = (c.agent(1).status()?.counters, c.agent(2).status()?.counters);
    ensure!(before == after, "un-enrolled traffic went through an agent: {before:?} -> {after:?}");
    ensure!(c.agent(1).status()?.pods.is_empty());

    // The documented host cleanup removes the maps too once the agent is stopped.
    let agent = c.agent(1);
    ensure!(agent.cleanup().is_err(), "cleanup must refuse while the agent answers");
    agent.kill();
    let out = agent.cleanup()?;
    ensure!(out.contains("removed"), "{out}");
    ensure!(!agent.bpffs_dir.exists(), "cleanup left {}", agent.bpffs_dir.display());
    Ok(())
}

#[test]
fn bad_input_is_refused_and_changes_nothing() -> Result<()> {
    let (mut c, client, server) = two_nodes()?;
    let extra = c.add_pod(1, "extra", "demo")?;
    let agent = c.agent(1);
    let before = agent.status()?;

    let mut missing_netns = extra.spec();
    missing_netns.netns = "/run/netns/does-not-exist".into();
    let mut missing_cgroup = extra.spec();
    missing_cgroup.cgroup = Some("/sys/fs/cgroup/unified/does-not-exist".into());
    let mut not_a_netns = extra.spec();
    not_a_netns.netns = "/etc/hostname".into();
    let mut taken_uid = extra.spec();
    taken_uid.uid = client.spec().uid;
    // Another pod's address (reused before that pod was removed): refused, naming both.
    let mut taken_ip = extra.spec();
    taken_ip.ips = vec![client.v4()];
    let taken = format!("ips: {} is held by enrolled pod {}", client.v4(), client.spec().uid);
    // Another pod's network namespace: it would join that pod's listeners and carry part of
    // its traffic under this pod's identity.
    let mut taken_netns = extra.spec();
    taken_netns.netns = client.spec().netns;
    let shared = format!("is the network namespace of enrolled pod {}", client.spec().uid);
    // Another pod's cgroup, or the agent's own (programs there would capture it).
    let mut taken_cgroup = extra.spec();
    taken_cgroup.cgroup = client.spec().cgroup;
    let overlap = format!("overlaps the cgroup of enrolled pod {}", client.spec().uid);
    let mut agents_cgroup = extra.spec();
    agents_cgroup.cgroup = client.cgroup.parent().map(|base| base.join("agent-n1"));
    for (spec, expect) in [
        (taken_netns, shared.as_str()),
        (taken_cgroup, overlap.as_str()),
        (agents_cgroup, "holds the agent itself"),
        (missing_netns, "does-not-exist"),
        (missing_cgroup, "does-not-exist"),
        (not_a_netns, "not a network namespace"),
        (taken_uid, "already enrolled"),
        (taken_ip, taken.as_str()),
    ] {
        let err = agent.client().call(&Request::Enroll { pod: spec }).unwrap_err().to_string();
        ensure!(err.contains(expect), "expected {expect:?} in {err:?}");
    }
    for raw in [&b"{not json\n"[..], b"{\"op\":\"enroll\"}\n", b"{\"op\":\"reboot\"}\n"] {
        match agent.client().call_raw(raw)? {
            Response::Error { message } => {
                ensure!(message.contains("malformed request"), "{message}")
            }
            other => anyhow::bail!("{other:?}"),
        }
    }
    let mut huge = vec![b'x'; sinew_local_api::MAX_REQUEST_BYTES + 10];
    huge.push(b'\n');
    ensure!(matches!(agent.client().call_raw(&huge)?, Response::Error { .. }));
    ensure!(agent.status()? == before, "a refused request changed the agent's state");
    ensure!(!c.pod_has_links(&extra)?);
    ensure!(!c.agent(1).bpffs_dir.join("pods/uid-extra").exists());
    // The pod whose address was claimed is still captured, both ways.
    let out = xfer(&c, &client, &Cluster::target(server.v4(), 8080), 4096, 4096)?;
    ensure!(out.contains("checksums match"), "{out}");
    let counters = c.agent(1).status()?.counters;
    ensure!(counters.outbound == before.counters.outbound + 1, "{counters:?}");
    Ok(())
}

#[test]
fn labelling_a_namespace_captures_its_running_pods_and_bad_config_changes_nothing() -> Result<()> {
    let (mut c, _client, server) = two_nodes()?;
    let late = c.add_pod(1, "late", "later")?;
    ensure!(!c.agent(1).enroll(&late)?.captured);
    let wait_captured = |c: &mut Cluster, want: bool| -> Result<()> {
        for _ in 0..100 {
            if c.agent(1).status()?.pods.iter().any(|p| p.spec.name == "late" && p.captured == want)
            {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        anyhow::bail!("pod late never became captured={want}")
    };
    // Written whole (a rename), as a reload between a truncate and a write would see an empty
    // file, a valid change.
    c.write_config(
        "later.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: later\n  labels:\n    sinew.io/dataplane-mode: ambient\n",
    )?;
    wait_captured(&mut c, true)?;
    let to_server = Cluster::target(server.v4(), 8080);
    xfer(&c, &late, &to_server, 4096, 4096)?;
    ensure!(c.agent(1).status()?.counters.outbound == 1);

    // A broken file must not release anything: the last good state keeps serving.
    c.write_config("later.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: [broken\n")?;
    let rejected = |c: &mut Cluster| {
        c.agent(1)
            .log_text()
            .lines()
            .any(|l| l.contains("configuration rejected") && l.contains("later.yaml"))
    };
    for _ in 0..100 {
        if rejected(&mut c) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ensure!(rejected(&mut c), "no rejection naming the file: {}", c.agent(1).log_text());
    ensure!(c.agent(1).status()?.pods.iter().any(|p| p.spec.name == "late" && p.captured));

    c.write_config("later.yaml", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: later\n")?;
    wait_captured(&mut c, false)?;
    ensure!(!c.pod_has_links(&late)?);
    xfer(&c, &late, &to_server, 4096, 4096)?;
    ensure!(c.agent(1).status()?.counters.outbound == 1, "released pod still captured");
    Ok(())
}

#[test]
fn restart_drops_pods_whose_namespace_is_gone() -> Result<()> {
    let (mut c, _client, _server) = two_nodes()?;
    let gone = c.add_pod(2, "gone", "demo")?;
    ensure!(c.agent(2).enroll(&gone)?.captured);
    c.agent(2).kill();
    sinew_test_util::cluster::sh("ip", &["netns", "del", &gone.netns])?;
    c.agent(2).restart()?;
    let pods = c.agent(2).status()?.pods;
    ensure!(pods.iter().all(|p| p.spec.name != "gone"), "{pods:?}");
    ensure!(pods.iter().any(|p| p.spec.name == "server" && p.captured), "{pods:?}");
    ensure!(!c.agent(2).bpffs_dir.join("pods/uid-gone").exists(), "pins of a gone pod left behind");
    ensure!(c.agent(2).log_text().contains("pod gone: dropping it and its pins"));
    Ok(())
}

#[test]
fn restart_keeps_a_pod_it_cannot_readopt_failing_closed() -> Result<()> {
    let (mut c, _client, server) = two_nodes()?;
    let outsider = c.add_pod(1, "outsider", "plain")?;
    let to_server = Cluster::target(server.v4(), 8080);
    c.agent(2).kill();
    // The application takes the agent's inbound port while the agent is down, so the
    // restarted agent cannot listen in the pod.
    c.serve(&server, &[15006])?;
    c.agent(2).restart()?;
    let pods = c.agent(2).status()?.pods;
    let pod = pods.iter().find(|p| p.spec.name == "server").context("server forgotten")?;
    ensure!(!pod.captured, "{pod:?}");
    ensure!(pod.reason.as_deref().unwrap_or("").contains("re-adoption failed"), "{pod:?}");
    // It still fails closed: its pins stay, and traffic is refused, not let around the mesh.
    ensure!(c.pod_has_links(&server)?, "pins of a pod not re-adopted were removed");
    let err = xfer(&c, &outsider, &to_server, 4096, 4096).unwrap_err();
    ensure!(format!("{err:#}").contains("refused"), "{err:#}");
    // Un-enrolling it takes everything away.
    c.agent(2).unenroll(&server)?;
    ensure!(!c.pod_has_links(&server)?);
    Ok(())
}

#[test]
fn a_state_file_pod_without_a_findable_cgroup_is_not_captured_and_the_agent_serves() -> Result<()> {
    let (mut c, _client, server) = two_nodes()?;
    c.agent(2).kill();
    // The state file names no cgroup for the server (an older or hand-written one), none can
    // be discovered from its UID (the harness does not name cgroups pod<uid>), and its pins
    // are gone: re-adoption fails, and the retries attach from that entry. They once took
    // the agent down with it (a panic holding the pod registry's lock).
    let state = c.agent(2).state_dir.join("pods.json");
    let mut pods: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state)?)?;
    for p in pods.as_array_mut().context("pods.json is not a list")? {
        if p["name"] == "server" {
            p.as_object_mut().context("a pod is not an object")?.remove("cgroup");
        }
    }
    std::fs::write(&state, serde_json::to_vec(&pods)?)?;
    std::fs::remove_dir_all(
        c.agent(2).bpffs_dir.join("pods").join(format!("uid-{}", server.name)),
    )?;
    c.agent(2).restart()?;
    // A new mesh view retries every pod that should be captured (as does a timer, later).
    c.write_config("nudge.yaml", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: nudge\n")?;
    let mut reason = String::new();
    for _ in 0..150 {
        let pods = c.agent(2).status()?.pods;
        let pod = pods.iter().find(|p| p.spec.name == "server").context("server forgotten")?;
        ensure!(!pod.captured, "{pod:?}");
        reason = pod.reason.clone().unwrap_or_default();
        if reason.contains("capture failed") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ensure!(reason.contains("capture failed") && reason.contains("cgroup"), "{reason}");
    // The agent still serves: a new pod enrolls and is captured, status keeps answering.
    let other = c.add_pod(2, "other", "demo")?;
    ensure!(c.agent(2).enroll(&other)?.captured);
    ensure!(c.agent(2).status()?.pods.len() == 2);
    ensure!(!c.agent(2).log_text().contains("panicked"), "{}", c.agent(2).log_text());
    Ok(())
}

#[test]
fn a_workload_label_takes_one_pod_out_of_the_mesh_or_brings_one_in() -> Result<()> {
    let (mut c, _client, server) = two_nodes()?;
    let to_server = Cluster::target(server.v4(), 8080);
    const MODE: &str = "sinew.io/dataplane-mode";
    // Polls the agent's view of `pod` until it is `captured` (the agent reads the Workload's
    // label from its configuration, re-read every 2 s).
    let settle = |c: &mut Cluster, pod: &Pod, captured: bool| -> Result<String> {
        let mut last = None;
        for _ in 0..100 {
            let pods = c.agent(1).status()?.pods;
            let p = pods.iter().find(|p| p.spec.name == pod.name).context("pod unknown")?;
            if p.captured == captured && c.pod_has_links(pod)? == captured {
                return Ok(p.reason.clone().unwrap_or_default());
            }
            last = Some(p.clone());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        anyhow::bail!("{} never became captured={captured}: {last:?}", pod.name)
    };
    // Out of an ambient namespace: not captured, its connections go direct.
    let out = c.add_pod_labeled(1, "out", "demo", "default", &[(MODE, "none")])?;
    c.agent(1).enroll(&out)?;
    let reason = settle(&mut c, &out, false)?;
    ensure!(
        reason.contains("Workload demo/out is labelled sinew.io/dataplane-mode=none"),
        "{reason}"
    );
    // Enrolled again now that the agent's view has the label: decided at enroll.
    c.agent(1).unenroll(&out)?;
    ensure!(!c.agent(1).enroll(&out)?.captured, "enrolled against its label");
    let before = c.agent(1).status()?.counters.outbound;
    xfer(&c, &out, &to_server, 4096, 4096)?;
    ensure!(c.agent(1).status()?.counters.outbound == before, "an excluded pod was captured");
    // Into a namespace that is not in the mesh: captured.
    let inside = c.add_pod_labeled(1, "inside", "plain", "default", &[(MODE, "ambient")])?;
    c.agent(1).enroll(&inside)?;
    settle(&mut c, &inside, true)?;
    c.agent(1).unenroll(&inside)?;
    ensure!(c.agent(1).enroll(&inside)?.captured, "not captured at enroll despite its label");
    xfer(&c, &inside, &to_server, 4096, 4096)?;
    ensure!(c.agent(1).status()?.counters.outbound == before + 1, "an enrolled pod went direct");
    // Without the label the namespace decides again, for both, while they run.
    for pod in [&out, &inside] {
        c.write_config(
            &format!("workload-{}.yaml", pod.name),
            &format!(
                "apiVersion: sinew.io/v1alpha1\nkind: Workload\nmetadata: {{name: {}, namespace: {}}}\nspec: {{serviceAccount: default, node: node1, ips: [\"{}\", \"{}\"]}}\n",
                pod.name, pod.namespace, pod.ips[0], pod.ips[1]
            ),
        )?;
    }
    settle(&mut c, &out, true)?;
    let reason = settle(&mut c, &inside, false)?;
    ensure!(reason.contains("namespace \"plain\" is not enrolled"), "{reason}");
    Ok(())
}

#[test]
fn a_namespace_unlabelled_while_the_agent_was_down_is_released_at_restart() -> Result<()> {
    let (mut c, _client, server) = two_nodes()?;
    let labelled = |on: bool| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: later\n{}",
            if on { "  labels:\n    sinew.io/dataplane-mode: ambient\n" } else { "" }
        )
    };
    c.write_config("later.yaml", &labelled(true))?;
    let late = c.add_pod(1, "late", "later")?;
    let mut captured = false;
    for _ in 0..100 {
        captured = c.agent(1).enroll(&late)?.captured;
        if captured {
            break;
        }
        c.agent(1).unenroll(&late)?;
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ensure!(captured && c.pod_has_links(&late)?, "the labelled namespace was never captured");
    c.agent(1).kill();
    c.write_config("later.yaml", &labelled(false))?;
    c.agent(1).restart()?;
    let pods = c.agent(1).status()?.pods;
    ensure!(pods.iter().any(|p| p.spec.name == "late" && !p.captured), "{pods:?}");
    ensure!(!c.pod_has_links(&late)?, "pins of a pod no longer captured left in place");
    xfer(&c, &late, &Cluster::target(server.v4(), 8080), 4096, 4096)?;
    ensure!(c.agent(1).status()?.counters.outbound == 0, "a released pod still captured");
    Ok(())
}

#[test]
fn concurrent_enrolls_and_unenrolls_keep_capture_and_state_consistent() -> Result<()> {
    let (mut c, _client, server) = two_nodes()?;
    let pods: Vec<Pod> =
        (0..8).map(|i| c.add_pod(2, &format!("p{i}"), "demo")).collect::<Result<_>>()?;
    // At once: every enroll succeeds and every one is in the state file.
    let agent = &*c.agent(2);
    let results: Vec<Result<bool>> = std::thread::scope(|s| {
        let handles: Vec<_> =
            pods.iter().map(|p| s.spawn(|| Ok(agent.enroll(p)?.captured))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results {
        ensure!(r?, "a concurrent enroll was not captured");
    }
    c.agent(2).kill();
    c.agent(2).restart()?;
    let listed = c.agent(2).status()?.pods;
    ensure!(listed.len() == 9 && listed.iter().all(|p| p.captured), "after restart: {listed:?}");

    // Un-enroll racing enroll of the same pod: whichever wins, status and kernel agree.
    for round in 0..20 {
        let agent = &*c.agent(2);
        std::thread::scope(|s| {
            let a = s.spawn(|| agent.unenroll(&server));
            let b = s.spawn(|| agent.enroll(&server));
            let _ = (a.join(), b.join());
        });
        let listed = c.agent(2).status()?.pods;
        let captured = listed.iter().any(|p| p.spec.name == "server" && p.captured);
        ensure!(
            captured == c.pod_has_links(&server)?,
            "round {round}: status says captured={captured}, links disagree"
        );
        if !captured {
            c.agent(2).enroll(&server)?;
        }
    }
    Ok(())
}

#[test]
fn a_client_that_writes_and_closes_at_once_keeps_its_original_destination() -> Result<()> {
    let (mut c, client, server) = two_nodes()?;
    let pid = c.agent(1).pid().context("agent 1 runs")?.to_string();
    // The agent is slow to accept (stopped): the client's FIN is acknowledged and its socket
    // closed before the agent asks where the connection was going.
    sinew_test_util::cluster::sh("kill", &["-STOP", &pid])?;
    let fired =
        c.run_in(&client, &["fire", &Cluster::target(server.v4(), 8080), "SINK\\r\\nbytes"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    sinew_test_util::cluster::sh("kill", &["-CONT", &pid])?;
    fired?;
    let mut n1 = c.agent(1).status()?.counters;
    for _ in 0..50 {
        if n1.outbound + n1.original_dst_errors > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        n1 = c.agent(1).status()?.counters;
    }
    ensure!(n1.outbound == 1 && n1.original_dst_errors == 0, "{n1:?}");
    Ok(())
}
