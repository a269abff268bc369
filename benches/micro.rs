//! Criterion micro-benchmarks of the per-connection pure code: the key header parser and
//! routing.
//!
//! - `header/parse`: a complete default header (`[u16 BE len][key]`) with a 16-byte and a
//!   256-byte key, and the same headers split so the first call sees only part of them and
//!   answers `Need` (what a slow client costs per read).
//! - `routing/digest`: `KeyDigest::of` on 16- and 256-byte keys.
//! - `routing/pick` and `routing/rank`: `Router::pick` (the per-connection path: O(n), no
//!   allocation) and `Router::rank` (sorts, allocates) among 3, 100 and 1000 weighted nodes.
//! - `table/rebuild`: `RoutingTable::rebuild` of 1000 backends — what each membership
//!   change (an etcd event batch, an admin API call) costs the control plane: `fresh` with no
//!   previous table, `changed_one` following a table of the same 1000 with one weight
//!   changed (live state carried over by name and address). Issue 10's target: under 10 ms.
//!
//! Measurement time is kept short (1.5 s per bench, 0.5 s warm-up) so
//! `cargo bench --bench micro` finishes in about a minute. Filter as usual:
//! `cargo bench --bench micro -- routing/pick`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shardproxy::metrics::Metrics;
use shardproxy::routing::{KeyDigest, RoutingTable};
use shardproxy::{BackendSpec, HeaderFormat, Parse, Router};

/// Keys of the given length with varied bytes (never all equal, so no hash shortcut).
fn key_of(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| b'a' + ((i as u8).wrapping_mul(7).wrapping_add(seed)) % 26)
        .collect()
}

/// A router over `n` nodes named `node-<i>` with weights 1..=4 (varied, deterministic).
fn router_of(n: usize) -> Router {
    Router::new((0..n).map(|i| (format!("node-{i}"), 1 + (i % 4) as u32))).expect("valid nodes")
}

fn header(c: &mut Criterion) {
    let fmt = HeaderFormat::default();
    let mut g = c.benchmark_group("header/parse");
    for len in [16usize, 256] {
        let mut wire = fmt.encode(&key_of(len, 3)).expect("encodable key");
        // Payload after the header, as a real first read often carries it.
        wire.extend_from_slice(&[0u8; 64]);
        g.throughput(Throughput::Bytes((len + 2) as u64));
        g.bench_with_input(BenchmarkId::new("done", len), &wire, |b, wire| {
            b.iter(|| match fmt.parse(black_box(wire)) {
                Parse::Done { consumed, .. } => consumed,
                other => panic!("unexpected {other:?}"),
            })
        });
        // Split: first the length field and half the key (Need), then all of it (Done).
        let half = 2 + len / 2;
        g.bench_with_input(
            BenchmarkId::new("split_need_then_done", len),
            &wire,
            |b, wire| {
                b.iter(|| {
                    let need = match fmt.parse(black_box(&wire[..half])) {
                        Parse::Need(n) => n,
                        other => panic!("unexpected {other:?}"),
                    };
                    match fmt.parse(black_box(&wire[..half + need])) {
                        Parse::Done { consumed, .. } => consumed,
                        other => panic!("unexpected {other:?}"),
                    }
                })
            },
        );
        g.bench_with_input(BenchmarkId::new("need_1_byte", len), &wire, |b, wire| {
            b.iter(|| fmt.parse(black_box(&wire[..1])))
        });
    }
    g.finish();
}

fn routing(c: &mut Criterion) {
    let keys: Vec<Vec<u8>> = (0..64u8).map(|s| key_of(16, s)).collect();

    let mut g = c.benchmark_group("routing/digest");
    for len in [16usize, 256] {
        let key = key_of(len, 5);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::from_parameter(len), &key, |b, key| {
            b.iter(|| KeyDigest::of(black_box(key)))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("routing/pick");
    for n in [3usize, 100, 1000] {
        let router = router_of(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &router, |b, router| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) % keys.len();
                router.pick(black_box(&keys[i]))
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("routing/rank");
    for n in [3usize, 100, 1000] {
        let router = router_of(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &router, |b, router| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) % keys.len();
                router.rank(black_box(&keys[i]))
            })
        });
    }
    g.finish();
}

/// `n` backend specs `node-<i>` on distinct loopback ports, weights 1..=4.
fn specs_of(n: usize) -> Vec<BackendSpec> {
    (0..n)
        .map(|i| {
            let mut s = BackendSpec::new(
                format!("node-{i}"),
                ([127, 0, 0, 1], 10_000 + i as u16).into(),
            );
            s.weight = 1 + (i % 4) as u32;
            s
        })
        .collect()
}

fn table(c: &mut Criterion) {
    let metrics = Metrics::new();
    let none = std::collections::HashSet::new();
    let specs = specs_of(1000);
    let previous =
        RoutingTable::rebuild(&specs, &none, false, 1, &metrics, None).expect("valid set");
    let mut changed = specs.clone();
    changed[500].weight += 1;
    let mut g = c.benchmark_group("table/rebuild");
    g.bench_function("fresh/1000", |b| {
        b.iter(|| RoutingTable::rebuild(black_box(&specs), &none, false, 2, &metrics, None))
    });
    g.bench_function("changed_one/1000", |b| {
        b.iter(|| {
            RoutingTable::rebuild(
                black_box(&changed),
                &none,
                false,
                2,
                &metrics,
                Some(&previous),
            )
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = header, routing, table
}
criterion_main!(benches);
