//! Freeze an established TCP socket with Linux `TCP_REPAIR`, dump its state, and rebuild a
//! socket from that state (docs/design.md §6, steps 3, 4 and 6).
//!
//! - [`freeze_and_dump`] puts an ESTABLISHED socket into repair mode and reads everything the
//!   kernel needs to continue the connection elsewhere: the sequence numbers and bytes of both
//!   queues, the negotiated options (MSS, window scales, SACK, timestamps), the timestamp
//!   clock and the window. The socket stays in repair mode, so closing it sends neither FIN
//!   nor RST.
//! - [`TcpState`] is that state as plain fields, with a versioned, bounded byte encoding
//!   ([`TcpState::encode`], [`TcpState::decode`]) for the control channel.
//! - [`rebuild`] creates a new socket in repair mode, restores the state, leaves repair mode
//!   without a window probe and returns it non-blocking: on the agent's host, or back on the
//!   proxy when a hand-off fails.
//!
//! The sequence follows CRIU's `soccr/soccr.c` (`libsoccr_save`, `get_queue`,
//! `libsoccr_restore`, `libsoccr_set_sk_data_noq`, `send_queue`): the dumped queue sequence
//! number is the one after the queue's last byte, so a rebuild sets it back by the queue's
//! length and refilling the queue moves it forward again. Unlike CRIU, the whole send queue
//! is refilled in repair mode (as already-sent data the kernel retransmits after its
//! timeout); the unsent part is recorded ([`TcpState::unsent_len`]) but not treated apart.
//!
//! Everything here needs `CAP_NET_ADMIN` (the kernel refuses `TCP_REPAIR` with `EPERM`
//! otherwise); [`RepairError::reason`] tells the caller which fallback to count.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{getsockopt, setsockopt, sockopt, MsgFlags};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Version byte leading every encoded [`TcpState`]; [`TcpState::decode`] rejects others.
pub const FORMAT_VERSION: u8 = 1;

/// Bound on each queue's length, in dump, encoding and decoding: a state over it is refused
/// rather than allocated (Linux's default `tcp_wmem`/`tcp_rmem` maxima are 4 and 6 MiB).
pub const MAX_QUEUE_BYTES: usize = 64 << 20;

// Linux uapi values (include/uapi/linux/tcp.h, linux/sockios.h), as docs/design.md §6 lists.
const TCP_ESTABLISHED: u8 = 1;
/// `TCP_REPAIR` values: on, off with a window probe, off without one.
const TCP_REPAIR_ON: i32 = 1;
const TCP_REPAIR_OFF: i32 = 0;
const TCP_REPAIR_OFF_NO_WP: i32 = -1;
/// `TCP_REPAIR_QUEUE` values.
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
/// `TCP_REPAIR_OPTIONS` option codes (the TCP option kinds).
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
/// `tcpi_options` bits.
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
/// Largest window scale TCP allows (RFC 7323).
const TCP_MAX_WSCALE: u8 = 14;
/// ioctls: unread bytes, unacknowledged bytes, unsent bytes.
const SIOCINQ: libc::c_ulong = 0x541B;
const SIOCOUTQ: libc::c_ulong = 0x5411;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

/// Flag bits of the encoded state's `flags` byte.
const FLAG_SACK: u8 = 1;
const FLAG_TIMESTAMPS: u8 = 2;
const FLAG_WSCALE: u8 = 4;

/// `struct tcp_repair_window` (`TCP_REPAIR_WINDOW`, Linux 4.8+): the window state a rebuilt
/// socket needs so that it neither shrinks nor overruns the windows already advertised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct TcpWindow {
    /// Sequence number of the segment that last updated the send window.
    pub snd_wl1: u32,
    /// The peer's receive window (our send window), in bytes.
    pub snd_wnd: u32,
    /// The largest window the peer has advertised.
    pub max_window: u32,
    /// Our receive window, in bytes.
    pub rcv_wnd: u32,
    /// `rcv_nxt` when our window was last advertised.
    pub rcv_wup: u32,
}

/// One `struct tcp_repair_opt` for `TCP_REPAIR_OPTIONS`.
#[derive(Clone, Copy)]
#[repr(C)]
struct TcpRepairOpt {
    opt_code: u32,
    opt_val: u32,
}

