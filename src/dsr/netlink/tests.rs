//! Encoders against hand-checked bytes, parsers against synthesized replies (well formed,
//! multipart across datagrams, and malformed), and the reply loop over a socket pair.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    send, setsockopt, socketpair, sockopt, AddressFamily, MsgFlags, SockFlag, SockType,
};
use nix::sys::time::TimeVal;

use super::conntrack::{tuple_request, IPCTNL_MSG_CT_DELETE, IPCTNL_MSG_CT_GET};
use super::diag::{
    absorb, dump_request, lookup_request, parse_diag_msg, DiagInfo, SOCK_DIAG_BY_FAMILY,
    STATES_LIVE, TCP_CLOSE_WAIT, TCP_ESTABLISHED, TCP_LISTEN, TCP_TIME_WAIT,
};
use super::socket::{NlSocket, Until};
use super::wire::{
    attrs, error_code, messages, MsgBuilder, WireError, NLMSG_DONE, NLMSG_ERROR, NLM_F_MULTI,
};

fn ne16(v: u16) -> [u8; 2] {
    v.to_ne_bytes()
}

fn ne32(v: u32) -> [u8; 4] {
    v.to_ne_bytes()
}

fn client() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 3), 40000)
}

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 10), 7000)
}

/// A netlink header, field by field (native endian).
fn header(len: u32, ty: u16, flags: u16, seq: u32) -> Vec<u8> {
    [
        &ne32(len)[..],
        &ne16(ty),
        &ne16(flags),
        &ne32(seq),
        &ne32(0),
    ]
    .concat()
}

#[test]
fn conntrack_delete_request_bytes() {
    let got = tuple_request(IPCTNL_MSG_CT_DELETE, 0x0102_0304, client(), vip());
    let want = [
        // nlmsghdr: 72 bytes, (CTNETLINK 1 << 8) | DELETE 2, REQUEST | ACK.
        header(72, 0x0102, 0x0005, 0x0102_0304),
        // nfgenmsg: AF_INET, NFNETLINK_V0, res_id 0 (be16).
        vec![2, 0, 0, 0],
        // CTA_TUPLE_ORIG | NLA_F_NESTED, 52 bytes.
        [&ne16(52)[..], &ne16(0x8001)].concat(),
        // CTA_TUPLE_IP | NLA_F_NESTED, 20 bytes: V4_SRC, V4_DST (network order).
        [&ne16(20)[..], &ne16(0x8001)].concat(),
        [&ne16(8)[..], &ne16(1), &[10, 1, 2, 3]].concat(),
        [&ne16(8)[..], &ne16(2), &[192, 0, 2, 10]].concat(),
        // CTA_TUPLE_PROTO | NLA_F_NESTED, 28 bytes: NUM 6 (u8, padded), ports be16 (padded).
        [&ne16(28)[..], &ne16(0x8002)].concat(),
        [&ne16(5)[..], &ne16(1), &[6, 0, 0, 0]].concat(),
        [&ne16(6)[..], &ne16(2), &[0x9c, 0x40, 0, 0]].concat(),
        [&ne16(6)[..], &ne16(3), &[0x1b, 0x58, 0, 0]].concat(),
    ]
    .concat();
    assert_eq!(got, want);
    // A GET differs in the type only.
    let get = tuple_request(IPCTNL_MSG_CT_GET, 0x0102_0304, client(), vip());
    assert_eq!(get[4..6], ne16(0x0101));
    assert_eq!(get[..4], want[..4]);
    assert_eq!(get[6..], want[6..]);
}

/// `struct inet_diag_req_v2` for TCP/IPv4 asking for INET_DIAG_INFO.
fn req_v2(sport: [u8; 2], dport: [u8; 2], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    [
        &[2u8, 6, 2, 0][..], // AF_INET, IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), pad
        &ne32(0x1b3e),       // all states but TIME_WAIT (6), CLOSE (7), LISTEN (10)
        &sport,
        &dport,
        &src,
        &[0; 12],
        &dst,
        &[0; 12],
        &ne32(0),   // idiag_if
        &[0xff; 8], // idiag_cookie: INET_DIAG_NOCOOKIE twice
    ]
    .concat()
}

