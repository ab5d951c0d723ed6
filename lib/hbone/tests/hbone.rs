//! HBONE over loopback: real TLS, real HTTP/2, both ends of this crate.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::StatusCode;
use sinew_hbone::{
    Connect, HboneError, Inbound, Pool, PoolKey, serve_connection, serve_connection_until,
    tls::Identity,
};
use sinew_identity::{Ca, SpiffeId};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

const TD: &str = "cluster.local";

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

fn identity(ca: &Ca, id: &SpiffeId) -> Identity {
    let (key, cert) = ca.issue(id, &[], Duration::from_secs(3600)).unwrap();
    Identity::from_pem(&cert, &key, ca.bundle()).unwrap()
}

/// What the server saw of each CONNECT.
#[derive(Debug)]
struct Seen {
    peer: SpiffeId,
    authority: SocketAddr,
    forwarded: Option<SocketAddr>,
    traceparent: bool,
}

/// An HBONE server on loopback with `identity`, serving every connection with `handler`.
async fn serve_all<F, Fut>(identity: Identity, handler: F) -> SocketAddr
where
    F: Fn(Inbound) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = identity.server_config().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            tokio::spawn(serve_connection(tcp, peer, config.clone(), handler.clone()));
        }
    });
    addr
}

/// An HBONE server whose CONNECTs to port 401 are refused with 401 and others echo.
async fn server(identity: Identity) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = serve_all(identity, move |inbound: Inbound| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(Seen {
                peer: (*inbound.peer).clone(),
                authority: inbound.authority,
                forwarded: inbound.forwarded_for(),
                traceparent: inbound.headers.contains_key("traceparent"),
            });
            if inbound.authority.port() == 401 {
                return inbound.refuse(StatusCode::UNAUTHORIZED);
            }
            if inbound.authority.port() == 408 {
                // Never answers.
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                return drop(inbound);
            }
            echo(inbound).await;
        }
    })
    .await;
    (addr, rx)
}

/// Accepts the tunnel and echoes until the client half-closes, then answers "bye" and closes.
async fn echo(inbound: Inbound) {
    let Ok(mut stream) = inbound.accept() else { return };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = stream.write_all(b"bye").await;
    let _ = stream.shutdown().await;
}

fn key(source: &SpiffeId, dest: SocketAddr, expected: &SpiffeId) -> PoolKey {
    PoolKey {
        source: source.clone(),
        source_ip: "127.0.0.1".parse().unwrap(),
        destination: dest,
        expected: expected.clone(),
    }
}

fn req(port: u16) -> Connect<'static> {
    Connect {
        authority: SocketAddr::from(([198, 18, 1, 10], port)),
        client: "198.18.1.11:40000".parse().unwrap(),
        baggage: Some("k8s.namespace.name=shop"),
        early: Bytes::new(),
        optimistic: false,
    }
}

