//! The per-source connection rate limit (`source_rate`): a token bucket per source.
//!
//! A source is what [`super::admission`] counts against: an IPv4 address, or an IPv6 /64.
//! Each source may open `burst` connections at once and `per_second` on average; a new
//! connection over that is reset by the accept loop and counted as
//! `rejected{reason="source_rate"}`.
//!
//! Each bucket is kept as one number, its *theoretical arrival time* (the GCRA form of a
//! token bucket): the instant at which the bucket will be full again. A connection at `now`
//! costs one interval `T = 1 / per_second`; it is admitted if the bucket, after paying, is
//! still at most `burst × T` ahead of `now` — exactly `burst` connections at one instant, one
//! more per `T` after that. A bucket whose arrival time is not after `now` is full, which is
//! the same as having no entry, so such entries are what eviction removes.
//!
//! Memory is bounded under a flood of distinct sources: the table is sharded like
//! admission's (a `Mutex<HashMap>` per shard, touched once per connection, never across an
//! await) and each shard holds at most [`MAX_SOURCES`]` / SHARDS` entries. A new source
//! meeting a full shard triggers a sweep of that shard's full buckets — at most once per
//! [`SWEEP_INTERVAL`] per shard, so the sweep's cost is amortised and a connection costs O(1).
//! If the shard is still full, the new source is admitted without an entry (fail open): the
//! table then holds that many sources each with a recent connection, and refusing every
//! newcomer would lock out good clients instead of limiting anyone. Entries are plain
//! integers and a shard's map never shrinks, so the steady state allocates nothing.
//!
//! The setting can change live ([`SourceRates::set`], for a reload): buckets carry over a
//! rate change, and turning the limit off frees the table. Off, a connection costs one
//! relaxed atomic load.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::admission::Source;
use crate::config::SourceRate;

/// Most sources tracked at once, over all shards.
pub(crate) const MAX_SOURCES: usize = 65_536;
/// Shards of the table (a power of two).
const SHARDS: usize = 16;
/// Most sources one shard tracks.
const SHARD_CAP: usize = MAX_SOURCES / SHARDS;
/// A full shard is swept for full buckets at most this often.
pub(crate) const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// What [`SourceRates::admit_at`] decided for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Within the source's rate: serve it.
    Admit,
    /// Over the source's rate: reset it.
    Reject,
    /// The table is full of recently active sources: served, but this source is not tracked.
    Untracked,
}

/// One shard: arrival times in nanoseconds since the limiter's epoch.
struct Shard {
    buckets: HashMap<Source, u64>,
    /// No sweep before this instant (nanoseconds since the epoch).
    next_sweep: u64,
}

/// The per-source token buckets of one proxy, shared by every accept loop.
pub(crate) struct SourceRates {
    /// Nanoseconds one connection costs (`1 / per_second`), at least 1; 0: the limit is off.
    interval: AtomicU64,
    /// How far ahead of now a bucket may run: `burst` intervals. Stored apart from
    /// `interval`: a connection racing [`SourceRates::set`] may see one old and one new,
    /// which only judges that one connection by a mix of the two settings.
    tolerance: AtomicU64,
    shards: [Mutex<Shard>; SHARDS],
    /// Picks a source's shard; seeded per process.
    hasher: RandomState,
    /// The clock's zero for [`SourceRates::admit`].
    epoch: Instant,
}

/// `(interval, tolerance)` in nanoseconds for `rate` (validated by the config: `per_second`
/// finite and above 0, `burst` at least 1); `(0, 0)` when off.
fn parameters(rate: Option<SourceRate>) -> (u64, u64) {
    match rate {
        None => (0, 0),
        Some(r) => {
            // `as` saturates: a rate too slow for u64 nanoseconds never refills in practice.
            let interval = ((1e9 / r.per_second).round() as u64).max(1);
            (interval, interval.saturating_mul(u64::from(r.burst.max(1))))
        }
    }
}

impl SourceRates {
    /// The limiter for `rate` (`None`: off).
    pub(crate) fn new(rate: Option<SourceRate>) -> Self {
        let (interval, tolerance) = parameters(rate);
        SourceRates {
            interval: AtomicU64::new(interval),
            tolerance: AtomicU64::new(tolerance),
            shards: std::array::from_fn(|_| {
                Mutex::new(Shard {
                    buckets: HashMap::new(),
                    next_sweep: 0,
                })
            }),
            hasher: RandomState::new(),
            epoch: Instant::now(),
        }
    }

    /// Changes the limit live (a reload). The buckets carry over a change of rate; `None`
    /// turns the limit off and frees the table.
    pub(crate) fn set(&self, rate: Option<SourceRate>) {
        let (interval, tolerance) = parameters(rate);
        self.tolerance.store(tolerance, Ordering::Relaxed);
        self.interval.store(interval, Ordering::Relaxed);
        if rate.is_none() {
            for shard in &self.shards {
                let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
                shard.buckets = HashMap::new();
                shard.next_sweep = 0;
            }
        }
    }

