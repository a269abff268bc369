//! `shardproxy agent` on loopback, driven by the test as the proxy would drive it: a real
//! connection is frozen and dumped (`TCP_REPAIR`), its state sent over the control channel,
//! and the agent must rebuild it only from an authentic, fresh frame (docs/design.md §6).
//!
//! Needs CAP_NET_ADMIN (TCP_REPAIR), so every test is ignored in a plain `cargo test`; run
//! as root with `cargo test --locked --test dsr_root_agent -- --ignored` (the netns suite does).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::metric;
use shardproxy::dsr::agent::{self, AgentConfig, AgentHandle, Target};
use shardproxy::dsr::control::{
    now_ms, read_message, write_message, Auth, Limits, Message, Role, Secret,
};
use shardproxy::dsr::repair::freeze_and_dump;
use shardproxy::fixtures::echo::EchoBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const SECRET: &[u8] = b"0123456789abcdef-agent-test-secret";

/// A directory of this test's own, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sp-agent-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn secret_file(dir: &TempDir, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.0.join("secret");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn proxy_auth(secret: &[u8]) -> Auth {
    Auth::new(
        &Secret::from_bytes(secret.to_vec()).unwrap(),
        Role::Proxy,
        Limits::default(),
    )
}

/// An echo application and an agent (VIP `vip`) relaying to it.
async fn start_agent_for(dir: &TempDir, vip: Ipv4Addr) -> (EchoBackend, AgentHandle) {
    let app = EchoBackend::start("127.0.0.1:0".parse().unwrap(), "b1")
        .await
        .unwrap();
    let mut cfg = AgentConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        vip,
        secret_file(dir, SECRET),
        Target::Forward(app.local_addr()),
    );
    cfg.steer_timeout = Duration::from_secs(2);
    (app, agent::start(cfg).await.unwrap())
}

/// The agent's next message, within 5 s.
async fn next_answer(control: &mut TcpStream, auth: &Auth) -> Message {
    timeout(Duration::from_secs(5), read_message(control, auth))
        .await
        .expect("the agent answers within 5 s")
        .expect("an authentic frame")
}

/// A loopback connection whose server side is frozen and dumped, then closed in repair mode
/// (silently): the client still believes it is connected. Returns the client and the state.
async fn frozen_connection(first_bytes: &[u8]) -> (TcpStream, Vec<u8>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    client.write_all(first_bytes).await.unwrap();
    // Let the bytes land in the server's receive queue.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let state = freeze_and_dump(&server).expect("TCP_REPAIR dump (needs root)");
    assert_eq!(state.recv_queue, first_bytes, "set-up: queued bytes dumped");
    drop(server); // repair mode: neither FIN nor RST; the 4-tuple is free for the rebuild
    drop(listener); // the rebuilt socket binds the listener's port with repair's reuse
    (client, state.encode().unwrap())
}

fn handoff(id: u64, state: Vec<u8>) -> Message {
    Message::Handoff {
        id,
        backend: "b1".into(),
        state,
        strip_header: false,
    }
}

