//! Error types, one enum per layer, each classified for logs and metrics.
//!
//! A connection error knows which [`Side`] caused it (the client, a backend, or the proxy
//! itself) and a `&'static str` reason that is its metric label; the log level follows the
//! side. Configuration errors say what to fix. Nothing here allocates on the data path.

use std::io;
use std::net::SocketAddr;

use crate::header::HeaderError;
use crate::routing::RoutingError;

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something wrong, went silent, or went away.
    Client,
    /// A backend refused, timed out, or broke the connection.
    Backend,
    /// The proxy ran out of something (fds, a limit) or is shutting down.
    Proxy,
}

/// Why a proxied connection ended before its natural close. One log event and one metric per
/// connection come from this.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The key header was malformed or late; no backend was contacted.
    #[error("bad key header: {0}")]
    Header(#[from] HeaderError),
    /// Reading the header failed at the socket level.
    #[error("reading the key header: {0}")]
    HeaderIo(#[source] io::Error),
    /// No backend takes new keys (all drained or none configured).
    #[error("no backend takes new keys")]
    NoBackend,
    /// The proxy could not open a backend connection for want of its own resources (fds,
    /// memory, local ports). Not the backend's fault: no failover, no backend counter.
    #[error("the proxy is short of resources to connect: {0}")]
    Local(#[source] io::Error),
    /// Every backend tried failed to connect.
    #[error(
        "could not connect to a backend after {tries} tries (the last is named as the backend)"
    )]
    ConnectFailed {
        /// How many backends were tried.
        tries: u32,
    },
    /// Forwarding failed: a reset or a socket error on one side.
    #[error("{side:?} side failed while forwarding: {source}")]
    Forward {
        /// The side whose socket failed.
        side: Side,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// Neither direction moved a byte for the idle timeout.
    #[error("idle timeout")]
    Idle,
    /// The proxy shut down before the connection finished.
    #[error("proxy shutting down")]
    Shutdown,
    /// The key's backend has its `max_connections` open; the key is never sent elsewhere.
    #[error("the key's backend is at its max_connections")]
    BackendFull,
    /// With `failover = "none"`, the key's owner is marked down: failed fast, not moved.
    #[error("the key's owner is down and failover is none")]
    BackendDown,
    /// The key changed owner and the owner-change policy is `close`: reset after the grace.
    #[error("the key's owner changed (owner-change policy: close)")]
    OwnerChanged,
}

impl ConnError {
    /// The side that caused this error.
    pub fn side(&self) -> Side {
        match self {
            ConnError::Header(_) | ConnError::HeaderIo(_) | ConnError::Idle => Side::Client,
            ConnError::NoBackend | ConnError::ConnectFailed { .. } => Side::Backend,
            ConnError::Forward { side, .. } => *side,
            ConnError::Local(_)
            | ConnError::Shutdown
            | ConnError::BackendFull
            | ConnError::OwnerChanged => Side::Proxy,
            ConnError::BackendDown => Side::Backend,
        }
    }

    /// Every label [`ConnError::reason`] gives outside the header errors (which have their own
    /// metric), so the counters can be registered once, before any connection.
    pub const REASONS: [&'static str; 11] = [
        "header_io",
        "no_backend",
        "local_resources",
        "connect_failed",
        "client_error",
        "backend_error",
        "idle_timeout",
        "shutdown",
        "backend_full",
        "backend_down",
        "owner_changed",
    ];

    /// A bounded metric label for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnError::Header(e) => e.reason(),
            ConnError::HeaderIo(_) => "header_io",
            ConnError::NoBackend => "no_backend",
            ConnError::Local(_) => "local_resources",
            ConnError::ConnectFailed { .. } => "connect_failed",
            ConnError::Forward {
                side: Side::Client, ..
            } => "client_error",
            ConnError::Forward { .. } => "backend_error",
            ConnError::Idle => "idle_timeout",
            ConnError::Shutdown => "shutdown",
            ConnError::BackendFull => "backend_full",
            ConnError::BackendDown => "backend_down",
            ConnError::OwnerChanged => "owner_changed",
        }
    }
}

/// A configuration or flag that cannot be used. The message says what to fix; the binary
/// exits with code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A `--backend` value is malformed.
    #[error("invalid backend {spec:?}: {why} (expected NAME=HOST:PORT[,weight=N], e.g. b1=127.0.0.1:9001,weight=2)")]
    BackendSpec {
        /// The value as given.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// The membership is not usable.
    #[error("invalid backend set: {0}")]
    Routing(#[from] RoutingError),
    /// No backends were given.
    #[error("no backends: give at least one --backend NAME=HOST:PORT")]
    NoBackends,
    /// A value is out of range or inconsistent with another.
    #[error("invalid {field}: {why}")]
    Invalid {
        /// The flag or setting.
        field: &'static str,
        /// What is wrong and what would be accepted.
        why: String,
    },
}

/// Why the proxy could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// Another I/O failure at start.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_pre_registered() {
        let io = || io::Error::from(io::ErrorKind::Other);
        let all = [
            ConnError::HeaderIo(io()),
            ConnError::NoBackend,
            ConnError::Local(io()),
            ConnError::ConnectFailed { tries: 1 },
            ConnError::Forward {
                side: Side::Client,
                source: io(),
            },
            ConnError::Forward {
                side: Side::Backend,
                source: io(),
            },
            ConnError::Idle,
            ConnError::Shutdown,
            ConnError::BackendFull,
            ConnError::BackendDown,
            ConnError::OwnerChanged,
        ];
        for e in &all {
            assert!(ConnError::REASONS.contains(&e.reason()), "{}", e.reason());
        }
        assert_eq!(all.len(), ConnError::REASONS.len());
    }
}
