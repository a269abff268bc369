//! The TOML configuration file as an operator meets it: every shipped example passes
//! `shardproxy check` and loads into exactly the values it spells out; `run --config` on a
//! copy of `examples/minimal.toml` proxies a real connection; each kind of broken file exits
//! 2 with a message naming its line and key; a flag given on the command line overrides the
//! file's value, and only a flag given explicitly does.
//!
//! Child processes are killed and reaped by a guard; temporary files are removed.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::process::{self, output_within, text, HANG_GUARD};
use common::*;
use shardproxy::cli::{Cli, Command};
use shardproxy::config::{Failover, OwnerChange, SourceRate};
use shardproxy::config_file::{self, FileConfig};
use shardproxy::header::{Endian, HeaderMode, LenBytes};
use shardproxy::HeaderFormat;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// A file in the temp directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(text: &str) -> TempFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "shardproxy-config-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).expect("write temp config");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `shardproxy ARGS` to completion (killed after [`HANG_GUARD`]).
fn shardproxy(args: &[&str]) -> Output {
    output_within(process::shardproxy().args(args), HANG_GUARD)
}

#[test]
fn every_example_passes_check() {
    for (name, listen, backends) in [
        ("minimal.toml", "127.0.0.1:7000", "2 backends (b1, b2)"),
        (
            "full.toml",
            "127.0.0.1:7000, [::1]:7000",
            "3 backends (b1, b2, b3)",
        ),
        (
            "health.toml",
            "127.0.0.1:7000",
            "3 backends (cache-a, cache-b, cache-c)",
        ),
        (
            "limits.toml",
            "127.0.0.1:7000",
            "3 backends (shard-1, shard-2, legacy)",
        ),
        (
            "dsr.toml",
            "127.0.0.1:7000",
            "3 backends (snap-1, snap-2, legacy)",
        ),
    ] {
        let path = example(name);
        let out = shardproxy(&["check", path.to_str().unwrap()]);
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "check {name}: stdout {stdout}\nstderr {}",
            text(&out.stderr)
        );
        assert_eq!(stdout.lines().count(), 1, "{name}: {stdout}");
        assert!(
            stdout.contains(&format!(
                "ok: listen {listen}; {backends}; health checks on"
            )),
            "{name}: {stdout}"
        );
    }
}

