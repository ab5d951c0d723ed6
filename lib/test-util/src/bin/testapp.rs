//! `sinew-testapp`: the application the tests, the demo and the benchmarks run inside pods.
//!
//! `serve` answers the protocol of `sinew_test_util::wire`; the client commands exit non-zero
//! with a message when anything differs from what was expected.

use std::{
    net::{Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use sinew_test_util::wire::{CHUNK, Checksum, Stream, expected};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpSocket, TcpStream},
};

const USAGE: &str = "usage: sinew-testapp serve PORT... | xfer TARGET UP DOWN SEED | \
many TARGETS(,) COUNT | sink TARGET SECS [STREAMS] | ping TARGET COUNT [SOURCE-IP] | reset TARGET | \
hold TARGET SECS | mark TARGET TEXT REPEAT | http PORT NAME | upgrade TARGET | grpc PORT NAME | grpc-call TARGET | grpc-retry TARGET | raw TARGET TEXT | fire TARGET TEXT | steal PORT SECS | flood TARGET COUNT | relay LISTEN TARGET [warm|lazy] | \
hbone-certs DIR | relay LISTEN TARGET hbone-out|hbone-in DIR";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let arg = |i: usize| args.get(i).map(String::as_str).context(USAGE);
    rt.block_on(async {
        match arg(0)? {
            "serve" => serve(args[1..].iter().map(|p| p.parse()).collect::<Result<_, _>>()?).await,
            "xfer" => {
                xfer(arg(1)?.parse()?, arg(2)?.parse()?, arg(3)?.parse()?, arg(4)?.parse()?).await
            }
            "many" => {
                let targets =
                    arg(1)?.split(',').map(str::parse).collect::<Result<Vec<SocketAddr>, _>>()?;
                many(targets, arg(2)?.parse()?).await
            }
            "sink" => {
                let streams = args.get(3).map(|n| n.parse()).transpose()?.unwrap_or(1);
                sink(arg(1)?.parse()?, arg(2)?.parse()?, streams).await
            }
            "ping" => {
                let source = args.get(3).map(|s| s.parse()).transpose()?;
                ping(arg(1)?.parse()?, arg(2)?.parse()?, source).await
            }
            "steal" => steal(arg(1)?.parse()?, arg(2)?.parse()?).await,
            "reset" => reset(arg(1)?.parse()?).await,
            "hold" => hold(arg(1)?.parse()?, arg(2)?.parse()?).await,
            "http" => http(arg(1)?.parse()?, arg(2)?.to_owned()).await,
            "upgrade" => upgrade(arg(1)?.parse()?).await,
            "grpc" => grpc::serve(arg(1)?.parse()?, arg(2)?.to_owned()).await,
            "grpc-call" => grpc::call(arg(1)?.parse()?).await,
            "grpc-retry" => grpc::call_retried(arg(1)?.parse()?).await,
            "raw" => raw(arg(1)?.parse()?, arg(2)?).await,
            "fire" => fire(arg(1)?.parse()?, arg(2)?).await,
            "flood" => flood(arg(1)?.parse()?, arg(2)?.parse()?).await,
            "relay" => {
                let (listen, target) = (arg(1)?.parse()?, arg(2)?.parse()?);
                let mode = match args.get(3).map(String::as_str) {
                    None => Relay::Plain,
                    Some("warm") => Relay::Warm,
                    Some("lazy") => Relay::Lazy,
                    Some("hbone-out") => return hbone::relay_out(listen, target, arg(4)?).await,
                    Some("hbone-in") => return hbone::relay_in(listen, target, arg(4)?).await,
                    Some(_) => bail!(USAGE),
                };
                relay(listen, target, mode).await
            }
            "hbone-certs" => hbone::certs(arg(1)?),
            "mark" => mark(arg(1)?.parse()?, arg(2)?, arg(3)?.parse()?).await,
            _ => bail!(USAGE),
        }
    })
}

async fn serve(ports: Vec<u16>) -> Result<()> {
    ensure!(!ports.is_empty(), USAGE);
    for port in ports {
        let sock = TcpSocket::new_v6()?;
        sock.set_reuseaddr(true)?;
        // Dual-stack: IPv4 arrives as IPv4-mapped addresses.
        socket2::SockRef::from(&sock).set_only_v6(false)?;
        sock.bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))?;
        let l: TcpListener = sock.listen(4096)?;
        tokio::spawn(async move {
            loop {
                if let Ok((s, _)) = l.accept().await {
                    tokio::spawn(async move {
                        if let Err(e) = answer(s).await {
                            eprintln!("serve: {e:#}");
                        }
                    });
                }
            }
        });
    }
    println!("ready");
    // Serve until killed.
    std::future::pending::<()>().await;
    Ok(())
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

