//! The `shardproxy` binary as a child process: run to completion under a hang guard, or
//! kept running as a [`Daemon`] (killed and reaped when dropped) whose ready line gives its
//! addresses.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Generous guard against a hang; never a performance assertion.
pub const HANG_GUARD: Duration = Duration::from_secs(30);

pub fn shardproxy() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardproxy"));
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to completion and returns its output; kills it and fails after `guard`.
pub fn output_within(cmd: &mut Command, guard: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shardproxy");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(guard) {
        Ok(out) => out.expect("wait for shardproxy"),
        Err(_) => {
            // Not yet reaped, so the pid is still this child's.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let _ = rx.recv();
            panic!("shardproxy {cmd:?} did not exit within {guard:?}");
        }
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A long-running child (`run`, `backend`): SIGKILLed and reaped when dropped. Its stdout
/// after the ready line and its stderr are drained by threads so it never blocks on a pipe.
pub struct Daemon {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Daemon {
    /// Starts `shardproxy ARGS` and waits for its first stdout line.
    pub fn start(args: &[&str]) -> (Daemon, String) {
        Self::start_with_log(args, None)
    }

    /// [`Daemon::start`] with `RUST_LOG` set to `filter` (if given), for a test that waits
    /// for a log line whatever the environment's filter.
    pub fn start_with_log(args: &[&str], filter: Option<&str>) -> (Daemon, String) {
        let mut cmd = shardproxy();
        if let Some(filter) = filter {
            cmd.env("RUST_LOG", filter);
        }
        let mut child = cmd
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shardproxy");
        let stdout = child.stdout.take().expect("stdout");
        let mut err_pipe = child.stderr.take().expect("stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&text(&buf[..n]));
            }
        });
        let daemon = Daemon { child, stderr };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            lines.for_each(drop);
        });
        let line = match rx.recv_timeout(HANG_GUARD) {
            Ok(Some(Ok(line))) => line,
            other => panic!(
                "shardproxy {args:?}: no ready line ({other:?}); stderr:\n{}",
                daemon.stderr()
            ),
        };
        (daemon, line)
    }

    /// The child's PID (valid while the daemon is held: it is reaped only on drop).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends `sig` to this child, by its PID (it has not been reaped, so the PID is its own).
    pub fn signal(&mut self, sig: Signal) {
        assert!(self.try_wait().is_none(), "signal {sig} to an exited child");
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"));
        kill(pid, sig).unwrap_or_else(|e| panic!("kill {sig}: {e}"));
    }

    /// Waits until the child's stderr contains `needle`; fails after the hang guard.
    pub async fn wait_stderr(&self, needle: &str) {
        let deadline = Instant::now() + HANG_GUARD;
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "stderr never showed {needle:?}:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `Some(status)` once the child exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the child to exit (it was told to); fails after the hang guard.
    pub async fn wait(&mut self) -> ExitStatus {
        self.wait_within(HANG_GUARD, "it was told to").await
    }

    /// Waits for the child to exit; fails, saying `why` it should have, after `bound`.
    pub async fn wait_within(&mut self, bound: Duration, why: &str) -> ExitStatus {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "shardproxy still running {bound:?} after {why}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses `listening on ADDR [admin ADDR]`.
pub fn parse_ready(line: &str) -> (SocketAddr, Option<SocketAddr>) {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["listening", "on", addr] => (addr.parse().expect("listen address"), None),
        ["listening", "on", addr, "admin", admin] => (
            addr.parse().expect("listen address"),
            Some(admin.parse().expect("admin address")),
        ),
        _ => panic!("unexpected ready line {line:?}"),
    }
}
