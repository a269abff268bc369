//! The zero-hop hand-over of a connection to the application (`shardproxy::dsr::fdpass`): a
//! real TCP connection's server side passed through `HandoffSender` → `Acceptor` keeps
//! every byte (those queued before the pass included) both ways and its half-close; many
//! passes over one and over several agent connections; `ready()` before and after the
//! Acceptor exists; every kind of bad message is rejected, counted and its descriptors
//! closed while a good sender keeps working; the socket file's life; and the `backend`
//! subcommand greeting a connection handed to it.
//!
//! Everything runs on 127.0.0.1 and in a private temporary directory; no root needed.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnix;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{any_port, fill_prng};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::unistd::Pid;
use shardproxy::dsr::fdpass::{HandoffSender, HANDOFF_BYTE, MAX_AGENT_CONNECTIONS};
use shardproxy::dsr::Acceptor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// Generous guard against a hang; never a performance assertion.
const GUARD: Duration = Duration::from_secs(30);

/// A private directory under the system temp dir, removed on drop (even after a panic).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "shardproxy-fdpass-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("handoff.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A connected loopback TCP pair: (client, server side).
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind(any_port()).await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (client, server)
}

async fn accept(acceptor: &Acceptor) -> (TcpStream, SocketAddr) {
    timeout(GUARD, acceptor.accept())
        .await
        .expect("a handed-off connection in time")
        .expect("accept")
}

/// Passes the server side of a fresh pair whose client first sent `tag`; returns the client.
async fn pass_tagged(sender: &mut HandoffSender, tag: u32) -> TcpStream {
    let (mut client, server) = tcp_pair().await;
    client.write_all(&tag.to_be_bytes()).await.unwrap();
    timeout(GUARD, sender.send(server.as_fd()))
        .await
        .expect("send in time")
        .expect("send");
    client
}

/// Accepts `n` connections; each must start with its 4-byte tag, which comes back as an
/// echo to the client; returns the tags seen.
async fn accept_tagged(acceptor: &Acceptor, n: usize) -> Vec<u32> {
    let mut tags = Vec::new();
    for _ in 0..n {
        let (mut stream, _) = accept(acceptor).await;
        let mut tag = [0u8; 4];
        timeout(GUARD, stream.read_exact(&mut tag))
            .await
            .expect("tag in time")
            .unwrap();
        stream.write_all(&tag).await.unwrap();
        tags.push(u32::from_be_bytes(tag));
    }
    tags
}

