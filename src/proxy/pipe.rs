//! Splice pipes: a process-wide budget, sizes that grow with the flow, a per-thread pool.
//!
//! `splice(2)` moves bytes socket → pipe → socket without copying them through user space.
//! A pipe costs two fds and kernel memory, so:
//! - a connection holds one per direction only while bytes are moving: an idle connection
//!   holds none;
//! - the process holds at most [`limit`] pipes (pooled ones included) — HAProxy's
//!   `maxpipes`. Over it [`acquire`] fails and the caller copies instead; the fd budget
//!   (`fit_to_fd_limit`) counts two fds per allowed pipe, so pipes can never fill the fd
//!   table and lock out new clients;
//! - a pipe starts at [`DEFAULT_PIPE_SIZE`] and grows to [`MAX_PIPE_SIZE`] when a splice
//!   fills it (a bulk flow), while the process's pipe memory stays within a byte budget:
//!   for an unprivileged process 3/4 of `fs.pipe-user-pages-soft`, past which the kernel
//!   would give every new pipe of this user only 2 pages.
//!
//! Empty pipes go back to a small per-thread pool (no lock); a pipe that may still hold
//! bytes is closed, never pooled.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// Capacity a new pipe asks for. The kernel may grant less (then the granted size is used).
pub const DEFAULT_PIPE_SIZE: usize = 256 * 1024;
/// Capacity a bulk flow's pipe may grow to.
pub const MAX_PIPE_SIZE: usize = 1024 * 1024;
/// Empty pipes kept per worker thread, at most (less under a small budget).
const POOL_CAP: usize = 64;
/// Pipe memory budget for a privileged process (no per-user pipe limit applies).
const ROOT_PIPE_BYTES: usize = 512 * 1024 * 1024;

/// Pipes open in the process, pooled ones included.
static OPEN: AtomicUsize = AtomicUsize::new(0);
/// At most this many pipes open at once.
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Sum of the open pipes' capacities.
static BYTES: AtomicUsize = AtomicUsize::new(0);
/// Pipes may not grow past this sum of capacities.
static BYTES_LIMIT: AtomicUsize = AtomicUsize::new(ROOT_PIPE_BYTES);

/// Sets the process-wide pipe budget (the `--max-pipes` in force) and the pipe memory
/// budget. Pipes already open stay; new ones obey the limit.
pub fn set_limit(pipes: usize) {
    LIMIT.store(pipes, Ordering::Relaxed);
    BYTES_LIMIT.store(pipe_bytes_budget(), Ordering::Relaxed);
}

/// The process-wide pipe budget in force.
pub fn limit() -> usize {
    LIMIT.load(Ordering::Relaxed)
}

/// Pipes open now (in use or pooled): the `shardproxy_pipes_open` gauge.
pub fn open_count() -> usize {
    OPEN.load(Ordering::Relaxed)
}

/// Bytes of pipe capacity the process may hold: unlimited for root (bounded by
/// [`ROOT_PIPE_BYTES`]), else 3/4 of `fs.pipe-user-pages-soft` (the kernel's per-user soft
/// limit, shared with the user's other processes, hence the margin).
fn pipe_bytes_budget() -> usize {
    if nix::unistd::geteuid().is_root() {
        return ROOT_PIPE_BYTES;
    }
    std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|pages| *pages > 0)
        .map_or(ROOT_PIPE_BYTES, |pages| pages * 4096 / 4 * 3)
}

/// A non-blocking pipe: the read end and the write end. Counted in the process's budget
/// from creation to drop.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Granted capacity in bytes.
    capacity: usize,
}

impl Pipe {
    /// Opens a pipe and asks for [`DEFAULT_PIPE_SIZE`] (bypassing the pipe budget; the data
    /// path uses [`acquire`]).
    pub fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let requested = i32::try_from(DEFAULT_PIPE_SIZE).unwrap_or(i32::MAX);
        // Raising the size can fail (pipe-max-size, per-user limits); the default still works.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(requested));
        let capacity = granted(&write).unwrap_or(64 * 1024);
        OPEN.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(capacity, Ordering::Relaxed);
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

