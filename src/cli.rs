//! Command-line interface (clap): `run`, `route`, `demo`, `backend`, `client`.
//!
//! Parsing only: every flag maps onto [`ProxyConfig`] or a subcommand's options, values are
//! checked as they are parsed, and a bad flag gets clap's message and exit code 2.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{
    parse_duration, parse_len_bytes, parse_optional_duration, BackendSpec, DsrConfig, Failover,
    ProxyConfig, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_TRIES,
};
use crate::header::{Endian, HeaderFormat, HeaderMode, LenBytes, DEFAULT_MAX_KEY_LEN};

/// A Layer-4 TCP sharding proxy: routes each connection by its key header with rendezvous
/// hashing and splices the sockets together.
#[derive(Debug, Parser)]
#[command(name = "shardproxy", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Run(RunArgs),
    /// Print the ranked backend names for each KEY (offline; same answer as the proxy).
    Route(RouteArgs),
    /// Start 3 demo backends and the proxy in-process, drive traffic, print what happened.
    Demo(DemoArgs),
    /// Run an echo backend that first sends its name and a newline.
    Backend(BackendArgs),
    /// Send a key header and a payload, print which backend answered, verify the echo.
    Client(ClientArgs),
    /// Run the DSR agent on a backend host: rebuild handed-off connections, give them to
    /// the application.
    Agent(AgentArgs),
}

/// The key header format flags, shared by `run` and `client`.
#[derive(Debug, Clone, Args)]
pub struct HeaderArgs {
    /// Width of the key length field in bytes: 1, 2 or 4.
    #[arg(long, default_value = "2", value_parser = parse_len_bytes)]
    pub len_bytes: LenBytes,
    /// The length field is little-endian (default: big-endian).
    #[arg(long)]
    pub little_endian: bool,
    /// Longest key accepted, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_KEY_LEN)]
    pub max_key_len: u32,
    /// Remove the key header before forwarding (default: the backend sees it).
    #[arg(long)]
    pub strip_header: bool,
}

impl HeaderArgs {
    /// The header format these flags describe.
    pub fn format(&self) -> HeaderFormat {
        HeaderFormat {
            len_bytes: self.len_bytes,
            endian: if self.little_endian {
                Endian::Little
            } else {
                Endian::Big
            },
            max_key_len: self.max_key_len,
            mode: if self.strip_header {
                HeaderMode::Strip
            } else {
                HeaderMode::Forward
            },
        }
    }
}

/// Failover policy flag values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FailoverArg {
    /// Try the key's next choice when its owner is unreachable.
    Next,
    /// Fail fast: a key only ever goes to its owner.
    None,
}

/// `shardproxy run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address clients connect to.
    #[arg(long)]
    pub listen: SocketAddr,
    /// A backend: `NAME=HOST:PORT[,weight=N][,agent=HOST:PORT]`. Repeat for each; order does
    /// not matter. `agent=` names the DSR agent on the backend's host.
    #[arg(long = "backend", required = true, value_parser = parse_backend)]
    pub backends: Vec<BackendSpec>,
    /// Admin/metrics address (GET /metrics, /healthz); no admin listener if absent.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Direct server return: hand connections whose backend has an agent to that agent
    /// (needs CAP_NET_ADMIN and nftables; falls back to splicing on any failure).
    #[arg(long, requires_all = ["dsr_device", "dsr_secret_file"])]
    pub dsr: bool,
    /// The uplink device whose ingress steers handed-off flows (with --dsr).
    #[arg(long, value_name = "IFACE", requires = "dsr")]
    pub dsr_device: Option<String>,
    /// File with the shared secret of proxies and agents, at least 16 bytes (with --dsr).
    #[arg(long, value_name = "PATH", requires = "dsr")]
    pub dsr_secret_file: Option<std::path::PathBuf>,
    /// Time an agent has to rebuild a handed-off connection before the proxy keeps it.
    #[arg(long, default_value = "500ms", value_parser = parse_duration, requires = "dsr")]
    pub dsr_handoff_timeout: Duration,
    /// Lifetime of a handed-off flow's steering without news from its agent.
    #[arg(long, default_value = "10m", value_parser = parse_duration, requires = "dsr")]
    pub dsr_flow_timeout: Duration,
    /// Hand off only keys starting with this prefix (repeat for several; default: all).
    #[arg(long = "dsr-key-prefix", value_name = "PREFIX", requires = "dsr")]
    pub dsr_key_prefixes: Vec<String>,
    /// Key header format.
    #[command(flatten)]
    pub header: HeaderArgs,
    /// Time a client has to send its complete key header.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// Time allowed for each backend connect attempt.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Distinct backends tried per connection, in the key's rank order.
    #[arg(long, default_value_t = DEFAULT_MAX_TRIES)]
    pub max_tries: u32,
    /// When a key's owner is unreachable: try its next choice, or fail fast.
    #[arg(long, value_enum, default_value = "next")]
    pub failover: FailoverArg,
    /// Close connections idle this long in both directions ('off' to disable).
    #[arg(long, default_value = "off", value_parser = parse_idle_timeout)]
    pub idle_timeout: IdleTimeout,
    /// Copy through a user-space buffer instead of splice(2).
    #[arg(long)]
    pub no_splice: bool,
    /// Concurrent client connections; at the limit new clients wait in the kernel backlog.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Connections allowed in the header phase at once; at the limit new clients wait in the
    /// kernel backlog [default: a quarter of --max-connections].
    #[arg(long, value_name = "N")]
    pub max_pending_headers: Option<usize>,
    /// Header-phase connections one source (IPv4 address or IPv6 /64) may hold; more are
    /// closed at once and counted [default: an eighth of --max-pending-headers].
    #[arg(long, value_name = "N")]
    pub max_pending_headers_per_source: Option<usize>,
    /// Time connections get to finish after SIGTERM/SIGINT.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Splice pipes open at once (2 fds each); over it bulk transfers copy instead
    /// (default: a quarter of --max-connections, within the fd limit; 0 never splices).
    #[arg(long)]
    pub max_pipes: Option<usize>,
    /// Worker threads, each with its own SO_REUSEPORT listener (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,
    /// Unix socket for zero-downtime upgrades: if a running proxy answers there, take over
    /// its listening sockets (it then drains and exits); then serve this socket (mode 0600)
    /// for the next upgrade. Give the successor the same --listen and --admin.
    #[arg(long, value_name = "PATH")]
    pub upgrade_socket: Option<std::path::PathBuf>,
}

