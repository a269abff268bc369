//! The proxy's configuration: every limit and timeout in force, with its default, validated
//! in one place before anything binds. It never opens a socket.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::time::Duration;

use crate::error::ConfigError;
use crate::header::{HeaderFormat, LenBytes};
use crate::routing::{Router, MAX_WEIGHT};

/// Default time a client has to send the complete key header.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time allowed for one backend connect attempt.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default number of distinct backends tried per connection.
pub const DEFAULT_MAX_TRIES: u32 = 3;
/// Upper bound on `max_tries` (the tried set lives on the stack).
pub const MAX_TRIES: u32 = 16;
/// Default cap on concurrent client connections (each costs two sockets, plus pipes while
/// data moves); lowered at start if the fd limit cannot carry it.
pub const DEFAULT_MAX_CONNECTIONS: usize = 8192;
/// By default the header-phase budget is `max_connections` divided by this: connections
/// past their header keep at least three quarters of the slots.
pub const PENDING_HEADERS_DIVISOR: usize = 4;
/// By default one source may hold the header-phase budget divided by this: a flood needs
/// this many hosts to fill it, while one client host can still open a burst of connections
/// at once (a pool warming up) without being mistaken for a flood.
pub const PENDING_HEADERS_PER_SOURCE_DIVISOR: usize = 8;
/// Default time connections get to finish after SIGTERM/SIGINT.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time an admin client has to send a request head (and the longest an idle
/// keep-alive admin connection is kept).
pub const DEFAULT_ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// One backend: a name (its routing identity), an address, a weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Routing identity; keys follow the name, not the address.
    pub name: String,
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative share of keys; 0 takes no new keys.
    pub weight: u32,
    /// The DSR agent on the backend's host (`agent=HOST:PORT`): with `--dsr`, connections
    /// routed here are handed off to it. Never affects routing.
    pub agent: Option<SocketAddr>,
    /// Concurrent proxied connections this backend takes (`max_connections=N`); over it a
    /// new connection for its keys is closed at once and counted `backend_full` (never sent
    /// to another backend). `None`: no cap of its own.
    pub max_connections: Option<usize>,
    /// Whether connections to this backend start with a PROXY protocol v2 header
    /// (`proxy_protocol=v2|none`). `None`: the proxy-wide setting.
    pub proxy_protocol: Option<bool>,
}

impl BackendSpec {
    /// A backend with weight 1 and every option at its default.
    pub fn new(name: impl Into<String>, addr: SocketAddr) -> Self {
        BackendSpec {
            name: name.into(),
            addr,
            weight: 1,
            agent: None,
            max_connections: None,
            proxy_protocol: None,
        }
    }
}

impl FromStr for BackendSpec {
    type Err = ConfigError;

