//! Set element updates as nftables netlink batches on a `NETLINK_NETFILTER` socket, without
//! `nft` (docs/design.md §6): the hot path of the steering worker.
//!
//! One transaction is one datagram (include/uapi/linux/netfilter/nfnetlink.h,
//! include/uapi/linux/netfilter/nf_tables.h):
//!
//! ```text
//! NFNL_MSG_BATCH_BEGIN   nfgenmsg { AF_UNSPEC, NFNETLINK_V0, res_id = be16 NFNL_SUBSYS_NFTABLES }
//! (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM or NFT_MSG_DELSETELEM, NLM_F_ACK
//!     nfgenmsg { NFPROTO_NETDEV, NFNETLINK_V0, 0 }
//!     NFTA_SET_ELEM_LIST_TABLE "table\0", NFTA_SET_ELEM_LIST_SET "flows\0"
//!     NFTA_SET_ELEM_LIST_ELEMENTS (nested)
//!         NFTA_LIST_ELEM (nested)
//!             [NFTA_SET_ELEM_TIMEOUT be64 ms] [NFTA_SET_ELEM_EXPIRATION be64 ms]
//!             NFTA_SET_ELEM_KEY (nested) { NFTA_DATA_VALUE: addr(4) port(2, be) 0 0 }
//!             [NFTA_SET_ELEM_DATA (nested) { NFTA_DATA_VALUE: addr(4) }]
//!         ...
//! ... more such messages (one per set and kind, more if order needs it) ...
//! NFNL_MSG_BATCH_END
//! ```
//!
//! This is what `nft add element netdev T flows { 10.0.0.1 . 4000 timeout 60s expires 60s :
//! 10.1.0.2 }` sends (checked with `nft --debug=mnl` and strace, nftables 1.0.6): `add`
//! carries `NLM_F_CREATE` (no `NLM_F_EXCL`, so an existing element with the same value gets
//! its timeout and expiry updated in place), `delete` only the key; the fields of a
//! concatenated key are each padded to 4 bytes. Unlike nft we leave out
//! `NFTA_SET_ELEM_LIST_SET_ID` (it names a set created in the same batch; ours exist) and
//! ask for an acknowledgement of every element message, so each message's result comes back.
//!
//! The kernel runs the whole batch in the `sendmsg` call and commits it all or nothing; it
//! reports an error of the batch itself (no CAP_NET_ADMIN, a failed commit) on the batch
//! begin's sequence number, so [`NlSocket::batch_acks`] watches for that too.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::socket::SockProtocol;

use super::SteerError;
use crate::dsr::netlink::socket::NlSocket;
use crate::dsr::netlink::wire::{MsgBuilder, NLM_F_ACK, NLM_F_REQUEST};

