//! Request bodies for routes that retry: the body streams to the first try as it arrives while
//! a copy is kept, so a failed try can be repeated without first waiting for the whole body,
//! as Envoy's retry buffering does. gRPC streams (bidirectional ones included) and uploads
//! flow at once; a retry replays what was sent and goes on with the rest. Past the limit the
//! copy is dropped and the request is no longer retried, but it keeps streaming.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker},
};

/// The most bytes every request's replay copies may hold together: retries are on by
/// default, so every body is copied while its tries may need it, and many concurrent uploads
/// to a slow backend would otherwise hold their copies without any bound but the number of
/// requests. Past it a request streams without a copy, and is not retried (as past its own
/// limit).
pub const REPLAY_BUDGET: usize = 64 << 20;

/// Bytes replay copies may hold together, and hold now.
#[derive(Debug)]
pub struct Budget {
    max: usize,
    held: AtomicUsize,
}

impl Budget {
    /// A budget of `max` bytes.
    pub const fn new(max: usize) -> Self {
        Self { max, held: AtomicUsize::new(0) }
    }

    /// Takes `n` bytes, if they are left.
    fn reserve(&self, n: usize) -> bool {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(n).filter(|total| *total <= self.max)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::Relaxed);
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// The process's budget ([`REPLAY_BUDGET`]).
pub static REPLAY: Budget = Budget::new(REPLAY_BUDGET);

/// A mirror's copy of a whole request body ([`Recorder::whole`]), counted in the budget it
/// was taken from for as long as it lives: a mirror to a slow backend keeps its copy up to
/// its timeout, after the request's own copy is gone. It is the mirror request's body, so
/// it lives until hyper has sent it and let it go.
#[derive(Debug)]
pub struct WholeBody {
    /// The body; taken once sent.
    pub bytes: Bytes,
    held: Option<(&'static Budget, usize)>,
}

impl Body for WholeBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.bytes.is_empty() {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut self.bytes)))))
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.bytes.len() as u64)
    }
}

impl WholeBody {
    /// A body counted in no budget (one the request holds anyway).
    pub fn unbudgeted(bytes: Bytes) -> Self {
        Self { bytes, held: None }
    }
}

impl Drop for WholeBody {
    fn drop(&mut self) {
        if let Some((budget, n)) = self.held.take() {
            budget.release(n);
        }
    }
}

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

/// The error type of bodies sent upstream.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the tries of one request share.
struct Shared<B> {
    /// The client's body.
    source: B,
    /// The client's body has ended (its trailers, if any, are in `trailers`).
    source_done: bool,
    /// Every data frame read so far, while `kept` is `Some`.
    chunks: Vec<Bytes>,
    /// Bytes in `chunks`; `None` once the limit was passed (or the client's body failed) and
    /// the copy was dropped.
    kept: Option<usize>,
    trailers: Option<HeaderMap>,
    /// Cleared when the [`Recorder`] goes (no try can follow): the live try streams on without
    /// a copy, and what it has sent is freed.
    recording: bool,
    /// The newest try: the only one that may read on.
    current: u32,
    /// The try waiting for the client's body, woken when a newer try supersedes it so it
    /// fails (and its upstream request is abandoned) instead of waiting forever.
    waiting: Option<Waker>,
    /// A mirror wants the whole body: the copy is kept until the client's body ends, even
    /// once no try can follow.
    mirrored: bool,
    /// The answer came before the body ended: the mirror gets nothing ([`Whole`] gives
    /// `None`), and the copy goes once the live try has caught up with it.
    mirror_cancelled: bool,
    /// The mirrors waiting for the whole body ([`Recorder::whole`]).
    whole_waiters: Vec<Waker>,
    /// Bytes of `chunks` counted in `budget`.
    reserved: usize,
    budget: &'static Budget,
}

impl<B> Drop for Shared<B> {
    fn drop(&mut self) {
        self.budget.release(self.reserved);
    }
}