    /// Charges one connection from `ip` now.
    pub(crate) fn admit(&self, ip: IpAddr) -> Verdict {
        if self.interval.load(Ordering::Relaxed) == 0 {
            return Verdict::Admit;
        }
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.admit_at(ip, now)
    }

    /// Charges one connection from `ip` at `now` (nanoseconds since the epoch; never going
    /// back).
    pub(crate) fn admit_at(&self, ip: IpAddr, now: u64) -> Verdict {
        let interval = self.interval.load(Ordering::Relaxed);
        if interval == 0 {
            return Verdict::Admit;
        }
        let tolerance = self.tolerance.load(Ordering::Relaxed);
        let source = Source::of(ip);
        let shard = &self.shards[self.hasher.hash_one(source) as usize & (SHARDS - 1)];
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tat) = shard.buckets.get_mut(&source) {
            let paid = (*tat).max(now).saturating_add(interval);
            if paid - now > tolerance {
                return Verdict::Reject;
            }
            *tat = paid;
            return Verdict::Admit;
        }
        if shard.buckets.len() >= SHARD_CAP {
            if now < shard.next_sweep {
                return Verdict::Untracked;
            }
            shard.buckets.retain(|_, tat| *tat > now);
            shard.next_sweep = now.saturating_add(SWEEP_INTERVAL.as_nanos() as u64);
            if shard.buckets.len() >= SHARD_CAP {
                return Verdict::Untracked;
            }
        }
        // A fresh source starts full and pays for this connection (burst is at least 1).
        shard.buckets.insert(source, now.saturating_add(interval));
        Verdict::Admit
    }

    /// Sources tracked now.
    #[cfg(test)]
    fn sources(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .buckets
                    .len()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;

    fn rates(per_second: f64, burst: u32) -> SourceRates {
        SourceRates::new(Some(SourceRate { per_second, burst }))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// How many of `n` connections from `ip` at `now` are admitted.
    fn admitted(r: &SourceRates, ip: IpAddr, now: u64, n: usize) -> usize {
        (0..n)
            .filter(|_| r.admit_at(ip, now) == Verdict::Admit)
            .count()
    }

    #[test]
    fn a_burst_at_one_instant_is_exactly_burst() {
        let r = rates(20.0, 10);
        let x = ip("192.0.2.1");
        assert_eq!(admitted(&r, x, 5 * SEC, 25), 10);
        assert_eq!(r.admit_at(x, 5 * SEC), Verdict::Reject);
    }

    #[test]
    fn tokens_refill_at_the_rate_up_to_the_burst() {
        let r = rates(20.0, 10);
        let x = ip("192.0.2.1");
        let t0 = SEC;
        assert_eq!(admitted(&r, x, t0, 10), 10);
        // 20 per second: one token per 50 ms.
        assert_eq!(admitted(&r, x, t0 + 49 * MS, 5), 0);
        assert_eq!(admitted(&r, x, t0 + 50 * MS, 5), 1);
        assert_eq!(admitted(&r, x, t0 + 200 * MS, 5), 3);
        // A long pause refills to the burst, never beyond it.
        assert_eq!(admitted(&r, x, t0 + 60 * SEC, 50), 10);
        // A steady pace at the rate is always admitted.
        let t1 = t0 + 120 * SEC;
        for i in 0..1000 {
            assert_eq!(r.admit_at(x, t1 + i * 50 * MS), Verdict::Admit, "{i}");
        }
    }

    #[test]
    fn sources_are_independent_and_ipv6_counts_per_64() {
        let r = rates(1.0, 2);
        assert_eq!(admitted(&r, ip("192.0.2.1"), SEC, 5), 2);
        assert_eq!(admitted(&r, ip("192.0.2.2"), SEC, 5), 2);
        // An IPv4-mapped IPv6 peer is the IPv4 source.
        assert_eq!(admitted(&r, ip("::ffff:192.0.2.2"), SEC, 5), 0);
        assert_eq!(admitted(&r, ip("2001:db8:0:1::1"), SEC, 1), 1);
        assert_eq!(admitted(&r, ip("2001:db8:0:1::ffff"), SEC, 5), 1);
        assert_eq!(admitted(&r, ip("2001:db8:0:2::1"), SEC, 5), 2);
    }

    #[test]
    fn fractional_rates_and_burst_one() {
        // One connection per 10 s.
        let r = rates(0.1, 1);
        let x = ip("192.0.2.1");
        assert_eq!(admitted(&r, x, SEC, 3), 1);
        assert_eq!(admitted(&r, x, 10 * SEC, 3), 0);
        assert_eq!(admitted(&r, x, 11 * SEC, 3), 1);
    }

    fn nth_ip(i: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i))
    }

    #[test]
    fn the_table_stays_bounded_under_a_flood_of_sources_and_evicts_full_buckets() {
        let r = rates(1.0, 5);
        let mut untracked = 0;
        for i in 0..(3 * MAX_SOURCES as u32) {
            match r.admit_at(nth_ip(i), SEC) {
                Verdict::Admit => {}
                Verdict::Untracked => untracked += 1,
                Verdict::Reject => panic!("a new source is never rejected"),
            }
            if i % 4096 == 0 {
                assert!(r.sources() <= MAX_SOURCES, "{i}: {}", r.sources());
            }
        }
        assert!(r.sources() <= MAX_SOURCES, "{}", r.sources());
        // Every shard filled up; the rest were served untracked (no bucket was full yet).
        assert!(r.sources() > MAX_SOURCES * 9 / 10, "{}", r.sources());
        assert!(untracked >= 2 * MAX_SOURCES as u32 - 1000, "{untracked}");
        // A tracked source stays limited meanwhile.
        let tracked = (0..)
            .map(nth_ip)
            .find(|x| r.admit_at(*x, SEC) == Verdict::Admit);
        let tracked = tracked.expect("some source is tracked");
        assert_eq!(admitted(&r, tracked, SEC, 10), 3);
        assert_eq!(r.admit_at(tracked, SEC), Verdict::Reject);
        // Once the buckets are full again (1 s per token, 5 s for the burst) the next new
        // source sweeps its shard: the full buckets go, the newcomer is tracked.
        let later = 10 * SEC;
        let fresh = nth_ip(10_000_000);
        assert_eq!(r.admit_at(fresh, later), Verdict::Admit);
        assert!(r.sources() < MAX_SOURCES, "{}", r.sources());
        assert_eq!(admitted(&r, fresh, later, 10), 4);
        // The sources in every shard get swept as newcomers arrive, so the table ends near
        // the newcomers alone.
        for i in 0..1000 {
            r.admit_at(nth_ip(20_000_000 + i), later);
        }
        assert!(r.sources() <= 1001 + 1, "{}", r.sources());
    }

    #[test]
    fn a_full_shard_is_swept_at_most_once_per_interval() {
        // One token per 2 s: buckets charged at 1 s are full again at 3 s.
        let r = rates(0.5, 1);
        for i in 0..(2 * MAX_SOURCES as u32) {
            r.admit_at(nth_ip(i), SEC);
        }
        let full = r.sources();
        assert_eq!(full, MAX_SOURCES);
        let newcomers = |base: u32, now: u64| -> Vec<Verdict> {
            (0..1000)
                .map(|i| r.admit_at(nth_ip(base + i), now))
                .collect()
        };
        // At 2.5 s every shard sweeps (its interval since the flood's sweep has passed) and
        // frees nothing: no bucket is full yet.
        assert!(newcomers(5_000_000, 2 * SEC + SEC / 2)
            .iter()
            .all(|v| *v == Verdict::Untracked));
        assert_eq!(r.sources(), full);
        // At 3.25 s every bucket is full, but no shard may sweep again before 3.5 s.
        assert!(newcomers(6_000_000, 3 * SEC + SEC / 4)
            .iter()
            .all(|v| *v == Verdict::Untracked));
        assert_eq!(r.sources(), full);
        // At 3.5 s the sweeps run and the newcomers are tracked.
        assert!(newcomers(7_000_000, 3 * SEC + SEC / 2)
            .iter()
            .all(|v| *v == Verdict::Admit));
        assert!(r.sources() <= 1000, "{}", r.sources());
    }

    #[test]
    fn off_admits_everything_untracked_and_the_setting_changes_live() {
        let r = SourceRates::new(None);
        let x = ip("192.0.2.1");
        assert_eq!(admitted(&r, x, SEC, 100), 100);
        assert_eq!(r.admit(x), Verdict::Admit);
        assert_eq!(r.sources(), 0);
        // Turned on: limited from then on.
        r.set(Some(SourceRate {
            per_second: 1.0,
            burst: 3,
        }));
        assert_eq!(admitted(&r, x, 2 * SEC, 10), 3);
        // A new rate applies to the buckets as they are: the bucket emptied at the old rate
        // is full again at 5 s, then holds 5 and refills 10 per second.
        r.set(Some(SourceRate {
            per_second: 10.0,
            burst: 5,
        }));
        assert_eq!(admitted(&r, x, 2 * SEC, 10), 0);
        assert_eq!(admitted(&r, x, 4 * SEC, 10), 0);
        assert_eq!(admitted(&r, x, 5 * SEC, 10), 5);
        assert_eq!(admitted(&r, x, 5 * SEC + 100 * MS, 10), 1);
        // Off again: everything admitted, the table freed.
        r.set(None);
        assert_eq!(r.sources(), 0);
        assert_eq!(admitted(&r, x, 5 * SEC + 100 * MS, 10), 10);
        assert_eq!(r.sources(), 0);
    }

    #[test]
    fn extreme_rates_do_not_overflow() {
        let r = rates(1e-12, u32::MAX);
        let x = ip("192.0.2.1");
        assert_eq!(admitted(&r, x, u64::MAX - 10, 3), 3);
        let r = rates(1e12, 1);
        assert_eq!(admitted(&r, x, 0, 3), 1);
        assert_eq!(admitted(&r, x, 1, 3), 1);
    }
}
