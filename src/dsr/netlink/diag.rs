//! `NETLINK_SOCK_DIAG` for TCP over IPv4: which sockets exist at one local address, with
//! their state and byte counters (include/uapi/linux/inet_diag.h, linux/sock_diag.h,
//! linux/tcp.h).
//!
//! Request: `nlmsghdr` of type `SOCK_DIAG_BY_FAMILY` (20), then `struct inet_diag_req_v2`
//! (56 bytes: family, protocol, extensions bitmask, pad, `u32` states mask, then `struct
//! inet_diag_sockid`: `be16` sport, `be16` dport, `be32 src[4]`, `be32 dst[4]`, `u32` ifindex,
//! `u32 cookie[2]`). A dump (`NLM_F_DUMP`) carries an `INET_DIAG_REQ_BYTECODE` attribute,
//! a one-instruction filter program so the kernel sends only the sockets bound to the local
//! address: `inet_diag_bc_op { code: INET_DIAG_BC_S_COND, yes: 16, no: 20 }` followed by
//! `inet_diag_hostcond { family: AF_INET, prefix_len: 32, port }` and the address: on a
//! match the program jumps to its end (accept), otherwise 4 bytes past it (reject), which is
//! how the kernel's audit (`inet_diag_bc_audit`) wants a final `no`.
//!
//! Reply: per socket one message with `struct inet_diag_msg` (72 bytes: family, state,
//! timer, retrans, the sockid, expires, rqueue, wqueue, uid, inode), then attributes, among
//! them `INET_DIAG_INFO` (2) holding `struct tcp_info`.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

use nix::errno::Errno;
use nix::sys::socket::SockProtocol;

use super::socket::{NlSocket, Until};
use super::wire::{
    self, bytes_at, Msg, MsgBuilder, WireError, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
pub(crate) const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `AF_INET`.
pub(crate) const AF_INET: u8 = 2;
/// `IPPROTO_TCP`.
pub(crate) const IPPROTO_TCP: u8 = 6;
/// `INET_DIAG_REQ_BYTECODE`: the request attribute holding a filter program.
pub(crate) const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// `INET_DIAG_INFO`: the reply attribute holding `struct tcp_info`.
pub(crate) const INET_DIAG_INFO: u16 = 2;
/// `INET_DIAG_BC_S_COND`: "source (local) address/prefix and port match".
pub(crate) const INET_DIAG_BC_S_COND: u8 = 7;
/// `INET_DIAG_NOCOOKIE`: "any socket", in both words of `idiag_cookie`.
pub(crate) const INET_DIAG_NOCOOKIE: u32 = !0;
/// `sizeof(struct inet_diag_msg)`.
pub(crate) const INET_DIAG_MSG_LEN: usize = 72;
/// Offset of `tcpi_bytes_acked` (`u64`) in `struct tcp_info` (linux/tcp.h, since 4.1).
pub(crate) const TCPI_BYTES_ACKED: usize = 120;
/// Offset of `tcpi_bytes_received` (`u64`) in `struct tcp_info` (linux/tcp.h, since 4.1).
pub(crate) const TCPI_BYTES_RECEIVED: usize = 128;

/// `TCP_ESTABLISHED` (include/net/tcp_states.h), as in [`DiagInfo::state`].
pub const TCP_ESTABLISHED: u8 = 1;
/// `TCP_SYN_SENT`.
pub const TCP_SYN_SENT: u8 = 2;
/// `TCP_SYN_RECV`.
pub const TCP_SYN_RECV: u8 = 3;
/// `TCP_FIN_WAIT1`: we closed, our FIN is not acknowledged yet.
pub const TCP_FIN_WAIT1: u8 = 4;
/// `TCP_FIN_WAIT2`: we closed, waiting for the peer's FIN.
pub const TCP_FIN_WAIT2: u8 = 5;
/// `TCP_TIME_WAIT` (never reported by [`SockDiag`]).
pub const TCP_TIME_WAIT: u8 = 6;
/// `TCP_CLOSE` (never reported by [`SockDiag`]).
pub const TCP_CLOSE: u8 = 7;
/// `TCP_CLOSE_WAIT`: the peer closed, the application has not yet.
pub const TCP_CLOSE_WAIT: u8 = 8;
/// `TCP_LAST_ACK`.
pub const TCP_LAST_ACK: u8 = 9;
/// `TCP_LISTEN` (never reported by [`SockDiag`]).
pub const TCP_LISTEN: u8 = 10;
/// `TCP_CLOSING`.
pub const TCP_CLOSING: u8 = 11;
/// `TCP_NEW_SYN_RECV`: a request socket.
pub const TCP_NEW_SYN_RECV: u8 = 12;

/// The states mask of a dump: every state (bits 1..=12) but TIME_WAIT, CLOSE and LISTEN.
pub(crate) const STATES_LIVE: u32 =
    0x1ffe & !((1 << TCP_TIME_WAIT) | (1 << TCP_CLOSE) | (1 << TCP_LISTEN));

/// One socket as sock_diag reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiagInfo {
    /// TCP state (`TCP_ESTABLISHED`, `TCP_CLOSE_WAIT`, ...; the `TCP_*` constants here).
    pub state: u8,
    /// `tcpi_bytes_received`: payload bytes received from the peer (0 if the kernel's
    /// `tcp_info` is too short to hold it).
    pub bytes_received: u64,
    /// `tcpi_bytes_acked`: payload bytes sent and acknowledged by the peer (0 if the
    /// kernel's `tcp_info` is too short to hold it).
    pub bytes_acked: u64,
}