/// `NFNL_SUBSYS_NFTABLES` (nfnetlink.h).
pub(super) const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFNL_MSG_BATCH_BEGIN` (`NLMSG_MIN_TYPE`, nfnetlink.h).
pub(super) const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
/// `NFNL_MSG_BATCH_END`.
pub(super) const NFNL_MSG_BATCH_END: u16 = 0x11;
/// `NFT_MSG_NEWSETELEM` (`enum nf_tables_msg_types`, nf_tables.h).
pub(super) const NFT_MSG_NEWSETELEM: u16 = 12;
/// `NFT_MSG_DELSETELEM`.
pub(super) const NFT_MSG_DELSETELEM: u16 = 14;
/// `NLM_F_CREATE` (netlink.h): create the element if it does not exist.
pub(super) const NLM_F_CREATE: u16 = 0x400;
/// `NFPROTO_NETDEV` (netfilter.h): the family of a netdev table.
const NFPROTO_NETDEV: u8 = 5;
/// `AF_UNSPEC`: the family of the batch delimiters.
const AF_UNSPEC: u8 = 0;
/// `NFNETLINK_V0`.
const NFNETLINK_V0: u8 = 0;
/// `NFTA_SET_ELEM_LIST_TABLE` (`enum nft_set_elem_list_attributes`).
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
/// `NFTA_SET_ELEM_LIST_SET`.
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
/// `NFTA_SET_ELEM_LIST_ELEMENTS`.
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
/// `NFTA_LIST_ELEM` (`enum nft_list_attributes`).
const NFTA_LIST_ELEM: u16 = 1;
/// `NFTA_SET_ELEM_KEY` (`enum nft_set_elem_attributes`).
const NFTA_SET_ELEM_KEY: u16 = 1;
/// `NFTA_SET_ELEM_DATA`.
const NFTA_SET_ELEM_DATA: u16 = 2;
/// `NFTA_SET_ELEM_TIMEOUT`: be64 milliseconds.
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
/// `NFTA_SET_ELEM_EXPIRATION`: be64 milliseconds.
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
/// `NFTA_DATA_VALUE` (`enum nft_data_attributes`).
const NFTA_DATA_VALUE: u16 = 1;

/// Most elements in one message: an element takes at most 76 bytes, and the elements'
/// nested attribute must stay below 64 KiB (its length is a `u16`).
pub(super) const MAX_ELEMS_PER_MSG: usize = 256;

/// The two sets of a steering table (see the parent module's ruleset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Set {
    /// `frozen`: `ipv4_addr . inet_service`.
    Frozen,
    /// `flows`: `ipv4_addr . inet_service : ipv4_addr`.
    Flows,
}

impl Set {
    /// The set's name in the ruleset.
    pub(super) fn name(self) -> &'static str {
        match self {
            Set::Frozen => "frozen",
            Set::Flows => "flows",
        }
    }
}

/// One element operation of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ElemOp {
    /// Add the element, or update the timeout and expiry of an existing one with the same
    /// value (`NFT_MSG_NEWSETELEM` with `NLM_F_CREATE`).
    Add {
        /// Which set.
        set: Set,
        /// The key: the client's address and port.
        client: SocketAddrV4,
        /// The map's value (the backend host); `None` in the `frozen` set.
        value: Option<Ipv4Addr>,
        /// Timeout in ms; `None` takes the set's default.
        timeout_ms: Option<u64>,
        /// Time left until expiry in ms; `None` means the whole timeout.
        expires_ms: Option<u64>,
    },
    /// Delete the element (`NFT_MSG_DELSETELEM`, key only); fails if it does not exist.
    Delete {
        /// Which set.
        set: Set,
        /// The key.
        client: SocketAddrV4,
    },
}

impl ElemOp {
    fn set(&self) -> Set {
        match self {
            ElemOp::Add { set, .. } | ElemOp::Delete { set, .. } => *set,
        }
    }

    fn client(&self) -> SocketAddrV4 {
        match self {
            ElemOp::Add { client, .. } | ElemOp::Delete { client, .. } => *client,
        }
    }

    fn msg_type(&self) -> u16 {
        match self {
            ElemOp::Add { .. } => NFT_MSG_NEWSETELEM,
            ElemOp::Delete { .. } => NFT_MSG_DELSETELEM,
        }
    }
}

/// The operation as the equivalent `nft` command without the `... netdev TABLE` part, for
/// messages and tests: `add element flows { 10.0.0.1 . 4000 timeout 5000ms expires 1ms :
/// 10.1.0.2 }`.
impl fmt::Display for ElemOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElemOp::Add {
                set,
                client,
                value,
                timeout_ms,
                expires_ms,
            } => {
                write!(
                    f,
                    "add element {} {{ {} . {}",
                    set.name(),
                    client.ip(),
                    client.port()
                )?;
                if let Some(t) = timeout_ms {
                    write!(f, " timeout {t}ms")?;
                }
                if let Some(e) = expires_ms {
                    write!(f, " expires {e}ms")?;
                }
                if let Some(v) = value {
                    write!(f, " : {v}")?;
                }
                f.write_str(" }")
            }
            ElemOp::Delete { set, client } => write!(
                f,
                "delete element {} {{ {} . {} }}",
                set.name(),
                client.ip(),
                client.port()
            ),
        }
    }
}

/// The key of `ipv4_addr . inet_service`: each field padded to 4 bytes (registers are
/// 32 bits), the port in network order.
pub(super) fn key_bytes(client: SocketAddrV4) -> [u8; 8] {
    let [a, b, c, d] = client.ip().octets();
    let [p0, p1] = client.port().to_be_bytes();
    [a, b, c, d, p0, p1, 0, 0]
}

/// A batch delimiter (`NFNL_MSG_BATCH_BEGIN`/`_END`) for the nftables subsystem.
fn delimiter(ty: u16, seq: u32) -> Vec<u8> {
    let mut msg = MsgBuilder::new(ty, NLM_F_REQUEST, seq);
    let [r0, r1] = NFNL_SUBSYS_NFTABLES.to_be_bytes();
    msg.put(&[AF_UNSPEC, NFNETLINK_V0, r0, r1]);
    msg.finish()
}