#[test]
fn sock_diag_dump_request_bytes() {
    assert_eq!(STATES_LIVE, 0x1b3e);
    let got = dump_request(7, vip());
    let want = [
        // nlmsghdr: 16 + 56 + 20, SOCK_DIAG_BY_FAMILY, REQUEST | DUMP.
        header(92, 20, 0x0301, 7),
        req_v2([0, 0], [0, 0], [0; 4], [0; 4]),
        // INET_DIAG_REQ_BYTECODE, 20 bytes: op S_COND yes 16 no 20, then hostcond
        // {AF_INET, /32, pad, port 7000 as a host-order int}, then the address.
        [&ne16(20)[..], &ne16(1)].concat(),
        [&[7u8, 16][..], &ne16(20)].concat(),
        [
            &[2u8, 32, 0, 0][..],
            &7000i32.to_ne_bytes(),
            &[192, 0, 2, 10],
        ]
        .concat(),
    ]
    .concat();
    assert_eq!(got, want);
}

#[test]
fn sock_diag_lookup_request_bytes() {
    let got = lookup_request(9, vip(), client());
    let want = [
        header(72, 20, 0x0005, 9), // REQUEST | ACK, no dump
        req_v2([0x1b, 0x58], [0x9c, 0x40], [192, 0, 2, 10], [10, 1, 2, 3]),
    ]
    .concat();
    assert_eq!(got, want);
}

/// A reply message body (`inet_diag_msg` and attributes) for one socket.
fn diag_payload(
    local: SocketAddrV4,
    remote: SocketAddrV4,
    state: u8,
    tcp_info: Option<&[u8]>,
) -> Vec<u8> {
    let mut m = vec![2, state, 0, 0];
    m.extend_from_slice(&local.port().to_be_bytes());
    m.extend_from_slice(&remote.port().to_be_bytes());
    m.extend_from_slice(&local.ip().octets());
    m.extend_from_slice(&[0; 12]);
    m.extend_from_slice(&remote.ip().octets());
    m.extend_from_slice(&[0; 12]);
    m.extend_from_slice(&[0; 4 + 8 + 20]); // if, cookie, expires..inode
    assert_eq!(m.len(), 72);
    // INET_DIAG_SHUTDOWN (8), a u8: an attribute to skip, with padding.
    m.extend_from_slice(&[&ne16(5)[..], &ne16(8), &[0, 0, 0, 0]].concat());
    if let Some(info) = tcp_info {
        m.extend_from_slice(&ne16(4 + info.len() as u16));
        m.extend_from_slice(&ne16(2));
        m.extend_from_slice(info);
        m.resize((m.len() + 3) & !3, 0);
    }
    m
}

/// A `struct tcp_info` of `len` bytes with the two counters set where they fit.
fn tcp_info(len: usize, acked: u64, received: u64) -> Vec<u8> {
    let mut info = vec![0u8; 232.max(len)];
    info[0] = TCP_ESTABLISHED;
    info[120..128].copy_from_slice(&acked.to_ne_bytes());
    info[128..136].copy_from_slice(&received.to_ne_bytes());
    info.truncate(len);
    info
}

fn message(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = header(16 + payload.len() as u32, ty, flags, seq);
    m.extend_from_slice(payload);
    m.resize((m.len() + 3) & !3, 0);
    m
}

