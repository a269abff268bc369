//! Tests of the control channel: round trips over `tokio::io::duplex`, and every way a frame
//! is refused. No root, no network.

use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::timeout;

use super::*;

const SECRET: &[u8] = b"0123456789abcdef-test-secret";
/// Generous bound so a stuck read fails the test instead of hanging it.
const LONG: Duration = Duration::from_secs(20);

fn secret(bytes: &[u8]) -> Secret {
    Secret::from_bytes(bytes.to_vec()).unwrap()
}

fn auth(role: Role) -> Auth {
    Auth::new(&secret(SECRET), role, Limits::default())
}

/// A proxy end and an agent end joined by an in-memory pipe.
fn pair() -> (ControlConn<DuplexStream>, ControlConn<DuplexStream>) {
    let (a, b) = duplex(1 << 20);
    (
        ControlConn::new(a, auth(Role::Proxy)),
        ControlConn::new(b, auth(Role::Agent)),
    )
}

fn all_messages() -> Vec<Message> {
    vec![
        Message::Ping,
        Message::Pong,
        Message::Handoff {
            id: u64::MAX,
            backend: "node-β".into(),
            state: (0..=255u8).cycle().take(70_000).collect(),
            strip_header: true,
        },
        Message::Handoff {
            id: 0,
            backend: String::new(),
            state: Vec::new(),
            strip_header: false,
        },
        Message::Imported { id: 7 },
        Message::Failed {
            id: 8,
            errno: -110,
            reason: "setsockopt TCP_REPAIR_QUEUE: operation not permitted".into(),
        },
        Message::Steered { id: 9 },
        Message::Abort { id: 10 },
        Message::Query {
            port: 7000,
            flows: vec![(3, "10.0.0.1:40000".parse().unwrap())],
        },
        Message::Alive {
            ids: vec![1, u64::MAX],
        },
        Message::Closed {
            id: 10,
            bytes_from_client: 1 << 40,
            bytes_to_client: 3,
        },
    ]
}

/// Receives with a bound, so a test that would hang fails instead.
async fn recv(conn: &mut ControlConn<DuplexStream>) -> Result<Message, ControlError> {
    timeout(LONG, conn.recv())
        .await
        .expect("recv did not finish")
}

#[tokio::test]
async fn every_message_round_trips_both_ways() {
    let (mut proxy, mut agent) = pair();
    for msg in all_messages() {
        proxy.send(&msg).await.unwrap();
        assert_eq!(recv(&mut agent).await.unwrap(), msg);
        agent.send(&msg).await.unwrap();
        assert_eq!(recv(&mut proxy).await.unwrap(), msg);
    }
    drop(proxy);
    assert!(matches!(recv(&mut agent).await, Err(ControlError::Closed)));
}

