//! One tunnelled connection as a byte stream.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream, client::ResponseFuture, server::SendResponse};
use http::{Response, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

use crate::HboneError;

/// Largest DATA frame payload we queue at once; h2 splits it to the peer's frame size.
const MAX_WRITE: usize = 256 << 10;
/// Read size from TCP in [`H2Stream::copy_tcp`].
const READ_CHUNK: usize = 256 << 10;
/// Below this much free buffer, a fresh chunk is reserved before reading.
const MIN_READ: usize = 16 << 10;

/// How long a server holding its 200 back (see [`crate::Inbound::accept_with_answer`]) waits
/// for the application's first bytes before answering alone. Only the client's bookkeeping
/// waits on it: bytes flow both ways meanwhile.
pub const ANSWER_WAIT: Duration = Duration::from_secs(1);

/// The sending half: open, or (a server holding its 200 back) not yet answered.
enum Tx {
    Open(SendStream<Bytes>),
    Unanswered(SendResponse<Bytes>),
}

impl Tx {
    /// The stream to send on, answering 200 first if that was held back.
    fn open(&mut self) -> io::Result<&mut SendStream<Bytes>> {
        if let Tx::Unanswered(respond) = self {
            let mut ok = Response::new(());
            *ok.status_mut() = StatusCode::OK;
            *self = Tx::Open(respond.send_response(ok, false).map_err(to_io)?);
        }
        match self {
            Tx::Open(send) => Ok(send),
            Tx::Unanswered(_) => Err(io::Error::other("HBONE answer not sent")),
        }
    }

    /// Resets the stream. A held-back 200 goes out first: the tunnel was accepted and the
    /// connection behind it ended, which is what the client should count.
    fn reset(&mut self, reason: Reason) {
        match self.open() {
            Ok(send) => send.send_reset(reason),
            Err(_) => {
                if let Tx::Unanswered(respond) = self {
                    respond.send_reset(reason);
                }
            }
        }
    }
}

/// The receiving half: open, (an optimistic client) still waiting for the peer's answer, or
/// the answer failed (kept, as h2's response future must not be polled again).
enum Rx {
    Open(RecvStream),
    Awaiting(Box<Awaiting>),
    Failed(AnswerFailure),
}

/// A `CONNECT` sent without waiting for its answer.
struct Awaiting {
    response: ResponseFuture,
    peer: SocketAddr,
    authority: SocketAddr,
    /// The peer must answer within [`crate::client::CONNECT_TIMEOUT`].
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Told when the deadline passes (the pool retires a connection whose peer stopped
    /// answering CONNECTs).
    on_timeout: Option<Box<dyn FnOnce() + Send + Sync>>,
}

/// Why the answer to a `CONNECT` sent without waiting did not open the tunnel.
#[derive(Debug, Clone)]
enum AnswerFailure {
    Refused { peer: SocketAddr, authority: SocketAddr, status: StatusCode },
    Other { kind: io::ErrorKind, message: String },
}

impl AnswerFailure {
    fn to_error(&self) -> io::Error {
        match self {
            AnswerFailure::Refused { peer, authority, status } => {
                let e = HboneError::Refused { peer: *peer, authority: *authority, status: *status };
                io::Error::new(io::ErrorKind::ConnectionRefused, e)
            }
            AnswerFailure::Other { kind, message } => io::Error::new(*kind, message.clone()),
        }
    }
}

impl Rx {
    /// Waits for the peer's answer, if not yet here: Ok once the tunnel is up (200), an
    /// error carrying [`HboneError::Refused`] for any other answer (the same error again on
    /// every later call).
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let a = match self {
            Rx::Open(_) => return Poll::Ready(Ok(())),
            Rx::Failed(f) => return Poll::Ready(Err(f.to_error())),
            Rx::Awaiting(a) => a,
        };
        let (peer, authority) = (a.peer, a.authority);
        let failure = match Pin::new(&mut a.response).poll(cx) {
            Poll::Ready(Ok(response)) if response.status() == StatusCode::OK => {
                *self = Rx::Open(response.into_body());
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Ok(response)) => {
                AnswerFailure::Refused { peer, authority, status: response.status() }
            }
            Poll::Ready(Err(e)) => {
                let e = to_io(e);
                AnswerFailure::Other { kind: e.kind(), message: e.to_string() }
            }
            Poll::Pending => {
                ready!(a.deadline.as_mut().poll(cx));
                if let Some(retire) = a.on_timeout.take() {
                    retire();
                }
                let e = HboneError::Timeout { what: "an answer to CONNECT", peer };
                AnswerFailure::Other { kind: io::ErrorKind::TimedOut, message: e.to_string() }
            }
        };
        let e = failure.to_error();
        *self = Rx::Failed(failure);
        Poll::Ready(Err(e))
    }

    fn open(&mut self) -> io::Result<&mut RecvStream> {
        match self {
            Rx::Open(recv) => Ok(recv),
            Rx::Awaiting(_) => Err(io::Error::other("HBONE answer not received")),
            Rx::Failed(f) => Err(f.to_error()),
        }
    }
}

/// The bytes of one `CONNECT` stream, both ways. A clean end (`poll_shutdown`) sends
/// `END_STREAM` (half-close); dropping the stream before both ways ended sends `RST_STREAM`
/// (CANCEL), which the peer passes on as a TCP reset. A reset from the peer reads as
/// `ConnectionReset`. A stream opened without waiting for the answer (optimistic) also
/// fails with `ConnectionRefused` carrying [`HboneError::Refused`] when the peer refuses
/// the tunnel, and `TimedOut` when it does not answer.
pub struct H2Stream {
    send: Tx,
    recv: Rx,
    /// Received but not yet read.
    pending: Bytes,
    read_done: bool,
    write_done: bool,
    /// Drop ends an unfinished stream with RST_STREAM (true) or END_STREAM (false).
    reset_on_drop: bool,
    /// A `Drop` guard, so pooled connections know when their streams end.
    _guard: Option<Box<dyn Send + Sync>>,
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self::with_halves(Tx::Open(send), Rx::Open(recv))
    }

    /// A server's stream whose 200 is sent with the first bytes to the peer (or at EOF, or
    /// after [`ANSWER_WAIT`] in [`Self::copy_tcp`]).
    pub(crate) fn unanswered(respond: SendResponse<Bytes>, recv: RecvStream) -> Self {
        Self::with_halves(Tx::Unanswered(respond), Rx::Open(recv))
    }

    /// A client's stream whose `CONNECT` is not answered yet: bytes may go out at once, bytes
    /// in wait for the answer, and a refusal is the stream's error.
    pub(crate) fn awaiting(
        send: SendStream<Bytes>,
        response: ResponseFuture,
        peer: SocketAddr,
        authority: SocketAddr,
    ) -> Self {
        let deadline = Box::pin(tokio::time::sleep(crate::client::CONNECT_TIMEOUT));
        let awaiting = Awaiting { response, peer, authority, deadline, on_timeout: None };
        Self::with_halves(Tx::Open(send), Rx::Awaiting(Box::new(awaiting)))
    }

    /// Calls `f` if the peer does not answer the `CONNECT` in time.
    pub(crate) fn on_answer_timeout(mut self, f: Box<dyn FnOnce() + Send + Sync>) -> Self {
        if let Rx::Awaiting(a) = &mut self.recv {
            a.on_timeout = Some(f);
        }
        self
    }

    /// Whether the peer's answer to a `CONNECT` sent without waiting arrived and was not a
    /// 200, or did not arrive in time, or the stream failed before it: the tunnel never
    /// opened (as opposed to a copy that failed on the application's side).
    pub fn answer_failed(&self) -> bool {
        matches!(self.recv, Rx::Failed(_))
    }

    fn with_halves(send: Tx, recv: Rx) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            read_done: false,
            write_done: false,
            reset_on_drop: true,
            _guard: None,
        }
    }

    pub(crate) fn with_guard(mut self, guard: Box<dyn Send + Sync>) -> Self {
        self._guard = Some(guard);
        self
    }

    /// Waits for the peer's answer to the `CONNECT`, for a stream opened without waiting
    /// (at once otherwise): Ok when the tunnel is up, [`HboneError::Refused`] with the
    /// status otherwise.
    pub async fn answered(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.recv.poll_answer(cx)).await
    }

    /// The refusal that arrived, if the peer already answered with one: after a copy failed
    /// while the answer was outstanding, the refusal is the better reason.
    fn refusal_now(&mut self) -> Option<io::Error> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.recv.poll_answer(&mut cx) {
            Poll::Ready(Err(e)) if refused(&e).is_some() => Some(e),
            _ => None,
        }
    }

    /// Copies between this stream and `tcp` both ways until both ends finish: bytes read
    /// from `tcp` go out as DATA frames without an intermediate copy, DATA received is written
    /// straight to `tcp`, and the window is handed back only once written (backpressure).
    /// EOF either way is passed on as a half-close. Returns (bytes to the peer, bytes from
    /// it). On error the stream is reset; the caller resets `tcp`. `progress` is told each
    /// chunk as it goes, (to the peer, from the peer), so metrics of a long-lived connection
    /// move while it lives.
    pub async fn copy_tcp(
        &mut self,
        tcp: &mut TcpStream,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> io::Result<(u64, u64)> {
        self.copy_tcp_with(tcp, progress, &|| {}).await
    }

    /// [`Self::copy_tcp`], calling `answered` once the peer's 200 is in (at once if it was
    /// before): for a stream opened without waiting, whose refusal is the copy's error (an
    /// `io::Error` carrying [`HboneError::Refused`], see [`refused`]).
    pub async fn copy_tcp_with(
        &mut self,
        tcp: &mut TcpStream,
        progress: &(dyn Fn(u64, u64) + Sync),
        answered: &(dyn Fn() + Sync),
    ) -> io::Result<(u64, u64)> {
        let pending = std::mem::take(&mut self.pending);
        let result = {
            let (mut tcp_r, mut tcp_w) = tcp.split();
            let (tx, rx) = (&mut self.send, &mut self.recv);
            let upload = async {
                let mut total = 0u64;
                let mut buf = BytesMut::new();
                // A held-back 200 leaves with the application's first bytes, in one TLS record
                // (or alone at its EOF, or after ANSWER_WAIT of silence).
                let mut first = None;
                if matches!(tx, Tx::Unanswered(_)) {
                    buf.reserve(READ_CHUNK);
                    if let Ok(read) =
                        tokio::time::timeout(ANSWER_WAIT, tcp_r.read_buf(&mut buf)).await
                    {
                        first = Some(read?);
                    }
                }
                let send = tx.open()?;
                'copy: loop {
                    let n = match first.take() {
                        Some(n) => n,
                        None => {
                            if buf.capacity() < MIN_READ {
                                buf.reserve(READ_CHUNK);
                            }
                            tcp_r.read_buf(&mut buf).await?
                        }
                    };
                    if n == 0 {
                        send.send_data(Bytes::new(), true).map_err(to_io)?;
                        return Ok::<_, io::Error>(total);
                    }
                    total += n as u64;
                    progress(n as u64, 0);
                    let mut data = buf.split().freeze();
                    while !data.is_empty() {
                        send.reserve_capacity(data.len());
                        let granted = std::future::poll_fn(|cx| send.poll_capacity(cx)).await;
                        match granted {
                            Some(Ok(0)) => continue,
                            Some(Ok(n)) => {
                                let chunk = data.split_to(n.min(data.len()));
                                match send.send_data(chunk, false) {
                                    Err(e) if stops_sending(&e) => break 'copy,
                                    sent => sent.map_err(to_io)?,
                                }
                            }
                            Some(Err(e)) if stops_sending(&e) => break 'copy,
                            Some(Err(e)) => return Err(to_io(e)),
                            None => {
                                // Reset under us. NO_ERROR is the peer saying it needs no
                                // more (its app answered and closed, RFC 9113 section 8.1):
                                // stop sending and let its answer finish arriving.
                                let reason = std::future::poll_fn(|cx| send.poll_reset(cx)).await;
                                if matches!(reason, Ok(Reason::NO_ERROR)) {
                                    break 'copy;
                                }
                                return Err(io::Error::new(
                                    io::ErrorKind::ConnectionReset,
                                    format!("stream reset by peer: {reason:?}"),
                                ));
                            }
                        }
                    }
                }
                // The peer needs no more: read the rest and drop it until the app's EOF
                // (bounded), as closing a socket with unread bytes would reset it, and the
                // kernel would throw away the answer the app has not read yet.
                let drain = async {
                    loop {
                        buf.clear();
                        buf.reserve(READ_CHUNK);
                        if !matches!(tcp_r.read_buf(&mut buf).await, Ok(n) if n > 0) {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(DRAIN_LIMIT, drain).await;
                Ok(total)
            };
            let download = async {
                std::future::poll_fn(|cx| rx.poll_answer(cx)).await?;
                answered();
                let recv = rx.open()?;
                let mut total = pending.len() as u64;
                // Counted as received from the peer, before being written on.
                if !pending.is_empty() {
                    progress(0, total);
                    tcp_w.write_all(&pending).await?;
                }
                while let Some(data) = recv.data().await {
                    let data = data.map_err(to_io)?;
                    progress(0, data.len() as u64);
                    tcp_w.write_all(&data).await?;
                    let _ = recv.flow_control().release_capacity(data.len());
                    total += data.len() as u64;
                }
                tcp_w.shutdown().await?;
                Ok::<_, io::Error>(total)
            };
            tokio::try_join!(upload, download)
        };
        match result {
            Ok(totals) => {
                self.read_done = true;
                self.write_done = true;
                Ok(totals)
            }
            Err(e) => {
                let e = self.refusal_now().unwrap_or(e);
                self.reset();
                Err(e)
            }
        }
    }

    /// Makes dropping the stream end it cleanly (END_STREAM) instead of with a reset: for a
    /// server (such as an HTTP engine) that may close without shutting its writes down, where
    /// the peer must still receive what was written (a 400 before the close, say).
    pub fn close_gracefully_on_drop(mut self) -> Self {
        self.reset_on_drop = false;
        self
    }

    /// Abandons the stream with `RST_STREAM` (CONNECT_ERROR, as RFC 9113 section 8.5 signals a
    /// TCP connection error), so the peer resets its side.
    pub fn reset(&mut self) {
        self.send.reset(Reason::CONNECT_ERROR);
        self.read_done = true;
        self.write_done = true;
    }
}

/// The peer's refusal carried by an error of [`H2Stream`] opened without waiting for the
/// answer: the status it answered (401 denied, 503 unreachable...).
pub fn refused(e: &io::Error) -> Option<StatusCode> {
    match e.get_ref()?.downcast_ref::<HboneError>()? {
        HboneError::Refused { status, .. } => Some(*status),
        _ => None,
    }
}

/// A reset with NO_ERROR from the peer: stop sending, the stream is otherwise fine.
fn stops_sending(e: &h2::Error) -> bool {
    e.is_remote() && e.reason() == Some(Reason::NO_ERROR)
}

/// How long the application's remaining upload is read and dropped after the peer said it
/// needs no more (see [`H2Stream::copy_tcp`]).
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    let kind = match e.reason() {
        Some(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED | Reason::CONNECT_ERROR) => {
            io::ErrorKind::ConnectionReset
        }
        _ => io::ErrorKind::BrokenPipe,
    };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            if let Err(e) = ready!(this.recv.poll_answer(cx)) {
                this.read_done = true;
                return Poll::Ready(Err(e));
            }
            let recv = this.recv.open()?;
            match ready!(recv.poll_data(cx)) {
                None => {
                    // END_STREAM: the peer half-closed.
                    this.read_done = true;
                }
                Some(Ok(data)) => {
                    // Hand the window back at once: at most one frame is held here.
                    let _ = recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Some(Err(e)) => {
                    this.read_done = true;
                    return Poll::Ready(Err(to_io(e)));
                }
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.write_done {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let want = buf.len().min(MAX_WRITE);
        let send = self.send.open()?;
        send.reserve_capacity(want);
        loop {
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    return Poll::Ready(send.send_data(data, false).map(|()| n).map_err(to_io));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => {
                    // The stream was closed under us: a reset from the peer.
                    let e = match ready!(send.poll_reset(cx)) {
                        Ok(reason) => io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            format!("stream reset by peer: {reason:?}"),
                        ),
                        Err(e) => to_io(e),
                    };
                    return Poll::Ready(Err(e));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes queued frames out on its own.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_done {
            self.write_done = true;
            self.send.open()?.send_data(Bytes::new(), true).map_err(to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        if self.read_done && self.write_done {
            return;
        }
        if self.reset_on_drop {
            self.send.reset(Reason::CANCEL);
        } else if !self.write_done
            && let Ok(send) = self.send.open()
        {
            let _ = send.send_data(Bytes::new(), true);
        }
    }
}
