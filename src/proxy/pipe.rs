//! Splice pipes and their per-thread pool.
//!
//! `splice(2)` moves bytes socket → pipe → socket without copying them through user space.
//! A pipe costs two fds and kernel memory, so a connection holds one per direction only
//! while bytes are moving: an idle connection holds none. Empty pipes go back to a small
//! per-thread pool (no lock); a pipe that may still hold bytes is closed, never pooled.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// Requested pipe capacity. Larger pipes mean fewer syscalls on bulk transfers; the kernel
/// may grant less (then the granted size is used).
pub const DEFAULT_PIPE_SIZE: usize = 256 * 1024;
/// Empty pipes kept per worker thread.
const POOL_CAP: usize = 64;

/// A non-blocking pipe: the read end and the write end.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Granted capacity in bytes.
    capacity: usize,
}

impl Pipe {
    /// Opens a pipe and asks for [`DEFAULT_PIPE_SIZE`].
    pub fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let requested = i32::try_from(DEFAULT_PIPE_SIZE).unwrap_or(i32::MAX);
        // Raising the size can fail (pipe-max-size, per-user limits); the default still works.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(requested));
        let capacity = fcntl(&write, FcntlArg::F_GETPIPE_SZ)
            .ok()
            .and_then(|c| usize::try_from(c).ok())
            .filter(|c| *c > 0)
            .unwrap_or(64 * 1024);
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// The read end.
    pub fn reader(&self) -> impl AsFd + '_ {
        &self.read
    }

    /// The write end.
    pub fn writer(&self) -> impl AsFd + '_ {
        &self.write
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// Takes an empty pipe from this thread's pool, or opens a new one.
pub fn acquire() -> io::Result<Pipe> {
    match POOL.with(|p| p.borrow_mut().pop()) {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(),
    }
}

/// Returns a pipe the caller knows to be **empty** to this thread's pool.
pub fn release(pipe: Pipe) {
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        if pool.len() < POOL_CAP {
            pool.push(pipe);
        }
    });
}