    /// Parses `NAME=HOST:PORT[,weight=N][,agent=HOST:PORT][,max_connections=N]
    /// [,proxy_protocol=v2|none]`.
    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::BackendSpec {
            spec: spec.to_string(),
            why: why.to_string(),
        };
        let (name, rest) = spec.split_once('=').ok_or_else(|| bad("missing '='"))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(bad("empty name"));
        }
        if name
            .chars()
            .any(|c| c.is_whitespace() || c == ',' || c == '=')
        {
            return Err(bad("names may not contain spaces, ',' or '='"));
        }
        let mut parts = rest.split(',');
        let addr_text = parts.next().unwrap_or_default().trim();
        let addr = resolve(addr_text).map_err(|why| bad(&why))?;
        let mut weight = 1;
        let mut agent = None;
        let mut max_connections = None;
        let mut proxy_protocol = None;
        for opt in parts {
            match opt.trim().split_once('=') {
                Some(("agent", a)) => agent = Some(resolve(a.trim()).map_err(|why| bad(&why))?),
                Some(("max_connections", n)) => {
                    max_connections = Some(
                        n.trim()
                            .parse::<usize>()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| {
                                bad(&format!("max_connections {n:?} is not a whole number >= 1"))
                            })?,
                    );
                }
                Some(("proxy_protocol", v)) => {
                    proxy_protocol = Some(match v.trim() {
                        "v2" => true,
                        "none" => false,
                        other => {
                            return Err(bad(&format!("proxy_protocol {other:?} is not v2 or none")))
                        }
                    });
                }
                Some(("weight", w)) => {
                    weight = w
                        .trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|w| *w <= MAX_WEIGHT)
                        .ok_or_else(|| {
                            bad(&format!(
                                "weight {w:?} is not a whole number 0..={MAX_WEIGHT}"
                            ))
                        })?;
                }
                _ => {
                    return Err(bad(&format!(
                        "unknown option {opt:?} (weight=N, agent=HOST:PORT, \
                         max_connections=N or proxy_protocol=v2|none)"
                    )))
                }
            }
        }
        Ok(BackendSpec {
            name: name.to_string(),
            addr,
            weight,
            agent,
            max_connections,
            proxy_protocol,
        })
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={},weight={}", self.name, self.addr, self.weight)?;
        if let Some(agent) = self.agent {
            write!(f, ",agent={agent}")?;
        }
        if let Some(n) = self.max_connections {
            write!(f, ",max_connections={n}")?;
        }
        match self.proxy_protocol {
            Some(true) => write!(f, ",proxy_protocol=v2"),
            Some(false) => write!(f, ",proxy_protocol=none"),
            None => Ok(()),
        }
    }
}

/// Resolves `HOST:PORT` (an IP address, or a name looked up once, first answer): the
/// address form `--backend` and the config file accept.
pub fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let mut addrs = text
        .to_socket_addrs()
        .map_err(|e| format!("address {text:?} does not resolve: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("address {text:?} resolves to nothing"))
}

/// What to do when a key's first-choice backend cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Failover {
    /// Try the key's next choice (caches, game lobbies). The default.
    #[default]
    Next,
    /// Fail fast: never send a key to a second node (shards where a second writer corrupts).
    None,
}

/// Default interval between active health probes of one backend.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Default time a health probe has to connect (and, with `expect`, to read the answer).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Default consecutive failed probes that mark a backend down.
pub const DEFAULT_HEALTH_FALL: u32 = 3;
/// Default consecutive good probes that mark a down backend up again.
pub const DEFAULT_HEALTH_RISE: u32 = 2;
/// Default share of the interval each wait is moved by at random (so probes of many
/// proxies and backends do not fall in step).
pub const DEFAULT_HEALTH_JITTER: f64 = 0.1;
/// Default consecutive failed client connects that eject a backend (passive checking).
pub const DEFAULT_EJECT_AFTER: u32 = 5;
/// Default first ejection time; each further ejection in a row doubles it.
pub const DEFAULT_EJECT_TIME: Duration = Duration::from_secs(5);
/// Default longest ejection time.
pub const DEFAULT_MAX_EJECT_TIME: Duration = Duration::from_secs(300);
/// Default panic threshold: when more than this share of the backends that take keys is
/// down, health is ignored and every backend is routed to as if up.
pub const DEFAULT_MAX_DOWN_SHARE: f64 = 0.5;

/// Health checking (README.md, "Operating"): active probes and passive ejection.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Active probes on (the default): a TCP connect to each backend every `interval`.
    pub active: bool,
    /// Time between probes of one backend (moved by up to `jitter` of itself).
    pub interval: Duration,
    /// Share of `interval` each wait is moved by at random, `0.0..=0.5`.
    pub jitter: f64,
    /// Time a probe has to connect, and to read the expected answer.
    pub timeout: Duration,
    /// Consecutive failed probes that mark a backend down.
    pub fall: u32,
    /// Consecutive good probes that mark a down backend up.
    pub rise: u32,
    /// Bytes a probe sends once connected (none: connect only).
    pub send: Option<Vec<u8>>,
    /// Bytes the answer must start with (none: the connect is enough).
    pub expect: Option<Vec<u8>>,
    /// Consecutive failed client connects that eject a backend at once (0: no passive
    /// ejection). An ejected backend is re-admitted only after a probe succeeds.
    pub eject_after: u32,
    /// First ejection time; doubled for each ejection in a row, up to `max_eject_time`.
    pub eject_time: Duration,
    /// Longest ejection time.
    pub max_eject_time: Duration,
    /// Panic threshold: above this share of down backends, route as if all were up.
    pub max_down_share: f64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            active: true,
            interval: DEFAULT_HEALTH_INTERVAL,
            jitter: DEFAULT_HEALTH_JITTER,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            fall: DEFAULT_HEALTH_FALL,
            rise: DEFAULT_HEALTH_RISE,
            send: None,
            expect: None,
            eject_after: DEFAULT_EJECT_AFTER,
            eject_time: DEFAULT_EJECT_TIME,
            max_eject_time: DEFAULT_MAX_EJECT_TIME,
            max_down_share: DEFAULT_MAX_DOWN_SHARE,
        }
    }
}

