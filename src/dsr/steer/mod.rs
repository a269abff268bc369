//! The proxy host's nftables steering for direct server return (docs/design.md §6): the
//! ruleset is built and removed through ONE long-lived `nft -i` child process per
//! [`Steering`], and its set elements are kept up to date in batches sent directly as
//! nftables netlink transactions.
//!
//! # Ruleset
//!
//! Each proxy instance owns one netdev table, `shardproxy_<instance>` (see [`table_name`]),
//! with an ingress chain on the uplink device (`--dsr-device`). For VIP `192.0.2.10:7000`
//! on `eth0` and the default timeouts:
//!
//! ```text
//! table netdev shardproxy_7000 {
//!     set frozen { type ipv4_addr . inet_service; flags timeout; timeout 5s; }
//!     map flows { type ipv4_addr . inet_service : ipv4_addr; flags timeout; timeout 1h; }
//!     chain ingress {
//!         type filter hook ingress device "eth0" priority 0; policy accept;
//!         ip daddr 192.0.2.10 tcp dport 7000 ip saddr . tcp sport @frozen drop
//!         ip daddr 192.0.2.10 tcp dport 7000 fwd ip to ip saddr . tcp sport map @flows device "eth0"
//!     }
//! }
//! ```
//!
//! A frozen flow's client packets are dropped (the client retransmits them); a steered flow's
//! client packets are forwarded at L2 to the backend host the map names (`fwd` resolves its
//! MAC and lowers the TTL). Both rules also match the VIP's port, so several proxies on one
//! host and device (same VIP, other ports) never act on each other's flows; each has its own
//! table and removes only that. IPv4 only for now.
//!
//! Lifecycle: [`Steering::start`] deletes a leftover table of the same name (the crash
//! cleanup) and creates table, set, map, chain and rules in ONE transaction; the table is
//! deleted by [`Steering::shutdown`], or, best effort, when the [`Steering`] is dropped.
//!
//! Expiry: elements carry the set's default timeout. Frozen entries expire after
//! [`DEFAULT_FROZEN_TIMEOUT`] (a hand-off that neither steered nor unfroze never blocks a
//! client for long); flows after [`SteerConfig::flow_timeout`] (default
//! [`DEFAULT_FLOW_TIMEOUT`]) so entries of a vanished agent or client go away by themselves. A
//! flow that may live longer must be renewed with [`Steering::refresh`] (e.g. on the agent's
//! heartbeat); when a flow expires while its connection still lives, the client's packets
//! reach the proxy host's own stack again, which resets the connection.
//!
//! # Protocol with `nft -i` (ruleset only)
//!
//! `nft -i` runs the start-up and teardown transactions only. It reads one line at a time
//! from stdin and runs each line as one transaction
//! (commands joined with ` ; ` on one line are one netlink batch: all or nothing). On success
//! it prints nothing; on failure it prints `Error: ...`, the line, and a caret line. Its
//! stdout and stderr share one pipe here, so the order is kept. After every batch line the
//! worker writes a sentinel line `shardproxy-sync-<n>`: a syntax error, which nft reports
//! without touching the kernel, echoing the line. Everything read before the sentinel's
//! echo belongs to the batch: nothing means success, anything else is nft's message. The
//! numbered sentinel keeps reader and writer in step; a child that hangs past
//! [`SteerConfig::reply_timeout`] or exits is killed and respawned for the next batch (the
//! table lives in the kernel, not in the child).
//!
//! # Element updates over netlink
//!
//! Freeze, steer, unfreeze, remove and refresh change set elements only. These go out as
//! one nftables netlink batch per transaction on a `NETLINK_NETFILTER` socket of the worker
//! (`nftnl.rs`: batch begin, one `NFT_MSG_NEWSETELEM`/`NFT_MSG_DELSETELEM` per set, batch
//! end, every element message acknowledged): no text is parsed, and nothing grows with the
//! child's age. (nftables 1.0.6 reads `nft -i`'s stdin one byte per `read` and re-parses
//! every line; at ~1000 hand-offs/s the child used 50-70 % of a core, and its transactions
//! slowed from 1.8 to 5.1 ms mean hand-off over 5000 hand-offs.) The socket is created in
//! the network namespace of the `nft` child that built the ruleset (`/proc/PID/ns/net`, so
//! `ip netns exec NS nft` steers in `NS`), right after the start-up transaction. A refused
//! batch is [`SteerError::Command`] naming the element and the errno (EPERM:
//! [`SteerError::Permission`]); a broken socket is [`SteerError::Process`] and is reopened
//! for the next transaction.
//!
//! Every operation is written to succeed whatever the element's state, since one failing
//! operation would abort its whole batch. Elements are not deleted on the hot path: a
//! transaction that deletes a committed element costs 10-20 ms on kernel 6.18 (an RCU grace
//! period) and stalls every transaction behind it, which put 20 ms into hand-offs. Instead
//! every add states the element's `timeout` and `expires` (the kernel updates an existing
//! element's expiry in place), and an unfreeze or a removal re-adds the element with
//! `expires 1ms`: it stops matching at once and the kernel's garbage collection frees it.
//! The one delete left — a key steered to another host while its old element may linger —
//! is preceded by an add of the same element (`NFT_MSG_DESTROYSETELEM`, which does not fail
//! on a missing element, needs kernel 6.3).
//! Concurrent requests are joined into one batch (up to [`MAX_BATCH`]); if such a batch still
//! fails, each request is retried alone so every caller gets its own result.
//!
//! Measured (kernel 6.18, nftables 1.0.6, 2-core VM shared with other builds): 1000 hand-offs
//! issued one request at a time (`latency_of_1000_cycles` in `tests/dsr_root_steer.rs`, test
//! profile) cost 13 µs per freeze, 16 µs per steer, 13 µs per remove over netlink, each a
//! whole transaction with the thread hops, against 0.43-0.47 ms each through `nft -i` and
//! 3.8 ms per forked `nft`.
//!
//! The proxy's conntrack entry of a removed flow is deleted elsewhere, over ctnetlink
//! ([`crate::dsr::netlink`]), by the proxy's flow table ([`crate::dsr::handoff`]). The
//! proxy freezes a socket with a socket filter ([`crate::dsr::repair::block_input`]), so the
//! `frozen` set is not on its hot path; it stays for callers that must freeze a flow they do
//! not hold a socket for, and `steer` still clears it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

