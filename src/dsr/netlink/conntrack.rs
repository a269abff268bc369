//! ctnetlink over `NETLINK_NETFILTER`: look up and delete the conntrack entry of one TCP/IPv4
//! flow by its original tuple (include/uapi/linux/netfilter/nfnetlink.h,
//! nfnetlink_conntrack.h, nfnetlink_conntrack.h's `ctattr_*` enums).
//!
//! Request: `nlmsghdr` of type `(NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE` (or
//! `_GET`), flags `NLM_F_REQUEST | NLM_F_ACK`; `struct nfgenmsg { family: AF_INET, version:
//! NFNETLINK_V0, res_id: 0 }`; then
//!
//! ```text
//! CTA_TUPLE_ORIG (nested)
//!     CTA_TUPLE_IP (nested)   { CTA_IP_V4_SRC: client ip, CTA_IP_V4_DST: server ip }
//!     CTA_TUPLE_PROTO (nested){ CTA_PROTO_NUM: 6, CTA_PROTO_SRC_PORT: be16, CTA_PROTO_DST_PORT: be16 }
//! ```
//!
//! Addresses and ports are in network byte order, as the kernel's tuples are. A
//! `IPCTNL_MSG_CT_DELETE` WITHOUT a tuple flushes the whole table, so the tuple is always
//! written (and a unit test pins the exact bytes). Answer: an `NLMSG_ERROR` with 0 (done;
//! a GET first sends the entry) or `-ENOENT` (no such entry). The kernel looks the tuple up
//! in its hash, which holds both directions, so the reversed tuple (server → client) finds
//! the same entry. Needs CAP_NET_ADMIN in the network namespace.

use std::io;
use std::net::SocketAddrV4;

use nix::errno::Errno;
use nix::sys::socket::SockProtocol;

use super::socket::{kernel_error, NlSocket, Until};
use super::wire::{MsgBuilder, NLM_F_ACK, NLM_F_REQUEST};

/// `NFNL_SUBSYS_CTNETLINK`.
pub(crate) const NFNL_SUBSYS_CTNETLINK: u16 = 1;
/// `IPCTNL_MSG_CT_GET`.
pub(crate) const IPCTNL_MSG_CT_GET: u16 = 1;
/// `IPCTNL_MSG_CT_DELETE`.
pub(crate) const IPCTNL_MSG_CT_DELETE: u16 = 2;
/// `NFNETLINK_V0`.
pub(crate) const NFNETLINK_V0: u8 = 0;
/// `AF_INET`.
const AF_INET: u8 = 2;
/// `IPPROTO_TCP`.
const IPPROTO_TCP: u8 = 6;
/// `CTA_TUPLE_ORIG` (`enum ctattr_type`).
pub(crate) const CTA_TUPLE_ORIG: u16 = 1;
/// `CTA_TUPLE_IP` (`enum ctattr_tuple`).
pub(crate) const CTA_TUPLE_IP: u16 = 1;
/// `CTA_TUPLE_PROTO` (`enum ctattr_tuple`).
pub(crate) const CTA_TUPLE_PROTO: u16 = 2;
/// `CTA_IP_V4_SRC` (`enum ctattr_ip`).
pub(crate) const CTA_IP_V4_SRC: u16 = 1;
/// `CTA_IP_V4_DST` (`enum ctattr_ip`).
pub(crate) const CTA_IP_V4_DST: u16 = 2;
/// `CTA_PROTO_NUM` (`enum ctattr_l4proto`).
pub(crate) const CTA_PROTO_NUM: u16 = 1;
/// `CTA_PROTO_SRC_PORT` (`enum ctattr_l4proto`).
pub(crate) const CTA_PROTO_SRC_PORT: u16 = 2;
/// `CTA_PROTO_DST_PORT` (`enum ctattr_l4proto`).
pub(crate) const CTA_PROTO_DST_PORT: u16 = 3;

/// Requests sent in one datagram by [`Conntrack::delete_many`]: their acks (one small
/// `skb` each) must fit the socket's receive buffer.
const BATCH: usize = 64;

/// How often a request answered `EAGAIN` is sent again (nfnetlink answers so once it has
/// just loaded `nf_conntrack_netlink` on demand).
const EAGAIN_RETRIES: usize = 3;

/// The ctnetlink request `op` (`IPCTNL_MSG_CT_GET`/`_DELETE`) for the TCP/IPv4 entry whose
/// original tuple is `client` → `server`.
pub(crate) fn tuple_request(
    op: u16,
    seq: u32,
    client: SocketAddrV4,
    server: SocketAddrV4,
) -> Vec<u8> {
    let mut msg = MsgBuilder::new(
        (NFNL_SUBSYS_CTNETLINK << 8) | op,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
    );
    // struct nfgenmsg: family, version, res_id (be16).
    msg.put(&[AF_INET, NFNETLINK_V0, 0, 0]);
    msg.begin_nest(CTA_TUPLE_ORIG);
    msg.begin_nest(CTA_TUPLE_IP);
    msg.attr(CTA_IP_V4_SRC, &client.ip().octets());
    msg.attr(CTA_IP_V4_DST, &server.ip().octets());
    msg.end_nest();
    msg.begin_nest(CTA_TUPLE_PROTO);
    msg.attr(CTA_PROTO_NUM, &[IPPROTO_TCP]);
    msg.attr(CTA_PROTO_SRC_PORT, &client.port().to_be_bytes());
    msg.attr(CTA_PROTO_DST_PORT, &server.port().to_be_bytes());
    msg.end_nest();
    msg.end_nest();
    msg.finish()
}

