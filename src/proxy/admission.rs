//! Admission to the header phase: a global budget and a per-source cap.
//!
//! A connection is "pending" from accept until its key header is complete (or the header
//! phase fails). Pending connections cost a slot and an fd but give nothing back, so a host
//! that opens many and trickles bytes (slowloris) could otherwise fill `max_connections` and
//! lock every other client out. Two limits stop that:
//!
//! - **per source** (`--max-pending-headers-per-source`): a source (an IPv4 address, or an
//!   IPv6 /64, which one host usually owns whole) at its cap has its new connection closed at
//!   once (RST) and counted as `rejected{reason="source_pending_headers"}`. A flooding host
//!   hurts only itself.
//! - **global** (`--max-pending-headers`): when that many connections are pending the accept
//!   loop stops accepting until one finishes its header; the kernel backlog holds the rest.
//!   This bounds a flood spread over many sources: established connections keep at least
//!   `max_connections - max_pending_headers` slots, and new clients are delayed, not closed.
//!
//! The per-source table is a small sharded `Mutex<HashMap>` touched twice per connection (at
//! admission and when the header phase ends), never per byte; an entry is removed when its
//! count drops to zero, so its size is bounded by the pending connections. [`PendingHeader`]
//! is the RAII guard: dropping it frees the global slot and the source's count.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Semaphore;

use crate::metrics::Metrics;

/// Shards of the per-source table (a power of two); admissions on different workers rarely
/// meet on one lock.
const SHARDS: usize = 16;

/// Who a per-source cap applies to: an IPv4 address, or the /64 prefix of an IPv6 address.
///
/// Stored as two words; an IPv4 source is its IPv4-mapped IPv6 form (`::ffff:a.b.c.d`), whose
/// low word is never zero, while an IPv6 /64 has a zero low word, so the two cannot collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Source {
    hi: u64,
    lo: u64,
}

impl Source {
    /// The source a peer address counts against.
    pub(crate) fn of(ip: IpAddr) -> Self {
        let bits = match ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().to_bits(),
            IpAddr::V6(v6) => v6.to_bits() & !u128::from(u64::MAX),
        };
        Source {
            hi: (bits >> 64) as u64,
            lo: bits as u64,
        }
    }
}

/// The header-phase budgets of one proxy, shared by every accept loop.
pub(crate) struct Admission {
    /// Free global header-phase slots.
    slots: Semaphore,
    /// Most pending connections one source may hold.
    per_source: u32,
    /// Pending connections per source; entries at zero are removed.
    shards: [Mutex<HashMap<Source, u32>>; SHARDS],
    /// Picks a source's shard; seeded per process, so a client cannot aim at one lock.
    hasher: RandomState,
    metrics: Metrics,
}

impl Admission {
    /// Budgets of `total` pending connections, at most `per_source` from one source (both at
    /// least 1).
    pub(crate) fn new(total: usize, per_source: usize, metrics: Metrics) -> Self {
        Admission {
            slots: Semaphore::new(total.clamp(1, Semaphore::MAX_PERMITS)),
            per_source: u32::try_from(per_source.max(1)).unwrap_or(u32::MAX),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            hasher: RandomState::new(),
            metrics,
        }
    }

    /// Counts one more pending connection for `ip`'s source, or `None` if that source is at
    /// its cap. The count is released when the returned ticket (or the [`PendingHeader`] made
    /// from it) drops.
    pub(crate) fn admit_source(self: &Arc<Self>, ip: IpAddr) -> Option<SourceTicket> {
        let source = Source::of(ip);
        let mut map = self.shard(source);
        let count = map.entry(source).or_insert(0);
        if *count >= self.per_source {
            return None;
        }
        *count += 1;
        drop(map);
        Some(SourceTicket {
            admission: self.clone(),
            source,
        })
    }

    /// Takes a global header-phase slot for `ticket` if one is free now.
    pub(crate) fn try_pending(&self, ticket: SourceTicket) -> Result<PendingHeader, SourceTicket> {
        match self.slots.try_acquire() {
            Ok(permit) => {
                permit.forget();
                Ok(self.pending(ticket))
            }
            Err(_) => Err(ticket),
        }
    }

    /// Waits for a global header-phase slot for `ticket` (first come, first served).
    pub(crate) async fn pending_slot(&self, ticket: SourceTicket) -> PendingHeader {
        // The semaphore is never closed, so this waits until a slot frees.
        if let Ok(permit) = self.slots.acquire().await {
            permit.forget();
        }
        self.pending(ticket)
    }

    fn pending(&self, ticket: SourceTicket) -> PendingHeader {
        self.metrics.pending_header_started();
        PendingHeader { ticket }
    }

    /// Pending connections now counted for `ip`'s source.
    #[cfg(test)]
    pub(crate) fn source_count(&self, ip: IpAddr) -> u32 {
        let source = Source::of(ip);
        self.shard(source).get(&source).copied().unwrap_or(0)
    }