#[test]
fn parses_a_diag_message_with_counters() {
    let info = tcp_info(232, 1234, 5678);
    let payload = diag_payload(vip(), client(), TCP_ESTABLISHED, Some(&info));
    let entry = parse_diag_msg(&payload).unwrap().unwrap();
    assert_eq!(entry.local, vip());
    assert_eq!(entry.remote, client());
    assert_eq!(
        entry.info,
        DiagInfo {
            state: TCP_ESTABLISHED,
            bytes_acked: 1234,
            bytes_received: 5678
        }
    );
    // An old kernel's short tcp_info: counters 0; just enough for bytes_acked only.
    for (len, acked) in [(104, 0), (128, 1234)] {
        let info = tcp_info(len, 1234, 5678);
        let payload = diag_payload(vip(), client(), TCP_CLOSE_WAIT, Some(&info));
        let entry = parse_diag_msg(&payload).unwrap().unwrap();
        assert_eq!(
            entry.info,
            DiagInfo {
                state: TCP_CLOSE_WAIT,
                bytes_acked: acked,
                bytes_received: 0
            },
            "tcp_info of {len} bytes"
        );
    }
    // No INET_DIAG_INFO at all.
    let payload = diag_payload(vip(), client(), TCP_ESTABLISHED, None);
    let entry = parse_diag_msg(&payload).unwrap().unwrap();
    assert_eq!((entry.info.bytes_acked, entry.info.bytes_received), (0, 0));
    // Another family is skipped, not misread.
    let mut v6 = diag_payload(vip(), client(), TCP_ESTABLISHED, None);
    v6[0] = 10;
    assert_eq!(parse_diag_msg(&v6), Ok(None));
}

#[test]
fn malformed_diag_messages_are_errors() {
    let payload = diag_payload(vip(), client(), TCP_ESTABLISHED, Some(&tcp_info(232, 1, 2)));
    assert!(matches!(
        parse_diag_msg(&payload[..71]),
        Err(WireError::Truncated { .. })
    ));
    // An attribute whose length runs past the message.
    let mut bad = payload.clone();
    bad[80..82].copy_from_slice(&ne16(4000));
    assert!(matches!(
        parse_diag_msg(&bad),
        Err(WireError::BadLength { .. })
    ));
    // An attribute length below its own header.
    bad[80..82].copy_from_slice(&ne16(2));
    assert!(matches!(
        parse_diag_msg(&bad),
        Err(WireError::BadLength { .. })
    ));
    // A lone half attribute header.
    assert!(matches!(
        parse_diag_msg(&payload[..74]),
        Err(WireError::Truncated { .. })
    ));
    // Every prefix and every single-byte corruption parses or fails, never panics.
    let datagram = [
        message(20, NLM_F_MULTI, 1, &payload),
        message(NLMSG_DONE, NLM_F_MULTI, 1, &ne32(0)),
    ]
    .concat();
    for end in 0..=datagram.len() {
        walk(&datagram[..end]);
    }
    for at in 0..datagram.len() {
        for value in [0u8, 1, 3, 0x7f, 0xff] {
            let mut d = datagram.clone();
            d[at] = value;
            walk(&d);
        }
    }
}

/// Parses everything in a datagram, discarding the results.
fn walk(datagram: &[u8]) {
    for msg in messages(datagram) {
        let Ok(msg) = msg else { break };
        let _ = parse_diag_msg(msg.payload);
        let _ = error_code(msg.payload);
        for attr in attrs(msg.payload) {
            if attr.is_err() {
                break;
            }
        }
    }
}

