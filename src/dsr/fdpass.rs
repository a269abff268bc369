//! Handing a rebuilt TCP connection to the application over a Unix socket: the agent's
//! zero-hop `--handoff-socket PATH` mode (docs/design.md §6, step 5's last hand-over).
//!
//! # Wire contract (fixed: other programs implement the receiving side)
//!
//! - The **application** listens on a Unix stream socket at PATH. It never writes to it.
//! - The **agent** connects to PATH and, for each connection it hands over, sends one message:
//!   exactly one payload byte, [`HANDOFF_BYTE`] (`0x01`), carrying exactly one file
//!   descriptor in one `SCM_RIGHTS` control message.
//! - The descriptor is an ESTABLISHED (or, if the client already half-closed, CLOSE_WAIT) TCP
//!   socket, `AF_INET` or `AF_INET6`, with the client's bytes already in its receive queue;
//!   the application reads and writes it as if it had accepted it itself.
//! - One agent connection carries many messages in sequence; several agents (or an agent's
//!   reconnections) may be connected at once.
//! - A receiver must accept only a message of exactly one byte equal to [`HANDOFF_BYTE`] with
//!   exactly one descriptor that is a connected TCP socket; for anything else it closes every
//!   descriptor that message carried (and should close that agent connection).
//!
//! The agent closes its own copy of the descriptor once the message is sent: the application
//! then holds the only one, so its `close` really closes the connection.
//!
//! # Pieces
//!
//! - [`HandoffSender`] (agent side): a lazily (re)connected sender; [`HandoffSender::ready`]
//!   lets the agent fail a hand-off *before* it commits when the application is not listening.
//! - [`Acceptor`] (application side, re-exported as `shardproxy::dsr::Acceptor`): binds PATH
//!   and yields each handed-off connection as an ordinary tokio [`TcpStream`]. A bad or
//!   hostile sender costs only its own agent connection: every descriptor of a bad message is
//!   closed and counted in [`Acceptor::rejected`].

use std::fs;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{
    connect, recv, recvmsg, sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use socket2::{Domain, Protocol, SockRef, Type};
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

/// The one payload byte of every hand-off message. A receiver must accept only this value.
pub const HANDOFF_BYTE: u8 = 1;

/// Agent connections an [`Acceptor`] serves at once; one more is closed as soon as it is
/// accepted (counted in [`Acceptor::refused`]).
pub const MAX_AGENT_CONNECTIONS: usize = 64;

/// Handed-off connections an [`Acceptor`] queues before the application accepts them; past
/// this the agents' messages wait in their Unix sockets (back-pressure on the agents).
const ACCEPT_QUEUE: usize = 64;

/// Descriptors one received message can deliver without `MSG_CTRUNC`: room for more than one,
/// so a message with a few extra descriptors is seen (and all of them closed) as such.
const MAX_FDS: usize = 4;

/// Payload buffer for one message: one byte more than a good message, to see a longer one.
const PAYLOAD_BUF: usize = 2;

// ---------------------------------------------------------------------------------------
// Sender (agent side)
// ---------------------------------------------------------------------------------------

/// The agent's side of the hand-off socket: a Unix stream connection to PATH, made on first
/// use and remade after any error.
///
/// Connecting to a Unix socket does not wait for the application to accept, so a caller that
/// must bound its time (the agent) wraps [`ready`](Self::ready) and [`send`](Self::send) in a
/// timeout; both are cancel-safe (a cancelled `send` has sent nothing).
#[derive(Debug)]
pub struct HandoffSender {
    path: PathBuf,
    conn: Option<UnixStream>,
}

impl HandoffSender {
    /// A sender for the application's socket at `path`; nothing is connected yet.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        HandoffSender {
            path: path.into(),
            conn: None,
        }
    }

    /// The application's socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connects if not connected (so the agent can fail a hand-off BEFORE it commits, when
    /// the application is not listening). Cheap when already connected: one non-blocking
    /// `MSG_PEEK` checks that the application has not closed its end (it never writes, so
    /// anything readable means EOF or an error), and a closed connection is remade.
    pub async fn ready(&mut self) -> io::Result<()> {
        if let Some(conn) = &self.conn {
            if peer_open(conn) {
                return Ok(());
            }
            self.conn = None;
        }
        let conn = UnixStream::connect(&self.path)
            .await
            .map_err(|e| with_path(&self.path, e))?;
        self.conn = Some(conn);
        Ok(())
    }

    /// Sends `fd` as one `SCM_RIGHTS` message with [`HANDOFF_BYTE`], connecting first if
    /// needed. On error the connection is dropped (the next call reconnects) and the error
    /// returned. The caller still owns `fd` either way; after a successful send it must close
    /// its copy, or the connection outlives the application's `close`.
    pub async fn send(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.ready().await?;
        let result = match &self.conn {
            Some(conn) => send_one(conn, fd).await,
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "hand-off socket not connected",
            )),
        };
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}