#[tokio::test]
async fn a_state_near_the_bound_round_trips_and_one_over_is_refused_on_send() {
    let limits = Limits {
        max_frame: 256 * 1024,
        ..Limits::default()
    };
    let (a, b) = duplex(64 * 1024);
    let mut proxy = ControlConn::new(a, Auth::new(&secret(SECRET), Role::Proxy, limits.clone()));
    let mut agent = ControlConn::new(b, Auth::new(&secret(SECRET), Role::Agent, limits));
    let overhead = HEADER_LEN + TAG_LEN + 8 + 1 + 2 + 1 + 4;
    let fits = Message::Handoff {
        id: 1,
        backend: "b".into(),
        state: vec![0xa5; 256 * 1024 - overhead],
        strip_header: false,
    };
    // The pipe is smaller than the frame: send and receive must run together.
    let (sent, got) = tokio::join!(proxy.send(&fits), recv(&mut agent));
    sent.unwrap();
    assert_eq!(got.unwrap(), fits);

    let over = Message::Handoff {
        id: 2,
        backend: "bb".into(),
        state: vec![0; 256 * 1024 - overhead],
        strip_header: false,
    };
    let err = proxy.send(&over).await.unwrap_err();
    assert!(
        matches!(err, ControlError::TooLarge { len, max } if len == 256 * 1024 + 1 && max == 256 * 1024),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_wrong_secret_is_bad_mac_and_decodes_nothing() {
    let (a, b) = duplex(1 << 16);
    let mut proxy = ControlConn::new(
        a,
        Auth::new(
            &secret(b"another secret, 16+ bytes"),
            Role::Proxy,
            Limits::default(),
        ),
    );
    let mut agent = ControlConn::new(b, auth(Role::Agent));
    proxy.send(&Message::Steered { id: 1 }).await.unwrap();
    let err = recv(&mut agent).await.unwrap_err();
    assert!(matches!(err, ControlError::BadMac), "{err:?}");
    assert_eq!(err.reason(), "bad_mac");
}

#[tokio::test]
async fn a_replayed_frame_is_refused_on_the_same_and_on_another_connection() {
    let proxy = auth(Role::Proxy);
    let agent = auth(Role::Agent);
    let frame = proxy
        .seal(
            &Message::Handoff {
                id: 5,
                backend: "b1".into(),
                state: vec![1, 2, 3],
                strip_header: true,
            },
            now_ms(),
        )
        .unwrap();

    let (mut tx, rx) = duplex(1 << 16);
    let mut conn = ControlConn::new(rx, agent.clone());
    tx.write_all(&frame).await.unwrap();
    tx.write_all(&frame).await.unwrap();
    assert!(matches!(
        recv(&mut conn).await,
        Ok(Message::Handoff { id: 5, .. })
    ));
    let err = recv(&mut conn).await.unwrap_err();
    assert!(matches!(err, ControlError::Replay), "{err:?}");

    // A new connection to the same agent (a clone of its Auth) remembers it too.
    let (mut tx2, rx2) = duplex(1 << 16);
    let mut conn2 = ControlConn::new(rx2, agent);
    tx2.write_all(&frame).await.unwrap();
    let err = recv(&mut conn2).await.unwrap_err();
    assert!(matches!(err, ControlError::Replay), "{err:?}");
}

#[tokio::test]
async fn frames_outside_the_window_are_stale_either_way() {
    let proxy = auth(Role::Proxy);
    let agent = auth(Role::Agent);
    for (skew, expect_stale) in [
        (-31_000i64, true),
        (31_000, true),
        (-25_000, false),
        (25_000, false),
    ] {
        let at = now_ms().checked_add_signed(skew).unwrap();
        let frame = proxy.seal(&Message::Ping, at).unwrap();
        let (mut tx, rx) = duplex(1 << 16);
        let mut conn = ControlConn::new(rx, agent.clone());
        tx.write_all(&frame).await.unwrap();
        let got = recv(&mut conn).await;
        if expect_stale {
            assert!(
                matches!(got, Err(ControlError::Stale { skew_ms }) if (skew_ms > 0) == (skew > 0)),
                "skew {skew}: {got:?}"
            );
        } else {
            assert_eq!(got.unwrap(), Message::Ping, "skew {skew}");
        }
    }
}

#[test]
fn a_flipped_byte_anywhere_is_refused() {
    let proxy = auth(Role::Proxy);
    let msg = Message::Handoff {
        id: 42,
        backend: "node-1".into(),
        state: vec![9; 40],
        strip_header: true,
    };
    let frame = proxy.seal(&msg, now_ms()).unwrap();
    for i in 0..frame.len() {
        for bit in [0x01u8, 0x80] {
            // A fresh agent each time, so no flip is refused merely as a replay.
            let agent = auth(Role::Agent);
            let mut bad = frame.clone();
            bad[i] ^= bit;
            let err = agent.open(&bad, now_ms()).unwrap_err();
            if i < LEN_PREFIX {
                // The length no longer matches the bytes: refused before the tag is checked.
                assert!(
                    matches!(
                        err,
                        ControlError::Malformed(_) | ControlError::TooLarge { .. }
                    ),
                    "byte {i}: {err:?}"
                );
            } else {
                assert!(matches!(err, ControlError::BadMac), "byte {i}: {err:?}");
            }
        }
    }
    // The original still opens: the flips, not the harness, caused the refusals.
    assert_eq!(auth(Role::Agent).open(&frame, now_ms()).unwrap(), msg);
}

#[tokio::test]
async fn a_flipped_length_byte_over_a_stream_is_refused() {
    let proxy = auth(Role::Proxy);
    let frame = proxy.seal(&Message::Imported { id: 3 }, now_ms()).unwrap();
    for i in 0..LEN_PREFIX {
        let mut bad = frame.clone();
        bad[i] ^= 0x01;
        let (mut tx, rx) = duplex(1 << 16);
        let mut conn = ControlConn::new(rx, auth(Role::Agent));
        tx.write_all(&bad).await.unwrap();
        drop(tx);
        let err = recv(&mut conn).await.unwrap_err();
        // Longer: the stream ends mid-frame, or over the bound; shorter: the tag is misplaced.
        assert!(
            matches!(
                err,
                ControlError::Io(_) | ControlError::TooLarge { .. } | ControlError::BadMac
            ),
            "byte {i}: {err:?}"
        );
    }
}

#[tokio::test]
async fn a_length_over_the_bound_is_refused_before_the_body_arrives() {
    // The largest announceable length with the default bound, and a length just over a small
    // bound. No body follows and the writer stays open: had recv waited for (or allocated)
    // the body, it would not return.
    for (max_frame, announced) in [(DEFAULT_MAX_FRAME, u32::MAX), (1024, 1025)] {
        let limits = Limits {
            max_frame,
            ..Limits::default()
        };
        let (mut tx, rx) = duplex(1 << 16);
        let mut conn = ControlConn::new(rx, Auth::new(&secret(SECRET), Role::Agent, limits));
        tx.write_all(&announced.to_be_bytes()).await.unwrap();
        let err = recv(&mut conn).await.unwrap_err();
        assert!(
            matches!(err, ControlError::TooLarge { len, max } if len == u64::from(announced) && max == max_frame),
            "{err:?}"
        );
        assert_eq!(err.reason(), "too_large");
        drop(tx);
    }
}

#[tokio::test]
async fn a_truncated_stream_is_an_error_never_a_message() {
    let proxy = auth(Role::Proxy);
    let frame = proxy
        .seal(
            &Message::Closed {
                id: 1,
                bytes_from_client: 2,
                bytes_to_client: 3,
            },
            now_ms(),
        )
        .unwrap();
    for cut in 1..frame.len() {
        let (mut tx, rx) = duplex(1 << 16);
        let mut conn = ControlConn::new(rx, auth(Role::Agent));
        tx.write_all(&frame[..cut]).await.unwrap();
        drop(tx);
        let err = recv(&mut conn).await.unwrap_err();
        assert!(
            matches!(&err, ControlError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof),
            "cut at {cut}: {err:?}"
        );
    }
    // A length too short to hold header and tag is malformed without reading on.
    let (mut tx, rx) = duplex(1 << 16);
    let mut conn = ControlConn::new(rx, auth(Role::Agent));
    tx.write_all(&((HEADER_LEN + TAG_LEN - 1) as u32).to_be_bytes())
        .await
        .unwrap();
    assert!(matches!(
        recv(&mut conn).await,
        Err(ControlError::Malformed(_))
    ));
}

#[tokio::test]
async fn a_frame_reflected_to_its_sender_is_refused() {
    let (a, mut wire) = duplex(1 << 16);
    let mut proxy = ControlConn::new(a, auth(Role::Proxy));
    let (mut c, d) = duplex(1 << 16);
    let mut agent = ControlConn::new(d, auth(Role::Agent));
    // The proxy's own frame, as a sniffer on the wire sees it, sent straight back to it.
    proxy.send(&Message::Steered { id: 4 }).await.unwrap();
    let mut frame = vec![0u8; 4096];
    let n = wire.read(&mut frame).await.unwrap();
    frame.truncate(n);
    wire.write_all(&frame).await.unwrap();
    let err = recv(&mut proxy).await.unwrap_err();
    assert!(matches!(err, ControlError::BadMac), "{err:?}");
    // The same bytes are good for the agent, its intended reader.
    c.write_all(&frame).await.unwrap();
    assert_eq!(recv(&mut agent).await.unwrap(), Message::Steered { id: 4 });
}

#[test]
fn authenticated_but_inconsistent_frames_are_refused() {
    let proxy = auth(Role::Proxy);
    let base = proxy.seal(&Message::Imported { id: 1 }, now_ms()).unwrap();

    // Trailing byte in the body.
    let mut trailing = base.clone();
    trailing.insert(base.len() - TAG_LEN, 0);
    proxy.reseal(&mut trailing);
    let err = auth(Role::Agent).open(&trailing, now_ms()).unwrap_err();
    assert!(matches!(err, ControlError::Malformed(_)), "{err:?}");

    // Unknown kind.
    let mut kind = base.clone();
    kind[LEN_PREFIX + 1] = 99;
    proxy.reseal(&mut kind);
    let err = auth(Role::Agent).open(&kind, now_ms()).unwrap_err();
    assert!(matches!(err, ControlError::Malformed(_)), "{err:?}");

    // Another version.
    let mut version = base.clone();
    version[LEN_PREFIX] = 2;
    proxy.reseal(&mut version);
    let err = auth(Role::Agent).open(&version, now_ms()).unwrap_err();
    assert!(
        matches!(err, ControlError::UnsupportedVersion(2)),
        "{err:?}"
    );

    // The untouched frame, resealed, still opens (the helper is faithful).
    let mut same = base.clone();
    proxy.reseal(&mut same);
    assert_eq!(same, base);
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        Just(Message::Ping),
        Just(Message::Pong),
        (
            any::<u64>(),
            ".{0,20}",
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<bool>()
        )
            .prop_map(|(id, backend, state, strip_header)| Message::Handoff {
                id,
                backend,
                state,
                strip_header
            }),
        any::<u64>().prop_map(|id| Message::Imported { id }),
        (any::<u64>(), any::<i32>(), ".{0,40}").prop_map(|(id, errno, reason)| Message::Failed {
            id,
            errno,
            reason
        }),
        any::<u64>().prop_map(|id| Message::Steered { id }),
        any::<u64>().prop_map(|id| Message::Abort { id }),
        (
            any::<u16>(),
            proptest::collection::vec((any::<u64>(), any::<u32>(), any::<u16>()), 0..20)
        )
            .prop_map(|(port, f)| Message::Query {
                port,
                flows: f
                    .into_iter()
                    .map(|(id, ip, p)| (id, std::net::SocketAddrV4::new(ip.into(), p)))
                    .collect()
            }),
        proptest::collection::vec(any::<u64>(), 0..20).prop_map(|ids| Message::Alive { ids }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(id, a, b)| Message::Closed {
            id,
            bytes_from_client: a,
            bytes_to_client: b
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random bytes, raw or with a correct length prefix (so they reach the tag check), never
    /// panic and never open.
    #[test]
    fn random_bytes_never_open(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        fix_len in any::<bool>(),
    ) {
        let agent = auth(Role::Agent);
        let mut frame = bytes;
        if fix_len && frame.len() >= LEN_PREFIX {
            let len = (frame.len() - LEN_PREFIX) as u32;
            frame[..LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
        }
        prop_assert!(agent.open(&frame, now_ms()).is_err());
    }

    /// Any message encodes and decodes to itself; any change to its frame is refused.
    #[test]
    fn sealed_messages_open_and_any_edit_is_refused(
        msg in arb_message(),
        at in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let proxy = auth(Role::Proxy);
        let frame = proxy.seal(&msg, now_ms()).unwrap();
        let mut bad = frame.clone();
        let i = at.index(bad.len());
        bad[i] ^= xor;
        prop_assert!(auth(Role::Agent).open(&bad, now_ms()).is_err());
        prop_assert_eq!(auth(Role::Agent).open(&frame, now_ms()).unwrap(), msg);
    }
}

#[tokio::test]
async fn random_streams_never_yield_a_message() {
    // A few random byte streams through the async reader (the proptests cover the decoder).
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = proptest::collection::vec(any::<u8>(), 0..200);
    for _ in 0..64 {
        let bytes = strategy.new_tree(&mut runner).unwrap().current();
        let (mut tx, rx) = duplex(1 << 16);
        let mut conn = ControlConn::new(rx, auth(Role::Agent));
        tx.write_all(&bytes).await.unwrap();
        drop(tx);
        let got = recv(&mut conn).await;
        assert!(got.is_err(), "{bytes:?} decoded as {got:?}");
    }
}
