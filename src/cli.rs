//! Command-line interface (clap): `run`, `check`, `route`, `demo`, `backend`, `client`,
//! `agent`, `register`.
//!
//! Parsing only: every flag maps onto [`ProxyConfig`] or a subcommand's options, values are
//! checked as they are parsed, and a bad flag gets clap's message and exit code 2.
//! `run --config FILE` starts from the file ([`crate::config_file`]) and applies on top the
//! flags given explicitly on the command line ([`Cli::from_matches`] records which):
//! flags win.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::config::{
    parse_duration, parse_len_bytes, parse_optional_duration, BackendSpec, DsrConfig, Failover,
    MembershipConfig, OwnerChange, ProxyConfig, SourceRate, DEFAULT_EJECT_AFTER,
    DEFAULT_HEALTH_FALL, DEFAULT_HEALTH_RISE, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_DOWN_SHARE,
    DEFAULT_MAX_TRIES,
};
use crate::config_file::{ConfigFileError, FileConfig};
use crate::error::ConfigError;
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

impl Cli {
    /// The command line in `m` (from `Cli::command().get_matches()`), with `run`'s flags
    /// that were given explicitly recorded in [`RunArgs::explicit`] (so that they override
    /// the `--config` file's values, and only they do).
    pub fn from_matches(m: &ArgMatches) -> Result<Cli, clap::Error> {
        let mut cli = <Cli as FromArgMatches>::from_arg_matches(m)?;
        if let (Command::Run(run), Some(("run", sub))) = (&mut cli.command, m.subcommand()) {
            let cmd = Cli::command();
            if let Some(run_cmd) = cmd.find_subcommand("run") {
                run.explicit = run_cmd
                    .get_arguments()
                    .map(|a| a.get_id().as_str())
                    .filter(|id| sub.value_source(id) == Some(ValueSource::CommandLine))
                    .map(str::to_string)
                    .collect();
            }
        }
        Ok(cli)
    }

    /// Parses `args` (the program name first) as [`Cli::from_matches`] does.
    pub fn try_parse_explicit<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Cli::from_matches(&Cli::command().try_get_matches_from(args)?)
    }
}

/// Subcommands.
// Parsed once at start: the size of `RunArgs` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Run(RunArgs),
    /// Validate a configuration file: print a one-line summary and exit 0, or print what to
    /// fix (file, line, key) and exit 2.
    Check(CheckArgs),
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
    /// Keep a backend registered in an etcd prefix (`PREFIX/backends/NAME`, on a lease)
    /// while its local TCP check passes; delete it and revoke the lease on SIGTERM/SIGINT.
    Register(RegisterArgs),
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

/// `--proxy-protocol` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProxyProtocolArg {
    /// Connections to backends start with a PROXY protocol v2 header.
    V2,
    /// No PROXY header.
    None,
}

/// `--owner-change` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OwnerChangeArg {
    /// Established connections stay on their backend.
    Keep,
    /// Established connections are reset after `--owner-change-grace`.
    Close,
}

