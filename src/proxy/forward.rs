//! Forwarding: bytes both ways until both halves are closed — `splice(2)` for bulk, a copy
//! for small messages.
//!
//! Each direction is a pump: wait until the source is readable, read a chunk, then deliver
//! it completely to the destination before reading again. How a chunk moves adapts to the
//! traffic:
//! - **small** (the last read was under [`COPY_CHUNK`]): `recv` into a per-thread scratch
//!   buffer and `send`. A short `recv` proves the socket drained (`tcp_recvmsg` copies until
//!   the queue is empty), so readiness is cleared without the `EAGAIN` read a drain
//!   otherwise costs (tokio does the same in `poll_read`, tokio#5866): two syscalls per
//!   request instead of three splices;
//! - **bulk** (a read filled the scratch buffer): splice socket → pipe → socket, zero-copy,
//!   until a read comes back small again. A short splice proves nothing (the pipe may have
//!   run out of slots), so a splice burst ends on `EAGAIN`.
//!
//! Driven by tokio readiness: syscalls run inside `try_io`, so `EAGAIN` clears the readiness
//! it belongs to (the approach of zhboner/realm). Because a chunk is always delivered first:
//! - a FIN from the source becomes `shutdown(SHUT_WR)` on the destination only once every
//!   byte before it was delivered (haproxy#2505), while the other direction keeps flowing;
//! - an `EAGAIN` on the read side can only mean "socket empty", never "pipe full".
//!
//! A pipe is held only during a splice burst and goes back to a per-thread pool after it;
//! when none can be had (fd exhaustion) the pump copies. A reset or socket error on either
//! side ends both directions — a pump blocked on a stalled destination still watches its
//! source for errors — and the caller then resets the other side. No lock and no allocation
//! per byte: per chunk, one atomic add for the byte counter. Reading and delivering never
//! await; only a stalled destination costs a (boxed) future and, for a copied chunk, a boxed
//! copy of its undelivered rest, so the future every connection holds — most of an idle
//! connection's memory — stays small.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use metrics::Counter;
use nix::fcntl::{splice, SpliceFFlags};
use nix::sys::socket::{recv, MsgFlags};
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

/// Size of the per-thread copy buffer: a read that fills it switches its pump to splicing.
pub const COPY_CHUNK: usize = 16 * 1024;

thread_local! {
    /// The copy buffer of this worker thread's pumps. A pump uses it only between awaits,
    /// so all the connections of a thread share one.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; COPY_CHUNK].into_boxed_slice());
}

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
        splice: mut use_splice,
        metrics,
        finished,
    } = shared;
    let mut total = 0u64;
    // The pipe of the current splice burst; none while copying or idle.
    let mut held: Option<Pipe> = None;
    // Whether the last read was large, so the next one splices.
    let mut bulk = false;
    loop {
        // `poll_read_ready` parks in the socket's own reader slot (this pump is the only
        // reader of `src`), so the wait adds nothing to this future, unlike `readable()`.
        // It also spends tokio's coop budget: a bulk stream that never sees EAGAIN still
        // lets other connections run.
        poll_fn(|cx| src.stream.poll_read_ready(cx))
            .await
            .map_err(|e| src.fail(e))?;
        let chunk = if bulk && use_splice {
            let pipe = match held.take().map_or_else(pipe::acquire, Ok) {
                Ok(p) => held.insert(p),
                Err(_) => {
                    metrics.splice_fallback();
                    use_splice = false;
                    continue;
                }
            };
            let (chunk, sent) = splice_step(src, dst, pipe)?;
            if let Chunk::Moved(n) = chunk {
                if sent < n {
                    Box::pin(deliver(src, dst, sent, n, pipe_writer(pipe, dst))).await?;
                }
                bulk = n >= COPY_CHUNK;
            }
            if !bulk || !matches!(chunk, Chunk::Moved(_)) {
                // The burst is over and the pipe empty: give it back while we wait.
                if let Some(p) = held.take() {
                    pipe::release(p);
                }
            }
            chunk
        } else {
            let (chunk, rest) = SCRATCH.with_borrow_mut(|buf| copy_step(src, dst, buf))?;
            if let Some(rest) = rest {
                Box::pin(deliver(src, dst, 0, rest.len(), buf_writer(&rest, dst))).await?;
            }
            if let Chunk::Moved(n) = chunk {
                bulk = n >= COPY_CHUNK;
            }
            chunk
        };
        match chunk {
            Chunk::Moved(n) => {
                total += n as u64;
                counter.increment(n as u64);
                if let Some(clock) = clock {
                    clock.touch();
                }
            }
            Chunk::Empty => {}
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

/// Bytes of a copied chunk that the destination did not take yet.
type Undelivered = Box<[u8]>;

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

/// Copies what `src` has (up to `buf.len()`) and sends as much of it as `dst` takes now.
/// Returns the chunk and, if `dst` stalled, a copy of the bytes it did not take yet (the
/// scratch buffer is shared by the thread's pumps, so it cannot hold them over an await).
fn copy_step(
    src: &End<'_>,
    dst: &End<'_>,
    buf: &mut [u8],
) -> Result<(Chunk, Option<Undelivered>), ConnError> {
    match classify_read(src, recv_draining(src.stream, buf, false))? {
        Chunk::Moved(n) => {
            let sent = try_deliver(dst, 0, n, buf_writer(&buf[..n], dst))?;
            let rest = (sent < n).then(|| Box::from(&buf[sent..n]));
            Ok((Chunk::Moved(n), rest))
        }
        other => Ok((other, None)),
    }
}

/// Reads what `stream` has into `buf`, through tokio's readiness (`try_io`): `EAGAIN`
/// clears the read readiness, and so does a short read, which proves the socket drained
/// (`tcp_recvmsg` copies until the queue is empty; tokio's own `poll_read` relies on the
/// same, tokio#5866) — saving the `EAGAIN` read a drain otherwise costs.
///
/// With no readiness recorded this is `WouldBlock` without a syscall, unless `eager`: then
/// the socket is read anyway (a fresh socket whose bytes the poller has not reported yet).
pub(super) fn recv_draining(stream: &TcpStream, buf: &mut [u8], eager: bool) -> io::Result<usize> {
    let fd = stream.as_raw_fd();
    let mut tried = false;
    let mut drained = None;
    let read = stream.try_io(Interest::READABLE, || {
        tried = true;
        let n = recv(fd, buf, MsgFlags::MSG_DONTWAIT)?;
        if n > 0 && n < buf.len() {
            // Report WouldBlock so tokio clears the readiness; the count goes via `drained`.
            drained = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (drained, tried) {
        (Some(n), _) => Ok(n),
        (None, false) if eager => Ok(recv(fd, buf, MsgFlags::MSG_DONTWAIT)?),
        (None, _) => read,
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
        let mut filled = None;
        let wrote = dst.stream.try_io(Interest::WRITABLE, || {
            let k = write(sent, n)?;
            if k > 0 && sent + k < n {
                // Short: the send buffer is full. Clear the readiness now instead of
                // paying for the EAGAIN write that would prove it (as tokio's poll_write).
                filled = Some(k);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(k)
        });
        match filled.map_or(wrote, Ok) {
            Ok(0) => return Err(dst.fail(io::ErrorKind::WriteZero.into())),
            Ok(k) if filled.is_some() => return Ok(sent + k),
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
