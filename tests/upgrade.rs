//! Zero-downtime upgrade (`run --upgrade-socket PATH`), with real processes: a successor takes
//! the running proxy's listening sockets over the Unix socket, and the old process drains and
//! exits by itself.
//!
//! - Under a loop of at least 20,000 connections (128 concurrent clients, each connection
//!   a key header and a payload whose echo is verified), proxy A hands over to B and B to C:
//!   no connection fails (refused, reset, short echo); a connection held open through A
//!   during the hand-over completes intact after B took over; A and B exit 0 by themselves;
//!   B and C serve connections after their hand-overs (their own metrics).
//! - A stale socket file (its process killed) is not a predecessor: B binds normally.
//! - A successor configured for other listen addresses exits 2 and the running proxy keeps
//!   serving; so does one that takes the sockets and dies before saying `ready`.
//! - A successor running as another user is refused (`SO_PEERCRED`) and counted.
//!
//! Every child process is killed and reaped by a guard, by its own PID.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use shardproxy::fixtures::client::{read_name, round_trip};
use shardproxy::HeaderFormat;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Generous guard against a hang; never a performance assertion.
const HANG_GUARD: Duration = Duration::from_secs(60);
/// Connections the load loop makes at least.
const MIN_CONNECTIONS: usize = 20_000;
/// Connections the load loop makes at most (it runs on until both hand-overs are done).
const MAX_CONNECTIONS: usize = 200_000;
/// The load loop's time bound.
const LOOP_GUARD: Duration = Duration::from_secs(300);
/// Concurrent clients in the load loop: enough that connections wait in the accept queues at
/// any moment, so a hand-over that closes a listener with a queue resets some (with 8 clients
/// a naive SO_REUSEPORT bind-and-close hand-over failed only 1 to 8 connections, some runs
/// none; with 128 it failed 45 to 111 in every run).
const CLIENTS: usize = 128;

/// A `shardproxy run` child: SIGKILLed (by its PID) and reaped when dropped. Its stdout after
/// the ready line and its stderr are drained by threads so it never blocks on a pipe.
struct Proxy {
    child: Child,
    stderr: Arc<Mutex<String>>,
    listen: SocketAddr,
    admin: SocketAddr,
}

/// The outcome of starting a proxy process.
enum Started {
    /// It printed its ready line.
    Ready(Proxy),
    /// It exited first, with this status and stderr.
    Exited(ExitStatus, String),
}

impl Proxy {
    /// Starts `shardproxy run ARGS` and waits for its ready line (or its exit). Blocking.
    fn start(args: &[String]) -> Started {
        Self::start_as(args, None)
    }