async fn answer(s: TcpStream) -> Result<()> {
    let local = canonical(s.local_addr()?);
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let f: Vec<&str> = line.split_whitespace().collect();
    match f.as_slice() {
        ["ADDR"] => {
            w.write_all(format!("{local}\n").as_bytes()).await?;
            // Hold the connection until the client is done, so they are all open at once.
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await?;
        }
        ["PING"] => w.write_all(b"P").await?,
        ["RESET"] => {
            // Abort: the client must see a reset, not a clean end.
            let s = r.into_inner().reunite(w)?;
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
        }
        ["SINK"] => {
            let n = tokio::io::copy(&mut r, &mut tokio::io::sink()).await?;
            w.write_all(format!("{n}\n").as_bytes()).await?;
        }
        ["XFER", up, down, seed] => {
            let (up, down, seed): (usize, usize, u64) = (up.parse()?, down.parse()?, seed.parse()?);
            let writer = tokio::spawn(async move {
                send(&mut w, seed.wrapping_add(1), down).await?;
                anyhow::Ok(w)
            });
            let got = receive(&mut r).await?;
            let mut w = writer.await??;
            ensure!(got.0 == up, "received {} bytes, expected {up}", got.0);
            w.write_all(got.1.as_bytes()).await?;
        }
        _ => bail!("bad header {line:?}"),
    }
    Ok(())
}

async fn send(w: &mut (impl AsyncWriteExt + Unpin), seed: u64, len: usize) -> Result<()> {
    let mut s = Stream::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK);
        s.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n;
    }
    Ok(())
}

async fn receive(r: &mut (impl AsyncReadExt + Unpin)) -> Result<(usize, String)> {
    let mut c = Checksum::default();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, c.hex()));
        }
        c.update(&buf[..n]);
        total += n;
    }
}

async fn xfer(target: SocketAddr, up: usize, down: usize, seed: u64) -> Result<()> {
    let s = TcpStream::connect(target).await.with_context(|| format!("connect {target}"))?;
    let peer = canonical(s.peer_addr()?);
    ensure!(peer == target, "getpeername shows {peer}, dialled {target}");
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(format!("XFER {up} {down} {seed}\n").as_bytes()).await?;
        send(&mut w, seed, up).await?;
        // Half-close: the server must still be able to answer.
        w.shutdown().await?;
        anyhow::Ok(())
    });
    let mut data = vec![0u8; down];
    r.read_exact(&mut data).await.context("reading the download")?;
    let mut c = Checksum::default();
    c.update(&data);
    let mut trailer = String::new();
    r.read_to_string(&mut trailer).await?;
    writer.await??;
    ensure!(c.hex() == expected(seed.wrapping_add(1), down, CHUNK), "download checksum differs");
    ensure!(trailer == expected(seed, up, CHUNK), "server's upload checksum {trailer:?} differs");
    println!("ok {up} up, {down} down, checksums match");
    Ok(())
}

async fn many(targets: Vec<SocketAddr>, count: usize) -> Result<()> {
    ensure!(!targets.is_empty() && count > 0, USAGE);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(count));
    let answered = std::sync::Arc::new(tokio::sync::Barrier::new(count));
    let mut tasks = Vec::new();
    for i in 0..count {
        let target = targets[i % targets.len()];
        let (barrier, answered) = (barrier.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            let s = tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(target))
                .await
                .context("connect timed out")?
                .with_context(|| format!("connect {target}"))?;
            // Every connection is open before any is used.
            barrier.wait().await;
            let (r, mut w) = s.into_split();
            w.write_all(b"ADDR\n").await?;
            let mut line = String::new();
            BufReader::new(r).read_line(&mut line).await?;
            let got: SocketAddr =
                line.trim().parse().with_context(|| format!("bad answer {line:?}"))?;
            ensure!(got == target, "dialled {target}, the server saw {got}");
            // And every one is still open when all have answered (bounded, in case one failed).
            let _ = tokio::time::timeout(Duration::from_secs(20), answered.wait()).await;
            drop(w);
            anyhow::Ok(())
        }));
    }
    let mut failures = 0;
    for t in tasks {
        if let Err(e) = t.await? {
            failures += 1;
            if failures <= 5 {
                eprintln!("many: {e:#}");
            }
        }
    }
    ensure!(failures == 0, "{failures} of {count} connections failed");
    println!("ok {count} connections, every destination correct");
    Ok(())
}