impl RunArgs {
    /// The proxy configuration these flags describe (not yet validated).
    pub fn config(&self) -> ProxyConfig {
        let mut c = ProxyConfig::new(self.listen, self.backends.clone());
        c.admin = self.admin;
        c.header = self.header.format();
        c.header_timeout = self.header_timeout;
        c.connect_timeout = self.connect_timeout;
        c.max_tries = self.max_tries;
        c.failover = match self.failover {
            FailoverArg::Next => Failover::Next,
            FailoverArg::None => Failover::None,
        };
        c.idle_timeout = self.idle_timeout.0;
        c.splice = !self.no_splice;
        c.max_connections = self.max_connections;
        c.max_pending_headers = self.max_pending_headers;
        c.max_pending_headers_per_source = self.max_pending_headers_per_source;
        c.drain_timeout = self.drain_timeout;
        c.max_pipes = self.max_pipes;
        c.upgrade_socket = self.upgrade_socket.clone();
        if self.dsr {
            if let (Some(device), Some(secret)) = (&self.dsr_device, &self.dsr_secret_file) {
                let mut d = DsrConfig::new(device.clone(), secret.clone());
                d.handoff_timeout = self.dsr_handoff_timeout;
                d.flow_timeout = self.dsr_flow_timeout;
                d.key_prefixes = self
                    .dsr_key_prefixes
                    .iter()
                    .map(|p| p.as_bytes().to_vec())
                    .collect();
                c.dsr = Some(d);
            }
        }
        c
    }
}

/// `shardproxy route`.
#[derive(Debug, Args)]
pub struct RouteArgs {
    /// A backend: NAME=HOST:PORT[,weight=N] (the address is not used for routing).
    #[arg(long = "backend", required = true, value_parser = parse_backend)]
    pub backends: Vec<BackendSpec>,
    /// Keys are hex-encoded bytes rather than text.
    #[arg(long)]
    pub hex: bool,
    /// Keys to route.
    #[arg(required = true)]
    pub keys: Vec<String>,
}

/// `shardproxy demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Distinct keys per round.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub keys: u32,
}

/// `shardproxy backend`.
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// Address to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Name it reports to each client.
    #[arg(long)]
    pub name: String,
    /// Also serve connections a DSR agent hands over this Unix socket (one SCM_RIGHTS
    /// message per connection); a stale socket file there is replaced.
    #[arg(long, value_name = "PATH")]
    pub handoff_socket: Option<PathBuf>,
}

/// `shardproxy agent`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["forward", "handoff_socket"])))]
pub struct AgentArgs {
    /// Address the proxies' control connections come to.
    #[arg(long)]
    pub control: SocketAddr,
    /// The virtual IP (the proxy's listen address), configured on this host's `lo`.
    #[arg(long)]
    pub vip: std::net::Ipv4Addr,
    /// File with the shared secret of proxies and agents, at least 16 bytes.
    #[arg(long, value_name = "PATH")]
    pub secret_file: std::path::PathBuf,
    /// Relay each rebuilt connection to an unmodified application at HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub forward: Option<SocketAddr>,
    /// Pass each rebuilt connection to the application over the Unix socket at PATH
    /// (SCM_RIGHTS, one fd and the byte 0x01 per message).
    #[arg(long, value_name = "PATH")]
    pub handoff_socket: Option<std::path::PathBuf>,
    /// Admin/metrics address (GET /metrics, /healthz).
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Time a rebuilt connection waits for the proxy's "steered" before it is dropped.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub steer_timeout: Duration,
    /// Control connections (proxies) served at once.
    #[arg(long, default_value_t = crate::dsr::agent::DEFAULT_MAX_CONTROL_CONNECTIONS)]
    pub max_control_connections: usize,
}

