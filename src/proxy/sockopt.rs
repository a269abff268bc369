//! Socket and process options the proxy sets: fd limit, linger, half-close, urgent data in
//! line, and the `TCP_INQ` read hint.
//!
//! Thin wrappers over `socket2` and `nix`; no socket is created here. The crate's only two
//! `unsafe` blocks are here: `TCP_INQ` and `SIOCOUTQ`, which neither crate wraps.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use socket2::SockRef;
use tokio::net::TcpStream;

/// Raises the soft fd limit to the hard limit and returns the soft limit now in force.
pub fn raise_fd_limit() -> io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

/// The soft fd limit in force.
pub fn fd_limit() -> io::Result<u64> {
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

/// Makes the next close send RST instead of FIN (reset propagation).
pub fn set_reset_on_close(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Sends FIN on `stream` (half-close); the read side stays open.
pub fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match SockRef::from(stream).shutdown(Shutdown::Write) {
        // The peer may already be gone; there is nothing left to tell it.
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOTCONN as i32) => Ok(()),
        other => other,
    }
}

/// Options every proxied TCP socket gets, set on the listener (accepted sockets inherit
/// them) and on each backend socket before it connects:
/// - `SO_OOBINLINE`: an urgent (`MSG_OOB`) byte stays in the stream, so it is forwarded in
///   line like any other byte instead of being taken out of it (and lost to a proxy that
///   never reads out of band);
/// - `TCP_INQ`: every `recv` reports how many bytes are left, so the forwarder knows when a
///   socket is drained without an extra read (see `proxy::io`).
///
/// Failure of `TCP_INQ` only costs a syscall per read; failure of `SO_OOBINLINE` is an error.
pub fn set_stream_options(socket: &socket2::Socket) -> io::Result<()> {
    socket.set_out_of_band_inline(true)?;
    let _ = enable_inq(socket);
    Ok(())
}

/// Turns on `TCP_INQ` (Linux 4.18+): each `recvmsg` then carries a `TCP_CM_INQ` control
/// message with the bytes still queued.
#[allow(unsafe_code)]
pub fn enable_inq(socket: &impl AsFd) -> io::Result<()> {
    let one: nix::libc::c_int = 1;
    // SAFETY: the fd is open for the borrow's duration; the option value points to a live
    // c_int and its exact size is passed, so the kernel reads only that memory.
    let rc = unsafe {
        nix::libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            nix::libc::SOL_TCP,
            nix::libc::TCP_INQ,
            std::ptr::from_ref(&one).cast(),
            std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes in `stream`'s send queue: written by the proxy but not yet acknowledged by the peer
/// (`SIOCOUTQ`). A slow reader drains it; a stalled one leaves it unchanged.
#[allow(unsafe_code)]
pub fn unsent_bytes(stream: &impl AsFd) -> io::Result<u32> {
    let mut queued: nix::libc::c_int = 0;
    // SAFETY: the fd is open for the borrow's duration, and SIOCOUTQ writes exactly one
    // c_int through the pointer, which points to a live, writable c_int.
    let rc = unsafe {
        nix::libc::ioctl(
            stream.as_fd().as_raw_fd(),
            nix::libc::TIOCOUTQ,
            std::ptr::from_mut(&mut queued),
        )
    };
    if rc == 0 {
        Ok(u32::try_from(queued).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}