/// Streams bytes to a SINK on `streams` connections at once for `secs`; prints the total
/// rate the server counted.
async fn sink(target: SocketAddr, secs: f64, streams: usize) -> Result<()> {
    ensure!(streams > 0, USAGE);
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        tasks.push(tokio::spawn(async move {
            let s = TcpStream::connect(target).await?;
            let (mut r, mut w) = s.into_split();
            w.write_all(b"SINK\n").await?;
            let buf = vec![0x5au8; 256 * 1024];
            while start.elapsed() < limit {
                w.write_all(&buf).await?;
            }
            w.shutdown().await?;
            let mut answer = String::new();
            r.read_to_string(&mut answer).await?;
            anyhow::Ok(answer.trim().parse::<f64>()?)
        }));
    }
    let mut bytes = 0.0;
    for t in tasks {
        bytes += t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({ "bytes": bytes, "secs": elapsed, "bytes_per_sec": bytes / elapsed })
    );
    Ok(())
}

/// How `relay` reaches its target.
#[derive(Clone, Copy, PartialEq)]
enum Relay {
    /// A new connection per accepted one.
    Plain,
    /// The connection is opened ahead, before the client comes, as a pooled tunnel is.
    Warm,
    /// The connection is opened once the client's first bytes are in, as a tunnel's far
    /// end connects on the request it carries.
    Lazy,
}

/// The simplest user-space TCP relay: each connection accepted on LISTEN gets a connection
/// to TARGET (its own, or one opened ahead) and bytes copied both ways. The benchmarks
/// measure it beside the agent, as the floor any proxy with a user-space hop pays on this
/// machine. Prints "ready".
async fn relay(listen: SocketAddr, target: SocketAddr, mode: Relay) -> Result<()> {
    let l = TcpListener::bind(listen).await.with_context(|| format!("bind {listen}"))?;
    println!("ready");
    std::io::Write::flush(&mut std::io::stdout())?;
    let connect = move || async move {
        let up = TcpStream::connect(target).await?;
        up.set_nodelay(true)?;
        Ok::<_, std::io::Error>(up)
    };
    let mut spare: Option<tokio::task::JoinHandle<std::io::Result<TcpStream>>> = None;
    loop {
        let (mut down, _) = l.accept().await?;
        let warm = match spare.take() {
            Some(ready) => ready.await.ok().and_then(Result::ok),
            None => None,
        };
        tokio::spawn(async move {
            if mode == Relay::Lazy && down.readable().await.is_err() {
                return;
            }
            let mut up = match warm {
                Some(up) => up,
                None => match connect().await {
                    Ok(up) => up,
                    Err(_) => return,
                },
            };
            let _ = down.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
        });
        if mode == Relay::Warm {
            // Spawned after the copy, so it runs once that has had its first turn.
            spare = Some(tokio::spawn(connect()));
        }
    }
}

/// The simplest HBONE relays (this project's HBONE library: TLS 1.3 and HTTP/2 CONNECT over
/// a pooled connection), in the agents' places: the benchmarks' floor of what the tunnel's
/// protocol itself costs, without capture, policy, telemetry or pod namespaces.
mod hbone {
    use std::{net::SocketAddr, path::Path, time::Duration};

    use anyhow::{Context, Result};
    use sinew_hbone::{Connect, Pool, PoolKey, serve_connection, tls::Identity};
    use sinew_identity::{Ca, SpiffeId};
    use tokio::net::{TcpListener, TcpStream};

    const FILES: [&str; 2] = ["out", "in"];

    fn id(name: &str) -> Result<SpiffeId> {
        Ok(SpiffeId::new("cluster.local", "bench", name)?)
    }