impl<B> Shared<B> {
    /// The copy goes: its bytes return to the budget.
    fn drop_chunks(&mut self) {
        self.chunks = Vec::new();
        self.budget.release(std::mem::take(&mut self.reserved));
    }

    /// The whole body is known, or known to be lost: wake the mirror waiting for it.
    fn settled(&mut self) {
        for w in self.whole_waiters.drain(..) {
            w.wake();
        }
    }
}

/// Keeps the copy of a request body and hands out one body per try.
pub struct Recorder<B> {
    shared: Arc<Mutex<Shared<B>>>,
    limit: usize,
    hint: SizeHint,
}

impl<B> Recorder<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Records `source`, keeping at most `limit` bytes for replays, within the process's
    /// [`REPLAY`] budget.
    pub fn new(source: B, limit: usize) -> Self {
        Self::within(source, limit, &REPLAY)
    }

    /// Like [`Recorder::new`], within `budget`.
    pub fn within(source: B, limit: usize, budget: &'static Budget) -> Self {
        let hint = source.size_hint();
        let shared = Shared {
            source,
            source_done: false,
            chunks: Vec::new(),
            kept: Some(0),
            trailers: None,
            recording: true,
            current: 0,
            waiting: None,
            mirrored: false,
            mirror_cancelled: false,
            whole_waiters: Vec::new(),
            reserved: 0,
            budget,
        };
        Self { shared: Arc::new(Mutex::new(shared)), limit, hint }
    }

    /// The body of the next try. From now on an earlier try's body fails if it is read again,
    /// so no two tries take bytes from the client's body.
    pub fn next_try(&self) -> ReplayBody<B> {
        let mut s = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        s.current += 1;
        if let Some(w) = s.waiting.take() {
            w.wake();
        }
        ReplayBody {
            shared: self.shared.clone(),
            limit: self.limit,
            hint: self.hint,
            id: s.current,
            pos: 0,
            trailers_sent: false,
        }
    }

    /// Whether another try can send the whole body again.
    pub fn replayable(&self) -> bool {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner).kept.is_some()
    }

    /// The whole body once the tries have read it to its end, for a mirror: `None` if it
    /// passed the limit or failed, or if its copy does not fit in the budget. The tries are
    /// never held back for it (a mirror must not delay the request it copies).
    pub fn whole(&self) -> Whole<B> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner).mirrored = true;
        Whole { shared: self.shared.clone() }
    }
}

/// The future of [`Recorder::whole`].
pub struct Whole<B> {
    shared: Arc<Mutex<Shared<B>>>,
}

