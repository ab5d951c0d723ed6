//! Root tier: mutual TLS (HBONE) between node agents, identities from the control service,
//! and L4 authorization, end to end over real namespaces, agents and control.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use sinew_local_api::{Request, Response};
use sinew_test_util::{Cluster, Pod, must_be_root, sh};

const MIB: usize = 1024 * 1024;

/// The pods of [`mesh`].
struct Pods {
    /// demo/client (service account `client`) on node 1.
    client: Pod,
    /// demo/other (service account `other`) on node 1.
    other: Pod,
    /// demo/server (service account `server`) on node 2, serving 8080.
    server: Pod,
    /// plain/legacy on node 1: outside the mesh.
    legacy: Pod,
}

/// Where node 2's health probes come from (istio-cni's address for them).
const PROBE_SOURCE: &str = "169.254.7.127";

/// Control, two nodes with agents, three enrolled pods and one outside the mesh.
fn mesh() -> Result<(Cluster, Pods)> {
    must_be_root();
    let mut c = Cluster::new(&["demo"])?;
    c.add_node()?;
    c.add_node()?;
    let pods = Pods {
        client: c.add_pod_as(1, "client", "demo", "client")?,
        other: c.add_pod_as(1, "other", "demo", "other")?,
        server: c.add_pod_as(2, "server", "demo", "server")?,
        legacy: c.add_pod(1, "legacy", "plain")?,
    };
    c.start_control()?;
    c.start_agent(1)?;
    // Node 2's probe source, as istio-cni sets one up (there by SNAT; here an address of the
    // node's own that only the probes in the tests bind to).
    let node2 = c.nodes[1].netns.clone();
    sinew_test_util::sh("ip", &["-n", &node2, "addr", "add", PROBE_SOURCE, "dev", "br0"])?;
    c.start_agent_with(2, &["--trust-plaintext-from", PROBE_SOURCE])?;
    for p in [&pods.client, &pods.other, &pods.server, &pods.legacy] {
        let status = c.agent(p.node).enroll(p)?;
        ensure!(status.captured == (p.namespace == "demo"), "{status:?}");
    }
    c.serve(&pods.server, &[8080])?;
    // The first connection may wait for certificates; make sure they are there.
    wait_for("client reaches server", Duration::from_secs(20), || {
        Ok(ping(&c, &pods.client, &pods.server).is_ok())
    })?;
    Ok((c, pods))
}

fn target(p: &Pod) -> String {
    Cluster::target(p.v4(), 8080)
}