    /// Writes a CA's bundle and a certificate and key for each relay into `dir`.
    pub(super) fn certs(dir: &str) -> Result<()> {
        let dir = Path::new(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let ca = Ca::generate("cluster.local")?;
        std::fs::write(dir.join("bundle.pem"), ca.bundle().concat())?;
        for name in FILES {
            let (key, cert) = ca.issue(&id(name)?, &[], Duration::from_secs(24 * 3600))?;
            std::fs::write(dir.join(format!("{name}.pem")), cert)?;
            std::fs::write(dir.join(format!("{name}.key")), key)?;
        }
        Ok(())
    }

    fn identity(dir: &str, name: &str) -> Result<Identity> {
        let dir = Path::new(dir);
        let read =
            |f: String| std::fs::read_to_string(dir.join(&f)).with_context(|| format!("read {f}"));
        let bundle = vec![read("bundle.pem".into())?];
        Ok(Identity::from_pem(
            &read(format!("{name}.pem"))?,
            &read(format!("{name}.key"))?,
            &bundle,
        )?)
    }

    fn ready() -> Result<()> {
        println!("ready");
        std::io::Write::flush(&mut std::io::stdout())?;
        Ok(())
    }

    /// Each connection on `listen` becomes an optimistic CONNECT to `peer` (a `relay_in`),
    /// carrying the bytes already in, as the source agent sends it.
    pub(super) async fn relay_out(listen: SocketAddr, peer: SocketAddr, dir: &str) -> Result<()> {
        let me = identity(dir, "out")?;
        let key = PoolKey {
            source: me.id().clone(),
            source_ip: listen.ip(),
            destination: peer,
            expected: id("in")?,
        };
        let l = TcpListener::bind(listen).await.with_context(|| format!("bind {listen}"))?;
        let pool = Pool::new();
        ready()?;
        loop {
            let (mut down, client) = l.accept().await?;
            let (pool, me, key) = (pool.clone(), me.clone(), key.clone());
            tokio::spawn(async move {
                let _ = down.set_nodelay(true);
                let mut early = bytes::BytesMut::with_capacity(16 << 10);
                if matches!(down.try_read_buf(&mut early), Err(e) if e.kind() != std::io::ErrorKind::WouldBlock)
                {
                    return;
                }
                let req = Connect {
                    authority: peer,
                    client,
                    baggage: None,
                    early: early.freeze(),
                    optimistic: true,
                };
                let Ok(mut up) = pool.connect(&key, &me, req, TcpStream::connect).await else {
                    return;
                };
                let _ = up.copy_tcp(&mut down, &|_, _| {}).await;
            });
        }
    }

    /// Terminates HBONE on `listen` and connects each CONNECT to `app`, as the destination
    /// agent does.
    pub(super) async fn relay_in(listen: SocketAddr, app: SocketAddr, dir: &str) -> Result<()> {
        let config = identity(dir, "in")?.server_config()?;
        let l = TcpListener::bind(listen).await.with_context(|| format!("bind {listen}"))?;
        ready()?;
        loop {
            let (tcp, peer) = l.accept().await?;
            tokio::spawn(serve_connection(tcp, peer, config.clone(), move |inbound| async move {
                let Ok(mut up) = TcpStream::connect(app).await else {
                    return inbound.refuse(http::StatusCode::SERVICE_UNAVAILABLE);
                };
                let _ = up.set_nodelay(true);
                if let Ok(mut s) = inbound.accept_with_answer() {
                    let _ = s.copy_tcp(&mut up, &|_, _| {}).await;
                }
            }));
        }
    }
}

/// Joins the `SO_REUSEPORT` group on `[::]:PORT` (dual-stack), as a process in a pod trying
/// to take connections meant for whoever listens there; prints "bound" once it has, then,
/// when its standard input closes (or after SECS seconds), how many connections it accepted.
async fn steal(port: u16, secs: u64) -> Result<()> {
    use tokio::io::AsyncReadExt as _;
    let sock = TcpSocket::new_v6()?;
    sock.set_reuseport(true)?;
    socket2::SockRef::from(&sock).set_only_v6(false)?;
    sock.bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))?;
    let l = sock.listen(1024)?;
    println!("bound");
    use std::io::Write as _;
    std::io::stdout().flush()?;
    let mut accepted = 0u64;
    let deadline = tokio::time::sleep(Duration::from_secs(secs));
    tokio::pin!(deadline);
    let mut stdin = tokio::io::stdin();
    let mut byte = [0u8; 1];
    loop {
        tokio::select! {
            r = l.accept() => if r.is_ok() { accepted += 1 },
            r = stdin.read(&mut byte) => if !matches!(r, Ok(n) if n > 0) { break },
            _ = &mut deadline => break,
        }
    }
    println!("{}", serde_json::json!({ "accepted": accepted }));
    Ok(())
}