/// The client reads its own tag back: the connection it is on is the one that was passed.
async fn expect_echoed_tag(client: &mut TcpStream, tag: u32) {
    let mut back = [0u8; 4];
    timeout(GUARD, client.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(u32::from_be_bytes(back), tag);
}

/// Waits for EOF (or a reset) on `client`: nobody holds the other end open any more.
async fn expect_closed(client: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 16];
    match timeout(GUARD, client.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: unexpected {n} bytes"),
        Err(_) => panic!("{what}: still open (a passed descriptor was not closed)"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passed_connection_keeps_queued_bytes_both_directions_and_half_close() {
    let dir = TempDir::new();
    let acceptor = Acceptor::bind(dir.sock()).unwrap();
    let mut sender = HandoffSender::new(dir.sock());

    let (mut client, server) = tcp_pair().await;
    let mut early = vec![0u8; 32 * 1024];
    fill_prng(1, &mut early);
    client.write_all(&early).await.unwrap();
    let server_local = server.local_addr().unwrap();
    sender.send(server.as_fd()).await.unwrap();
    drop(server); // the agent closes its copy once sent

    let (mut passed, peer) = accept(&acceptor).await;
    assert_eq!(peer, client.local_addr().unwrap());
    assert_eq!(passed.local_addr().unwrap(), server_local);
    // Received with MSG_CMSG_CLOEXEC: a child the application spawns does not inherit it.
    let fd_flags = fcntl(passed.as_fd(), FcntlArg::F_GETFD).unwrap();
    assert!(FdFlag::from_bits_truncate(fd_flags).contains(FdFlag::FD_CLOEXEC));
    let mut got = vec![0u8; early.len()];
    timeout(GUARD, passed.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(got == early, "bytes queued before the hand-off differ");

    // Both directions at once, more than a socket buffer each way.
    let mut up = vec![0u8; 1 << 20];
    fill_prng(2, &mut up);
    let mut down = vec![0u8; 1 << 20];
    fill_prng(3, &mut down);
    let (mut c_read, mut c_write) = client.split();
    let (mut p_read, mut p_write) = passed.split();
    let mut up_got = vec![0u8; up.len()];
    let mut down_got = vec![0u8; down.len()];
    timeout(GUARD, async {
        tokio::try_join!(
            c_write.write_all(&up),
            p_read.read_exact(&mut up_got),
            p_write.write_all(&down),
            c_read.read_exact(&mut down_got),
        )
    })
    .await
    .expect("exchange in time")
    .unwrap();
    assert!(up_got == up, "client → application bytes differ");
    assert!(down_got == down, "application → client bytes differ");

    // The client half-closes; the application sees EOF, still answers, then closes.
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    timeout(GUARD, passed.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    passed.write_all(b"after your FIN").await.unwrap();
    passed.shutdown().await.unwrap();
    let mut tail = Vec::new();
    timeout(GUARD, client.read_to_end(&mut tail))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(tail, b"after your FIN");
    assert_eq!(acceptor.rejected(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_passes_over_one_agent_connection() {
    let dir = TempDir::new();
    let acceptor = Acceptor::bind(dir.sock()).unwrap();
    let mut sender = HandoffSender::new(dir.sock());
    const N: u32 = 200;
    let app = async {
        let tags = accept_tagged(&acceptor, N as usize).await;
        tags
    };
    let agent = async {
        let mut clients = Vec::new();
        for tag in 0..N {
            clients.push((tag, pass_tagged(&mut sender, tag).await));
        }
        clients
    };
    let (mut tags, clients) = tokio::join!(app, agent);
    tags.sort_unstable();
    assert_eq!(tags, (0..N).collect::<Vec<_>>());
    for (tag, mut client) in clients {
        expect_echoed_tag(&mut client, tag).await;
    }
    assert_eq!(acceptor.rejected(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_passes_over_four_concurrent_agent_connections() {
    let dir = TempDir::new();
    let acceptor = Acceptor::bind(dir.sock()).unwrap();
    const AGENTS: u32 = 4;
    const EACH: u32 = 50;
    let mut agents = tokio::task::JoinSet::new();
    for a in 0..AGENTS {
        let path = dir.sock();
        agents.spawn(async move {
            let mut sender = HandoffSender::new(path);
            let mut clients = Vec::new();
            for i in 0..EACH {
                let tag = a * EACH + i;
                clients.push((tag, pass_tagged(&mut sender, tag).await));
            }
            clients
        });
    }
    let mut tags = accept_tagged(&acceptor, (AGENTS * EACH) as usize).await;
    tags.sort_unstable();
    assert_eq!(tags, (0..AGENTS * EACH).collect::<Vec<_>>());
    while let Some(clients) = agents.join_next().await {
        for (tag, mut client) in clients.unwrap() {
            expect_echoed_tag(&mut client, tag).await;
        }
    }
    assert_eq!(acceptor.rejected(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_the_application_listening() {
    let dir = TempDir::new();
    let mut sender = HandoffSender::new(dir.sock());
    let err = sender.ready().await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    // send fails the same way, and the caller still owns its socket.
    let (mut client, server) = tcp_pair().await;
    assert!(sender.send(server.as_fd()).await.is_err());
    server.try_write(b"still mine").unwrap();
    let mut buf = [0u8; 10];
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still mine");

    let acceptor = Acceptor::bind(dir.sock()).unwrap();
    sender.ready().await.unwrap();
    sender.ready().await.unwrap(); // cheap and still fine when connected
    let mut client = pass_tagged(&mut sender, 7).await;
    assert_eq!(accept_tagged(&acceptor, 1).await, vec![7]);
    expect_echoed_tag(&mut client, 7).await;

    // The application goes away: ready() notices the closed connection and fails to
    // reconnect (its socket file is gone).
    drop(acceptor);
    let deadline = Instant::now() + GUARD;
    loop {
        match sender.ready().await {
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
                break;
            }
            Ok(()) => {
                assert!(Instant::now() < deadline, "ready() never saw the close");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // A new application at the same path: the same sender reconnects.
    let acceptor = Acceptor::bind(dir.sock()).unwrap();
    let mut client = pass_tagged(&mut sender, 8).await;
    assert_eq!(accept_tagged(&acceptor, 1).await, vec![8]);
    expect_echoed_tag(&mut client, 8).await;
}

/// A hand-crafted agent connection that sends one message with nix `sendmsg`.
fn raw_send(agent: &StdUnix, payload: &[u8], fds: &[RawFd]) {
    let iov = [std::io::IoSlice::new(payload)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<()>(agent.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
    assert_eq!(sent, payload.len());
}

/// Waits until the Acceptor has closed `agent` (EOF or reset).
fn expect_agent_closed(agent: &StdUnix, what: &str) {
    agent.set_read_timeout(Some(GUARD)).unwrap();
    let mut buf = [0u8; 1];
    match (&*agent).read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("{what}: agent connection not closed: {other:?}"),
    }
}

/// Waits (bounded) for EOF on `end`: every copy of its other end has been closed.
fn expect_eof(mut end: std::fs::File, what: &str) {
    let mut fds = [PollFd::new(end.as_fd(), PollFlags::POLLIN)];
    let ready = poll(&mut fds, PollTimeout::from(30_000u16)).unwrap();
    assert_eq!(
        ready, 1,
        "{what}: still open (a passed descriptor was not closed)"
    );
    let mut buf = [0u8; 1];
    assert_eq!(end.read(&mut buf).unwrap(), 0, "{what}: not closed");
}

/// One rejected-message case: what to send, and the clients whose server sides it carried
/// (each must see its connection closed once our copies are gone).
struct Hostile {
    what: &'static str,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
    tcp_clients: Vec<TcpStream>,
    /// Other ends whose EOF proves the passed descriptor was closed (pipes, Unix sockets).
    other_ends: Vec<std::fs::File>,
}

async fn tcp_server_sides(n: usize) -> (Vec<OwnedFd>, Vec<TcpStream>) {
    let mut fds = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..n {
        let (client, server) = tcp_pair().await;
        fds.push(OwnedFd::from(server.into_std().unwrap()));
        clients.push(client);
    }
    (fds, clients)
}

async fn hostile_cases() -> Vec<Hostile> {
    let mut cases = Vec::new();
    cases.push(Hostile {
        what: "no descriptor",
        payload: vec![HANDOFF_BYTE],
        fds: vec![],
        tcp_clients: vec![],
        other_ends: vec![],
    });
    let (fds, tcp_clients) = tcp_server_sides(2).await;
    cases.push(Hostile {
        what: "two descriptors",
        payload: vec![HANDOFF_BYTE],
        fds,
        tcp_clients,
        other_ends: vec![],
    });
    // More than the receiver's control buffer holds: MSG_CTRUNC, with the ones that fit
    // still installed in the receiver (they must be closed too).
    let (fds, tcp_clients) = tcp_server_sides(9).await;
    cases.push(Hostile {
        what: "nine descriptors (truncated control message)",
        payload: vec![HANDOFF_BYTE],
        fds,
        tcp_clients,
        other_ends: vec![],
    });
    let (fds, tcp_clients) = tcp_server_sides(1).await;
    cases.push(Hostile {
        what: "payload byte 0x02",
        payload: vec![2],
        fds,
        tcp_clients,
        other_ends: vec![],
    });
    let (fds, tcp_clients) = tcp_server_sides(1).await;
    cases.push(Hostile {
        what: "two payload bytes",
        payload: vec![HANDOFF_BYTE, HANDOFF_BYTE],
        fds,
        tcp_clients,
        other_ends: vec![],
    });
    let (a, b) = StdUnix::pair().unwrap();
    cases.push(Hostile {
        what: "a Unix stream socket",
        payload: vec![HANDOFF_BYTE],
        fds: vec![OwnedFd::from(a)],
        tcp_clients: vec![],
        other_ends: vec![std::fs::File::from(OwnedFd::from(b))],
    });
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    cases.push(Hostile {
        what: "a pipe",
        payload: vec![HANDOFF_BYTE],
        fds: vec![write_end],
        tcp_clients: vec![],
        other_ends: vec![std::fs::File::from(read_end)],
    });
    // Connected, so it has a peer address like a TCP socket.
    let udp = std::net::UdpSocket::bind(any_port()).unwrap();
    udp.connect(udp.local_addr().unwrap()).unwrap();
    cases.push(Hostile {
        what: "a connected UDP socket",
        payload: vec![HANDOFF_BYTE],
        fds: vec![OwnedFd::from(udp)],
        tcp_clients: vec![],
        other_ends: vec![],
    });
    let listener = std::net::TcpListener::bind(any_port()).unwrap();
    cases.push(Hostile {
        what: "a listening TCP socket",
        payload: vec![HANDOFF_BYTE],
        fds: vec![OwnedFd::from(listener)],
        tcp_clients: vec![],
        other_ends: vec![],
    });
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_rejected_counted_and_closed_while_a_good_sender_works() {
    let dir = TempDir::new();
    let acceptor = Acceptor::bind(dir.sock()).unwrap();
    let mut good = HandoffSender::new(dir.sock());
    good.ready().await.unwrap();

    let cases = hostile_cases().await;
    let total = cases.len() as u64;
    for (i, case) in cases.into_iter().enumerate() {
        let Hostile {
            what,
            payload,
            fds,
            mut tcp_clients,
            other_ends,
        } = case;
        let agent = StdUnix::connect(dir.sock()).unwrap();
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        raw_send(&agent, &payload, &raw);
        drop(fds); // our copies: from here only the receiver could hold them open
        let agent = tokio::task::spawn_blocking(move || {
            expect_agent_closed(&agent, what);
            agent
        })
        .await
        .unwrap();
        for client in &mut tcp_clients {
            expect_closed(client, what).await;
        }
        for end in other_ends {
            tokio::task::spawn_blocking(move || expect_eof(end, what))
                .await
                .unwrap();
        }
        drop(agent);
        assert_eq!(acceptor.rejected(), i as u64 + 1, "{what}: not counted");

        // The good sender's connection, open all along, still works.
        let tag = 1000 + i as u32;
        let mut client = pass_tagged(&mut good, tag).await;
        assert_eq!(accept_tagged(&acceptor, 1).await, vec![tag], "after {what}");
        expect_echoed_tag(&mut client, tag).await;
    }
    assert_eq!(acceptor.rejected(), total);
    assert_eq!(acceptor.refused(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_connections_past_the_limit_are_closed() {
    let dir = TempDir::new();
    let acceptor = Acceptor::bind(dir.sock()).unwrap();
    // Fill every slot with a connected sender (each proves it is served).
    let mut senders = Vec::new();
    for i in 0..MAX_AGENT_CONNECTIONS as u32 {
        let mut sender = HandoffSender::new(dir.sock());
        let mut client = pass_tagged(&mut sender, i).await;
        assert_eq!(accept_tagged(&acceptor, 1).await, vec![i]);
        expect_echoed_tag(&mut client, i).await;
        senders.push(sender);
    }
    let extra = StdUnix::connect(dir.sock()).unwrap();
    let extra = tokio::task::spawn_blocking(move || {
        expect_agent_closed(&extra, "one past the limit");
        extra
    })
    .await
    .unwrap();
    drop(extra);
    assert_eq!(acceptor.refused(), 1);
    assert_eq!(acceptor.rejected(), 0);
    // The served ones are unaffected.
    let mut client = pass_tagged(&mut senders[0], 500).await;
    assert_eq!(accept_tagged(&acceptor, 1).await, vec![500]);
    expect_echoed_tag(&mut client, 500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_file_lifecycle() {
    let dir = TempDir::new();
    let path = dir.sock();

    // A stale socket file (its listener is gone) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let acceptor = Acceptor::bind(&path).unwrap();
    let mut sender = HandoffSender::new(&path);
    let mut client = pass_tagged(&mut sender, 1).await;
    assert_eq!(accept_tagged(&acceptor, 1).await, vec![1]);
    expect_echoed_tag(&mut client, 1).await;

    // A live one is not taken over.
    let err = Acceptor::bind(&path).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    let mut client = pass_tagged(&mut sender, 2).await;
    assert_eq!(accept_tagged(&acceptor, 1).await, vec![2]);
    expect_echoed_tag(&mut client, 2).await;

    // Dropping the Acceptor removes its file.
    drop(acceptor);
    assert!(!path.exists());

    // A regular file is never removed.
    std::fs::File::create(&path)
        .unwrap()
        .write_all(b"precious")
        .unwrap();
    let err = Acceptor::bind(&path).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");

    // Nor is a directory.
    let sub = dir.0.join("subdir");
    std::fs::create_dir(&sub).unwrap();
    let err = Acceptor::bind(&sub).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
    assert!(sub.is_dir());
}

#[test]
fn bind_outside_a_runtime_is_an_error_not_a_panic() {
    let dir = TempDir::new();
    let err = Acceptor::bind(dir.sock()).unwrap_err();
    assert!(err.to_string().contains("runtime"), "{err}");
    assert!(!dir.sock().exists());
}

// ---------------------------------------------------------------------------------------
// `shardproxy backend --handoff-socket`
// ---------------------------------------------------------------------------------------

/// A `shardproxy backend` child: SIGKILLed and reaped on drop unless already reaped.
struct Backend(Option<Child>);

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // Not yet reaped, so the PID is still this child's.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start_backend(name: &str, handoff: &Path) -> (Backend, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardproxy"))
        .args(["backend", "--listen", "127.0.0.1:0", "--name", name])
        .arg("--handoff-socket")
        .arg(handoff)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn shardproxy backend");
    let stdout = child.stdout.take().expect("stdout");
    let backend = Backend(Some(child));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        lines.for_each(drop);
    });
    let line = match rx.recv_timeout(GUARD) {
        Ok(Some(Ok(line))) => line,
        other => panic!("backend: no ready line ({other:?})"),
    };
    let rest = line
        .strip_prefix(&format!("backend {name} listening on "))
        .unwrap_or_else(|| panic!("unexpected ready line {line:?}"));
    let (addr, path) = rest
        .split_once(" handoff-socket ")
        .unwrap_or_else(|| panic!("ready line without the hand-off socket: {line:?}"));
    assert_eq!(Path::new(path), handoff);
    (backend, addr.parse().expect("backend address"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_subcommand_greets_a_handed_off_connection() {
    let dir = TempDir::new();
    let path = dir.sock();
    // A stale file from a backend that died is no obstacle.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let (mut backend, addr) = start_backend("handy", &path);

    // A connection handed over the socket: greeting, then the echo of everything, the bytes
    // sent before the hand-off first.
    let (mut client, server) = tcp_pair().await;
    client.write_all(b"sent early;").await.unwrap();
    let mut sender = HandoffSender::new(&path);
    timeout(GUARD, sender.send(server.as_fd()))
        .await
        .unwrap()
        .unwrap();
    drop(server);
    client.write_all(b"sent late").await.unwrap();
    client.shutdown().await.unwrap();
    let mut reply = Vec::new();
    timeout(GUARD, client.read_to_end(&mut reply))
        .await
        .expect("reply in time")
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&reply),
        "handy\nsent early;sent late"
    );

    // Its TCP listener greets the same way.
    let mut direct = TcpStream::connect(addr).await.unwrap();
    direct.shutdown().await.unwrap();
    let mut reply = Vec::new();
    timeout(GUARD, direct.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, b"handy\n");

    // SIGTERM: exits 0 and removes its socket file.
    let mut child = backend.0.take().expect("child");
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
    kill(pid, Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + GUARD;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("backend did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}");
    assert!(!path.exists(), "socket file left behind");
}
