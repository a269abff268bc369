//! Direct server return by TCP hand-off (docs/design.md §6).
//!
//! The key sits inside the stream, so the backend is known only after the handshake; the
//! proxy then hands the established connection itself to an agent on the backend host, which
//! rebuilds it there, and the proxy host steers the flow's later client packets to that host
//! at L2. Replies go straight from the backend host to the client. The pieces:
//! - [`handoff`]: the proxy's side — freeze, dump, ship, steer or fall back — and the table
//!   of handed-off flows until their agents report them closed;
//! - [`link`]: the proxy's control connection to one agent (handshake, multiplexed
//!   hand-offs, heartbeat, retry pause);
//! - [`agent`]: `shardproxy agent`, which rebuilds handed-off connections on a backend host
//!   and gives them to the application (relayed, or passed over a Unix socket);
//! - [`repair`]: freeze an established TCP socket's state with `TCP_REPAIR` and rebuild a
//!   socket from it (on the agent, or back on the proxy when a hand-off fails);
//! - [`control`]: the authenticated, length-prefixed control channel between proxy and
//!   agent (HMAC-SHA256 over every message, nonce and timestamp against replay);
//! - [`steer`]: the proxy host's nftables steering (a frozen-flow drop set and the `fwd` map),
//!   kept up to date in batches by one long-lived `nft` process;
//! - [`fdpass`]: handing a rebuilt connection to the application over a Unix socket
//!   (SCM_RIGHTS), and [`Acceptor`], the application's receiving side;
//! - [`netlink`]: sock_diag (does a passed connection still exist?) and ctnetlink (delete
//!   the proxy host's conntrack entry of a finished flow).

pub mod agent;
pub mod control;
pub mod fdpass;
pub mod handoff;
pub mod link;
pub mod netlink;
pub mod repair;
pub mod steer;

pub use fdpass::Acceptor;