async fn ping(target: SocketAddr, count: usize, source: Option<std::net::IpAddr>) -> Result<()> {
    let mut us = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        let mut s = match source {
            None => TcpStream::connect(target).await?,
            Some(ip) => {
                let sock = if ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                sock.bind(SocketAddr::new(ip, 0))?;
                sock.connect(target).await?
            }
        };
        s.set_nodelay(true)?;
        s.write_all(b"PING\n").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        us.push(start.elapsed().as_secs_f64() * 1e6);
    }
    us.sort_by(f64::total_cmp);
    let p = |q: f64| us[((us.len() as f64 - 1.0) * q) as usize];
    let mean = us.iter().sum::<f64>() / us.len() as f64;
    println!(
        "{}",
        serde_json::json!({ "count": count, "mean_us": mean, "p50_us": p(0.5), "p99_us": p(0.99) })
    );
    Ok(())
}

/// Opens COUNT connections that send nothing, waits a second, and prints how many are still
/// open and how many the other side closed or reset (`open N closed M`).
async fn flood(target: SocketAddr, count: usize) -> Result<()> {
    let mut conns = Vec::with_capacity(count);
    let (mut open, mut closed) = (0, 0);
    for _ in 0..count {
        match TcpStream::connect(target).await {
            Ok(c) => conns.push(c),
            // Reset so fast that connect itself saw it.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            Err(e) => return Err(e).with_context(|| format!("connect {target}")),
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for c in &conns {
        let mut b = [0u8; 1];
        match c.try_read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open += 1,
            _ => closed += 1,
        }
    }
    println!("open {open} closed {closed}");
    Ok(())
}

async fn reset(target: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect(target).await?;
    s.write_all(b"RESET\n").await?;
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await? {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            println!("ok reset propagated");
            Ok(())
        }
        other => bail!("expected a connection reset, got {other:?}"),
    }
}

/// Opens a connection, proves it works (ADDR), prints `open`, then holds it for up to `secs`
/// and prints how it ended: `closed reset`, `closed eof`, or `still open`.
async fn hold(target: SocketAddr, secs: f64) -> Result<()> {
    let s = TcpStream::connect(target).await.with_context(|| format!("connect {target}"))?;
    let (r, mut w) = s.into_split();
    w.write_all(b"ADDR\n").await?;
    let mut r = BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    ensure!(!line.is_empty(), "no answer from {target}");
    println!("open");
    let mut buf = [0u8; 64];
    let outcome = tokio::time::timeout(Duration::from_secs_f64(secs), r.read(&mut buf)).await;
    match outcome {
        Err(_) => println!("still open"),
        Ok(Ok(0)) => println!("closed eof"),
        Ok(Ok(_)) => println!("unexpected data"),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => println!("closed reset"),
        Ok(Err(e)) => println!("closed {e}"),
    }
    Ok(())
}

/// Sends `text` `repeat` times to a SINK and checks the byte count (a recognizable payload
/// for packet captures).
async fn mark(target: SocketAddr, text: &str, repeat: usize) -> Result<()> {
    let s = TcpStream::connect(target).await.with_context(|| format!("connect {target}"))?;
    let (mut r, mut w) = s.into_split();
    w.write_all(b"SINK\n").await?;
    let payload = text.repeat(repeat);
    w.write_all(payload.as_bytes()).await?;
    w.shutdown().await?;
    let mut answer = String::new();
    r.read_to_string(&mut answer).await?;
    ensure!(answer.trim() == payload.len().to_string(), "sink answered {answer:?}");
    println!("ok {} bytes", payload.len());
    Ok(())
}

/// A small HTTP/1.1 server (keep-alive, Content-Length bodies) named `name`: every answer
/// carries `x-served-by: <name>`. Paths: `/status/<code>` answers that code; `/flaky` fails
/// every other request with 503 (the first one fails); `/delay/<ms>` waits first;
/// `/delay/<ms>/mid` sends the head and half the body, then waits; `/headers`
/// echoes the request headers; `/count/<path>` answers how many requests `/<path>` got;
/// `/last/<path>` answers the body of the last request to `/<path>` (a collector's view);
/// anything else answers 200 `<name> <method> <path>`.
async fn http(port: u16, name: String) -> Result<()> {
    let sock = TcpSocket::new_v6()?;
    sock.set_reuseaddr(true)?;
    socket2::SockRef::from(&sock).set_only_v6(false)?;
    sock.bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))?;
    let l: TcpListener = sock.listen(4096)?;
    println!("ready");
    let flaky = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counts = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    loop {
        let (s, _) = l.accept().await?;
        let (name, flaky, counts) = (name.clone(), flaky.clone(), counts.clone());
        tokio::spawn(async move {
            if let Err(e) = http_connection(s, &name, &flaky, &counts).await {
                // Clients and proxies resetting idle keep-alive connections is normal.
                let reset = e
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset);
                if !reset {
                    eprintln!("http: {e:#}");
                }
            }
        });
    }
}