/// True if the application's end looks open: nothing readable (`EAGAIN` on a non-blocking
/// peek). The receiver never writes, so a readable byte, EOF or an error all mean "remake".
fn peer_open(conn: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        recv(
            conn.as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
        ),
        Err(Errno::EAGAIN)
    )
}

/// One `sendmsg` of [`HANDOFF_BYTE`] with `fd`, waiting for room in the socket.
async fn send_one(conn: &UnixStream, fd: BorrowedFd<'_>) -> io::Result<()> {
    match send_with_fds(conn, &[HANDOFF_BYTE], &[fd.as_raw_fd()]).await {
        Ok(1) => Ok(()),
        Ok(n) => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("hand-off sendmsg sent {n} bytes of 1"),
        )),
        Err(e) => Err(e),
    }
}

/// One `sendmsg` of `payload` with `fds` in one `SCM_RIGHTS` control message, waiting for
/// room in the socket; returns the payload bytes sent (the descriptors travel with the first
/// of them). Shared with the listener hand-over of `proxy::upgrade`.
pub(crate) async fn send_with_fds(
    conn: &UnixStream,
    payload: &[u8],
    fds: &[RawFd],
) -> io::Result<usize> {
    loop {
        conn.writable().await?;
        let sent = conn.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(payload)];
            let cmsgs = [ControlMessage::ScmRights(fds)];
            sendmsg::<()>(
                conn.as_raw_fd(),
                &iov,
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => return other,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Acceptor (application side)
// ---------------------------------------------------------------------------------------

/// The application's side of the hand-off socket: a Unix stream listener at PATH that yields
/// each handed-off connection as an ordinary tokio [`TcpStream`].
///
/// Agent connections are served by tasks on the runtime `bind` was called on (at most
/// [`MAX_AGENT_CONNECTIONS`] at once). Dropping the Acceptor stops them, closes every agent
/// connection and removes the socket file (if it is still the one this Acceptor created).
#[derive(Debug)]
pub struct Acceptor {
    path: PathBuf,
    /// (device, inode) of the socket file bound here, so drop removes only that file.
    file_id: (u64, u64),
    counters: Arc<Counters>,
    incoming: Mutex<mpsc::Receiver<(TcpStream, SocketAddr)>>,
    stop: CancellationToken,
}

#[derive(Debug, Default)]
struct Counters {
    rejected: AtomicU64,
    refused: AtomicU64,
}

impl Acceptor {
    /// Binds a Unix stream listener at `path` (removing a stale socket file first, not any
    /// other kind of file) and starts accepting agent connections on the current runtime.
    ///
    /// Fails if `path` exists and is not a socket (`AlreadyExists`; the file is left alone),
    /// if a listener is already accepting there (`AddrInUse`), or outside a tokio runtime.
    pub fn bind(path: impl AsRef<Path>) -> io::Result<Acceptor> {
        let path = path.as_ref().to_path_buf();
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            io::Error::other(format!("Acceptor::bind outside a tokio runtime: {e}"))
        })?;
        remove_stale_socket(&path)?;
        let std_listener =
            std::os::unix::net::UnixListener::bind(&path).map_err(|e| with_path(&path, e))?;
        let meta = fs::symlink_metadata(&path).map_err(|e| with_path(&path, e))?;
        let file_id = (meta.dev(), meta.ino());
        let started = std_listener.set_nonblocking(true).and_then(|()| {
            let _entered = runtime.enter();
            UnixListener::from_std(std_listener)
        });
        let listener = match started {
            Ok(listener) => listener,
            Err(e) => {
                remove_if_same(&path, file_id);
                return Err(with_path(&path, e));
            }
        };
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        runtime.spawn(accept_agents(listener, tx, counters.clone(), stop.clone()));
        Ok(Acceptor {
            path,
            file_id,
            counters,
            incoming: Mutex::new(rx),
            stop,
        })
    }

    /// The next handed-off connection, as an ordinary tokio TcpStream (non-blocking), with
    /// its peer (the client's) address. Cancel-safe; callers may share `&self`.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let mut incoming = self.incoming.lock().await;
        incoming
            .recv()
            .await
            .ok_or_else(|| io::Error::other("hand-off acceptor stopped"))
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Messages rejected so far (no descriptor, more than one, a payload other than
    /// [`HANDOFF_BYTE`], a truncated control message, or a descriptor that is not a connected
    /// TCP socket); each closed its descriptors and its agent connection.
    pub fn rejected(&self) -> u64 {
        self.counters.rejected.load(Ordering::Relaxed)
    }

    /// Agent connections closed at once because [`MAX_AGENT_CONNECTIONS`] were already open.
    pub fn refused(&self) -> u64 {
        self.counters.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.cancel();
        remove_if_same(&self.path, self.file_id);
    }
}

/// `io::Error` with the path in its message, same kind.
fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Makes way for a new listener at `path`: nothing there is fine; a socket nobody listens on
/// (connect refused) is removed; a live socket or any other kind of file is an error.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(with_path(path, e)),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{}: exists and is not a socket; not removing it",
                path.display()
            ),
        ));
    }
    match probe_listener(path) {
        // Nobody listens: a leftover of a process that died.
        Err(Errno::ECONNREFUSED) => match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(with_path(path, e)),
            _ => Ok(()),
        },
        Err(Errno::ENOENT) => Ok(()),
        // Accepted, or its backlog is full (EAGAIN): a live listener.
        Ok(()) | Err(Errno::EAGAIN) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: a listener is already accepting there", path.display()),
        )),
        Err(e) => Err(with_path(path, e.into())),
    }
}