/// Whether the agent closed the control connection (EOF or reset) within 5 s.
async fn closed_by_agent(conn: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
#[ignore = "needs root: run by netns-tests/run.sh"]
async fn an_authentic_handoff_is_rebuilt_and_relayed_after_steered() {
    let dir = TempDir::new();
    let (_app, agent) = start_agent_for(&dir, Ipv4Addr::LOCALHOST).await;
    let (mut client, state) = frozen_connection(b"\x00\x02k1hello").await;

    let auth = proxy_auth(SECRET);
    let mut control = TcpStream::connect(agent.control_addr()).await.unwrap();
    write_message(&mut control, &auth, &handoff(7, state))
        .await
        .unwrap();
    let answer = next_answer(&mut control, &auth).await;
    assert_eq!(answer, Message::Imported { id: 7 });
    write_message(&mut control, &auth, &Message::Steered { id: 7 })
        .await
        .unwrap();

    // Asked which flows it holds, the agent names this one and not an unknown one.
    let client_addr = match client.local_addr().unwrap() {
        SocketAddr::V4(a) => a,
        other => panic!("{other}"),
    };
    let vip_port = client.peer_addr().unwrap().port();
    let other: std::net::SocketAddrV4 = "127.0.0.1:1".parse().unwrap();
    let query = Message::Query {
        port: vip_port,
        flows: vec![(7, client_addr), (8, other)],
    };
    write_message(&mut control, &auth, &query).await.unwrap();
    let alive = next_answer(&mut control, &auth).await;
    assert_eq!(alive, Message::Alive { ids: vec![7] });

    // The application greets, then echoes what the client had sent before the hand-off and
    // what it sends now, on the same connection.
    client.write_all(b" world").await.unwrap();
    let mut got = vec![0u8; "b1\n".len() + 15];
    timeout(Duration::from_secs(5), client.read_exact(&mut got))
        .await
        .expect("echo through the rebuilt connection")
        .unwrap();
    assert_eq!(&got, b"b1\n\x00\x02k1hello world");
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    // The agent reports the close with the bytes moved.
    let closed = next_answer(&mut control, &auth).await;
    assert_eq!(
        closed,
        Message::Closed {
            id: 7,
            bytes_from_client: 15,
            bytes_to_client: 18
        }
    );
    let text = agent.metrics().render();
    assert_eq!(
        metric(
            &text,
            "shardproxy_agent_handoffs_total{result=\"delivered\"}"
        ),
        1.0
    );
    // Closed now: no longer held (the kernel may keep it in TIME_WAIT, which does not count).
    write_message(&mut control, &auth, &query).await.unwrap();
    let alive = next_answer(&mut control, &auth).await;
    assert_eq!(alive, Message::Alive { ids: vec![] });
}

#[tokio::test]
#[ignore = "needs root: run by netns-tests/run.sh"]
async fn forged_and_replayed_handoffs_rebuild_nothing() {
    let dir = TempDir::new();
    let (_app, agent) = start_agent_for(&dir, Ipv4Addr::LOCALHOST).await;
    let (_client, state) = frozen_connection(b"\x00\x02k2").await;

    // Forged: sealed with another secret. The agent closes the connection, rebuilds nothing.
    let forger = proxy_auth(b"not-the-secret-but-long-enough");
    let mut control = TcpStream::connect(agent.control_addr()).await.unwrap();
    write_message(&mut control, &forger, &handoff(1, state.clone()))
        .await
        .unwrap();
    assert!(
        closed_by_agent(&mut control).await,
        "forged frame: connection kept"
    );

    // Replayed: an authentic frame sent twice. The first is imported; the copy closes the
    // connection without a second rebuild.
    let auth = proxy_auth(SECRET);
    let frame = auth.seal(&handoff(2, state), now_ms()).unwrap();
    let mut control = TcpStream::connect(agent.control_addr()).await.unwrap();
    control.write_all(&frame).await.unwrap();
    let answer = next_answer(&mut control, &auth).await;
    assert_eq!(answer, Message::Imported { id: 2 });
    control.write_all(&frame).await.unwrap();
    assert!(
        closed_by_agent(&mut control).await,
        "replayed frame: connection kept"
    );

    // A replay on a fresh connection is refused too (the cache is the agent's, not the
    // connection's).
    let mut control = TcpStream::connect(agent.control_addr()).await.unwrap();
    control.write_all(&frame).await.unwrap();
    assert!(
        closed_by_agent(&mut control).await,
        "replay on a new connection: kept"
    );

    let text = agent.metrics().render();
    let m = |s: &str| metric(&text, s);
    assert_eq!(
        m("shardproxy_agent_control_errors_total{reason=\"bad_mac\"}"),
        1.0
    );
    assert_eq!(
        m("shardproxy_agent_control_errors_total{reason=\"replay\"}"),
        2.0
    );
    assert_eq!(
        m("shardproxy_agent_handoffs_total{result=\"imported\"}"),
        1.0
    );
    assert_eq!(m("shardproxy_agent_handoffs_total{result=\"failed\"}"), 0.0);
    // The one rebuilt socket was never steered: its connection closed, so it was dropped
    // without a word to the client.
    assert_eq!(
        m("shardproxy_agent_handoffs_total{result=\"aborted\"}"),
        1.0
    );
}

#[tokio::test]
#[ignore = "needs root: run by netns-tests/run.sh"]
async fn a_state_for_another_vip_is_refused() {
    let dir = TempDir::new();
    let (_app, agent) = start_agent_for(&dir, Ipv4Addr::new(127, 0, 0, 9)).await;
    let (_client, state) = frozen_connection(b"\x00\x02k3").await;
    let auth = proxy_auth(SECRET);
    let mut control = TcpStream::connect(agent.control_addr()).await.unwrap();
    write_message(&mut control, &auth, &handoff(3, state))
        .await
        .unwrap();
    let answer = next_answer(&mut control, &auth).await;
    let Message::Failed { id: 3, reason, .. } = answer else {
        panic!("expected Failed, got {answer:?}")
    };
    assert!(reason.contains("VIP 127.0.0.9"), "{reason}");
    assert_eq!(
        metric(
            &agent.metrics().render(),
            "shardproxy_agent_handoffs_total{result=\"imported\"}"
        ),
        0.0
    );
}

#[tokio::test]
#[ignore = "needs root: run by netns-tests/run.sh"]
async fn a_handoff_orphaned_by_its_control_connection_sends_the_client_nothing() {
    let dir = TempDir::new();
    let (_app, agent) = start_agent_for(&dir, Ipv4Addr::LOCALHOST).await;
    // A few MB unread at the server, so the rebuild (refilling them) outlasts the control
    // connection's close.
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // A big receive buffer (inherited by the accepted socket): the bytes stay queued.
    nix::sys::socket::setsockopt(
        &std_listener,
        nix::sys::socket::sockopt::RcvBufForce,
        &(8 << 20),
    )
    .unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(std_listener).unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    let bulk = vec![7u8; 4 << 20];
    let _ = timeout(Duration::from_millis(500), client.write_all(&bulk)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let state = freeze_and_dump(&server).expect("TCP_REPAIR dump (needs root)");
    assert!(
        state.recv_queue.len() > 1 << 20,
        "set-up: only {} bytes queued",
        state.recv_queue.len()
    );
    drop(server);
    drop(listener);

    let auth = proxy_auth(SECRET);
    let mut control = TcpStream::connect(agent.control_addr()).await.unwrap();
    write_message(&mut control, &auth, &handoff(11, state.encode().unwrap()))
        .await
        .unwrap();
    drop(control); // the proxy is gone before the agent could answer

    // Whatever the timing, the client hears nothing: no FIN, no reset.
    let mut buf = [0u8; 16];
    match timeout(Duration::from_secs(2), client.read(&mut buf)).await {
        Err(_) => {}
        Ok(r) => panic!("the client heard from the discarded copy: {r:?}"),
    }
    let text = agent.metrics().render();
    assert_eq!(
        metric(
            &text,
            "shardproxy_agent_handoffs_total{result=\"delivered\"}"
        ),
        0.0
    );
}