/// What happens to an established connection when its key's owner changes (a membership
/// or health change sends the key elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OwnerChange {
    /// Leave it on the backend it is on (the default).
    #[default]
    Keep,
    /// Reset it after `grace`, unless the key's owner is its backend again by then.
    Close {
        /// Time the connection keeps running after the change.
        grace: Duration,
    },
}

/// A per-source connection rate limit (token bucket per IPv4 address or IPv6 /64).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceRate {
    /// New connections per second one source may open, on average.
    pub per_second: f64,
    /// Connections a source may open at once above the average.
    pub burst: u32,
}

/// Everything the proxy needs to run one listener.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Client-facing listen address.
    pub listen: SocketAddr,
    /// More client-facing listen addresses, served alike (the config file's `listen` list).
    pub also_listen: Vec<SocketAddr>,
    /// Admin/metrics listen address; no admin listener when `None`.
    pub admin: Option<SocketAddr>,
    /// The backends, in any order (order never affects routing).
    pub backends: Vec<BackendSpec>,
    /// The key header format.
    pub header: HeaderFormat,
    /// Deadline for the whole key header, from accept.
    pub header_timeout: Duration,
    /// Deadline for each backend connect attempt.
    pub connect_timeout: Duration,
    /// Distinct backends tried per connection (never the same one twice).
    pub max_tries: u32,
    /// Whether a key may go to its next choice when its owner is unreachable.
    pub failover: Failover,
    /// Close a connection when neither direction moved a byte for this long.
    pub idle_timeout: Option<Duration>,
    /// Move bytes with `splice(2)` (the default); `false` copies through a user-space
    /// buffer, for sockets or kernels where splice is unwanted.
    pub splice: bool,
    /// Concurrent client connections; at the limit the proxy stops accepting (the kernel
    /// backlog holds new clients until a slot frees).
    pub max_connections: usize,
    /// Connections allowed in the header phase at once (accepted, key header not complete);
    /// at the limit the proxy stops accepting until one completes or fails. `None`: a
    /// quarter of `max_connections` (see [`ProxyConfig::pending_headers`]).
    pub max_pending_headers: Option<usize>,
    /// Header-phase connections one source (an IPv4 address or an IPv6 /64) may hold; a new
    /// one over it is closed at once and counted. `None`: an eighth of the header-phase
    /// budget (see [`ProxyConfig::pending_headers_per_source`]).
    pub max_pending_headers_per_source: Option<usize>,
    /// Time connections get to finish on shutdown.
    pub drain_timeout: Duration,
    /// Splice pipes open at once, process-wide (pooled ones included); over it a bulk
    /// direction copies instead. `None`: a quarter of `max_connections`, within what the fd
    /// limit leaves after the connections.
    pub max_pipes: Option<usize>,
    /// Deadline for an admin request head, from the connection's accept or its last
    /// response; also the admin keep-alive idle limit.
    pub admin_header_timeout: Duration,
    /// Direct server return (`--dsr`): hand connections whose backend has an agent to it.
    pub dsr: Option<DsrConfig>,
    /// Health checking.
    pub health: HealthConfig,
    /// Policy for established connections whose key changed owner.
    pub owner_change: OwnerChange,
    /// Per-source connection rate limit (`None`: off).
    pub source_rate: Option<SourceRate>,
    /// Send a PROXY protocol v2 header to backends that do not say otherwise.
    pub proxy_protocol: bool,
    /// File holding the admin API's bearer token; mutating admin routes need it when set,
    /// and an admin listener off loopback requires it.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Unix socket where this process hands its listeners to a successor
    /// (zero-downtime upgrade); `None`: no upgrades.
    pub upgrade_socket: Option<std::path::PathBuf>,
    /// The membership comes from etcd (`--membership`): `backends` is filled from there at
    /// start and follows the prefix; the admin API cannot change it.
    pub membership: Option<MembershipConfig>,
}

