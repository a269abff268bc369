//! Forwarding: bytes both ways until both halves are closed — `splice(2)` for bulk, a copy
//! for small messages. This file is the pump state machine; the syscall steps and the kernel
//! behaviour they rely on are in [`io`](super::io).
//!
//! Each direction is a pump: wait until the source is readable, read a chunk, then deliver
//! it completely to the destination before reading again. How a chunk moves adapts to the
//! traffic:
//! - **small** (the last read was under [`COPY_CHUNK`]): `recv` into a per-thread scratch
//!   buffer and `send`; a read the kernel reports as draining the socket (`TCP_INQ`) clears
//!   readiness at once: two syscalls per request;
//! - **bulk** (a read filled the scratch buffer): splice socket → pipe → socket, zero-copy,
//!   until a read comes back small again. A splice that moves nothing is confirmed by a
//!   `recv` (a splice stops at an urgent mark and would pass for "empty" or "EOF").
//!
//! Invariants:
//! - a chunk is delivered completely before the next read, so a FIN from the source becomes
//!   `shutdown(SHUT_WR)` on the destination only once every byte before it was delivered
//!   (haproxy#2505), while the other direction keeps flowing;
//! - "empty" and "end of stream" are only ever decided by a `recv`;
//! - the directions take turns: which goes first alternates per poll, and a turn ends after
//!   [`TURN_BYTES`], so a flat-out upload cannot hold back the other direction's bytes (a
//!   single pump would otherwise run a whole tokio coop budget, ~32 MiB);
//! - any byte delivered, partial deliveries included, is activity for the idle timeout;
//! - a reset or socket error on either side ends both directions — a pump blocked on a
//!   stalled destination still watches its source for errors — and the caller then resets
//!   the other side; an idle or drain-deadline cut resets both (a cut must never look like
//!   a clean end).
//!
//! A pipe is held only during a splice burst and goes back to a per-thread pool after it;
//! when none can be had (the pipe budget or fds are exhausted) the pump copies. No lock and
//! no allocation per byte: per chunk, one atomic add for the byte counter.
//!
//! Both pumps live in one hand-written poll function ([`Forward`]) rather than two `async`
//! state machines: an idle connection's memory is mostly its task's future, and this keeps
//! both directions and their shared state to about 250 bytes. Reading and delivering never
//! wait; only a stalled destination costs a boxed future, which takes the chunk (pipe or
//! copied rest) with it.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use metrics::Counter;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

pub use super::io::Activity;
use super::io::{
    buf_writer, copy_step, deliver, pipe_writer, send_queues, splice_step, Chunk, End,
};
use super::pipe::{self, Pipe};
use super::sockopt::shutdown_write;
use crate::error::{ConnError, Side};

/// Size of the per-thread copy buffer: a read that fills it switches its pump to splicing.
pub const COPY_CHUNK: usize = 16 * 1024;

/// Bytes a direction moves before the other gets its turn (checked after each chunk, so a
/// turn is at least one chunk). Unit tests use one copy chunk, so a turn's end is visible
/// with the little data a socket queues unread.
pub const TURN_BYTES: usize = if cfg!(test) { COPY_CHUNK } else { 256 * 1024 };

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

/// How a pump's turn ended, when it did not end waiting.
enum Turn {
    /// It moved [`TURN_BYTES`] and yields to the other direction; it has more.
    Yield,
    /// Its source sent FIN, which was passed on.
    Done,
}

/// The idle timeout's clock: 16 bytes in the connection's future, the rest boxed (only
/// connections with an idle timeout pay for it).
struct Idle<'a> {
    /// When a byte last moved either way (deliveries record themselves).
    activity: &'a Activity,
    clock: Box<IdleClock>,
}

struct IdleClock {
    limit: Duration,
    timer: Pin<Box<Sleep>>,
    /// The send queues at the last deadline ([`send_queues`]).
    queued: u64,
}