/// `shardproxy check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The TOML configuration file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// `shardproxy run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file (README.md, "Operating"). Flags given on the command line override
    /// its values; `--backend` replaces its whole backend list.
    #[arg(long = "config", value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// Address clients connect to (required without --config).
    #[arg(long, required_unless_present = "config_file")]
    pub listen: Option<SocketAddr>,
    /// A backend: `NAME=HOST:PORT[,weight=N][,agent=HOST:PORT][,max_connections=N]
    /// [,proxy_protocol=v2|none]`. Repeat for each; order does not matter. `agent=` names
    /// the DSR agent on the backend's host (required without --config).
    #[arg(
        long = "backend",
        required_unless_present_any = ["config_file", "membership"],
        conflicts_with = "membership",
        value_parser = parse_backend
    )]
    pub backends: Vec<BackendSpec>,
    /// Take the backends from etcd instead: `etcd://HOST:PORT[,HOST:PORT...]/PREFIX`, one
    /// key per backend at `PREFIX/backends/NAME` holding `{"addr":"HOST:PORT","weight":N}`.
    /// The admin API then cannot change the membership.
    #[arg(long, value_name = "URL", value_parser = parse_membership_url)]
    pub membership: Option<crate::membership::MembershipUrl>,
    /// File keeping the last membership read from etcd, used at start when etcd cannot be
    /// reached (with --membership, or `[membership]` in --config).
    #[arg(long, value_name = "PATH")]
    pub membership_cache: Option<PathBuf>,
    /// TLS and authentication towards etcd (with --membership).
    #[command(flatten)]
    pub etcd: EtcdSecurityArgs,
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
    /// Time between active health probes (TCP connects) of one backend.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub health_interval: Duration,
    /// Time a health probe has to connect.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub health_timeout: Duration,
    /// Consecutive failed probes that mark a backend down.
    #[arg(long, default_value_t = DEFAULT_HEALTH_FALL)]
    pub health_fall: u32,
    /// Consecutive good probes that mark a down backend up again.
    #[arg(long, default_value_t = DEFAULT_HEALTH_RISE)]
    pub health_rise: u32,
    /// Turn active health checks off (passive ejection still applies).
    #[arg(long)]
    pub no_health: bool,
    /// Consecutive failed connects that eject a backend until a probe succeeds (0: never).
    #[arg(long, default_value_t = DEFAULT_EJECT_AFTER)]
    pub eject_after: u32,
    /// Above this share of backends down, route as if all were up (0.0..=1.0).
    #[arg(long, default_value_t = DEFAULT_MAX_DOWN_SHARE)]
    pub max_down_share: f64,
    /// Established connections whose key changed owner: keep them, or close them after
    /// --owner-change-grace.
    #[arg(long, value_enum, default_value = "keep")]
    pub owner_change: OwnerChangeArg,
    /// Time a connection whose key changed owner keeps running under --owner-change close.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub owner_change_grace: Duration,
    /// New connections per second one source (IPv4 address or IPv6 /64) may open; more are
    /// closed at once and counted (with --source-burst).
    #[arg(long, value_name = "PER_SECOND", requires = "source_burst")]
    pub source_rate: Option<f64>,
    /// Connections a source may open at once above --source-rate.
    #[arg(long, value_name = "N", requires = "source_rate")]
    pub source_burst: Option<u32>,
    /// Start backend connections with a PROXY protocol v2 header (backends may override).
    #[arg(long, value_enum, default_value = "none")]
    pub proxy_protocol: ProxyProtocolArg,
    /// File with the admin API's bearer token (first line, at least 16 characters);
    /// required when --admin is not on loopback.
    #[arg(long, value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,
    /// Unix socket for zero-downtime upgrades: if a running proxy answers there, take over
    /// its listening sockets (it then drains and exits); then serve this socket (mode 0600)
    /// for the next upgrade. Give the successor the same --listen and --admin.
    #[arg(long, value_name = "PATH")]
    pub upgrade_socket: Option<std::path::PathBuf>,
    /// Ids of the flags given on the command line (filled by [`Cli::from_matches`]; empty
    /// when parsed otherwise, then no flag overrides a file).
    #[arg(skip)]
    pub explicit: BTreeSet<String>,
}