/// Default time membership events are collected before one table swap.
pub const DEFAULT_MEMBERSHIP_DEBOUNCE: Duration = Duration::from_millis(100);
/// Longest membership debounce accepted.
pub const MAX_MEMBERSHIP_DEBOUNCE: Duration = Duration::from_secs(60);

/// Where the membership comes from when it is not local: an etcd prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipConfig {
    /// `etcd://HOST:PORT[,HOST:PORT...]/PREFIX`.
    pub url: crate::membership::MembershipUrl,
    /// Last membership seen, used at start when etcd cannot be reached.
    pub cache_file: Option<std::path::PathBuf>,
    /// Events within this time are applied as one table swap.
    pub debounce: Duration,
    /// TLS and authentication towards etcd.
    pub security: crate::membership::EtcdSecurity,
}

impl MembershipConfig {
    /// The settings for `url` with the default debounce and no cache file.
    pub fn new(url: crate::membership::MembershipUrl) -> Self {
        MembershipConfig {
            url,
            cache_file: None,
            debounce: DEFAULT_MEMBERSHIP_DEBOUNCE,
            security: crate::membership::EtcdSecurity::default(),
        }
    }
}

/// Default time an agent has to answer a hand-off (rebuilt or failed).
pub const DEFAULT_HANDOFF_TIMEOUT: Duration = Duration::from_millis(500);
/// Default lifetime of a handed-off flow's steering entry without news from its agent
/// (the proxy renews it while the agent's control connection is up).
pub const DEFAULT_DSR_FLOW_TIMEOUT: Duration = Duration::from_secs(600);

/// Direct server return settings (docs/design.md §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsrConfig {
    /// The uplink whose ingress steers handed-off flows (`--dsr-device`).
    pub device: String,
    /// The control channel's shared secret (`--dsr-secret-file`), at least 16 bytes.
    pub secret_file: std::path::PathBuf,
    /// Time an agent has to answer a hand-off before the proxy keeps the connection.
    pub handoff_timeout: Duration,
    /// Steering entries expire after this long unless renewed.
    pub flow_timeout: Duration,
    /// Only keys starting with one of these bytes strings are handed off (empty: all).
    pub key_prefixes: Vec<Vec<u8>>,
}

impl DsrConfig {
    /// DSR on `device` with the secret at `secret_file` and default timeouts.
    pub fn new(device: impl Into<String>, secret_file: impl Into<std::path::PathBuf>) -> Self {
        DsrConfig {
            device: device.into(),
            secret_file: secret_file.into(),
            handoff_timeout: DEFAULT_HANDOFF_TIMEOUT,
            flow_timeout: DEFAULT_DSR_FLOW_TIMEOUT,
            key_prefixes: Vec::new(),
        }
    }

    /// Whether a connection with `key` is to be handed off (its backend having an agent).
    pub fn wants(&self, key: &[u8]) -> bool {
        self.key_prefixes.is_empty() || self.key_prefixes.iter().any(|p| key.starts_with(p))
    }
}