/// One parsed `inet_diag_msg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DiagEntry {
    pub(crate) local: SocketAddrV4,
    pub(crate) remote: SocketAddrV4,
    pub(crate) info: DiagInfo,
}

/// Appends `struct inet_diag_req_v2` for TCP/IPv4 with `states` and the sockid fields.
fn put_req_v2(msg: &mut MsgBuilder, states: u32, local: SocketAddrV4, remote: SocketAddrV4) {
    let mut req = Vec::with_capacity(56);
    req.push(AF_INET); // sdiag_family
    req.push(IPPROTO_TCP); // sdiag_protocol
    req.push(1 << (INET_DIAG_INFO - 1)); // idiag_ext: ask for INET_DIAG_INFO
    req.push(0); // pad
    req.extend_from_slice(&states.to_ne_bytes()); // idiag_states
    req.extend_from_slice(&local.port().to_be_bytes()); // id.idiag_sport
    req.extend_from_slice(&remote.port().to_be_bytes()); // id.idiag_dport
    req.extend_from_slice(&local.ip().octets()); // id.idiag_src[0]
    req.extend_from_slice(&[0; 12]); // id.idiag_src[1..4]
    req.extend_from_slice(&remote.ip().octets()); // id.idiag_dst[0]
    req.extend_from_slice(&[0; 12]); // id.idiag_dst[1..4]
    req.extend_from_slice(&0u32.to_ne_bytes()); // id.idiag_if
    req.extend_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes()); // id.idiag_cookie[0]
    req.extend_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes()); // id.idiag_cookie[1]
    msg.put(&req);
}

/// The dump request for live TCP/IPv4 sockets bound to exactly `local`.
pub(crate) fn dump_request(seq: u32, local: SocketAddrV4) -> Vec<u8> {
    let mut msg = MsgBuilder::new(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq);
    // A dump ignores the sockid; the filter program below selects the local address.
    let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
    put_req_v2(&mut msg, STATES_LIVE, any, any);
    let mut bc = Vec::with_capacity(16);
    bc.push(INET_DIAG_BC_S_COND); // op.code
    bc.push(16); // op.yes: this op's length, i.e. on to the end: accept
    bc.extend_from_slice(&20u16.to_ne_bytes()); // op.no: 4 past the end: reject
    bc.push(AF_INET); // hostcond.family
    bc.push(32); // hostcond.prefix_len
    bc.extend_from_slice(&[0, 0]); // padding before the int
    bc.extend_from_slice(&i32::from(local.port()).to_ne_bytes()); // hostcond.port (host order)
    bc.extend_from_slice(&local.ip().octets()); // hostcond.addr[0] (network order)
    msg.attr(INET_DIAG_REQ_BYTECODE, &bc);
    msg.finish()
}

/// The request for the one socket `local` ↔ `remote` (no dump; acknowledged).
pub(crate) fn lookup_request(seq: u32, local: SocketAddrV4, remote: SocketAddrV4) -> Vec<u8> {
    let mut msg = MsgBuilder::new(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_ACK, seq);
    put_req_v2(&mut msg, STATES_LIVE, local, remote);
    msg.finish()
}

/// Parses one reply message; `None` for a family other than `AF_INET`.
pub(crate) fn parse_diag_msg(payload: &[u8]) -> Result<Option<DiagEntry>, WireError> {
    if payload.len() < INET_DIAG_MSG_LEN {
        return Err(WireError::Truncated {
            what: "inet_diag_msg",
            need: INET_DIAG_MSG_LEN,
            have: payload.len(),
        });
    }
    let [family, state] = bytes_at(payload, 0, "inet_diag_msg")?;
    if family != AF_INET {
        return Ok(None);
    }
    let sport = u16::from_be_bytes(bytes_at(payload, 4, "inet_diag_msg")?);
    let dport = u16::from_be_bytes(bytes_at(payload, 6, "inet_diag_msg")?);
    let src = Ipv4Addr::from(bytes_at::<4>(payload, 8, "inet_diag_msg")?);
    let dst = Ipv4Addr::from(bytes_at::<4>(payload, 24, "inet_diag_msg")?);
    let mut info = DiagInfo {
        state,
        ..DiagInfo::default()
    };
    let rest = payload.get(INET_DIAG_MSG_LEN..).unwrap_or(&[]);
    for attr in wire::attrs(rest) {
        let (ty, data) = attr?;
        if ty == INET_DIAG_INFO {
            // An older kernel's shorter tcp_info lacks the counters: they stay 0.
            if let Ok(b) = bytes_at(data, TCPI_BYTES_ACKED, "tcp_info") {
                info.bytes_acked = u64::from_ne_bytes(b);
            }
            if let Ok(b) = bytes_at(data, TCPI_BYTES_RECEIVED, "tcp_info") {
                info.bytes_received = u64::from_ne_bytes(b);
            }
        }
    }
    Ok(Some(DiagEntry {
        local: SocketAddrV4::new(src, sport),
        remote: SocketAddrV4::new(dst, dport),
        info,
    }))
}

