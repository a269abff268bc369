//! The control channel's messages and their body encoding (layout in [`super`]).
//!
//! Pure code: no sockets, no keys. Every length read from the wire is checked against what
//! is left of the (already bounded, already authenticated) body before anything is sliced or
//! allocated, and a body must be consumed exactly: trailing bytes are malformed.

use std::net::SocketAddrV4;

use super::ControlError;

/// Longest backend name a `Handoff` may carry, in bytes (UTF-8).
pub const MAX_BACKEND_LEN: usize = 1024;
/// Longest `Failed` reason, in bytes (UTF-8); longer reasons are cut at a character boundary
/// when sent.
pub const MAX_REASON_LEN: usize = 1024;
/// Most hand-off ids one `Query` or `Alive` carries (the proxy sends larger sets in parts).
pub const MAX_IDS: usize = 65_536;
/// Bytes of one `Query` entry: id, client address, client port.
const QUERY_ENTRY: usize = 8 + 4 + 2;

/// One control-channel message. The proxy sends `Handoff` and `Steered`; the agent answers
/// `Imported` or `Failed`, and reports `Closed` when a handed-off connection ends (the proxy
/// may call a hand-off off after `Imported` with `Abort`); either side
/// may send `Ping`, answered by `Pong`.
#[derive(Clone, PartialEq, Eq)]
pub enum Message {
    /// Liveness probe; the peer answers [`Message::Pong`].
    Ping,
    /// Answer to [`Message::Ping`].
    Pong,
    /// Proxy → agent: rebuild this frozen connection.
    Handoff {
        /// The proxy's id for this hand-off, echoed in every later message about it.
        id: u64,
        /// The backend (node name) whose host rebuilds the connection.
        backend: String,
        /// The frozen socket's state, opaque here (the bytes `dsr::repair` dumps).
        state: Vec<u8>,
        /// Whether the agent drops the key header from the receive queue before handing the
        /// socket to the application.
        strip_header: bool,
    },
    /// Agent → proxy: the socket is rebuilt (still in repair mode, not yet handed over).
    Imported {
        /// The hand-off's id.
        id: u64,
    },
    /// Agent → proxy: the rebuild failed; the proxy rebuilds the socket locally.
    Failed {
        /// The hand-off's id.
        id: u64,
        /// The errno of the failing call, 0 if none.
        errno: i32,
        /// What failed, for logs; at most [`MAX_REASON_LEN`] bytes travel.
        reason: String,
    },
    /// Proxy → agent: the flow is steered to the agent's host; hand the socket over.
    Steered {
        /// The hand-off's id.
        id: u64,
    },
    /// Proxy → agent: the hand-off is called off after `Imported` (steering failed); the
    /// agent discards the rebuilt socket without sending anything to the client.
    Abort {
        /// The hand-off's id.
        id: u64,
    },
    /// Proxy → agent: which of these handed-off connections does the agent still hold?
    /// (The proxy renews a flow's steering only for those: a `Closed` lost with a broken
    /// control connection cannot keep a flow steered forever.)
    Query {
        /// The VIP's port the flows are connected to (the proxy's listener).
        port: u16,
        /// Hand-off ids with their clients' addresses, at most [`MAX_IDS`].
        flows: Vec<(u64, SocketAddrV4)>,
    },
    /// Agent → proxy: the answer to `Query`: the ids among those asked that still live.
    Alive {
        /// Hand-off ids, at most [`MAX_IDS`].
        ids: Vec<u64>,
    },
    /// Agent → proxy: a handed-off connection ended.
    Closed {
        /// The hand-off's id.
        id: u64,
        /// Bytes the application read from the client.
        bytes_from_client: u64,
        /// Bytes the application wrote to the client.
        bytes_to_client: u64,
    },
}

impl std::fmt::Debug for Message {
    // The state is opaque and may be megabytes: show its length only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Ping => f.write_str("Ping"),
            Message::Pong => f.write_str("Pong"),
            Message::Handoff {
                id,
                backend,
                state,
                strip_header,
            } => f
                .debug_struct("Handoff")
                .field("id", id)
                .field("backend", backend)
                .field("state_len", &state.len())
                .field("strip_header", strip_header)
                .finish(),
            Message::Imported { id } => f.debug_struct("Imported").field("id", id).finish(),
            Message::Failed { id, errno, reason } => f
                .debug_struct("Failed")
                .field("id", id)
                .field("errno", errno)
                .field("reason", reason)
                .finish(),
            Message::Steered { id } => f.debug_struct("Steered").field("id", id).finish(),
            Message::Abort { id } => f.debug_struct("Abort").field("id", id).finish(),
            Message::Query { port, flows } => f
                .debug_struct("Query")
                .field("port", port)
                .field("flows", &flows.len())
                .finish(),
            Message::Alive { ids } => f.debug_struct("Alive").field("ids", &ids.len()).finish(),
            Message::Closed {
                id,
                bytes_from_client,
                bytes_to_client,
            } => f
                .debug_struct("Closed")
                .field("id", id)
                .field("bytes_from_client", bytes_from_client)
                .field("bytes_to_client", bytes_to_client)
                .finish(),
        }
    }
}