fn load(name: &str) -> FileConfig {
    config_file::load(&example(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn minimal_example_is_the_defaults_with_two_backends() {
    let f = load("minimal.toml");
    let expected = shardproxy::ProxyConfig::new(
        "127.0.0.1:7000".parse().unwrap(),
        vec![
            "b1=127.0.0.1:9001".parse().unwrap(),
            "b2=127.0.0.1:9002".parse().unwrap(),
        ],
    );
    assert_eq!(format!("{:?}", f.proxy), format!("{expected:?}"));
    assert_eq!(f.workers, None);
}

#[test]
fn full_example_sets_every_key() {
    let f = load("full.toml");
    let c = &f.proxy;
    let ms = Duration::from_millis;
    let s = Duration::from_secs;
    let dir = example("");
    assert_eq!(f.workers, Some(2));
    assert_eq!(c.listen, "127.0.0.1:7000".parse::<SocketAddr>().unwrap());
    assert_eq!(c.also_listen, vec!["[::1]:7000".parse().unwrap()]);
    assert_eq!(c.admin, Some("127.0.0.1:9100".parse().unwrap()));
    assert_eq!(
        c.admin_token_file,
        Some(dir.join("admin.token.example")),
        "relative to the file's directory"
    );
    assert_eq!(
        c.upgrade_socket,
        Some(PathBuf::from("/run/shardproxy/upgrade.sock"))
    );
    assert_eq!(c.failover, Failover::Next);
    assert_eq!(c.max_tries, 4);
    assert!(!c.proxy_protocol);
    assert!(!c.splice);
    assert_eq!(c.header.len_bytes, LenBytes::Four);
    assert_eq!(c.header.endian, Endian::Little);
    assert_eq!(c.header.max_key_len, 1024);
    assert_eq!(c.header.mode, HeaderMode::Strip);
    assert_eq!(c.header_timeout, s(3));
    assert_eq!(c.connect_timeout, ms(1500));
    assert_eq!(c.idle_timeout, Some(s(600)));
    assert_eq!(c.drain_timeout, s(20));
    assert_eq!(c.admin_header_timeout, s(4));
    assert_eq!(c.max_connections, 10_000);
    assert_eq!(c.max_pending_headers, Some(2000));
    assert_eq!(c.max_pending_headers_per_source, Some(100));
    assert_eq!(c.max_pipes, Some(1500));
    assert_eq!(
        c.source_rate,
        Some(SourceRate {
            per_second: 200.5,
            burst: 400
        })
    );
    let h = &c.health;
    assert!(h.active);
    assert_eq!((h.interval, h.timeout, h.jitter), (s(3), ms(800), 0.25));
    assert_eq!((h.fall, h.rise), (4, 3));
    assert_eq!(h.send.as_deref(), Some(&b"\r\n"[..]));
    assert_eq!(h.expect.as_deref(), Some(&b"OK"[..]));
    assert_eq!(h.eject_after, 6);
    assert_eq!((h.eject_time, h.max_eject_time), (s(7), s(600)));
    assert_eq!(h.max_down_share, 0.4);
    assert_eq!(c.owner_change, OwnerChange::Close { grace: s(45) });
    assert!(c.dsr.is_none(), "[dsr] has its own example");
    let d = load("dsr.toml").proxy;
    let dsr = d.dsr.as_ref().expect("[dsr]");
    assert_eq!(dsr.device, "eth0");
    assert_eq!(dsr.secret_file, dir.join("dsr.secret.example"));
    assert_eq!((dsr.handoff_timeout, dsr.flow_timeout), (ms(750), s(900)));
    assert_eq!(dsr.key_prefixes, vec![b"snap:".to_vec(), b"dump:".to_vec()]);
    assert_eq!(d.backends[2].agent, None);
    let b: Vec<String> = c.backends.iter().map(ToString::to_string).collect();
    assert_eq!(
        b,
        [
            "b1=127.0.0.1:9001,weight=3,agent=127.0.0.1:7101,max_connections=5000,proxy_protocol=v2",
            "b2=127.0.0.1:9002,weight=1",
            "b3=127.0.0.1:9003,weight=0",
        ]
    );
}

#[test]
fn the_etcd_example_loads_its_membership() {
    let f = load("etcd.toml");
    let m = f.proxy.membership.as_ref().expect("[membership]");
    assert_eq!(m.url.endpoints.len(), 3);
    assert_eq!(m.url.prefix, "/shardproxy/pool-a");
    assert_eq!(m.debounce, Duration::from_millis(100));
    assert!(m.cache_file.is_some());
    assert!(f.proxy.backends.is_empty());
    // The TLS and login keys are commented out (their files do not exist here); uncommented,
    // they must be known keys: the load fails on the missing files, not on the key names.
    let text = std::fs::read_to_string(example("etcd.toml")).expect("read etcd.toml");
    let uncommented = text.replace("\n#ca_file", "\nca_file");
    assert_ne!(uncommented, text, "the example shows ca_file");
    let tmp = TempFile::new(&uncommented);
    let Err(e) = config_file::load(&tmp.0) else {
        panic!("the CA file does not exist here");
    };
    let e = e.to_string();
    assert!(
        e.contains("membership.ca_file") && e.contains("etcd-ca.pem"),
        "{e}"
    );
}

#[test]
fn health_and_limits_examples_load_their_values() {
    let s = Duration::from_secs;
    let f = load("health.toml");
    let h = &f.proxy.health;
    assert!(h.active);
    assert_eq!(
        (h.interval, h.timeout, h.jitter),
        (s(1), Duration::from_millis(500), 0.2)
    );
    assert_eq!((h.fall, h.rise), (2, 3));
    assert_eq!(h.send.as_deref(), Some(&b"PING\r\n"[..]));
    assert_eq!(h.expect.as_deref(), Some(&b"+PONG"[..]));
    assert_eq!(
        (h.eject_after, h.eject_time, h.max_eject_time),
        (3, s(10), s(120))
    );
    assert_eq!(h.max_down_share, 0.5);
    assert_eq!(f.proxy.owner_change, OwnerChange::Close { grace: s(15) });

    let f = load("limits.toml");
    let c = &f.proxy;
    assert!(c.proxy_protocol);
    assert_eq!(c.max_connections, 4096);
    assert_eq!(c.max_pending_headers, Some(512));
    assert_eq!(c.max_pending_headers_per_source, Some(64));
    assert_eq!(
        c.source_rate,
        Some(SourceRate {
            per_second: 50.0,
            burst: 100
        })
    );
    let caps: Vec<_> = c
        .backends
        .iter()
        .map(|b| {
            (
                b.name.as_str(),
                b.weight,
                b.max_connections,
                b.proxy_protocol,
            )
        })
        .collect();
    assert_eq!(
        caps,
        [
            ("shard-1", 1, Some(1000), None),
            ("shard-2", 2, Some(1000), None),
            ("legacy", 1, Some(200), Some(false)),
        ]
    );
}

/// A `run` child, SIGKILLed and reaped when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn run_with_the_minimal_example_proxies_a_connection() {
    let backends = echo_backends(2).await;
    let minimal = std::fs::read_to_string(example("minimal.toml")).unwrap();
    let copy = minimal
        .replace("127.0.0.1:7000", "127.0.0.1:0")
        .replace("127.0.0.1:9001", &backends[0].local_addr().to_string())
        .replace("127.0.0.1:9002", &backends[1].local_addr().to_string());
    assert_ne!(copy, minimal);
    let file = TempFile::new(&copy);
    let mut child = Process::new(env!("CARGO_BIN_EXE_shardproxy"))
        .args([
            "run",
            "--config",
            file.0.to_str().unwrap(),
            "--workers",
            "1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn shardproxy run");
    let stdout = child.stdout.take().expect("stdout");
    let daemon = Daemon(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        lines.for_each(drop);
    });
    let line = match tokio::task::spawn_blocking(move || rx.recv_timeout(HANG_GUARD))
        .await
        .unwrap()
    {
        Ok(Some(Ok(line))) => line,
        other => panic!("no ready line from run --config: {other:?}"),
    };
    let addr: SocketAddr = line
        .strip_prefix("listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("ready line {line:?}"));
    let payload = vec![7u8; 4096];
    let reply = tokio::time::timeout(
        HANG_GUARD,
        shardproxy::fixtures::client::round_trip(addr, &HeaderFormat::default(), b"k1", &payload),
    )
    .await
    .expect("round trip hung")
    .expect("round trip through run --config");
    assert!(["b1", "b2"].contains(&reply.backend.as_str()), "{reply:?}");
    assert_eq!(reply.verified, payload.len() as u64 + 4);
    drop(daemon);
}

/// The base of the broken files; the line numbers matter.
const BASE: &str = r#"listen = "127.0.0.1:7000"
admin = "127.0.0.1:9100"

[limits]
max_connections = 100

[[backend]]
name = "b1"
addr = "127.0.0.1:9001"

[[backend]]
name = "b2"
addr = "127.0.0.1:9002"
"#;

/// `BASE` with `line` (1-based) replaced by `with` (which may hold several lines).
fn edit(line: usize, with: &str) -> String {
    let mut lines: Vec<&str> = BASE.lines().collect();
    lines[line - 1] = with;
    lines.join("\n") + "\n"
}

#[test]
fn broken_files_exit_2_naming_the_line_and_the_key() {
    let cases: Vec<(&str, String, usize, &str, &str)> = vec![
        (
            "unknown top-level key",
            edit(3, "colour = \"red\""),
            3,
            "colour",
            "unknown field `colour`",
        ),
        (
            "unknown key in [[backend]]",
            format!("{BASE}colour = \"red\"\n"),
            14,
            "backend.colour",
            "unknown field `colour`, expected one of",
        ),
        (
            "bad type",
            edit(3, "max_tries = \"three\""),
            3,
            "max_tries",
            "invalid type: string \"three\", expected a whole number",
        ),
        (
            "bad duration",
            edit(6, "[timeouts]\nheader = \"soon\""),
            7,
            "timeouts.header",
            "\"soon\" is not a duration",
        ),
        (
            "weight out of range",
            edit(10, "weight = 1000001"),
            10,
            "backend.weight",
            "write a whole number 0..=1000000",
        ),
        (
            "duplicate backend name",
            edit(12, "name = \"b1\""),
            12,
            "backend.name",
            "\"b1\" appears twice (first on line 8)",
        ),
        (
            "bad address",
            edit(13, "addr = \"127.0.0.1\""),
            13,
            "backend.addr",
            "write HOST:PORT",
        ),
        (
            "max_pending_headers > max_connections",
            edit(6, "max_pending_headers = 200"),
            6,
            "limits.max_pending_headers",
            "200 is more than limits.max_connections (100)",
        ),
        (
            "source_rate without source_burst",
            edit(6, "source_rate = 10.0"),
            6,
            "limits.source_rate",
            "needs source_burst",
        ),
        (
            "TOML syntax error",
            edit(12, "name = \"b2"),
            12,
            "backend.name",
            "invalid basic string",
        ),
    ];
    for (what, body, line, key, needle) in cases {
        let file = TempFile::new(&body);
        let path = file.0.to_str().unwrap();
        let out = shardproxy(&["check", path]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}\n{body}");
        assert!(out.stdout.is_empty(), "{what}: {}", text(&out.stdout));
        // "shardproxy: PATH:LINE:COL: KEY: why"
        let at = format!("{path}:{line}:");
        let named = stderr
            .strip_prefix(&format!("shardproxy: {at}"))
            .map(|rest| rest.trim_start_matches(|c: char| c.is_ascii_digit()))
            .is_some_and(|rest| rest.starts_with(&format!(": {key}: ")));
        assert!(
            named,
            "{what}: expected line {line} and key {key}:\n{stderr}\n{body}"
        );
        assert!(
            stderr.contains(needle),
            "{what}: expected {needle:?}:\n{stderr}"
        );
        // `run --config` refuses the same file the same way, before binding anything.
        let out = shardproxy(&["run", "--config", path]);
        assert_eq!(out.status.code(), Some(2), "run {what}");
        assert!(text(&out.stderr).contains(&at), "run {what}");
    }
}

#[test]
fn an_unreadable_file_names_the_path_and_the_os_error() {
    let out = shardproxy(&["check", "/nonexistent/shardproxy.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/shardproxy.toml: cannot read the config file: No such file"),
        "{stderr}"
    );
}

fn run_args(extra: &[&str]) -> shardproxy::cli::RunArgs {
    let full = example("full.toml");
    let mut args = vec!["shardproxy", "run", "--config", full.to_str().unwrap()];
    args.extend_from_slice(extra);
    match Cli::try_parse_explicit(args).expect("parse").command {
        Command::Run(run) => run,
        other => panic!("not run: {other:?}"),
    }
}

#[test]
fn flags_given_on_the_command_line_win_over_the_file() {
    let file = load("full.toml");
    // Nothing explicit: the file's values stand, not the flags' defaults.
    let run = run_args(&[]);
    let c = run.config_with_file(file.clone()).unwrap();
    assert_eq!(c.header_timeout, Duration::from_secs(3));
    assert_eq!(c.connect_timeout, Duration::from_millis(1500));
    assert_eq!(c.backends.len(), 3);
    assert_eq!(run.workers_with_file(file.workers), Some(2));

    let run = run_args(&[
        "--header-timeout",
        "250ms",
        "--backend",
        "x=127.0.0.1:9009",
        "--workers",
        "3",
        "--no-health",
        "--owner-change-grace",
        "5s",
    ]);
    let c = run.config_with_file(file.clone()).unwrap();
    assert_eq!(c.header_timeout, Duration::from_millis(250));
    assert_eq!(c.connect_timeout, Duration::from_millis(1500), "not given");
    let names: Vec<&str> = c.backends.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["x"], "--backend replaces the file's whole list");
    assert!(!c.health.active);
    assert_eq!(c.health.interval, Duration::from_secs(3), "not given");
    assert_eq!(
        c.owner_change,
        OwnerChange::Close {
            grace: Duration::from_secs(5)
        }
    );
    assert_eq!(run.workers_with_file(file.workers), Some(3));

    // A grace without the close policy (here the flag sets keep over the file's close).
    let run = run_args(&["--owner-change", "keep", "--owner-change-grace", "5s"]);
    let e = run.config_with_file(file).unwrap_err().to_string();
    assert!(e.contains("--owner-change-grace"), "{e}");
}

#[test]
fn listen_and_backend_are_optional_only_with_config() {
    let out = shardproxy(&["run", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--backend"),
        "{}",
        text(&out.stderr)
    );
    let out = shardproxy(&["run", "--backend", "a=127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--listen"),
        "{}",
        text(&out.stderr)
    );
}
