//! The proxy's link to a DSR agent (`dsr::link`) against a scripted agent on loopback: the
//! handshake proves the secret before any state travels, answers reach the right hand-off,
//! a late `Imported` is called off with `Abort`, and a dead or false agent fails fast.

use std::net::SocketAddr;
use std::time::Duration;

use shardproxy::dsr::control::{read_message, write_message, Auth, Limits, Message, Role, Secret};
use shardproxy::dsr::link::{AgentLink, ClosedReport, LinkError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const SECRET: &[u8] = b"link-test-secret-0123456789";

fn auth(secret: &[u8], role: Role) -> Auth {
    Auth::new(
        &Secret::from_bytes(secret.to_vec()).unwrap(),
        role,
        Limits::default(),
    )
}

fn handoff(id: u64) -> Message {
    Message::Handoff {
        id,
        backend: "b1".into(),
        state: vec![1, 2, 3],
        strip_header: false,
    }
}

fn start_link(
    agent: SocketAddr,
) -> (
    std::sync::Arc<AgentLink>,
    mpsc::UnboundedReceiver<ClosedReport>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let link = AgentLink::start(
        agent,
        auth(SECRET, Role::Proxy),
        Duration::from_secs(2),
        tx,
        CancellationToken::new(),
    );
    (link, rx)
}

/// Accepts one control connection and answers the handshake as an agent with `secret`.
async fn accept_agent(l: &TcpListener, secret: &[u8]) -> (TcpStream, Auth) {
    let (mut s, _) = l.accept().await.unwrap();
    let a = auth(secret, Role::Agent);
    // The proxy's Ping; with the wrong secret it does not verify: close, as an agent does.
    match read_message(&mut s, &a).await {
        Ok(Message::Ping) => write_message(&mut s, &a, &Message::Pong).await.unwrap(),
        other => {
            drop(s);
            panic!("handshake frame did not verify: {other:?}");
        }
    }
    (s, a)
}

async fn recv(s: &mut TcpStream, a: &Auth) -> Message {
    loop {
        match timeout(Duration::from_secs(5), read_message(s, a))
            .await
            .unwrap()
            .unwrap()
        {
            Message::Ping => continue, // heartbeats
            m => return m,
        }
    }
}

#[tokio::test]
async fn answers_reach_their_handoffs_and_closes_are_reported() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (link, mut closed) = start_link(l.local_addr().unwrap());
    let agent = tokio::spawn(async move {
        let (mut s, a) = accept_agent(&l, SECRET).await;
        // Two hand-offs in flight at once; answered in the other order.
        let first = recv(&mut s, &a).await;
        let second = recv(&mut s, &a).await;
        assert!(matches!(first, Message::Handoff { id: 1, .. }), "{first:?}");
        assert!(
            matches!(second, Message::Handoff { id: 2, .. }),
            "{second:?}"
        );
        write_message(
            &mut s,
            &a,
            &Message::Failed {
                id: 2,
                errno: 99,
                reason: "app down".into(),
            },
        )
        .await
        .unwrap();
        write_message(&mut s, &a, &Message::Imported { id: 1 })
            .await
            .unwrap();
        assert_eq!(recv(&mut s, &a).await, Message::Steered { id: 1 });
        write_message(
            &mut s,
            &a,
            &Message::Closed {
                id: 1,
                bytes_from_client: 10,
                bytes_to_client: 20,
            },
        )
        .await
        .unwrap();
        s
    });
    link.ready().await.unwrap();
    assert!(link.is_up());
    let (a, b) = tokio::join!(link.handoff(handoff(1)), link.handoff(handoff(2)));
    assert_eq!(a, Ok(()));
    assert_eq!(
        b,
        Err(LinkError::Refused {
            errno: 99,
            reason: "app down".into()
        })
    );
    assert_eq!(b.unwrap_err().reason(), "agent_refused");
    link.notify(Message::Steered { id: 1 }).await.unwrap();
    let report = timeout(Duration::from_secs(5), closed.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (report.id, report.bytes_from_client, report.bytes_to_client),
        (1, 10, 20)
    );
    let _keep = agent.await.unwrap();
}