async fn dial(addr: SocketAddr) -> std::io::Result<TcpStream> {
    TcpStream::connect(addr).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_carries_bytes_both_ways_with_half_close_and_identities() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let (addr, mut seen) = server(identity(&ca, &server_id)).await;
    let pool = Pool::new();
    let mut s = pool
        .connect(&key(&client_id, addr, &server_id), &identity(&ca, &client_id), req(8080), dial)
        .await
        .unwrap();
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(&mut s);
    let sent = payload.clone();
    let writer = async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let reader = async move {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(writer, reader);
    assert_eq!(got.len(), payload.len() + 3);
    assert!(got[..payload.len()] == payload[..], "echo differs");
    assert_eq!(&got[payload.len()..], b"bye");
    let seen = seen.recv().await.unwrap();
    assert_eq!(seen.peer, client_id);
    assert_eq!(seen.authority, req(8080).authority);
    assert_eq!(seen.forwarded, Some(req(8080).client));
    assert!(seen.traceparent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_their_status() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let (addr, _seen) = server(identity(&ca, &server_id)).await;
    let pool = Pool::new();
    let client = identity(&ca, &client_id);
    let err = pool
        .connect(&key(&client_id, addr, &server_id), &client, req(401), dial)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, HboneError::Refused { status: StatusCode::UNAUTHORIZED, .. }), "{err}");
    // The connection stays usable for the next stream.
    let ok = pool.connect(&key(&client_id, addr, &server_id), &client, req(80), dial).await;
    assert!(ok.is_ok());
    assert_eq!(pool.stats().opened, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_connect_times_out_and_retires_its_connection() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let (addr, _seen) = server(identity(&ca, &server_id)).await;
    let pool = Pool::new();
    let started = std::time::Instant::now();
    let err = pool
        .connect(&key(&client_id, addr, &server_id), &identity(&ca, &client_id), req(408), dial)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, HboneError::Timeout { what: "CONNECT", .. }), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    // The stuck connection is not handed out again: the next stream gets a new one.
    let ok = pool
        .connect(&key(&client_id, addr, &server_id), &identity(&ca, &client_id), req(80), dial)
        .await;
    assert!(ok.is_ok());
    assert_eq!(pool.stats().opened, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optimistic_stream_s_unanswered_connect_times_out_and_retires_its_connection() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let (addr, _seen) = server(identity(&ca, &server_id)).await;
    let (pool, me) = (Pool::new(), identity(&ca, &client_id));
    let k = key(&client_id, addr, &server_id);
    let started = std::time::Instant::now();
    let optimistic = Connect { optimistic: true, ..req(408) };
    let mut s = pool.connect(&k, &me, optimistic, dial).await.unwrap();
    let err = s.answered().await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(s.answer_failed());
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    // The same failure again, not a second poll of h2's finished response.
    assert_eq!(s.answered().await.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
    // The stuck connection is not handed out again: the next stream gets a new one.
    assert!(pool.connect(&k, &me, req(80), dial).await.is_ok());
    assert_eq!(pool.stats().opened, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_bytes_ride_with_the_request_and_die_with_a_refusal() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let (addr, _seen) = server(identity(&ca, &server_id)).await;
    let (pool, me) = (Pool::new(), identity(&ca, &client_id));
    let key = key(&client_id, addr, &server_id);
    let early = |port| Connect { early: Bytes::from_static(b"early "), ..req(port) };
    // Accepted: the early bytes come first, then what is written on the stream.
    let mut s = pool.connect(&key, &me, early(8080), dial).await.unwrap();
    s.write_all(b"late").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"early latebye");
    drop(s);
    // Refused: the status comes back and the connection carries the next tunnel.
    let err = pool.connect(&key, &me, early(401), dial).await.err().unwrap();
    assert!(matches!(err, HboneError::Refused { status: StatusCode::UNAUTHORIZED, .. }), "{err}");
    let mut s = pool.connect(&key, &me, early(80), dial).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"early bye");
    assert_eq!(pool.stats().opened, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_refuses_a_server_with_another_identity() {
    let ca = Ca::generate(TD).unwrap();
    let client_id = id("shop", "client");
    let (addr, _seen) = server(identity(&ca, &id("shop", "impostor"))).await;
    let err = Pool::new()
        .connect(
            &key(&client_id, addr, &id("shop", "server")),
            &identity(&ca, &client_id),
            req(80),
            dial,
        )
        .await
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(matches!(err, HboneError::Tls { .. }), "{text}");
    assert!(text.contains("impostor"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_roots_are_refused_both_ways() {
    let (ours, theirs) = (Ca::generate(TD).unwrap(), Ca::generate(TD).unwrap());
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let (addr, mut seen) = server(identity(&ours, &server_id)).await;
    // A client whose certificate comes from another root.
    let rogue = identity(&theirs, &client_id);
    let err = Pool::new()
        .connect(&key(&client_id, addr, &server_id), &rogue, req(80), dial)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, HboneError::Tls { .. } | HboneError::H2 { .. }), "{err}");
    // A server from another root, for a client that trusts only ours.
    let (rogue_addr, _) = server(identity(&theirs, &server_id)).await;
    let err = Pool::new()
        .connect(
            &key(&client_id, rogue_addr, &server_id),
            &identity(&ours, &client_id),
            req(80),
            dial,
        )
        .await
        .err()
        .unwrap();
    assert!(matches!(err, HboneError::Tls { .. }), "{err}");
    assert!(seen.try_recv().is_err(), "no CONNECT may reach the handler");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_share_pooled_connections() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let (addr, _seen) = server(identity(&ca, &server_id)).await;
    let pool = Pool::new();
    let client = identity(&ca, &client_id);
    let k = key(&client_id, addr, &server_id);
    let mut tasks = Vec::new();
    for i in 0..250u32 {
        let (pool, client, k) = (pool.clone(), client.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = pool.connect(&k, &client, req(80), dial).await.unwrap();
            s.write_all(&i.to_be_bytes()).await.unwrap();
            let mut back = [0u8; 4];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(back, i.to_be_bytes());
            // Hold every stream open until all are.
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, b"bye");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = pool.stats();
    assert_eq!(stats.streams, 250);
    assert_eq!(stats.opened, 3, "100 streams per connection: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_wire_input_is_refused_and_the_server_keeps_serving() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let (addr, _seen) = server(identity(&ca, &server_id)).await;
    // Garbage instead of a TLS ClientHello: the server drops the connection.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut buf)).await.unwrap();
    assert!(!buf.starts_with(b"HTTP/1.1 200"), "garbage must not be answered as HTTP");

    // Over a real mTLS HTTP/2 connection: a GET, and a CONNECT whose authority is a name.
    let client = identity(&ca, &client_id);
    let tls = tokio_rustls::TlsConnector::from(
        client.client_config(std::slice::from_ref(&server_id)).unwrap(),
    )
    .connect(sinew_hbone::tls::server_name(addr), TcpStream::connect(addr).await.unwrap())
    .await
    .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    for (method, uri) in [("GET", "http://198.18.1.10:80/"), ("CONNECT", "example.com:80")] {
        let request = http::Request::builder().method(method).uri(uri).body(()).unwrap();
        let (resp, _) = send.send_request(request, true).unwrap();
        assert_eq!(resp.await.unwrap().status(), StatusCode::BAD_REQUEST, "{method} {uri}");
        send = send.ready().await.unwrap();
    }
    // An oversized header block: refused, not served.
    let mut request =
        http::Request::builder().method("CONNECT").uri("198.18.1.10:80").body(()).unwrap();
    request.headers_mut().insert("x-big", "a".repeat(64 << 10).parse().unwrap());
    let outcome = match send.send_request(request, false) {
        Ok((resp, _)) => resp.await.map(|r| r.status()),
        Err(e) => Err(e),
    };
    assert!(!matches!(outcome, Ok(StatusCode::OK)), "{outcome:?}");

    // And a well-behaved client is still served.
    let pool = Pool::new();
    let mut s =
        pool.connect(&key(&client_id, addr, &server_id), &client, req(80), dial).await.unwrap();
    s.write_all(b"hi").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"hibye");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_resets_the_peer() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = identity(&ca, &server_id).server_config().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        let _ = serve_connection(tcp, peer, config, move |inbound: Inbound| {
            let tx = tx.clone();
            async move {
                let mut s = inbound.accept().unwrap();
                let mut buf = [0u8; 16];
                let r = s.read(&mut buf).await;
                let _ = tx.send(r.map_err(|e| e.kind()));
            }
        })
        .await;
    });
    let pool = Pool::new();
    let s = pool
        .connect(&key(&client_id, addr, &server_id), &identity(&ca, &client_id), req(80), dial)
        .await
        .unwrap();
    drop(s);
    let r = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
    assert_eq!(r, Err(std::io::ErrorKind::ConnectionReset));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_or_expired_certificates_get_new_connections() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    // The server's certificate lives 3 s.
    let (key_pem, cert) = ca.issue(&server_id, &[], Duration::from_secs(3)).unwrap();
    let short = Identity::from_pem(&cert, &key_pem, ca.bundle()).unwrap();
    let (addr, _seen) = server(short).await;
    let pool = Pool::new();
    let k = key(&client_id, addr, &server_id);
    let first = identity(&ca, &client_id);
    drop(pool.connect(&k, &first, req(80), dial).await.unwrap());
    drop(pool.connect(&k, &first, req(80), dial).await.unwrap());
    assert_eq!(pool.stats().opened, 1, "the same certificate shares the connection");
    // A renewed client certificate: new streams go on a connection made with it.
    let renewed = identity(&ca, &client_id);
    drop(pool.connect(&k, &renewed, req(80), dial).await.unwrap());
    assert_eq!(pool.stats().opened, 2);
    // Past the server certificate's expiry no pooled connection is used: a new handshake
    // is needed, and it refuses the expired certificate. (Certificate times have whole
    // seconds, and webpki counts the last second as valid: a full second past 3 s.)
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let err = pool.connect(&k, &renewed, req(80), dial).await.err().unwrap();
    assert!(matches!(err, HboneError::Tls { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_waiting_on_a_failing_dial_share_its_failure() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let pool = Pool::new();
    let client = identity(&ca, &client_id);
    let k = key(&client_id, "127.0.0.1:9".parse().unwrap(), &server_id);
    // A destination that takes 500 ms to fail each connect.
    let slow_failure = |_: SocketAddr| async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        Err::<TcpStream, _>(std::io::Error::other("no route to host"))
    };
    let started = std::time::Instant::now();
    let tries: Vec<_> = (0..5)
        .map(|_| {
            let (pool, client, k) = (pool.clone(), client.clone(), k.clone());
            tokio::spawn(async move { pool.connect(&k, &client, req(80), slow_failure).await })
        })
        .collect();
    let (mut shared, mut dialled) = (0, 0);
    for t in tries {
        match t.await.unwrap().err().unwrap() {
            HboneError::Connect { .. } => dialled += 1,
            HboneError::DialFailed { reason, .. } => {
                assert!(reason.contains("no route to host"), "{reason}");
                shared += 1;
            }
            other => panic!("{other}"),
        }
    }
    // One dial shared by those waiting on it, not five in turn (2.5 s). A task that starts
    // only after that dial failed (a loaded machine) dials once more itself.
    assert!(dialled <= 2 && shared + dialled == 5, "{dialled} dialled, {shared} shared");
    assert!(started.elapsed() < Duration::from_millis(2000), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_finishes_open_streams_and_takes_no_new_ones() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let config = identity(&ca, &server_id).server_config().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    // The first connection drains on the signal; later ones never do.
    tokio::spawn(async move {
        let mut drain_rx = Some(drain_rx);
        loop {
            let (tcp, peer) = listener.accept().await.unwrap();
            let (drain_rx, config) = (drain_rx.take(), config.clone());
            tokio::spawn(async move {
                let drain = async move {
                    match drain_rx {
                        Some(rx) => drop(rx.await),
                        None => std::future::pending().await,
                    }
                };
                let ping = sinew_hbone::PING_INTERVAL;
                let _ = serve_connection_until(tcp, peer, config, (), drain, ping, echo).await;
            });
        }
    });
    let pool = Pool::new();
    let client = identity(&ca, &client_id);
    let k = key(&client_id, addr, &server_id);
    let mut open = pool.connect(&k, &client, req(80), dial).await.unwrap();
    drain_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The open stream still works to its end...
    open.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"bye");
    drop(open);
    // ...while a new stream goes on a new connection (without the drain it would reuse the
    // idle first one).
    drop(pool.connect(&k, &client, req(80), dial).await.unwrap());
    assert_eq!(pool.stats().opened, 2);
}

/// A TCP relay to `server` for the pool to dial through. Bumping the returned counter
/// freezes the connections relayed so far: they stay open but carry nothing more, as a peer
/// that was cut off or crashed without a FIN; later connections relay normally.
async fn freezable_relay(server: SocketAddr) -> (SocketAddr, tokio::sync::watch::Sender<u32>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (freeze, watch) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            let (mut a, _) = listener.accept().await.unwrap();
            let mut watch = watch.clone();
            let born = *watch.borrow();
            tokio::spawn(async move {
                let mut b = TcpStream::connect(server).await.unwrap();
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                    _ = async { watch.wait_for(|g| *g > born).await.is_ok() } => std::future::pending().await,
                }
            });
        }
    });
    (addr, freeze)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_pings_go_unanswered_closes_and_resets_its_streams() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let (server_addr, _seen) = server(identity(&ca, &server_id)).await;
    let (relay, freeze) = freezable_relay(server_addr).await;
    let pool = Pool::new().with_ping_interval(Duration::from_millis(200));
    let client = identity(&ca, &client_id);
    let k = key(&client_id, relay, &server_id);
    let mut open = pool.connect(&k, &client, req(80), dial).await.unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    open.read_exact(&mut back).await.unwrap();
    // Answered pings keep an idle-looking connection open.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(pool.stats().open, 1);
    freeze.send(1).unwrap();
    // The peer goes silent without a FIN: the stream ends within two intervals instead of
    // waiting forever.
    let read = tokio::time::timeout(Duration::from_secs(3), open.read(&mut back)).await;
    assert!(matches!(read, Ok(Err(_)) | Ok(Ok(0))), "the stream still hangs: {read:?}");
    assert_eq!(pool.stats().open, 0);
    // New streams go on a new connection.
    let mut again = pool.connect(&k, &client, req(80), dial).await.unwrap();
    again.write_all(b"pong").await.unwrap();
    again.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"pong");
    assert_eq!(pool.stats().opened, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copying_tells_progress_while_the_connection_lives() {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let (addr, _seen) = server(identity(&ca, &server_id)).await;
    let pool = Pool::new();
    let mut tunnel = pool
        .connect(&key(&client_id, addr, &server_id), &identity(&ca, &client_id), req(80), dial)
        .await
        .unwrap();
    // An application socket pair: the tunnel copies to and from one end.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut app = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (mut end, _) = listener.accept().await.unwrap();
    let moved = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let m = moved.clone();
    let copying = tokio::spawn(async move {
        let progress = |to: u64, from: u64| {
            m[0].fetch_add(to, Ordering::Relaxed);
            m[1].fetch_add(from, Ordering::Relaxed);
        };
        tunnel.copy_tcp(&mut end, &progress).await
    });
    app.write_all(&[7u8; 100]).await.unwrap();
    let mut back = [0u8; 100];
    app.read_exact(&mut back).await.unwrap();
    // Counted while the connection is still open.
    let now = || (moved[0].load(Ordering::Relaxed), moved[1].load(Ordering::Relaxed));
    assert_eq!(now(), (100, 100));
    app.shutdown().await.unwrap();
    let mut rest = Vec::new();
    app.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"bye");
    let totals = copying.await.unwrap().unwrap();
    assert_eq!(totals, (100, 103));
    assert_eq!(now(), totals, "progress adds up to the totals");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_pings_and_ends_the_tunnels_of_a_client_gone_silent() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    let config = identity(&ca, &server_id).server_config().unwrap();
    let (ended, mut ended_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        let never = std::future::pending();
        let ping = Duration::from_millis(200);
        let _ = serve_connection_until(tcp, peer, config, (), never, ping, move |i| {
            let ended = ended.clone();
            async move {
                echo(i).await;
                let _ = ended.send(());
            }
        })
        .await;
    });
    let (relay, freeze) = freezable_relay(server_addr).await;
    // The client's own pings are far apart: only the server's can notice.
    let pool = Pool::new().with_ping_interval(Duration::from_secs(60));
    let k = key(&client_id, relay, &server_id);
    let mut open = pool.connect(&k, &identity(&ca, &client_id), req(80), dial).await.unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    open.read_exact(&mut back).await.unwrap();
    // Answered pings keep the tunnel up.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(ended_rx.try_recv().is_err(), "a live client's tunnel ended");
    freeze.send(1).unwrap();
    let gone = tokio::time::timeout(Duration::from_secs(3), ended_rx.recv()).await;
    assert!(matches!(gone, Ok(Some(()))), "the server still holds the tunnel: {gone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_done_with_the_upload_still_delivers_its_whole_answer() {
    // The server's app answers 1 MiB and closes while the client still uploads: END_STREAM,
    // then h2 resets the unread upload with NO_ERROR ("stop sending", RFC 9113 section 8.1).
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = identity(&ca, &server_id).server_config().unwrap();
    tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        let _ = serve_connection(tcp, peer, config, |inbound: Inbound| async move {
            let Ok(stream) = inbound.accept() else { return };
            let mut stream = stream.close_gracefully_on_drop();
            let mut first = [0u8; 1024];
            let _ = stream.read(&mut first).await;
            let _ = stream.write_all(&vec![7u8; 1 << 20]).await;
        })
        .await;
    });
    let pool = Pool::new();
    let k = key(&client_id, addr, &server_id);
    let mut tunnel = pool.connect(&k, &identity(&ca, &client_id), req(80), dial).await.unwrap();
    let apps = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(apps.local_addr().unwrap()).await.unwrap();
    let (mut mesh_side, _) = apps.accept().await.unwrap();
    let copy = tokio::spawn(async move { tunnel.copy_tcp(&mut mesh_side, &|_, _| {}).await });
    let (mut app_r, mut app_w) = app.into_split();
    tokio::spawn(async move {
        let chunk = vec![1u8; 16 << 10];
        for _ in 0..256 {
            if app_w.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    // A slow reader: the reset arrives while the answer is still on its way.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), app_r.read_to_end(&mut got)).await;
    assert!(matches!(read, Ok(Ok(_))), "the answer ended with {read:?}");
    assert_eq!(got.len(), 1 << 20, "the whole answer, then a clean end");
    let copied = tokio::time::timeout(Duration::from_secs(5), copy).await;
    assert!(matches!(copied, Ok(Ok(Ok(_)))), "{copied:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_ca_s_certificates_verify_against_the_root_alone() {
    let dir = std::env::temp_dir().join(format!("sinew-hbone-ca-{}", std::process::id()));
    let root = sinew_identity::plug_in_ca_files_for_tests(&dir, true).unwrap();
    let ca = Ca::load_or_generate(&dir, TD).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(ca.bundle(), [root], "peers trust the operator's root, not the intermediate");
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let (addr, mut seen) = server(identity(&ca, &server_id)).await;
    let mut tunnel = Pool::new()
        .connect(&key(&client_id, addr, &server_id), &identity(&ca, &client_id), req(80), dial)
        .await
        .expect("mutual TLS through the intermediate both ways");
    tunnel.write_all(b"hi").await.unwrap();
    let mut back = [0u8; 2];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(seen.recv().await.unwrap().peer, client_id);
}

/// An HTTP/2 server over TLS that allows `max` concurrent streams, answers every CONNECT 200
/// and holds it open; setting the returned flag sends GOAWAY on the connections open then.
async fn limited_server(
    identity: Identity,
    max: u32,
) -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config().unwrap());
    let (drain, draining) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, mut draining) = (acceptor.clone(), draining.clone());
            draining.mark_unchanged();
            tokio::spawn(async move {
                let tls = acceptor.accept(tcp).await.unwrap();
                let mut conn = h2::server::Builder::new()
                    .max_concurrent_streams(max)
                    .handshake::<_, Bytes>(tls)
                    .await
                    .unwrap();
                let mut held = Vec::new();
                loop {
                    tokio::select! {
                        next = conn.accept() => {
                            let Some(Ok((req, mut respond))) = next else { break };
                            let ok = http::Response::new(());
                            held.push((req, respond.send_response(ok, false).unwrap()));
                        }
                        Ok(()) = draining.changed() => conn.graceful_shutdown(),
                    }
                }
            });
        }
    });
    (addr, drain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_allowing_fewer_streams_gets_more_connections_not_queued_streams() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let (addr, _drain) = limited_server(identity(&ca, &server_id), 1).await;
    let pool = Pool::new();
    let (k, client) = (key(&client_id, addr, &server_id), identity(&ca, &client_id));
    let mut held = Vec::new();
    for n in 1..=3 {
        let open =
            tokio::time::timeout(Duration::from_secs(3), pool.connect(&k, &client, req(80), dial))
                .await;
        let Ok(Ok(stream)) = open else { panic!("stream {n} was queued behind the peer's limit") };
        held.push(stream);
    }
    assert_eq!(pool.stats().opened, 3, "one stream per connection, as the peer allows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_told_to_go_away_are_not_handed_out() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let (addr, drain) = limited_server(identity(&ca, &server_id), 2).await;
    let pool = Pool::new();
    let (k, client) = (key(&client_id, addr, &server_id), identity(&ca, &client_id));
    // Streams spread over two connections, two each, then a third connection: A B A B C.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(pool.connect(&k, &client, req(80), dial).await.unwrap());
    }
    assert_eq!(pool.stats().opened, 3);
    // One stream each left on A, B and C: all three have room.
    drop(held.drain(2..4));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The peer drains (an upgrade, say): both connections get GOAWAY, their streams go on.
    drain.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh =
        tokio::time::timeout(Duration::from_secs(5), pool.connect(&k, &client, req(80), dial))
            .await
            .expect("in time");
    assert!(fresh.is_ok(), "a new stream goes on a new connection: {:?}", fresh.err());
    assert_eq!(pool.stats().opened, 4);
}