/// Why `run`'s configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum RunConfigError {
    /// The `--config` file is unreadable or invalid.
    #[error(transparent)]
    File(#[from] ConfigFileError),
    /// A flag, or a flag combined with the file, is invalid.
    #[error(transparent)]
    Flags(#[from] ConfigError),
}

impl RunArgs {
    /// The proxy configuration these flags describe (not yet validated). Without
    /// `--config`; with it, `--listen` may be absent and is then 127.0.0.1:0 (use
    /// [`RunArgs::config_with_file`]).
    pub fn config(&self) -> Result<ProxyConfig, ConfigError> {
        let listen = self.listen.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        let mut c = ProxyConfig::new(listen, self.backends.clone());
        self.apply(&mut c, false)?;
        Ok(c)
    }

    /// The configuration of a freshly loaded `file` with the flags given explicitly on the
    /// command line applied on top (flags win; `--backend` replaces the file's whole backend
    /// list; `--listen` replaces its first listener). Call it again with the re-read file on
    /// reload. Not yet validated as a whole.
    pub fn config_with_file(&self, file: FileConfig) -> Result<ProxyConfig, ConfigError> {
        let mut c = file.proxy;
        self.apply(&mut c, true)?;
        Ok(c)
    }

    /// Worker threads: `--workers` if given explicitly, else the file's `workers`.
    pub fn workers_with_file(&self, file_workers: Option<u16>) -> Option<u16> {
        if self.given("workers") {
            self.workers
        } else {
            file_workers.or(self.workers)
        }
    }

    /// `run`'s configuration and worker count: from `--config` (if given) with the explicit
    /// flags on top, or from the flags alone. Not yet validated as a whole.
    pub fn resolve(&self) -> Result<(ProxyConfig, Option<u16>), RunConfigError> {
        match &self.config_file {
            Some(path) => {
                let file = crate::config_file::load(path)?;
                let workers = self.workers_with_file(file.workers);
                Ok((self.config_with_file(file)?, workers))
            }
            None => Ok((self.config()?, self.workers)),
        }
    }

    fn given(&self, id: &str) -> bool {
        self.explicit.contains(id)
    }

    /// Sets `c`'s fields from the flags: all of them, or (`only_explicit`) only those given
    /// on the command line.
    fn apply(&self, c: &mut ProxyConfig, only_explicit: bool) -> Result<(), ConfigError> {
        let set = |id: &str| !only_explicit || self.given(id);
        if set("listen") {
            if let Some(listen) = self.listen {
                c.listen = listen;
            }
        }
        if set("backends") && !self.backends.is_empty() {
            c.backends = self.backends.clone();
        }
        if set("admin") {
            c.admin = self.admin;
        }
        let h = &self.header;
        if set("len_bytes") {
            c.header.len_bytes = h.len_bytes;
        }
        if set("little_endian") {
            c.header.endian = h.format().endian;
        }
        if set("max_key_len") {
            c.header.max_key_len = h.max_key_len;
        }
        if set("strip_header") {
            c.header.mode = h.format().mode;
        }
        if set("header_timeout") {
            c.header_timeout = self.header_timeout;
        }
        if set("connect_timeout") {
            c.connect_timeout = self.connect_timeout;
        }
        if set("max_tries") {
            c.max_tries = self.max_tries;
        }
        if set("failover") {
            c.failover = match self.failover {
                FailoverArg::Next => Failover::Next,
                FailoverArg::None => Failover::None,
            };
        }
        if set("idle_timeout") {
            c.idle_timeout = self.idle_timeout.0;
        }
        if set("no_splice") {
            c.splice = !self.no_splice;
        }
        if set("max_connections") {
            c.max_connections = self.max_connections;
        }
        if set("max_pending_headers") {
            c.max_pending_headers = self.max_pending_headers;
        }
        if set("max_pending_headers_per_source") {
            c.max_pending_headers_per_source = self.max_pending_headers_per_source;
        }
        if set("drain_timeout") {
            c.drain_timeout = self.drain_timeout;
        }
        if set("max_pipes") {
            c.max_pipes = self.max_pipes;
        }
        if set("dsr") {
            c.dsr = None;
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
        }
        let health = &mut c.health;
        if set("health_interval") {
            health.interval = self.health_interval;
        }
        if set("health_timeout") {
            health.timeout = self.health_timeout;
        }
        if set("health_fall") {
            health.fall = self.health_fall;
        }
        if set("health_rise") {
            health.rise = self.health_rise;
        }
        if set("no_health") {
            health.active = !self.no_health;
        }
        if set("eject_after") {
            health.eject_after = self.eject_after;
        }
        if set("max_down_share") {
            health.max_down_share = self.max_down_share;
        }
        if set("owner_change") {
            c.owner_change = match self.owner_change {
                OwnerChangeArg::Keep => OwnerChange::Keep,
                OwnerChangeArg::Close => OwnerChange::Close {
                    grace: self.owner_change_grace,
                },
            };
        }
        if self.given("owner_change_grace") {
            match &mut c.owner_change {
                OwnerChange::Close { grace } => *grace = self.owner_change_grace,
                OwnerChange::Keep => {
                    return Err(ConfigError::Invalid {
                        field: "--owner-change-grace",
                        why: "applies only to --owner-change close (or owner_change.policy = \
                              \"close\" in the config file)"
                            .into(),
                    })
                }
            }
        }
        if set("source_rate") {
            if let (Some(per_second), Some(burst)) = (self.source_rate, self.source_burst) {
                c.source_rate = Some(SourceRate { per_second, burst });
            } else if !only_explicit {
                c.source_rate = None;
            }
        }
        if set("proxy_protocol") {
            c.proxy_protocol = matches!(self.proxy_protocol, ProxyProtocolArg::V2);
        }
        if set("upgrade_socket") {
            c.upgrade_socket = self.upgrade_socket.clone();
        }
        if set("admin_token_file") {
            c.admin_token_file = self.admin_token_file.clone();
        }
        if set("membership") {
            if let Some(url) = &self.membership {
                let mut m = c
                    .membership
                    .take()
                    .unwrap_or_else(|| MembershipConfig::new(url.clone()));
                m.url = url.clone();
                c.membership = Some(m);
            }
        }
        if set("membership_cache") && self.membership_cache.is_some() {
            match &mut c.membership {
                Some(m) => m.cache_file = self.membership_cache.clone(),
                None => {
                    return Err(ConfigError::Invalid {
                        field: "--membership-cache",
                        why: "applies only with --membership (or [membership] in the config file)"
                            .into(),
                    })
                }
            }
        }
        self.etcd.apply(c, &set)?;
        if c.membership.is_some() && !c.backends.is_empty() {
            return Err(ConfigError::Invalid {
                field: "--membership",
                why: "the backends come from etcd: give --membership ([membership]) or \
                      --backend ([[backend]]), not both"
                    .into(),
            });
        }
        Ok(())
    }
}

/// TLS and user/password authentication towards etcd (`run --membership`, `register`).
#[derive(Debug, Clone, Default, Args)]
pub struct EtcdSecurityArgs {
    /// PEM CA certificate(s) of the etcd members: connect with TLS (https) and verify each
    /// member's certificate against it and the endpoint's host name or IP address.
    #[arg(long, value_name = "PATH")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate, for an etcd started with --client-cert-auth (needs --etcd-key
    /// and --etcd-ca).
    #[arg(long, value_name = "PATH")]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, value_name = "PATH")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user, for an etcd with authentication enabled (needs --etcd-password-file).
    #[arg(long, value_name = "NAME")]
    pub etcd_user: Option<String>,
    /// File whose first line is the etcd user's password (a file, so the password is in no
    /// process listing).
    #[arg(long, value_name = "PATH")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdSecurityArgs {
    /// The settings as given.
    pub fn security(&self) -> crate::membership::EtcdSecurity {
        crate::membership::EtcdSecurity {
            ca_file: self.etcd_ca.clone(),
            cert_file: self.etcd_cert.clone(),
            key_file: self.etcd_key.clone(),
            user: self.etcd_user.clone(),
            password_file: self.etcd_password_file.clone(),
        }
    }

    /// Puts the flags that `set` selects over `c`'s membership settings (the file's, when
    /// there is one); an error if they are given without a membership from etcd.
    fn apply(&self, c: &mut ProxyConfig, set: &dyn Fn(&str) -> bool) -> Result<(), ConfigError> {
        let given = |id: &str| set(id) && self.given_value(id);
        let Some(flag) = [
            "etcd_ca",
            "etcd_cert",
            "etcd_key",
            "etcd_user",
            "etcd_password_file",
        ]
        .into_iter()
        .find(|id| given(id)) else {
            return Ok(());
        };
        let Some(m) = &mut c.membership else {
            return Err(ConfigError::Invalid {
                field: "--membership",
                why: format!(
                    "--{} applies only with --membership (or [membership] in the config file)",
                    flag.replace('_', "-")
                ),
            });
        };
        let s = &mut m.security;
        if given("etcd_ca") {
            s.ca_file = self.etcd_ca.clone();
        }
        if given("etcd_cert") {
            s.cert_file = self.etcd_cert.clone();
        }
        if given("etcd_key") {
            s.key_file = self.etcd_key.clone();
        }
        if given("etcd_user") {
            s.user = self.etcd_user.clone();
        }
        if given("etcd_password_file") {
            s.password_file = self.etcd_password_file.clone();
        }
        Ok(())
    }

    fn given_value(&self, id: &str) -> bool {
        match id {
            "etcd_ca" => self.etcd_ca.is_some(),
            "etcd_cert" => self.etcd_cert.is_some(),
            "etcd_key" => self.etcd_key.is_some(),
            "etcd_user" => self.etcd_user.is_some(),
            "etcd_password_file" => self.etcd_password_file.is_some(),
            _ => false,
        }
    }
}

/// `shardproxy register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The etcd prefix: `etcd://HOST:PORT[,HOST:PORT...]/PREFIX`.
    #[arg(long, value_name = "URL", value_parser = parse_membership_url)]
    pub membership: crate::membership::MembershipUrl,
    /// TLS and authentication towards etcd.
    #[command(flatten)]
    pub etcd: EtcdSecurityArgs,
    /// The backend's name (its key is `PREFIX/backends/NAME`).
    #[arg(long, value_parser = parse_backend_name)]
    pub name: String,
    /// Where the proxies connect to the backend: HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub addr: String,
    /// The backend's weight (0 takes no new keys).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=i64::from(crate::routing::MAX_WEIGHT)))]
    pub weight: u32,
    /// The local TCP check: the key is kept while a connect here succeeds [default: --addr].
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub check: Option<String>,
    /// The lease's time to live: after a SIGKILL the key goes by itself this long after.
    #[arg(long, default_value = "5s", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Time between local checks (fall 2 / rise 2).
    #[arg(long, default_value = "1s", value_parser = parse_check_interval)]
    pub check_interval: Duration,
}