impl<B> std::future::Future for Whole<B> {
    type Output = Option<WholeBody>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WholeBody>> {
        let mut s = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(len) = s.kept.filter(|_| !s.mirror_cancelled) else {
            return Poll::Ready(None);
        };
        if s.source_done {
            // Past the budget there is no mirror, as past the request's own limit.
            if !s.budget.reserve(len) {
                return Poll::Ready(None);
            }
            let mut whole = bytes::BytesMut::with_capacity(len);
            for c in &s.chunks {
                whole.extend_from_slice(c);
            }
            let held = Some((s.budget, len));
            return Poll::Ready(Some(WholeBody { bytes: whole.freeze(), held }));
        }
        if !s.whole_waiters.iter().any(|w| w.will_wake(cx.waker())) {
            s.whole_waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl<B> Drop for Recorder<B> {
    fn drop(&mut self) {
        // The answer is committed: no try follows, so stop copying what the live one sends.
        // A mirror gets the body only if it had all arrived by then (a stream that goes on
        // past its response's headers, a bidirectional gRPC call, is not mirrored): so it
        // never holds the client's body, or a copy of a long stream, beyond the answer.
        let mut s = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        s.recording = false;
        // The live try frees the copy on its next poll once it has caught up: wake it now,
        // or a stream that went quiet after its answer began would hold its copy for life.
        if let Some(w) = s.waiting.take() {
            w.wake();
        }
        if s.mirrored && !s.source_done {
            // The copy itself stays until the live try has replayed it (a retry may be
            // part-way through it); only the mirror gives up.
            s.mirrored = false;
            s.mirror_cancelled = true;
            s.settled();
        }
    }
}

/// One try's view of the request body: the recorded frames, then the rest as it arrives.
pub struct ReplayBody<B> {
    shared: Arc<Mutex<Shared<B>>>,
    limit: usize,
    hint: SizeHint,
    id: u32,
    /// The next recorded frame to send.
    pos: usize,
    trailers_sent: bool,
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut guard = this.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let s = &mut *guard;
        if s.current != this.id {
            return Poll::Ready(Some(Err("request body superseded by a retry".into())));
        }
        if s.kept.is_some()
            && let Some(chunk) = s.chunks.get(this.pos)
        {
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if !s.recording && !s.mirrored && !s.chunks.is_empty() {
            // Everything recorded was sent and nothing will replay it (nor mirror it).
            s.drop_chunks();
            this.pos = 0;
        }
        if s.source_done {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = &s.trailers {
                    return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
                }
            }
            return Poll::Ready(None);
        }
        match Pin::new(&mut s.source).poll_frame(cx) {
            Poll::Pending => {
                s.waiting = Some(cx.waker().clone());
                Poll::Pending
            }
            Poll::Ready(None) => {
                s.source_done = true;
                s.settled();
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                // A broken client body cannot be sent whole again.
                s.kept = None;
                s.drop_chunks();
                s.settled();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && s.recording
                {
                    match s.kept.map(|k| k + data.len()) {
                        Some(k) if k <= this.limit && s.budget.reserve(data.len()) => {
                            s.kept = Some(k);
                            s.reserved += data.len();
                            s.chunks.push(data.clone());
                            this.pos = s.chunks.len();
                        }
                        Some(_) => {
                            s.kept = None;
                            s.drop_chunks();
                            s.settled();
                        }
                        None => {}
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
                // A body of known length may never be polled to its end (hyper stops once the
                // length is sent): what the client's body says counts as its end too.
                if s.source.is_end_stream() {
                    s.source_done = true;
                    this.trailers_sent = true;
                    s.settled();
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http_body_util::BodyExt;

    use super::*;

    /// A client body: frames handed out one per poll, `None` meaning "not yet" (Pending);
    /// once they are out it ends, or with `stall` it never answers again (a client that has
    /// not sent the rest).
    struct Script(VecDeque<Option<Frame<Bytes>>>, bool);

    impl Body for Script {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            match self.0.pop_front() {
                Some(Some(f)) => Poll::Ready(Some(Ok(f))),
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                None if self.1 => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    fn script(parts: &[&'static str], trailer: bool) -> Script {
        let mut frames: VecDeque<Option<Frame<Bytes>>> = parts
            .iter()
            .flat_map(|p| [Some(Frame::data(Bytes::from_static(p.as_bytes()))), None])
            .collect();
        if trailer {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static("0"));
            frames.push_back(Some(Frame::trailers(t)));
        }
        Script(frames, false)
    }

    /// Reads `n` frames (all when `None`): (data, whether trailers came).
    async fn read(body: &mut ReplayBody<Script>, n: Option<usize>) -> (String, bool) {
        let (mut data, mut trailers) = (String::new(), false);
        let mut left = n.unwrap_or(usize::MAX);
        while left > 0 {
            let Some(f) = body.frame().await else { break };
            let f = f.expect("frame");
            if let Some(d) = f.data_ref() {
                data.push_str(std::str::from_utf8(d).expect("utf-8"));
            }
            trailers |= f.is_trailers();
            left -= 1;
        }
        (data, trailers)
    }

    #[tokio::test]
    async fn copies_beyond_the_process_budget_are_not_kept_and_go_back_to_it() {
        static SMALL: Budget = Budget::new(6);
        let a = Recorder::within(script(&["ab", "cd"], false), 1024, &SMALL);
        let mut ta = a.next_try();
        assert_eq!(read(&mut ta, None).await, ("abcd".into(), false));
        assert!(a.replayable());
        assert_eq!(SMALL.held(), 4);
        // A second request: its first 2 bytes fit, the next 2 do not; it streams on without
        // a copy and is no longer retried.
        let b = Recorder::within(script(&["ef", "gh"], false), 1024, &SMALL);
        let mut tb = b.next_try();
        assert_eq!(read(&mut tb, None).await, ("efgh".into(), false));
        assert!(!b.replayable());
        assert_eq!(SMALL.held(), 4, "what b kept went back");
        drop((ta, a));
        assert_eq!(SMALL.held(), 0, "all of it back once the requests are gone");
    }

    #[tokio::test]
    async fn a_quiet_stream_lets_its_copy_go_once_no_try_can_follow() {
        static QUIET: Budget = Budget::new(1024);
        // The client sends "ab", then nothing more for now (a bidirectional stream).
        let mut body = script(&["ab"], false);
        body.1 = true;
        let rec = Recorder::within(body, 1024, &QUIET);
        let mut live = rec.next_try();
        assert_eq!(read(&mut live, Some(1)).await, ("ab".into(), false));
        assert_eq!(QUIET.held(), 2);
        let waiting = tokio::spawn(async move { (live.frame().await.is_none(), QUIET.held()) });
        tokio::task::yield_now().await;
        // The answer came: no try follows, and the waiting try is woken to free the copy.
        drop(rec);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(QUIET.held(), 0, "the copy of a quiet stream went");
        waiting.abort();
    }

    #[tokio::test]
    async fn a_retry_replays_what_was_sent_then_streams_the_rest() {
        let rec = Recorder::new(script(&["ab", "cd", "ef"], true), 1024);
        let mut first = rec.next_try();
        assert_eq!(read(&mut first, Some(2)).await, ("abcd".into(), false));
        assert!(rec.replayable());
        let mut second = rec.next_try();
        assert_eq!(read(&mut second, None).await, ("abcdef".into(), true));
        // The first try was superseded: it cannot take bytes meant for the second.
        assert!(first.frame().await.expect("a frame").is_err());
        // A third try gets the whole body and the trailers again.
        let mut third = rec.next_try();
        assert_eq!(read(&mut third, None).await, ("abcdef".into(), true));
    }

    #[tokio::test]
    async fn a_try_waiting_for_the_client_fails_when_a_retry_supersedes_it() {
        // The client's body: one frame, then nothing yet.
        let rec = Recorder::new(
            Script(VecDeque::from([Some(Frame::data(Bytes::from_static(b"ab")))]), true),
            1024,
        );
        let mut first = rec.next_try();
        assert_eq!(read(&mut first, Some(1)).await, ("ab".into(), false));
        let waiting = tokio::spawn(async move { first.frame().await.map(|f| f.is_err()) });
        tokio::task::yield_now().await;
        let mut second = rec.next_try();
        let woken = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await;
        assert_eq!(woken.expect("the first try was woken").expect("task"), Some(true));
        assert_eq!(read(&mut second, Some(1)).await, ("ab".into(), false));
    }

    #[tokio::test]
    async fn once_no_try_can_follow_the_live_one_streams_on_without_a_copy() {
        let rec = Recorder::new(script(&["ab", "cd", "ef"], false), 1024);
        let _first = rec.next_try();
        let mut second = rec.next_try();
        assert_eq!(read(&mut second, Some(1)).await, ("ab".into(), false));
        drop(rec);
        assert_eq!(read(&mut second, None).await, ("cdef".into(), false));
        assert!(second.shared.lock().expect("lock").chunks.is_empty());
    }

    #[tokio::test]
    async fn past_the_limit_the_body_streams_on_but_is_not_replayable() {
        let rec = Recorder::new(script(&["abcd", "efgh", "ij"], false), 6);
        let mut first = rec.next_try();
        assert_eq!(read(&mut first, None).await, ("abcdefghij".into(), false));
        assert!(!rec.replayable());
    }

    #[tokio::test]
    async fn a_mirror_gets_the_whole_body_once_the_try_has_read_it() {
        let rec = Recorder::new(script(&["ab", "cd"], false), 64);
        let (whole, again) = (rec.whole(), rec.whole());
        let mut first = rec.next_try();
        let (data, _) = read(&mut first, None).await;
        assert_eq!(data, "abcd");
        drop(rec);
        // The try polls once more after the answer: the copy must outlive that.
        assert!(first.frame().await.is_none());
        let bytes = |w: Option<WholeBody>| w.map(|w| w.bytes.clone());
        assert_eq!(bytes(whole.await).as_deref(), Some(&b"abcd"[..]));
        assert_eq!(bytes(again.await).as_deref(), Some(&b"abcd"[..]), "every mirror gets it");

        // The answer came before the body ended (a stream): no mirror, nothing held.
        let rec = Recorder::new(script(&["ab", "cd"], false), 64);
        let whole = rec.whole();
        let mut first = rec.next_try();
        read(&mut first, Some(1)).await;
        drop(rec);
        assert!(whole.await.is_none());

        // Past the limit there is no copy to mirror.
        let rec = Recorder::new(script(&["abcdef"], false), 4);
        let whole = rec.whole();
        let mut first = rec.next_try();
        read(&mut first, None).await;
        assert!(whole.await.is_none());
    }

    #[tokio::test]
    async fn a_mirrors_copy_counts_in_the_budget_until_the_mirror_lets_it_go() {
        static MIRRORS: Budget = Budget::new(10);
        let rec = Recorder::within(script(&["ab", "cd"], false), 64, &MIRRORS);
        let (whole, again, third) = (rec.whole(), rec.whole(), rec.whole());
        let mut first = rec.next_try();
        read(&mut first, None).await;
        assert_eq!(MIRRORS.held(), 4, "the request's copy");
        let whole = whole.await.expect("fits");
        assert_eq!(MIRRORS.held(), 8, "and the mirror's");
        // A second mirror's copy would pass the budget: that mirror is not sent.
        assert!(again.await.is_none());
        drop(whole);
        assert_eq!(MIRRORS.held(), 4, "a mirror done with its copy gives it back");
        let mut third = third.await.expect("fits again");
        drop((first, rec));
        assert_eq!(MIRRORS.held(), 4, "the request has gone, its mirror holds on");
        // Sent as a body: its place in the budget goes when the sender drops it, not sooner.
        let sent = third.frame().await.expect("a frame").expect("data").into_data().ok();
        assert_eq!(sent.as_deref(), Some(&b"abcd"[..]));
        assert!(third.frame().await.is_none());
        assert_eq!(MIRRORS.held(), 4, "held while the sender holds the body");
        drop(third);
        assert_eq!(MIRRORS.held(), 0);
    }

    #[tokio::test]
    async fn a_retry_part_way_through_its_replay_when_the_answer_comes_gets_the_whole_body() {
        let rec = Recorder::new(script(&["ab", "cd", "ef"], false), 64);
        let whole = rec.whole();
        let mut first = rec.next_try();
        read(&mut first, Some(2)).await;
        let mut second = rec.next_try();
        read(&mut second, Some(1)).await;
        // The answer arrives (the recorder goes) while the retry has replayed only "ab".
        drop(rec);
        let (rest, _) = read(&mut second, None).await;
        assert_eq!(rest, "cdef", "the replay goes on, then the live body");
        assert!(whole.await.is_none(), "no mirror for a body that outlived its answer");
    }
}
