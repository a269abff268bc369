//! The `shardproxy` binary as a user meets it: bad flags exit 2 with a message that names the
//! problem; `route` output is exact, deterministic and independent of flag order; `demo`
//! runs to completion and reports the keys that moved; `run` drains in-flight connections
//! on SIGTERM, refuses new ones and exits 0, and a second SIGTERM during the drain exits at
//! once with 1; `backend` and `client` work end to end, with and without a proxy process in
//! between.
//!
//! Every child process is killed and reaped by a guard (or waited for under a generous hang
//! guard), so no test leaves a process behind.

mod common;

use std::net::SocketAddr;
use std::process::Output;
use std::time::{Duration, Instant};

use common::process::*;
use common::*;
use nix::sys::signal::Signal;
use shardproxy::fixtures::client::read_name;
use shardproxy::fixtures::echo::EchoBackend;
use shardproxy::{HeaderFormat, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// The demo drives two rounds of traffic through the debug build: give it more room.
const DEMO_GUARD: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------
// Bad flags
// ---------------------------------------------------------------------------------------

/// Runs `shardproxy ARGS` and checks exit code 2, no ready line, and every `needle` in stderr.
fn assert_rejected(args: &[&str], needles: &[&str]) {
    let out = output_within(shardproxy().args(args), HANG_GUARD);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "shardproxy {args:?}: {}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        !text(&out.stdout).contains("listening on"),
        "shardproxy {args:?} started listening"
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "shardproxy {args:?}: stderr does not mention {needle:?}:\n{stderr}"
        );
    }
}

const RUN: [&str; 3] = ["run", "--listen", "127.0.0.1:0"];

fn run_with(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = RUN.to_vec();
    v.extend_from_slice(extra);
    v
}

#[test]
fn an_unknown_flag_exits_2_and_names_it() {
    assert_rejected(
        &run_with(&["--backend", "a=127.0.0.1:1", "--frobnicate"]),
        &["--frobnicate"],
    );
    assert_rejected(&["frobnicate"], &["frobnicate"]);
}

#[test]
fn a_malformed_backend_exits_2_and_says_what_is_expected() {
    assert_rejected(
        &run_with(&["--backend", "nonsense"]),
        &["nonsense", "missing '='", "NAME=HOST:PORT"],
    );
    assert_rejected(
        &run_with(&["--backend", "a=127.0.0.1:1,weight=heavy"]),
        &["heavy", "weight"],
    );
    assert_rejected(
        &["route", "--backend", "nonsense", "k1"],
        &["nonsense", "NAME=HOST:PORT"],
    );
}

#[test]
fn duplicate_backend_names_exit_2() {
    let dup = ["--backend", "a=127.0.0.1:1", "--backend", "a=127.0.0.1:2"];
    assert_rejected(&run_with(&dup), &["\"a\" appears twice"]);
    let mut route = vec!["route"];
    route.extend_from_slice(&dup);
    route.push("k1");
    assert_rejected(&route, &["\"a\" appears twice"]);
}

#[test]
fn a_length_field_of_3_bytes_exits_2() {
    assert_rejected(
        &run_with(&["--backend", "a=127.0.0.1:1", "--len-bytes", "3"]),
        &["--len-bytes", "1, 2 or 4"],
    );
}

#[test]
fn a_duration_that_is_not_one_exits_2() {
    assert_rejected(
        &run_with(&["--backend", "a=127.0.0.1:1", "--header-timeout", "soon"]),
        &["--header-timeout", "\"soon\" is not a duration"],
    );
}

#[test]
fn a_key_limit_that_does_not_fit_the_length_field_exits_2() {
    assert_rejected(
        &run_with(&[
            "--backend",
            "a=127.0.0.1:1",
            "--max-key-len",
            "300",
            "--len-bytes",
            "1",
        ]),
        &["--max-key-len", "300", "does not fit"],
    );
}

#[test]
fn zero_tries_exits_2() {
    assert_rejected(
        &run_with(&["--backend", "a=127.0.0.1:1", "--max-tries", "0"]),
        &["--max-tries"],
    );
}

// ---------------------------------------------------------------------------------------
// route
// ---------------------------------------------------------------------------------------