    /// [`Proxy::start`], as user `uid` if given.
    fn start_as(args: &[String], uid: Option<u32>) -> Started {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardproxy"));
        cmd.arg("run")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let mut child = cmd.spawn().expect("spawn shardproxy");
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
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            lines.for_each(drop);
        });
        let line = rx.recv_timeout(HANG_GUARD);
        let mut proxy = Proxy {
            child,
            stderr,
            listen: any_port(),
            admin: any_port(),
        };
        match line {
            Ok(Some(Ok(line))) => {
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["listening", "on", addr, "admin", admin] => {
                        proxy.listen = addr.parse().expect("listen address");
                        proxy.admin = admin.parse().expect("admin address");
                        Started::Ready(proxy)
                    }
                    _ => panic!("unexpected ready line {line:?}"),
                }
            }
            Ok(None) => {
                // stdout closed without a line: the process is exiting.
                let status = proxy.wait_blocking(HANG_GUARD);
                std::thread::sleep(Duration::from_millis(100)); // let stderr drain
                Started::Exited(status, proxy.stderr())
            }
            other => panic!(
                "shardproxy {args:?}: no ready line ({other:?}); stderr:\n{}",
                proxy.stderr()
            ),
        }
    }

    /// Starts a proxy that must come up.
    async fn ready(args: Vec<String>) -> Proxy {
        match tokio::task::spawn_blocking(move || Proxy::start(&args))
            .await
            .expect("start task")
        {
            Started::Ready(p) => p,
            Started::Exited(status, stderr) => panic!("proxy exited: {status}; stderr:\n{stderr}"),
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    fn wait_blocking(&mut self, bound: Duration) -> ExitStatus {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(s) = self.try_wait() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "no exit; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the child to exit by itself; fails, saying `why` it should have, after the
    /// hang guard.
    async fn wait_exit(&mut self, why: &str) -> ExitStatus {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "shardproxy still running {HANG_GUARD:?} after {why}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM (by PID; the child is not reaped yet, so the PID is its own) and waits.
    async fn terminate(&mut self) -> ExitStatus {
        assert!(self.try_wait().is_none(), "SIGTERM to an exited child");
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"));
        kill(pid, Signal::SIGTERM).expect("kill");
        self.wait_exit("SIGTERM").await
    }

    /// SIGKILL (by PID) and reap.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory for one test's socket files, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("shardproxy-upgrade-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("upgrade.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `run` flags: two workers, the backends, the upgrade socket, and the given addresses.
fn flags(
    backends: &[shardproxy::fixtures::echo::EchoBackend],
    listen: SocketAddr,
    admin: SocketAddr,
    sock: &Path,
) -> Vec<String> {
    let mut v: Vec<String> = [
        "--listen".to_string(),
        listen.to_string(),
        "--admin".to_string(),
        admin.to_string(),
        "--workers".to_string(),
        "2".to_string(),
        "--drain-timeout".to_string(),
        "60s".to_string(),
        "--upgrade-socket".to_string(),
        sock.display().to_string(),
    ]
    .to_vec();
    for b in backends {
        v.push("--backend".into());
        v.push(format!("{}={}", b.name(), b.local_addr()));
    }
    v
}

/// `GET /metrics` on `admin`.
async fn scrape_at(admin: SocketAddr) -> String {
    let (status, body) = timeout(HANG_GUARD, http_get(admin, "/metrics"))
        .await
        .expect("scrape in time");
    assert!(status.contains("200"), "GET /metrics: {status}");
    body
}

/// One verified round trip through `addr`.
async fn one_round_trip(addr: SocketAddr, i: usize) -> Result<(), String> {
    let payload = format!("payload of connection {i}").repeat(4).into_bytes();
    match timeout(
        HANG_GUARD,
        round_trip(addr, &HeaderFormat::default(), &key(i), &payload),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("connection {i}: {e}")),
        Err(_) => Err(format!("connection {i}: no answer within {HANG_GUARD:?}")),
    }
}

/// The client loop: `CLIENTS` clients make connections until at least `MIN_CONNECTIONS` are
/// done and `enough` is set (at most `MAX_CONNECTIONS`, within `LOOP_GUARD`).
struct Load {
    done: Arc<AtomicUsize>,
    enough: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let done = Arc::new(AtomicUsize::new(0));
        let enough = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..CLIENTS {
            let (done, enough, failures, next) =
                (done.clone(), enough.clone(), failures.clone(), next.clone());
            clients.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let stop = i >= MAX_CONNECTIONS
                        || started.elapsed() > LOOP_GUARD
                        || (i >= MIN_CONNECTIONS && enough.load(Ordering::Relaxed));
                    if stop {
                        break;
                    }
                    if let Err(e) = one_round_trip(addr, i).await {
                        failures.lock().unwrap().push(e);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let task = tokio::spawn(async move {
            while let Some(r) = clients.join_next().await {
                r.expect("client task");
            }
        });
        Load {
            done,
            enough,
            failures,
            task,
        }
    }

    fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `n` connections are done (fails if the loop ends first).
    async fn wait_done(&self, n: usize) {
        let deadline = Instant::now() + LOOP_GUARD;
        while self.done() < n {
            assert!(!self.task.is_finished(), "the load loop ended early");
            assert!(Instant::now() < deadline, "the load loop is stuck");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }
}

/// A connection through the proxy that stays open across the hand-over: a key header and a
/// first chunk, echoed; later a second chunk and the close.
struct LongLived {
    conn: TcpStream,
    header: Vec<u8>,
}

impl LongLived {
    async fn open(addr: SocketAddr) -> LongLived {
        let header = HeaderFormat::default()
            .encode(b"long-lived")
            .expect("header");
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(&header).await.expect("send header");
        conn.write_all(b"first chunk").await.expect("send");
        timeout(HANG_GUARD, read_name(&mut conn))
            .await
            .expect("backend name in time")
            .expect("backend name");
        let mut echo = vec![0u8; header.len() + b"first chunk".len()];
        timeout(HANG_GUARD, conn.read_exact(&mut echo))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(&echo[header.len()..], b"first chunk");
        LongLived { conn, header }
    }

    /// Sends a second chunk, half-closes, and checks that exactly that comes back, then EOF.
    async fn finish(mut self) {
        let _ = &self.header;
        let chunk = vec![7u8; 64 * 1024];
        self.conn
            .write_all(&chunk)
            .await
            .expect("send second chunk");
        self.conn.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        timeout(HANG_GUARD, self.conn.read_to_end(&mut rest))
            .await
            .expect("rest in time")
            .expect("read rest");
        assert_eq!(
            rest.len(),
            chunk.len(),
            "the long-lived connection lost bytes"
        );
        assert!(rest == chunk, "the long-lived connection's echo differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrades_under_load_drop_no_connection_and_chain() {
    let backends = echo_backends(3).await;
    let dir = TempDir::new("load");
    let sock = dir.sock();
    let mut a = Proxy::ready(flags(&backends, any_port(), any_port(), &sock)).await;
    let (listen, admin) = (a.listen, a.admin);
    let same = flags(&backends, listen, admin, &sock);
    assert!(
        a.stderr()
            .contains("no running proxy answers on the upgrade socket"),
        "A should bind its own listeners:\n{}",
        a.stderr()
    );

    let long = LongLived::open(listen).await;
    let load = Load::start(listen);
    load.wait_done(3_000).await;

    // B takes over from A while the loop runs.
    let mut b = Proxy::ready(same.clone()).await;
    assert_eq!((b.listen, b.admin), (listen, admin));
    let at_b = load.done();
    load.wait_done(at_b + 2_000).await;
    // A is draining: the long-lived connection keeps it alive, and still works end to end.
    assert!(
        a.try_wait().is_none(),
        "A exited with a connection open:\n{}",
        a.stderr()
    );
    long.finish().await;
    let status = a
        .wait_exit("its successor took over and its last connection closed")
        .await;
    assert!(status.success(), "A: {status}; stderr:\n{}", a.stderr());
    assert!(
        a.stderr().contains("a successor took over the listeners"),
        "A's log:\n{}",
        a.stderr()
    );
    // Only B holds the admin socket now: its own metrics.
    let text = scrape_at(admin).await;
    let served_b = metric(&text, "shardproxy_connections_accepted_total");
    assert!(served_b > 0.0, "B accepted nothing");
    assert_eq!(metric(&text, "shardproxy_upgrade_inherited_listeners"), 3.0);
    let before_c = served_b;

    // C takes over from B the same way.
    let mut c = Proxy::ready(same.clone()).await;
    let at_c = load.done();
    load.wait_done(at_c + 2_000).await;
    let status = b.wait_exit("its successor took over").await;
    assert!(status.success(), "B: {status}; stderr:\n{}", b.stderr());
    let text = scrape_at(admin).await;
    assert!(metric(&text, "shardproxy_connections_accepted_total") > 0.0);
    assert_eq!(metric(&text, "shardproxy_upgrade_inherited_listeners"), 3.0);

    load.enough.store(true, Ordering::Relaxed);
    let done_task = timeout(LOOP_GUARD, async {
        while !load.task.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(done_task.is_ok(), "the load loop did not end");
    let failures = load.failures();
    let total = load.done();
    eprintln!(
        "load: {total} connections, {} failed; B accepted {before_c} before C; hand-overs at {at_b} and {at_c}",
        failures.len()
    );
    assert!(total >= MIN_CONNECTIONS, "only {total} connections");
    assert!(
        failures.is_empty(),
        "{} of {total} connections failed, e.g.:\n{}",
        failures.len(),
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let status = c.terminate().await;
    assert!(status.success(), "C: {status}");
    assert!(!sock.exists(), "C removed its upgrade socket on exit");
}

#[tokio::test]
async fn a_stale_socket_file_is_not_a_predecessor() {
    let backends = echo_backends(2).await;
    let dir = TempDir::new("stale");
    let sock = dir.sock();
    let mut a = Proxy::ready(flags(&backends, any_port(), any_port(), &sock)).await;
    let (listen, admin) = (a.listen, a.admin);
    a.kill9();
    assert!(sock.exists(), "a killed proxy leaves its socket file");

    let mut b = Proxy::ready(flags(&backends, listen, admin, &sock)).await;
    assert!(
        b.stderr()
            .contains("no running proxy answers on the upgrade socket"),
        "B's log:\n{}",
        b.stderr()
    );
    one_round_trip(listen, 1).await.expect("B serves");
    let text = scrape_at(admin).await;
    assert_eq!(metric(&text, "shardproxy_upgrade_inherited_listeners"), 0.0);
    // B replaced the stale file: it can be upgraded in turn.
    let mut c = Proxy::ready(flags(&backends, listen, admin, &sock)).await;
    assert!(b.wait_exit("C took over").await.success());
    one_round_trip(listen, 2).await.expect("C serves");
    assert!(c.terminate().await.success());
}

#[tokio::test]
async fn a_successor_for_other_addresses_exits_2_and_the_proxy_keeps_serving() {
    let backends = echo_backends(2).await;
    let dir = TempDir::new("mismatch");
    let sock = dir.sock();
    let mut a = Proxy::ready(flags(&backends, any_port(), any_port(), &sock)).await;
    let (listen, admin) = (a.listen, a.admin);

    let other = flags(&backends, refusing_addr(), admin, &sock);
    let started = tokio::task::spawn_blocking(move || Proxy::start(&other))
        .await
        .expect("start task");
    match started {
        Started::Exited(status, stderr) => {
            assert_eq!(status.code(), Some(2), "stderr:\n{stderr}");
            assert!(
                stderr.contains("same listen and admin addresses")
                    && stderr.contains("keeps serving"),
                "stderr:\n{stderr}"
            );
        }
        Started::Ready(_) => panic!("a successor with other listen addresses started"),
    }
    assert!(a.try_wait().is_none(), "A exited:\n{}", a.stderr());
    one_round_trip(listen, 1).await.expect("A still serves");
    let text = scrape_at(admin).await;
    assert_eq!(
        metric(&text, "shardproxy_upgrades_total{result=\"failed\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "shardproxy_upgrades_total{result=\"handed_over\"}"),
        0.0
    );

    // A successor that takes the sockets and dies before "ready": A keeps serving.
    {
        let mut conn = tokio::net::UnixStream::connect(&sock)
            .await
            .expect("connect");
        conn.write_all(b"shardproxy-upgrade 1\n")
            .await
            .expect("hello");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).ends_with("end 3\n") {
            let n = timeout(HANG_GUARD, conn.read(&mut buf))
                .await
                .expect("description in time")
                .expect("read");
            assert!(n > 0, "A closed the connection");
            got.extend_from_slice(&buf[..n]);
        }
        // Dropped without "ready" (the descriptors were discarded by the plain read).
    }
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let text = scrape_at(admin).await;
        if metric(&text, "shardproxy_upgrades_total{result=\"failed\"}") == 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the aborted hand-over was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(a.try_wait().is_none(), "A exited:\n{}", a.stderr());
    one_round_trip(listen, 2).await.expect("A still serves");

    // And a proper successor still can take over.
    let mut b = Proxy::ready(flags(&backends, listen, admin, &sock)).await;
    assert!(a.wait_exit("B took over").await.success());
    one_round_trip(listen, 3).await.expect("B serves");
    assert!(b.terminate().await.success());
}

#[tokio::test]
async fn a_successor_running_as_another_user_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to start a process as another user");
        return;
    }
    let backends = echo_backends(2).await;
    let dir = TempDir::new("peercred");
    let sock = dir.sock();
    let mut a = Proxy::ready(flags(&backends, any_port(), any_port(), &sock)).await;
    let (listen, admin) = (a.listen, a.admin);
    // Let another user reach the socket at all (its mode is 0600): SO_PEERCRED must refuse.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod");

    let args = flags(&backends, listen, admin, &sock);
    let started = tokio::task::spawn_blocking(move || Proxy::start_as(&args, Some(65534)))
        .await
        .expect("start task");
    match started {
        Started::Exited(status, stderr) => {
            assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
            assert!(stderr.contains("refused"), "stderr:\n{stderr}");
        }
        Started::Ready(_) => panic!("a successor running as another user took over"),
    }
    let text = scrape_at(admin).await;
    assert_eq!(
        metric(&text, "shardproxy_upgrades_total{result=\"refused\"}"),
        1.0
    );
    assert!(a.try_wait().is_none(), "A exited:\n{}", a.stderr());
    one_round_trip(listen, 1).await.expect("A still serves");
}

#[tokio::test]
async fn a_client_held_at_the_connection_limit_is_served_after_the_hand_over() {
    let backends = echo_backends(2).await;
    let dir = TempDir::new("held");
    let sock = dir.sock();
    let limited = |listen, admin| {
        let mut v = flags(&backends, listen, admin, &sock);
        v.extend(["--max-connections".to_string(), "2".to_string()]);
        v
    };
    let mut a = Proxy::ready(limited(any_port(), any_port())).await;
    let (listen, admin) = (a.listen, a.admin);
    // Two connections take A's two slots; a third is accepted and held until one frees.
    let first = LongLived::open(listen).await;
    let second = LongLived::open(listen).await;
    let third = tokio::spawn(one_round_trip(listen, 3));
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let text = scrape_at(admin).await;
        if metric(
            &text,
            "shardproxy_accept_paused_total{reason=\"max_connections\"}",
        ) >= 1.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "A never paused at its limit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B takes over while A holds that client: A must serve it as it drains, not drop it.
    let mut b = Proxy::ready(limited(listen, admin)).await;
    timeout(HANG_GUARD, async {
        while !a.stderr().contains("a successor took over the listeners") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("A handed over");
    tokio::time::sleep(Duration::from_millis(200)).await;
    first.finish().await;
    let held = timeout(HANG_GUARD, third)
        .await
        .expect("the held client is answered in time")
        .expect("client task");
    assert_eq!(held, Ok(()), "the client A held at its limit");
    second.finish().await;
    assert!(a
        .wait_exit("B took over, its connections closed")
        .await
        .success());
    assert!(b.terminate().await.success());
}

#[tokio::test]
async fn a_client_held_at_the_header_phase_limit_is_served_after_the_hand_over() {
    let backends = echo_backends(2).await;
    let dir = TempDir::new("held-header");
    let sock = dir.sock();
    let limited = |listen, admin| {
        let mut v = flags(&backends, listen, admin, &sock);
        v.extend(["--max-pending-headers".to_string(), "1".to_string()]);
        v
    };
    let mut a = Proxy::ready(limited(any_port(), any_port())).await;
    let (listen, admin) = (a.listen, a.admin);
    // A client from another host holds the one header-phase slot (no header yet); a second
    // client is accepted and held until that slot frees.
    let slow_sock = tokio::net::TcpSocket::new_v4().expect("socket");
    slow_sock
        .bind(([127, 0, 0, 3], 0).into())
        .expect("bind 127.0.0.3");
    let mut slow = slow_sock.connect(listen).await.expect("connect");
    let deadline = Instant::now() + HANG_GUARD;
    while metric(
        &scrape_at(admin).await,
        "shardproxy_connections_pending_headers",
    ) < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the slow client never entered the header phase"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = tokio::spawn(one_round_trip(listen, 3));
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let text = scrape_at(admin).await;
        if metric(
            &text,
            "shardproxy_accept_paused_total{reason=\"pending_headers\"}",
        ) >= 1.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A never paused at its header-phase limit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut b = Proxy::ready(limited(listen, admin)).await;
    timeout(HANG_GUARD, async {
        while !a.stderr().contains("a successor took over the listeners") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("A handed over");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The slow client completes its header: the slot frees and A serves the held client.
    let header = HeaderFormat::default().encode(b"slow").expect("header");
    slow.write_all(&header).await.expect("send header");
    slow.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    timeout(HANG_GUARD, slow.read_to_end(&mut rest))
        .await
        .expect("slow client answered in time")
        .expect("read");
    let held = timeout(HANG_GUARD, held)
        .await
        .expect("the held client is answered in time")
        .expect("client task");
    assert_eq!(held, Ok(()), "the client A held at its header-phase limit");
    assert!(a
        .wait_exit("B took over, its connections closed")
        .await
        .success());
    assert!(b.terminate().await.success());
}
