//! shardproxy: a Layer-4 TCP sharding proxy.
//!
//! A client first sends a small key header; the proxy picks a backend for that key by
//! rendezvous hashing on node names, connects, and splices the two sockets together.
//!
//! Modules, in the order a connection meets them:
//! - [`header`]: the key header wire format and its pure parser.
//! - [`routing`]: the stable rendezvous router (public API: a client can shard by itself).

#![warn(missing_docs)]

pub mod header;
pub mod routing;

pub use header::{HeaderFormat, Parse};
pub use routing::Router;