/// The state of an established TCP connection, as [`freeze_and_dump`] reads it and
/// [`rebuild`] needs it. Plain fields; [`TcpState::encode`] gives the wire form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpState {
    /// The socket's own address (on the backend host, the virtual IP and port).
    pub local: SocketAddr,
    /// The peer's (the client's) address.
    pub peer: SocketAddr,
    /// Sequence number of the first byte of [`send_queue`](Self::send_queue) (the oldest
    /// unacknowledged byte, `snd_una`).
    pub send_seq: u32,
    /// Sequence number of the first byte of [`recv_queue`](Self::recv_queue) (the first
    /// byte the application has not read, `copied_seq`).
    pub recv_seq: u32,
    /// Bytes written but not acknowledged by the peer, sent ones first.
    pub send_queue: Vec<u8>,
    /// How many bytes at the end of the send queue were never sent (`SIOCOUTQNSD`);
    /// informational: the whole queue is refilled as sent.
    pub unsent_len: u32,
    /// Bytes received and acknowledged but not read by the application.
    pub recv_queue: Vec<u8>,
    /// Maximum segment size (`TCP_MAXSEG`).
    pub mss: u32,
    /// Whether window scaling was negotiated; the scales below are 0 otherwise.
    pub wscale_ok: bool,
    /// Our send window scale (the peer's shift).
    pub snd_wscale: u8,
    /// Our receive window scale.
    pub rcv_wscale: u8,
    /// Whether SACK was negotiated.
    pub sack_ok: bool,
    /// Whether TCP timestamps were negotiated.
    pub timestamps_ok: bool,
    /// The socket's timestamp clock (`TCP_TIMESTAMP`), so the peer sees it continue.
    pub timestamp: u32,
    /// The window state (`TCP_REPAIR_WINDOW`).
    pub window: TcpWindow,
}

/// Why a repair step failed, for the caller's fallback counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackReason {
    /// The socket was not ESTABLISHED.
    NotEstablished,
    /// The kernel refused repair mode: no `CAP_NET_ADMIN` (`EPERM`/`EACCES`).
    NoPermission,
    /// The kernel lacks an option used here, or the state has an unknown version.
    Unsupported,
    /// A malformed or over-bound encoded state.
    Invalid,
    /// Any other system call failure.
    Io,
}

impl FallbackReason {
    /// A stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::NotEstablished => "not_established",
            FallbackReason::NoPermission => "no_permission",
            FallbackReason::Unsupported => "unsupported",
            FallbackReason::Invalid => "invalid",
            FallbackReason::Io => "io",
        }
    }
}

