//! Forwarding: bytes both ways with `splice(2)` until both halves are closed.
//!
//! Each direction is a pump: wait until the source is readable, take a pipe, splice socket →
//! pipe, then drain the pipe completely into the destination before reading again. Driven by
//! tokio readiness: the syscall runs inside `try_io`, so `EAGAIN` clears the readiness it
//! belongs to (the approach of zhboner/realm). Because the pipe is always drained first:
//! - a FIN from the source becomes `shutdown(SHUT_WR)` on the destination only once every
//!   byte before it was delivered (haproxy#2505), while the other direction keeps flowing;
//! - an `EAGAIN` on the read side can only mean "socket empty", never "pipe full".
//!
//! An idle direction gives its empty pipe back to the pool. When no pipe can be had (fd
//! exhaustion) the pump copies through a small buffer instead. A reset or socket error on
//! either side ends both directions — a pump blocked on a stalled destination still watches
//! its source for errors — and the caller then resets the other side. No lock and no
//! allocation per byte: per chunk, one atomic add for the byte counter. Reading and
//! delivering never await; only a stalled destination costs a (boxed) future, so the
//! future every connection holds — most of an idle connection's memory — stays small.

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use metrics::Counter;
use nix::fcntl::{splice, SpliceFFlags};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::pipe::{self, Pipe};
use super::sockopt::shutdown_write;
use crate::error::{ConnError, Side};
use crate::metrics::Metrics;

/// Non-blocking, and move pages rather than copy where the kernel can. Never
/// `SPLICE_F_MORE`: it delays small writes (golang/go#10948).
const SPLICE_FLAGS: SpliceFFlags =
    SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

/// Buffer size of the copy fallback.
const FALLBACK_BUF: usize = 16 * 1024;

/// Bytes moved by a finished connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Client → backend (spliced; the preamble is counted by the caller).
    pub to_backend: u64,
    /// Backend → client.
    pub to_client: u64,
}

/// One endpoint of a pump, with what to call its failures.
pub struct End<'a> {
    /// The socket.
    pub stream: &'a TcpStream,
    /// Which side it is.
    pub side: Side,
}

/// How a connection forwards.
#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions<'a> {
    /// Close when neither direction moved a byte for this long.
    pub idle_timeout: Option<Duration>,
    /// Use `splice(2)`; `false` always takes the buffered copy.
    pub splice: bool,
    /// Cancelled when the drain deadline passes: stop forwarding at once.
    pub kill: &'a CancellationToken,
}

impl End<'_> {
    /// This side's socket failed.
    fn fail(&self, source: io::Error) -> ConnError {
        ConnError::Forward {
            side: self.side,
            source,
        }
    }
}

/// Forwards both directions until both have seen EOF, an error, or the idle timeout.
pub async fn forward(
    client: &TcpStream,
    backend: &TcpStream,
    to_backend: &Counter,
    to_client: &Counter,
    opts: ForwardOptions<'_>,
    metrics: &Metrics,
) -> Result<Transfer, ConnError> {
    let idle_timeout = opts.idle_timeout;
    let clock = idle_timeout.map(|_| Activity::new());
    let c = End {
        stream: client,
        side: Side::Client,
    };
    let b = End {
        stream: backend,
        side: Side::Backend,
    };
    let finished = AtomicBool::new(false);
    let shared = Shared {
        clock: clock.as_ref(),
        splice: opts.splice,
        metrics,
        finished: &finished,
    };
    // The pumps are built inside `select!`: a future built outside and moved in would take
    // two slots of this future, and its size is most of what an idle connection costs.
    let (to_backend, to_client) = tokio::select! {
        r = async {
            tokio::try_join!(
                pump(&c, &b, to_backend, shared),
                pump(&b, &c, to_client, shared),
            )
        } => r?,
        () = idle_expired(idle_timeout, clock.as_ref()) => return Err(ConnError::Idle),
        () = opts.kill.cancelled() => return Err(ConnError::Shutdown),
    };
    Ok(Transfer {
        to_backend,
        to_client,
    })
}

