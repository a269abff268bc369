//! The TOML configuration file: `shardproxy run --config FILE` and `shardproxy check FILE`
//! (the keys, their defaults and meanings are in README.md, "Operating").
//!
//! The file is deserialized with serde into structs that refuse unknown keys, converted into
//! a [`ProxyConfig`] (plus the worker count, which is not part of it) and validated with
//! [`ProxyConfig::validate`]. Every error names the file, the line and column, the key and
//! what to write instead: syntax and type errors from toml's spans, value errors from the
//! spans kept next to each value ([`toml::Spanned`]), and `validate()`'s errors (which name
//! command-line flags) translated to the file's keys. Relative paths in the file are relative
//! to the file's directory. Nothing here opens a socket; [`load`] only reads the file (and
//! `validate()` the token and secret files it names).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use crate::config::{
    parse_duration, parse_optional_duration, resolve, BackendSpec, DsrConfig, Failover,
    HealthConfig, MembershipConfig, OwnerChange, ProxyConfig, SourceRate,
};
use crate::error::ConfigError;
use crate::header::{Endian, HeaderFormat, HeaderMode, LenBytes};
use crate::routing::MAX_WEIGHT;

/// Grace period of `owner_change.policy = "close"` when `grace` is not given.
pub const DEFAULT_OWNER_CHANGE_GRACE: Duration = Duration::from_secs(30);
/// Largest `workers` value (as for `--workers`).
pub const MAX_WORKERS: u16 = 1024;

/// A loaded and validated configuration file.
#[derive(Debug, Clone)]
pub struct FileConfig {
    /// Everything the proxy runs with.
    pub proxy: ProxyConfig,
    /// The `workers` key (worker threads); `None`: one per core, or `--workers`.
    pub workers: Option<u16>,
}

impl FileConfig {
    /// One line for `shardproxy check`: listeners, backends, health checks, workers.
    pub fn summary(&self) -> String {
        let p = &self.proxy;
        let listeners: Vec<String> = std::iter::once(p.listen)
            .chain(p.also_listen.iter().copied())
            .map(|a| a.to_string())
            .collect();
        let names: Vec<&str> = p.backends.iter().map(|b| b.name.as_str()).collect();
        let health = if p.health.active {
            format!(
                "health checks on (every {}, fall {}, rise {})",
                humantime::format_duration(p.health.interval),
                p.health.fall,
                p.health.rise
            )
        } else {
            "health checks off".to_string()
        };
        let mut line = format!(
            "ok: listen {}; {} backend{} ({}); {health}",
            listeners.join(", "),
            names.len(),
            if names.len() == 1 { "" } else { "s" },
            names.join(", ")
        );
        if let Some(m) = &p.membership {
            line = line.replacen(
                &format!("{} backends ()", names.len()),
                &format!("backends from {}", m.url),
                1,
            );
        }
        if let Some(admin) = p.admin {
            line.push_str(&format!("; admin {admin}"));
        }
        if let Some(w) = self.workers {
            line.push_str(&format!("; {w} workers"));
        }
        line
    }
}

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("{}: cannot read the config file: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A syntax, type or value error at a place in the file.
    #[error("{}:{line}:{col}: {key}: {why}", path.display())]
    At {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column (in characters).
        col: usize,
        /// The key, dotted with its section (`health.interval`, `backend.weight`).
        key: String,
        /// What is wrong and what to write instead.
        why: String,
    },
}

impl ConfigFileError {
    /// The 1-based line of the error, if it has one (not for an unreadable file).
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigFileError::At { line, .. } => Some(*line),
            ConfigFileError::Read { .. } => None,
        }
    }

    /// The key the error is about, if it has one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigFileError::At { key, .. } => Some(key),
            ConfigFileError::Read { .. } => None,
        }
    }
}

/// Reads, parses and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<FileConfig, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and validates configuration `text` read from `path` (used in messages and as the
/// base of relative paths).
pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigFileError> {
    let cx = Cx::new(text, path);
    let file: File = toml::from_str(text).map_err(|e| cx.toml_error(&e))?;
    let mut spans = Spans::default();
    let (proxy, workers) = cx.convert(file, &mut spans)?;
    if let Err(e) = proxy.validate() {
        return Err(cx.validate_error(e, &spans));
    }
    Ok(FileConfig { proxy, workers })
}

// ---------------------------------------------------------------------------------------
// The file's shape. Numbers are read as i64 and range-checked here, for messages that say
// what to write; every value keeps its span.

type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: S<Listen>,
    admin: Option<S<String>>,
    admin_token_file: Option<S<PathBuf>>,
    upgrade_socket: Option<S<PathBuf>>,
    workers: Option<S<i64>>,
    failover: Option<S<FailoverKey>>,
    max_tries: Option<S<i64>>,
    proxy_protocol: Option<S<ProxyProtocolKey>>,
    splice: Option<bool>,
    #[serde(default)]
    header: HeaderSection,
    #[serde(default)]
    timeouts: TimeoutsSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    health: HealthSection,
    #[serde(default)]
    owner_change: OwnerChangeSection,
    dsr: Option<DsrSection>,
    membership: Option<MembershipSection>,
    #[serde(default, rename = "backend")]
    backends: Vec<S<BackendSection>>,
}