/// Both directions of a connection, driven by one poll function.
pub struct Forward<'a> {
    /// `[client, backend]`; pump 0 moves `ends[0]` → `ends[1]`, pump 1 the reverse.
    ends: [End<'a>; 2],
    /// Byte counters per pump.
    counters: [&'a Counter; 2],
    pumps: [Pump<'a>; 2],
    splice_fallbacks: &'a Counter,
    idle: Option<Idle<'a>>,
    /// A FIN was forwarded already: the last direction to finish skips its `shutdown`.
    fin_sent: bool,
    /// The kill wait was polled once, so the token holds this task's waker.
    kill_registered: bool,
    /// Pump 1 goes first in the next poll (alternates).
    backend_first: bool,
}

impl<'a> Forward<'a> {
    /// Prepares forwarding between `client` and `backend`; counts bytes into the counters.
    /// Deliveries record themselves in `activity`, which the idle timeout reads.
    pub fn new(
        client: &'a TcpStream,
        backend: &'a TcpStream,
        to_backend: &'a Counter,
        to_client: &'a Counter,
        opts: ForwardOptions,
        splice_fallbacks: &'a Counter,
        activity: &'a Activity,
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
            splice_fallbacks,
            idle: opts.idle_timeout.map(|limit| {
                activity.touch(); // the idle clock starts with forwarding
                Idle {
                    activity,
                    clock: Box::new(IdleClock {
                        limit,
                        timer: Box::pin(tokio::time::sleep(limit)),
                        queued: 0,
                    }),
                }
            }),
            fin_sent: false,
            kill_registered: false,
            backend_first: false,
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
        let first = usize::from(self.backend_first);
        self.backend_first = !self.backend_first;
        // Which directions used up a turn in this poll: the other one then looks for bytes
        // itself (see `poll_pump`).
        let mut busy = [false; 2];
        loop {
            let mut yielded = false;
            for i in [first, 1 - first] {
                if !self.pumps[i].done {
                    // Pending just means this direction waits; the other still runs.
                    if let Poll::Ready(Turn::Yield) = self.poll_pump(i, cx, busy[1 - i])? {
                        yielded = true;
                        busy[i] = true;
                    }
                }
            }
            // Until both wait: tokio's coop budget ends a long run (poll_read_ready turns
            // Pending and schedules a wake), so other connections still get their turn.
            if !yielded {
                break;
            }
        }
        if self.pumps.iter().all(|p| p.done) {
            return Poll::Ready(Ok(Transfer {
                to_backend: self.pumps[0].total,
                to_client: self.pumps[1].total,
            }));
        }
        if let Some(Idle { activity, clock }) = &mut self.idle {
            while clock.timer.as_mut().poll(cx).is_ready() {
                let mut deadline = activity.last() + clock.limit;
                if Instant::now() >= deadline {
                    // Nothing delivered for the whole limit; but a slow reader may still be
                    // draining what was delivered before (the kernel's send queue).
                    let queued = send_queues([self.ends[0].stream, self.ends[1].stream]);
                    if std::mem::replace(&mut clock.queued, queued) == queued {
                        return Poll::Ready(Err(ConnError::Idle));
                    }
                    activity.touch();
                    deadline = activity.last() + clock.limit;
                }
                clock.timer.as_mut().reset(deadline);
            }
        }
        Poll::Pending
    }

    /// Moves chunks `src` → `dst` until the source is empty or the destination full
    /// (`Pending`), the turn's bytes are used up (`Yield`), or the source sends FIN (`Done`,
    /// after passing the FIN on).
    ///
    /// `look`: the other direction just used up a turn. While it keeps this task busy, tokio
    /// may not poll the kernel for readiness (it does when tasks wait), so bytes that arrived
    /// here are not known to be here: read once anyway (one `recv`, usually `EAGAIN`, per
    /// turn of the busy direction) instead of leaving a reply behind a flat-out upload.
    fn poll_pump(
        &mut self,
        i: usize,
        cx: &mut Context<'_>,
        mut look: bool,
    ) -> Poll<Result<Turn, ConnError>> {
        let (src, dst) = (self.ends[i], self.ends[1 - i]);
        let mut turn = 0;
        loop {
            if turn >= TURN_BYTES {
                return Poll::Ready(Ok(Turn::Yield));
            }
            let pump = &mut self.pumps[i];
            let moved = if let Some(stall) = &mut pump.stall {
                let (n, pipe) = ready!(stall.as_mut().poll(cx))?;
                pump.stall = None;
                if pipe.is_some() {
                    // A copied chunk's stall has no pipe; the burst's (empty) one stays held.
                    pump.held = pipe;
                }
                Chunk::Moved(n)
            } else {
                // `poll_read_ready` parks in the socket's own reader slot (this pump is the
                // only reader of `src`), so waiting costs no memory. It also spends tokio's
                // coop budget: a stream that never sees EAGAIN still lets others run.
                let step = match src.stream.poll_read_ready(cx) {
                    Poll::Ready(r) => {
                        r.map_err(|e| src.fail(e))?;
                        self.step(i, src, dst)?
                    }
                    Poll::Pending if std::mem::take(&mut look) => {
                        match self.copy(i, src, dst, true)? {
                            Some(Chunk::Empty) => return Poll::Pending,
                            other => other,
                        }
                    }
                    Poll::Pending => return Poll::Pending,
                };
                match step {
                    Some(chunk) => chunk,
                    None => continue, // the stall was just set up: poll it
                }
            };
            let pump = &mut self.pumps[i];
            match moved {
                Chunk::Moved(n) => {
                    turn += n;
                    pump.total += n as u64;
                    self.counters[i].increment(n as u64);
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
                    return Poll::Ready(Ok(Turn::Done));
                }
            }
        }
    }

    /// Where deliveries record progress: only kept with an idle timeout.
    fn activity(&self) -> Option<&'a Activity> {
        self.idle.as_ref().map(|idle| idle.activity)
    }

    /// Reads one chunk from `src` and delivers what `dst` takes now. Returns the chunk, or
    /// `None` when `dst` stalled and the rest now waits in the pump's stall future.
    fn step(&mut self, i: usize, src: End<'a>, dst: End<'a>) -> Result<Option<Chunk>, ConnError> {
        let activity = self.activity();
        let pump = &mut self.pumps[i];
        if !(pump.bulk && pump.splice) {
            return self.copy(i, src, dst, false);
        }
        let mut pipe = match pump.held.take().map_or_else(pipe::acquire, Ok) {
            Ok(p) => p,
            Err(_) => {
                // No pipe (the pipe budget or the fd table is full): copy from now on.
                self.splice_fallbacks.increment(1);
                pump.splice = false;
                return self.copy(i, src, dst, false);
            }
        };
        let Some((n, sent)) = splice_step(&src, &dst, &pipe, activity)? else {
            // The splice moved nothing, which proves nothing (an urgent mark stops it):
            // a recv decides, and moves past the mark. The pipe stays empty.
            pump.held = Some(pipe);
            return self.copy(i, src, dst, true);
        };
        pump.bulk = n >= COPY_CHUNK;
        if sent < n {
            pump.stall = Some(Box::pin(async move {
                deliver(&src, &dst, sent, n, pipe_writer(&pipe, &dst), activity).await?;
                Ok((n, Some(pipe)))
            }));
            return Ok(None);
        }
        if n == pipe.capacity() {
            // A splice filled the pipe, now empty again: a bulk flow; give it room.
            pipe.grow();
        }
        pump.held = Some(pipe);
        Ok(Some(Chunk::Moved(n)))
    }

    /// One chunk through the scratch buffer: `recv`, then `send` what `dst` takes now; the
    /// rest is copied out (the buffer is shared by the thread's pumps) into a stall.
    fn copy(
        &mut self,
        i: usize,
        src: End<'a>,
        dst: End<'a>,
        eager: bool,
    ) -> Result<Option<Chunk>, ConnError> {
        let activity = self.activity();
        let (chunk, rest) = SCRATCH.with_borrow_mut(|buf| {
            let (chunk, sent) = copy_step(&src, &dst, buf, eager, activity)?;
            let rest = match chunk {
                Chunk::Moved(n) if sent < n => Some(Box::<[u8]>::from(&buf[sent..n])),
                _ => None,
            };
            Ok::<_, ConnError>((chunk, rest))
        })?;
        let pump = &mut self.pumps[i];
        if let Chunk::Moved(n) = chunk {
            pump.bulk = n >= COPY_CHUNK;
            if let Some(rest) = rest {
                pump.stall = Some(Box::pin(async move {
                    let write = buf_writer(&rest, &dst);
                    deliver(&src, &dst, 0, rest.len(), write, activity).await?;
                    Ok((n, None))
                }));
                return Ok(None);
            }
        }
        Ok(Some(chunk))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use metrics::CounterFn;
    use tokio::net::TcpListener;

    use super::*;

    /// A byte counter that also tells how far the upload had got when the other direction
    /// first delivered.
    struct Hook {
        upload: Arc<AtomicU64>,
        /// Set on the download's counter: the upload's bytes at its first delivery.
        seen: Option<Arc<AtomicU64>>,
    }

    impl CounterFn for Hook {
        fn increment(&self, value: u64) {
            match &self.seen {
                None => {
                    self.upload.fetch_add(value, Ordering::SeqCst);
                }
                Some(seen) => {
                    let now = self.upload.load(Ordering::SeqCst);
                    let _ =
                        seen.compare_exchange(u64::MAX, now, Ordering::SeqCst, Ordering::SeqCst);
                }
            }
        }
        fn absolute(&self, _: u64) {}
    }

    async fn pair(l: &TcpListener) -> (std::net::TcpStream, TcpStream) {
        let far = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (near, _) = l.accept().await.unwrap();
        (far.into_std().unwrap(), near)
    }

    /// Regression (issue 7): the upload pump was always polled first and ran until its
    /// source was empty or tokio's coop budget ended (~32 MiB), so a reply waited behind it.
    /// Now a turn ends after TURN_BYTES and the reply goes next.
    #[tokio::test]
    async fn a_busy_direction_leaves_the_other_its_turn() {
        for splice in [true, false] {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let (mut client, proxy_client) = pair(&l).await;
            let (mut backend, proxy_backend) = pair(&l).await;
            // Queue as much upload as the kernel takes unread, and one ping the other way.
            let chunk = vec![1u8; 64 * 1024];
            let mut queued = 0;
            while let Ok(n) = client.write(&chunk) {
                queued += n;
            }
            backend.set_nonblocking(false).unwrap();
            backend.write_all(b"PING1234").unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;

            let upload = Arc::new(AtomicU64::new(0));
            let seen = Arc::new(AtomicU64::new(u64::MAX));
            let to_backend = Counter::from_arc(Arc::new(Hook {
                upload: upload.clone(),
                seen: None,
            }));
            let to_client = Counter::from_arc(Arc::new(Hook {
                upload: upload.clone(),
                seen: Some(seen.clone()),
            }));
            let fallbacks = Counter::noop();
            let activity = Activity::new();
            let opts = ForwardOptions {
                idle_timeout: None,
                splice,
            };
            let mut forward = Forward::new(
                &proxy_client,
                &proxy_backend,
                &to_backend,
                &to_client,
                opts,
                &fallbacks,
                &activity,
            );
            let kill = CancellationToken::new();
            // Never ends by itself (no FIN): run it until both directions wait.
            let _ = tokio::time::timeout(Duration::from_millis(300), forward.run(&kill)).await;
            let moved = upload.load(Ordering::SeqCst);
            let before_ping = seen.load(Ordering::SeqCst);
            assert!(
                moved >= 4 * TURN_BYTES as u64,
                "set-up: only {moved} of {queued} queued bytes moved; the test proves nothing"
            );
            assert_ne!(
                before_ping,
                u64::MAX,
                "splice {splice}: the ping never moved"
            );
            assert!(
                before_ping <= (TURN_BYTES + COPY_CHUNK) as u64,
                "splice {splice}: the ping waited behind {before_ping} upload bytes"
            );
        }
    }
}