/// Default lifetime of a frozen entry: a hand-off lasts milliseconds, so an entry still
/// there after 5 s belongs to a hand-off that failed without unfreezing.
pub const DEFAULT_FROZEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Default lifetime of a flow entry unless refreshed (see the module docs).
pub const DEFAULT_FLOW_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default time to wait for `nft` to answer one ruleset transaction before it is killed and
/// respawned.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Most requests joined into one transaction.
pub const MAX_BATCH: usize = 128;

const SENTINEL_PREFIX: &str = "shardproxy-sync-";
/// The kernel's limit for nftables object names (NFT_NAME_MAXLEN), less the terminator.
const MAX_NAME_LEN: usize = 255;
/// The kernel's limit for interface names (IFNAMSIZ), less the terminator.
const MAX_DEVICE_LEN: usize = 15;

/// Errors of the nftables steering.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    /// The `nft` program (or the configured command) could not be started.
    #[error(
        "cannot run `{program}`: {source}; install nftables (Debian/Ubuntu package `nftables`)"
    )]
    NftMissing {
        /// The program that failed to start.
        program: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// nft or the kernel (EPERM) refused for lack of privileges: steering needs
    /// CAP_NET_ADMIN.
    #[error("nftables refused (steering needs root or CAP_NET_ADMIN): {message}")]
    Permission {
        /// nft's message.
        message: String,
    },
    /// nft ran the batch and reported an error, or the kernel refused an element batch.
    #[error("nft command failed: {message}")]
    Command {
        /// nft's message (error lines and the failing line, shortened), or the refused
        /// element operation and the errno.
        message: String,
    },
    /// The nft child exited, hung or could not be written to, or the netlink socket failed
    /// (no answer, cannot be opened).
    #[error("nft process: {0}")]
    Process(String),
    /// A setting cannot be used in an nftables ruleset (name, device, timeout).
    #[error("invalid steering setting: {0}")]
    Invalid(String),
    /// [`Steering::refresh`] for a flow this instance has not steered.
    #[error("flow {0} is not steered")]
    NotSteered(SocketAddrV4),
    /// The steering was shut down.
    #[error("steering is shut down")]
    Closed,
}

