//! Netlink framing shared by sock_diag and ctnetlink: building a request message with its
//! (possibly nested) attributes, and splitting a reply buffer into messages and attributes.
//!
//! Layouts follow include/uapi/linux/netlink.h: `struct nlmsghdr` (`u32` length including
//! the header, `u16` type, `u16` flags, `u32` sequence, `u32` port id, all native endian),
//! `struct nlattr` (`u16` length including its 4-byte header, `u16` type), every message and
//! attribute padded to 4 bytes, `struct nlmsgerr` (an `i32` negative errno or 0, then the
//! request's header). Every read is bounds-checked: a malformed reply is a [`WireError`],
//! never a panic.

use thiserror::Error;

/// `sizeof(struct nlmsghdr)`.
pub(crate) const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct nlattr)`.
pub(crate) const NLA_HDRLEN: usize = 4;

/// `NLMSG_NOOP`: nothing, skip it.
pub(crate) const NLMSG_NOOP: u16 = 1;
/// `NLMSG_ERROR`: an error or, with code 0, an acknowledgement.
pub(crate) const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: the end of a multipart (dump) reply.
pub(crate) const NLMSG_DONE: u16 = 3;
/// `NLMSG_OVERRUN`: data lost.
pub(crate) const NLMSG_OVERRUN: u16 = 4;

/// `NLM_F_REQUEST`: a request (always set on what we send).
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_MULTI`: part of a multipart reply, ended by `NLMSG_DONE`.
pub(crate) const NLM_F_MULTI: u16 = 0x2;
/// `NLM_F_ACK`: ask for an acknowledgement (`NLMSG_ERROR` with code 0) on success.
pub(crate) const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`): dump every matching object.
pub(crate) const NLM_F_DUMP: u16 = 0x300;

/// `NLA_F_NESTED`: the attribute's payload is itself a list of attributes.
pub(crate) const NLA_F_NESTED: u16 = 0x8000;
/// The bits of `nla_type` that are the type (without `NLA_F_NESTED`/`NLA_F_NET_BYTEORDER`).
pub(crate) const NLA_TYPE_MASK: u16 = 0x3fff;

/// A reply that does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum WireError {
    /// Fewer bytes than a header or a fixed structure needs.
    #[error("netlink reply truncated: {what} needs {need} bytes, {have} left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes there were.
        have: usize,
    },
    /// A length field smaller than its own header or running past the buffer.
    #[error("netlink {what} length {len} is invalid with {have} bytes left")]
    BadLength {
        /// `message` or `attribute`.
        what: &'static str,
        /// The length field.
        len: usize,
        /// Bytes left in the buffer.
        have: usize,
    },
    /// `NLMSG_OVERRUN`: the kernel lost part of the reply.
    #[error("netlink reply overrun: messages were lost")]
    Overrun,
}

impl From<WireError> for std::io::Error {
    fn from(e: WireError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// Rounds `len` up to the netlink alignment (4).
pub(crate) const fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// Reads `N` bytes at `at`, or a [`WireError::Truncated`] naming `what`.
pub(crate) fn bytes_at<const N: usize>(
    buf: &[u8],
    at: usize,
    what: &'static str,
) -> Result<[u8; N], WireError> {
    buf.get(at..at.saturating_add(N))
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .ok_or(WireError::Truncated {
            what,
            need: at.saturating_add(N),
            have: buf.len(),
        })
}

/// Builds one netlink message: header, a fixed family header, then attributes.
#[derive(Debug)]
pub(crate) struct MsgBuilder {
    buf: Vec<u8>,
    /// Offsets of the nested attributes still open.
    nests: Vec<usize>,
}

impl MsgBuilder {
    /// Starts a message of type `ty` with `flags` and sequence number `seq` (port id 0: the
    /// kernel fills in ours).
    pub(crate) fn new(ty: u16, flags: u16, seq: u32) -> MsgBuilder {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by finish()
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
        MsgBuilder {
            buf,
            nests: Vec::new(),
        }
    }

    /// Appends raw bytes (a family header such as `struct inet_diag_req_v2`), padded to 4.
    pub(crate) fn put(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.pad();
    }

    /// Appends one attribute with `payload`, padded to 4 (the length field excludes the
    /// padding).
    pub(crate) fn attr(&mut self, ty: u16, payload: &[u8]) {
        let len = NLA_HDRLEN + payload.len();
        self.buf
            .extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    /// Opens a nested attribute of type `ty` (`NLA_F_NESTED` is added); close it with
    /// [`MsgBuilder::end_nest`].
    pub(crate) fn begin_nest(&mut self, ty: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    /// Closes the innermost open nested attribute: its length covers everything since.
    pub(crate) fn end_nest(&mut self) {
        if let Some(start) = self.nests.pop() {
            let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    /// The finished message, its length field set (open nests are closed first).
    pub(crate) fn finish(mut self) -> Vec<u8> {
        while !self.nests.is_empty() {
            self.end_nest();
        }
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }

    fn pad(&mut self) {
        self.buf.resize(align(self.buf.len()), 0);
    }
}

/// One message of a reply, borrowed from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Msg<'a> {
    /// `nlmsg_type`.
    pub(crate) ty: u16,
    /// `nlmsg_flags`.
    pub(crate) flags: u16,
    /// `nlmsg_seq`: the request's sequence number.
    pub(crate) seq: u32,
    /// The bytes after the header, up to `nlmsg_len`.
    pub(crate) payload: &'a [u8],
}

/// The messages in one received datagram, in order; stops after the first error.
#[derive(Debug)]
pub(crate) struct Messages<'a> {
    rest: &'a [u8],
    failed: bool,
}

/// Splits `buf` (one `recv` worth) into its messages.
pub(crate) fn messages(buf: &[u8]) -> Messages<'_> {
    Messages {
        rest: buf,
        failed: false,
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Msg<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let item = self.parse_one();
        self.failed = item.is_err();
        Some(item)
    }
}

impl<'a> Messages<'a> {
    fn parse_one(&mut self) -> Result<Msg<'a>, WireError> {
        let buf = self.rest;
        let len = u32::from_ne_bytes(bytes_at(buf, 0, "nlmsghdr")?) as usize;
        let ty = u16::from_ne_bytes(bytes_at(buf, 4, "nlmsghdr")?);
        let flags = u16::from_ne_bytes(bytes_at(buf, 6, "nlmsghdr")?);
        let seq = u32::from_ne_bytes(bytes_at(buf, 8, "nlmsghdr")?);
        let _pid: [u8; 4] = bytes_at(buf, 12, "nlmsghdr")?;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(WireError::BadLength {
                what: "message",
                len,
                have: buf.len(),
            });
        }
        let payload = &buf[NLMSG_HDRLEN..len];
        // The last message of a datagram may lack its padding.
        self.rest = buf.get(align(len)..).unwrap_or(&[]);
        Ok(Msg {
            ty,
            flags,
            seq,
            payload,
        })
    }
}

/// The attributes in `buf` (a message's bytes after its fixed header, or a nested
/// attribute's payload), as `(type without flags, payload)`; stops after the first error.
#[derive(Debug)]
pub(crate) struct Attrs<'a> {
    rest: &'a [u8],
    failed: bool,
}

/// Splits `buf` into attributes.
pub(crate) fn attrs(buf: &[u8]) -> Attrs<'_> {
    Attrs {
        rest: buf,
        failed: false,
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let buf = self.rest;
        let item = (|| {
            let len = u16::from_ne_bytes(bytes_at(buf, 0, "nlattr")?) as usize;
            let ty = u16::from_ne_bytes(bytes_at(buf, 2, "nlattr")?);
            if len < NLA_HDRLEN || len > buf.len() {
                return Err(WireError::BadLength {
                    what: "attribute",
                    len,
                    have: buf.len(),
                });
            }
            self.rest = buf.get(align(len)..).unwrap_or(&[]);
            Ok((ty & NLA_TYPE_MASK, &buf[NLA_HDRLEN..len]))
        })();
        self.failed = item.is_err();
        Some(item)
    }
}

/// The code of an `NLMSG_ERROR` (0 = acknowledgement, else a negative errno) or of an
/// `NLMSG_DONE` that carries one.
pub(crate) fn error_code(payload: &[u8]) -> Result<i32, WireError> {
    Ok(i32::from_ne_bytes(bytes_at(payload, 0, "nlmsgerr")?))
}