/// Wire kind codes (the frame's `kind` byte).
pub(crate) mod kind {
    pub const PING: u8 = 1;
    pub const PONG: u8 = 2;
    pub const HANDOFF: u8 = 3;
    pub const IMPORTED: u8 = 4;
    pub const FAILED: u8 = 5;
    pub const STEERED: u8 = 6;
    pub const CLOSED: u8 = 7;
    pub const ABORT: u8 = 8;
    pub const QUERY: u8 = 9;
    pub const ALIVE: u8 = 10;
}

const FLAG_STRIP_HEADER: u8 = 0x01;

impl Message {
    /// The frame's kind byte for this message.
    pub(crate) fn kind(&self) -> u8 {
        match self {
            Message::Ping => kind::PING,
            Message::Pong => kind::PONG,
            Message::Handoff { .. } => kind::HANDOFF,
            Message::Imported { .. } => kind::IMPORTED,
            Message::Failed { .. } => kind::FAILED,
            Message::Steered { .. } => kind::STEERED,
            Message::Closed { .. } => kind::CLOSED,
            Message::Abort { .. } => kind::ABORT,
            Message::Query { .. } => kind::QUERY,
            Message::Alive { .. } => kind::ALIVE,
        }
    }

    /// The encoded body's length, or an error if a field is over its bound.
    pub(crate) fn body_len(&self) -> Result<usize, ControlError> {
        Ok(match self {
            Message::Ping | Message::Pong => 0,
            Message::Handoff { backend, state, .. } => {
                if backend.len() > MAX_BACKEND_LEN {
                    return Err(ControlError::Malformed("backend name too long to send"));
                }
                if u32::try_from(state.len()).is_err() {
                    return Err(ControlError::TooLarge {
                        len: state.len() as u64,
                        max: u32::MAX,
                    });
                }
                8 + 1 + 2 + backend.len() + 4 + state.len()
            }
            Message::Imported { .. } | Message::Steered { .. } | Message::Abort { .. } => 8,
            Message::Failed { reason, .. } => 8 + 4 + 2 + cut_reason(reason).len(),
            Message::Closed { .. } => 24,
            Message::Query { flows, .. } => {
                if flows.len() > MAX_IDS {
                    return Err(ControlError::Malformed("too many flows to send"));
                }
                2 + 4 + QUERY_ENTRY * flows.len()
            }
            Message::Alive { ids } => {
                if ids.len() > MAX_IDS {
                    return Err(ControlError::Malformed("too many ids to send"));
                }
                4 + 8 * ids.len()
            }
        })
    }