impl ProxyConfig {
    /// A configuration with every default, for `listen` and `backends`.
    pub fn new(listen: SocketAddr, backends: Vec<BackendSpec>) -> Self {
        ProxyConfig {
            listen,
            admin: None,
            backends,
            header: HeaderFormat::default(),
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_tries: DEFAULT_MAX_TRIES,
            failover: Failover::Next,
            idle_timeout: None,
            splice: true,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending_headers: None,
            max_pending_headers_per_source: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_pipes: None,
            admin_header_timeout: DEFAULT_ADMIN_HEADER_TIMEOUT,
            dsr: None,
            also_listen: Vec::new(),
            health: HealthConfig::default(),
            owner_change: OwnerChange::Keep,
            source_rate: None,
            proxy_protocol: false,
            admin_token_file: None,
            upgrade_socket: None,
            membership: None,
        }
    }

    /// Checks every value and their consistency; the error says what to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // From etcd, the set may be empty (connections end with no_backend until a backend
        // appears); a local set may not.
        if self.backends.is_empty() && self.membership.is_none() {
            return Err(ConfigError::NoBackends);
        }
        if let Some(m) = &self.membership {
            if m.debounce > MAX_MEMBERSHIP_DEBOUNCE {
                return Err(ConfigError::Invalid {
                    field: "membership.debounce",
                    why: format!(
                        "{:?} is longer than {MAX_MEMBERSHIP_DEBOUNCE:?}",
                        m.debounce
                    ),
                });
            }
            match m.security.check() {
                Ok(()) => {}
                Err(crate::membership::EtcdError::Security { field, why }) => {
                    return Err(ConfigError::Invalid { field, why })
                }
                Err(e) => {
                    return Err(ConfigError::Invalid {
                        field: "--membership",
                        why: e.to_string(),
                    })
                }
            }
        }
        Router::new(self.backends.iter().map(|b| (b.name.as_str(), b.weight)))?;
        let invalid = |field, why: String| Err(ConfigError::Invalid { field, why });
        let max_len = self.header.len_bytes.max_value();
        if self.header.max_key_len == 0 {
            return invalid("--max-key-len", "must be at least 1".into());
        }
        if u64::from(self.header.max_key_len) > max_len {
            return invalid(
                "--max-key-len",
                format!(
                    "{} does not fit a {}-byte length field (at most {max_len})",
                    self.header.max_key_len,
                    self.header.len_bytes.width()
                ),
            );
        }
        if self.header.max_key_len > MAX_KEY_LEN_LIMIT {
            return invalid(
                "--max-key-len",
                format!("at most {MAX_KEY_LEN_LIMIT} bytes (the header is buffered in memory)"),
            );
        }
        for (field, d) in [
            ("--header-timeout", self.header_timeout),
            ("--connect-timeout", self.connect_timeout),
            ("admin_header_timeout", self.admin_header_timeout),
        ] {
            if d.is_zero() {
                return invalid(field, "must be greater than zero".into());
            }
        }
        if !(1..=MAX_TRIES).contains(&self.max_tries) {
            return invalid("--max-tries", format!("must be 1..={MAX_TRIES}"));
        }
        if self.max_connections == 0 {
            return invalid("--max-connections", "must be at least 1".into());
        }
        if self.max_pending_headers == Some(0) {
            return invalid(
                "--max-pending-headers",
                "must be at least 1 (leave it out for a quarter of --max-connections)".into(),
            );
        }
        if let Some(n) = self
            .max_pending_headers
            .filter(|n| *n > self.max_connections)
        {
            return invalid(
                "--max-pending-headers",
                format!(
                    "{n} is more than --max-connections ({}); a connection in the header \
                     phase is one of them",
                    self.max_connections
                ),
            );
        }
        if self.max_pending_headers_per_source == Some(0) {
            return invalid(
                "--max-pending-headers-per-source",
                "must be at least 1 (leave it out for an eighth of --max-pending-headers)".into(),
            );
        }
        let budget = self.pending_headers();
        if let Some(n) = self.max_pending_headers_per_source.filter(|n| *n > budget) {
            return invalid(
                "--max-pending-headers-per-source",
                format!(
                    "{n} is more than the header-phase budget ({budget}, --max-pending-headers \
                     or a quarter of --max-connections); lower it or raise that budget"
                ),
            );
        }
        if self.idle_timeout.is_some_and(|d| d.is_zero()) {
            return invalid("--idle-timeout", "use 'off' rather than 0".into());
        }
        // Before the DSR checks, so this one is the error reported.
        if self.upgrade_socket.is_some() && self.dsr.is_some() {
            return invalid(
                "--upgrade-socket",
                "cannot be combined with --dsr yet: the successor would replace the running \
                 proxy's nftables steering table (and cut the flows handed off through it); \
                 drop --upgrade-socket, or run without --dsr"
                    .into(),
            );
        }
        if let Some(dsr) = &self.dsr {
            self.validate_dsr(dsr)?;
        }
        self.validate_control()?;
        Ok(())
    }

    /// Health, limits and admin-access settings.
    fn validate_control(&self) -> Result<(), ConfigError> {
        let invalid = |field, why: String| Err(ConfigError::Invalid { field, why });
        let h = &self.health;
        for (field, d) in [
            ("health.interval", h.interval),
            ("health.timeout", h.timeout),
            ("health.eject_time", h.eject_time),
        ] {
            if d.is_zero() {
                return invalid(field, "must be greater than zero".into());
            }
        }
        if h.max_eject_time < h.eject_time {
            return invalid(
                "health.max_eject_time",
                format!(
                    "{:?} is shorter than health.eject_time ({:?})",
                    h.max_eject_time, h.eject_time
                ),
            );
        }
        if !(0.0..=0.5).contains(&h.jitter) {
            return invalid(
                "health.jitter",
                format!("{} is not within 0.0..=0.5", h.jitter),
            );
        }
        if h.fall == 0 || h.rise == 0 {
            return invalid("health.fall/rise", "must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&h.max_down_share) {
            return invalid(
                "health.max_down_share",
                format!("{} is not a share within 0.0..=1.0", h.max_down_share),
            );
        }
        if h.expect
            .as_ref()
            .is_some_and(|e| e.is_empty() || e.len() > 4096)
            || h.send
                .as_ref()
                .is_some_and(|s| s.is_empty() || s.len() > 4096)
        {
            return invalid("health.send/expect", "must be 1 to 4096 bytes".into());
        }
        if let OwnerChange::Close { grace } = self.owner_change {
            if grace > Duration::from_secs(24 * 3600) {
                return invalid("owner_change_grace", "at most 24h".into());
            }
        }
        if let Some(r) = self.source_rate {
            if !(r.per_second.is_finite() && r.per_second > 0.0) || r.burst == 0 {
                return invalid(
                    "source_rate",
                    "a rate above 0 per second and a burst of at least 1".into(),
                );
            }
        }
        if let Some(admin) = self.admin {
            if !admin.ip().is_loopback() && self.admin_token_file.is_none() {
                return invalid(
                    "--admin",
                    format!(
                        "{admin} is not a loopback address: give --admin-token-file (the \
                         admin API changes the routing table) or bind it to 127.0.0.1"
                    ),
                );
            }
        }
        if let Some(path) = &self.admin_token_file {
            if let Err(why) = read_token(path) {
                return invalid("--admin-token-file", why);
            }
        }
        Ok(())
    }

    fn validate_dsr(&self, dsr: &DsrConfig) -> Result<(), ConfigError> {
        let invalid = |field, why: String| Err(ConfigError::Invalid { field, why });
        match self.listen {
            SocketAddr::V4(a) if !a.ip().is_unspecified() && a.port() != 0 => {}
            other => {
                return invalid(
                    "--listen",
                    format!(
                        "{other}: with --dsr the listen address is the virtual IP the backends \
                         answer from, so give one IPv4 address and a fixed port (not 0.0.0.0, \
                         not port 0, not IPv6)"
                    ),
                )
            }
        }
        let d = &dsr.device;
        if d.is_empty()
            || d.len() > 15
            || !d
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return invalid(
                "--dsr-device",
                format!("{d:?} is not an interface name (1-15 characters of [A-Za-z0-9_.-])"),
            );
        }
        if let Err(e) = crate::dsr::control::Secret::from_file(&dsr.secret_file) {
            return invalid("--dsr-secret-file", e.to_string());
        }
        for (field, t) in [
            ("--dsr-handoff-timeout", dsr.handoff_timeout),
            ("--dsr-flow-timeout", dsr.flow_timeout),
        ] {
            if t.is_zero() {
                return invalid(field, "must be greater than zero".into());
            }
        }
        if let Some(b) = self
            .backends
            .iter()
            .find(|b| b.agent.is_some_and(|a| !a.is_ipv4()) || !b.addr.is_ipv4())
            .filter(|b| b.agent.is_some())
        {
            return invalid(
                "--backend",
                format!(
                    "{}: DSR hand-off is IPv4 only (backend and agent addresses)",
                    b.name
                ),
            );
        }
        Ok(())
    }

    /// The header-phase budget in force: `max_pending_headers`, or a quarter of
    /// `max_connections`; never more than `max_connections` nor less than 1.
    pub fn pending_headers(&self) -> usize {
        self.max_pending_headers
            .unwrap_or(self.max_connections / PENDING_HEADERS_DIVISOR)
            .min(self.max_connections)
            .max(1)
    }

    /// The per-source header-phase cap in force: `max_pending_headers_per_source`, or an
    /// eighth of [`ProxyConfig::pending_headers`]; never more than that budget nor less
    /// than 1.
    pub fn pending_headers_per_source(&self) -> usize {
        let budget = self.pending_headers();
        self.max_pending_headers_per_source
            .unwrap_or(budget / PENDING_HEADERS_PER_SOURCE_DIVISOR)
            .min(budget)
            .max(1)
    }

    /// Distinct backends a connection may try, given the failover policy.
    pub fn effective_tries(&self) -> u32 {
        match self.failover {
            Failover::Next => self.max_tries,
            Failover::None => 1,
        }
    }
}

