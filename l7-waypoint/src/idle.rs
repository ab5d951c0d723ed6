//! Idle client connections: a stream wrapper that notes when bytes last moved (either way),
//! and a watch that says when the connection should go: no byte at all within a first bound
//! (a client that opens a tunnel and sends nothing, which hyper's version detection would
//! wait on for ever), or, with no request in flight, nothing moved for the idle timeout
//! (Envoy's connection `idle_timeout`: a request still being answered, a sparse gRPC stream
//! or a long poll, keeps its connection).

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

/// When bytes last moved, in milliseconds since the watch started; [`NOTHING_YET`] before
/// the first byte read.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// Requests in flight (from the handler's call to their response body's end).
    active: AtomicU64,
}

/// Counts a request in flight on its connection until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

const NOTHING_YET: u64 = u64::MAX;

impl Activity {
    /// A request started; it counts until the guard is dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.active.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Completes when the connection should close: no byte read within `first`, or nothing
    /// moved for `idle`. Returns why.
    pub async fn expired(&self, first: Duration, idle: Duration) -> &'static str {
        let mut deadline = self.start + first;
        loop {
            tokio::time::sleep_until(deadline).await;
            let last = self.last_ms.load(Ordering::Relaxed);
            if last == NOTHING_YET {
                return "nothing received";
            }
            let next = self.start + Duration::from_millis(last) + idle;
            if next <= Instant::now() {
                if self.active.load(Ordering::Relaxed) == 0 {
                    return "idle";
                }
                // A request in flight: not idle, look again an idle time from now.
                deadline = Instant::now() + idle;
                continue;
            }
            deadline = next;
        }
    }
}

/// One request's stream, for Envoy's `stream_idle_timeout`: the request body's bytes so far
/// and when a frame of either body last moved. A stream that moves nothing for the limit ends:
/// with a 408 before its response has started, with a reset after (`proxy::handle`).
#[derive(Debug)]
pub struct StreamActivity {
    start: Instant,
    last_ms: AtomicU64,
    /// The request body's data bytes read so far (`istio_request_bytes`).
    pub request_bytes: AtomicU64,
}

impl StreamActivity {
    /// A stream starting now.
    pub fn new() -> Self {
        Self { start: Instant::now(), last_ms: AtomicU64::new(0), request_bytes: AtomicU64::new(0) }
    }

    /// A frame moved.
    pub fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// When the stream will have moved nothing for `limit`, unless something moves first.
    pub fn idle_at(&self, limit: Duration) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + limit
    }

    /// Completes once nothing has moved for `limit`.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let at = self.idle_at(limit);
            if at <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(at).await;
        }
    }
}

impl Default for StreamActivity {
    fn default() -> Self {
        Self::new()
    }
}

/// A stream whose reads and writes mark [`Activity`].
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    /// Wraps `inner`; the activity is the watch's side.
    pub fn new(inner: S) -> (Self, Arc<Activity>) {
        let activity = Arc::new(Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(NOTHING_YET),
            active: AtomicU64::new(0),
        });
        (Self { inner, activity: activity.clone() }, activity)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stream_is_idle_a_limit_after_its_last_frame() {
        let limit = Duration::from_secs(300);
        let stream = Arc::new(StreamActivity::new());
        let t0 = Instant::now();
        let watch = tokio::spawn({
            let stream = stream.clone();
            async move { stream.idle_for(limit).await }
        });
        tokio::time::sleep(Duration::from_secs(200)).await;
        stream.touch();
        let touched = Instant::now();
        tokio::time::sleep(Duration::from_secs(200)).await;
        assert!(!watch.is_finished(), "idle 300 s counts from the last frame, not the start");
        watch.await.unwrap();
        assert_eq!(Instant::now(), touched + limit);
        assert!(Instant::now() > t0 + limit);
        // Already idle: at once.
        let before = Instant::now();
        stream.idle_for(limit).await;
        assert_eq!(Instant::now(), before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_goes_after_the_first_bound_an_idle_one_after_the_idle_time() {
        let first = Duration::from_secs(30);
        let idle = Duration::from_secs(3600);
        // Nothing at all: closed after `first`.
        let (_client, server) = tokio::io::duplex(64);
        let (_s, activity) = Watched::new(server);
        let t0 = Instant::now();
        assert_eq!(activity.expired(first, idle).await, "nothing received");
        assert_eq!(t0.elapsed(), first);
        // Traffic, then silence: closed an idle time after the last byte.
        let (mut client, server) = tokio::io::duplex(64);
        let (mut s, activity) = Watched::new(server);
        let watch = tokio::spawn(async move { activity.expired(first, idle).await });
        tokio::time::sleep(Duration::from_secs(10)).await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).await.unwrap();
        let t1 = Instant::now();
        tokio::time::sleep(Duration::from_secs(1800)).await;
        s.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        let t2 = Instant::now();
        assert_eq!(watch.await.unwrap(), "idle");
        assert!(Instant::now() >= t2 + idle && t2 > t1, "counted from the last byte either way");
        // A request in flight (a sparse stream, a long poll) keeps the connection, silent or
        // not, and the idle time counts from its end.
        let (_client, server) = tokio::io::duplex(64);
        let (mut s, activity) = Watched::new(server);
        s.write_all(b"x").await.unwrap();
        let request = activity.request();
        let watch = tokio::spawn({
            let activity = activity.clone();
            async move { activity.expired(first, idle).await }
        });
        tokio::time::sleep(idle * 3).await;
        assert!(!watch.is_finished(), "closed under a request in flight");
        drop(request);
        let ended = Instant::now();
        assert_eq!(watch.await.unwrap(), "idle");
        assert!(Instant::now() >= ended + idle);
    }
}

