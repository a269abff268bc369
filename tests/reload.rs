//! SIGHUP re-reads `--config`: a valid file swaps the table (and the live settings) and is
//! counted `ok`; a broken file is logged with its reason, counted `failed`, and the table in
//! force stays, generation and all.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::process::{parse_ready, Daemon};
use common::*;
use nix::sys::signal::Signal;
use shardproxy::fixtures::client::round_trip;
use shardproxy::HeaderFormat;

fn config(backends: &[(&str, SocketAddr)], extra: &str) -> String {
    let mut text = format!("listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n{extra}\n");
    for (name, addr) in backends {
        text += &format!("[[backend]]\nname = \"{name}\"\naddr = \"{addr}\"\n");
    }
    text
}

async fn metrics(admin: SocketAddr) -> String {
    let (status, body) = http_get(admin, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    body
}

/// Waits until `sample` reads `want`.
async fn until(admin: SocketAddr, sample: &str, want: f64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics(admin).await;
        if metric(&text, sample) == want {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sample} never became {want}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_file_and_keeps_the_table_on_a_broken_one() {
    let b = echo_backends(3).await;
    let addrs: Vec<(&str, SocketAddr)> = vec![
        ("b1", b[0].local_addr()),
        ("b2", b[1].local_addr()),
        ("b3", b[2].local_addr()),
    ];
    let dir = std::env::temp_dir().join(format!("shardproxy-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("proxy.toml");
    std::fs::write(&file, config(&addrs[..2], "")).unwrap();

    let file_arg = file.to_str().expect("a UTF-8 temp path");
    let (mut proxy, ready) = Daemon::start(&["run", "--workers", "1", "--config", file_arg]);
    let (listen, admin) = parse_ready(&ready);
    let admin = admin.expect("the file names an admin listener");
    let text = metrics(admin).await;
    assert_eq!(metric(&text, "shardproxy_routing_table_generation"), 1.0);
    let fingerprint2 = metric(&text, "shardproxy_routing_table_fingerprint");

    // A valid file with a third backend: applied.
    std::fs::write(&file, config(&addrs, "")).unwrap();
    proxy.signal(Signal::SIGHUP);
    let text = until(admin, "shardproxy_config_reloads_total{result=\"ok\"}", 1.0).await;
    assert_eq!(metric(&text, "shardproxy_routing_table_generation"), 2.0);
    let fingerprint3 = metric(&text, "shardproxy_routing_table_fingerprint");
    assert_ne!(fingerprint2, fingerprint3);
    let router3 = shardproxy::Router::new([("b1", 1), ("b2", 1), ("b3", 1)]).unwrap();
    let key = (0..)
        .map(key)
        .find(|k| router3.rank_names(k)[0] == "b3")
        .unwrap();
    let reply = round_trip(listen, &HeaderFormat::default(), &key, b"x")
        .await
        .unwrap();
    assert_eq!(reply.backend, "b3", "the new backend takes its keys");

    // Broken files: each refused and counted; the table in force stays.
    let broken = [
        config(&addrs[..1], "no_such_key = 1"),
        config(&[("b1", addrs[0].1), ("b1", addrs[1].1)], ""),
        "listen = [\n".to_string(),
    ];
    for (i, text) in broken.iter().enumerate() {
        std::fs::write(&file, text).unwrap();
        proxy.signal(Signal::SIGHUP);
        let text = until(
            admin,
            "shardproxy_config_reloads_total{result=\"failed\"}",
            (i + 1) as f64,
        )
        .await;
        assert_eq!(metric(&text, "shardproxy_routing_table_generation"), 2.0);
        assert_eq!(
            metric(&text, "shardproxy_routing_table_fingerprint"),
            fingerprint3
        );
    }
    let reply = round_trip(listen, &HeaderFormat::default(), &key, b"x")
        .await
        .unwrap();
    assert_eq!(reply.backend, "b3", "still routed on the table in force");
    let (_, backends) = http_get(admin, "/backends").await;
    assert_eq!(backends.matches("\"name\"").count(), 3, "{backends}");

    // A valid file again: applied, and the drain of a removed backend's keys is immediate.
    std::fs::write(&file, config(&[addrs[0], addrs[2]], "")).unwrap();
    proxy.signal(Signal::SIGHUP);
    until(admin, "shardproxy_config_reloads_total{result=\"ok\"}", 2.0).await;
    let (_, backends) = http_get(admin, "/backends").await;
    assert!(!backends.contains("\"b2\""), "{backends}");
    let _ = std::fs::remove_dir_all(&dir);
}