/// Reads an admin bearer token: the file's first line, trimmed, at least 16 bytes of
/// visible ASCII.
pub fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{}: the token must be at least 16 visible ASCII characters on the first line",
            path.display()
        ));
    }
    Ok(token)
}

/// Largest `max_key_len` accepted (64 KiB): the header is buffered per connection.
pub const MAX_KEY_LEN_LIMIT: u32 = 65_536;

/// Parses a duration as `250ms`, `5s`, `1m` (or any humantime form).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration ({e}); write e.g. 250ms, 5s or 1m"))
}

/// Parses an optional duration: `off`, `none` or `0` mean no timeout.
pub fn parse_optional_duration(text: &str) -> Result<Option<Duration>, String> {
    match text.trim() {
        "off" | "none" | "0" => Ok(None),
        other => parse_duration(other).map(Some),
    }
}

/// Parses the length-field width flag.
pub fn parse_len_bytes(text: &str) -> Result<LenBytes, String> {
    text.trim()
        .parse::<u8>()
        .ok()
        .and_then(LenBytes::from_width)
        .ok_or_else(|| format!("{text:?}: the length field is 1, 2 or 4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_specs() {
        let b: BackendSpec = "b1=127.0.0.1:9001".parse().unwrap();
        assert_eq!((b.name.as_str(), b.weight), ("b1", 1));
        let b: BackendSpec = "b2=127.0.0.1:9002,weight=2".parse().unwrap();
        assert_eq!(b.weight, 2);
        let b: BackendSpec = "drained=localhost:9003,weight=0".parse().unwrap();
        assert_eq!(b.weight, 0);
        for bad in [
            "127.0.0.1:9001",
            "=127.0.0.1:1",
            "b=nonsense",
            "b=127.0.0.1:1,weight=x",
            "b=127.0.0.1:1,weight=-1",
            "b=127.0.0.1:1,colour=red",
            "a b=127.0.0.1:1",
        ] {
            let err = bad.parse::<BackendSpec>().unwrap_err().to_string();
            assert!(err.contains("expected NAME=HOST:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn backend_agents_and_dsr_key_prefixes() {
        let b: BackendSpec = "b1=10.0.0.11:9000,agent=10.0.0.11:7100,weight=3"
            .parse()
            .unwrap();
        assert_eq!(b.agent, Some("10.0.0.11:7100".parse().unwrap()));
        assert_eq!(b.weight, 3);
        // Display round-trips, agent included.
        assert_eq!(b.to_string().parse::<BackendSpec>().unwrap(), b);
        let plain: BackendSpec = "b2=10.0.0.12:9000".parse().unwrap();
        assert_eq!(plain.agent, None);
        assert!("b=127.0.0.1:1,agent=".parse::<BackendSpec>().is_err());
        // The agent never affects routing: the same names and weights route alike.
        let with = Router::new([("b1", 3), ("b2", 1)]).unwrap();
        assert_eq!(
            with.fingerprint(),
            Router::new([("b1", 3), ("b2", 1)]).unwrap().fingerprint()
        );

        let mut d = DsrConfig::new("eth0", "/s");
        assert!(d.wants(b"anything"));
        d.key_prefixes = vec![b"snap:".to_vec(), b"dump:".to_vec()];
        assert!(d.wants(b"snap:42") && d.wants(b"dump:"));
        assert!(!d.wants(b"user:1") && !d.wants(b"snap"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_optional_duration("off"), Ok(None));
    }

    #[test]
    fn header_phase_budgets_follow_max_connections_unless_set() {
        let listen = "127.0.0.1:0".parse().unwrap();
        let mut c = ProxyConfig::new(listen, vec!["a=127.0.0.1:1".parse().unwrap()]);
        assert_eq!(
            (c.pending_headers(), c.pending_headers_per_source()),
            (2048, 256)
        );
        c.max_connections = 1000;
        assert_eq!(
            (c.pending_headers(), c.pending_headers_per_source()),
            (250, 31)
        );
        // Lowered to fit the fd limit after validation: explicit values are clamped to it.
        c.max_pending_headers = Some(500);
        c.max_pending_headers_per_source = Some(400);
        c.max_connections = 300;
        assert_eq!(
            (c.pending_headers(), c.pending_headers_per_source()),
            (300, 300)
        );
        c.max_connections = 3;
        c.max_pending_headers = None;
        c.max_pending_headers_per_source = None;
        assert_eq!(
            (c.pending_headers(), c.pending_headers_per_source()),
            (1, 1)
        );
    }

    #[test]
    fn validation_says_what_to_fix() {
        let b = |s: &str| s.parse::<BackendSpec>().unwrap();
        let listen = "127.0.0.1:0".parse().unwrap();
        let mut c = ProxyConfig::new(listen, vec![b("a=127.0.0.1:1"), b("a=127.0.0.1:2")]);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("appears twice"));
        c.backends.pop();
        c.validate().unwrap();
        c.header.len_bytes = LenBytes::One;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--max-key-len"));
        c.header.len_bytes = LenBytes::Two;
        c.max_tries = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--max-tries"));
        c.max_tries = 3;
        c.validate().unwrap();
        for (pending, per_source, flag) in [
            (Some(0), None, "--max-pending-headers"),
            (Some(9000), None, "--max-pending-headers"),
            (None, Some(0), "--max-pending-headers-per-source"),
            (None, Some(2049), "--max-pending-headers-per-source"),
            (Some(10), Some(11), "--max-pending-headers-per-source"),
        ] {
            c.max_pending_headers = pending;
            c.max_pending_headers_per_source = per_source;
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(flag), "{pending:?}/{per_source:?}: {err}");
        }
        c.max_pending_headers = None;
        c.max_pending_headers_per_source = None;
        c.backends.clear();
        assert!(matches!(c.validate(), Err(ConfigError::NoBackends)));
    }

    #[test]
    fn an_empty_backend_set_is_valid_only_from_etcd() {
        let mut c = ProxyConfig::new(([127, 0, 0, 1], 0).into(), Vec::new());
        assert!(matches!(c.validate(), Err(ConfigError::NoBackends)));
        let url = "etcd://127.0.0.1:2379/sp".parse().unwrap();
        c.membership = Some(MembershipConfig::new(url));
        c.validate().expect("an empty set from etcd is valid");
        if let Some(m) = &mut c.membership {
            m.debounce = Duration::from_secs(61);
        }
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("membership.debounce"), "{e}");
    }
}