/// Moves bytes `src` → `dst` until `src` sends FIN, then half-closes `dst`.
/// What both pumps of a connection share.
#[derive(Clone, Copy)]
struct Shared<'a> {
    /// Activity clock for the idle timeout, if one is set.
    clock: Option<&'a Activity>,
    /// Whether to splice (else copy).
    splice: bool,
    /// For the fallback counter.
    metrics: &'a Metrics,
    /// Set by the first pump to see EOF.
    finished: &'a AtomicBool,
}

async fn pump(
    src: &End<'_>,
    dst: &End<'_>,
    counter: &Counter,
    shared: Shared<'_>,
) -> Result<u64, ConnError> {
    let Shared {
        clock,
        splice: use_splice,
        metrics,
        finished,
    } = shared;
    let mut total = 0u64;
    let mut held: Option<Pipe> = None;
    let mut fallback: Option<Box<[u8]>> = None;
    loop {
        if held.is_none() {
            // Idle: hold no pipe until there is something to move.
            // `poll_read_ready` parks in the socket's own reader slot (this pump is the only
            // reader of `src`), so the wait adds nothing to this future, unlike `readable()`.
            poll_fn(|cx| src.stream.poll_read_ready(cx))
                .await
                .map_err(|e| src.fail(e))?;
        }
        if held.is_none() && fallback.is_none() {
            match use_splice.then(pipe::acquire) {
                Some(Ok(p)) => held = Some(p),
                Some(Err(_)) => {
                    metrics.splice_fallback();
                    fallback = Some(vec![0u8; FALLBACK_BUF].into_boxed_slice());
                }
                None => fallback = Some(vec![0u8; FALLBACK_BUF].into_boxed_slice()),
            }
        }
        // Read and deliver without awaiting; only a stalled destination needs a future,
        // boxed so that this one (held by every connection, idle or not) stays small.
        let moved = match (&held, fallback.as_deref_mut()) {
            (Some(pipe), _) => {
                let (chunk, sent) = splice_step(src, dst, pipe)?;
                if let Chunk::Moved(n) = chunk {
                    if sent < n {
                        Box::pin(deliver(src, dst, sent, n, pipe_writer(pipe, dst))).await?;
                    }
                }
                chunk
            }
            (None, Some(buf)) => {
                let (chunk, sent) = copy_step(src, dst, buf)?;
                if let Chunk::Moved(n) = chunk {
                    if sent < n {
                        Box::pin(deliver(src, dst, sent, n, buf_writer(&buf[..n], dst))).await?;
                    }
                }
                chunk
            }
            (None, None) => continue,
        };
        match moved {
            Chunk::Moved(n) => {
                total += n as u64;
                counter.increment(n as u64);
                if let Some(clock) = clock {
                    clock.touch();
                }
                // A bulk stream may never see EAGAIN: let other connections run.
                tokio::task::consume_budget().await;
            }
            Chunk::Empty => {
                // The source is drained and so is the pipe: give it back while we wait.
                if let Some(p) = held.take() {
                    pipe::release(p);
                }
            }
            Chunk::Eof => break,
        }
    }
    if let Some(p) = held.take() {
        pipe::release(p);
    }
    // Forward the FIN. The last direction to finish skips it: both sockets close right
    // after, and close() sends the same FIN (one syscall less per connection).
    if !finished.swap(true, Ordering::AcqRel) {
        shutdown_write(dst.stream).map_err(|e| dst.fail(e))?;
    }
    Ok(total)
}

/// What one read-and-deliver step did.
enum Chunk {
    /// This many bytes were delivered to the destination.
    Moved(usize),
    /// The source had nothing (its readiness is now cleared).
    Empty,
    /// The source sent FIN.
    Eof,
}

/// Splices what `src` has into the (empty) pipe and as much of it on into `dst` as `dst`
/// takes now. Returns the chunk and, if bytes moved, how many reached `dst`.
fn splice_step(src: &End<'_>, dst: &End<'_>, pipe: &Pipe) -> Result<(Chunk, usize), ConnError> {
    let read = src.stream.try_io(Interest::READABLE, || {
        splice(
            src.stream,
            None,
            pipe.writer(),
            None,
            pipe.capacity(),
            SPLICE_FLAGS,
        )
        .map_err(io::Error::from)
    });
    match classify_read(src, read)? {
        Chunk::Moved(n) => Ok((
            Chunk::Moved(n),
            try_deliver(dst, 0, n, pipe_writer(pipe, dst))?,
        )),
        other => Ok((other, 0)),
    }
}