fn route(args: &[&str]) -> String {
    let out = output_within(shardproxy().arg("route").args(args), HANG_GUARD);
    assert!(
        out.status.success(),
        "route {args:?}: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

const KEYS: [&str; 6] = ["alpha", "beta", "gamma", "user:42", "player:7", "ü-ñïcødé"];

#[test]
fn route_prints_each_key_and_its_full_ranking() {
    let mut args = vec![
        "--backend",
        "b1=127.0.0.1:9001",
        "--backend",
        "b2=127.0.0.1:9002,weight=2",
        "--backend",
        "b3=127.0.0.1:9003",
        "--backend",
        "drained=127.0.0.1:9004,weight=0",
    ];
    args.extend_from_slice(&KEYS);
    let out = route(&args);
    let router = Router::new([("b1", 1), ("b2", 2), ("b3", 1), ("drained", 0)]).unwrap();
    let want: String = KEYS
        .iter()
        .map(|k| format!("{k}\t{}\n", router.rank_names(k.as_bytes()).join(" ")))
        .collect();
    assert_eq!(out, want);
    // The drained node is never ranked; every other node is, once.
    for line in out.lines() {
        let names: Vec<&str> = line.split_once('\t').unwrap().1.split(' ').collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, ["b1", "b2", "b3"], "{line}");
    }

    // Hex keys route exactly like the bytes they spell, printed as given.
    let hex = route(&[
        "--backend",
        "b1=127.0.0.1:1",
        "--backend",
        "b2=127.0.0.1:2",
        "--hex",
        "616c706861",
        "00ff",
    ]);
    let r2 = Router::new([("b1", 1), ("b2", 1)]).unwrap();
    assert_eq!(
        hex,
        format!(
            "616c706861\t{}\n00ff\t{}\n",
            r2.rank_names(b"alpha").join(" "),
            r2.rank_names(&[0x00, 0xff]).join(" ")
        )
    );
    assert_rejected(
        &["route", "--backend", "b1=127.0.0.1:1", "--hex", "0g"],
        &["non-hex"],
    );
}

/// A hex key with a multi-byte character (where byte-offset slicing would split it) exits 2
/// with a message naming the character, rather than panicking (exit 101).
#[test]
fn route_hex_key_with_a_multibyte_character_exits_2() {
    for key in ["aéb", "é0", "0é"] {
        assert_rejected(
            &["route", "--backend", "b1=127.0.0.1:1", "--hex", key],
            &["non-hex digit", "'é'", key],
        );
    }
}

#[test]
fn route_is_deterministic_and_independent_of_flag_order_and_addresses() {
    let many: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
    let with = |backends: &[&'static str]| {
        let mut args = Vec::new();
        for b in backends {
            args.push("--backend");
            args.push(*b);
        }
        args.extend_from_slice(&KEYS);
        args.extend(many.iter().map(String::as_str));
        route(&args)
    };
    let a = with(&[
        "b1=127.0.0.1:1,weight=3",
        "b2=127.0.0.1:2",
        "b3=127.0.0.1:3",
    ]);
    assert_eq!(
        a,
        with(&[
            "b1=127.0.0.1:1,weight=3",
            "b2=127.0.0.1:2",
            "b3=127.0.0.1:3"
        ])
    );
    assert_eq!(
        a,
        with(&[
            "b3=127.0.0.1:3",
            "b1=127.0.0.1:1,weight=3",
            "b2=127.0.0.1:2,weight=1"
        ])
    );
    // Names are identity: other addresses, same routes.
    assert_eq!(
        a,
        with(&[
            "b2=10.0.0.2:80",
            "b3=10.0.0.3:80",
            "b1=10.0.0.1:80,weight=3"
        ])
    );
    // A different weight does change routes (the comparison above can fail).
    assert_ne!(
        a,
        with(&["b1=127.0.0.1:1", "b2=127.0.0.1:2", "b3=127.0.0.1:3"])
    );
}

// ---------------------------------------------------------------------------------------
// demo
// ---------------------------------------------------------------------------------------

#[test]
fn demo_runs_and_reports_exactly_the_keys_that_moved() {
    let out = output_within(shardproxy().args(["demo", "--keys", "300"]), DEMO_GUARD);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "demo: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        text(&out.stderr)
    );
    // The demo's own contract: shard-a/b/c, keys player:0.., shard-b stopped.
    let router = Router::new([("shard-a", 1), ("shard-b", 1), ("shard-c", 1)]).unwrap();
    let mut owned = std::collections::BTreeMap::<&str, u32>::new();
    let mut moved_to = std::collections::BTreeMap::<&str, u32>::new();
    for i in 0..300 {
        let k = format!("player:{i}");
        let rank = router.rank_names(k.as_bytes());
        *owned.entry(rank[0]).or_default() += 1;
        if rank[0] == "shard-b" {
            *moved_to.entry(rank[1]).or_default() += 1;
        }
    }
    for (name, n) in &owned {
        let row = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{stdout}"));
        let count: u32 = row.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert_eq!(count, *n, "{name}'s keys: {row}");
    }
    let orphans = owned["shard-b"];
    assert!(
        stdout.contains(&format!(
            "After stopping shard-b: {orphans} of 300 keys moved"
        )),
        "{stdout}"
    );
    for (to, n) in &moved_to {
        assert!(
            stdout.contains(&format!("shard-b → {to}: {n} keys")),
            "no line for shard-b → {to}:\n{stdout}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// run + SIGTERM
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_connections_refuses_new_ones_and_exits_0() {
    let backend = EchoBackend::start(any_port(), "b1").await.unwrap();
    let spec = format!("b1={}", backend.local_addr());
    let (mut proxy, ready) = Daemon::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &spec,
        "--admin",
        "127.0.0.1:0",
    ]);
    let (listen, admin) = parse_ready(&ready);
    let (status, _) = http_get(admin.expect("admin address"), "/healthz").await;
    assert!(status.contains("200"), "{status}");

    // A connection in flight: routed, greeted, echo not yet finished.
    let (mut conn, header) = greeted(listen, b"in-flight", "b1").await;

    proxy.signal(Signal::SIGTERM);
    // The listener closes: new connections are refused. (A connection that slips in before
    // the signal is handled is dropped at once; the proxy ends it on the header EOF. One
    // still in the accept queue when the listener closes is reset by the kernel.)
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        match TcpStream::connect(listen).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("unexpected connect error after SIGTERM: {e}"),
            Ok(probe) => drop(probe),
        }
        assert!(
            Instant::now() < deadline,
            "still accepting after SIGTERM; stderr:\n{}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        proxy.try_wait().is_none(),
        "the proxy exited with a connection in flight; stderr:\n{}",
        proxy.stderr()
    );

    // The in-flight connection still completes its echo.
    conn.write_all(b"after the signal").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    timeout(HANG_GUARD, conn.read_to_end(&mut echoed))
        .await
        .expect("echo hung")
        .unwrap();
    let mut want = header.clone();
    want.extend_from_slice(b"after the signal");
    assert_eq!(echoed, want);

    let status = proxy.wait().await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM: {status}; stderr:\n{}",
        proxy.stderr()
    );
    assert_eq!(backend.accepted(), 1);
}

