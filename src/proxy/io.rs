//! The syscall steps of forwarding — read a chunk, splice it, deliver it — with each kernel
//! behaviour they rely on written beside the code that relies on it.
//!
//! Everything here runs inside tokio's readiness (`try_io`): an `EAGAIN` clears the
//! readiness it belongs to, so the next wait sleeps until the kernel reports more (the
//! approach of zhboner/realm). Nothing here waits except [`deliver`], nothing allocates per
//! byte, and nothing decides "empty" or "end of stream" from `splice(2)` alone.
//!
//! Kernel facts this module depends on (Linux):
//! - **A `recv` reports what is left.** With `TCP_INQ` on (see
//!   [`sockopt::enable_inq`](super::sockopt::enable_inq)) each `recvmsg` carries a
//!   `TCP_CM_INQ` control message: the bytes still queued after this read, counting an
//!   urgent byte and never 0 once a FIN is queued (`tcp_inq_hint`). A read that leaves 0 has
//!   drained the socket, so readiness is cleared without paying for the `EAGAIN` read that
//!   would prove it (tokio relies on a weaker form of this, a short read, tokio#5866). A
//!   *short* read alone proves nothing: `tcp_recvmsg` stops early at the urgent mark.
//! - **`splice` stops at the urgent mark.** `tcp_read_sock` never reads past it: a splice
//!   there returns `EAGAIN`, or 0 once the FIN is queued too — which would look like the end
//!   of the stream. So a splice that moves nothing is never trusted: [`splice_step`] confirms
//!   with a `recv`, which (with `SO_OOBINLINE` on both sockets) reads the urgent byte in line
//!   and moves the stream past the mark. Splice never clears readiness itself.
//! - **A short write means the send buffer is full** (`tcp_sendmsg` copies until it is), so
//!   it clears write readiness like an `EAGAIN` would (as tokio's `poll_write` does).
//! - **Closed states stay set.** tokio keeps `READ_CLOSED` when it clears readiness, so a FIN
//!   seen by the poller is never lost by clearing.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use nix::fcntl::{splice, SpliceFFlags};
use nix::sys::socket::{recvmsg, MsgFlags};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::pipe::Pipe;
use crate::error::{ConnError, Side};

/// Non-blocking, and move pages rather than copy where the kernel can. Never
/// `SPLICE_F_MORE`: it delays small writes (golang/go#10948).
const SPLICE_FLAGS: SpliceFFlags =
    SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

/// One endpoint of a pump, with what to call its failures.
#[derive(Clone, Copy)]
pub(super) struct End<'a> {
    /// The socket.
    pub stream: &'a TcpStream,
    /// Which side it is.
    pub side: Side,
}

impl End<'_> {
    /// This side's socket failed.
    pub fn fail(&self, source: io::Error) -> ConnError {
        ConnError::Forward {
            side: self.side,
            source,
        }
    }
}

/// When a byte last moved on a connection, either way: what the idle timeout measures.
/// Every delivery records itself, partial ones included, so a slow but moving transfer is
/// never cut as idle. An atomic (relaxed) only because a stalled delivery's future must be
/// `Send`; one task owns a connection, so there is no contention. 8 bytes: nanoseconds
/// since a process-wide epoch.
#[derive(Debug)]
pub struct Activity {
    last_nanos: AtomicU64,
}

/// The process-wide origin of [`Activity`] times.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Activity {
    /// A clock that has not started: the forwarder starts it (one clock read) only when an
    /// idle timeout is configured, so a connection without one never reads the clock.
    pub fn new() -> Self {
        Activity {
            last_nanos: AtomicU64::new(0),
        }
    }

    /// Records that bytes moved now.
    pub fn touch(&self) {
        let epoch = epoch();
        let since = Instant::now().saturating_duration_since(epoch);
        let nanos = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
        self.last_nanos.store(nanos, Ordering::Relaxed);
    }

    /// When bytes last moved (the start, if none have).
    pub fn last(&self) -> Instant {
        epoch() + std::time::Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// What one read-and-deliver step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// This many bytes were read from the source (and delivered, or handed to a stall).
    Moved(usize),
    /// The source had nothing (its readiness is now cleared).
    Empty,
    /// The source sent FIN.
    Eof,
}

/// Space for one `TCP_CM_INQ` control message, aligned as `cmsghdr` needs (nix reads the
/// header through a reference).
#[repr(C, align(8))]
struct InqCmsg([u8; 32]);

/// `recvmsg` with `MSG_DONTWAIT`: the bytes read, and the bytes still queued after them if
/// the kernel said (`TCP_INQ` on).
fn recv_inq(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<u32>)> {
    let mut cmsg = InqCmsg([0; 32]);
    let n = {
        let mut iov = [IoSliceMut::new(buf)];
        recvmsg::<()>(fd, &mut iov, Some(&mut cmsg.0), MsgFlags::MSG_DONTWAIT)?.bytes
    };
    Ok((n, parse_inq(&cmsg.0)))
}