impl SteerError {
    /// A copy for every caller of a failed batch (`io::Error` is not `Clone`).
    fn replicate(&self) -> SteerError {
        match self {
            SteerError::NftMissing { program, source } => SteerError::NftMissing {
                program: program.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            SteerError::Permission { message } => SteerError::Permission {
                message: message.clone(),
            },
            SteerError::Command { message } => SteerError::Command {
                message: message.clone(),
            },
            SteerError::Process(m) => SteerError::Process(m.clone()),
            SteerError::Invalid(m) => SteerError::Invalid(m.clone()),
            SteerError::NotSteered(c) => SteerError::NotSteered(*c),
            SteerError::Closed => SteerError::Closed,
        }
    }
}

/// The table name of a proxy instance: `shardproxy_` and the instance name (e.g. its listen
/// port), with every character outside `[A-Za-z0-9_]` replaced by `_`, so that several
/// proxies on one host each get their own table.
pub fn table_name(instance: &str) -> String {
    let mut name = String::from("shardproxy_");
    name.extend(instance.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '_'
        }
    }));
    name.truncate(MAX_NAME_LEN);
    name
}

/// Everything a [`Steering`] needs; [`SteerConfig::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct SteerConfig {
    /// The netdev table this instance owns (see [`table_name`]); `[A-Za-z_][A-Za-z0-9_]*`.
    pub table: String,
    /// The uplink device whose ingress the chain hooks (`--dsr-device`).
    pub device: String,
    /// The virtual IP and port clients connect to.
    pub vip: SocketAddrV4,
    /// Lifetime of a frozen entry (at least 1 ms, whole milliseconds).
    pub frozen_timeout: Duration,
    /// Lifetime of a flow entry unless refreshed (at least 1 ms, whole milliseconds).
    pub flow_timeout: Duration,
    /// How long to wait for nft to answer one ruleset transaction (element transactions over
    /// netlink are bounded by the socket's 5 s receive timeout).
    pub reply_timeout: Duration,
    /// The program and arguments that run nft, without `-i` (default `["nft"]`; tests use
    /// `["ip", "netns", "exec", NAME, "nft"]`). The element updates' netlink socket is opened
    /// in the network namespace of the process this starts.
    pub command: Vec<String>,
}

impl SteerConfig {
    /// Settings with the default timeouts and the `nft` found in `PATH`.
    pub fn new(table: impl Into<String>, device: impl Into<String>, vip: SocketAddrV4) -> Self {
        SteerConfig {
            table: table.into(),
            device: device.into(),
            vip,
            frozen_timeout: DEFAULT_FROZEN_TIMEOUT,
            flow_timeout: DEFAULT_FLOW_TIMEOUT,
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
            command: vec!["nft".to_owned()],
        }
    }

    fn validate(&self) -> Result<(), SteerError> {
        let t = &self.table;
        let first_ok = t
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok
            || t.len() > MAX_NAME_LEN
            || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(SteerError::Invalid(format!(
                "table name {t:?}: want [A-Za-z_][A-Za-z0-9_]*, at most {MAX_NAME_LEN} characters"
            )));
        }
        let d = &self.device;
        if d.is_empty()
            || d.len() > MAX_DEVICE_LEN
            || !d
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(SteerError::Invalid(format!(
                "device name {d:?}: want 1-{MAX_DEVICE_LEN} characters of [A-Za-z0-9_.-]"
            )));
        }
        for (what, d) in [
            ("frozen timeout", self.frozen_timeout),
            ("flow timeout", self.flow_timeout),
        ] {
            if d.as_millis() == 0 {
                return Err(SteerError::Invalid(format!("{what} must be at least 1 ms")));
            }
        }
        if self.command.is_empty() {
            return Err(SteerError::Invalid("empty nft command".to_owned()));
        }
        Ok(())
    }

    /// The start-up transaction: drop a leftover table of this name, then build it anew.
    fn setup_line(&self) -> String {
        let t = &self.table;
        let dev = &self.device;
        let vip = self.vip.ip();
        let port = self.vip.port();
        let frozen = self.frozen_timeout.as_millis();
        let flows = self.flow_timeout.as_millis();
        [
            format!("add table netdev {t}"),
            format!("delete table netdev {t}"),
            format!("add table netdev {t}"),
            format!(
                "add set netdev {t} frozen {{ type ipv4_addr . inet_service ; flags timeout ; timeout {frozen}ms ; }}"
            ),
            format!(
                "add map netdev {t} flows {{ type ipv4_addr . inet_service : ipv4_addr ; flags timeout ; timeout {flows}ms ; }}"
            ),
            format!(
                "add chain netdev {t} ingress {{ type filter hook ingress device \"{dev}\" priority 0 ; policy accept ; }}"
            ),
            format!(
                "add rule netdev {t} ingress ip daddr {vip} tcp dport {port} ip saddr . tcp sport @frozen drop"
            ),
            format!(
                "add rule netdev {t} ingress ip daddr {vip} tcp dport {port} fwd ip to ip saddr . tcp sport map @flows device \"{dev}\""
            ),
        ]
        .join(" ; ")
    }

    /// Deletes the table whether or not it is still there.
    fn teardown_line(&self) -> String {
        let t = &self.table;
        format!("add table netdev {t} ; delete table netdev {t}")
    }
}