/// Starts `run` with one echo backend and a 60 s drain, opens a connection that is routed
/// and greeted, and sends the first SIGTERM: returns once the proxy has logged that it is
/// draining, with the connection still open.
async fn draining_proxy(backend: &EchoBackend) -> (Daemon, TcpStream, Vec<u8>) {
    let spec = format!("b1={}", backend.local_addr());
    let (mut proxy, ready) = Daemon::start_with_log(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &spec,
            "--drain-timeout",
            "60s",
            "--workers",
            "1",
        ],
        Some("info"),
    );
    let (listen, _) = parse_ready(&ready);
    let (conn, header) = greeted(listen, b"held", "b1").await;
    proxy.signal(Signal::SIGTERM);
    // Signals of one kind do not queue: the second is sent only once the first was handled.
    proxy.wait_stderr("shutting down").await;
    (proxy, conn, header)
}

/// One SIGTERM with a connection held open and `--drain-timeout 60s`: a second later the
/// proxy is still draining and the connection still echoes. A second SIGTERM then exits at
/// once (well before the 60 s drain) with code 1 and its own log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_during_the_drain_exits_at_once() {
    /// Generous for a loaded machine, far below the 60 s drain timeout.
    const EXIT_BOUND: Duration = Duration::from_secs(10);
    let backend = EchoBackend::start(any_port(), "b1").await.unwrap();
    let (mut proxy, mut conn, header) = draining_proxy(&backend).await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        proxy.try_wait().is_none(),
        "one SIGTERM with a connection open ended the drain early; stderr:\n{}",
        proxy.stderr()
    );
    // Still served while draining.
    conn.write_all(b"ping").await.unwrap();
    let mut echoed = vec![0u8; header.len() + 4];
    timeout(HANG_GUARD, conn.read_exact(&mut echoed))
        .await
        .expect("echo hung")
        .unwrap();
    assert_eq!(&echoed[header.len()..], b"ping");

    proxy.signal(Signal::SIGTERM);
    let status = proxy.wait_within(EXIT_BOUND, "the second SIGTERM").await;
    assert_eq!(
        status.code(),
        Some(1),
        "exit after the second SIGTERM: {status}; stderr:\n{}",
        proxy.stderr()
    );
    proxy.wait_stderr("second signal during the drain").await;
    // The held connection was cut (EOF or a reset), not left hanging.
    let mut rest = Vec::new();
    match timeout(HANG_GUARD, conn.read_to_end(&mut rest))
        .await
        .expect("the cut connection hung")
    {
        Ok(_) => assert!(rest.is_empty(), "{} unexpected bytes", rest.len()),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

// ---------------------------------------------------------------------------------------
// backend + client
// ---------------------------------------------------------------------------------------

/// Starts `shardproxy backend --name NAME` and returns it with its address.
fn start_backend(name: &str) -> (Daemon, SocketAddr) {
    let (daemon, line) = Daemon::start(&["backend", "--listen", "127.0.0.1:0", "--name", name]);
    let prefix = format!("backend {name} listening on ");
    let addr = line
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
        .parse()
        .expect("backend address");
    (daemon, addr)
}

fn client(args: &[&str]) -> Output {
    output_within(shardproxy().arg("client").args(args), HANG_GUARD)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_and_client_subcommands_work_together() {
    let (mut backend, addr) = start_backend("alpha");
    let addr = addr.to_string();
    let out = client(&["--connect", &addr, "k1", "key-two"]);
    assert!(out.status.success(), "{out:?}");
    // Header (2-byte length + key) plus the default 1024-byte payload, echoed and checked.
    assert_eq!(
        text(&out.stdout),
        "k1\talpha\t1028 bytes verified\nkey-two\talpha\t1033 bytes verified\n"
    );
    let out = client(&[
        "--connect",
        &addr,
        "--payload",
        "0",
        "--len-bytes",
        "4",
        "k",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "k\talpha\t5 bytes verified\n");

    // The backend is a real echo server: speak to it by hand too.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"raw bytes").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    timeout(HANG_GUARD, s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"alpha\nraw bytes");

    // A client that cannot connect says so per key and exits 1.
    let dead = refusing_addr().to_string();
    let out = client(&["--connect", &dead, "k1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("k1\terror:"), "{out:?}");

    backend.signal(Signal::SIGTERM);
    let status = backend.wait().await;
    assert_eq!(status.code(), Some(0), "backend exit: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_through_a_proxy_process_lands_where_route_says() {
    let (_alpha, a) = start_backend("alpha");
    let (_beta, b) = start_backend("beta");
    let (_gamma, g) = start_backend("gamma");
    let specs = [
        format!("alpha={a}"),
        format!("beta={b},weight=2"),
        format!("gamma={g}"),
    ];
    let mut run = vec!["run", "--listen", "127.0.0.1:0"];
    for s in &specs {
        run.extend(["--backend", s.as_str()]);
    }
    let (mut proxy, ready) = Daemon::start(&run);
    let (listen, admin) = parse_ready(&ready);
    assert_eq!(admin, None);

    let keys: Vec<String> = (0..40).map(|i| format!("session-{i}")).collect();
    let mut route_args: Vec<&str> = Vec::new();
    for s in specs.iter().rev() {
        route_args.extend(["--backend", s.as_str()]);
    }
    route_args.extend(keys.iter().map(String::as_str));
    let routes = route(&route_args);

    let listen = listen.to_string();
    let mut client_args = vec!["--connect", listen.as_str(), "--payload", "3000"];
    client_args.extend(keys.iter().map(String::as_str));
    let out = client(&client_args);
    assert!(
        out.status.success(),
        "{out:?}\nproxy stderr:\n{}",
        proxy.stderr()
    );
    let stdout = text(&out.stdout);
    let got: Vec<&str> = stdout.lines().collect();
    let want: Vec<&str> = routes.lines().collect();
    assert_eq!(got.len(), keys.len());
    let mut seen = std::collections::BTreeSet::new();
    for (k, (line, route)) in keys.iter().zip(got.iter().zip(&want)) {
        let owner = route
            .strip_prefix(&format!("{k}\t"))
            .and_then(|r| r.split(' ').next())
            .unwrap_or_else(|| panic!("route line {route:?}"));
        let verified = 2 + k.len() + 3000;
        assert_eq!(*line, format!("{k}\t{owner}\t{verified} bytes verified"));
        seen.insert(owner.to_string());
    }
    assert_eq!(seen.len(), 3, "40 keys should reach all three backends");

    proxy.signal(Signal::SIGTERM);
    assert_eq!(proxy.wait().await.code(), Some(0));
}

/// Connects through the proxy at `listen` with `key` and reads the echo backend's greeting,
/// which must name `backend`. Returns the connection and the header it sent.
async fn greeted(listen: SocketAddr, key: &[u8], backend: &str) -> (TcpStream, Vec<u8>) {
    let header = HeaderFormat::default().encode(key).unwrap();
    let mut conn = TcpStream::connect(listen).await.unwrap();
    conn.write_all(&header).await.unwrap();
    let name = timeout(HANG_GUARD, read_name(&mut conn))
        .await
        .expect("greeting hung")
        .unwrap();
    assert_eq!(name, backend);
    (conn, header)
}