#[test]
fn splits_messages_and_rejects_bad_framing() {
    let a = message(20, NLM_F_MULTI, 5, &[1, 2, 3]); // padded to 20
    let b = message(NLMSG_DONE, NLM_F_MULTI, 5, &ne32(0));
    let both = [a.clone(), b].concat();
    let got: Vec<_> = messages(&both).collect::<Result<_, _>>().unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0].ty, got[0].seq, got[0].payload),
        (20, 5, &[1u8, 2, 3][..])
    );
    assert_eq!((got[1].ty, got[1].payload), (NLMSG_DONE, &ne32(0)[..]));
    // The final message may come without its padding.
    let unpadded = &a[..19];
    let one: Vec<_> = messages(unpadded).collect::<Result<_, _>>().unwrap();
    assert_eq!(one[0].payload, &[1, 2, 3]);

    // A truncated header.
    let mut it = messages(&a[..10]);
    assert!(matches!(it.next(), Some(Err(WireError::Truncated { .. }))));
    assert!(it.next().is_none(), "stops after an error");
    // A length past the buffer, and one below the header.
    let mut long = a.clone();
    long[0..4].copy_from_slice(&ne32(4096));
    assert!(matches!(
        messages(&long).next(),
        Some(Err(WireError::BadLength { len: 4096, .. }))
    ));
    let mut short = a.clone();
    short[0..4].copy_from_slice(&ne32(8));
    assert!(matches!(
        messages(&short).next(),
        Some(Err(WireError::BadLength { len: 8, .. }))
    ));
    // A good message, then garbage: the first parses, then one error, then nothing.
    let tail = [a, vec![1, 2, 3]].concat();
    let mut it = messages(&tail);
    assert!(matches!(it.next(), Some(Ok(_))));
    assert!(matches!(it.next(), Some(Err(_))));
    assert!(it.next().is_none());
    // An NLMSG_ERROR too short for its code.
    assert!(error_code(&[0, 0]).is_err());
}

#[test]
fn builder_nests_and_pads() {
    let mut m = MsgBuilder::new(1, 2, 3);
    m.put(&[9]);
    m.begin_nest(4);
    m.attr(5, &[1, 2, 3]);
    m.end_nest();
    let bytes = m.finish();
    let want = [
        header(32, 1, 2, 3),
        vec![9, 0, 0, 0],
        [&ne16(12)[..], &ne16(0x8004)].concat(),
        [&ne16(7)[..], &ne16(5), &[1, 2, 3, 0]].concat(),
    ]
    .concat();
    assert_eq!(bytes, want);
    let nest: Vec<_> = attrs(&bytes[20..]).collect::<Result<_, _>>().unwrap();
    assert_eq!(nest, vec![(4, &bytes[24..32])]);
}

/// A reply loop reading from one end of a datagram socket pair; the test writes the
/// "kernel's" datagrams into the other end.
fn fake_kernel() -> (NlSocket, OwnedFd) {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Datagram,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    setsockopt(&ours, sockopt::ReceiveTimeout, &TimeVal::new(10, 0)).unwrap();
    (NlSocket::from_fd(ours, 100), theirs)
}

fn kernel_sends(fd: &OwnedFd, datagram: &[u8]) {
    assert_eq!(
        send(fd.as_raw_fd(), datagram, MsgFlags::empty()).unwrap(),
        datagram.len()
    );
}

#[test]
fn dump_reply_spans_datagrams_and_skips_stale_and_foreign_sockets() {
    let (mut sock, kernel) = fake_kernel();
    let seq = sock.next_seq();
    let peer = |i: u16| SocketAddrV4::new(Ipv4Addr::new(10, 9, (i >> 8) as u8, i as u8), 1000 + i);
    let sock_msg = |local, i: u16, state| {
        let info = tcp_info(232, u64::from(i) * 10, u64::from(i) * 100);
        message(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_MULTI,
            seq,
            &diag_payload(local, peer(i), state, Some(&info)),
        )
    };
    // A leftover of an earlier request (other seq), then the dump's datagrams,
    // among them states and local addresses that are not reported, then DONE.
    let stale = message(NLMSG_ERROR, 0, seq.wrapping_sub(1), &ne32((-1i32) as u32));
    kernel_sends(&kernel, &stale);
    let other_local = SocketAddrV4::new(*vip().ip(), 7001);
    let mut want = HashMap::new();
    let mut datagrams = Vec::new();
    // 1200 sockets in 12 datagrams of ~36 KB (a real dump's are at most 32 KiB).
    for part in 0..12u16 {
        let mut datagram = Vec::new();
        for i in part * 100..(part + 1) * 100 {
            let (local, state) = match i % 10 {
                0 => (vip(), TCP_TIME_WAIT),
                1 => (vip(), TCP_LISTEN),
                2 => (other_local, TCP_ESTABLISHED),
                3 => (vip(), TCP_CLOSE_WAIT),
                _ => (vip(), TCP_ESTABLISHED),
            };
            datagram.extend_from_slice(&sock_msg(local, i, state));
            if local == vip() && state != TCP_TIME_WAIT && state != TCP_LISTEN {
                want.insert(
                    peer(i),
                    DiagInfo {
                        state,
                        bytes_acked: u64::from(i) * 10,
                        bytes_received: u64::from(i) * 100,
                    },
                );
            }
        }
        datagrams.push(datagram);
    }
    datagrams.push(message(NLMSG_DONE, NLM_F_MULTI, seq, &ne32(0)));
    let mut found = HashMap::new();
    // The "kernel" writes while the reply loop reads (the pair's buffers are smaller than
    // the whole reply).
    std::thread::scope(|s| {
        s.spawn(|| {
            for datagram in &datagrams {
                kernel_sends(&kernel, datagram);
            }
        });
        sock.reply(seq, Until::Done, |msg| absorb(vip(), msg, &mut found))
            .unwrap();
    });
    assert_eq!(found.len(), 840);
    assert_eq!(found, want);
}