async fn http_connection(
    s: TcpStream,
    name: &str,
    flaky: &std::sync::atomic::AtomicU64,
    counts: &std::sync::Mutex<std::collections::HashMap<String, u64>>,
) -> Result<()> {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut f = line.split_whitespace();
        let (method, path) =
            (f.next().unwrap_or("").to_owned(), f.next().unwrap_or("/").to_owned());
        let mut headers = Vec::new();
        let mut length = 0usize;
        let mut close = false;
        loop {
            let mut h = String::new();
            ensure!(r.read_line(&mut h).await? > 0, "connection closed in the headers");
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_owned());
                if k == "content-length" {
                    length = v.parse()?;
                }
                if k == "connection" && v.eq_ignore_ascii_case("close") {
                    close = true;
                }
                headers.push((k, v));
            }
        }
        let mut body = vec![0u8; length];
        r.read_exact(&mut body).await?;
        if headers.iter().any(|(k, v)| k == "upgrade" && v.eq_ignore_ascii_case("websocket")) {
            // Switch protocols, then echo raw bytes until the client closes.
            let head = format!(
                "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\nx-served-by: {name}\r\n\r\n"
            );
            w.write_all(head.as_bytes()).await?;
            let mut r = r.into_inner();
            tokio::io::copy(&mut r, &mut w).await?;
            return Ok(());
        }
        let bare = path.split('?').next().unwrap_or("/");
        let (seen, last) = {
            let mut counts = counts.lock().map_err(|_| anyhow::anyhow!("counts lock"))?;
            *counts.entry(bare.to_owned()).or_insert(0) += 1;
            if !body.is_empty() {
                last_bodies()
                    .lock()
                    .map_err(|_| anyhow::anyhow!("bodies lock"))?
                    .insert(bare.to_owned(), body.clone());
            }
            let last = bare.strip_prefix("/last").map(|p| {
                last_bodies().lock().ok().and_then(|b| b.get(p).cloned()).unwrap_or_default()
            });
            (bare.strip_prefix("/count").map(|p| counts.get(p).copied().unwrap_or(0)), last)
        };
        let mut status = 200u16;
        let mut text = format!("{name} {method} {path}\n");
        if let Some(n) = seen {
            text = format!("{n}\n");
        } else if let Some(b) = last {
            text = String::from_utf8_lossy(&b).into_owned();
        } else if let Some(code) = bare.strip_prefix("/status/") {
            status = code.parse().unwrap_or(400);
        } else if bare.starts_with("/flaky") {
            if flaky.fetch_add(1, std::sync::atomic::Ordering::Relaxed).is_multiple_of(2) {
                status = 503;
            }
        } else if let Some(ms) = bare.strip_prefix("/delay/")
            && let Some(ms) = ms.strip_suffix("/mid")
        {
            // A backend that stalls mid-body.
            let half = format!("{name} {method} {path}\n");
            let head = format!(
                "HTTP/1.1 200 X\r\ncontent-length: {}\r\ncontent-type: text/plain\r\nx-served-by: {name}\r\n\r\n{half}",
                2 * half.len()
            );
            w.write_all(head.as_bytes()).await?;
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            w.write_all(half.as_bytes()).await?;
            continue;
        } else if let Some(ms) = bare.strip_prefix("/delay/") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        } else if bare == "/headers" {
            for (k, v) in &headers {
                text.push_str(&format!("{k}: {v}\n"));
            }
        }
        let head = format!(
            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\ncontent-type: text/plain\r\nx-served-by: {name}\r\n\r\n",
            text.len()
        );
        // One write: a separate small body write would wait for the head's ACK (Nagle).
        w.write_all(format!("{head}{text}").as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}

