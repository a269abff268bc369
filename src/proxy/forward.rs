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
//! it belongs to (the approach of zhboner/realm); a short write clears the write readiness
//! the same way, since it proves the send buffer full. Because a chunk is always delivered
//! first:
//! - a FIN from the source becomes `shutdown(SHUT_WR)` on the destination only once every
//!   byte before it was delivered (haproxy#2505), while the other direction keeps flowing;
//! - an `EAGAIN` on the read side can only mean "socket empty", never "pipe full".
//!
//! A pipe is held only during a splice burst and goes back to a per-thread pool after it;
//! when none can be had (fd exhaustion) the pump copies. A reset or socket error on either
//! side ends both directions — a pump blocked on a stalled destination still watches its
//! source for errors — and the caller then resets the other side. No lock and no allocation
//! per byte: per chunk, one atomic add for the byte counter.
//!
//! Both pumps live in one hand-written poll function ([`Forward`]) rather than two `async`
//! state machines: an idle connection's memory is mostly its task's future, and this keeps
//! both directions and their shared state to 200 bytes (two `async` pumps under a `select!`
//! took 760). Reading and delivering never wait; only a stalled destination costs a boxed
//! future, which takes the chunk (pipe or copied rest) with it.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::AsRawFd;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use metrics::Counter;
use nix::fcntl::{splice, SpliceFFlags};
use nix::sys::socket::{recv, MsgFlags};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
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
    /// The copy buffer of this worker thread's pumps. A pump uses it only inside one poll,
    /// so all the connections of a thread share one.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; COPY_CHUNK].into_boxed_slice());
}

/// Bytes moved by a finished connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Client → backend (forwarded here; the preamble is counted by the caller).
    pub to_backend: u64,
    /// Backend → client.
    pub to_client: u64,
}

/// One endpoint of a pump, with what to call its failures.
#[derive(Clone, Copy)]
struct End<'a> {
    /// The socket.
    stream: &'a TcpStream,
    /// Which side it is.
    side: Side,
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

/// How a connection forwards.
#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions {
    /// Close when neither direction moved a byte for this long.
    pub idle_timeout: Option<Duration>,
    /// Use `splice(2)` for bulk; `false` always copies.
    pub splice: bool,
}

/// A delivery that stalled on a full destination: waits for it (watching the source for
/// errors) and finishes the chunk. Yields the chunk's size and its pipe, now empty.
type Stall<'a> =
    Pin<Box<dyn Future<Output = Result<(usize, Option<Pipe>), ConnError>> + Send + 'a>>;

/// One direction's state between polls.
struct Pump<'a> {
    /// Bytes delivered.
    total: u64,
    /// The pipe of the current splice burst; none while copying or idle.
    held: Option<Pipe>,
    /// The chunk being delivered to a stalled destination.
    stall: Option<Stall<'a>>,
    /// The last read was large: the next one splices.
    bulk: bool,
    /// Splicing is allowed (configured, and a pipe could be had).
    splice: bool,
    /// The source sent FIN and it was passed on.
    done: bool,
}

impl Pump<'_> {
    /// Returns the held pipe, which the caller knows to be empty, to the pool.
    fn release_pipe(&mut self) {
        if let Some(p) = self.held.take() {
            pipe::release(p);
        }
    }
}

/// The idle timeout's clock.
struct Idle {
    limit: Duration,
    /// Last time a chunk moved either way.
    last: Instant,
    timer: Pin<Box<Sleep>>,
}

