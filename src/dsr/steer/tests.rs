//! Unit tests of the steering commands and nft output handling (no root needed).

use std::os::fd::AsRawFd;

use nix::sys::socket::{
    send, setsockopt, socketpair, sockopt, AddressFamily, MsgFlags, SockFlag, SockType,
};
use nix::sys::time::TimeVal;

use super::nft::*;
use super::nftnl::*;
use super::*;
use crate::dsr::netlink::socket::NlSocket;

fn cfg() -> SteerConfig {
    SteerConfig::new(
        "shardproxy_7000",
        "eth0",
        "192.0.2.10:7000".parse().unwrap(),
    )
}

fn c(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

/// The planned operations as nft would write them.
fn text(ops: &[ElemOp]) -> Vec<String> {
    ops.iter().map(ToString::to_string).collect()
}

#[test]
fn table_names_are_sanitized() {
    assert_eq!(table_name("7000"), "shardproxy_7000");
    assert_eq!(table_name("127.0.0.1:7000"), "shardproxy_127_0_0_1_7000");
    assert_eq!(table_name("a b;c\"{}"), "shardproxy_a_b_c___");
    assert!(table_name(&"x".repeat(1000)).len() <= MAX_NAME_LEN);
    let mut cfg = cfg();
    cfg.table = table_name("[::1]:80");
    assert!(cfg.validate().is_ok());
}

#[test]
fn validation_rejects_what_nft_would_misparse() {
    assert!(cfg().validate().is_ok());
    for (table, device) in [
        ("bad name", "eth0"),
        ("1abc", "eth0"),
        ("t;delete", "eth0"),
        ("", "eth0"),
        ("ok", ""),
        ("ok", "eth0\" ; flush ruleset"),
        ("ok", "a-very-long-device-name"),
    ] {
        let mut cfg = cfg();
        cfg.table = table.to_owned();
        cfg.device = device.to_owned();
        assert!(
            matches!(cfg.validate(), Err(SteerError::Invalid(_))),
            "{table:?} {device:?}"
        );
    }
    let mut cfg2 = cfg();
    cfg2.frozen_timeout = Duration::from_micros(10);
    assert!(matches!(cfg2.validate(), Err(SteerError::Invalid(_))));
    let mut cfg3 = cfg();
    cfg3.command.clear();
    assert!(matches!(cfg3.validate(), Err(SteerError::Invalid(_))));
}

#[test]
fn setup_recreates_the_table_in_one_line() {
    let line = cfg().setup_line();
    assert!(!line.contains('\n'));
    assert!(line.starts_with(
        "add table netdev shardproxy_7000 ; delete table netdev shardproxy_7000 ; add table"
    ));
    assert!(line.contains("timeout 5000ms"));
    assert!(line.contains("timeout 3600000ms"));
    assert!(line.contains("ip daddr 192.0.2.10 tcp dport 7000 ip saddr . tcp sport @frozen drop"));
    assert!(line.contains(
        "ip daddr 192.0.2.10 tcp dport 7000 fwd ip to ip saddr . tcp sport map @flows device \"eth0\""
    ));
    // The frozen drop rule stands before the fwd rule.
    assert!(line.find("@frozen drop") < line.find("fwd ip to"));
}

#[test]
fn plans_expire_rather_than_delete_and_follow_the_batch() {
    let nft = Nft::new(cfg());
    let mut overlay = Overlay::new();
    let mut ops = Vec::new();
    let a = c("10.0.0.1:4000");
    nft.plan(Op::Remove(a), &mut overlay, &mut ops).unwrap();
    assert!(ops.is_empty(), "nothing to remove: {ops:?}");
    assert!(matches!(
        nft.plan(Op::Refresh(a), &mut overlay, &mut ops),
        Err(SteerError::NotSteered(_))
    ));
    nft.plan(Op::Freeze(a), &mut overlay, &mut ops).unwrap();
    nft.plan(
        Op::Steer(a, Ipv4Addr::new(10, 1, 0, 2)),
        &mut overlay,
        &mut ops,
    )
    .unwrap();
    assert_eq!(
        text(&ops),
        [
            "add element frozen { 10.0.0.1 . 4000 timeout 5000ms expires 5000ms }",
            "add element flows { 10.0.0.1 . 4000 timeout 3600000ms expires 3600000ms : 10.1.0.2 }",
            "add element frozen { 10.0.0.1 . 4000 timeout 5000ms expires 1ms }",
        ]
    );
    ops.clear();
    // Later requests of the same batch see the steer; only a new value needs a delete.
    nft.plan(
        Op::Steer(a, Ipv4Addr::new(10, 1, 0, 3)),
        &mut overlay,
        &mut ops,
    )
    .unwrap();
    assert_eq!(
        text(&ops)[..3],
        [
            "add element flows { 10.0.0.1 . 4000 : 10.1.0.2 }",
            "delete element flows { 10.0.0.1 . 4000 }",
            "add element flows { 10.0.0.1 . 4000 timeout 3600000ms expires 3600000ms : 10.1.0.3 }",
        ]
    );
    ops.clear();
    nft.plan(Op::Refresh(a), &mut overlay, &mut ops).unwrap();
    assert_eq!(
        text(&ops),
        ["add element flows { 10.0.0.1 . 4000 timeout 3600000ms expires 3600000ms : 10.1.0.3 }"]
    );
    ops.clear();
    // A removal expires the element at once: no delete.
    nft.plan(Op::Remove(a), &mut overlay, &mut ops).unwrap();
    assert_eq!(
        text(&ops),
        ["add element flows { 10.0.0.1 . 4000 timeout 3600000ms expires 1ms : 10.1.0.3 }"]
    );
    assert!(!overlay[&a].live);
    ops.clear();
    nft.plan(Op::Remove(a), &mut overlay, &mut ops).unwrap();
    assert!(ops.is_empty(), "removed twice: {ops:?}");
    assert!(matches!(
        nft.plan(Op::Refresh(a), &mut overlay, &mut ops),
        Err(SteerError::NotSteered(_))
    ));
    // The same flow steered again to the same host revives the expired element in place; to
    // another host, the lingering element is deleted first.
    nft.plan(
        Op::Steer(a, Ipv4Addr::new(10, 1, 0, 3)),
        &mut overlay,
        &mut ops,
    )
    .unwrap();
    assert!(
        !ops.iter().any(|o| matches!(o, ElemOp::Delete { .. })),
        "{ops:?}"
    );
    ops.clear();
    nft.plan(Op::Remove(a), &mut overlay, &mut ops).unwrap();
    ops.clear();
    nft.plan(
        Op::Steer(a, Ipv4Addr::new(10, 1, 0, 4)),
        &mut overlay,
        &mut ops,
    )
    .unwrap();
    assert_eq!(
        ops[1].to_string(),
        "delete element flows { 10.0.0.1 . 4000 }"
    );
}

#[test]
fn output_is_classified() {
    assert!(classify(&[]).is_ok());
    assert!(classify(&["".to_owned(), "   ^".to_owned()]).is_ok());
    let out = [
        "Error: Could not process rule: No such file or directory".to_owned(),
        format!("delete element netdev t frozen {{ {} }}", "x".repeat(400)),
        "                      ^^^^^".to_owned(),
    ];
    match classify(&out) {
        Err(SteerError::Command { message }) => {
            assert!(message.starts_with("Error: Could not process rule: No such file"));
            assert!(message.len() < 300, "{message}");
        }
        other => panic!("{other:?}"),
    }
    let out = ["Error: Could not process rule: Operation not permitted".to_owned()];
    assert!(matches!(classify(&out), Err(SteerError::Permission { .. })));
}

#[tokio::test]
async fn a_missing_nft_says_install_nftables() {
    let mut cfg = cfg();
    cfg.command = vec!["/nonexistent/shardproxy-test/nft".to_owned()];
    let err = Steering::start_with(cfg).await.unwrap_err();
    assert!(matches!(err, SteerError::NftMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("install nftables"), "{err}");
}

#[test]
fn plans_are_element_operations() {
    let nft = Nft::new(cfg());
    let mut overlay = Overlay::new();
    let mut ops = Vec::new();
    let a = c("10.0.0.1:4000");
    nft.plan(
        Op::Steer(a, Ipv4Addr::new(10, 1, 0, 2)),
        &mut overlay,
        &mut ops,
    )
    .unwrap();
    assert_eq!(
        ops,
        [
            ElemOp::Add {
                set: Set::Flows,
                client: a,
                value: Some(Ipv4Addr::new(10, 1, 0, 2)),
                timeout_ms: Some(3_600_000),
                expires_ms: Some(3_600_000),
            },
            ElemOp::Add {
                set: Set::Frozen,
                client: a,
                value: None,
                timeout_ms: Some(5000),
                expires_ms: Some(1),
            },
        ]
    );
}

/// `"\x38\x00..."` as strace prints a buffer, to bytes.
fn strace_bytes(s: &str) -> Vec<u8> {
    s.split("\\x")
        .filter(|h| !h.is_empty())
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect()
}

fn nlmsghdr(len: u32, ty: u16, flags: u16, seq: u32) -> Vec<u8> {
    [
        &len.to_ne_bytes()[..],
        &ty.to_ne_bytes(),
        &flags.to_ne_bytes(),
        &seq.to_ne_bytes(),
        &0u32.to_ne_bytes(),
    ]
    .concat()
}

fn nla(len: u16, ty: u16) -> Vec<u8> {
    [len.to_ne_bytes(), ty.to_ne_bytes()].concat()
}

/// What `nft add element ...` sent (nftables 1.0.6, `strace -e sendmsg -xx`), less
/// `NFTA_SET_ELEM_LIST_SET_ID` and with `NLM_F_ACK` added: the header, nfgenmsg
/// (NFPROTO_NETDEV), table "T", set, then the elements' nest with the payload verbatim.
fn nft_message(ty: u16, flags: u16, seq: u32, set: &str, elements: &str) -> Vec<u8> {
    let elements = strace_bytes(elements);
    let mut set_attr = set.as_bytes().to_vec();
    set_attr.push(0);
    let set_len = 4 + set_attr.len();
    set_attr.resize((set_attr.len() + 3) & !3, 0);
    let body = [
        vec![5, 0, 0, 0],
        nla(6, 1),
        b"T\0\0\0".to_vec(),
        nla(u16::try_from(set_len).unwrap(), 2),
        set_attr,
        nla(u16::try_from(4 + elements.len()).unwrap(), 0x8003),
        elements,
    ]
    .concat();
    [
        nlmsghdr(u32::try_from(16 + body.len()).unwrap(), ty, flags, seq),
        body,
    ]
    .concat()
}

const ACK_CREATE: u16 = 0x0405; // NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE

fn add_flow(client: &str, value: &str, timeout: Option<u64>, expires: Option<u64>) -> ElemOp {
    ElemOp::Add {
        set: Set::Flows,
        client: c(client),
        value: Some(value.parse().unwrap()),
        timeout_ms: timeout,
        expires_ms: expires,
    }
}

#[test]
fn element_messages_match_what_nft_sends() {
    // nft add element netdev T flows { 10.0.0.1 . 4000 timeout 60s expires 60s : 10.1.0.2 }
    let op = add_flow("10.0.0.1:4000", "10.1.0.2", Some(60_000), Some(60_000));
    assert_eq!(
        elem_message("T", &[op], 7),
        nft_message(
            0x0a0c,
            ACK_CREATE,
            7,
            "flows",
            r"\x38\x00\x01\x80\x0c\x00\x04\x00\x00\x00\x00\x00\x00\x00\xea\x60\x0c\x00\x05\x00\x00\x00\x00\x00\x00\x00\xea\x60\x10\x00\x01\x80\x0c\x00\x01\x00\x0a\x00\x00\x01\x0f\xa0\x00\x00\x0c\x00\x02\x80\x08\x00\x01\x00\x0a\x01\x00\x02"
        )
    );
    assert_eq!(elem_message("T", &[op], 7).len(), 108 - 8);
    // nft add element netdev T frozen { 10.0.0.1 . 4000 timeout 5000ms expires 1ms }
    let op = ElemOp::Add {
        set: Set::Frozen,
        client: c("10.0.0.1:4000"),
        value: None,
        timeout_ms: Some(5000),
        expires_ms: Some(1),
    };
    assert_eq!(
        elem_message("T", &[op], 8),
        nft_message(
            0x0a0c,
            ACK_CREATE,
            8,
            "frozen",
            r"\x2c\x00\x01\x80\x0c\x00\x04\x00\x00\x00\x00\x00\x00\x00\x13\x88\x0c\x00\x05\x00\x00\x00\x00\x00\x00\x00\x00\x01\x10\x00\x01\x80\x0c\x00\x01\x00\x0a\x00\x00\x01\x0f\xa0\x00\x00"
        )
    );
    // nft add element netdev T flows { 10.0.0.1 . 4000 : 10.1.0.2 }: the set's timeout.
    let op = add_flow("10.0.0.1:4000", "10.1.0.2", None, None);
    assert_eq!(
        elem_message("T", &[op], 9),
        nft_message(
            0x0a0c,
            ACK_CREATE,
            9,
            "flows",
            r"\x20\x00\x01\x80\x10\x00\x01\x80\x0c\x00\x01\x00\x0a\x00\x00\x01\x0f\xa0\x00\x00\x0c\x00\x02\x80\x08\x00\x01\x00\x0a\x01\x00\x02"
        )
    );
    // nft delete element netdev T flows { 10.0.0.1 . 4000 : 10.1.0.2 }: the key only, no
    // NLM_F_CREATE.
    let op = ElemOp::Delete {
        set: Set::Flows,
        client: c("10.0.0.1:4000"),
    };
    assert_eq!(
        elem_message("T", &[op], 10),
        nft_message(
            0x0a0e,
            0x0005,
            10,
            "flows",
            r"\x14\x00\x01\x80\x10\x00\x01\x80\x0c\x00\x01\x00\x0a\x00\x00\x01\x0f\xa0\x00\x00"
        )
    );
}

#[test]
fn several_elements_share_one_list() {
    let a = add_flow("10.0.0.1:4000", "10.1.0.2", None, None);
    let b = add_flow("10.0.0.2:4001", "10.1.0.3", None, None);
    let one = elem_message("T", &[a], 1);
    let two = elem_message("T", &[a, b], 1);
    // Header 16, nfgenmsg 4, table 8, set 12, list header 4, then 32 bytes per element.
    assert_eq!(one.len(), 16 + 4 + 8 + 12 + 4 + 32);
    assert_eq!(two.len(), one.len() + 32);
    assert_eq!(two[0..4], u32::try_from(two.len()).unwrap().to_ne_bytes());
    assert_eq!(
        two[40..42],
        68u16.to_ne_bytes(),
        "the list covers both elements"
    );
    assert_eq!(two[4..40], one[4..40]);
    assert_eq!(two[44..76], one[44..76]);
    assert_eq!(
        key_bytes(c("10.0.0.2:4001")),
        [10, 0, 0, 2, 0x0f, 0xa1, 0, 0]
    );
    assert_eq!(two[76 + 12..76 + 20], key_bytes(c("10.0.0.2:4001")));
}

#[test]
fn a_batch_is_begin_messages_end() {
    let x = "10.0.0.1:4000";
    let ops = [
        add_flow(x, "10.1.0.2", None, None),
        ElemOp::Delete {
            set: Set::Flows,
            client: c(x),
        },
        add_flow(x, "10.1.0.3", Some(1000), Some(1000)),
        ElemOp::Add {
            set: Set::Frozen,
            client: c(x),
            value: None,
            timeout_ms: Some(5000),
            expires_ms: Some(1),
        },
        add_flow("10.0.0.2:4001", "10.1.0.3", Some(1000), Some(1000)),
    ];
    // Operations on one element keep their order; the others share messages.
    let msgs = group(&ops);
    assert_eq!(
        msgs,
        [
            vec![ops[0], ops[4]],
            vec![ops[1]],
            vec![ops[2]],
            vec![ops[3]],
        ]
    );
    // Any number of moves: still three messages for `flows` (few acks to read).
    let moves: Vec<ElemOp> = (0..100u16)
        .flat_map(|p| {
            let k = format!("10.0.0.3:{p}");
            [
                add_flow(&k, "10.1.0.2", None, None),
                ElemOp::Delete {
                    set: Set::Flows,
                    client: c(&k),
                },
                add_flow(&k, "10.1.0.3", Some(1), Some(1)),
                add_flow(&k, "10.1.0.3", Some(1), Some(2)),
            ]
        })
        .collect();
    let grouped = group(&moves);
    assert_eq!(grouped.len(), 3);
    for (i, m) in grouped.iter().enumerate() {
        assert_eq!(m.len(), if i == 2 { 200 } else { 100 });
    }
    // A key's two adds after its delete stay in order within the last message.
    assert_eq!(grouped[2][0..2], moves[2..4]);
    let mut seq = 41;
    let batch = encode("T", &ops, || {
        seq += 1;
        seq
    });
    assert_eq!(batch.begin, 42);
    assert_eq!(batch.msgs, msgs);
    // Batch begin/end: NFNL_MSG_BATCH_BEGIN/END, NLM_F_REQUEST, AF_UNSPEC, res_id = be16 10
    // (NFNL_SUBSYS_NFTABLES), as nft sends them.
    let begin = [nlmsghdr(20, 0x10, 1, 42), vec![0, 0, 0, 10]].concat();
    let end = [nlmsghdr(20, 0x11, 1, 47), vec![0, 0, 0, 10]].concat();
    let mut want = begin;
    for (i, m) in msgs.iter().enumerate() {
        want.extend(elem_message("T", m, 43 + u32::try_from(i).unwrap()));
    }
    want.extend(end);
    assert_eq!(batch.bytes, want);
    // Many elements are split before the list's u16 length could overflow.
    let many: Vec<ElemOp> = (0..MAX_ELEMS_PER_MSG as u16 + 1)
        .map(|p| add_flow(&format!("10.0.0.1:{p}"), "10.1.0.2", Some(1), Some(1)))
        .collect();
    assert_eq!(group(&many).len(), 2);
    assert!(elem_message("T", &group(&many)[0], 1).len() < 65535);
}

#[test]
fn batch_errors_name_the_refused_message() {
    let msgs = vec![vec![add_flow("10.0.0.1:4000", "10.1.0.2", None, None)]];
    match batch_error("T", &msgs, Some(0), -2) {
        SteerError::Command { message } => {
            assert!(
                message.contains("add element flows { 10.0.0.1 . 4000 : 10.1.0.2 }"),
                "{message}"
            );
            assert!(message.contains("ENOENT"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        batch_error("T", &msgs, None, -1),
        SteerError::Permission { .. }
    ));
}

fn fake_kernel() -> (NlSocket, std::os::fd::OwnedFd) {
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

fn kernel_ack(fd: &std::os::fd::OwnedFd, acks: &[(u32, i32)]) {
    let mut datagram = Vec::new();
    for &(seq, code) in acks {
        datagram.extend(nlmsghdr(36, 2, 0x100, seq));
        datagram.extend(code.to_ne_bytes());
        datagram.extend(nlmsghdr(16, 0x0a0c, 0x405, seq));
    }
    let sent = send(fd.as_raw_fd(), &datagram, MsgFlags::empty()).unwrap();
    assert_eq!(sent, datagram.len());
}

#[test]
fn batch_acks_wait_for_every_message_and_catch_batch_errors() {
    let (mut sock, kernel) = fake_kernel();
    // All acknowledged (a stale ack of an earlier batch in between): success.
    kernel_ack(&kernel, &[(11, 0), (3, -2), (12, 0)]);
    assert_eq!(sock.batch_acks(10, 2).unwrap(), Ok(()));
    // The kernel goes on after an error: the first error wins, once all are in.
    kernel_ack(&kernel, &[(21, 0), (22, -2)]);
    kernel_ack(&kernel, &[(23, -17)]);
    assert_eq!(sock.batch_acks(20, 3).unwrap(), Err((Some(1), -2)));
    // An error on the batch begin (EPERM) ends the wait without element acks.
    kernel_ack(&kernel, &[(30, -1)]);
    assert_eq!(sock.batch_acks(30, 2).unwrap(), Err((None, -1)));
}