fn ping(c: &Cluster, from: &Pod, to: &Pod) -> Result<String> {
    c.run_in(from, &["ping", &target(to), "1"])
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if f()? {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "timed out after {limit:?} waiting for: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A connection held open in the background (`sinew-testapp hold`).
struct Held {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Held {
    fn open(c: &Cluster, from: &Pod, to: &Pod, secs: u32) -> Result<Self> {
        let mut child = from
            .command(&c.binary("sinew-testapp"), &["hold", &target(to), &secs.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut out = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        ensure!(line.trim() == "open", "hold did not open: {line:?}");
        Ok(Self { child, out })
    }

    /// How the connection ended (waits for the process).
    fn outcome(mut self) -> Result<String> {
        let mut line = String::new();
        self.out.read_line(&mut line)?;
        let _ = self.child.wait();
        Ok(line.trim().to_owned())
    }

    /// True when the process has exited (the connection ended).
    fn ended(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn explain(c: &mut Cluster, node: u8, src: &str, dst: &str) -> Result<serde_json::Value> {
    let r = c.agent(node).client().call(&Request::Explain {
        source: src.into(),
        destination: dst.into(),
        method: None,
        path: None,
        host: None,
        headers: Vec::new(),
    })?;
    match r {
        Response::Explanation(v) => Ok(v),
        other => bail!("unexpected answer {other:?}"),
    }
}

fn policy(name: &str, action: &str, from: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  selector:\n    matchLabels:\n      app: server\n  action: {action}\n  rules:\n  - from:\n    - source:\n        {from}\n"
    )
}

#[test]
fn traffic_is_mutual_tls_on_the_wire_and_a_gib_arrives_byte_exact() -> Result<()> {
    let (mut c, p) = mesh()?;
    // Capture on the server pod's veth (node 2 side) while a marker crosses the mesh, then
    // while the same marker arrives in plaintext from outside the mesh (the control).
    let node2 = c.nodes[1].netns.clone();
    let veth = format!("p{}", p.server.v4().to_string().rsplit('.').next().unwrap_or("10"));
    let pcap = c.dir().join("wire.pcap");
    let marker = "SINEW-PLAINTEXT-MARKER-7f3a";
    let contains = |hay: &[u8]| hay.windows(marker.len()).any(|w| w == marker.as_bytes());
    // Stops tcpdump once the file shows `seen` (or after 5 s): a fixed wait could stop it
    // before a starved tcpdump wrote what it had captured.
    let capture = |c: &Cluster, from: &Pod, seen: &dyn Fn(&[u8]) -> bool| -> Result<Vec<u8>> {
        let _ = std::fs::remove_file(&pcap);
        let mut dump = std::process::Command::new("nsenter")
            .args([
                &format!("--net=/run/netns/{node2}"),
                "tcpdump",
                "-i",
                &veth,
                "--immediate-mode",
                "-U",
            ])
            .args(["-w", &pcap.to_string_lossy(), "tcp"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut err = BufReader::new(dump.stderr.take().context("stderr")?);
        let mut line = String::new();
        err.read_line(&mut line)?;
        ensure!(line.contains("listening on"), "tcpdump: {line}");
        let sent = c.run_in(from, &["mark", &target(&p.server), marker, "1000"]);
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            if seen(&std::fs::read(&pcap).unwrap_or_default()) {
                break;
            }
        }
        let _ = sh("kill", &["-INT", &dump.id().to_string()]);
        let _ = dump.wait();
        sent?;
        Ok(std::fs::read(&pcap)?)
    };
    let mesh_wire = capture(&c, &p.client, &|w| w.len() > 20_000)?;
    ensure!(mesh_wire.len() > 20_000, "the capture saw the traffic ({} bytes)", mesh_wire.len());
    ensure!(!contains(&mesh_wire), "the marker crossed the wire in plaintext");
    let plain_wire = capture(&c, &p.legacy, &contains)?;
    ensure!(contains(&plain_wire), "control: plaintext from outside the mesh shows the marker");

    // 1 GiB up (and 1 MiB back), checksummed end to end.
    let out = c.run_in(
        &p.client,
        &["xfer", &target(&p.server), &(1024 * MIB).to_string(), &MIB.to_string(), "11"],
    )?;
    ensure!(out.contains("checksums match"), "{out}");

    // The destination saw the source's SPIFFE identity, over HBONE.
    let entries = c.agent(2).access_entries();
    let big = entries
        .iter()
        .max_by_key(|e| e["bytes_sent"].as_u64().unwrap_or(0))
        .context("no access log entry on node 2")?;
    ensure!(big["bytes_sent"].as_u64().unwrap_or(0) >= 1024 * MIB as u64, "{big}");
    ensure!(big["protocol"] == "HBONE", "{big}");
    ensure!(big["src"]["identity"] == "spiffe://cluster.local/ns/demo/sa/client", "{big}");
    ensure!(big["dst"]["identity"] == "spiffe://cluster.local/ns/demo/sa/server", "{big}");
    ensure!(big["decision"] == "allow", "{big}");
    let n1 = c.agent(1).status()?.counters;
    ensure!(n1.hbone_outbound >= 3, "{n1:?}");
    // A reset by the server crosses both agents and the tunnel (RST_STREAM) as a reset.
    let out = c.run_in(&p.client, &["reset", &target(&p.server)])?;
    ensure!(out.contains("ok reset propagated"), "{out}");
    Ok(())
}

/// A client with its own certificate, run from node 1's namespace (not a pod: it is not
/// captured), talking HBONE to the server pod's agent directly.
mod rogue {
    use super::*;
    use sinew_hbone::{Connect, Pool, PoolKey, tls::Identity};
    use sinew_identity::{Ca, SpiffeId};

    pub fn connect(
        node_netns: &str,
        identity: &Identity,
        server: SocketAddr,
        expected: &str,
        authority: SocketAddr,
    ) -> Result<std::result::Result<(), String>> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let hbone = SocketAddr::new(server.ip(), 15008);
        let tcp = super::connect_from(node_netns, hbone)?;
        rt.block_on(async {
            let tcp = tokio::net::TcpStream::from_std(tcp)?;
            let key = PoolKey {
                source: identity.id().clone(),
                source_ip: "198.18.0.1".parse()?,
                destination: hbone,
                expected: expected.parse()?,
            };
            let req = Connect {
                authority,
                client: "198.18.0.1:1".parse()?,
                baggage: None,
                early: Default::default(),
                optimistic: false,
            };
            let r = Pool::new().connect(&key, identity, req, |_| async { Ok(tcp) }).await;
            Ok(r.map(drop).map_err(|e| e.to_string()))
        })
    }

    pub fn identity(ca: &Ca, id: &str) -> Result<Identity> {
        let id: SpiffeId = id.parse()?;
        let (key, cert) = ca.issue(&id, &[], Duration::from_secs(600))?;
        Ok(Identity::from_pem(&cert, &key, ca.bundle())?)
    }
}

#[test]
fn peers_are_authenticated_and_bad_wire_input_is_refused() -> Result<()> {
    let (mut c, p) = mesh()?;
    let node1 = c.nodes[0].netns.clone();
    let ca = sinew_identity::Ca::load(
        &c.dir().join("ca/ca-cert.pem"),
        &c.dir().join("ca/ca-key.pem"),
        "cluster.local",
    )?;
    let server = SocketAddr::new(p.server.v4(), 8080);
    let server_id = "spiffe://cluster.local/ns/demo/sa/server";
    let good = rogue::identity(&ca, "spiffe://cluster.local/ns/demo/sa/client")?;

    // Positive control: a certificate from the mesh CA gets through.
    let ok = rogue::connect(&node1, &good, server, server_id, server)?;
    ensure!(ok.is_ok(), "{ok:?}");
    // A certificate from another root is refused by the server.
    let other_root = sinew_identity::Ca::generate("cluster.local")?;
    let untrusted = rogue::identity(&other_root, "spiffe://cluster.local/ns/demo/sa/client")?;
    let r = rogue::connect(&node1, &untrusted, server, server_id, server)?;
    ensure!(r.is_err(), "a certificate from an untrusted root was accepted");
    // A destination whose identity is not the expected one is refused by the client.
    let r = rogue::connect(&node1, &good, server, "spiffe://cluster.local/ns/demo/sa/db", server)?;
    let e = r.err().context("an unexpected server identity was accepted")?;
    ensure!(e.contains("sa/server"), "the error names what the server proved: {e}");

    // A CONNECT to an address that is not the pod's: 400.
    let elsewhere: SocketAddr = "198.18.1.10:8080".parse()?;
    let e = rogue::connect(&node1, &good, server, server_id, elsewhere)?.err();
    ensure!(e.as_deref().is_some_and(|e| e.contains("400")), "{e:?}");

    // A CONNECT to a port where nothing listens in the pod: 503.
    let closed = SocketAddr::new(p.server.v4(), 9);
    let e = rogue::connect(&node1, &good, server, server_id, closed)?.err();
    ensure!(e.as_deref().is_some_and(|e| e.contains("503")), "{e:?}");

    // Garbage instead of TLS, from node 1.
    let junk = sh(
        "nsenter",
        &[
            &format!("--net=/run/netns/{node1}"),
            "sh",
            "-c",
            &format!(
                "printf 'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' | timeout 5 curl -s --max-time 5 telnet://{}:15008 >/dev/null; echo done",
                p.server.v4()
            ),
        ],
    )?;
    ensure!(junk.contains("done"), "{junk}");
    // An oversized header block over a real mTLS HTTP/2 connection.
    let oversized = oversized_headers(&node1, &good, server)?;
    ensure!(oversized != Some(200), "an oversized header block was served: {oversized:?}");

    // A flood of connections that never start TLS: past the pod's limit of connections in
    // their handshake the agent resets them at once instead of holding each for 10 s.
    let hbone = SocketAddr::new(p.server.v4(), 15008).to_string();
    // (An earlier step's connection the agent has not yet seen close may hold a permit.)
    let out = c.run_in(&p.legacy, &["flood", &hbone, "140"])?;
    let counts: Vec<usize> = out.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    ensure!(
        matches!(counts[..], [open, closed] if (120..=128).contains(&open) && open + closed == 140),
        "{out}"
    );

    // The flood's permits went with its sockets: a new authenticated connection gets through.
    wait_for("a new mTLS connection after the flood", Duration::from_secs(10), || {
        Ok(rogue::connect(&node1, &good, server, server_id, server)?.is_ok())
    })?;
    ensure!(ping(&c, &p.client, &p.server).is_ok());
    ensure!(c.agent(2).status().is_ok());
    Ok(())
}

/// A non-blocking TCP connection to `addr` made inside network namespace `netns` (setns on a
/// thread of our own, so the test's other threads stay where they are).
fn connect_from(netns: &str, addr: SocketAddr) -> Result<std::net::TcpStream> {
    let netns = std::fs::File::open(format!("/run/netns/{netns}"))?;
    let tcp = std::thread::scope(|s| {
        s.spawn(|| -> Result<std::net::TcpStream> {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))?
    })?;
    tcp.set_nonblocking(true)?;
    Ok(tcp)
}

/// Sends a CONNECT with a 64 KiB header; returns the status if one came back.
fn oversized_headers(
    node_netns: &str,
    identity: &sinew_hbone::tls::Identity,
    server: SocketAddr,
) -> Result<Option<u16>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let hbone = SocketAddr::new(server.ip(), 15008);
    let tcp = connect_from(node_netns, hbone)?;
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        let config =
            identity.client_config(&["spiffe://cluster.local/ns/demo/sa/server".parse()?])?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(sinew_hbone::tls::server_name(hbone), tcp)
            .await?;
        let (send, conn) = h2::client::handshake(tls).await?;
        tokio::spawn(conn);
        let mut send = send.ready().await?;
        let mut req = http::Request::builder().method("CONNECT").uri(server.to_string()).body(())?;
        req.headers_mut().insert("x-big", "a".repeat(64 << 10).parse()?);
        let status = match send.send_request(req, false) {
            Ok((resp, _)) => tokio::time::timeout(Duration::from_secs(5), resp)
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|r| r.status().as_u16()),
            Err(_) => None,
        };
        Ok(status)
    })
}

#[test]
fn deny_allow_and_audit_policies_are_enforced_logged_and_explained() -> Result<()> {
    let (mut c, p) = mesh()?;
    // A live connection from client, then a DENY for its service account.
    let mut held = Held::open(&c, &p.client, &p.server, 30)?;
    c.write_config("policy.yaml", &policy("deny-client", "DENY", "serviceAccounts: [\"client\"]"))?;
    wait_for("the DENY closes the live connection", Duration::from_secs(15), || Ok(held.ended()))?;
    let how = held.outcome()?;
    ensure!(how == "closed reset", "{how}");
    ensure!(ping(&c, &p.client, &p.server).is_err(), "a denied client got through");
    ensure!(ping(&c, &p.other, &p.server).is_ok(), "the DENY must not block other accounts");
    let mut deny_log = None;
    wait_for("the deny decision in the access log", Duration::from_secs(5), || {
        deny_log = c.agent(2).access_entries().into_iter().rev().find(|e| e["decision"] == "deny");
        Ok(deny_log.is_some())
    })?;
    let deny_log = deny_log.context("no deny in the access log")?;
    ensure!(deny_log["policy"] == "demo/deny-client", "{deny_log}");
    ensure!(
        c.agent(2).metric(
            "sinew_authorization_decisions_total",
            &["decision=\"deny\"", "policy=\"demo/deny-client\""]
        )? >= 1.0
    );
    let why = explain(&mut c, 2, "demo/client", &target(&p.server))?;
    ensure!(why["verdict"] == "deny", "{why}");
    ensure!(why.to_string().contains("demo/deny-client"), "{why}");
    let admin =
        c.agent(2).admin_get(&format!("/explain?src=demo/other&dst={}", target(&p.server)))?;
    ensure!(admin.contains("\"verdict\":\"allow\""), "{admin}");
    let counters = c.agent(2).status()?.counters;
    ensure!(counters.closed_by_policy >= 1 && counters.denied >= 1, "{counters:?}");

    // An ALLOW list admits only what it lists.
    c.write_config(
        "policy.yaml",
        &policy("allow-other", "ALLOW", "principals: [\"cluster.local/ns/demo/sa/other\"]"),
    )?;
    wait_for("the ALLOW list is in force", Duration::from_secs(15), || {
        let why = explain(&mut c, 2, "demo/client", &target(&p.server))?;
        Ok(why["verdict"] == "deny"
            && why.to_string().contains("demo/allow-other")
            && !why.to_string().contains("demo/deny-client"))
    })?;
    ensure!(explain(&mut c, 2, "demo/other", &target(&p.server))?["verdict"] == "allow");
    ensure!(ping(&c, &p.other, &p.server).is_ok(), "listed principal refused");
    ensure!(ping(&c, &p.client, &p.server).is_err(), "unlisted principal admitted");
    ensure!(ping(&c, &p.legacy, &p.server).is_err(), "plaintext (no principal) admitted");

    // Conditions (`when`) on the connection's attributes: all must hold.
    c.write_config(
        "policy.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-when, namespace: demo}\nspec:\n  rules:\n  - when:\n    - {key: source.principal, values: [cluster.local/ns/demo/sa/client]}\n    - {key: destination.port, values: [\"8080\"]}\n",
    )?;
    wait_for("the conditions are in force", Duration::from_secs(15), || {
        let why = explain(&mut c, 2, "demo/other", &target(&p.server))?.to_string();
        Ok(why.contains("demo/allow-when") && why.contains("when[0] source.principal"))
    })?;
    ensure!(ping(&c, &p.client, &p.server).is_ok(), "the conditions' principal refused");
    ensure!(ping(&c, &p.other, &p.server).is_err(), "another principal admitted");

    // AUDIT logs the would-be denial and lets the traffic through.
    c.write_config(
        "policy.yaml",
        &policy("audit-client", "AUDIT", "serviceAccounts: [\"client\"]"),
    )?;
    wait_for("the AUDIT policy is in force", Duration::from_secs(15), || {
        let why = explain(&mut c, 2, "demo/client", &target(&p.server))?.to_string();
        Ok(why.contains("demo/audit-client") && !why.contains("demo/allow-when"))
    })?;
    ensure!(ping(&c, &p.client, &p.server).is_ok(), "AUDIT must let the connection through");
    let mut audit = None;
    wait_for("the audit decision in the access log", Duration::from_secs(5), || {
        audit = c.agent(2).access_entries().into_iter().rev().find(|e| e["decision"] == "audit");
        Ok(audit.is_some())
    })?;
    let audit = audit.context("no audit decision in the access log")?;
    ensure!(audit["policy"] == "demo/audit-client", "{audit}");
    ensure!(
        c.agent(2).metric("sinew_authorization_decisions_total", &["decision=\"audit\""])? >= 1.0
    );
    // Istio's metrics carry the decisions' connections too.
    let opened = c.agent(2).metric(
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
            "connection_security_policy=\"mutual_tls\"",
        ],
    )?;
    ensure!(opened >= 3.0, "opened {opened}");
    let denied =
        c.agent(2).metric("istio_tcp_connections_opened_total", &["response_flags=\"DENY\""])?;
    ensure!(denied >= 1.0, "denied {denied}");
    Ok(())
}

#[test]
fn strict_refuses_plaintext_and_permissive_admits_it() -> Result<()> {
    let (mut c, p) = mesh()?;
    // PERMISSIVE (the default): a pod outside the mesh reaches the server in plaintext.
    ensure!(ping(&c, &p.legacy, &p.server).is_ok(), "PERMISSIVE must admit plaintext");
    // A port nothing listens on, over HBONE and in plaintext: both connections fail, and
    // Istio's metrics count them with ztunnel's CONNECT flag on both agents.
    let closed_port = Cluster::target(p.server.v4(), 9);
    for from in [&p.client, &p.legacy] {
        ensure!(c.run_in(from, &["ping", &closed_port, "1"]).is_err(), "port 9 answered");
    }
    let flag = ["response_flags=\"CONNECT\""];
    let mut failed = (0.0, 0.0);
    wait_for("failed connects in the metrics", Duration::from_secs(5), || {
        failed = (
            c.agent(1).metric("istio_tcp_connections_opened_total", &flag)?,
            c.agent(2).metric("istio_tcp_connections_opened_total", &flag)?,
        );
        Ok(failed.0 >= 1.0 && failed.1 >= 2.0)
    })
    .with_context(|| format!("(source, destination) = {failed:?}"))?;
    c.write_config(
        "peerauth.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: demo\nspec:\n  mtls:\n    mode: STRICT\n",
    )?;
    wait_for("STRICT is in force", Duration::from_secs(15), || {
        Ok(ping(&c, &p.legacy, &p.server).is_err())
    })?;
    ensure!(ping(&c, &p.client, &p.server).is_ok(), "mTLS traffic must pass under STRICT");
    // The node's health probes, from the source its CNI gives them (istio-cni's address,
    // which agent 2 trusts), still reach the pod; the node's own address is not trusted
    // (forwarded NodePort traffic can come from it) and is refused like any plaintext.
    let probe = c.run_on_node(p.server.node, &["ping", &target(&p.server), "1", PROBE_SOURCE]);
    ensure!(probe.is_ok(), "a probe from the trusted source under STRICT: {probe:?}");
    let node = c.run_on_node(p.server.node, &["ping", &target(&p.server), "1"]);
    ensure!(node.is_err(), "plaintext from the node's own address passed under STRICT");
    // A port of the server's scraped in plaintext, Istio's way: `portLevelMtls` on a policy
    // selecting the server makes that workload port PERMISSIVE; the others stay STRICT.
    c.serve(&p.server, &[9090])?;
    c.write_config(
        "peerauth-ports.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: server-metrics\n  namespace: demo\nspec:\n  selector:\n    matchLabels: {app: server}\n  portLevelMtls:\n    9090: {mode: PERMISSIVE}\n",
    )?;
    let metrics_port = Cluster::target(p.server.v4(), 9090);
    let plain_9090 = |c: &Cluster| c.run_in(&p.legacy, &["ping", &metrics_port, "1"]).is_ok();
    wait_for("port 9090 PERMISSIVE", Duration::from_secs(15), || Ok(plain_9090(&c)))?;
    ensure!(ping(&c, &p.legacy, &p.server).is_err(), "port 8080 must stay STRICT");
    c.remove_config("peerauth-ports.yaml")?;
    wait_for("port 9090 STRICT again", Duration::from_secs(15), || Ok(!plain_9090(&c)))?;
    c.write_config(
        "peerauth.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: demo\nspec:\n  mtls:\n    mode: PERMISSIVE\n",
    )?;
    wait_for("PERMISSIVE again", Duration::from_secs(15), || {
        Ok(ping(&c, &p.legacy, &p.server).is_ok())
    })?;
    Ok(())
}

#[test]
fn connections_keep_working_on_cached_state_while_control_is_down() -> Result<()> {
    let (mut c, p) = mesh()?;
    let held = Held::open(&c, &p.client, &p.server, 4)?;
    c.stop_control();
    ensure!(ping(&c, &p.client, &p.server).is_ok(), "new connection with control down");
    ensure!(held.outcome()? == "still open", "the live connection must survive control going away");
    // Even an agent restarted while control is down serves from its caches.
    c.agent(1).restart()?;
    wait_for("restarted agent serves from cache", Duration::from_secs(20), || {
        Ok(ping(&c, &p.client, &p.server).is_ok())
    })?;
    let out = c.run_in(
        &p.client,
        &["xfer", &target(&p.server), &MIB.to_string(), &MIB.to_string(), "3"],
    )?;
    ensure!(out.contains("checksums match"), "{out}");
    c.restart_control()?;
    ensure!(ping(&c, &p.client, &p.server).is_ok());
    Ok(())
}

#[test]
fn a_thousand_connections_share_pooled_hbone_connections() -> Result<()> {
    let (mut c, p) = mesh()?;
    let before = c.agent(1).status()?.counters;
    let out = c.run_in(&p.client, &["many", &target(&p.server), "1000"])?;
    ensure!(out.contains("ok 1000"), "{out}");
    let after = c.agent(1).status()?.counters;
    let streams = after.hbone_outbound - before.hbone_outbound;
    let tls = after.hbone_connections_opened;
    println!("1000 connections carried over {tls} TLS connections ({streams} HBONE streams)");
    ensure!(streams == 1000, "{streams} streams");
    ensure!(tls <= 12, "{tls} TLS connections for 1000 streams: pooling is not working");
    Ok(())
}

#[test]
fn service_vips_resolve_to_mesh_endpoints() -> Result<()> {
    let (mut c, p) = mesh()?;
    c.write_config(
        "service.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: server\n  namespace: demo\nspec:\n  clusterIPs: [\"198.18.200.10\"]\n  ports:\n  - port: 80\n    targetPort: 8080\n  selector:\n    app: server\n",
    )?;
    let vip = "198.18.200.10:80";
    wait_for("the service is known", Duration::from_secs(15), || {
        Ok(explain(&mut c, 1, "demo/client", vip).is_ok_and(|v| v["service"] == "demo/server"))
    })?;
    // The client dials the VIP (and getpeername shows it); the server pod is reached over HBONE.
    let out = c.run_in(&p.client, &["xfer", vip, &MIB.to_string(), &MIB.to_string(), "5"])?;
    ensure!(out.contains("checksums match"), "{out}");
    let mut entry = None;
    wait_for("the outbound access-log line", Duration::from_secs(5), || {
        entry = c
            .agent(1)
            .access_entries()
            .into_iter()
            .rev()
            .find(|e| e["dst"]["service"] == "server.demo.svc.cluster.local");
        Ok(entry.is_some())
    })?;
    let e = entry.context("no access-log line for the service")?;
    ensure!(e["protocol"] == "HBONE" && e["dst"]["addr"] == target(&p.server), "{e}");
    // Both agents name the service by its hostname, as ztunnel does; the destination guesses
    // it from the endpoint and port the connection arrived on.
    for (node, reporter) in [(1, "source"), (2, "destination")] {
        let mut n = 0.0;
        wait_for("the service in the metrics", Duration::from_secs(5), || {
            n = c.agent(node).metric(
                "istio_tcp_connections_closed_total",
                &[
                    &format!("reporter=\"{reporter}\""),
                    "destination_service=\"server.demo.svc.cluster.local\"",
                    "destination_canonical_service=\"server\"",
                ],
            )?;
            Ok(n >= 1.0)
        })
        .with_context(|| format!("{reporter}: {n}"))?;
    }
    Ok(())
}

#[test]
fn a_destination_without_a_workload_is_refused_while_policies_select_by_label() -> Result<()> {
    let (mut c, p) = mesh()?;
    // An ALLOW for the server's label admits the client...
    c.write_config(
        "policy.yaml",
        &policy("allow-client", "ALLOW", "principals: [\"cluster.local/ns/demo/sa/client\"]"),
    )?;
    wait_for("the ALLOW is in force", Duration::from_secs(15), || {
        Ok(ping(&c, &p.other, &p.server).is_err())
    })?;
    ensure!(ping(&c, &p.client, &p.server).is_ok());
    // ...but once no Workload carries the server's address, its labels are unknown: the
    // selector cannot be decided, and the connection is refused (it was let through, the
    // selected policies skipped).
    c.remove_config("workload-server.yaml")?;
    // Until the refusal names the missing Workload: a ping can also fail because the policy
    // re-check closed it mid-way, or be refused by an agent that has not seen the change yet.
    let mut entries = Vec::new();
    wait_for("the unknown destination refused", Duration::from_secs(15), || {
        let refused =
            ping(&c, &p.other, &p.server).is_err() && ping(&c, &p.client, &p.server).is_err();
        entries = c.agent(2).access_entries();
        let named = entries
            .iter()
            .any(|e| e["reason"].as_str().is_some_and(|r| r.contains("has no Workload")));
        Ok(refused && named)
    })
    .with_context(|| format!("no refusal naming the missing Workload in {entries:?}"))?;
    Ok(())
}

#[test]
fn an_agent_restarted_without_any_configuration_keeps_its_pods_closed() -> Result<()> {
    let (mut c, p) = mesh()?;
    let late = c.add_pod_as(2, "late", "demo", "late")?;
    // A fresh start with control away and no cache: the agent knows no namespace in the mesh.
    c.agent(2).kill();
    c.stop_control();
    let cache = c.agent(2).state_dir.join("control");
    std::fs::remove_dir_all(&cache).with_context(|| format!("removing {}", cache.display()))?;
    c.agent(2).restart()?;
    ensure!(c.agent(2).log_text().contains("starting without it"), "{}", c.agent(2).log_text());
    // Its pods stay pinned and fail closed instead of being opened to plaintext.
    ensure!(c.pod_has_links(&p.server)?, "pins released while the agent had no configuration");
    ensure!(ping(&c, &p.legacy, &p.server).is_err(), "the server was reachable around the mesh");
    // A new pod cannot be judged yet: refused, for the CNI plugin to retry.
    let err = c.agent(2).enroll(&late).unwrap_err();
    ensure!(format!("{err:#}").contains("no configuration yet"), "{err:#}");
    // So it is not ready either (a readiness probe must not pass).
    let ready = c.agent(2).admin_get("/ready")?;
    ensure!(ready.contains("no configuration from control yet"), "ready without it: {ready}");
    // Once control answers, the pod is captured again.
    c.restart_control()?;
    wait_for("the server captured again", Duration::from_secs(30), || {
        Ok(c.agent(2).status()?.pods.iter().any(|s| s.spec.name == "server" && s.captured))
    })?;
    wait_for("client reaches server", Duration::from_secs(20), || {
        Ok(ping(&c, &p.client, &p.server).is_ok())
    })?;
    ensure!(c.agent(2).enroll(&late)?.captured, "the retried enroll");
    let ready = c.agent(2).admin_get("/ready")?;
    ensure!(ready.trim() == "ready", "not ready once configured: {ready}");
    Ok(())
}

#[test]
fn a_stopping_agent_lets_open_connections_finish_and_refuses_new_ones() -> Result<()> {
    let (mut c, p) = mesh()?;
    // A 2 s upload through both agents, under way when node 1's agent is told to stop.
    let upload = p
        .client
        .command(&c.binary("sinew-testapp"), &["sink", &target(&p.server), "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(700));
    c.agent(1).terminate()?;
    std::thread::sleep(Duration::from_millis(300));
    // Draining: a new connection is refused, the agent stays for the open one...
    ensure!(ping(&c, &p.client, &p.server).is_err(), "a new connection was taken while draining");
    ensure!(!c.agent(1).exited_within(Duration::ZERO)?, "the agent left with a connection open");
    let ready = c.agent(1).admin_get("/ready")?;
    ensure!(ready.trim() == "stopping", "a draining agent's /ready: {ready}");
    // ...which finishes whole.
    let out = upload.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "the upload under way was cut: {err}");
    // Then it goes, well before its 20 s limit.
    ensure!(c.agent(1).exited_within(Duration::from_secs(5))?, "no exit once drained");

    // A connection still open when a (1 s) drain ends is reset, not closed: a close could
    // pass for a whole answer.
    c.start_agent_with(1, &["--drain-timeout", "1s"])?;
    wait_for("the restarted agent serves", Duration::from_secs(20), || {
        Ok(ping(&c, &p.client, &p.server).is_ok())
    })?;
    let mut held = p
        .client
        .command(&c.binary("sinew-testapp"), &["hold", &target(&p.server), "15"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut out = std::io::BufReader::new(held.stdout.take().context("hold stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    ensure!(line.trim() == "open", "hold: {line}");
    c.agent(1).terminate()?;
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    ensure!(line.trim() == "closed reset", "a connection past the drain: {line}");
    let _ = held.wait();
    ensure!(c.agent(1).exited_within(Duration::from_secs(5))?, "no exit after the drain limit");
    Ok(())
}