#[test]
fn kernel_errors_become_errno_and_bad_replies_invalid_data() {
    let (mut sock, kernel) = fake_kernel();
    // NLMSG_ERROR -EPERM (with the request's header echoed after the code).
    let seq = sock.next_seq();
    let err = [&(-1i32).to_ne_bytes()[..], &header(72, 0x0102, 5, seq)].concat();
    kernel_sends(&kernel, &message(NLMSG_ERROR, 0, seq, &err));
    let e = sock.reply(seq, Until::Ack, |_| Ok(())).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(1), "{e}");
    // A dump ended by a DONE carrying -ENOBUFS.
    let seq = sock.next_seq();
    kernel_sends(
        &kernel,
        &message(NLMSG_DONE, NLM_F_MULTI, seq, &(-105i32).to_ne_bytes()),
    );
    let e = sock.reply(seq, Until::Done, |_| Ok(())).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(105), "{e}");
    // An ack: success.
    let seq = sock.next_seq();
    kernel_sends(&kernel, &message(NLMSG_ERROR, 0, seq, &0i32.to_ne_bytes()));
    sock.reply(seq, Until::Ack, |_| Ok(())).unwrap();
    // A truncated message in the reply.
    let seq = sock.next_seq();
    let mut bad = message(SOCK_DIAG_BY_FAMILY, NLM_F_MULTI, seq, &[0; 72]);
    bad.truncate(40);
    kernel_sends(&kernel, &bad);
    let e = sock.reply(seq, Until::Done, |_| Ok(())).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    // A diag message too short for inet_diag_msg.
    let seq = sock.next_seq();
    kernel_sends(
        &kernel,
        &message(SOCK_DIAG_BY_FAMILY, NLM_F_MULTI, seq, &[2; 40]),
    );
    let mut found = HashMap::new();
    let e = sock
        .reply(seq, Until::Done, |msg| absorb(vip(), msg, &mut found))
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
}

#[test]
fn acks_of_a_batch_are_matched_by_sequence_number() {
    let (mut sock, kernel) = fake_kernel();
    let first = sock.next_seq();
    for _ in 1..4 {
        sock.next_seq();
    }
    // Out of order, across two datagrams, with a data message and a stranger in between.
    let ack = |seq: u32, code: i32| message(NLMSG_ERROR, 0, seq, &code.to_ne_bytes());
    kernel_sends(
        &kernel,
        &[
            ack(first + 2, -2),
            message(0x0100, 0, first, &[0; 8]),
            ack(first, 0),
        ]
        .concat(),
    );
    kernel_sends(
        &kernel,
        &[ack(first + 99, 0), ack(first + 3, -1), ack(first + 1, 0)].concat(),
    );
    let got = sock.acks(first, 4).unwrap();
    assert_eq!(got, vec![Ok(()), Ok(()), Err(-2), Err(-1)]);
}
