//! Tests of the TCP_REPAIR state encoding and of dumping (those that need no root).

use super::*;
use proptest::prelude::*;
use std::io::Write;
use std::net::{Shutdown, TcpListener};

fn sample() -> TcpState {
    TcpState {
        local: "10.0.0.1:443".parse().unwrap(),
        peer: "192.0.2.7:50123".parse().unwrap(),
        send_seq: 0xfff0_0000,
        recv_seq: 7,
        send_queue: b"response bytes".to_vec(),
        unsent_len: 5,
        recv_queue: b"request".to_vec(),
        mss: 1448,
        wscale_ok: true,
        snd_wscale: 7,
        rcv_wscale: 9,
        sack_ok: true,
        timestamps_ok: true,
        timestamp: 123_456,
        window: TcpWindow {
            snd_wl1: 1,
            snd_wnd: 2,
            max_window: 3,
            rcv_wnd: 4,
            rcv_wup: 5,
        },
    }
}

#[test]
fn round_trip_v4_and_v6() {
    let s = sample();
    assert_eq!(TcpState::decode(&s.encode().unwrap()).unwrap(), s);
    let mut s6 = sample();
    s6.local = "[2001:db8::1]:443".parse().unwrap();
    s6.peer = "[fe80::2%3]:9".parse().unwrap();
    s6.sack_ok = false;
    s6.send_queue.clear();
    s6.unsent_len = 0;
    assert_eq!(TcpState::decode(&s6.encode().unwrap()).unwrap(), s6);
}

#[test]
fn layout_is_as_documented() {
    let bytes = sample().encode().unwrap();
    // version, flags (SACK | TS | WSCALE), scales, mss.
    assert_eq!(&bytes[..8], &[1, 7, 7, 9, 0, 0, 0x05, 0xa8]);
    // 4 + 9 × 4 header, 2 × 7 addresses, 4 unsent, 4 + 14 send, 4 + 7 recv.
    assert_eq!(bytes.len(), 40 + 14 + 4 + 18 + 11);
    assert_eq!(&bytes[bytes.len() - 7..], b"request");
}

#[test]
fn decode_rejects_every_truncation_and_trailing_bytes() {
    let bytes = sample().encode().unwrap();
    for n in 0..bytes.len() {
        assert!(
            matches!(TcpState::decode(&bytes[..n]), Err(RepairError::Decode(_))),
            "prefix of {n} bytes accepted"
        );
    }
    let mut long = bytes.clone();
    long.push(0);
    assert!(matches!(
        TcpState::decode(&long),
        Err(RepairError::Decode(_))
    ));
}

#[test]
fn decode_rejects_bad_version_flags_family_and_scale() {
    let bytes = sample().encode().unwrap();
    let mut b = bytes.clone();
    b[0] = 2;
    let e = TcpState::decode(&b).unwrap_err();
    assert!(matches!(e, RepairError::Version(2)));
    assert_eq!(e.reason(), FallbackReason::Unsupported);
    let mut b = bytes.clone();
    b[1] = 8;
    assert!(matches!(TcpState::decode(&b), Err(RepairError::Decode(_))));
    let mut b = bytes.clone();
    b[2] = 15;
    assert!(matches!(TcpState::decode(&b), Err(RepairError::Decode(_))));
    let mut b = bytes.clone();
    b[40] = 5; // local address family
    assert!(matches!(TcpState::decode(&b), Err(RepairError::Decode(_))));
}

#[test]
fn decode_rejects_queues_over_the_bound_before_allocating() {
    let mut s = sample();
    s.recv_queue.clear();
    let mut bytes = s.encode().unwrap();
    // The receive queue's length field is the last 4 bytes.
    let at = bytes.len() - 4;
    bytes[at..].copy_from_slice(&((MAX_QUEUE_BYTES as u32) + 1).to_be_bytes());
    let e = TcpState::decode(&bytes).unwrap_err();
    assert!(
        matches!(e, RepairError::QueueTooLarge { queue: "recv", .. }),
        "{e}"
    );
    assert_eq!(e.reason(), FallbackReason::Invalid);
    // At the bound exactly, only the missing bytes are wrong.
    bytes[at..].copy_from_slice(&(MAX_QUEUE_BYTES as u32).to_be_bytes());
    assert!(matches!(
        TcpState::decode(&bytes),
        Err(RepairError::Decode("truncated"))
    ));
}

#[test]
fn encode_refuses_what_decode_would() {
    let mut s = sample();
    s.unsent_len = 100;
    assert!(s.encode().is_err());
    let mut s = sample();
    s.peer = "[::1]:1".parse().unwrap();
    assert!(s.encode().is_err());
}

#[test]
fn errno_classification() {
    let e = |errno| RepairError::Sys { step: "x", errno }.reason();
    assert_eq!(e(Errno::EPERM), FallbackReason::NoPermission);
    assert_eq!(e(Errno::ENOPROTOOPT), FallbackReason::Unsupported);
    assert_eq!(e(Errno::EADDRINUSE), FallbackReason::Io);
    assert_eq!(
        RepairError::NotEstablished(8).reason().as_str(),
        "not_established"
    );
}

/// Needs no privilege: the state is checked before repair mode is asked for.
#[test]
fn dump_refuses_sockets_that_are_not_established() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let e = freeze_and_dump(&listener).unwrap_err();
    assert!(matches!(e, RepairError::NotEstablished(10)), "{e}"); // TCP_LISTEN
    assert_eq!(e.reason(), FallbackReason::NotEstablished);

    // CLOSE_WAIT: the peer has sent its FIN.
    let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    client.write_all(b"x").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match freeze_and_dump(&server) {
            Err(RepairError::NotEstablished(8)) => break, // TCP_CLOSE_WAIT
            Err(RepairError::NotEstablished(s)) => panic!("state {s}"),
            _ if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => panic!("FIN never arrived: {other:?}"),
        }
    }
}

proptest! {
    #[test]
    fn prop_round_trip(
        send in proptest::collection::vec(any::<u8>(), 0..300),
        recv in proptest::collection::vec(any::<u8>(), 0..300),
        seqs in any::<(u32, u32, u32, u32)>(),
        scales in (0u8..=14, 0u8..=14),
        flags in any::<(bool, bool, bool)>(),
        v6 in any::<bool>(),
    ) {
        let mut s = sample();
        s.unsent_len = (seqs.3 as usize % (send.len() + 1)) as u32;
        s.send_queue = send;
        s.recv_queue = recv;
        s.send_seq = seqs.0;
        s.recv_seq = seqs.1;
        s.timestamp = seqs.2;
        (s.snd_wscale, s.rcv_wscale) = scales;
        (s.sack_ok, s.timestamps_ok, s.wscale_ok) = flags;
        if v6 {
            s.local = "[::1]:80".parse().unwrap();
            s.peer = "[::1]:5000".parse().unwrap();
        }
        let bytes = s.encode().unwrap();
        prop_assert_eq!(TcpState::decode(&bytes).unwrap(), s);
        // Any strict prefix is refused.
        let cut = seqs.3 as usize % bytes.len();
        prop_assert!(TcpState::decode(&bytes[..cut]).is_err());
    }

    #[test]
    fn prop_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = TcpState::decode(&bytes);
    }
}