    /// Sources with a pending connection now.
    #[cfg(test)]
    pub(crate) fn sources(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    fn shard(&self, source: Source) -> std::sync::MutexGuard<'_, HashMap<Source, u32>> {
        let i = self.hasher.hash_one(source) as usize % SHARDS;
        // A panic while holding the lock cannot leave a count half-updated (each update is one
        // store), so a poisoned shard is still consistent.
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn release_source(&self, source: Source) {
        let mut map = self.shard(source);
        if let Some(count) = map.get_mut(&source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                map.remove(&source);
            }
        }
    }
}

/// One connection counted against its source's cap (not yet holding a global slot). Dropping
/// it releases the count.
pub(crate) struct SourceTicket {
    admission: Arc<Admission>,
    source: Source,
}

impl Drop for SourceTicket {
    fn drop(&mut self) {
        self.admission.release_source(self.source);
    }
}

/// A connection in the header phase: holds one global header slot and one count of its
/// source. Drop it as soon as the header phase ends (complete or failed).
pub(crate) struct PendingHeader {
    ticket: SourceTicket,
}

impl Drop for PendingHeader {
    fn drop(&mut self) {
        let admission = &self.ticket.admission;
        admission.slots.add_permits(1);
        admission.metrics.pending_header_ended();
        // The ticket's own drop releases the source count.
    }
}

#[cfg(test)]
impl PendingHeader {
    /// A guard on a throwaway budget, for tests that call `serve` directly.
    pub(crate) fn for_tests() -> Self {
        let admission = Arc::new(Admission::new(1, 1, Metrics::new()));
        let ip = IpAddr::from([127, 0, 0, 1]);
        let ticket = admission.admit_source(ip);
        match ticket.map(|t| admission.try_pending(t)) {
            Some(Ok(guard)) => guard,
            _ => unreachable!("a fresh budget of one admits one connection"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sources_group_ipv6_by_64_and_map_ipv4() {
        assert_eq!(
            Source::of(ip("10.0.0.1")),
            Source::of(ip("::ffff:10.0.0.1"))
        );
        assert_ne!(Source::of(ip("10.0.0.1")), Source::of(ip("10.0.0.2")));
        assert_eq!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:3::1"))
        );
        // An IPv4 source never equals an IPv6 /64 (the low word of a /64 is zero).
        assert_ne!(Source::of(ip("0.0.0.0")), Source::of(ip("::")));
    }

    #[test]
    fn per_source_cap_counts_each_source_alone_and_forgets_idle_ones() {
        let a = Arc::new(Admission::new(100, 2, Metrics::new()));
        let (x, y) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let x1 = a.admit_source(x).expect("first from x");
        let x2 = a.admit_source(x).expect("second from x");
        assert!(a.admit_source(x).is_none(), "x is at its cap");
        // Another source is not affected by x being at its cap.
        let y1 = a.admit_source(y).expect("first from y");
        assert_eq!((a.source_count(x), a.source_count(y)), (2, 1));
        drop(x1);
        let x3 = a.admit_source(x).expect("x has room again");
        drop((x2, x3, y1));
        assert_eq!(a.sources(), 0, "entries at zero are removed");
    }

    #[test]
    fn pending_guard_releases_slot_and_source_count() {
        let metrics = Metrics::new();
        let a = Arc::new(Admission::new(1, 5, metrics.clone()));
        let x = ip("192.0.2.1");
        let first = a
            .try_pending(a.admit_source(x).unwrap())
            .unwrap_or_else(|_| panic!("a free slot"));
        let ticket = a.admit_source(x).unwrap();
        let ticket = match a.try_pending(ticket) {
            Ok(_) => panic!("the only global slot is taken"),
            Err(t) => t,
        };
        assert_eq!(a.source_count(x), 2);
        drop(first);
        let second = a
            .try_pending(ticket)
            .unwrap_or_else(|_| panic!("the slot was released"));
        assert!(metrics
            .render()
            .contains("shardproxy_connections_pending_headers 1"));
        drop(second);
        assert_eq!(a.sources(), 0);
        assert_eq!(a.slots.available_permits(), 1);
        assert!(metrics
            .render()
            .contains("shardproxy_connections_pending_headers 0"));
    }

    #[tokio::test]
    async fn pending_slot_waits_for_a_release() {
        let a = Arc::new(Admission::new(1, 5, Metrics::new()));
        let x = ip("192.0.2.1");
        let held = a.pending_slot(a.admit_source(x).unwrap()).await;
        let waiter = {
            let a = a.clone();
            let ticket = a.admit_source(x).unwrap();
            tokio::spawn(async move { a.pending_slot(ticket).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "no slot is free yet");
        drop(held);
        let guard = waiter.await.unwrap();
        assert_eq!(a.source_count(x), 1);
        drop(guard);
        assert_eq!(a.sources(), 0);
    }
}
