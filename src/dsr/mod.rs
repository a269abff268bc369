//! Direct server return by TCP hand-off (docs/design.md §6): the building blocks.
//!
//! The key sits inside the stream, so the backend is known only after the handshake; the
//! proxy then hands the established connection itself to an agent on the backend host, which
//! rebuilds it there, and the proxy host steers the flow's later client packets to that host
//! at L2. Replies go straight from the backend host to the client. The pieces:
//! - [`repair`]: freeze an established TCP socket's state with `TCP_REPAIR` and rebuild a
//!   socket from it (on the agent, or back on the proxy when a hand-off fails);
//! - [`control`]: the authenticated, length-prefixed control channel between proxy and
//!   agent (HMAC-SHA256 over every message, nonce and timestamp against replay);
//! - [`fdpass`]: the zero-hop hand-over of a rebuilt connection to the application: one
//!   `SCM_RIGHTS` message per connection over a Unix socket ([`fdpass::HandoffSender`] on
//!   the agent, [`Acceptor`] in the application);
//! - [`steer`]: the proxy host's nftables steering (a frozen-flow drop set and the `fwd` map),
//!   kept up to date in batches by one long-lived `nft` process.
//!
//! Not built yet: the agent, the proxy's hand-off phase and its fallback, which join these.

pub mod control;
pub mod fdpass;
pub mod netlink;
pub mod repair;
pub mod steer;

pub use fdpass::Acceptor;
