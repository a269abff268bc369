//! A blocking netlink socket (nix, no `unsafe`): send a request, then read the replies that
//! carry its sequence number, across as many datagrams as the kernel sends.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr,
    SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

use super::wire::{self, Msg, WireError, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN};

/// Receive buffer: one datagram of a dump is at most 32 KiB (the kernel caps a dump's
/// `skb` there, include/linux/netlink.h and net/netlink/af_netlink.c), an ack far less.
const RECV_BUF: usize = 64 << 10;

/// How long one `recv` may wait before the call fails with `TimedOut` (the kernel answers
/// in microseconds; this only bounds a wedged socket).
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// What ends the reply to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Until {
    /// A dump (`NLM_F_DUMP`): data messages, then `NLMSG_DONE` (or an `NLMSG_ERROR`).
    Done,
    /// A request with `NLM_F_ACK`: any data messages, then `NLMSG_ERROR` (code 0 = success).
    Ack,
}

/// One netlink socket of a protocol, bound to a kernel-chosen port id.
#[derive(Debug)]
pub(crate) struct NlSocket {
    fd: OwnedFd,
    buf: Vec<u8>,
    seq: u32,
}

/// An error from the kernel's `NLMSG_ERROR`/`NLMSG_DONE` code (a negative errno).
pub(crate) fn kernel_error(code: i32) -> io::Error {
    match code.checked_neg() {
        Some(errno) if errno > 0 => io::Error::from_raw_os_error(errno),
        _ => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("netlink error code {code} is not a negative errno"),
        ),
    }
}

