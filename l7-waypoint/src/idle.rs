//! Idle client connections: a stream wrapper that notes when bytes last moved, and a watch
//! that ends the connection when none came at all within a first bound (a client that opens a
//! tunnel and sends nothing, or half an HTTP/2 preface, which hyper's version detection would
//! wait on forever), or none moved either way for the idle timeout.

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
}

const NOTHING_YET: u64 = u64::MAX;

impl Activity {
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
                return "idle";
            }
            deadline = next;
        }
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
        let activity =
            Arc::new(Activity { start: Instant::now(), last_ms: AtomicU64::new(NOTHING_YET) });
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
    }
}

/// HTTP/2 rapid reset (CVE-2023-44487): a client that opens streams and resets them at once
/// costs the waypoint a routed, maybe mirrored request each, while h2 frees its stream slot
/// immediately, so its concurrency limit never holds it back. As Envoy counts "premature"
/// resets, a connection whose requests are mostly cancelled within a second of their start,
/// past a minimum count, is closed.
#[derive(Debug, Default)]
pub struct Resets {
    total: AtomicU64,
    premature: AtomicU64,
    abusive: tokio::sync::Notify,
}

/// Requests cancelled early before a connection can be judged abusive (Envoy's
/// `premature_reset_total_stream_count` default is 500; this is lower since each of our
/// requests may fan out to mirrors).
const PREMATURE_MIN: u64 = 100;
/// A cancellation this soon after the request started is premature.
const PREMATURE_WITHIN: Duration = Duration::from_secs(1);

impl Resets {
    /// A request started; the guard notes whether it finished or was cancelled.
    pub fn start(self: &Arc<Self>) -> RequestWatch {
        self.total.fetch_add(1, Ordering::Relaxed);
        RequestWatch { resets: self.clone(), start: Instant::now(), done: false }
    }

    /// Completes once the connection's requests are mostly premature resets.
    pub async fn abusive(&self) {
        self.abusive.notified().await;
    }

    fn cancelled_early(&self) {
        let premature = self.premature.fetch_add(1, Ordering::Relaxed) + 1;
        let total = self.total.load(Ordering::Relaxed);
        if premature >= PREMATURE_MIN && premature * 2 >= total {
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
        if !self.done && self.start.elapsed() < PREMATURE_WITHIN {
            self.resets.cancelled_early();
        }
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
        // A rapid-reset loop: every new request cancelled at once.
        let r = Arc::new(Resets::default());
        let abusive = tokio::spawn({
            let r = r.clone();
            async move { r.abusive().await }
        });
        tokio::task::yield_now().await;
        for _ in 0..PREMATURE_MIN {
            drop(r.start());
        }
        tokio::time::timeout(Duration::from_secs(1), abusive).await.expect("flagged").unwrap();
    }
}
