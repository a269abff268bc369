//! The operator's artefacts against a live proxy: every metric that
//! `examples/prometheus-alerts.yml` and `examples/grafana-dashboard.json` use is in a real
//! scrape, and (with `promtool`, run by `.ci/run`) the alert rules fire on a live proxy's
//! samples — a backend down, two proxies that disagree on the table — and stay quiet on a
//! healthy one.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use shardproxy::fixtures::client::round_trip;
use shardproxy::{HeaderFormat, ProxyHandle};

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// The `shardproxy_*` metric names a text mentions.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("shardproxy_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// A proxy over one live echo backend and one refusing address, with fast health checks;
/// returns once the refusing one is marked down and a connection went through.
async fn proxy_with_a_dead_backend() -> (Vec<shardproxy::fixtures::echo::EchoBackend>, ProxyHandle)
{
    let live = echo_backends(1).await;
    let mut members = specs(&live);
    members.push(shardproxy::BackendSpec::new("dead", refusing_addr()));
    let proxy = start_proxy(members, |c| {
        c.health.interval = Duration::from_millis(50);
        c.health.fall = 2;
    })
    .await;
    // Traffic, so the histograms have samples.
    let key = (0..)
        .map(key)
        .find(|k| proxy.table().router.rank_names(k)[0] != "dead")
        .expect("a key owned by the live backend");
    round_trip(proxy.local_addr(), &HeaderFormat::default(), &key, b"hello")
        .await
        .expect("round trip");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(&proxy).await;
        if metric(&text, "shardproxy_backend_up{backend=\"dead\"}") == 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refusing backend was never marked down:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (live, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_and_the_dashboard_use_is_exported() {
    let (_live, proxy) = proxy_with_a_dead_backend().await;
    let scraped = scrape(&proxy).await;
    let exported = metric_names(&scraped);
    let rules = std::fs::read_to_string(example("prometheus-alerts.yml")).unwrap();
    let dashboard = std::fs::read_to_string(example("grafana-dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert!(
        parsed["panels"].as_array().is_some_and(|p| p.len() >= 10),
        "the dashboard has its panels"
    );
    for (file, text) in [("alerts", &rules), ("dashboard", &dashboard)] {
        let used = metric_names(text);
        assert!(used.len() >= 8, "{file} uses {used:?}");
        for name in used {
            assert!(
                exported.contains(&name),
                "{file} uses {name}, which a live proxy does not export"
            );
        }
    }
}

/// Turns a scrape into promtool input series: every sample, constant for `minutes`, with
/// `instance` and `job` labels as a Prometheus server would add them.
fn input_series(scraped: &str, instance: &str, job: &str, minutes: u32) -> String {
    let mut out = String::new();
    for line in scraped.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let extra = format!("instance=\"{instance}\",job=\"{job}\"");
        let series = match series.split_once('{') {
            Some((name, labels)) => format!("{name}{{{extra},{labels}"),
            None => format!("{series}{{{extra}}}"),
        };
        let series = series.replace('\'', "''");
        out.push_str(&format!(
            "      - series: '{series}'\n        values: '{value}+0x{minutes}'\n"
        ));
    }
    out
}

/// `promtool test rules` over two live proxies' samples: one with a dead backend, one with a
/// different membership in the same job. Needs promtool (Debian `prometheus`); `.ci/run`
/// installs it and runs this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs promtool (apt-get install prometheus); run by .ci/run"]
async fn the_alert_rules_fire_on_a_live_proxys_samples() {
    let (_live, sick) = proxy_with_a_dead_backend().await;
    let healthy_backends = echo_backends(2).await;
    let healthy = start_proxy(specs(&healthy_backends), |_| {}).await;
    let sick_text = scrape(&sick).await;
    let healthy_text = scrape(&healthy).await;
    let fingerprints = |t: &str| metric(t, "shardproxy_routing_table_fingerprint");
    assert_ne!(fingerprints(&sick_text), fingerprints(&healthy_text));

    let dir = std::env::temp_dir().join(format!("shardproxy-promtool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut series = input_series(&sick_text, "sick:9100", "pool", 20);
    series += &input_series(&healthy_text, "healthy:9100", "pool", 20);
    let expectations = [
        "      - eval_time: 10m",
        "        alertname: ShardproxyBackendDown",
        "        exp_alerts:",
        "          - exp_labels: {severity: warning, instance: 'sick:9100', job: pool, backend: dead}",
        "            exp_annotations:",
        "              summary: 'shardproxy sick:9100: backend dead is down'",
        "              description: 'Its keys go to their next choice (or fail fast with failover = none).'",
        "      - eval_time: 10m",
        "        alertname: ShardproxyTableDisagreement",
        "        exp_alerts:",
        "          - exp_labels: {severity: critical, job: pool}",
        "            exp_annotations:",
        "              summary: 'shardproxy job pool: proxies disagree on the routing table'",
        "              description: '2 distinct fingerprints; keys may reach different backends through different proxies.'",
        "      - eval_time: 10m",
        "        alertname: ShardproxyRoutingPanic",
        "        exp_alerts: []",
        "      - eval_time: 10m",
        "        alertname: ShardproxyFdsNearLimit",
        "        exp_alerts: []",
        "      - eval_time: 10m",
        "        alertname: ShardproxyConfigReloadFailed",
        "        exp_alerts: []",
    ]
    .join("\n");
    let test = format!(
        "rule_files:\n  - {rules}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{series}    alert_rule_test:\n{expectations}\n",
        rules = example("prometheus-alerts.yml").display(),
    );
    let test_file = dir.join("alerts.test.yml");
    std::fs::write(&test_file, test).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["test", "rules"])
        .arg(&test_file)
        .output()
        .expect("promtool runs (apt-get install prometheus)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{report}"
    );
    assert!(report.contains("SUCCESS"), "{report}");
}