    /// Appends the body to `out`; [`Message::body_len`] must have succeeded.
    pub(crate) fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Message::Ping | Message::Pong => {}
            Message::Handoff {
                id,
                backend,
                state,
                strip_header,
            } => {
                out.extend_from_slice(&id.to_be_bytes());
                out.push(if *strip_header { FLAG_STRIP_HEADER } else { 0 });
                // Lengths were checked by body_len; saturate rather than wrap regardless.
                let blen = u16::try_from(backend.len()).unwrap_or(u16::MAX);
                out.extend_from_slice(&blen.to_be_bytes());
                out.extend_from_slice(backend.as_bytes());
                let slen = u32::try_from(state.len()).unwrap_or(u32::MAX);
                out.extend_from_slice(&slen.to_be_bytes());
                out.extend_from_slice(state);
            }
            Message::Imported { id } | Message::Steered { id } | Message::Abort { id } => {
                out.extend_from_slice(&id.to_be_bytes());
            }
            Message::Failed { id, errno, reason } => {
                let reason = cut_reason(reason);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&errno.to_be_bytes());
                let rlen = u16::try_from(reason.len()).unwrap_or(u16::MAX);
                out.extend_from_slice(&rlen.to_be_bytes());
                out.extend_from_slice(reason.as_bytes());
            }
            Message::Closed {
                id,
                bytes_from_client,
                bytes_to_client,
            } => {
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&bytes_from_client.to_be_bytes());
                out.extend_from_slice(&bytes_to_client.to_be_bytes());
            }
            Message::Query { port, flows } => {
                // body_len checked the count.
                out.extend_from_slice(&port.to_be_bytes());
                out.extend_from_slice(&(flows.len() as u32).to_be_bytes());
                for (id, client) in flows {
                    out.extend_from_slice(&id.to_be_bytes());
                    out.extend_from_slice(&client.ip().octets());
                    out.extend_from_slice(&client.port().to_be_bytes());
                }
            }
            Message::Alive { ids } => {
                out.extend_from_slice(&(ids.len() as u32).to_be_bytes());
                for id in ids {
                    out.extend_from_slice(&id.to_be_bytes());
                }
            }
        }
    }

    /// Decodes a body of the given kind. Never panics; any inconsistency is `Malformed`.
    pub(crate) fn decode(kind: u8, body: &[u8]) -> Result<Message, ControlError> {
        let mut r = Reader(body);
        let msg = match kind {
            kind::PING => Message::Ping,
            kind::PONG => Message::Pong,
            kind::HANDOFF => {
                let id = r.u64()?;
                let flags = r.u8()?;
                if flags & !FLAG_STRIP_HEADER != 0 {
                    return Err(ControlError::Malformed("unknown handoff flags"));
                }
                let blen = usize::from(r.u16()?);
                if blen > MAX_BACKEND_LEN {
                    return Err(ControlError::Malformed("backend name too long"));
                }
                let backend = r.utf8(blen, "backend name is not UTF-8")?;
                let slen = r.u32()? as usize;
                let state = r.bytes(slen)?.to_vec();
                Message::Handoff {
                    id,
                    backend,
                    state,
                    strip_header: flags & FLAG_STRIP_HEADER != 0,
                }
            }
            kind::IMPORTED => Message::Imported { id: r.u64()? },
            kind::STEERED => Message::Steered { id: r.u64()? },
            kind::ABORT => Message::Abort { id: r.u64()? },
            kind::QUERY => {
                let port = r.u16()?;
                let n = r.u32()? as usize;
                // The count is checked against what is left before anything is allocated.
                if n > MAX_IDS || r.0.len() != n * QUERY_ENTRY {
                    return Err(ControlError::Malformed("flow list length"));
                }
                let mut flows = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = r.u64()?;
                    let ip = r.u32()?;
                    let cport = r.u16()?;
                    flows.push((id, SocketAddrV4::new(ip.into(), cport)));
                }
                Message::Query { port, flows }
            }
            kind::ALIVE => {
                let n = r.u32()? as usize;
                if n > MAX_IDS || r.0.len() != n * 8 {
                    return Err(ControlError::Malformed("id list length"));
                }
                let ids = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
                Message::Alive { ids }
            }
            kind::FAILED => {
                let id = r.u64()?;
                let errno = r.i32()?;
                let rlen = usize::from(r.u16()?);
                if rlen > MAX_REASON_LEN {
                    return Err(ControlError::Malformed("failure reason too long"));
                }
                let reason = r.utf8(rlen, "failure reason is not UTF-8")?;
                Message::Failed { id, errno, reason }
            }
            kind::CLOSED => Message::Closed {
                id: r.u64()?,
                bytes_from_client: r.u64()?,
                bytes_to_client: r.u64()?,
            },
            _ => return Err(ControlError::Malformed("unknown message kind")),
        };
        if !r.0.is_empty() {
            return Err(ControlError::Malformed("trailing bytes after the message"));
        }
        Ok(msg)
    }
}

/// `reason` cut to at most [`MAX_REASON_LEN`] bytes at a character boundary.
fn cut_reason(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_LEN {
        return reason;
    }
    let mut end = MAX_REASON_LEN;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// A bounds-checked big-endian reader over a body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ControlError> {
        if n > self.0.len() {
            return Err(ControlError::Malformed(
                "message body is shorter than its fields",
            ));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ControlError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, ControlError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, ControlError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ControlError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, ControlError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ControlError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn utf8(&mut self, n: usize, what: &'static str) -> Result<String, ControlError> {
        let b = self.bytes(n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| ControlError::Malformed(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn long_reasons_are_cut_at_a_char_boundary() {
        let reason = "é".repeat(MAX_REASON_LEN); // 2 bytes each
        let msg = Message::Failed {
            id: 1,
            errno: 5,
            reason,
        };
        let mut body = Vec::new();
        msg.encode_body(&mut body);
        assert_eq!(body.len(), msg.body_len().unwrap());
        match Message::decode(kind::FAILED, &body).unwrap() {
            Message::Failed { reason, .. } => {
                assert_eq!(reason.len(), MAX_REASON_LEN);
                assert!(reason.chars().all(|c| c == 'é'));
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn over_long_backend_is_refused_on_send() {
        let msg = Message::Handoff {
            id: 1,
            backend: "b".repeat(MAX_BACKEND_LEN + 1),
            state: vec![],
            strip_header: false,
        };
        assert!(matches!(msg.body_len(), Err(ControlError::Malformed(_))));
    }

    #[test]
    fn trailing_bytes_and_unknown_kinds_are_malformed() {
        assert!(matches!(
            Message::decode(kind::PING, &[0]),
            Err(ControlError::Malformed(_))
        ));
        assert!(matches!(
            Message::decode(200, &[]),
            Err(ControlError::Malformed(_))
        ));
        // A state length pointing past the end of the body.
        let mut body = Vec::new();
        Message::Handoff {
            id: 7,
            backend: "b".into(),
            state: vec![1, 2, 3],
            strip_header: true,
        }
        .encode_body(&mut body);
        let n = body.len();
        body[n - 7..n - 3].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Message::decode(kind::HANDOFF, &body),
            Err(ControlError::Malformed(_))
        ));
    }

    proptest! {
        // The body decoder sees only authenticated bytes, but must still never panic.
        #[test]
        fn decoding_random_bodies_never_panics(
            kind in 0u8..10,
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let _ = Message::decode(kind, &body);
        }
    }
}
