//! Socket and process options the proxy sets: fd limit, linger, half-close.
//!
//! Thin, safe wrappers over `socket2` and `nix`; no socket is created here.

use std::io;
use std::net::Shutdown;
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
