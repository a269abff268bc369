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

// ---------------------------------------------------------------------------------------
// The unsafe helpers: plain-data socket options and int ioctls nix does not wrap.

/// Plain-old-data option values: `repr(C)` or primitive, no padding, every bit pattern valid.
trait Pod: Copy {}
impl Pod for i32 {}
impl Pod for u32 {}
impl Pod for TcpWindow {}
impl Pod for TcpRepairOpt {}

/// `setsockopt(fd, level, name, &value, sizeof value)`.
#[allow(unsafe_code)]
fn set_opt<T: Pod>(fd: BorrowedFd<'_>, level: i32, name: i32, value: &T) -> Result<(), Errno> {
    // SAFETY: the fd is open for the borrow's duration; `value` points to a live `T` (plain
    // data, see `Pod`) and its exact size is passed, so the kernel reads only that memory.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    Errno::result(rc).map(drop)
}

/// `getsockopt(fd, level, name)` into a `T`; fails with `EINVAL` if the kernel wrote less
/// than a whole `T`.
#[allow(unsafe_code)]
fn get_opt<T: Pod + Default>(fd: BorrowedFd<'_>, level: i32, name: i32) -> Result<T, Errno> {
    let mut value = T::default();
    let mut len = mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the fd is open for the borrow's duration; `value` is a live, writable `T` of
    // plain data (any bytes the kernel writes are a valid `T`) and `len` holds its exact
    // size, so the kernel writes at most that many bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_mut(&mut value).cast(),
            &mut len,
        )
    };
    Errno::result(rc)?;
    if len as usize == mem::size_of::<T>() {
        Ok(value)
    } else {
        Err(Errno::EINVAL)
    }
}

/// The fields of `struct tcp_info` read here (state, options, window scales).
#[derive(Debug, Clone, Copy)]
struct TcpInfoHead {
    state: u8,
    options: u8,
    snd_wscale: u8,
    rcv_wscale: u8,
}

/// `getsockopt(TCP_INFO)`: the head of `struct tcp_info`.
#[allow(unsafe_code)]
fn tcp_info(fd: BorrowedFd<'_>) -> Result<TcpInfoHead, Errno> {
    // SAFETY: `tcp_info` is a C struct of integers, for which all-zero bytes are valid.
    let mut info: libc::tcp_info = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is open for the borrow's duration; `info` is a live, writable
    // `tcp_info` and `len` its size, so the kernel writes at most that many bytes (fewer on
    // kernels with a shorter struct; the fields read below are in the first 8 bytes).
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    Errno::result(rc)?;
    if (len as usize) < 8 {
        return Err(Errno::EINVAL);
    }
    // `__u8 tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4;` — the first field in the low bits on
    // the little-endian targets Linux TCP_REPAIR users run.
    let wscales = info.tcpi_snd_rcv_wscale;
    Ok(TcpInfoHead {
        state: info.tcpi_state,
        options: info.tcpi_options,
        snd_wscale: wscales & 0x0f,
        rcv_wscale: wscales >> 4,
    })
}