impl NlSocket {
    /// Opens and binds a netlink socket of `protocol` (`NETLINK_SOCK_DIAG`,
    /// `NETLINK_NETFILTER`), close-on-exec, with a receive timeout.
    pub(crate) fn open(protocol: SockProtocol) -> io::Result<NlSocket> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            protocol,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        let timeout = TimeVal::new(i64::try_from(RECV_TIMEOUT.as_secs()).unwrap_or(5), 0);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
        // Start sequence numbers somewhere arbitrary, so replies meant for an earlier socket
        // with the same port id are not mistaken for ours.
        let seq = std::process::id().wrapping_mul(0x9E37_79B9) ^ 0x5eed;
        Ok(NlSocket {
            fd,
            buf: vec![0; RECV_BUF],
            seq,
        })
    }

    /// Wraps an already open datagram socket (tests feed replies through a socket pair).
    #[cfg(test)]
    pub(crate) fn from_fd(fd: OwnedFd, seq: u32) -> NlSocket {
        NlSocket {
            fd,
            buf: vec![0; RECV_BUF],
            seq,
        }
    }

    /// A fresh sequence number for the next request.
    pub(crate) fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one datagram (one or more whole messages) to the kernel.
    pub(crate) fn send(&self, datagram: &[u8]) -> io::Result<()> {
        let kernel = NetlinkAddr::new(0, 0);
        loop {
            match sendto(self.fd.as_raw_fd(), datagram, &kernel, MsgFlags::empty()) {
                Ok(n) if n == datagram.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "netlink send wrote {n} of {} bytes",
                        datagram.len()
                    )))
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads datagrams and hands each message to `each` until it returns `Ok(true)`.
    fn read_until(&mut self, mut each: impl FnMut(Msg<'_>) -> io::Result<bool>) -> io::Result<()> {
        loop {
            let n = match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_TRUNC) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no netlink reply within the receive timeout",
                    ))
                }
                Err(e) => return Err(e.into()),
            };
            if n > self.buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "netlink datagram of {n} bytes truncated to {}",
                        self.buf.len()
                    ),
                ));
            }
            let datagram = self.buf.get(..n).unwrap_or(&[]);
            for msg in wire::messages(datagram) {
                if each(msg?)? {
                    return Ok(());
                }
            }
        }
    }

    /// Reads the reply to request `seq`, passing each of its data messages to `on_data`,
    /// until `until` ends it. Messages of other sequence numbers (left over from an earlier,
    /// abandoned request) are skipped. A kernel error code becomes the matching
    /// `io::Error` (`raw_os_error()` is the errno).
    pub(crate) fn reply(
        &mut self,
        seq: u32,
        until: Until,
        mut on_data: impl FnMut(Msg<'_>) -> Result<(), WireError>,
    ) -> io::Result<()> {
        self.read_until(|msg| {
            if msg.seq != seq {
                return Ok(false);
            }
            match msg.ty {
                NLMSG_NOOP => Ok(false),
                NLMSG_OVERRUN => Err(WireError::Overrun.into()),
                NLMSG_ERROR => match wire::error_code(msg.payload)? {
                    0 => Ok(true),
                    code => Err(kernel_error(code)),
                },
                // A dump's end; it carries an `int`, negative if the dump failed.
                NLMSG_DONE => match wire::error_code(msg.payload) {
                    Ok(code) if code < 0 => Err(kernel_error(code)),
                    _ => Ok(true),
                },
                _ => {
                    on_data(msg)?;
                    // A request without NLM_F_ACK that is not a dump gets one message.
                    Ok(until == Until::Done && msg.flags & wire::NLM_F_MULTI == 0)
                }
            }
        })
    }

    /// Reads the answer to an nfnetlink batch sent in one datagram: the batch begin with
    /// sequence number `begin`, then `count` messages numbered `begin + 1..` each with
    /// `NLM_F_ACK`, then the batch end. The kernel acknowledges every message (it goes on
    /// after an error, so all errors come back) and reports a failure of the batch itself (no
    /// CAP_NET_ADMIN, a failed commit) on `begin`. `Ok(Err((index, code)))` is the first
    /// error: `index` of the message (`None`: the batch), `code` a negative errno.
    pub(crate) fn batch_acks(
        &mut self,
        begin: u32,
        count: usize,
    ) -> io::Result<Result<(), (Option<usize>, i32)>> {
        let mut acked = vec![false; count];
        let mut left = count;
        let mut failed: Option<(Option<usize>, i32)> = None;
        if count == 0 {
            return Ok(Ok(()));
        }
        self.read_until(|msg| {
            if msg.ty != NLMSG_ERROR {
                return Ok(false);
            }
            let code = wire::error_code(msg.payload)?;
            if msg.seq == begin {
                // The whole batch failed: element acks may follow or not.
                if code != 0 {
                    failed = failed.or(Some((None, code)));
                    return Ok(true);
                }
                return Ok(false);
            }
            let index = msg.seq.wrapping_sub(begin).wrapping_sub(1) as usize;
            if let Some(seen @ false) = acked.get_mut(index) {
                *seen = true;
                left -= 1;
                if code != 0 {
                    failed = failed.or(Some((Some(index), code)));
                }
            }
            Ok(left == 0)
        })?;
        Ok(failed.map_or(Ok(()), Err))
    }

    /// Reads the acknowledgements of `count` requests sent in one datagram with sequence
    /// numbers `first..first + count` (each with `NLM_F_ACK`): one result per request, `Ok`
    /// or the kernel's errno. Data messages are ignored.
    pub(crate) fn acks(&mut self, first: u32, count: usize) -> io::Result<Vec<Result<(), i32>>> {
        let mut results: Vec<Option<Result<(), i32>>> = vec![None; count];
        let mut left = count;
        if left == 0 {
            return Ok(Vec::new());
        }
        self.read_until(|msg| {
            let index = msg.seq.wrapping_sub(first) as usize;
            if index >= count || msg.ty != NLMSG_ERROR {
                return Ok(false);
            }
            let code = wire::error_code(msg.payload)?;
            if let Some(slot @ None) = results.get_mut(index) {
                *slot = Some(if code == 0 { Ok(()) } else { Err(code) });
                left -= 1;
            }
            Ok(left == 0)
        })?;
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or(Err(-(Errno::EIO as i32))))
            .collect())
    }
}