/// Both directions of a connection, driven by one poll function.
pub struct Forward<'a> {
    /// `[client, backend]`; pump 0 moves `ends[0]` → `ends[1]`, pump 1 the reverse.
    ends: [End<'a>; 2],
    /// Byte counters per pump.
    counters: [&'a Counter; 2],
    pumps: [Pump<'a>; 2],
    metrics: &'a Metrics,
    idle: Option<Idle>,
    /// A FIN was forwarded already: the last direction to finish skips its `shutdown`.
    fin_sent: bool,
    /// The kill wait was polled once, so the token holds this task's waker.
    kill_registered: bool,
}

impl<'a> Forward<'a> {
    /// Prepares forwarding between `client` and `backend`; counts bytes into the counters.
    pub fn new(
        client: &'a TcpStream,
        backend: &'a TcpStream,
        to_backend: &'a Counter,
        to_client: &'a Counter,
        opts: ForwardOptions,
        metrics: &'a Metrics,
    ) -> Self {
        let pump = || Pump {
            total: 0,
            held: None,
            stall: None,
            bulk: false,
            splice: opts.splice,
            done: false,
        };
        Forward {
            ends: [
                End {
                    stream: client,
                    side: Side::Client,
                },
                End {
                    stream: backend,
                    side: Side::Backend,
                },
            ],
            counters: [to_backend, to_client],
            pumps: [pump(), pump()],
            metrics,
            idle: opts.idle_timeout.map(|limit| Idle {
                limit,
                last: Instant::now(),
                timer: Box::pin(tokio::time::sleep(limit)),
            }),
            fin_sent: false,
            kill_registered: false,
        }
    }

    /// Forwards both directions until both have seen EOF, an error, the idle timeout, or
    /// `kill` (the drain deadline).
    pub async fn run(&mut self, kill: &CancellationToken) -> Result<Transfer, ConnError> {
        let mut killed = pin!(kill.cancelled());
        poll_fn(|cx| {
            // The first poll leaves this task's waker with the token. Polling the wait again
            // would lock the token's mutex — shared by every connection on every worker — on
            // each wake-up; a tokio task's waker never changes, so afterwards the flag's
            // atomic load is enough, and cancelling still wakes the waker left first.
            let cancelled = if self.kill_registered {
                kill.is_cancelled()
            } else {
                self.kill_registered = true;
                killed.as_mut().poll(cx).is_ready()
            };
            if cancelled {
                return Poll::Ready(Err(ConnError::Shutdown));
            }
            self.poll_both(cx)
        })
        .await
    }

    fn poll_both(&mut self, cx: &mut Context<'_>) -> Poll<Result<Transfer, ConnError>> {
        for i in 0..2 {
            if !self.pumps[i].done {
                // Pending just means this direction waits; the other still runs.
                let _ = self.poll_pump(i, cx)?;
            }
        }
        if self.pumps.iter().all(|p| p.done) {
            return Poll::Ready(Ok(Transfer {
                to_backend: self.pumps[0].total,
                to_client: self.pumps[1].total,
            }));
        }
        if let Some(idle) = &mut self.idle {
            while idle.timer.as_mut().poll(cx).is_ready() {
                let deadline = idle.last + idle.limit;
                if Instant::now() >= deadline {
                    return Poll::Ready(Err(ConnError::Idle));
                }
                idle.timer.as_mut().reset(deadline);
            }
        }
        Poll::Pending
    }

    /// Moves chunks `src` → `dst` until the source is empty (`Pending`) or sends FIN
    /// (`Ready`, after passing the FIN on).
    fn poll_pump(&mut self, i: usize, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        let (src, dst) = (self.ends[i], self.ends[1 - i]);
        loop {
            let pump = &mut self.pumps[i];
            let moved = if let Some(stall) = &mut pump.stall {
                let (n, pipe) = ready!(stall.as_mut().poll(cx))?;
                pump.stall = None;
                pump.held = pipe;
                Chunk::Moved(n)
            } else {
                // `poll_read_ready` parks in the socket's own reader slot (this pump is the
                // only reader of `src`), so waiting costs no memory. It also spends tokio's
                // coop budget: a stream that never sees EAGAIN still lets others run.
                ready!(src.stream.poll_read_ready(cx)).map_err(|e| src.fail(e))?;
                match self.step(i, src, dst)? {
                    Some(chunk) => chunk,
                    None => continue, // the stall was just set up: poll it
                }
            };
            let pump = &mut self.pumps[i];
            match moved {
                Chunk::Moved(n) => {
                    pump.total += n as u64;
                    self.counters[i].increment(n as u64);
                    if let Some(idle) = &mut self.idle {
                        idle.last = Instant::now();
                    }
                    if !pump.bulk {
                        // The burst is over and its pipe empty: give it back while we wait.
                        pump.release_pipe();
                    }
                }
                Chunk::Empty => pump.release_pipe(),
                Chunk::Eof => {
                    pump.release_pipe();
                    pump.done = true;
                    // Forward the FIN. The last direction to finish skips it: both sockets
                    // close right after, and close() sends the same FIN.
                    if !std::mem::replace(&mut self.fin_sent, true) {
                        shutdown_write(dst.stream).map_err(|e| dst.fail(e))?;
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }

    /// Reads one chunk from `src` and delivers what `dst` takes now. Returns the chunk, or
    /// `None` when `dst` stalled and the rest now waits in the pump's stall future.
    fn step(&mut self, i: usize, src: End<'a>, dst: End<'a>) -> Result<Option<Chunk>, ConnError> {
        let pump = &mut self.pumps[i];
        if pump.bulk && pump.splice {
            let pipe = match pump.held.take().map_or_else(pipe::acquire, Ok) {
                Ok(p) => p,
                Err(_) => {
                    // No pipe (fd exhaustion): this direction copies from now on.
                    self.metrics.splice_fallback();
                    pump.splice = false;
                    return self.step(i, src, dst);
                }
            };
            let (chunk, sent) = splice_step(&src, &dst, &pipe)?;
            if let Chunk::Moved(n) = chunk {
                pump.bulk = n >= COPY_CHUNK;
                if sent < n {
                    pump.stall = Some(Box::pin(async move {
                        deliver(&src, &dst, sent, n, pipe_writer(&pipe, &dst)).await?;
                        Ok((n, Some(pipe)))
                    }));
                    return Ok(None);
                }
            }
            pump.held = Some(pipe);
            Ok(Some(chunk))
        } else {
            let (chunk, rest) = SCRATCH.with_borrow_mut(|buf| copy_step(&src, &dst, buf))?;
            if let Chunk::Moved(n) = chunk {
                pump.bulk = n >= COPY_CHUNK;
                if let Some(rest) = rest {
                    pump.stall = Some(Box::pin(async move {
                        deliver(&src, &dst, 0, rest.len(), buf_writer(&rest, &dst)).await?;
                        Ok((n, None))
                    }));
                    return Ok(None);
                }
            }
            Ok(Some(chunk))
        }
    }
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