/// An HTTP/1.1 Upgrade (websocket) handshake to `target`, then bytes echoed over the
/// upgraded connection.
async fn upgrade(target: SocketAddr) -> Result<()> {
    let s = TcpStream::connect(target).await.with_context(|| format!("connect {target}"))?;
    let (r, mut w) = s.into_split();
    w.write_all(
        format!("GET /ws HTTP/1.1\r\nhost: {target}\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut r = BufReader::new(r);
    let mut status = String::new();
    r.read_line(&mut status).await?;
    ensure!(status.contains(" 101 "), "expected 101, got {status:?}");
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await?;
        if h.trim().is_empty() {
            break;
        }
    }
    for msg in ["hello over the upgraded connection", "and a second message"] {
        w.write_all(msg.as_bytes()).await?;
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), r.read_exact(&mut back)).await??;
        ensure!(back == msg.as_bytes(), "echo differs");
    }
    println!("ok upgraded and echoed");
    Ok(())
}

/// A real gRPC peer (tonic) for L7 tests, reusing the control API's services: `Ca.Sign` as a
/// unary call and `Discovery.Stream` as a bidirectional stream.
mod grpc {
    use std::{
        net::{Ipv6Addr, SocketAddr},
        sync::atomic::{AtomicU32, Ordering},
        time::Duration,
    };

    use anyhow::{Context, Result, ensure};
    use sinew_api::{
        DiscoveryRequest, DiscoveryResponse, SignRequest, SignResponse,
        ca_client::CaClient,
        ca_server::{Ca, CaServer},
        discovery_client::DiscoveryClient,
        discovery_server::{Discovery, DiscoveryServer},
    };
    use tokio_stream::{StreamExt, wrappers::ReceiverStream};
    use tonic::{Request, Response, Status, Streaming};

    /// A server named for its answers. Signing an identity that starts with `flaky` fails
    /// with `UNAVAILABLE` every other time, for retries to mend. A signature's bundle is the
    /// `:authority` the call arrived with (what a proxy passed on).
    struct Named(String, AtomicU32);

    /// The metadata key [`Authority`] copies `:authority` into (tonic hides the URI).
    const AUTHORITY: &str = "x-seen-authority";

    /// Passes each request on with its `:authority` as [`AUTHORITY`] metadata.
    #[derive(Clone)]
    struct Authority<S>(S);

    impl<S, B> tower_service::Service<http::Request<B>> for Authority<S>
    where
        S: tower_service::Service<http::Request<B>>,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;

        fn poll_ready(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), S::Error>> {
            self.0.poll_ready(cx)
        }