/// The fallback: reads into `buf` and sends as much as `dst` takes now.
fn copy_step(src: &End<'_>, dst: &End<'_>, buf: &mut [u8]) -> Result<(Chunk, usize), ConnError> {
    match classify_read(src, src.stream.try_read(buf))? {
        Chunk::Moved(n) => Ok((
            Chunk::Moved(n),
            try_deliver(dst, 0, n, buf_writer(&buf[..n], dst))?,
        )),
        other => Ok((other, 0)),
    }
}

/// Moves bytes from the pipe into `dst`: `(sent, n)` → a splice of the `n - sent` left.
fn pipe_writer<'a>(
    pipe: &'a Pipe,
    dst: &'a End<'_>,
) -> impl FnMut(usize, usize) -> io::Result<usize> + 'a {
    move |sent, n| {
        splice(
            pipe.reader(),
            None,
            dst.stream,
            None,
            n - sent,
            SPLICE_FLAGS,
        )
        .map_err(io::Error::from)
    }
}

/// Sends bytes from `buf` into `dst`: `(sent, _)` → a send of `buf[sent..]`.
fn buf_writer<'a>(
    buf: &'a [u8],
    dst: &'a End<'_>,
) -> impl FnMut(usize, usize) -> io::Result<usize> + 'a {
    move |sent, _| SockRef::from(dst.stream).send(&buf[sent..])
}

/// What a read of `src` returned, as a chunk: 0 is EOF, `EAGAIN` is "empty".
fn classify_read(src: &End<'_>, read: io::Result<usize>) -> Result<Chunk, ConnError> {
    match read {
        Ok(0) => Ok(Chunk::Eof),
        Ok(n) => Ok(Chunk::Moved(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Chunk::Empty),
        Err(source) => Err(src.fail(source)),
    }
}

/// Writes to `dst` while it takes bytes: `write(sent, n)` moves the next ones (a splice
/// from the pipe or a send from the buffer). Returns how many of the `n` are sent when `dst`
/// filled up (`n` if all). Never waits.
fn try_deliver(
    dst: &End<'_>,
    mut sent: usize,
    n: usize,
    mut write: impl FnMut(usize, usize) -> io::Result<usize>,
) -> Result<usize, ConnError> {
    while sent < n {
        match dst.stream.try_io(Interest::WRITABLE, || write(sent, n)) {
            Ok(0) => return Err(dst.fail(io::ErrorKind::WriteZero.into())),
            Ok(k) => sent += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(source) => return Err(dst.fail(source)),
        }
    }
    Ok(sent)
}

/// Finishes a delivery that stalled: waits for `dst` (watching `src`), then writes more.
async fn deliver(
    src: &End<'_>,
    dst: &End<'_>,
    mut sent: usize,
    n: usize,
    mut write: impl FnMut(usize, usize) -> io::Result<usize>,
) -> Result<(), ConnError> {
    while sent < n {
        wait_writable(src, dst).await?;
        sent = try_deliver(dst, sent, n, &mut write)?;
    }
    Ok(())
}

/// Completes when the idle timeout passes with nothing moved; never without one. Boxed so
/// that its timer costs nothing on connections without an idle timeout.
async fn idle_expired(limit: Option<Duration>, clock: Option<&Activity>) {
    match (limit, clock) {
        (Some(limit), Some(clock)) => Box::pin(clock.expired(limit)).await,
        _ => std::future::pending().await,
    }
}

/// Waits until `dst` can take more bytes, while watching `src` for a reset: with `dst`
/// stalled and the other pump waiting on `dst` too, nothing else would notice `src` break.
async fn wait_writable(src: &End<'_>, dst: &End<'_>) -> Result<(), ConnError> {
    tokio::select! {
        r = dst.stream.writable() => r.map_err(|source| dst.fail(source)),
        r = src.stream.ready(Interest::ERROR) => {
            let source = match r {
                Err(e) => e,
                Ok(_) => src
                    .stream
                    .take_error()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into()),
            };
            Err(src.fail(source))
        }
    }
}

/// Last time either direction moved bytes, for the idle timeout; shared by both pumps
/// without a lock.
struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the last chunk.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Completes once nothing moved for `limit`.
    async fn expired(&self, limit: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}