/// Reads a `TCP_CM_INQ` value out of a raw control buffer (`cmsghdr` then data), if the
/// kernel wrote one. Pure, so the layout is unit-tested.
fn parse_inq(raw: &[u8]) -> Option<u32> {
    const LEN: usize = std::mem::size_of::<usize>();
    let int = |at: usize| -> Option<i32> {
        Some(i32::from_ne_bytes(raw.get(at..at + 4)?.try_into().ok()?))
    };
    let cmsg_len = usize::from_ne_bytes(raw.get(..LEN)?.try_into().ok()?);
    let data = CMSG_DATA_OFFSET;
    if cmsg_len < data + 4 || int(LEN)? != nix::libc::SOL_TCP || int(LEN + 4)? != TCP_CM_INQ {
        return None;
    }
    u32::try_from(int(data)?).ok()
}

/// Where a control message's data starts: the header's size rounded up to `size_t`
/// alignment (glibc's `CMSG_LEN(0)`).
const CMSG_DATA_OFFSET: usize =
    (std::mem::size_of::<nix::libc::cmsghdr>() + std::mem::size_of::<usize>() - 1)
        & !(std::mem::size_of::<usize>() - 1);

/// `TCP_CM_INQ`, the control message type `TCP_INQ` turns on (`include/uapi/linux/tcp.h`).
const TCP_CM_INQ: i32 = 36;

/// Reads what `stream` has into `buf`, through tokio's readiness: `EAGAIN` clears the read
/// readiness, and so does a read that the kernel says left the socket empty (`TCP_INQ`),
/// saving the `EAGAIN` read a drain otherwise costs. A read that leaves bytes queued (more
/// than `buf` holds, or an urgent mark) keeps the readiness, so the pump reads again at once.
///
/// With no readiness recorded this is `WouldBlock` without a syscall, unless `eager`: then
/// the socket is read anyway (a fresh socket whose bytes the poller has not reported yet).
pub(super) fn recv_draining(stream: &TcpStream, buf: &mut [u8], eager: bool) -> io::Result<usize> {
    let fd = stream.as_raw_fd();
    let mut tried = false;
    let mut drained = None;
    let read = stream.try_io(Interest::READABLE, || {
        tried = true;
        let (n, left) = recv_inq(fd, buf)?;
        if n > 0 && left == Some(0) {
            // Report WouldBlock so tokio clears the readiness; the count goes via `drained`.
            drained = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (drained, tried) {
        (Some(n), _) => Ok(n),
        (None, false) if eager => Ok(recv_inq(fd, buf)?.0),
        (None, _) => read,
    }
}

/// Splices what `src` has into the (empty) pipe and as much of it on into `dst` as `dst`
/// takes now. Returns the chunk and, if bytes moved, how many reached `dst`.
///
/// A splice that moves nothing (`EAGAIN`, or 0) is not trusted: at an urgent mark it says
/// that even with bytes or data queued. Then this returns `None` and the caller reads with
/// `recv` ([`copy_step`]), which tells "empty" and "end of stream" for sure and moves past
/// the mark. The splice runs outside `try_io`, so its `EAGAIN` leaves readiness for that
/// `recv` to settle.
pub(super) fn splice_step(
    src: &End<'_>,
    dst: &End<'_>,
    pipe: &Pipe,
    activity: Option<&Activity>,
) -> Result<Option<(usize, usize)>, ConnError> {
    match splice(
        src.stream,
        None,
        pipe.writer(),
        None,
        pipe.capacity(),
        SPLICE_FLAGS,
    ) {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some((
            n,
            try_deliver(dst, 0, n, pipe_writer(pipe, dst), activity)?,
        ))),
        Err(nix::errno::Errno::EAGAIN) => Ok(None),
        Err(e) => Err(src.fail(e.into())),
    }
}

/// Copies what `src` has (up to `buf.len()`) and sends as much of it as `dst` takes now.
/// Returns the chunk and how many of its bytes reached `dst`; the caller keeps the rest.
/// `eager` reads even without recorded readiness (confirming a splice that moved nothing).
pub(super) fn copy_step(
    src: &End<'_>,
    dst: &End<'_>,
    buf: &mut [u8],
    eager: bool,
    activity: Option<&Activity>,
) -> Result<(Chunk, usize), ConnError> {
    match classify_read(src, recv_draining(src.stream, buf, eager))? {
        Chunk::Moved(n) => {
            let sent = try_deliver(dst, 0, n, buf_writer(&buf[..n], dst), activity)?;
            Ok((Chunk::Moved(n), sent))
        }
        other => Ok((other, 0)),
    }
}

/// Moves bytes from the pipe into `dst`: `(sent, n)` → a splice of the `n - sent` left.
pub(super) fn pipe_writer<'a>(
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
pub(super) fn buf_writer<'a>(
    buf: &'a [u8],
    dst: &'a End<'_>,
) -> impl FnMut(usize, usize) -> io::Result<usize> + 'a {
    move |sent, _| SockRef::from(dst.stream).send(&buf[sent..])
}