/// One `NEWSETELEM`/`DELSETELEM` message with `elems` (all of the same kind and set), with
/// `NLM_F_ACK`.
pub(super) fn elem_message(table: &str, elems: &[ElemOp], seq: u32) -> Vec<u8> {
    let Some(first) = elems.first() else {
        return Vec::new();
    };
    let ty = first.msg_type();
    let mut flags = NLM_F_REQUEST | NLM_F_ACK;
    if ty == NFT_MSG_NEWSETELEM {
        flags |= NLM_F_CREATE;
    }
    let mut msg = MsgBuilder::new((NFNL_SUBSYS_NFTABLES << 8) | ty, flags, seq);
    msg.put(&[NFPROTO_NETDEV, NFNETLINK_V0, 0, 0]);
    msg.attr(NFTA_SET_ELEM_LIST_TABLE, &nul_terminated(table));
    msg.attr(NFTA_SET_ELEM_LIST_SET, &nul_terminated(first.set().name()));
    msg.begin_nest(NFTA_SET_ELEM_LIST_ELEMENTS);
    for op in elems {
        msg.begin_nest(NFTA_LIST_ELEM);
        let (client, value) = match *op {
            ElemOp::Add {
                client,
                value,
                timeout_ms,
                expires_ms,
                ..
            } => {
                if let Some(t) = timeout_ms {
                    msg.attr(NFTA_SET_ELEM_TIMEOUT, &t.to_be_bytes());
                }
                if let Some(e) = expires_ms {
                    msg.attr(NFTA_SET_ELEM_EXPIRATION, &e.to_be_bytes());
                }
                (client, value)
            }
            ElemOp::Delete { client, .. } => (client, None),
        };
        msg.begin_nest(NFTA_SET_ELEM_KEY);
        msg.attr(NFTA_DATA_VALUE, &key_bytes(client));
        msg.end_nest();
        if let Some(v) = value {
            msg.begin_nest(NFTA_SET_ELEM_DATA);
            msg.attr(NFTA_DATA_VALUE, &v.octets());
            msg.end_nest();
        }
        msg.end_nest();
    }
    msg.end_nest();
    msg.finish()
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

/// Groups `ops` into as few messages as order allows: each operation joins the first
/// message of its set and kind (not full) that comes no earlier than the last message
/// touching the same element, so the operations on one element keep their order (the kernel
/// runs messages, and elements within one, in order) while operations on different elements
/// share messages. A batch of steers is thus one message per set, and any number of moves
/// (add old, delete, add new) three messages for `flows`: few acknowledgements to read.
pub(super) fn group(ops: &[ElemOp]) -> Vec<Vec<ElemOp>> {
    let mut msgs: Vec<Vec<ElemOp>> = Vec::new();
    let mut last_touch: HashMap<(Set, SocketAddrV4), usize> = HashMap::new();
    for op in ops {
        let key = (op.set(), op.client());
        let from = last_touch.get(&key).copied().unwrap_or(0);
        let fits = |m: &Vec<ElemOp>| {
            m.first()
                .is_some_and(|f| f.set() == op.set() && f.msg_type() == op.msg_type())
                && m.len() < MAX_ELEMS_PER_MSG
        };
        let index = match msgs.iter().skip(from).position(fits) {
            Some(i) => from + i,
            None => {
                msgs.push(Vec::new());
                msgs.len() - 1
            }
        };
        if let Some(m) = msgs.get_mut(index) {
            m.push(*op);
        }
        last_touch.insert(key, index);
    }
    msgs
}

/// One encoded transaction.
#[derive(Debug)]
pub(super) struct Batch {
    /// The datagram: batch begin, the element messages, batch end.
    pub bytes: Vec<u8>,
    /// The batch begin's sequence number; the element messages follow it.
    pub begin: u32,
    /// The element messages, as sent (for error messages).
    pub msgs: Vec<Vec<ElemOp>>,
}

/// Encodes `ops` on `table` as one batch with sequence numbers from `next_seq`.
pub(super) fn encode(table: &str, ops: &[ElemOp], mut next_seq: impl FnMut() -> u32) -> Batch {
    let msgs = group(ops);
    let begin = next_seq();
    let mut bytes = delimiter(NFNL_MSG_BATCH_BEGIN, begin);
    for m in &msgs {
        bytes.extend_from_slice(&elem_message(table, m, next_seq()));
    }
    bytes.extend_from_slice(&delimiter(NFNL_MSG_BATCH_END, next_seq()));
    Batch { bytes, begin, msgs }
}

/// The element socket of one steering worker, opened in the network namespace of the `nft`
/// child that built the ruleset (for `ip netns exec NS nft`, that namespace).
#[derive(Debug)]
pub(super) struct ElemSocket {
    /// The namespace to open the socket in, if it is not the process's own.
    netns: Option<File>,
    /// The socket; `None` after a failure until the next transaction reopens it.
    sock: Option<NlSocket>,
}

impl ElemSocket {
    /// Opens the socket in the network namespace of process `pid` (the `nft` child), or in
    /// our own if `pid` is `None`, ours, or its namespace cannot be read.
    pub(super) fn open(pid: Option<u32>) -> Result<ElemSocket, SteerError> {
        let netns = pid.and_then(|pid| {
            let theirs = File::open(format!("/proc/{pid}/ns/net")).ok()?;
            let (t, o) = (
                theirs.metadata().ok()?,
                std::fs::metadata("/proc/thread-self/ns/net").ok()?,
            );
            (t.dev() != o.dev() || t.ino() != o.ino()).then_some(theirs)
        });
        let mut s = ElemSocket { netns, sock: None };
        s.sock = Some(s.open_socket()?);
        Ok(s)
    }

    fn open_socket(&self) -> Result<NlSocket, SteerError> {
        let opened = match &self.netns {
            None => NlSocket::open(SockProtocol::NetlinkNetFilter),
            // A socket stays in the namespace it was created in: create it on a short-lived
            // thread that first enters the namespace.
            Some(ns) => std::thread::scope(|scope| {
                let entered = scope.spawn(|| {
                    nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                        .map_err(io::Error::from)?;
                    NlSocket::open(SockProtocol::NetlinkNetFilter)
                });
                entered
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
            }),
        };
        opened.map_err(|e| match e.raw_os_error() {
            Some(code) if code == Errno::EPERM as i32 => SteerError::Permission {
                message: format!("netlink socket: {e}"),
            },
            _ => SteerError::Process(format!("cannot open a NETLINK_NETFILTER socket: {e}")),
        })
    }

    /// Runs `ops` on `table` as one transaction (all or nothing).
    pub(super) fn run(&mut self, table: &str, ops: &[ElemOp]) -> Result<(), SteerError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut sock = match self.sock.take() {
            Some(s) => s,
            None => self.open_socket()?,
        };
        let batch = encode(table, ops, || sock.next_seq());
        let answer = sock
            .send(&batch.bytes)
            .and_then(|()| sock.batch_acks(batch.begin, batch.msgs.len()));
        match answer {
            Ok(Ok(())) => {
                self.sock = Some(sock);
                Ok(())
            }
            Ok(Err((index, code))) => {
                self.sock = Some(sock);
                Err(batch_error(table, &batch.msgs, index, code))
            }
            // The socket is in an unknown state: the next transaction opens a new one.
            Err(e) => Err(SteerError::Process(format!("nftables netlink: {e}"))),
        }
    }
}

/// The error of a failed batch: `index` is the element message the kernel refused (`None`:
/// the batch itself), `code` its negative errno.
pub(super) fn batch_error(
    table: &str,
    msgs: &[Vec<ElemOp>],
    index: Option<usize>,
    code: i32,
) -> SteerError {
    let errno = Errno::from_raw(code.saturating_neg());
    let err = io::Error::from_raw_os_error(errno as i32);
    let what = match index.and_then(|i| msgs.get(i)) {
        Some(m) => {
            let first = m.first().map(ToString::to_string).unwrap_or_default();
            let more = if m.len() > 1 {
                format!(" and {} more", m.len() - 1)
            } else {
                String::new()
            };
            format!("{first}{more}")
        }
        None => "the batch".to_owned(),
    };
    let message = format!("nftables refused {what} in table netdev {table}: {err} [{errno:?}]");
    if errno == Errno::EPERM {
        SteerError::Permission { message }
    } else {
        SteerError::Command { message }
    }
}
