//! `dsr::netlink` against the kernel: sock_diag on loopback sockets in the root namespace,
//! and ctnetlink deletes in a network namespace of the test's own (docs/design.md §6).
//!
//! Both need root here (ctnetlink needs CAP_NET_ADMIN; the namespace and its nftables rule
//! too), so every test is ignored in a plain `cargo test`; run as root with
//! `cargo test --locked --test dsr_root_netlink -- --ignored`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use shardproxy::dsr::netlink::{
    conntrack_delete, conntrack_exists, Conntrack, DiagInfo, SockDiag, TCP_ESTABLISHED,
};

/// How long a bounded poll waits for the kernel to catch up (generous: a loaded 2-core box).
const PATIENCE: Duration = Duration::from_secs(20);

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("expected IPv4, got {a}"),
    }
}

/// `n` loopback connections to a fresh listener: (listener address, client, server) pairs.
fn connections(n: usize) -> (TcpListener, Vec<(TcpStream, TcpStream)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = listener.try_clone().unwrap();
    let accepted = thread::spawn(move || {
        let mut by_peer = HashMap::new();
        for _ in 0..n {
            let (s, peer) = acceptor.accept().unwrap();
            by_peer.insert(peer, s);
        }
        by_peer
    });
    let clients: Vec<TcpStream> = (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut by_peer = accepted.join().unwrap();
    let pairs = clients
        .into_iter()
        .map(|c| {
            let s = by_peer.remove(&c.local_addr().unwrap()).unwrap();
            (c, s)
        })
        .collect();
    (listener, pairs)
}

/// Polls `check` until it returns `Ok`, or panics with its last complaint after
/// [`PATIENCE`].
fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        match check() {
            Ok(()) => return,
            Err(why) if start.elapsed() > PATIENCE => panic!("{what}: {why}"),
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
#[ignore = "needs root: run by netns-tests/run.sh"]
fn sock_diag_reports_live_peers_with_counters() {
    let (listener, mut pairs) = connections(50);
    let local = v4(listener.local_addr().unwrap());
    // Client i sends 100 * (i + 1) bytes, server i answers 37 * (i + 1) bytes; each side
    // reads all of it, so the counters are final once the acks are in.
    let mut want = HashMap::new();
    for (i, (client, server)) in pairs.iter_mut().enumerate() {
        let up = vec![b'u'; 100 * (i + 1)];
        let down = vec![b'd'; 37 * (i + 1)];
        client.write_all(&up).unwrap();
        let mut buf = vec![0; up.len()];
        server.read_exact(&mut buf).unwrap();
        server.write_all(&down).unwrap();
        let mut buf = vec![0; down.len()];
        client.read_exact(&mut buf).unwrap();
        want.insert(
            v4(client.local_addr().unwrap()),
            DiagInfo {
                state: TCP_ESTABLISHED,
                bytes_received: up.len() as u64,
                bytes_acked: down.len() as u64,
            },
        );
    }
    let mut diag = SockDiag::open().unwrap();
    eventually("50 peers with their counters", || {
        let got = diag.sockets_at(local).map_err(|e| e.to_string())?;
        // Exactly the 50 accepted sockets: not the listener, not the client ends.
        (got == want).then_some(()).ok_or(format!("{got:?}"))
    });
    // The exact lookup agrees; a peer that never connected is not there, and neither is
    // the listener the kernel's lookup falls back to.
    let (peer, info) = want.iter().next().unwrap();
    assert_eq!(diag.socket(local, *peer).unwrap(), Some(*info));
    let stranger = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1);
    assert_eq!(diag.socket(local, stranger).unwrap(), None);
    // Another local port has none of them.
    let elsewhere = SocketAddrV4::new(Ipv4Addr::LOCALHOST, local.port().wrapping_add(1));
    assert!(diag
        .sockets_at(elsewhere)
        .unwrap()
        .keys()
        .all(|k| !want.contains_key(k)));

    // The server closes 20, then their clients: those end in TIME_WAIT or vanish.
    let closed: Vec<(TcpStream, TcpStream)> = pairs.drain(..20).collect();
    let gone: HashSet<SocketAddrV4> = closed
        .iter()
        .map(|(c, _)| v4(c.local_addr().unwrap()))
        .collect();
    for (client, server) in closed {
        drop(server);
        let mut rest = Vec::new();
        let mut client = client;
        client.read_to_end(&mut rest).unwrap(); // the server's FIN
        drop(client);
    }
    eventually("the 20 closed peers are gone, the 30 others stay", || {
        let got = diag.sockets_at(local).map_err(|e| e.to_string())?;
        let keys: HashSet<SocketAddrV4> = got.keys().copied().collect();
        let expected: HashSet<SocketAddrV4> =
            want.keys().filter(|k| !gone.contains(k)).copied().collect();
        (keys == expected).then_some(()).ok_or(format!(
            "{} left, {:?}",
            keys.len(),
            keys.intersection(&gone)
        ))
    });
    for peer in &gone {
        assert_eq!(diag.socket(local, *peer).unwrap(), None, "{peer}");
    }
    drop(pairs);
}

#[test]
#[ignore = "needs root: run by netns-tests/run.sh"]
fn sock_diag_handles_thousands_of_sockets_in_one_call() {
    const N: usize = 3000;
    let (listener, pairs) = connections(N);
    let local = v4(listener.local_addr().unwrap());
    let want: HashSet<SocketAddrV4> = pairs
        .iter()
        .map(|(c, _)| v4(c.local_addr().unwrap()))
        .collect();
    let mut diag = SockDiag::open().unwrap();
    // Several rounds on one socket: each dump spans dozens of datagrams.
    for round in 0..3 {
        let got = diag.sockets_at(local).unwrap();
        assert_eq!(got.len(), N, "round {round}");
        assert_eq!(got.keys().copied().collect::<HashSet<_>>(), want);
        assert!(got.values().all(|i| i.state == TCP_ESTABLISHED));
    }
    drop(pairs);
}

/// A network namespace of the test's own, deleted on drop (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "spnl{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        // Any conntrack-using rule enables connection tracking in the namespace.
        ns.exec(&["nft", "add", "table", "inet", "t"]);
        ns.exec(&[
            "nft",
            "add",
            "chain",
            "inet",
            "t",
            "c",
            "{ type filter hook input priority 0; }",
        ]);
        ns.exec(&[
            "nft",
            "add",
            "rule",
            "inet",
            "t",
            "c",
            "ct",
            "state",
            "established",
            "accept",
        ]);
        ns
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Runs `f` on a thread that has entered the namespace (sockets and netlink calls made
    /// there belong to it); a panic in `f` is passed on.
    fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(format!("/run/netns/{}", self.name)).unwrap();
        thread::scope(|s| {
            s.spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A connection on the namespace's lo with some bytes each way, so conntrack has an
/// ESTABLISHED entry (client → server).
fn tracked_connection(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(b"ping").unwrap();
    let mut buf = [0; 4];
    server.read_exact(&mut buf).unwrap();
    server.write_all(b"pong").unwrap();
    client.read_exact(&mut buf).unwrap();
    (client, server)
}

#[test]
#[ignore = "needs root: run by netns-tests/run.sh"]
fn conntrack_entry_is_deleted_once() {
    let ns = Netns::new();
    ns.run_inside(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (client, server) = tracked_connection(&listener);
        let c = v4(client.local_addr().unwrap());
        let s = v4(client.peer_addr().unwrap());
        assert!(conntrack_exists(c, s).unwrap(), "entry for {c} -> {s}");
        assert!(conntrack_delete(c, s).unwrap(), "first delete");
        assert!(!conntrack_exists(c, s).unwrap(), "gone after the delete");
        assert!(!conntrack_delete(c, s).unwrap(), "second delete finds none");
        drop((client, server));
    });
}

#[test]
#[ignore = "needs root: run by netns-tests/run.sh"]
fn conntrack_deletes_a_batch_with_one_result_each() {
    let ns = Netns::new();
    ns.run_inside(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let conns: Vec<_> = (0..100).map(|_| tracked_connection(&listener)).collect();
        let mut flows: Vec<(SocketAddrV4, SocketAddrV4)> = conns
            .iter()
            .map(|(c, _)| (v4(c.local_addr().unwrap()), v4(c.peer_addr().unwrap())))
            .collect();
        // One that never existed, in the middle of the batch.
        let server = flows[0].1;
        flows.insert(
            50,
            (SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 9), 9), server),
        );
        let mut ct = Conntrack::open().unwrap();
        let results = ct.delete_many(&flows).unwrap();
        assert_eq!(results.len(), 101);
        for (i, r) in results.iter().enumerate() {
            let deleted = *r.as_ref().unwrap_or_else(|e| panic!("flow {i}: {e}"));
            assert_eq!(deleted, i != 50, "flow {i}");
        }
        for (i, &(c, s)) in flows.iter().enumerate() {
            assert!(!ct.exists(c, s).unwrap(), "flow {i} still tracked");
        }
        // Deleting again finds none.
        let again = ct.delete_many(&flows).unwrap();
        assert!(again.iter().all(|r| matches!(r, Ok(false))));
        drop(conns);
    });
}