/// What a `recv` of `src` returned, as a chunk: 0 is EOF, `EAGAIN` is "empty". Only a `recv`
/// may say so (see [`splice_step`]).
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
/// filled up (`n` if all). Never waits. Any progress is recorded in `activity`.
pub(super) fn try_deliver(
    dst: &End<'_>,
    start: usize,
    n: usize,
    mut write: impl FnMut(usize, usize) -> io::Result<usize>,
    activity: Option<&Activity>,
) -> Result<usize, ConnError> {
    let mut sent = start;
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
            Ok(k) if filled.is_some() => {
                sent += k;
                break;
            }
            Ok(k) => sent += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(source) => return Err(dst.fail(source)),
        }
    }
    if sent > start {
        if let Some(a) = activity {
            a.touch();
        }
    }
    Ok(sent)
}

/// Finishes a delivery that stalled: waits for `dst` (watching `src`), then writes more.
pub(super) async fn deliver(
    src: &End<'_>,
    dst: &End<'_>,
    mut sent: usize,
    n: usize,
    mut write: impl FnMut(usize, usize) -> io::Result<usize>,
    activity: Option<&Activity>,
) -> Result<(), ConnError> {
    while sent < n {
        wait_writable(src, dst).await?;
        sent = try_deliver(dst, sent, n, &mut write, activity)?;
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

/// The two sockets' send-queue lengths, packed: bytes the proxy delivered that the peers have
/// not acknowledged yet. Bytes the proxy handed to the kernel still move while a slow reader
/// drains them, so the idle check compares this between its deadlines (two ioctls per idle
/// period, none per byte).
pub(super) fn send_queues(ends: [&TcpStream; 2]) -> u64 {
    let [a, b] = ends.map(|s| super::sockopt::unsent_bytes(s).unwrap_or(0));
    (u64::from(a) << 32) | u64::from(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmsg(len: usize, level: i32, ty: i32, value: i32) -> Vec<u8> {
        let mut raw = len.to_ne_bytes().to_vec();
        raw.extend_from_slice(&level.to_ne_bytes());
        raw.extend_from_slice(&ty.to_ne_bytes());
        raw.resize(CMSG_DATA_OFFSET, 0);
        raw.extend_from_slice(&value.to_ne_bytes());
        raw
    }

    #[test]
    fn inq_control_message_layout() {
        let full = CMSG_DATA_OFFSET + 4;
        assert_eq!(
            parse_inq(&cmsg(full, nix::libc::SOL_TCP, TCP_CM_INQ, 7)),
            Some(7)
        );
        assert_eq!(
            parse_inq(&cmsg(full, nix::libc::SOL_TCP, TCP_CM_INQ, 0)),
            Some(0)
        );
        // No message written (the buffer stays zeroed), another level or type, or too short.
        assert_eq!(parse_inq(&[0; 32]), None);
        assert_eq!(
            parse_inq(&cmsg(full, nix::libc::SOL_SOCKET, TCP_CM_INQ, 7)),
            None
        );
        assert_eq!(parse_inq(&cmsg(full, nix::libc::SOL_TCP, 35, 7)), None);
        assert_eq!(
            parse_inq(&cmsg(full - 1, nix::libc::SOL_TCP, TCP_CM_INQ, 7)),
            None
        );
        assert_eq!(parse_inq(&[1, 2, 3]), None);
    }

    #[tokio::test]
    async fn recv_reports_bytes_left_with_tcp_inq() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        super::super::sockopt::enable_inq(&l).unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        c.write_all(&[7u8; 100]).await.unwrap();
        s.readable().await.unwrap();
        let mut buf = [0u8; 40];
        // TCP_INQ set on the listener is inherited by the accepted socket.
        assert_eq!(recv_inq(s.as_raw_fd(), &mut buf).unwrap(), (40, Some(60)));
        assert_eq!(recv_inq(s.as_raw_fd(), &mut buf).unwrap(), (40, Some(20)));
        assert_eq!(recv_inq(s.as_raw_fd(), &mut buf).unwrap(), (20, Some(0)));
        c.shutdown().await.unwrap();
        s.readable().await.unwrap();
        // A queued FIN is reported as something left to read.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(recv_inq(s.as_raw_fd(), &mut buf).unwrap(), (0, Some(1)));
    }
}