/// A non-blocking connect to the Unix socket at `path` (never waits on a full backlog).
fn probe_listener(path: &Path) -> Result<(), Errno> {
    let addr = UnixAddr::new(path)?;
    let probe = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(probe.as_raw_fd(), &addr)
}

/// Removes `path` if it is still the file with this (device, inode).
fn remove_if_same(path: &Path, file_id: (u64, u64)) {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if (meta.dev(), meta.ino()) == file_id {
            let _ = fs::remove_file(path);
        }
    }
}

/// Accepts agent connections until stopped, one task each, at most
/// [`MAX_AGENT_CONNECTIONS`] at once.
async fn accept_agents(
    listener: UnixListener,
    tx: mpsc::Sender<(TcpStream, SocketAddr)>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_AGENT_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let agent = match accepted {
            Ok((agent, _)) => agent,
            Err(e) => {
                // Out of descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, "hand-off socket: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                limit = MAX_AGENT_CONNECTIONS,
                "hand-off socket: too many agent connections; closing one"
            );
            continue;
        };
        let (tx, counters, stop) = (tx.clone(), counters.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = serve_agent(agent, tx, &counters) => {}
            }
            drop(slot);
        });
    }
}

/// Reads one agent connection's messages until EOF, an error, a rejected message, or the
/// Acceptor's end of the queue closing.
async fn serve_agent(
    agent: UnixStream,
    tx: mpsc::Sender<(TcpStream, SocketAddr)>,
    counters: &Counters,
) {
    let mut control = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        if let Err(e) = agent.readable().await {
            tracing::debug!(error = %e, "hand-off socket: agent connection failed");
            return;
        }
        let received = agent.try_io(Interest::READABLE, || {
            receive(agent.as_raw_fd(), &mut control).map_err(io::Error::from)
        });
        let message = match received {
            Ok(message) => message,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::debug!(error = %e, "hand-off socket: agent connection failed");
                return;
            }
        };
        match judge(message) {
            Verdict::Eof => return,
            Verdict::Reject(why) => {
                counters.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    reason = why,
                    "hand-off socket: message rejected; closing that agent connection"
                );
                return;
            }
            Verdict::Accept(stream, peer) => {
                if tx.send((stream, peer)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One received message, its descriptors already owned (closed on drop).
#[derive(Debug)]
struct Message {
    /// Payload bytes received.
    len: usize,
    /// The first payload byte (0 when `len == 0`).
    first: u8,
    /// `MSG_CTRUNC`: some descriptors or control data did not fit and were discarded.
    truncated: bool,
    /// Control messages other than `SCM_RIGHTS`.
    foreign: usize,
    /// Every descriptor delivered.
    fds: Vec<OwnedFd>,
}

/// One `recvmsg` (non-blocking, `MSG_CMSG_CLOEXEC`) on `fd`; every descriptor the kernel
/// installed is owned by the result before anything else can fail.
fn receive(fd: RawFd, control: &mut [u8]) -> Result<Message, Errno> {
    let mut payload = [0u8; PAYLOAD_BUF];
    let got = recv_with_fds(fd, &mut payload, control)?;
    Ok(Message {
        len: got.len,
        first: payload[0],
        truncated: got.truncated,
        foreign: got.foreign,
        fds: got.fds,
    })
}

/// What one [`recv_with_fds`] delivered.
#[derive(Debug)]
pub(crate) struct Received {
    /// Payload bytes received (0 with no descriptor: EOF).
    pub len: usize,
    /// `MSG_CTRUNC`: some descriptors or control data did not fit and were discarded.
    pub truncated: bool,
    /// Control messages other than `SCM_RIGHTS`.
    pub foreign: usize,
    /// Every descriptor delivered, owned (closed on drop).
    pub fds: Vec<OwnedFd>,
}

/// One `recvmsg` (non-blocking, `MSG_CMSG_CLOEXEC`) on `fd` into `payload`, with `control`
/// (from `nix::cmsg_space!`) for the descriptors; every descriptor the kernel installed is
/// owned by the result before anything else can fail. Shared with the listener hand-over of
/// `proxy::upgrade`.
pub(crate) fn recv_with_fds(
    fd: RawFd,
    payload: &mut [u8],
    control: &mut [u8],
) -> Result<Received, Errno> {
    control.fill(0);
    let (len, flags) = {
        let mut iov = [IoSliceMut::new(payload)];
        let msg = recvmsg::<()>(
            fd,
            &mut iov,
            Some(&mut *control),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        )?;
        (msg.bytes, msg.flags)
    };
    // Parsed by hand rather than with nix's iterator, which refuses a truncated buffer: with
    // MSG_CTRUNC the descriptors that fit were still installed and must be closed.
    let parsed = parse_control(control);
    Ok(Received {
        len,
        truncated: flags.contains(MsgFlags::MSG_CTRUNC),
        foreign: parsed.foreign,
        fds: parsed.fds.into_iter().map(adopt).collect(),
    })
}

/// Takes ownership of a descriptor that `recvmsg` just installed in this process.
#[allow(unsafe_code)]
fn adopt(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` comes from the SCM_RIGHTS data the kernel wrote into our zeroed control
    // buffer during the recvmsg that just returned (`parse_control` yields only those, and
    // only non-negative values): the kernel installed it in this process's table for us, and
    // nothing else in the process knows its number, so this OwnedFd is its only owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// What a control buffer held.
#[derive(Debug, Default, PartialEq, Eq)]
struct Control {
    fds: Vec<RawFd>,
    foreign: usize,
}

/// `size_t`, the width of `cmsg_len` in the kernel's `struct cmsghdr`.
const WORD: usize = std::mem::size_of::<usize>();

/// `CMSG_ALIGN`: rounds up to a multiple of `size_t`.
const fn cmsg_align(n: usize) -> usize {
    (n + WORD - 1) & !(WORD - 1)
}

/// `CMSG_LEN(0)` / where the data starts: `{ size_t cmsg_len; int level; int type; }`.
const CMSG_HDR: usize = cmsg_align(WORD + 8);

/// Walks the control messages the kernel wrote at the start of `buf` (zeroed before the
/// call, so a zero `cmsg_len` ends the walk), bounded by `buf`: the `SCM_RIGHTS` descriptors
/// and a count of anything else.
fn parse_control(buf: &[u8]) -> Control {
    let mut out = Control::default();
    let mut at = 0usize;
    while let Some(header) = buf.get(at..at.saturating_add(CMSG_HDR)) {
        let Some((len, level, kind)) = cmsg_header(header) else {
            break;
        };
        if len < CMSG_HDR {
            break;
        }
        // The kernel never writes a cmsg_len past the buffer (it shortens a truncated one).
        // One that does is not trusted: its "descriptors" could be padding or numbers this
        // process uses for something else, and must not be closed.
        let Some(data) = buf.get(at + CMSG_HDR..at.saturating_add(len)) else {
            out.foreign += 1;
            break;
        };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            out.fds.extend(
                data.chunks_exact(4)
                    .filter_map(|c| <[u8; 4]>::try_from(c).ok())
                    .map(i32::from_ne_bytes)
                    .filter(|fd| *fd >= 0),
            );
        } else {
            out.foreign += 1;
        }
        // CMSG_NXTHDR; a length near usize::MAX ends the walk instead of overflowing.
        match len.checked_add(WORD - 1) {
            Some(padded) => at = at.saturating_add(padded & !(WORD - 1)),
            None => break,
        }
    }
    out
}

/// (`cmsg_len`, `cmsg_level`, `cmsg_type`) from a header's bytes.
fn cmsg_header(h: &[u8]) -> Option<(usize, i32, i32)> {
    let len = usize::from_ne_bytes(h.get(..WORD)?.try_into().ok()?);
    let level = i32::from_ne_bytes(h.get(WORD..WORD + 4)?.try_into().ok()?);
    let kind = i32::from_ne_bytes(h.get(WORD + 4..WORD + 8)?.try_into().ok()?);
    Some((len, level, kind))
}

/// What to do with one received message.
#[derive(Debug)]
enum Verdict {
    /// The agent closed its end cleanly (no message).
    Eof,
    /// A bad message: its descriptors are already closed (dropped with it).
    Reject(&'static str),
    /// A handed-off connection.
    Accept(TcpStream, SocketAddr),
}

/// Checks one message against the wire contract (see the module doc). Needs a tokio runtime
/// for the accepted stream.
fn judge(message: Message) -> Verdict {
    let Message {
        len,
        first,
        truncated,
        foreign,
        mut fds,
    } = message;
    if len == 0 && fds.is_empty() && !truncated && foreign == 0 {
        return Verdict::Eof;
    }
    if truncated {
        return Verdict::Reject("control message truncated (MSG_CTRUNC)");
    }
    if foreign > 0 {
        return Verdict::Reject("unexpected control message");
    }
    if len != 1 {
        return Verdict::Reject("payload is not exactly one byte");
    }
    if first != HANDOFF_BYTE {
        return Verdict::Reject("payload byte is not HANDOFF_BYTE");
    }
    let fd = match (fds.pop(), fds.is_empty()) {
        (Some(fd), true) => fd,
        (None, _) => return Verdict::Reject("no descriptor"),
        (Some(_), false) => return Verdict::Reject("more than one descriptor"),
    };
    if !is_tcp_stream(&fd) {
        return Verdict::Reject("descriptor is not a TCP stream socket");
    }
    let std_stream = std::net::TcpStream::from(fd);
    let Ok(peer) = std_stream.peer_addr() else {
        return Verdict::Reject("TCP socket is not connected");
    };
    match std_stream
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(std_stream))
    {
        Ok(stream) => Verdict::Accept(stream, peer),
        Err(_) => Verdict::Reject("cannot register the TCP socket"),
    }
}

/// `SO_DOMAIN` is `AF_INET`/`AF_INET6`, `SO_TYPE` is `SOCK_STREAM`, `SO_PROTOCOL` is TCP
/// (false for anything that is not a socket).
pub(crate) fn is_tcp_stream(fd: &OwnedFd) -> bool {
    let sock = SockRef::from(fd);
    matches!(sock.domain(), Ok(d) if d == Domain::IPV4 || d == Domain::IPV6)
        && matches!(sock.r#type(), Ok(t) if t == Type::STREAM)
        && matches!(sock.protocol(), Ok(Some(p)) if p == Protocol::TCP)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream as StdUnix;

    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let len = CMSG_HDR + data.len();
        let mut out = Vec::new();
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&level.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.resize(CMSG_HDR, 0);
        out.extend_from_slice(data);
        out.resize(cmsg_align(len), 0);
        out
    }

    fn fd_bytes(fds: &[i32]) -> Vec<u8> {
        fds.iter().flat_map(|fd| fd.to_ne_bytes()).collect()
    }

    #[test]
    fn parse_control_reads_rights_and_counts_others() {
        assert_eq!(parse_control(&[0u8; 64]), Control::default());
        assert_eq!(parse_control(&[]), Control::default());

        let mut buf = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &fd_bytes(&[7, 9, 11]));
        buf.extend(cmsg(libc::SOL_SOCKET, libc::SCM_CREDENTIALS, &[1; 12]));
        buf.extend(cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &fd_bytes(&[13])));
        buf.resize(buf.len() + 40, 0);
        assert_eq!(
            parse_control(&buf),
            Control {
                fds: vec![7, 9, 11, 13],
                foreign: 1
            }
        );
    }

    #[test]
    fn parse_control_stays_inside_the_buffer() {
        // cmsg_len claims 3 descriptors; the buffer holds 1 and a half: none is trusted
        // (closing a number that is not ours would close some other file of the process),
        // and the message is flagged (so it is rejected).
        let untrusted = Control {
            fds: vec![],
            foreign: 1,
        };
        let mut buf = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &fd_bytes(&[5, 6, 7]));
        buf.truncate(CMSG_HDR + 6);
        assert_eq!(parse_control(&buf), untrusted);
        // A header cut short ends the walk.
        assert_eq!(parse_control(&buf[..CMSG_HDR - 1]), Control::default());
        // A huge cmsg_len after a good one neither overflows nor yields the padding.
        let mut huge = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &fd_bytes(&[4]));
        let at = huge.len();
        huge.extend(cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &fd_bytes(&[8])));
        huge[at..at + WORD].copy_from_slice(&usize::MAX.to_ne_bytes());
        assert_eq!(
            parse_control(&huge),
            Control {
                fds: vec![4],
                foreign: 1
            }
        );
        // A length below the header ends the walk.
        let mut short = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &fd_bytes(&[4]));
        short[..WORD].copy_from_slice(&3usize.to_ne_bytes());
        assert_eq!(parse_control(&short), Control::default());
    }

    /// The hand parser agrees with nix's iterator on what the kernel really writes.
    #[test]
    fn parse_control_matches_the_kernel_layout() {
        let (a, b) = StdUnix::pair().unwrap();
        let (x, y) = StdUnix::pair().unwrap();
        let fds = [x.as_raw_fd(), y.as_raw_fd(), x.as_raw_fd()];
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&[HANDOFF_BYTE])],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut control = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut payload = [0u8; PAYLOAD_BUF];
        let mut iov = [IoSliceMut::new(&mut payload)];
        let msg = recvmsg::<()>(
            b.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .unwrap();
        let from_nix: Vec<RawFd> = msg
            .cmsgs()
            .unwrap()
            .flat_map(|c| match c {
                nix::sys::socket::ControlMessageOwned::ScmRights(fds) => fds,
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(msg.bytes, 1);
        assert_eq!(from_nix.len(), 3);
        let parsed = parse_control(&control);
        assert_eq!(parsed.fds, from_nix);
        assert_eq!(parsed.foreign, 0);
        for fd in parsed.fds {
            drop(adopt(fd));
        }
    }

    fn message(len: usize, first: u8, fds: Vec<OwnedFd>) -> Message {
        Message {
            len,
            first,
            truncated: false,
            foreign: 0,
            fds,
        }
    }

    fn unix_fd() -> OwnedFd {
        OwnedFd::from(StdUnix::pair().unwrap().0)
    }

    #[tokio::test]
    async fn judge_follows_the_contract() {
        let reason = |v: Verdict| match v {
            Verdict::Reject(why) => why,
            other => panic!("expected a rejection, got {other:?}"),
        };
        assert!(matches!(judge(message(0, 0, vec![])), Verdict::Eof));
        assert_eq!(reason(judge(message(1, 1, vec![]))), "no descriptor");
        assert_eq!(
            reason(judge(message(0, 0, vec![unix_fd()]))),
            "payload is not exactly one byte"
        );
        assert_eq!(
            reason(judge(message(2, 1, vec![unix_fd()]))),
            "payload is not exactly one byte"
        );
        assert_eq!(
            reason(judge(message(1, 2, vec![unix_fd()]))),
            "payload byte is not HANDOFF_BYTE"
        );
        assert_eq!(
            reason(judge(message(1, 1, vec![unix_fd(), unix_fd()]))),
            "more than one descriptor"
        );
        assert_eq!(
            reason(judge(message(1, 1, vec![unix_fd()]))),
            "descriptor is not a TCP stream socket"
        );
        let mut truncated = message(1, 1, vec![]);
        truncated.truncated = true;
        assert_eq!(
            reason(judge(truncated)),
            "control message truncated (MSG_CTRUNC)"
        );
        let mut foreign = message(1, 1, vec![]);
        foreign.foreign = 1;
        assert_eq!(reason(judge(foreign)), "unexpected control message");

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let unconnected = OwnedFd::from(listener.try_clone().unwrap());
        assert_eq!(
            reason(judge(message(1, 1, vec![unconnected]))),
            "TCP socket is not connected"
        );
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        match judge(message(1, 1, vec![OwnedFd::from(server)])) {
            Verdict::Accept(stream, peer) => {
                assert_eq!(peer, client.local_addr().unwrap());
                assert_eq!(stream.peer_addr().unwrap(), peer);
            }
            other => panic!("expected an accepted stream, got {other:?}"),
        }
    }
}
