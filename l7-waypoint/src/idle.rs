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