#[tokio::test]
async fn a_late_imported_is_called_off_with_abort() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (link, _closed) = start_link(l.local_addr().unwrap());
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(async move {
        let (mut s, a) = accept_agent(&l, SECRET).await;
        assert!(matches!(
            recv(&mut s, &a).await,
            Message::Handoff { id: 5, .. }
        ));
        // Answer only after the proxy gave up on it.
        go_rx.await.unwrap();
        write_message(&mut s, &a, &Message::Imported { id: 5 })
            .await
            .unwrap();
        recv(&mut s, &a).await
    });
    link.ready().await.unwrap();
    let gave_up = timeout(Duration::from_millis(200), link.handoff(handoff(5))).await;
    assert!(gave_up.is_err(), "the scripted agent answered early");
    go_tx.send(()).unwrap();
    assert_eq!(agent.await.unwrap(), Message::Abort { id: 5 });
}

#[tokio::test]
async fn a_wrong_secret_fails_authentication_then_fails_fast() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (link, _closed) = start_link(l.local_addr().unwrap());
    let agent = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        // An agent with another secret: the proxy's Ping fails its check, it closes.
        let a = auth(b"another-secret-0123456789", Role::Agent);
        assert!(read_message(&mut s, &a).await.is_err());
        drop(s);
        // No second connection within the retry pause.
        timeout(Duration::from_millis(500), l.accept())
            .await
            .is_err()
    });
    let e = link.ready().await.unwrap_err();
    assert_eq!(e.reason(), "agent_auth", "{e}");
    // In the retry pause: the same answer at once, without a new connection.
    let started = std::time::Instant::now();
    let again = link.handoff(handoff(1)).await.unwrap_err();
    assert_eq!(again.reason(), "agent_auth");
    assert!(link.ready().await.is_err());
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert!(
        agent.await.unwrap(),
        "the link reconnected during its retry pause"
    );
}

#[tokio::test]
async fn a_dead_agent_is_unreachable_and_a_lost_one_fails_its_handoffs() {
    // Nothing listens on a port we just closed.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let (link, _closed) = start_link(dead);
    assert_eq!(
        link.ready().await.unwrap_err().reason(),
        "agent_unreachable"
    );

    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (link, _closed) = start_link(l.local_addr().unwrap());
    let agent = tokio::spawn(async move {
        let (mut s, a) = accept_agent(&l, SECRET).await;
        assert!(matches!(
            recv(&mut s, &a).await,
            Message::Handoff { id: 9, .. }
        ));
        // The agent dies mid hand-off.
        drop(s);
    });
    link.ready().await.unwrap();
    let e = link.handoff(handoff(9)).await.unwrap_err();
    assert_eq!(e.reason(), "agent_lost", "{e}");
    agent.await.unwrap();
    // The link is down now.
    timeout(Duration::from_secs(2), async {
        while link.is_up() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_query_returns_the_agents_answer_and_needs_the_link_up() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (link, _closed) = start_link(l.local_addr().unwrap());
    let c1: std::net::SocketAddrV4 = "10.0.0.1:40001".parse().unwrap();
    let c2: std::net::SocketAddrV4 = "10.0.0.2:40002".parse().unwrap();
    assert!(
        link.query(7000, vec![(1, c1)]).await.is_err(),
        "asked while down"
    );
    let agent = tokio::spawn(async move {
        let (mut s, a) = accept_agent(&l, SECRET).await;
        let q = recv(&mut s, &a).await;
        assert_eq!(
            q,
            Message::Query {
                port: 7000,
                flows: vec![(1, c1), (2, c2)]
            }
        );
        write_message(&mut s, &a, &Message::Alive { ids: vec![2] })
            .await
            .unwrap();
        s
    });
    link.ready().await.unwrap();
    let alive = link.query(7000, vec![(1, c1), (2, c2)]).await.unwrap();
    assert_eq!(alive, vec![2]);
    let _keep = agent.await.unwrap();
}