/// HTTP/2 rapid reset (CVE-2023-44487): a client that opens streams and resets them at once
/// costs the waypoint a routed, maybe mirrored request each, while h2 frees its stream slot
/// immediately, so its concurrency limit never holds it back. As Envoy counts "premature"
/// resets, a connection whose requests are mostly cancelled within a second of their start,
/// past a minimum count, is closed.
#[derive(Debug, Default)]
pub struct Resets {
    closed: AtomicU64,
    premature: AtomicU64,
    abusive: tokio::sync::Notify,
}

/// Closed requests before a connection is judged (Envoy's
/// `premature_reset_total_stream_count` default); then half of them premature is abuse.
const PREMATURE_MIN: u64 = 500;
/// A cancellation this soon after the request started is premature.
const PREMATURE_WITHIN: Duration = Duration::from_secs(1);

impl Resets {
    /// A request started; the guard notes whether it finished or was cancelled.
    pub fn start(self: &Arc<Self>) -> RequestWatch {
        RequestWatch { resets: self.clone(), start: Instant::now(), done: false }
    }

    /// Completes once the connection's requests are mostly premature resets.
    pub async fn abusive(&self) {
        self.abusive.notified().await;
    }

    fn closed(&self, premature: bool) {
        let closed = self.closed.fetch_add(1, Ordering::Relaxed) + 1;
        let premature = self.premature.fetch_add(u64::from(premature), Ordering::Relaxed)
            + u64::from(premature);
        if closed >= PREMATURE_MIN && premature * 2 >= closed {
            self.abusive.notify_one();
        }
    }
}

/// One request of a connection, watched for a premature cancel.
#[derive(Debug)]
pub struct RequestWatch {
    resets: Arc<Resets>,
    start: Instant,
    done: bool,
}

impl RequestWatch {
    /// The request was answered (not cancelled).
    pub fn finished(mut self) {
        self.done = true;
    }
}

impl Drop for RequestWatch {
    fn drop(&mut self) {
        self.resets.closed(!self.done && self.start.elapsed() < PREMATURE_WITHIN);
    }
}

#[cfg(test)]
mod reset_tests {
    use super::*;

    #[tokio::test]
    async fn mostly_premature_resets_mark_a_connection_abusive_and_normal_traffic_does_not() {
        let r = Arc::new(Resets::default());
        // Normal use: answered requests and a few cancels.
        for i in 0..1000 {
            let w = r.start();
            if i % 10 != 0 {
                w.finished();
            }
        }
        let quiet = tokio::time::timeout(Duration::from_millis(50), r.abusive()).await.is_err();
        assert!(quiet, "100 cancels in 1,000 requests is not abuse");
        // Nor is a short burst of cancels on a young connection.
        let young = Arc::new(Resets::default());
        for _ in 0..100 {
            drop(young.start());
        }
        let quiet = tokio::time::timeout(Duration::from_millis(50), young.abusive()).await.is_err();
        assert!(quiet, "judged only past {PREMATURE_MIN} closed requests");
        // A rapid-reset loop: every new request cancelled at once.
        let r = Arc::new(Resets::default());
        let abusive = tokio::spawn({
            let r = r.clone();
            async move { r.abusive().await }
        });
        tokio::task::yield_now().await;
        for _ in 0..PREMATURE_MIN / 2 {
            drop(r.start());
        }
        for _ in 0..PREMATURE_MIN / 2 {
            r.start().finished();
        }
        tokio::time::timeout(Duration::from_secs(1), abusive).await.expect("flagged").unwrap();
    }
}

/// A response body holding its request's [`InFlight`] until it ends or is dropped.
pub struct Holding<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Holding<B> {
    /// `body`, counting `in_flight` while it lives.
    pub fn new(body: B, in_flight: InFlight) -> Self {
        Self { body, _in_flight: in_flight }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Holding<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