    /// Grows an **empty** pipe toward [`MAX_PIPE_SIZE`] if the pipe memory budget allows;
    /// a refusal (budget, kernel limits) leaves it as it is. Called when a splice filled it.
    pub fn grow(&mut self) {
        let want = MAX_PIPE_SIZE;
        if self.capacity >= want {
            return;
        }
        let extra = want - self.capacity;
        if BYTES.fetch_add(extra, Ordering::Relaxed) + extra > BYTES_LIMIT.load(Ordering::Relaxed) {
            BYTES.fetch_sub(extra, Ordering::Relaxed);
            return;
        }
        let requested = i32::try_from(want).unwrap_or(i32::MAX);
        match fcntl(&self.write, FcntlArg::F_SETPIPE_SZ(requested))
            .ok()
            .and_then(|_| granted(&self.write))
        {
            Some(now) => {
                // Account for what was granted, not what was asked.
                BYTES.fetch_sub(want, Ordering::Relaxed);
                BYTES.fetch_add(now, Ordering::Relaxed);
                self.capacity = now;
            }
            None => {
                BYTES.fetch_sub(extra, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
        BYTES.fetch_sub(self.capacity, Ordering::Relaxed);
    }
}

fn granted(write: &OwnedFd) -> Option<usize> {
    fcntl(write, FcntlArg::F_GETPIPE_SZ)
        .ok()
        .and_then(|c| usize::try_from(c).ok())
        .filter(|c| *c > 0)
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// Takes an empty pipe from this thread's pool, or opens a new one if the budget allows.
/// Fails when the budget is spent or the fd table is full: the caller copies instead.
pub fn acquire() -> io::Result<Pipe> {
    if let Some(pipe) = POOL.with(|p| p.borrow_mut().pop()) {
        return Ok(pipe);
    }
    // Reserve a slot first, so concurrent workers cannot overshoot the limit together.
    if OPEN.fetch_add(1, Ordering::Relaxed) >= LIMIT.load(Ordering::Relaxed) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
        return Err(io::Error::other("pipe budget (--max-pipes) spent"));
    }
    let pipe = Pipe::new();
    // Pipe::new counted itself; give back the reservation either way.
    OPEN.fetch_sub(1, Ordering::Relaxed);
    pipe
}

/// Returns a pipe the caller knows to be **empty** to this thread's pool (or closes it when
/// the pool is full: pooled pipes spend the budget too).
pub fn release(pipe: Pipe) {
    let cap = POOL_CAP.min(limit() / 8);
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        if pool.len() < cap {
            pool.push(pipe);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::{read, write};

    #[test]
    fn a_pipe_moves_bytes_and_reports_its_size() {
        let p = Pipe::new().unwrap();
        assert!(p.capacity() >= 64 * 1024);
        assert_eq!(write(p.writer(), b"hello").unwrap(), 5);
        let mut buf = [0u8; 8];
        assert_eq!(read(&p.read, &mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
        // Non-blocking: an empty pipe says EAGAIN rather than waiting.
        assert_eq!(read(&p.read, &mut buf), Err(nix::errno::Errno::EAGAIN));
    }

    #[test]
    fn an_empty_pipe_grows_to_the_bulk_size() {
        let mut p = Pipe::new().unwrap();
        let before = p.capacity();
        p.grow();
        // Root here; an unprivileged run may be refused by the per-user limit.
        if nix::unistd::geteuid().is_root() {
            assert_eq!(p.capacity(), MAX_PIPE_SIZE);
        } else {
            assert!(p.capacity() >= before);
        }
        assert_eq!(granted(&p.write), Some(p.capacity()));
    }

    /// The budget, the pool and the counters in one test: they are process-wide, and unit
    /// tests run in parallel threads of one process.
    #[test]
    fn the_budget_caps_open_pipes_and_pooled_ones_count() {
        // Other tests in this process may hold pipes: budget relative to what is open now.
        let base = open_count();
        set_limit(base + 2);
        let a = acquire().unwrap();
        let b = acquire().unwrap();
        let over = acquire();
        assert!(over.is_err(), "a third pipe over a budget of two");
        // A budget this small keeps no pool (cap = limit / 8 = 0 when base is small), so a
        // released pipe is closed and its slot free again.
        release(a);
        let c = acquire().expect("a slot freed by release");
        drop((b, c));
        set_limit(usize::MAX);
    }
}