/// One change of the steering state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Freeze(SocketAddrV4),
    Steer(SocketAddrV4, Ipv4Addr),
    Unfreeze(SocketAddrV4),
    Remove(SocketAddrV4),
    Refresh(SocketAddrV4),
}

type Reply = oneshot::Sender<Result<(), SteerError>>;

enum Msg {
    Op(Op, Reply),
    Shutdown(Reply),
}

/// The proxy host's nftables steering of one proxy instance (see the module docs).
///
/// All methods may be called concurrently (share it in an `Arc`); requests that arrive while
/// a transaction runs are joined into the next one. nft and the netlink socket are driven by
/// a dedicated thread, so no method blocks the async runtime, except `Drop`, which waits for
/// the table to be deleted (one nft transaction, bounded by [`SteerConfig::reply_timeout`]).
#[derive(Debug)]
pub struct Steering {
    tx: mpsc::UnboundedSender<Msg>,
    worker: Option<JoinHandle<()>>,
    table: String,
}

impl Steering {
    /// Starts steering with table `table`, ingress hook on `device`, for clients of `vip`,
    /// with the default timeouts and `nft` from `PATH`.
    pub async fn start(
        table: &str,
        device: &str,
        vip: SocketAddrV4,
    ) -> Result<Steering, SteerError> {
        Steering::start_with(SteerConfig::new(table, device, vip)).await
    }

    /// Starts steering with explicit settings: spawns `nft -i`, deletes a leftover table of
    /// the same name and creates the ruleset in one transaction.
    pub async fn start_with(config: SteerConfig) -> Result<Steering, SteerError> {
        config.validate()?;
        let table = config.table.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let worker = std::thread::Builder::new()
            .name("dsr-steer".to_owned())
            .spawn(move || worker_main(config, rx, ready_tx))
            .map_err(|e| SteerError::Process(format!("cannot start the steering thread: {e}")))?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(Steering {
                tx,
                worker: Some(worker),
                table,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SteerError::Process("steering thread ended".to_owned())),
        }
    }

    /// The nftables table this instance owns.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Drops `client`'s packets to the VIP until it is steered or unfrozen (or the frozen
    /// timeout passes).
    pub async fn freeze(&self, client: SocketAddrV4) -> Result<(), SteerError> {
        self.request(Op::Freeze(client)).await
    }

    /// Forwards `client`'s packets to `backend_host`, and unfreezes it, in one transaction. A
    /// flow already steered elsewhere is moved.
    pub async fn steer(
        &self,
        client: SocketAddrV4,
        backend_host: Ipv4Addr,
    ) -> Result<(), SteerError> {
        self.request(Op::Steer(client, backend_host)).await
    }

    /// Lets `client`'s packets through again (the hand-off failed; the proxy keeps the
    /// connection). No error if it was not frozen.
    pub async fn unfreeze(&self, client: SocketAddrV4) -> Result<(), SteerError> {
        self.request(Op::Unfreeze(client)).await
    }

    /// Forgets `client`'s flow (the agent reported the close). No error if it is gone
    /// already.
    pub async fn remove(&self, client: SocketAddrV4) -> Result<(), SteerError> {
        self.request(Op::Remove(client)).await
    }

    /// Restarts the flow timeout of `client`'s flow (re-adding it if it expired).
    pub async fn refresh(&self, client: SocketAddrV4) -> Result<(), SteerError> {
        self.request(Op::Refresh(client)).await
    }

    /// Deletes the table and stops the nft child; later calls return [`SteerError::Closed`].
    pub async fn shutdown(&self) -> Result<(), SteerError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Shutdown(reply))
            .map_err(|_| SteerError::Closed)?;
        rx.await.map_err(|_| SteerError::Closed)?
    }

    async fn request(&self, op: Op) -> Result<(), SteerError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Op(op, reply))
            .map_err(|_| SteerError::Closed)?;
        rx.await.map_err(|_| SteerError::Closed)?
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        // Best effort: ask for the table's deletion, then wait for the thread, so the table
        // is gone before the process may exit. After `shutdown` the send just fails.
        let (reply, _rx) = oneshot::channel();
        let _ = self.tx.send(Msg::Shutdown(reply));
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

mod nft;
mod nftnl;
#[cfg(test)]
mod tests;

use nft::worker_main;