/// An HBONE server tunnelling every CONNECT to `app` as the agent does: the 200 held for
/// the app's first answer (for an optimistic client), then `copy_tcp`.
async fn tunnelling_server(identity: Identity, app: SocketAddr) -> SocketAddr {
    serve_all(identity, move |inbound: Inbound| async move {
        let Ok(mut upstream) = TcpStream::connect(app).await else {
            return inbound.refuse(StatusCode::SERVICE_UNAVAILABLE);
        };
        let Ok(mut stream) = inbound.accept_with_answer() else { return };
        let _ = stream.copy_tcp(&mut upstream, &|_, _| {}).await;
    })
    .await
}

/// An app that reads until it has `wants` bytes, waits `think`, answers "answer" and closes.
async fn slow_app(wants: usize, think: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = vec![0u8; wants];
                if s.read_exact(&mut got).await.is_ok() {
                    tokio::time::sleep(think).await;
                    let _ = s.write_all(b"answer").await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optimistic_tunnel_sends_at_once_and_gets_its_200_with_the_first_answer() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let app = slow_app(2, Duration::from_millis(300)).await;
    let addr = tunnelling_server(identity(&ca, &server_id), app).await;
    let (pool, me) = (Pool::new(), identity(&ca, &client_id));
    let k = key(&client_id, addr, &server_id);
    let optimistic = Connect { early: Bytes::from_static(b"a"), optimistic: true, ..req(8080) };
    // The app answers only once it has both bytes: the second is written after the CONNECT,
    // so it must flow before any 200.
    let start = std::time::Instant::now();
    let mut s = pool.connect(&k, &me, optimistic, dial).await.unwrap();
    s.write_all(b"b").await.unwrap();
    s.answered().await.unwrap();
    let answered_after = start.elapsed();
    assert!(
        answered_after >= Duration::from_millis(250),
        "200 before the answer: {answered_after:?}"
    );
    assert!(answered_after < sinew_hbone::ANSWER_WAIT, "200 on the timer: {answered_after:?}");
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"answer");
    // A client that waits for the 200 (ztunnel's way) gets it at once from the same server:
    // holding it back would stall such a client until the timer.
    let start = std::time::Instant::now();
    let mut s = pool.connect(&k, &me, req(8080), dial).await.unwrap();
    assert!(start.elapsed() < Duration::from_millis(250), "{:?}", start.elapsed());
    s.write_all(b"ab").await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_app_s_optimistic_client_gets_its_200_after_the_answer_wait() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    // Wants more than it will ever get: never answers.
    let app = slow_app(100, Duration::ZERO).await;
    let addr = tunnelling_server(identity(&ca, &server_id), app).await;
    let optimistic = Connect { optimistic: true, ..req(8080) };
    let start = std::time::Instant::now();
    let mut s = Pool::new()
        .connect(&key(&client_id, addr, &server_id), &identity(&ca, &client_id), optimistic, dial)
        .await
        .unwrap();
    s.answered().await.unwrap();
    let after = start.elapsed();
    assert!(after >= sinew_hbone::ANSWER_WAIT, "{after:?}");
    assert!(after < sinew_hbone::ANSWER_WAIT + Duration::from_secs(3), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optimistic_tunnel_s_refusal_is_its_copy_error() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    let (addr, _seen) = server(identity(&ca, &server_id)).await;
    let (pool, me) = (Pool::new(), identity(&ca, &client_id));
    let k = key(&client_id, addr, &server_id);
    let optimistic =
        |port| Connect { early: Bytes::from_static(b"early"), optimistic: true, ..req(port) };
    // The app side of the copy: a real socket pair.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut app_client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (mut app, _) = listener.accept().await.unwrap();
    let mut s = pool.connect(&k, &me, optimistic(401), dial).await.unwrap();
    let answered = std::sync::atomic::AtomicBool::new(false);
    let on_answer = || answered.store(true, std::sync::atomic::Ordering::Relaxed);
    let copy = s.copy_tcp_with(&mut app, &|_, _| {}, &on_answer);
    let err = tokio::time::timeout(Duration::from_secs(5), copy).await.unwrap().unwrap_err();
    assert_eq!(sinew_hbone::refused(&err), Some(StatusCode::UNAUTHORIZED), "{err}");
    assert!(!answered.load(std::sync::atomic::Ordering::Relaxed));
    drop(s);
    // Read as a stream, the refusal is the read's error too.
    let mut s = pool.connect(&k, &me, optimistic(401), dial).await.unwrap();
    let err = s.read(&mut [0u8; 8]).await.unwrap_err();
    assert_eq!(sinew_hbone::refused(&err), Some(StatusCode::UNAUTHORIZED), "{err}");
    // Asked again, the same refusal (h2's response future is not polled twice).
    let err = s.answered().await.unwrap_err();
    assert_eq!(sinew_hbone::refused(&err), Some(StatusCode::UNAUTHORIZED), "{err}");
    assert!(s.answer_failed());
    drop(s);
    // Accepted: the echo comes back through the copy, and the answer was told.
    let mut s = pool.connect(&k, &me, optimistic(80), dial).await.unwrap();
    app_client.shutdown().await.unwrap();
    let copy = s.copy_tcp_with(&mut app, &|_, _| {}, &on_answer);
    tokio::time::timeout(Duration::from_secs(5), copy).await.unwrap().unwrap();
    assert!(answered.load(std::sync::atomic::Ordering::Relaxed));
    let mut got = Vec::new();
    app_client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"earlybye");
    assert_eq!(pool.stats().opened, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_reset_while_its_200_is_held_reaches_the_client_as_a_reset() {
    let ca = Ca::generate(TD).unwrap();
    let (client_id, server_id) = (id("shop", "client"), id("shop", "server"));
    // A server that accepts, holding the 200, and resets at once (a policy change, say).
    let addr = serve_all(identity(&ca, &server_id), |inbound: Inbound| async {
        if let Ok(mut stream) = inbound.accept_with_answer() {
            stream.reset();
        }
    })
    .await;
    let optimistic = Connect { optimistic: true, ..req(8080) };
    let mut s = Pool::new()
        .connect(&key(&client_id, addr, &server_id), &identity(&ca, &client_id), optimistic, dial)
        .await
        .unwrap();
    // The 200 goes out right before the reset; h2 may report the reset first.
    let err = match tokio::time::timeout(Duration::from_secs(5), s.answered()).await.unwrap() {
        Ok(()) => s.read(&mut [0u8; 8]).await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}
