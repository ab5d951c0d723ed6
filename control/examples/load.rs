//! Load generator for `cargo xtask bench control`: many lightweight discovery clients over a
//! few shared connections, through the real gRPC server. Clients count and ACK what they
//! receive without validating it, so the figures are the server's.
//!
//! usage: load ENDPOINT ROOTS_PEM CLIENTS CONNECTIONS EXPECTED_RESOURCES POLICY_FILE NEW_POLICY_FILE
//! Client i authenticates with the token `node-<i>-token-0123456789` over TLS.
//! Prints one JSON line: initial_sync_ms and the push latency percentiles.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sinew_api::{ClientInfo, DiscoveryRequest, discovery_client::DiscoveryClient};
use tokio::sync::{mpsc, watch};

/// The resource whose change is timed.
const POLICY_KEY: &str = "AuthorizationPolicy/ns-0/bench";

struct Shared {
    synced: AtomicUsize,
    changed_at: watch::Receiver<Option<Instant>>,
    push_ms: Mutex<Vec<f64>>,
}

async fn client(
    i: usize,
    channel: tonic::transport::Channel,
    expected: usize,
    shared: Arc<Shared>,
) -> Result<()> {
    let (tx, rx) = mpsc::channel(4);
    let hello = ClientInfo { name: format!("node-{i}"), role: "agent".into() };
    tx.send(DiscoveryRequest { client: Some(hello), ..Default::default() }).await?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert(sinew_api::AUTHORIZATION, format!("Bearer node-{i}-token-0123456789").parse()?);
    let mut stream = DiscoveryClient::new(channel).stream(request).await?.into_inner();
    let mut received = 0;
    while let Some(resp) = stream.message().await? {
        let changed_at = *shared.changed_at.borrow();
        if received < expected {
            received += resp.resources.len();
            if received >= expected {
                shared.synced.fetch_add(1, Ordering::Relaxed);
            }
        } else if let Some(t0) = changed_at
            && resp.resources.iter().any(|r| r.key == POLICY_KEY)
        {
            shared.push_ms.lock().expect("lock").push(t0.elapsed().as_secs_f64() * 1e3);
        }
        tx.send(DiscoveryRequest { response_nonce: resp.nonce, ..Default::default() }).await?;
    }
    Ok(())
}

async fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [endpoint, roots, clients, connections, expected, policy_file, new_policy] = a.as_slice()
    else {
        bail!(
            "usage: load ENDPOINT ROOTS_PEM CLIENTS CONNECTIONS EXPECTED POLICY_FILE NEW_POLICY_FILE"
        );
    };
    let roots = std::fs::read_to_string(roots).context("reading the roots")?;
    let (clients, connections, expected): (usize, usize, usize) =
        (clients.parse()?, connections.parse()?, expected.parse()?);
    let new_policy = std::fs::read_to_string(new_policy).context("reading the new policy")?;
    let mut channels = Vec::new();
    for _ in 0..connections {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&roots))
            .domain_name("sinew-control");
        let endpoint =
            tonic::transport::Endpoint::from_shared(endpoint.clone())?.tls_config(tls)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        channels.push(loop {
            match endpoint.connect().await {
                Ok(ch) => break ch,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => return Err(e.into()),
            }
        });
    }
    let (changed_tx, changed_rx) = watch::channel(None);
    let shared = Arc::new(Shared {
        synced: AtomicUsize::new(0),
        changed_at: changed_rx,
        push_ms: Mutex::default(),
    });
    let start = Instant::now();
    for i in 0..clients {
        let (ch, shared) = (channels[i % connections].clone(), shared.clone());
        tokio::spawn(async move {
            if let Err(e) = client(i, ch, expected, shared).await {
                eprintln!("client {i}: {e:#}");
            }
        });
    }
    wait("every client's initial sync", Duration::from_secs(300), || {
        shared.synced.load(Ordering::Relaxed) == clients
    })
    .await?;
    let initial_sync_ms = start.elapsed().as_secs_f64() * 1e3;
    tokio::time::sleep(Duration::from_millis(500)).await;
    changed_tx.send_replace(Some(Instant::now()));
    std::fs::write(policy_file, new_policy)?;
    wait("every client to receive the change", Duration::from_secs(60), || {
        shared.push_ms.lock().expect("lock").len() == clients
    })
    .await?;
    let mut push = shared.push_ms.lock().expect("lock").clone();
    push.sort_by(f64::total_cmp);
    let pct = |q: f64| push[((push.len() as f64 - 1.0) * q) as usize];
    println!(
        "{{\"initial_sync_ms\": {initial_sync_ms:.1}, \"push_ms_p50\": {:.1}, \"push_ms_p99\": {:.1}, \"push_ms_max\": {:.1}}}",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}
