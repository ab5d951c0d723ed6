//! The real `sinew-control` process: flags, readiness, metrics, clients and config dump,
//! read with curl as an operator would.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sinew_control_client::{ClientConfig, start_config};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn curl(url: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "2", url])
        .output()
        .expect("curl is installed by cargo xtask");
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn the_binary_serves_readiness_metrics_clients_and_a_config_dump() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("ns.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\napiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\nspec: {ports: []}\n").unwrap();
    std::fs::write(dir.path().join("tokens"), "node-1 node-1-token-0123456789\n").unwrap();
    let (grpc, admin) = (free_port(), free_port());
    let _control = Proc(
        Command::new(env!("CARGO_BIN_EXE_sinew-control"))
            .arg("--config-dir")
            .arg(&config)
            .arg("--ca-dir")
            .arg(dir.path().join("ca"))
            .arg("--tokens")
            .arg(dir.path().join("tokens"))
            .args([
                "--listen",
                &format!("127.0.0.1:{grpc}"),
                "--admin",
                &format!("127.0.0.1:{admin}"),
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{admin}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while curl(&format!("{base}/ready")).is_none() {
        assert!(Instant::now() < deadline, "sinew-control never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // TLS by default: the client trusts the root the control service generated.
    let roots = std::fs::read_to_string(dir.path().join("ca/ca-cert.pem")).unwrap();
    let (rx, task) = start_config(ClientConfig {
        endpoint: format!("https://127.0.0.1:{grpc}"),
        name: "node-1".into(),
        role: "agent".into(),
        cache_dir: dir.path().join("cache"),
        credentials: sinew_control_client::Credentials {
            token: Some("node-1-token-0123456789".into()),
            token_file: None,
            tls: Some(sinew_control_client::ClientTls::new(roots, None)),
        },
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rx.borrow().resources.contains_key("Namespace/shop") {
        assert!(Instant::now() < deadline, "no configuration received");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut clients = String::new();
    while !clients.contains("\"acks\":1") {
        assert!(Instant::now() < deadline, "the client's ACK never showed: {clients}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        clients = curl(&format!("{base}/clients")).unwrap();
    }
    let clients: serde_json::Value = serde_json::from_str(&clients).unwrap();
    assert_eq!(clients[0]["name"], "node-1");
    assert_eq!(clients[0]["acks"], 1);

    let metrics = curl(&format!("{base}/metrics")).unwrap();
    for line in [
        "sinew_control_clients 1",
        "sinew_control_config_errors 1",
        "sinew_control_acks_total 1",
        "sinew_control_resources 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line:?} missing from\n{metrics}");
    }
    let dump: serde_json::Value =
        serde_json::from_str(&curl(&format!("{base}/config_dump")).unwrap()).unwrap();
    assert_eq!(dump["resources"]["Namespace/shop"]["resource"]["kind"], "Namespace");
    let errors = dump["errors"][0].as_str().unwrap();
    assert!(
        errors.contains("ns.yaml: Service/shop/bad: spec.ports: a service needs at least one port"),
        "{errors}"
    );
    task.abort();
}

#[test]
fn a_certificate_lifetime_out_of_range_is_refused_naming_the_flag() {
    for ttl in ["0", "1", "99999999999"] {
        let out = Command::new(env!("CARGO_BIN_EXE_sinew-control"))
            .args(["--cert-ttl-secs", ttl, "--config-dir", "/nonexistent"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--cert-ttl-secs {ttl} was accepted");
        assert!(err.contains(&format!("--cert-ttl-secs {ttl}: must be between 2 and")), "{err}");
    }
}