/// An `ioctl` that writes one `int` (`SIOCINQ`, `SIOCOUTQ`, `SIOCOUTQNSD`).
#[allow(unsafe_code)]
fn ioctl_int(fd: BorrowedFd<'_>, request: libc::c_ulong) -> Result<i32, Errno> {
    let mut value: libc::c_int = 0;
    // SAFETY: the fd is open for the borrow's duration, and these requests write exactly one
    // c_int through the pointer, which points to a live, writable c_int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, std::ptr::from_mut(&mut value)) };
    Errno::result(rc)?;
    Ok(value)
}

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
        let _ = set_opt(fd, libc::SOL_TCP, libc::TCP_REPAIR, &TCP_REPAIR_OFF_NO_WP);
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
/// retransmission timeout (one second for a fresh socket). Queues larger than the default
/// socket buffers raise the buffer (with `SO_SNDBUFFORCE`/`SO_RCVBUFFORCE`), which fixes
/// its size for the socket's life.
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

    if let Err(e) = set_opt(fd, libc::SOL_TCP, libc::TCP_REPAIR, &TCP_REPAIR_OFF_NO_WP) {
        // Kernels before 4.14 know only 0 (off, with a window probe).
        set_opt(fd, libc::SOL_TCP, libc::TCP_REPAIR, &TCP_REPAIR_OFF).map_err(|_| {
            RepairError::Sys {
                step: "setsockopt TCP_REPAIR=-1",
                errno: e,
            }
        })?;
    }
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
    // Queued skbs cost about twice their payload; the kernel doubles the value set.
    let want = bytes.len().saturating_add(64 << 10);
    let have: i32 = get_opt(fd, libc::SOL_SOCKET, buf_opt).map_err(sys("getsockopt SO_*BUF"))?;
    if usize::try_from(have).unwrap_or(0) < want.saturating_mul(2) {
        let want = i32::try_from(want).unwrap_or(i32::MAX);
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

// ---------------------------------------------------------------------------------------
// Encoding.

/// Checks what [`TcpState::decode`] would refuse; `encode` and `rebuild` call it too.
fn check_bounds(state: &TcpState) -> Result<(), RepairError> {
    if state.send_queue.len() > MAX_QUEUE_BYTES {
        return Err(RepairError::QueueTooLarge {
            queue: "send",
            len: state.send_queue.len(),
        });
    }
    if state.recv_queue.len() > MAX_QUEUE_BYTES {
        return Err(RepairError::QueueTooLarge {
            queue: "recv",
            len: state.recv_queue.len(),
        });
    }
    if state.unsent_len as usize > state.send_queue.len() {
        return Err(RepairError::Decode("unsent length over the send queue"));
    }
    if state.snd_wscale > TCP_MAX_WSCALE || state.rcv_wscale > TCP_MAX_WSCALE {
        return Err(RepairError::Decode("window scale over 14"));
    }
    if state.local.is_ipv4() != state.peer.is_ipv4() {
        return Err(RepairError::Decode(
            "local and peer address families differ",
        ));
    }
    Ok(())
}

impl TcpState {
    /// The control channel's byte form. All integers big-endian; version 1:
    ///
    /// | bytes | field |
    /// |---|---|
    /// | 1 | version = 1 |
    /// | 1 | flags: bit 0 SACK, bit 1 timestamps, bit 2 window scaling; others 0 |
    /// | 1, 1 | `snd_wscale`, `rcv_wscale` (≤ 14) |
    /// | 4, 4 | `mss`, `timestamp` |
    /// | 4, 4 | `send_seq`, `recv_seq` |
    /// | 5 × 4 | window: `snd_wl1`, `snd_wnd`, `max_window`, `rcv_wnd`, `rcv_wup` |
    /// | 7 or 23 | local address: family 4 then 4 address bytes and port (2), or family 6 then 16 address bytes, port (2) and scope id (4) |
    /// | 7 or 23 | peer address, the same way (same family) |
    /// | 4 | `unsent_len` (≤ send queue length) |
    /// | 4 + n | send queue: length n (≤ [`MAX_QUEUE_BYTES`]), bytes |
    /// | 4 + m | receive queue: length m (≤ [`MAX_QUEUE_BYTES`]), bytes |
    ///
    /// Nothing follows. Fails only on a state [`TcpState::decode`] would refuse.
    pub fn encode(&self) -> Result<Vec<u8>, RepairError> {
        check_bounds(self)?;
        let mut out = Vec::with_capacity(96 + self.send_queue.len() + self.recv_queue.len());
        let mut flags = 0;
        if self.sack_ok {
            flags |= FLAG_SACK;
        }
        if self.timestamps_ok {
            flags |= FLAG_TIMESTAMPS;
        }
        if self.wscale_ok {
            flags |= FLAG_WSCALE;
        }
        out.extend_from_slice(&[FORMAT_VERSION, flags, self.snd_wscale, self.rcv_wscale]);
        for v in [
            self.mss,
            self.timestamp,
            self.send_seq,
            self.recv_seq,
            self.window.snd_wl1,
            self.window.snd_wnd,
            self.window.max_window,
            self.window.rcv_wnd,
            self.window.rcv_wup,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        encode_addr(&mut out, self.local);
        encode_addr(&mut out, self.peer);
        out.extend_from_slice(&self.unsent_len.to_be_bytes());
        for queue in [&self.send_queue, &self.recv_queue] {
            // Bounded above (64 MiB < u32::MAX).
            out.extend_from_slice(&(queue.len() as u32).to_be_bytes());
            out.extend_from_slice(queue);
        }
        Ok(out)
    }

    /// Parses what [`TcpState::encode`] wrote, refusing another version, unknown flags, a
    /// window scale over 14, an unknown address family, mixed families, a queue over
    /// [`MAX_QUEUE_BYTES`], truncation and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<TcpState, RepairError> {
        let mut r = Reader { rest: bytes };
        let version = r.u8()?;
        if version != FORMAT_VERSION {
            return Err(RepairError::Version(version));
        }
        let flags = r.u8()?;
        if flags & !(FLAG_SACK | FLAG_TIMESTAMPS | FLAG_WSCALE) != 0 {
            return Err(RepairError::Decode("unknown flags"));
        }
        let snd_wscale = r.u8()?;
        let rcv_wscale = r.u8()?;
        let mss = r.u32()?;
        let timestamp = r.u32()?;
        let send_seq = r.u32()?;
        let recv_seq = r.u32()?;
        let window = TcpWindow {
            snd_wl1: r.u32()?,
            snd_wnd: r.u32()?,
            max_window: r.u32()?,
            rcv_wnd: r.u32()?,
            rcv_wup: r.u32()?,
        };
        let local = r.addr()?;
        let peer = r.addr()?;
        let unsent_len = r.u32()?;
        let send_queue = r.queue("send")?;
        let recv_queue = r.queue("recv")?;
        if !r.rest.is_empty() {
            return Err(RepairError::Decode("trailing bytes"));
        }
        let state = TcpState {
            local,
            peer,
            send_seq,
            recv_seq,
            send_queue,
            unsent_len,
            recv_queue,
            mss,
            wscale_ok: flags & FLAG_WSCALE != 0,
            snd_wscale,
            rcv_wscale,
            sack_ok: flags & FLAG_SACK != 0,
            timestamps_ok: flags & FLAG_TIMESTAMPS != 0,
            timestamp,
            window,
        };
        check_bounds(&state)?;
        Ok(state)
    }
}

fn encode_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        SocketAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
            out.extend_from_slice(&a.scope_id().to_be_bytes());
        }
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], RepairError> {
        if self.rest.len() < n {
            return Err(RepairError::Decode("truncated"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RepairError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, RepairError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, RepairError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, RepairError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn addr(&mut self) -> Result<SocketAddr, RepairError> {
        match self.u8()? {
            4 => {
                let ip = Ipv4Addr::from(self.array::<4>()?);
                let port = self.u16()?;
                Ok(SocketAddr::V4(SocketAddrV4::new(ip, port)))
            }
            6 => {
                let ip = Ipv6Addr::from(self.array::<16>()?);
                let port = self.u16()?;
                let scope = self.u32()?;
                Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope)))
            }
            _ => Err(RepairError::Decode("unknown address family")),
        }
    }

    fn queue(&mut self, queue: &'static str) -> Result<Vec<u8>, RepairError> {
        let len = self.u32()? as usize;
        if len > MAX_QUEUE_BYTES {
            return Err(RepairError::QueueTooLarge { queue, len });
        }
        Ok(self.take(len)?.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;
    use std::net::{Shutdown, TcpListener};

    fn sample() -> TcpState {
        TcpState {
            local: "10.0.0.1:443".parse().unwrap(),
            peer: "192.0.2.7:50123".parse().unwrap(),
            send_seq: 0xfff0_0000,
            recv_seq: 7,
            send_queue: b"response bytes".to_vec(),
            unsent_len: 5,
            recv_queue: b"request".to_vec(),
            mss: 1448,
            wscale_ok: true,
            snd_wscale: 7,
            rcv_wscale: 9,
            sack_ok: true,
            timestamps_ok: true,
            timestamp: 123_456,
            window: TcpWindow {
                snd_wl1: 1,
                snd_wnd: 2,
                max_window: 3,
                rcv_wnd: 4,
                rcv_wup: 5,
            },
        }
    }

    #[test]
    fn round_trip_v4_and_v6() {
        let s = sample();
        assert_eq!(TcpState::decode(&s.encode().unwrap()).unwrap(), s);
        let mut s6 = sample();
        s6.local = "[2001:db8::1]:443".parse().unwrap();
        s6.peer = "[fe80::2%3]:9".parse().unwrap();
        s6.sack_ok = false;
        s6.send_queue.clear();
        s6.unsent_len = 0;
        assert_eq!(TcpState::decode(&s6.encode().unwrap()).unwrap(), s6);
    }

    #[test]
    fn layout_is_as_documented() {
        let bytes = sample().encode().unwrap();
        // version, flags (SACK | TS | WSCALE), scales, mss.
        assert_eq!(&bytes[..8], &[1, 7, 7, 9, 0, 0, 0x05, 0xa8]);
        // 4 + 9 × 4 header, 2 × 7 addresses, 4 unsent, 4 + 14 send, 4 + 7 recv.
        assert_eq!(bytes.len(), 40 + 14 + 4 + 18 + 11);
        assert_eq!(&bytes[bytes.len() - 7..], b"request");
    }

    #[test]
    fn decode_rejects_every_truncation_and_trailing_bytes() {
        let bytes = sample().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(
                matches!(TcpState::decode(&bytes[..n]), Err(RepairError::Decode(_))),
                "prefix of {n} bytes accepted"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            TcpState::decode(&long),
            Err(RepairError::Decode(_))
        ));
    }

    #[test]
    fn decode_rejects_bad_version_flags_family_and_scale() {
        let bytes = sample().encode().unwrap();
        let mut b = bytes.clone();
        b[0] = 2;
        let e = TcpState::decode(&b).unwrap_err();
        assert!(matches!(e, RepairError::Version(2)));
        assert_eq!(e.reason(), FallbackReason::Unsupported);
        let mut b = bytes.clone();
        b[1] = 8;
        assert!(matches!(TcpState::decode(&b), Err(RepairError::Decode(_))));
        let mut b = bytes.clone();
        b[2] = 15;
        assert!(matches!(TcpState::decode(&b), Err(RepairError::Decode(_))));
        let mut b = bytes.clone();
        b[40] = 5; // local address family
        assert!(matches!(TcpState::decode(&b), Err(RepairError::Decode(_))));
    }

    #[test]
    fn decode_rejects_queues_over_the_bound_before_allocating() {
        let mut s = sample();
        s.recv_queue.clear();
        let mut bytes = s.encode().unwrap();
        // The receive queue's length field is the last 4 bytes.
        let at = bytes.len() - 4;
        bytes[at..].copy_from_slice(&((MAX_QUEUE_BYTES as u32) + 1).to_be_bytes());
        let e = TcpState::decode(&bytes).unwrap_err();
        assert!(
            matches!(e, RepairError::QueueTooLarge { queue: "recv", .. }),
            "{e}"
        );
        assert_eq!(e.reason(), FallbackReason::Invalid);
        // At the bound exactly, only the missing bytes are wrong.
        bytes[at..].copy_from_slice(&(MAX_QUEUE_BYTES as u32).to_be_bytes());
        assert!(matches!(
            TcpState::decode(&bytes),
            Err(RepairError::Decode("truncated"))
        ));
    }

    #[test]
    fn encode_refuses_what_decode_would() {
        let mut s = sample();
        s.unsent_len = 100;
        assert!(s.encode().is_err());
        let mut s = sample();
        s.peer = "[::1]:1".parse().unwrap();
        assert!(s.encode().is_err());
    }

    #[test]
    fn errno_classification() {
        let e = |errno| RepairError::Sys { step: "x", errno }.reason();
        assert_eq!(e(Errno::EPERM), FallbackReason::NoPermission);
        assert_eq!(e(Errno::ENOPROTOOPT), FallbackReason::Unsupported);
        assert_eq!(e(Errno::EADDRINUSE), FallbackReason::Io);
        assert_eq!(
            RepairError::NotEstablished(8).reason().as_str(),
            "not_established"
        );
    }

    /// Needs no privilege: the state is checked before repair mode is asked for.
    #[test]
    fn dump_refuses_sockets_that_are_not_established() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = freeze_and_dump(&listener).unwrap_err();
        assert!(matches!(e, RepairError::NotEstablished(10)), "{e}"); // TCP_LISTEN
        assert_eq!(e.reason(), FallbackReason::NotEstablished);

        // CLOSE_WAIT: the peer has sent its FIN.
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.write_all(b"x").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match freeze_and_dump(&server) {
                Err(RepairError::NotEstablished(8)) => break, // TCP_CLOSE_WAIT
                Err(RepairError::NotEstablished(s)) => panic!("state {s}"),
                _ if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => panic!("FIN never arrived: {other:?}"),
            }
        }
    }

    proptest! {
        #[test]
        fn prop_round_trip(
            send in proptest::collection::vec(any::<u8>(), 0..300),
            recv in proptest::collection::vec(any::<u8>(), 0..300),
            seqs in any::<(u32, u32, u32, u32)>(),
            scales in (0u8..=14, 0u8..=14),
            flags in any::<(bool, bool, bool)>(),
            v6 in any::<bool>(),
        ) {
            let mut s = sample();
            s.unsent_len = (seqs.3 as usize % (send.len() + 1)) as u32;
            s.send_queue = send;
            s.recv_queue = recv;
            s.send_seq = seqs.0;
            s.recv_seq = seqs.1;
            s.timestamp = seqs.2;
            (s.snd_wscale, s.rcv_wscale) = scales;
            (s.sack_ok, s.timestamps_ok, s.wscale_ok) = flags;
            if v6 {
                s.local = "[::1]:80".parse().unwrap();
                s.peer = "[::1]:5000".parse().unwrap();
            }
            let bytes = s.encode().unwrap();
            prop_assert_eq!(TcpState::decode(&bytes).unwrap(), s);
            // Any strict prefix is refused.
            let cut = seqs.3 as usize % bytes.len();
            prop_assert!(TcpState::decode(&bytes[..cut]).is_err());
        }

        #[test]
        fn prop_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = TcpState::decode(&bytes);
        }
    }
}