impl AgentArgs {
    /// The agent configuration these flags describe.
    pub fn config(&self) -> crate::dsr::agent::AgentConfig {
        use crate::dsr::agent::{AgentConfig, Target};
        let target = match (&self.forward, &self.handoff_socket) {
            (Some(addr), _) => Target::Forward(*addr),
            (None, Some(path)) => Target::HandoffSocket(path.clone()),
            // clap's group makes exactly one of them present.
            (None, None) => Target::HandoffSocket(std::path::PathBuf::new()),
        };
        let mut c = AgentConfig::new(self.control, self.vip, self.secret_file.clone(), target);
        c.admin = self.admin;
        c.steer_timeout = self.steer_timeout;
        c.max_control_connections = self.max_control_connections;
        c
    }
}

/// `shardproxy client`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Proxy (or backend) address.
    #[arg(long)]
    pub connect: SocketAddr,
    /// Key header format (must match the proxy's).
    #[command(flatten)]
    pub header: HeaderArgs,
    /// Payload bytes to send after the header and verify in the echo.
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// Keys to send, one connection each.
    #[arg(required = true)]
    pub keys: Vec<String>,
}

/// A duration or `off` (clap needs a type of its own for an optional value with a default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleTimeout(pub Option<Duration>);

fn parse_idle_timeout(s: &str) -> Result<IdleTimeout, String> {
    parse_optional_duration(s).map(IdleTimeout)
}

fn parse_backend(s: &str) -> Result<BackendSpec, String> {
    s.parse::<BackendSpec>().map_err(|e| e.to_string())
}

/// Decodes a key given on the command line: the text's bytes, or with `hex` pairs of hex
/// digits. Any input gives a value or a message; nothing here panics.
pub fn decode_key(text: &str, hex: bool) -> Result<Vec<u8>, String> {
    if !hex {
        return Ok(text.as_bytes().to_vec());
    }
    // Checked by character first: slicing a str at byte offsets would split a multi-byte
    // character (and panic) before the bad digit could be reported.
    if let Some((i, c)) = text.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
        return Err(format!(
            "hex key {text:?} has a non-hex digit {c:?} at byte {i} (expected 0-9, a-f, A-F)"
        ));
    }
    if text.len() % 2 != 0 {
        return Err(format!("hex key {text:?} has an odd number of digits"));
    }
    // All ASCII hex digits now: every byte is one digit.
    let digit = |b: u8| match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    };
    Ok(text
        .as_bytes()
        .chunks_exact(2)
        .map(|pair| (digit(pair[0]) << 4) | digit(pair[1]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_flags_map_onto_config() {
        let cli = Cli::try_parse_from([
            "shardproxy",
            "run",
            "--listen",
            "127.0.0.1:7000",
            "--backend",
            "b1=127.0.0.1:9001",
            "--backend",
            "b2=127.0.0.1:9002,weight=2",
            "--header-timeout",
            "250ms",
            "--len-bytes",
            "4",
            "--little-endian",
            "--strip-header",
            "--idle-timeout",
            "1m",
            "--max-pending-headers",
            "100",
            "--max-pending-headers-per-source",
            "10",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        let c = run.config();
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.backends[1].weight, 2);
        assert_eq!(c.header_timeout, Duration::from_millis(250));
        assert_eq!(c.header.len_bytes, LenBytes::Four);
        assert_eq!(c.header.endian, Endian::Little);
        assert_eq!(c.header.mode, HeaderMode::Strip);
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(60)));
        assert_eq!(c.max_pending_headers, Some(100));
        assert_eq!(c.max_pending_headers_per_source, Some(10));
        c.validate().unwrap();
    }

    #[test]
    fn hex_keys() {
        assert_eq!(decode_key("00ff", true), Ok(vec![0, 255]));
        assert!(decode_key("0", true).is_err());
        assert!(decode_key("zz", true).is_err());
        assert_eq!(decode_key("aBcD", true), Ok(vec![0xab, 0xcd]));
        // Multi-byte characters: an error naming the character, never a panic.
        for bad in ["aéb", "é0", "0é", "ab\u{1F600}", "\u{1F600}"] {
            let e = decode_key(bad, true).expect_err(bad);
            assert!(e.contains("non-hex digit"), "{bad:?}: {e}");
        }
        assert_eq!(decode_key("ab", false), Ok(b"ab".to_vec()));
    }
}