/// Adds the socket a dump message describes to `found` if it is live and bound to `local`.
pub(crate) fn absorb(
    local: SocketAddrV4,
    msg: Msg<'_>,
    found: &mut HashMap<SocketAddrV4, DiagInfo>,
) -> Result<(), WireError> {
    if msg.ty != SOCK_DIAG_BY_FAMILY {
        return Ok(());
    }
    if let Some(entry) = parse_diag_msg(msg.payload)? {
        if entry.local == local && is_live(entry.info.state) {
            found.insert(entry.remote, entry.info);
        }
    }
    Ok(())
}

/// Whether [`SockDiag`] reports a socket in `state`.
fn is_live(state: u8) -> bool {
    (1u32.checked_shl(u32::from(state)).unwrap_or(0)) & STATES_LIVE != 0
}

/// One `NETLINK_SOCK_DIAG` socket for repeated queries (blocking: call it from a thread or
/// `spawn_blocking`). Needs no privilege. After a failed call the socket is replaced on the
/// next one, so an abandoned dump never stalls later queries.
#[derive(Debug)]
pub struct SockDiag {
    sock: Option<NlSocket>,
}

impl SockDiag {
    /// Opens the netlink socket.
    pub fn open() -> io::Result<SockDiag> {
        Ok(SockDiag {
            sock: Some(NlSocket::open(SockProtocol::NetlinkSockDiag)?),
        })
    }

    fn with_socket<T>(&mut self, f: impl FnOnce(&mut NlSocket) -> io::Result<T>) -> io::Result<T> {
        let mut sock = match self.sock.take() {
            Some(sock) => sock,
            None => NlSocket::open(SockProtocol::NetlinkSockDiag)?,
        };
        let result = f(&mut sock);
        if result.is_ok() {
            self.sock = Some(sock);
        }
        result
    }

    /// TCP/IPv4 sockets whose local address is exactly `local`, keyed by remote address, in
    /// every state except TIME_WAIT, CLOSE and LISTEN (the application or the kernel still
    /// has work on them), with their `tcp_info` byte counters. One dump, filtered in the
    /// kernel and again while parsing; thousands of sockets take a few datagrams.
    ///
    /// Only `AF_INET` sockets are seen (a dual-stack `AF_INET6` socket with a mapped address
    /// is not). A dump is not a snapshot: the kernel walks its hash chains across datagrams,
    /// and a socket removed meanwhile may shift another out of the walk, so a flow missing
    /// from one dump should be confirmed (with [`SockDiag::socket`] or the next dump)
    /// before it is treated as ended.
    pub fn sockets_at(
        &mut self,
        local: SocketAddrV4,
    ) -> io::Result<HashMap<SocketAddrV4, DiagInfo>> {
        self.with_socket(|sock| {
            let seq = sock.next_seq();
            sock.send(&dump_request(seq, local))?;
            let mut found = HashMap::new();
            sock.reply(seq, Until::Done, |msg| absorb(local, msg, &mut found))?;
            Ok(found)
        })
    }

    /// The one TCP/IPv4 socket `local` ↔ `remote`, if it exists in a state
    /// [`SockDiag::sockets_at`] reports (an exact lookup by the kernel, no dump).
    pub fn socket(
        &mut self,
        local: SocketAddrV4,
        remote: SocketAddrV4,
    ) -> io::Result<Option<DiagInfo>> {
        self.with_socket(|sock| {
            let seq = sock.next_seq();
            sock.send(&lookup_request(seq, local, remote))?;
            let mut found = None;
            let reply = sock.reply(seq, Until::Ack, |msg| {
                if msg.ty != SOCK_DIAG_BY_FAMILY {
                    return Ok(());
                }
                if let Some(entry) = parse_diag_msg(msg.payload)? {
                    // The kernel's lookup falls back to a listener on `local`: not ours.
                    if entry.local == local && entry.remote == remote && is_live(entry.info.state) {
                        found = Some(entry.info);
                    }
                }
                Ok(())
            });
            match reply {
                // The kernel's answer for "no such socket"; the reply is complete.
                Err(e) if e.raw_os_error() == Some(Errno::ENOENT as i32) => Ok(None),
                Err(e) => Err(e),
                Ok(()) => Ok(found),
            }
        })
    }
}
