//! Netlink queries for direct server return (docs/design.md §6), hand-encoded over a nix
//! netlink socket (no build-time system dependencies, no `unsafe`):
//!
//! - [`SockDiag`] (`NETLINK_SOCK_DIAG`, `inet_diag`): which TCP/IPv4 sockets still exist at a
//!   local address, with state and byte counters. The agent hands a rebuilt socket (local =
//!   VIP:port, remote = client) to the application and keeps no fd, so it learns that a flow
//!   ended by asking the kernel, about once a second, with [`SockDiag::sockets_at`];
//! - [`Conntrack`] (`NETLINK_NETFILTER`, ctnetlink): delete the proxy host's conntrack entry
//!   of a handed-off flow once it ended (it would otherwise linger ESTABLISHED for days),
//!   one flow or a batch at a time; [`conntrack_delete`] and [`conntrack_exists`] for one
//!   call.
//!
//! All calls block (at most a few seconds, the socket's receive timeout): run them on a
//! thread or with `spawn_blocking`. Every reply is parsed with bounds checks; a malformed one
//! is an `io::Error` of kind `InvalidData`, a kernel error the matching errno.
//!
//! Files: `wire.rs` (netlink message and attribute framing), `socket.rs` (the socket and
//! the reply loop: multipart, `NLMSG_DONE`, `NLMSG_ERROR`, sequence numbers), `diag.rs`,
//! `conntrack.rs`, `tests.rs` (encoders and parsers against hand-checked bytes; the
//! root-only tests against the kernel are in `tests/dsr_root_netlink.rs`).

mod conntrack;
mod diag;
pub(crate) mod socket;
pub(crate) mod wire;

#[cfg(test)]
mod tests;

pub use conntrack::{conntrack_delete, conntrack_exists, Conntrack};
pub use diag::{
    DiagInfo, SockDiag, TCP_CLOSE, TCP_CLOSE_WAIT, TCP_CLOSING, TCP_ESTABLISHED, TCP_FIN_WAIT1,
    TCP_FIN_WAIT2, TCP_LAST_ACK, TCP_LISTEN, TCP_NEW_SYN_RECV, TCP_SYN_RECV, TCP_SYN_SENT,
    TCP_TIME_WAIT,
};