        fn call(&mut self, mut req: http::Request<B>) -> S::Future {
            let seen = req.uri().authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
            if let Ok(v) = http::HeaderValue::from_str(&seen) {
                req.headers_mut().insert(AUTHORITY, v);
            }
            self.0.call(req)
        }
    }

    #[tonic::async_trait]
    impl Ca for Named {
        async fn sign(&self, req: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
            let seen = req
                .metadata()
                .get(AUTHORITY)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let identity = req.into_inner().identity;
            if identity.starts_with("flaky")
                && self.1.fetch_add(1, Ordering::Relaxed).is_multiple_of(2)
            {
                return Err(Status::unavailable("flaky: every other call fails"));
            }
            Ok(Response::new(SignResponse {
                certificate_pem: format!("{} signed {identity}", self.0),
                trust_bundle_pem: vec![seen],
            }))
        }
    }

    #[tonic::async_trait]
    impl Discovery for Named {
        type StreamStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

        async fn stream(
            &self,
            req: Request<Streaming<DiscoveryRequest>>,
        ) -> Result<Response<Self::StreamStream>, Status> {
            let mut incoming = req.into_inner();
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let name = self.0.clone();
            tokio::spawn(async move {
                let mut n = 0;
                while let Some(Ok(r)) = incoming.next().await {
                    n += 1;
                    let resp = DiscoveryResponse {
                        system_version: n,
                        nonce: format!("{name}:{}", r.response_nonce),
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        break;
                    }
                }
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        }
    }

    pub async fn serve(port: u16, name: String) -> Result<()> {
        let addr = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("ready");
        tonic::transport::Server::builder()
            .layer(tower_layer::layer_fn(Authority))
            .add_service(CaServer::new(Named(name.clone(), AtomicU32::new(0))))
            .add_service(DiscoveryServer::new(Named(name, AtomicU32::new(0))))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await?;
        Ok(())
    }

    async fn connect(target: SocketAddr) -> Result<tonic::transport::Channel> {
        tonic::transport::Endpoint::from_shared(format!("http://{target}"))?
            .connect()
            .await
            .with_context(|| format!("connect {target}"))
    }

    /// Signs `<prefix>-0` .. `<prefix>-<n-1>`, checks each answer, and returns the name of the
    /// server that answered and the `:authority` it saw.
    async fn sign_each(
        channel: &tonic::transport::Channel,
        prefix: &str,
        n: usize,
    ) -> Result<(String, String)> {
        let mut ca = CaClient::new(channel.clone());
        let mut from = String::new();
        let mut seen = String::new();
        for i in 0..n {
            let identity = format!("{prefix}-{i}");
            let r = ca
                .sign(SignRequest { identity: identity.clone(), ..Default::default() })
                .await
                .with_context(|| format!("signing {identity}"))?
                .into_inner();
            ensure!(r.certificate_pem.ends_with(&format!("signed {identity}")), "{r:?}");
            from = r.certificate_pem.split(' ').next().unwrap_or("").to_owned();
            seen = r.trust_bundle_pem.first().cloned().unwrap_or_default();
        }
        Ok((from, seen))
    }

    pub async fn call(target: SocketAddr) -> Result<()> {
        let channel = connect(target).await?;
        let (from, seen) = sign_each(&channel, "id", 3).await?;
        let requests = (1..=5)
            .map(|i| DiscoveryRequest { response_nonce: i.to_string(), ..Default::default() });
        let mut responses =
            DiscoveryClient::new(channel).stream(tokio_stream::iter(requests)).await?.into_inner();
        let mut got = Vec::new();
        while let Some(r) = responses.next().await {
            got.push(r?.nonce);
        }
        let want: Vec<String> = (1..=5).map(|i| format!("{from}:{i}")).collect();
        ensure!(got == want, "streamed {got:?}, expected {want:?}");
        println!("ok 3 unary calls and a 5-message stream served by {from} for {seen}");
        Ok(())
    }

    /// Through a route that retries: four calls the server fails every other time must all
    /// be answered, and a bidirectional stream must flow message by message (each request
    /// is sent only after the answer to the one before, which a proxy holding the request
    /// body back until it ends would never deliver).
    pub async fn call_retried(target: SocketAddr) -> Result<()> {
        let channel = connect(target).await?;
        let (from, _) = sign_each(&channel, "flaky", 4).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        // The first message goes out before the stream is opened: the server answers the
        // stream's headers only once it has something to read.
        tx.send(DiscoveryRequest { response_nonce: "1".into(), ..Default::default() }).await?;
        let mut client = DiscoveryClient::new(channel);
        let opened =
            tokio::time::timeout(Duration::from_secs(10), client.stream(ReceiverStream::new(rx)))
                .await
                .context("the stream was not answered within 10 s")?;
        let mut responses = opened.context("opening the stream")?.into_inner();
        for i in 1..=5 {
            if i > 1 {
                tx.send(DiscoveryRequest { response_nonce: i.to_string(), ..Default::default() })
                    .await?;
            }
            let r = tokio::time::timeout(Duration::from_secs(10), responses.next())
                .await
                .with_context(|| format!("no answer to message {i} within 10 s"))?
                .with_context(|| format!("the stream ended before message {i}"))??;
            ensure!(r.nonce == format!("{from}:{i}"), "message {i} answered with {r:?}");
        }
        drop(tx);
        println!(
            "ok 4 calls answered through retries and a 5-message interactive stream served by {from}"
        );
        Ok(())
    }
}

/// Sends `text` (with `\\r\\n` escapes turned into CR LF) and prints the first line answered.
async fn raw(target: SocketAddr, text: &str) -> Result<()> {
    let mut s = TcpStream::connect(target).await.with_context(|| format!("connect {target}"))?;
    s.write_all(text.replace("\\r\\n", "\r\n").as_bytes()).await?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line)).await??;
    println!("{}", line.trim_end());
    Ok(())
}

/// Connects, writes TEXT (`\r\n` as CR LF) and closes at once, reading nothing: a
/// fire-and-forget client (syslog, Graphite over TCP).
async fn fire(target: SocketAddr, text: &str) -> Result<()> {
    let mut s = TcpStream::connect(target).await.with_context(|| format!("connect {target}"))?;
    s.write_all(text.replace("\\r\\n", "\r\n").as_bytes()).await?;
    drop(s);
    println!("sent");
    Ok(())
}

/// The last request body per path (for `/last/<path>`).
fn last_bodies() -> &'static std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>> {
    static BODIES: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
    > = std::sync::OnceLock::new();
    BODIES.get_or_init(Default::default)
}
