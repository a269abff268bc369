//! shardproxy: a Layer-4 TCP sharding proxy.
//!
//! A client first sends a small key header; the proxy picks a backend for that key by
//! rendezvous hashing on node names, connects, and splices the two sockets together.
//!
//! Modules, in the order a connection meets them:
//! - [`config`]: every limit and timeout, validated before anything binds.
//! - [`config_file`]: the TOML configuration file (`run --config`, `check`).
//! - [`header`]: the key header wire format and its pure parser (never touches a socket).
//! - [`routing`]: the stable rendezvous [`Router`] — public so a client can shard by itself —
//!   and the [`RoutingTable`](routing::RoutingTable) snapshot the data path reads (router +
//!   addresses).
//! - [`proxy`]: listener, connection phases, splice forwarding, socket options.
//! - [`control`]: the control plane — membership changes (admin API, SIGHUP reload),
//!   health checks, drains — validated, then swapped in whole.
//! - [`metrics`]: metric names in one place and the handles the data path bumps.
//! - `admin`: `/metrics`, `/healthz` and the admin API's routes over HTTP.
//! - [`dsr`]: direct server return: the proxy's hand-off, the agent, and their parts
//!   (TCP_REPAIR, the control channel, steering, fd passing, netlink).
//! - [`error`]: error enums per layer, each classified by side and reason.
//! - [`cli`]: the command-line flags (clap).
//! - `fixtures`: the echo backend and a client that speaks to it, for tests, benchmarks and
//!   the binary's `demo` and `backend` subcommands — hidden from the documented API.

#![warn(missing_docs)]
// `unsafe` only where neither nix nor socket2 has a safe API: two socket calls in
// `proxy::sockopt`, the TCP_REPAIR option/ioctl helpers and the socket filter in
// `dsr::repair` and the adoption
// of a descriptor received over SCM_RIGHTS in `dsr::fdpass`, each allowed where it stands,
// with a `// SAFETY:` comment.
#![deny(unsafe_code)]

mod admin;
pub mod cli;
pub mod config;
pub mod config_file;
pub mod control;
pub mod dsr;
pub mod error;
#[doc(hidden)]
pub mod fixtures;
pub mod header;
pub mod membership;
pub mod metrics;
pub mod proxy;
pub mod routing;

pub use config::{BackendSpec, ProxyConfig};
pub use error::{ConfigError, ConnError, Error};
pub use header::{HeaderFormat, Parse};
pub use proxy::{start, start_with, ProxyHandle, Workers};
pub use routing::Router;