fn parse_membership_url(s: &str) -> Result<crate::membership::MembershipUrl, String> {
    s.parse()
        .map_err(|e: crate::membership::EtcdError| e.to_string())
}

fn parse_backend_name(s: &str) -> Result<String, String> {
    let spec = BackendSpec::new(s, SocketAddr::from(([127, 0, 0, 1], 1)));
    let config = ProxyConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), Vec::new());
    crate::control::validate_spec(&spec, &config)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

fn parse_host_port(s: &str) -> Result<String, String> {
    crate::config::resolve(s.trim()).map(|_| s.trim().to_string())
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(2) || d > Duration::from_secs(3600) {
        return Err(format!(
            "{s}: the lease TTL must be 2s..=1h (etcd leases count whole seconds)"
        ));
    }
    Ok(d)
}

fn parse_check_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(10) || d > Duration::from_secs(3600) {
        return Err(format!("{s}: the check interval must be 10ms..=1h"));
    }
    Ok(d)
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

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let all = ["shardproxy", "run", "--listen", "127.0.0.1:0"]
            .iter()
            .chain(args)
            .copied();
        match Cli::try_parse_explicit(all)?.command {
            Command::Run(r) => Ok(r),
            _ => unreachable!(),
        }
    }

    #[test]
    fn membership_flags_replace_the_backends() {
        let url = "etcd://127.0.0.1:2379,127.0.0.1:22379/sp/a";
        let r = run_args(&["--membership", url, "--membership-cache", "/tmp/c.json"]).unwrap();
        let c = r.config().unwrap();
        let m = c.membership.as_ref().expect("membership");
        assert_eq!(m.url.to_string(), url);
        assert_eq!(m.cache_file, Some(PathBuf::from("/tmp/c.json")));
        assert!(c.backends.is_empty());
        c.validate().expect("valid without backends");
        let e = run_args(&["--membership", url, "--backend", "b1=127.0.0.1:9001"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = e.to_string();
        assert!(e.contains("--membership") && e.contains("--backend"), "{e}");
        let r = run_args(&[
            "--membership-cache",
            "/tmp/c.json",
            "--backend",
            "b1=127.0.0.1:1",
        ])
        .unwrap();
        let e = r.config().unwrap_err().to_string();
        assert!(
            e.contains("--membership-cache") && e.contains("only with --membership"),
            "{e}"
        );
        let e = run_args(&["--membership", "etcd://127.0.0.1:2379/"]).unwrap_err();
        assert!(e.to_string().contains("prefix is empty"), "{e}");
        let e = run_args(&[]).unwrap_err();
        assert!(e.to_string().contains("--backend"), "{e}");
    }

    #[test]
    fn etcd_security_flags_go_with_the_membership() {
        let url = "etcd://127.0.0.1:2379/sp/a";
        let r = run_args(&[
            "--membership",
            url,
            "--etcd-ca",
            "/tls/ca.pem",
            "--etcd-cert",
            "/tls/c.pem",
            "--etcd-key",
            "/tls/k.pem",
            "--etcd-user",
            "proxy",
            "--etcd-password-file",
            "/tls/pw",
        ])
        .unwrap();
        let c = r.config().unwrap();
        let s = &c.membership.as_ref().expect("membership").security;
        assert_eq!(s.ca_file, Some(PathBuf::from("/tls/ca.pem")));
        assert_eq!(s.cert_file, Some(PathBuf::from("/tls/c.pem")));
        assert_eq!(s.key_file, Some(PathBuf::from("/tls/k.pem")));
        assert_eq!(s.user.as_deref(), Some("proxy"));
        assert_eq!(s.password_file, Some(PathBuf::from("/tls/pw")));
        // The files are read by validate(): a missing one names its flag.
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--etcd-ca") && e.contains("/tls/ca.pem"), "{e}");
        // Without a membership from etcd they mean nothing: say so.
        let r = run_args(&["--backend", "b1=127.0.0.1:1", "--etcd-user", "proxy"]).unwrap();
        let e = r.config().unwrap_err().to_string();
        assert!(
            e.contains("--etcd-user") && e.contains("only with --membership"),
            "{e}"
        );
    }

    #[test]
    fn register_flags_are_checked() {
        let parse = |extra: &[&str]| {
            let all = [
                "shardproxy",
                "register",
                "--membership",
                "etcd://127.0.0.1:2379/sp/a",
            ]
            .iter()
            .chain(extra)
            .copied();
            Cli::try_parse_explicit(all).map(|c| match c.command {
                Command::Register(r) => r,
                _ => unreachable!(),
            })
        };
        let r = parse(&["--name", "b1", "--addr", "127.0.0.1:9001"]).unwrap();
        assert_eq!(
            (r.weight, r.ttl, r.check_interval),
            (1, Duration::from_secs(5), Duration::from_secs(1))
        );
        assert_eq!(r.check, None);
        for (bad, why) in [
            (&["--addr", "127.0.0.1:9001"][..], "--name"),
            (&["--name", "b1"][..], "--addr"),
            (&["--name", "a/b", "--addr", "127.0.0.1:1"][..], "'/'"),
            (&["--name", "b1", "--addr", "nowhere"][..], "nowhere"),
            (
                &["--name", "b1", "--addr", "127.0.0.1:1", "--ttl", "1s"][..],
                "2s..=1h",
            ),
            (
                &["--name", "b1", "--addr", "127.0.0.1:1", "--weight", "-1"][..],
                "'-1'",
            ),
            (
                &[
                    "--name",
                    "b1",
                    "--addr",
                    "127.0.0.1:1",
                    "--weight",
                    "1000001",
                ][..],
                "--weight",
            ),
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
        }
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
        let c = run.config().unwrap();
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
    fn control_flags_map_onto_config() {
        let parse = |extra: &[&str]| {
            let mut args = vec![
                "shardproxy",
                "run",
                "--listen",
                "127.0.0.1:7000",
                "--backend",
                "b1=127.0.0.1:9001",
            ];
            args.extend_from_slice(extra);
            match Cli::try_parse_explicit(args).unwrap().command {
                Command::Run(run) => run,
                _ => panic!("not run"),
            }
        };
        let c = parse(&[]).config().unwrap();
        assert_eq!(c.health, crate::config::HealthConfig::default());
        assert_eq!((c.owner_change, c.source_rate), (OwnerChange::Keep, None));
        assert!(!c.proxy_protocol && c.admin_token_file.is_none());
        let run = parse(&[
            "--health-interval",
            "500ms",
            "--health-timeout",
            "200ms",
            "--health-fall",
            "5",
            "--health-rise",
            "4",
            "--no-health",
            "--eject-after",
            "0",
            "--max-down-share",
            "0.25",
            "--owner-change",
            "close",
            "--owner-change-grace",
            "10s",
            "--source-rate",
            "12.5",
            "--source-burst",
            "30",
            "--proxy-protocol",
            "v2",
            "--admin-token-file",
            "/etc/token",
        ]);
        let c = run.config().unwrap();
        let h = &c.health;
        assert!(!h.active);
        assert_eq!(
            (h.interval, h.timeout, h.fall, h.rise, h.eject_after),
            (
                Duration::from_millis(500),
                Duration::from_millis(200),
                5,
                4,
                0
            )
        );
        assert_eq!(h.max_down_share, 0.25);
        assert_eq!(
            c.owner_change,
            OwnerChange::Close {
                grace: Duration::from_secs(10)
            }
        );
        assert_eq!(
            c.source_rate,
            Some(SourceRate {
                per_second: 12.5,
                burst: 30
            })
        );
        assert!(c.proxy_protocol);
        assert_eq!(c.admin_token_file, Some(PathBuf::from("/etc/token")));
        // A grace without the close policy, a rate without a burst: refused.
        let e = parse(&["--owner-change-grace", "5s"]).config().unwrap_err();
        assert!(e.to_string().contains("--owner-change-grace"), "{e}");
        assert!(Cli::try_parse_explicit([
            "shardproxy",
            "run",
            "--listen",
            "127.0.0.1:7000",
            "--backend",
            "b1=127.0.0.1:9001",
            "--source-rate",
            "5",
        ])
        .is_err());
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