/// `[membership]`: the backends come from an etcd prefix (instead of `[[backend]]`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MembershipSection {
    url: S<String>,
    cache_file: Option<S<PathBuf>>,
    debounce: Option<S<String>>,
    ca_file: Option<S<PathBuf>>,
    cert_file: Option<S<PathBuf>>,
    key_file: Option<S<PathBuf>>,
    user: Option<S<String>>,
    password_file: Option<S<PathBuf>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderSection {
    len_bytes: Option<S<i64>>,
    endian: Option<EndianKey>,
    max_key_len: Option<S<i64>>,
    mode: Option<ModeKey>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutsSection {
    header: Option<S<String>>,
    connect: Option<S<String>>,
    idle: Option<S<String>>,
    drain: Option<S<String>>,
    admin_header: Option<S<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    max_connections: Option<S<i64>>,
    max_pending_headers: Option<S<i64>>,
    max_pending_headers_per_source: Option<S<i64>>,
    max_pipes: Option<S<i64>>,
    source_rate: Option<S<f64>>,
    source_burst: Option<S<i64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthSection {
    active: Option<bool>,
    interval: Option<S<String>>,
    timeout: Option<S<String>>,
    jitter: Option<S<f64>>,
    fall: Option<S<i64>>,
    rise: Option<S<i64>>,
    send: Option<S<String>>,
    send_hex: Option<S<String>>,
    expect: Option<S<String>>,
    expect_hex: Option<S<String>>,
    eject_after: Option<S<i64>>,
    eject_time: Option<S<String>>,
    max_eject_time: Option<S<String>>,
    max_down_share: Option<S<f64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnerChangeSection {
    policy: Option<PolicyKey>,
    grace: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DsrSection {
    device: S<String>,
    secret_file: S<PathBuf>,
    handoff_timeout: Option<S<String>>,
    flow_timeout: Option<S<String>>,
    #[serde(default)]
    key_prefixes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendSection {
    name: S<String>,
    addr: S<String>,
    weight: Option<S<i64>>,
    max_connections: Option<S<i64>>,
    agent: Option<S<String>>,
    proxy_protocol: Option<S<ProxyProtocolKey>>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum FailoverKey {
    Next,
    None,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ProxyProtocolKey {
    V2,
    None,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum EndianKey {
    Big,
    Little,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ModeKey {
    Forward,
    Strip,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum PolicyKey {
    Keep,
    Close,
}

/// `listen`: one address, or a list of them (each with its span).
enum Listen {
    One(String),
    Many(Vec<S<String>>),
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Listen;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an address \"HOST:PORT\" or a list of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Listen, E> {
                Ok(Listen::One(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Listen, A::Error> {
                let mut all = Vec::new();
                while let Some(a) = seq.next_element::<S<String>>()? {
                    all.push(a);
                }
                Ok(Listen::Many(all))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------
// Conversion.

/// Spans of the values `validate()` may complain about, by dotted key.
#[derive(Default)]
struct Spans(HashMap<&'static str, Range<usize>>);

impl Spans {
    fn note<T>(&mut self, key: &'static str, v: &Option<S<T>>) {
        if let Some(v) = v {
            self.0.insert(key, v.span());
        }
    }
}

/// The text being parsed and where it came from.
struct Cx<'a> {
    text: &'a str,
    path: &'a Path,
    dir: PathBuf,
}

type Res<T> = Result<T, ConfigFileError>;

impl<'a> Cx<'a> {
    fn new(text: &'a str, path: &'a Path) -> Self {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Cx { text, path, dir }
    }

    /// An error at byte `offset` about `key`.
    fn at(&self, offset: usize, key: &str, why: impl Into<String>) -> ConfigFileError {
        let (line, col) = line_col(self.text, offset);
        ConfigFileError::At {
            path: self.path.to_path_buf(),
            line,
            col,
            key: key.to_string(),
            why: why.into(),
        }
    }

    fn err<T>(&self, v: &S<T>, key: &str, why: impl Into<String>) -> ConfigFileError {
        self.at(v.span().start, key, why)
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigFileError {
        let why = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ")
            .replace("expected i64", "expected a whole number")
            .replace("expected f64", "expected a number");
        let span = e.span().unwrap_or(0..0);
        let mut key = key_at(self.text, span.clone());
        // "missing field `addr`": the span is the table; name the missing key.
        if let Some(missing) = why
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            // The span is the table missing it; the whole document for a top-level key.
            // (toml gives 0..0 for the document.)
            let whole =
                span.start == 0 && (span.end == 0 || span.end >= self.text.trim_end().len());
            let section = if whole {
                None
            } else {
                section_at(self.text, span.start)
            };
            key = match section {
                Some(s) => format!("{s}.{missing}"),
                None => missing.to_string(),
            };
            return self.at(
                span.start,
                &key,
                format!("{why}: this key is required, add `{missing} = ...`"),
            );
        }
        if key.is_empty() {
            key = "(file)".to_string();
        }
        self.at(span.start, &key, why)
    }

    fn duration(&self, v: &Option<S<String>>, key: &str, default: Duration) -> Res<Duration> {
        match v {
            None => Ok(default),
            Some(v) => parse_duration(v.get_ref()).map_err(|why| self.err(v, key, why)),
        }
    }

    /// A whole number in `min..=max`.
    fn int(&self, v: &S<i64>, key: &str, min: i64, max: i64, hint: &str) -> Res<i64> {
        let n = *v.get_ref();
        if (min..=max).contains(&n) {
            Ok(n)
        } else {
            Err(self.err(
                v,
                key,
                format!("{n} is out of range: write a whole number {min}..={max}{hint}"),
            ))
        }
    }

    fn opt_usize(&self, v: &Option<S<i64>>, key: &str, min: i64) -> Res<Option<usize>> {
        v.as_ref()
            .map(|v| {
                self.int(v, key, min, i64::from(u32::MAX), "")
                    .map(|n| n as usize)
            })
            .transpose()
    }

    fn opt_u32(&self, v: &Option<S<i64>>, key: &str, min: i64) -> Res<Option<u32>> {
        v.as_ref()
            .map(|v| {
                self.int(v, key, min, i64::from(u32::MAX), "")
                    .map(|n| n as u32)
            })
            .transpose()
    }

    fn path(&self, p: &Path) -> PathBuf {
        if p.is_relative() {
            self.dir.join(p)
        } else {
            p.to_path_buf()
        }
    }

    fn bytes(
        &self,
        text: &Option<S<String>>,
        hex: &Option<S<String>>,
        key: &str,
    ) -> Res<Option<Vec<u8>>> {
        match (text, hex) {
            (Some(_), Some(h)) => Err(self.err(
                h,
                &format!("health.{key}_hex"),
                format!("give {key} (text) or {key}_hex (hex bytes), not both"),
            )),
            (Some(t), None) => Ok(Some(t.get_ref().as_bytes().to_vec())),
            (None, Some(h)) => crate::cli::decode_key(h.get_ref(), true)
                .map(Some)
                .map_err(|why| {
                    self.err(
                        h,
                        &format!("health.{key}_hex"),
                        format!("{why}; write e.g. \"0a0b\""),
                    )
                }),
            (None, None) => Ok(None),
        }
    }

    fn convert(&self, f: File, spans: &mut Spans) -> Res<(ProxyConfig, Option<u16>)> {
        // Listeners.
        let parse_listen = |text: &str, span: Range<usize>| -> Res<SocketAddr> {
            text.trim().parse::<SocketAddr>().map_err(|_| {
                self.at(
                    span.start,
                    "listen",
                    format!("{text:?} is not an IP address and port; write e.g. \"127.0.0.1:7000\" or \"[::1]:7000\""),
                )
            })
        };
        let listen_span = f.listen.span();
        spans.0.insert("listen", listen_span.clone());
        let mut listeners = Vec::new();
        match f.listen.get_ref() {
            Listen::One(a) => listeners.push(parse_listen(a, listen_span.clone())?),
            Listen::Many(all) => {
                for a in all {
                    let addr = parse_listen(a.get_ref(), a.span())?;
                    if listeners.contains(&addr) {
                        return Err(self.err(a, "listen", format!("{addr} is listed twice")));
                    }
                    listeners.push(addr);
                }
            }
        }
        let Some((&listen, also)) = listeners.split_first() else {
            return Err(self.at(
                listen_span.start,
                "listen",
                "the list is empty; give at least one address, e.g. [\"127.0.0.1:7000\"]",
            ));
        };

        // Backends (from etcd with [membership]).
        if f.backends.is_empty() && f.membership.is_none() {
            return Err(self.at(
                self.text.trim_end().len(),
                "backend",
                "no [[backend]] tables; add at least one (or a [membership] section): [[backend]] name = \"b1\" \
                 addr = \"127.0.0.1:9001\"",
            ));
        }
        let mut backends: Vec<BackendSpec> = Vec::new();
        let mut first_line: HashMap<String, usize> = HashMap::new();
        for b in &f.backends {
            let b = b.get_ref();
            let name = b.name.get_ref().trim();
            if name.is_empty()
                || name
                    .chars()
                    .any(|c| c.is_whitespace() || c == ',' || c == '=')
            {
                return Err(self.err(
                    &b.name,
                    "backend.name",
                    format!("{name:?} is not a name: write a non-empty name without spaces, ',' or '=', e.g. \"b1\""),
                ));
            }
            let line = line_col(self.text, b.name.span().start).0;
            if let Some(first) = first_line.get(name) {
                return Err(self.err(
                    &b.name,
                    "backend.name",
                    format!("{name:?} appears twice (first on line {first}); backend names must be unique"),
                ));
            }
            first_line.insert(name.to_string(), line);
            let addr = resolve(b.addr.get_ref().trim()).map_err(|why| {
                self.err(
                    &b.addr,
                    "backend.addr",
                    format!("{why}; write HOST:PORT, e.g. \"127.0.0.1:9001\""),
                )
            })?;
            let mut spec = BackendSpec::new(name, addr);
            if let Some(w) = &b.weight {
                spec.weight = self.int(
                    w,
                    "backend.weight",
                    0,
                    i64::from(MAX_WEIGHT),
                    " (0 takes no new keys)",
                )? as u32;
            }
            spec.max_connections =
                self.opt_usize(&b.max_connections, "backend.max_connections", 1)?;
            if let Some(a) = &b.agent {
                spec.agent = Some(resolve(a.get_ref().trim()).map_err(|why| {
                    self.err(
                        a,
                        "backend.agent",
                        format!("{why}; write HOST:PORT, e.g. \"127.0.0.1:7100\""),
                    )
                })?);
            }
            spec.proxy_protocol = b
                .proxy_protocol
                .as_ref()
                .map(|p| matches!(p.get_ref(), ProxyProtocolKey::V2));
            backends.push(spec);
        }

        let mut c = ProxyConfig::new(listen, backends);
        c.also_listen = also.to_vec();

        // Top level.
        if let Some(a) = &f.admin {
            spans.0.insert("admin", a.span());
            c.admin = Some(a.get_ref().trim().parse().map_err(|_| {
                self.err(
                    a,
                    "admin",
                    format!(
                        "{:?} is not an IP address and port; write e.g. \"127.0.0.1:9100\"",
                        a.get_ref()
                    ),
                )
            })?);
        }
        spans.note("admin_token_file", &f.admin_token_file);
        c.admin_token_file = f.admin_token_file.as_ref().map(|p| self.path(p.get_ref()));
        spans.note("upgrade_socket", &f.upgrade_socket);
        c.upgrade_socket = f.upgrade_socket.as_ref().map(|p| self.path(p.get_ref()));
        let workers = f
            .workers
            .as_ref()
            .map(|w| {
                self.int(w, "workers", 1, i64::from(MAX_WORKERS), "")
                    .map(|n| n as u16)
            })
            .transpose()?;
        if let Some(fo) = &f.failover {
            c.failover = match fo.get_ref() {
                FailoverKey::Next => Failover::Next,
                FailoverKey::None => Failover::None,
            };
        }
        spans.note("max_tries", &f.max_tries);
        if let Some(t) = self.opt_u32(&f.max_tries, "max_tries", 0)? {
            c.max_tries = t;
        }
        if let Some(p) = &f.proxy_protocol {
            c.proxy_protocol = matches!(p.get_ref(), ProxyProtocolKey::V2);
        }
        if let Some(s) = f.splice {
            c.splice = s;
        }

        // [header]
        let h = &f.header;
        let mut fmt = HeaderFormat::default();
        if let Some(lb) = &h.len_bytes {
            spans.0.insert("header.len_bytes", lb.span());
            fmt.len_bytes = u8::try_from(*lb.get_ref())
                .ok()
                .and_then(LenBytes::from_width)
                .ok_or_else(|| {
                    self.err(
                        lb,
                        "header.len_bytes",
                        format!("{}: the length field is 1, 2 or 4 bytes", lb.get_ref()),
                    )
                })?;
        }
        if let Some(e) = h.endian {
            fmt.endian = match e {
                EndianKey::Big => Endian::Big,
                EndianKey::Little => Endian::Little,
            };
        }
        spans.note("header.max_key_len", &h.max_key_len);
        if let Some(n) = self.opt_u32(&h.max_key_len, "header.max_key_len", 0)? {
            fmt.max_key_len = n;
        }
        if let Some(m) = h.mode {
            fmt.mode = match m {
                ModeKey::Forward => HeaderMode::Forward,
                ModeKey::Strip => HeaderMode::Strip,
            };
        }
        c.header = fmt;

        // [timeouts]
        let t = &f.timeouts;
        for (key, v) in [
            ("timeouts.header", &t.header),
            ("timeouts.connect", &t.connect),
            ("timeouts.idle", &t.idle),
            ("timeouts.drain", &t.drain),
            ("timeouts.admin_header", &t.admin_header),
        ] {
            spans.note(key, v);
        }
        c.header_timeout = self.duration(&t.header, "timeouts.header", c.header_timeout)?;
        c.connect_timeout = self.duration(&t.connect, "timeouts.connect", c.connect_timeout)?;
        if let Some(idle) = &t.idle {
            c.idle_timeout = parse_optional_duration(idle.get_ref())
                .map_err(|why| self.err(idle, "timeouts.idle", format!("{why}, or \"off\"")))?;
        }
        c.drain_timeout = self.duration(&t.drain, "timeouts.drain", c.drain_timeout)?;
        c.admin_header_timeout = self.duration(
            &t.admin_header,
            "timeouts.admin_header",
            c.admin_header_timeout,
        )?;

        // [limits]
        let l = &f.limits;
        spans.note("limits.max_connections", &l.max_connections);
        spans.note("limits.max_pending_headers", &l.max_pending_headers);
        spans.note(
            "limits.max_pending_headers_per_source",
            &l.max_pending_headers_per_source,
        );
        spans.note("limits.source_rate", &l.source_rate);
        spans.note("limits.source_burst", &l.source_burst);
        if let Some(n) = self.opt_usize(&l.max_connections, "limits.max_connections", 0)? {
            c.max_connections = n;
        }
        c.max_pending_headers =
            self.opt_usize(&l.max_pending_headers, "limits.max_pending_headers", 0)?;
        c.max_pending_headers_per_source = self.opt_usize(
            &l.max_pending_headers_per_source,
            "limits.max_pending_headers_per_source",
            0,
        )?;
        c.max_pipes = self.opt_usize(&l.max_pipes, "limits.max_pipes", 0)?;
        c.source_rate = match (&l.source_rate, &l.source_burst) {
            (Some(rate), Some(burst)) => Some(SourceRate {
                per_second: *rate.get_ref(),
                burst: self.int(burst, "limits.source_burst", 0, i64::from(u32::MAX), "")? as u32,
            }),
            (Some(rate), None) => {
                return Err(self.err(
                    rate,
                    "limits.source_rate",
                    "source_rate needs source_burst too: add e.g. `source_burst = 20` \
                     (connections a source may open at once above the rate)",
                ))
            }
            (None, Some(burst)) => {
                return Err(self.err(
                    burst,
                    "limits.source_burst",
                    "source_burst needs source_rate (connections per second) too, e.g. \
                     `source_rate = 50.0`",
                ))
            }
            (None, None) => None,
        };

        // [health]
        let hs = &f.health;
        let mut health = HealthConfig::default();
        if let Some(a) = hs.active {
            health.active = a;
        }
        for (key, v) in [
            ("health.interval", &hs.interval),
            ("health.timeout", &hs.timeout),
            ("health.eject_time", &hs.eject_time),
            ("health.max_eject_time", &hs.max_eject_time),
        ] {
            spans.note(key, v);
        }
        spans.note("health.jitter", &hs.jitter);
        spans.note("health.max_down_share", &hs.max_down_share);
        health.interval = self.duration(&hs.interval, "health.interval", health.interval)?;
        health.timeout = self.duration(&hs.timeout, "health.timeout", health.timeout)?;
        if let Some(j) = &hs.jitter {
            health.jitter = *j.get_ref();
        }
        if let Some(n) = self.opt_u32(&hs.fall, "health.fall", 1)? {
            health.fall = n;
        }
        if let Some(n) = self.opt_u32(&hs.rise, "health.rise", 1)? {
            health.rise = n;
        }
        health.send = self.bytes(&hs.send, &hs.send_hex, "send")?;
        health.expect = self.bytes(&hs.expect, &hs.expect_hex, "expect")?;
        for (key, v, text, hex) in [
            ("send", &health.send, &hs.send, &hs.send_hex),
            ("expect", &health.expect, &hs.expect, &hs.expect_hex),
        ] {
            if let (Some(bytes), Some(span)) = (v, text.as_ref().or(hex.as_ref())) {
                if bytes.is_empty() || bytes.len() > 4096 {
                    return Err(self.err(
                        span,
                        &format!("health.{key}{}", if hex.is_some() { "_hex" } else { "" }),
                        format!("{} bytes: write 1 to 4096 bytes", bytes.len()),
                    ));
                }
            }
        }
        if let Some(n) = self.opt_u32(&hs.eject_after, "health.eject_after", 0)? {
            health.eject_after = n;
        }
        health.eject_time =
            self.duration(&hs.eject_time, "health.eject_time", health.eject_time)?;
        health.max_eject_time = self.duration(
            &hs.max_eject_time,
            "health.max_eject_time",
            health.max_eject_time,
        )?;
        if let Some(s) = &hs.max_down_share {
            health.max_down_share = *s.get_ref();
        }
        c.health = health;

        // [owner_change]
        let oc = &f.owner_change;
        spans.note("owner_change.grace", &oc.grace);
        c.owner_change =
            match (oc.policy.unwrap_or(PolicyKey::Keep), &oc.grace) {
                (PolicyKey::Keep, Some(g)) => return Err(self.err(
                    g,
                    "owner_change.grace",
                    "grace applies only to policy = \"close\"; remove it or set policy = \"close\"",
                )),
                (PolicyKey::Keep, None) => OwnerChange::Keep,
                (PolicyKey::Close, g) => OwnerChange::Close {
                    grace: self.duration(g, "owner_change.grace", DEFAULT_OWNER_CHANGE_GRACE)?,
                },
            };

        // [dsr]
        if let Some(d) = &f.dsr {
            spans.0.insert("dsr.device", d.device.span());
            spans.0.insert("dsr.secret_file", d.secret_file.span());
            spans.note("dsr.handoff_timeout", &d.handoff_timeout);
            spans.note("dsr.flow_timeout", &d.flow_timeout);
            let mut dsr = DsrConfig::new(
                d.device.get_ref().clone(),
                self.path(d.secret_file.get_ref()),
            );
            dsr.handoff_timeout = self.duration(
                &d.handoff_timeout,
                "dsr.handoff_timeout",
                dsr.handoff_timeout,
            )?;
            dsr.flow_timeout =
                self.duration(&d.flow_timeout, "dsr.flow_timeout", dsr.flow_timeout)?;
            dsr.key_prefixes = d
                .key_prefixes
                .iter()
                .map(|p| p.as_bytes().to_vec())
                .collect();
            c.dsr = Some(dsr);
        }
        // [membership]
        if let Some(m) = &f.membership {
            if let Some(b) = f.backends.first() {
                return Err(self.err(
                    b,
                    "backend",
                    "[membership] is set: the backends come from etcd; remove the [[backend]] \
                     tables or the [membership] section",
                ));
            }
            spans.0.insert("membership.url", m.url.span());
            spans.note("membership.debounce", &m.debounce);
            let url = m
                .url
                .get_ref()
                .parse()
                .map_err(|e: crate::membership::EtcdError| {
                    self.err(&m.url, "membership.url", e.to_string())
                })?;
            let mut mc = MembershipConfig::new(url);
            mc.cache_file = m.cache_file.as_ref().map(|p| self.path(p.get_ref()));
            mc.debounce = self.duration(&m.debounce, "membership.debounce", mc.debounce)?;
            for (key, file) in [
                ("membership.ca_file", &m.ca_file),
                ("membership.cert_file", &m.cert_file),
                ("membership.key_file", &m.key_file),
                ("membership.password_file", &m.password_file),
            ] {
                spans.note(key, file);
            }
            spans.note("membership.user", &m.user);
            let file = |f: &Option<S<PathBuf>>| f.as_ref().map(|p| self.path(p.get_ref()));
            mc.security = crate::membership::EtcdSecurity {
                ca_file: file(&m.ca_file),
                cert_file: file(&m.cert_file),
                key_file: file(&m.key_file),
                user: m.user.as_ref().map(|u| u.get_ref().clone()),
                password_file: file(&m.password_file),
            };
            c.membership = Some(mc);
        }
        // Kept for locating validate()'s `--backend` errors (DSR: IPv4 only).
        for (b, spec) in f.backends.iter().zip(&c.backends) {
            if spec.agent.is_some()
                && !(spec.addr.is_ipv4() && spec.agent.is_some_and(|a| a.is_ipv4()))
            {
                spans.0.entry("backend").or_insert(b.get_ref().addr.span());
            }
        }
        Ok((c, workers))
    }

    /// Translates a `validate()` error (which names flags) into the file's key and place.
    fn validate_error(&self, e: ConfigError, spans: &Spans) -> ConfigFileError {
        let (field, why) = match e {
            ConfigError::Invalid { field, why } => (field, why),
            ConfigError::NoBackends => ("--backend", e.to_string()),
            other => ("--backend", other.to_string()),
        };
        let candidates: &[&'static str] = match field {
            "--max-key-len" => &["header.max_key_len", "header.len_bytes"],
            "--header-timeout" => &["timeouts.header"],
            "--connect-timeout" => &["timeouts.connect"],
            "admin_header_timeout" => &["timeouts.admin_header"],
            "--max-tries" => &["max_tries"],
            "--max-connections" => &["limits.max_connections"],
            "--max-pending-headers" => &["limits.max_pending_headers", "limits.max_connections"],
            "--max-pending-headers-per-source" => &[
                "limits.max_pending_headers_per_source",
                "limits.max_pending_headers",
                "limits.max_connections",
            ],
            "--idle-timeout" => &["timeouts.idle"],
            "--listen" => &["listen"],
            "--dsr-device" => &["dsr.device"],
            "--dsr-secret-file" => &["dsr.secret_file"],
            "--dsr-handoff-timeout" => &["dsr.handoff_timeout"],
            "--dsr-flow-timeout" => &["dsr.flow_timeout"],
            "--backend" => &["backend"],
            "health.interval" => &["health.interval"],
            "health.timeout" => &["health.timeout"],
            "health.eject_time" => &["health.eject_time"],
            "health.max_eject_time" => &["health.max_eject_time", "health.eject_time"],
            "health.jitter" => &["health.jitter"],
            "health.max_down_share" => &["health.max_down_share"],
            "owner_change_grace" => &["owner_change.grace"],
            "source_rate" => &["limits.source_rate", "limits.source_burst"],
            "--admin" => &["admin"],
            "--admin-token-file" => &["admin_token_file"],
            "--upgrade-socket" => &["upgrade_socket"],
            "membership.debounce" => &["membership.debounce"],
            "--membership" => &["membership.url"],
            "--etcd-ca" => &["membership.ca_file"],
            "--etcd-cert" => &["membership.cert_file", "membership.ca_file"],
            "--etcd-key" => &["membership.key_file", "membership.cert_file"],
            "--etcd-user" => &["membership.user", "membership.password_file"],
            "--etcd-password-file" => &["membership.password_file", "membership.user"],
            _ => &[],
        };
        let found = candidates
            .iter()
            .find_map(|k| spans.0.get(k).map(|s| (*k, s.start)));
        let (key, offset) = match (found, candidates.first()) {
            (Some((k, off)), _) => (k.to_string(), off),
            (None, Some(k)) => (k.to_string(), 0),
            (None, None) => (field.trim_start_matches("--").replace('-', "_"), 0),
        };
        self.at(offset, &key, flags_to_keys(&why))
    }
}

/// Replaces the flag names in a `validate()` message with the file's keys.
fn flags_to_keys(why: &str) -> String {
    const MAP: &[(&str, &str)] = &[
        (
            "--max-pending-headers-per-source",
            "limits.max_pending_headers_per_source",
        ),
        ("--max-pending-headers", "limits.max_pending_headers"),
        ("--max-connections", "limits.max_connections"),
        ("--admin-token-file", "admin_token_file"),
        ("--etcd-password-file", "membership.password_file"),
        ("--etcd-cert", "membership.cert_file"),
        ("--etcd-key", "membership.key_file"),
        ("--etcd-user", "membership.user"),
        ("--etcd-ca", "membership.ca_file"),
        ("--upgrade-socket", "upgrade_socket"),
        ("--dsr-secret-file", "dsr.secret_file"),
        ("--dsr-device", "dsr.device"),
        ("--max-key-len", "header.max_key_len"),
        ("--backend", "[[backend]]"),
        ("--listen", "listen"),
        ("--admin", "admin"),
        ("--dsr", "[dsr]"),
    ];
    let mut out = why.to_string();
    for (flag, key) in MAP {
        out = out.replace(flag, key);
    }
    out
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = floor_boundary(text, offset);
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, text[line_start..offset].chars().count() + 1)
}

fn floor_boundary(text: &str, offset: usize) -> usize {
    let mut o = offset.min(text.len());
    while !text.is_char_boundary(o) {
        o -= 1;
    }
    o
}

/// The table header (`[health]`, `[[backend]]`) in force at byte `offset`, without brackets.
fn section_at(text: &str, offset: usize) -> Option<String> {
    let offset = floor_boundary(text, offset);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    text[..line_end]
        .lines()
        .rev()
        .find_map(|l| header_name(l.trim()))
}

/// `[[backend]]` → `backend`, `[ health ]  # c` → `health`; `None` if not a header line.
fn header_name(line: &str) -> Option<String> {
    let inner = line.strip_prefix('[')?;
    let inner = inner.strip_prefix('[').unwrap_or(inner);
    // An unclosed header (a syntax error being reported) still names its table.
    let end = inner.find(']').unwrap_or(inner.len());
    Some(unquote(inner[..end].trim()))
}

fn unquote(key: &str) -> String {
    key.split('.')
        .map(|p| p.trim().trim_matches(|c| c == '"' || c == '\''))
        .collect::<Vec<_>>()
        .join(".")
}

/// The dotted key of the value or key at `span` (for toml's errors, which carry a span only).
fn key_at(text: &str, span: Range<usize>) -> String {
    let start = floor_boundary(text, span.start);
    let end = floor_boundary(text, span.end.max(start));
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = text[line_start..line_end].trim();
    if line.starts_with('[') && !text[line_start..start].contains('=') {
        return header_name(line).unwrap_or_default();
    }
    let section = section_at(text, line_start);
    let end_in_line = end.min(line_end);
    let key = if end_in_line > start && text[end_in_line..line_end].trim_start().starts_with('=') {
        // The span is a key (an unknown one).
        text[start..end_in_line].trim().to_string()
    } else if let Some(eq) = text[line_start..start].rfind('=') {
        let before = &text[line_start..line_start + eq];
        let from = before.rfind([',', '{']).map_or(0, |i| i + 1);
        before[from..].trim().to_string()
    } else {
        // A continuation line of a multi-line value: the nearest key above.
        text[..line_start]
            .lines()
            .rev()
            .take_while(|l| !l.trim().starts_with('['))
            .find_map(|l| {
                let l = l.trim();
                (!l.starts_with('#'))
                    .then(|| l.split_once('='))
                    .flatten()
                    .map(|(k, _)| k.trim().to_string())
            })
            .unwrap_or_default()
    };
    let key = unquote(&key);
    match (section, key.is_empty()) {
        (Some(s), false) => format!("{s}.{key}"),
        (Some(s), true) => s,
        (None, _) => key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str =
        "listen = \"127.0.0.1:7000\"\n\n[[backend]]\nname = \"b1\"\naddr = \"127.0.0.1:9001\"\n";

    fn err(text: &str) -> (usize, String, String) {
        match parse(text, Path::new("t.toml")) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => (
                e.line().unwrap_or(0),
                e.key().unwrap_or("").to_string(),
                e.to_string(),
            ),
        }
    }

    #[test]
    fn minimal_file_has_the_flags_defaults() {
        let f = parse(MIN, Path::new("t.toml")).unwrap();
        let flags = ProxyConfig::new(
            "127.0.0.1:7000".parse().unwrap(),
            vec!["b1=127.0.0.1:9001".parse().unwrap()],
        );
        // Every field (Debug covers them all) equals the flags' defaults.
        assert_eq!(format!("{:?}", f.proxy), format!("{flags:?}"));
        assert_eq!(f.workers, None);
    }

    #[test]
    fn errors_name_the_line_and_key() {
        let (line, key, msg) = err(&format!("{MIN}colour = \"red\"\n"));
        assert_eq!((line, key.as_str()), (6, "backend.colour"), "{msg}");
        assert!(
            msg.starts_with("t.toml:6:1: backend.colour: unknown field `colour`"),
            "{msg}"
        );
        let (line, key, msg) = err(&format!("{MIN}weight = \"heavy\"\n"));
        assert_eq!((line, key.as_str()), (6, "backend.weight"), "{msg}");
        let (line, key, msg) = err(&format!("{MIN}[health]\ninterval = \"soon\"\n"));
        assert_eq!((line, key.as_str()), (7, "health.interval"), "{msg}");
        assert!(msg.contains("\"soon\" is not a duration"), "{msg}");
        let (line, key, msg) = err("listen = \"127.0.0.1:7000\n");
        assert_eq!(line, 1, "{msg}");
        assert_eq!(key, "listen", "{msg}");
        let (line, key, msg) = err(&format!("{MIN}[owner_change]\ngrace = \"1s\"\n"));
        assert_eq!((line, key.as_str()), (7, "owner_change.grace"), "{msg}");
        let (line, key, msg) = err(&format!(
            "{MIN}[limits]\nmax_connections = 10\nmax_pending_headers = 11\n"
        ));
        assert_eq!(
            (line, key.as_str()),
            (8, "limits.max_pending_headers"),
            "{msg}"
        );
        assert!(
            msg.contains("more than limits.max_connections (10)"),
            "{msg}"
        );
        let (line, key, msg) = err("listen = [\"127.0.0.1:7000\",\n  \"nowhere\"]\n[[backend]]\nname = \"b\"\naddr = \"127.0.0.1:1\"\n");
        assert_eq!((line, key.as_str()), (2, "listen"), "{msg}");
        let (line, key, msg) = err("listen = \"127.0.0.1:7000\"\n[[backend]]\nname = \"b\"\n");
        assert_eq!(key, "backend.addr", "{msg}");
        assert!((2..=3).contains(&line), "{msg}");
        let (_, key, msg) = err("[[backend]]\nname = \"b\"\naddr = \"127.0.0.1:1\"\n");
        assert_eq!(key, "listen", "{msg}");
        let (line, key, msg) = err(&format!("{MIN}[health]\nsend = \"x\"\nsend_hex = \"0a\"\n"));
        assert_eq!((line, key.as_str()), (8, "health.send_hex"), "{msg}");
        let (line, key, msg) = err(&format!("{MIN}[health]\nexpect_hex = \"0g\"\n"));
        assert_eq!((line, key.as_str()), (7, "health.expect_hex"), "{msg}");
        let (line, key, msg) = err("listen = \"127.0.0.1:7000\"\n");
        assert_eq!((line, key.as_str()), (1, "backend"), "{msg}");
    }

    #[test]
    fn keys_are_found_in_inline_tables_and_dotted_keys() {
        let text = "a = 1\nb = { c = 2, d = \"x\" }\n[s]\nt.u = 3\n";
        let at = |needle: &str| {
            let i = text.find(needle).unwrap();
            key_at(text, i..i + needle.len())
        };
        assert_eq!(at("\"x\""), "d");
        assert_eq!(at("3"), "s.t.u");
        assert_eq!(at("c"), "c");
        assert_eq!(line_col(text, text.find("3").unwrap()), (4, 7));
    }

    #[test]
    fn the_membership_section_replaces_the_backends() {
        const M: &str = "listen = \"127.0.0.1:7000\"\n\n[membership]\nurl = \"etcd://127.0.0.1:2379,127.0.0.1:2380/sp/a\"\ncache_file = \"cache.json\"\ndebounce = \"250ms\"\n";
        let f = parse(M, Path::new("/etc/sp/p.toml")).unwrap();
        let m = f.proxy.membership.as_ref().expect("membership");
        assert_eq!(m.url.endpoints, ["127.0.0.1:2379", "127.0.0.1:2380"]);
        assert_eq!(m.url.prefix, "/sp/a");
        assert_eq!(m.cache_file, Some(PathBuf::from("/etc/sp/cache.json")));
        assert_eq!(m.debounce, Duration::from_millis(250));
        assert!(f.proxy.backends.is_empty());
        assert!(
            f.summary()
                .contains("backends from etcd://127.0.0.1:2379,127.0.0.1:2380/sp/a"),
            "{}",
            f.summary()
        );
        let (line, key, msg) = err(&M.replace("/sp/a\"", "/sp/a/\""));
        assert_eq!((line, key.as_str()), (4, "membership.url"), "{msg}");
        assert!(msg.contains("must not end with '/'"), "{msg}");
        let (line, key, msg) = err(&M.replace("250ms", "soon"));
        assert_eq!((line, key.as_str()), (6, "membership.debounce"), "{msg}");
        let (line, key, msg) = err(&M.replace("250ms", "2m"));
        assert_eq!((line, key.as_str()), (6, "membership.debounce"), "{msg}");
        let (line, key, _) = err(&format!("{M}colour = 1\n"));
        assert_eq!((line, key.as_str()), (7, "membership.colour"));
        // TLS and login files are relative to the file and checked at load; errors name the
        // key (or its partner when that one is missing).
        let with_ca = format!("{M}ca_file = \"tls/ca.pem\"\n");
        let (line, key, msg) = err(&with_ca);
        assert_eq!((line, key.as_str()), (7, "membership.ca_file"), "{msg}");
        let Err(e) = parse(&with_ca, Path::new("/etc/sp/p.toml")) else {
            panic!("no such CA file");
        };
        let msg = e.to_string();
        assert!(msg.contains("cannot read /etc/sp/tls/ca.pem"), "{msg}");
        let (line, key, msg) = err(&format!("{M}user = \"proxy\"\n"));
        assert_eq!((line, key.as_str()), (7, "membership.user"), "{msg}");
        assert!(msg.contains("membership.password_file"), "{msg}");
        let both = format!("{M}\n[[backend]]\nname = \"b1\"\naddr = \"127.0.0.1:9001\"\n");
        let (line, key, msg) = err(&both);
        assert_eq!((line, key.as_str()), (8, "backend"), "{msg}");
        assert!(
            msg.contains("[membership]") && msg.contains("[[backend]]"),
            "{msg}"
        );
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let text = MIN.replace("\n\n", "\nupgrade_socket = \"run/up.sock\"\n\n");
        let f = parse(&text, Path::new("/etc/shardproxy/p.toml")).unwrap();
        assert_eq!(
            f.proxy.upgrade_socket,
            Some(PathBuf::from("/etc/shardproxy/run/up.sock"))
        );
    }
}