/// A failed dump, encoding or rebuild: which step and why.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    /// The socket is not ESTABLISHED (Linux `tcpi_state` given); only those are handed off.
    #[error("socket is not ESTABLISHED (TCP state {0})")]
    NotEstablished(u8),
    /// A system call failed.
    #[error("{step}: {errno}")]
    Sys {
        /// The step that failed, e.g. `"setsockopt TCP_REPAIR"`.
        step: &'static str,
        /// The error number.
        errno: Errno,
    },
    /// A queue could not be read or refilled whole.
    #[error("{queue} queue: {done} of {expected} bytes")]
    ShortQueue {
        /// `"send"` or `"recv"`.
        queue: &'static str,
        /// Bytes read or written.
        done: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// A queue over [`MAX_QUEUE_BYTES`].
    #[error("{queue} queue of {len} bytes is over the {MAX_QUEUE_BYTES}-byte bound")]
    QueueTooLarge {
        /// `"send"` or `"recv"`.
        queue: &'static str,
        /// Its length.
        len: usize,
    },
    /// An encoded state that is not one [`TcpState::encode`] could have written.
    #[error("bad encoded TCP state: {0}")]
    Decode(&'static str),
    /// An encoded state of another version.
    #[error("encoded TCP state has version {0}, this build reads {FORMAT_VERSION}")]
    Version(u8),
}

impl RepairError {
    /// The fallback reason to count for this error.
    pub fn reason(&self) -> FallbackReason {
        match self {
            RepairError::NotEstablished(_) => FallbackReason::NotEstablished,
            RepairError::Sys { errno, .. } => match *errno {
                Errno::EPERM | Errno::EACCES => FallbackReason::NoPermission,
                Errno::ENOPROTOOPT | Errno::EOPNOTSUPP => FallbackReason::Unsupported,
                _ => FallbackReason::Io,
            },
            RepairError::Version(_) => FallbackReason::Unsupported,
            RepairError::QueueTooLarge { .. } | RepairError::Decode(_) => FallbackReason::Invalid,
            RepairError::ShortQueue { .. } => FallbackReason::Io,
        }
    }
}

fn sys(step: &'static str) -> impl FnOnce(Errno) -> RepairError {
    move |errno| RepairError::Sys { step, errno }
}

mod state;
mod sys;
#[cfg(test)]
mod tests;

use state::check_bounds;
use sys::{get_opt, ioctl_int, set_opt, tcp_info};

// ---------------------------------------------------------------------------------------
// Dump.

/// Freezes `fd` (an ESTABLISHED TCP socket) in repair mode and reads its [`TcpState`].
///
/// The flow's incoming packets should already be dropped upstream (docs/design.md §6 step 2):
/// the kernel still processes packets that reach a socket in repair mode.
///
/// On success the socket is left in repair mode: closing it then sends neither FIN nor RST.
/// The caller closes it once the hand-off has succeeded or a local [`rebuild`] has taken
/// over; on the same host, close it before a local rebuild, since its 4-tuple stays taken
/// while it is open (the rebuild's `connect` fails with `EADDRNOTAVAIL`).
///
/// On failure after repair mode was entered, the socket is taken out of repair mode again
/// (without a window probe), so it can carry on as it was.
pub fn freeze_and_dump(fd: impl AsFd) -> Result<TcpState, RepairError> {
    let fd = fd.as_fd();
    let info = tcp_info(fd).map_err(sys("getsockopt TCP_INFO"))?;
    if info.state != TCP_ESTABLISHED {
        return Err(RepairError::NotEstablished(info.state));
    }
    setsockopt(&fd, sockopt::TcpRepair, &(TCP_REPAIR_ON as u32))
        .map_err(sys("setsockopt TCP_REPAIR=1"))?;
    let dumped = dump_in_repair(fd);
    if dumped.is_err() {
        let _ = thaw(fd);
    }
    dumped
}

fn dump_in_repair(fd: BorrowedFd<'_>) -> Result<TcpState, RepairError> {
    // The state may have moved between the first look and repair mode.
    let info = tcp_info(fd).map_err(sys("getsockopt TCP_INFO"))?;
    if info.state != TCP_ESTABLISHED {
        return Err(RepairError::NotEstablished(info.state));
    }
    let local = socket2::SockRef::from(&fd)
        .local_addr()
        .map_err(io_sys("getsockname"))?
        .as_socket()
        .ok_or(RepairError::Decode("local address is not IP"))?;
    let peer = socket2::SockRef::from(&fd)
        .peer_addr()
        .map_err(io_sys("getpeername"))?
        .as_socket()
        .ok_or(RepairError::Decode("peer address is not IP"))?;

    let inq = queue_len(
        "recv",
        ioctl_int(fd, SIOCINQ).map_err(sys("ioctl SIOCINQ"))?,
    )?;
    let outq = queue_len(
        "send",
        ioctl_int(fd, SIOCOUTQ).map_err(sys("ioctl SIOCOUTQ"))?,
    )?;
    let unsent = queue_len(
        "send",
        ioctl_int(fd, SIOCOUTQNSD).map_err(sys("ioctl SIOCOUTQNSD"))?,
    )?;

    let mss = getsockopt(&fd, sockopt::TcpMaxSeg).map_err(sys("getsockopt TCP_MAXSEG"))?;
    let timestamp: u32 =
        get_opt(fd, libc::SOL_TCP, libc::TCP_TIMESTAMP).map_err(sys("getsockopt TCP_TIMESTAMP"))?;
    let window: TcpWindow = get_opt(fd, libc::SOL_TCP, libc::TCP_REPAIR_WINDOW)
        .map_err(sys("getsockopt TCP_REPAIR_WINDOW"))?;

    let (send_end, send_queue) = dump_queue(fd, TCP_SEND_QUEUE, "send", outq)?;
    let (recv_end, recv_queue) = dump_queue(fd, TCP_RECV_QUEUE, "recv", inq)?;

    let wscale_ok = info.options & TCPI_OPT_WSCALE != 0;
    Ok(TcpState {
        local,
        peer,
        send_seq: send_end.wrapping_sub(outq as u32),
        recv_seq: recv_end.wrapping_sub(inq as u32),
        send_queue,
        unsent_len: unsent.min(outq) as u32,
        recv_queue,
        mss,
        wscale_ok,
        snd_wscale: if wscale_ok { info.snd_wscale } else { 0 },
        rcv_wscale: if wscale_ok { info.rcv_wscale } else { 0 },
        sack_ok: info.options & TCPI_OPT_SACK != 0,
        timestamps_ok: info.options & TCPI_OPT_TIMESTAMPS != 0,
        timestamp,
        window,
    })
}

fn io_sys(step: &'static str) -> impl FnOnce(io::Error) -> RepairError {
    move |e| RepairError::Sys {
        step,
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

fn queue_len(queue: &'static str, len: i32) -> Result<usize, RepairError> {
    let len = usize::try_from(len).map_err(|_| RepairError::Decode("negative queue length"))?;
    if len > MAX_QUEUE_BYTES {
        return Err(RepairError::QueueTooLarge { queue, len });
    }
    Ok(len)
}

/// Selects `queue`, reads its sequence number (the one after its last byte) and peeks its
/// `len` bytes (soccr's `get_queue`).
fn dump_queue(
    fd: BorrowedFd<'_>,
    queue: i32,
    name: &'static str,
    len: usize,
) -> Result<(u32, Vec<u8>), RepairError> {
    set_opt(fd, libc::SOL_TCP, libc::TCP_REPAIR_QUEUE, &queue)
        .map_err(sys("setsockopt TCP_REPAIR_QUEUE"))?;
    let seq: u32 =
        get_opt(fd, libc::SOL_TCP, libc::TCP_QUEUE_SEQ).map_err(sys("getsockopt TCP_QUEUE_SEQ"))?;
    let mut bytes = vec![0u8; len];
    if len > 0 {
        let got = nix::sys::socket::recv(
            fd.as_raw_fd(),
            &mut bytes,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        )
        .map_err(sys("recv MSG_PEEK (repair queue)"))?;
        if got != len {
            return Err(RepairError::ShortQueue {
                queue: name,
                done: got,
                expected: len,
            });
        }
    }
    Ok((seq, bytes))
}

/// Stops `fd` from taking any more packets: a one-instruction socket filter drops them
/// before TCP sees them (no ACK, no state change), so the peer retransmits them later — to
/// wherever the connection then lives. The proxy's freeze before [`freeze_and_dump`]
/// (docs/design.md §6 step 2), with no firewall transaction; [`unblock_input`] undoes it.
pub fn block_input(fd: impl AsFd) -> Result<(), RepairError> {
    sys::attach_drop_all(fd.as_fd()).map_err(sys("setsockopt SO_ATTACH_FILTER"))
}

/// Removes the filter [`block_input`] attached: packets reach the socket again.
pub fn unblock_input(fd: impl AsFd) -> Result<(), RepairError> {
    set_opt(fd.as_fd(), libc::SOL_SOCKET, libc::SO_DETACH_FILTER, &0i32)
        .map_err(sys("setsockopt SO_DETACH_FILTER"))
}

/// Takes a socket that [`freeze_and_dump`] left in repair mode out of it again, without a
/// window probe, so it carries on where it stopped: the proxy's fallback when a hand-off
/// fails before the flow was steered (docs/design.md §6 step 9). The bytes peeked by the
/// dump are still queued.
pub fn thaw(fd: impl AsFd) -> Result<(), RepairError> {
    let fd = fd.as_fd();
    if let Err(e) = set_opt(fd, libc::SOL_TCP, libc::TCP_REPAIR, &TCP_REPAIR_OFF_NO_WP) {
        // Kernels before 4.14 know only 0 (off, with a window probe).
        set_opt(fd, libc::SOL_TCP, libc::TCP_REPAIR, &TCP_REPAIR_OFF).map_err(|_| {
            RepairError::Sys {
                step: "setsockopt TCP_REPAIR=-1",
                errno: e,
            }
        })?;
    }
    Ok(())
}

/// Closes `socket` without a word to its peer: in repair mode the kernel sends neither FIN
/// nor RST. For a rebuilt socket whose hand-off was called off (the connection lives on
/// elsewhere). Returns whether repair mode could be entered; if not, the socket is closed
/// with a reset rather than a FIN, so the peer never takes the close for a clean end.
pub fn discard(socket: impl Into<std::os::fd::OwnedFd>) -> bool {
    let fd: std::os::fd::OwnedFd = socket.into();
    let silent = setsockopt(&fd, sockopt::TcpRepair, &(TCP_REPAIR_ON as u32)).is_ok();
    if !silent {
        let _ = socket2::SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO));
    }
    drop(fd);
    silent
}

impl TcpState {
    /// Drops the first `n` bytes of the receive queue as if the application had read them
    /// (the key header, when the backend must not see it): the queue's sequence number moves
    /// on by `n`, so the rebuilt socket continues at the right byte. Fails if fewer than `n`
    /// bytes are queued.
    pub fn strip_front(&mut self, n: usize) -> Result<(), RepairError> {
        if n > self.recv_queue.len() {
            return Err(RepairError::Decode("receive queue shorter than the header"));
        }
        self.recv_queue.drain(..n);
        self.recv_seq = self.recv_seq.wrapping_add(n as u32);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Rebuild.

/// Rebuilds a connected socket from `state` (docs/design.md §6 step 6) and returns it
/// non-blocking, out of repair mode.
///
/// Order (each step's kernel precondition in brackets): new socket; `TCP_REPAIR`=1 (which
/// also lets `bind` reuse an address in use, e.g. beside a listener on the same port); both
/// queue sequence numbers [socket still CLOSED]; bind the local address; connect to the peer
/// [no SYN in repair mode: the socket goes straight to ESTABLISHED]; `TCP_REPAIR_OPTIONS`
/// [ESTABLISHED, no data yet]; `TCP_TIMESTAMP`; refill the send then the receive queue;
/// `TCP_REPAIR_WINDOW` [after the receive queue, which moves `rcv_nxt`]; `TCP_REPAIR`=-1
/// (off without a window probe; 0 if the kernel refuses -1).
///
/// Bytes refilled into the send queue count as sent: the kernel retransmits them after its
/// retransmission timeout (one second for a fresh socket). Only a queue that does not fit
/// the default socket buffer raises it (with `SO_SNDBUFFORCE`/`SO_RCVBUFFORCE`), which
/// fixes its size for the socket's life; a smaller one leaves the kernel's autotuning on.
///
/// On failure the half-built socket is closed while still in repair mode, so the peer is
/// sent nothing; the caller can try elsewhere with the same state.
pub fn rebuild(state: &TcpState) -> Result<TcpStream, RepairError> {
    check_bounds(state)?;
    let socket = Socket::new(
        Domain::for_address(state.peer),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(io_sys("socket"))?;
    let fd = socket.as_fd();
    setsockopt(&fd, sockopt::TcpRepair, &(TCP_REPAIR_ON as u32))
        .map_err(sys("setsockopt TCP_REPAIR=1"))?;

    set_queue_seq(fd, TCP_RECV_QUEUE, state.recv_seq)?;
    set_queue_seq(fd, TCP_SEND_QUEUE, state.send_seq)?;

    socket
        .bind(&SockAddr::from(state.local))
        .map_err(io_sys("bind"))?;
    match socket.connect(&SockAddr::from(state.peer)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(io_sys("connect (repair)")(e)),
    }

    let mut options = Vec::with_capacity(4);
    if state.sack_ok {
        options.push(TcpRepairOpt {
            opt_code: TCPOPT_SACK_PERM,
            opt_val: 0,
        });
    }
    if state.wscale_ok {
        options.push(TcpRepairOpt {
            opt_code: TCPOPT_WINDOW,
            opt_val: u32::from(state.snd_wscale) | (u32::from(state.rcv_wscale) << 16),
        });
    }
    if state.timestamps_ok {
        options.push(TcpRepairOpt {
            opt_code: TCPOPT_TIMESTAMP,
            opt_val: 0,
        });
    }
    options.push(TcpRepairOpt {
        opt_code: TCPOPT_MAXSEG,
        opt_val: state.mss,
    });
    for option in &options {
        set_opt(fd, libc::SOL_TCP, libc::TCP_REPAIR_OPTIONS, option)
            .map_err(sys("setsockopt TCP_REPAIR_OPTIONS"))?;
    }
    if state.timestamps_ok {
        set_opt(fd, libc::SOL_TCP, libc::TCP_TIMESTAMP, &state.timestamp)
            .map_err(sys("setsockopt TCP_TIMESTAMP"))?;
    }

    refill(
        &socket,
        TCP_SEND_QUEUE,
        "send",
        &state.send_queue,
        libc::SO_SNDBUF,
        libc::SO_SNDBUFFORCE,
    )?;
    refill(
        &socket,
        TCP_RECV_QUEUE,
        "recv",
        &state.recv_queue,
        libc::SO_RCVBUF,
        libc::SO_RCVBUFFORCE,
    )?;

    set_opt(fd, libc::SOL_TCP, libc::TCP_REPAIR_WINDOW, &state.window)
        .map_err(sys("setsockopt TCP_REPAIR_WINDOW"))?;

    thaw(fd)?;
    Ok(TcpStream::from(socket))
}

fn set_queue_seq(fd: BorrowedFd<'_>, queue: i32, seq: u32) -> Result<(), RepairError> {
    set_opt(fd, libc::SOL_TCP, libc::TCP_REPAIR_QUEUE, &queue)
        .map_err(sys("setsockopt TCP_REPAIR_QUEUE"))?;
    set_opt(fd, libc::SOL_TCP, libc::TCP_QUEUE_SEQ, &seq).map_err(sys("setsockopt TCP_QUEUE_SEQ"))
}

/// Writes `bytes` into `queue` in repair mode (soccr's `send_queue`), first raising the
/// socket buffer if the default one cannot hold them.
fn refill(
    socket: &Socket,
    queue: i32,
    name: &'static str,
    bytes: &[u8],
    buf_opt: i32,
    buf_force_opt: i32,
) -> Result<(), RepairError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let fd = socket.as_fd();
    // Queued skbs cost about twice their payload (the kernel reports, and doubles, the
    // value set). Raise the buffer only when the queue would not fit: setting it locks it
    // at that size for the socket's life (no more autotuning, so a small locked receive
    // buffer would cap every later upload on a long path).
    let need = bytes.len().saturating_mul(2).saturating_add(64 << 10);
    let have: i32 = get_opt(fd, libc::SOL_SOCKET, buf_opt).map_err(sys("getsockopt SO_*BUF"))?;
    if usize::try_from(have).unwrap_or(0) < need {
        let want = i32::try_from(need / 2).unwrap_or(i32::MAX);
        if set_opt(fd, libc::SOL_SOCKET, buf_force_opt, &want).is_err() {
            set_opt(fd, libc::SOL_SOCKET, buf_opt, &want).map_err(sys("setsockopt SO_*BUF"))?;
        }
    }
    set_opt(fd, libc::SOL_TCP, libc::TCP_REPAIR_QUEUE, &queue)
        .map_err(sys("setsockopt TCP_REPAIR_QUEUE"))?;
    let mut done = 0;
    while done < bytes.len() {
        match nix::sys::socket::send(
            fd.as_raw_fd(),
            &bytes[done..],
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            // Out of buffer space: nothing drains a queue in repair mode, so stop.
            Err(Errno::EAGAIN | Errno::ENOMEM) => break,
            Err(e) => return Err(sys("send (repair queue)")(e)),
        }
    }
    if done == bytes.len() {
        Ok(())
    } else {
        Err(RepairError::ShortQueue {
            queue: name,
            done,
            expected: bytes.len(),
        })
    }
}