/// `Ok(true)` for success, `Ok(false)` for `ENOENT`, else the error.
fn found(result: Result<(), i32>) -> io::Result<bool> {
    match result {
        Ok(()) => Ok(true),
        Err(code) if code == -(Errno::ENOENT as i32) => Ok(false),
        Err(code) => Err(kernel_error(code)),
    }
}

/// One `NETLINK_NETFILTER` socket for repeated conntrack requests (blocking: call it from a
/// thread or `spawn_blocking`). After a failed call the socket is replaced on the next one.
#[derive(Debug)]
pub struct Conntrack {
    sock: Option<NlSocket>,
}

impl Conntrack {
    /// Opens the netlink socket. `EPROTONOSUPPORT` means the kernel has no nfnetlink.
    pub fn open() -> io::Result<Conntrack> {
        Ok(Conntrack {
            sock: Some(NlSocket::open(SockProtocol::NetlinkNetFilter)?),
        })
    }

    fn with_socket<T>(&mut self, f: impl FnOnce(&mut NlSocket) -> io::Result<T>) -> io::Result<T> {
        let mut sock = match self.sock.take() {
            Some(sock) => sock,
            None => NlSocket::open(SockProtocol::NetlinkNetFilter)?,
        };
        let result = f(&mut sock);
        if result.is_ok() {
            self.sock = Some(sock);
        }
        result
    }

    /// Sends `op` for one tuple and reads its answer: `Ok(())` or the kernel's code.
    fn request(
        &mut self,
        op: u16,
        client: SocketAddrV4,
        server: SocketAddrV4,
    ) -> io::Result<Result<(), i32>> {
        self.with_socket(|sock| {
            for _ in 0..EAGAIN_RETRIES {
                let seq = sock.next_seq();
                sock.send(&tuple_request(op, seq, client, server))?;
                match sock.reply(seq, Until::Ack, |_| Ok(())) {
                    Ok(()) => return Ok(Ok(())),
                    Err(e) => match e.raw_os_error() {
                        Some(errno) if errno == Errno::EAGAIN as i32 => continue,
                        // A complete answer from the kernel: the socket stays usable.
                        Some(errno) if errno == Errno::ENOENT as i32 => return Ok(Err(-errno)),
                        _ => return Err(e),
                    },
                }
            }
            Ok(Err(-(Errno::EAGAIN as i32)))
        })
    }

    /// Deletes the conntrack entry whose original tuple is `client` → `server` (TCP, IPv4):
    /// `Ok(true)` deleted, `Ok(false)` there was none (`ENOENT`), `Err` otherwise (`EPERM`
    /// without CAP_NET_ADMIN).
    pub fn delete(&mut self, client: SocketAddrV4, server: SocketAddrV4) -> io::Result<bool> {
        found(self.request(IPCTNL_MSG_CT_DELETE, client, server)?)
    }

    /// Whether the conntrack entry whose original tuple is `client` → `server` exists
    /// (`IPCTNL_MSG_CT_GET`).
    pub fn exists(&mut self, client: SocketAddrV4, server: SocketAddrV4) -> io::Result<bool> {
        found(self.request(IPCTNL_MSG_CT_GET, client, server)?)
    }

    /// Deletes the entries of many flows (`(client, server)` each), up to 64 requests per
    /// datagram: one result per flow, as [`Conntrack::delete`] gives it. The outer `Err` is
    /// a failure of the socket itself.
    pub fn delete_many(
        &mut self,
        flows: &[(SocketAddrV4, SocketAddrV4)],
    ) -> io::Result<Vec<io::Result<bool>>> {
        let mut results = Vec::with_capacity(flows.len());
        for chunk in flows.chunks(BATCH) {
            let codes = self.with_socket(|sock| {
                let mut datagram = Vec::with_capacity(chunk.len() * 72);
                let first = sock.next_seq();
                for (i, &(client, server)) in chunk.iter().enumerate() {
                    let seq = if i == 0 { first } else { sock.next_seq() };
                    datagram.extend_from_slice(&tuple_request(
                        IPCTNL_MSG_CT_DELETE,
                        seq,
                        client,
                        server,
                    ));
                }
                sock.send(&datagram)?;
                sock.acks(first, chunk.len())
            })?;
            results.extend(codes.into_iter().map(found));
        }
        Ok(results)
    }
}

/// Opens a [`Conntrack`] for one call; a kernel without nfnetlink has no entries.
fn one_shot(f: impl FnOnce(&mut Conntrack) -> io::Result<bool>) -> io::Result<bool> {
    match Conntrack::open() {
        Ok(mut ct) => f(&mut ct),
        Err(e) if e.raw_os_error() == Some(Errno::EPROTONOSUPPORT as i32) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes the conntrack entry whose original tuple is `client` → `server` (TCP, IPv4).
/// `Ok(true)` deleted, `Ok(false)` there was none (`ENOENT`, or no nfnetlink in the kernel),
/// `Err` otherwise (`EPERM` without CAP_NET_ADMIN). Opens a socket per call: for many flows
/// keep a [`Conntrack`].
pub fn conntrack_delete(client: SocketAddrV4, server: SocketAddrV4) -> io::Result<bool> {
    one_shot(|ct| ct.delete(client, server))
}

/// Whether the conntrack entry whose original tuple is `client` → `server` (TCP, IPv4)
/// exists (`IPCTNL_MSG_CT_GET`); for tests and diagnostics.
pub fn conntrack_exists(client: SocketAddrV4, server: SocketAddrV4) -> io::Result<bool> {
    one_shot(|ct| ct.exists(client, server))
}
