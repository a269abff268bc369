//! Routing: which node owns a key ([docs/design.md §3](../../docs/design.md)). A contract that must never change silently.
//!
//! Rendezvous (highest random weight) hashing through the `rendezvous_hash` crate, with the
//! stable [`StableNodeHasher`] and the crate's logarithmic weighting
//! (`score = ln(raw / (2^64-1)) / weight`, higher wins; ties by name, the greater name first).
//! A node is identified by its **name** only: its address and its position in a list never
//! matter. Weight 0 means "takes no new keys".
//!
//! A [`Router`] is immutable; a membership change builds a new one. It is public API so a Rust
//! client can shard by itself with results identical to the proxy's. It never touches a socket.
//!
//! - [`Router::pick`] / [`Router::pick_excluding`]: O(n), no allocation, no sort — the per-
//!   connection path.
//! - [`Router::rank`]: the full ranking through the crate's `calc_candidates` (sorts,
//!   allocates) — for tools, the admin API and tests.

mod hasher;
mod table;

use std::sync::Arc;

use rendezvous_hash::{Capacity, IdNode, Node, RendezvousNodes, WeightedNode};
use xxhash_rust::xxh3::Xxh3;

pub use hasher::{raw_score, KeyDigest, NodeId, StableNodeHasher};
pub use table::{ActiveSlot, Backend, BackendState, Health, RoutingTable};

/// Largest weight a node may have.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// Why a router could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingError {
    /// Two nodes share a name; names are identities and must be unique.
    #[error("node name {0:?} appears twice; node names must be unique")]
    DuplicateName(String),
    /// A node has an empty name.
    #[error("node name is empty")]
    EmptyName,
    /// A weight is out of range.
    #[error("node {name:?} has weight {weight}; weights go from 0 (drain) to {MAX_WEIGHT}")]
    BadWeight {
        /// The node.
        name: String,
        /// Its weight.
        weight: u32,
    },
}

/// A node as the router sees it: a name and a weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteNode {
    /// The node's identity.
    pub name: Arc<str>,
    /// Relative share of keys; 0 takes no new keys.
    pub weight: u32,
}

type Member = WeightedNode<IdNode<NodeId>>;

/// An immutable rendezvous-hashing table over named, weighted nodes.
pub struct Router {
    /// The nodes in the order given; indices returned by `pick*` point here.
    nodes: Vec<RouteNode>,
    /// Nodes with weight > 0, as the `rendezvous_hash` crate holds them.
    members: RendezvousNodes<Member, StableNodeHasher>,
    /// Order-independent digest of the membership (names and weights).
    fingerprint: u64,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("nodes", &self.nodes)
            .field("fingerprint", &format_args!("{:016x}", self.fingerprint))
            .finish()
    }
}

impl Router {
    /// Builds a router. Names must be unique and non-empty; weights `0..=MAX_WEIGHT`.
    pub fn new<I, S>(nodes: I) -> Result<Self, RoutingError>
    where
        I: IntoIterator<Item = (S, u32)>,
        S: Into<Arc<str>>,
    {
        let nodes: Vec<RouteNode> = nodes
            .into_iter()
            .map(|(name, weight)| RouteNode {
                name: name.into(),
                weight,
            })
            .collect();
        let mut members = RendezvousNodes::new(StableNodeHasher);
        for (index, node) in nodes.iter().enumerate() {
            if node.name.is_empty() {
                return Err(RoutingError::EmptyName);
            }
            if node.weight > MAX_WEIGHT {
                return Err(RoutingError::BadWeight {
                    name: node.name.to_string(),
                    weight: node.weight,
                });
            }
            if nodes[..index].iter().any(|n| n.name == node.name) {
                return Err(RoutingError::DuplicateName(node.name.to_string()));
            }
            // Weight 0 (drain) takes no new keys: it is simply not a member.
            if let Some(capacity) = Capacity::new(f64::from(node.weight)) {
                let id = IdNode::new(NodeId::new(node.name.clone(), index));
                members.insert(WeightedNode::new(id, capacity));
            }
        }
        let fingerprint = fingerprint(&nodes);
        Ok(Router {
            nodes,
            members,
            fingerprint,
        })
    }

    /// The nodes, in the order given.
    pub fn nodes(&self) -> &[RouteNode] {
        &self.nodes
    }

    /// Number of nodes that take keys (weight > 0).
    pub fn active_len(&self) -> usize {
        self.members.len()
    }

    /// Order-independent 64-bit digest of the membership: equal on every proxy that has the
    /// same names and weights, whatever order they were listed in.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The owner of `key`: index into [`Router::nodes`]. `None` when no node takes keys.
    pub fn pick(&self, key: &[u8]) -> Option<usize> {
        self.pick_excluding(KeyDigest::of(key), &[])
    }

    /// The best node for a key digest that is not in `exclude` (indices already tried).
    /// O(n · |exclude|), no allocation; the same order as [`Router::rank`].
    pub fn pick_excluding(&self, digest: KeyDigest, exclude: &[usize]) -> Option<usize> {
        self.pick_where(digest, |index| !exclude.contains(&index))
    }

    /// The best node for a key digest among those `usable` accepts (by index). One pass over
    /// the nodes, no allocation; the same order as [`Router::rank`] with the others left
    /// out — so a key whose best node is left out goes to its next choice, and no other key
    /// moves.
    pub fn pick_where(&self, digest: KeyDigest, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let hasher = StableNodeHasher;
        let mut best: Option<(_, &NodeId)> = None;
        for member in self.members.iter() {
            let id: &NodeId = member.node_id();
            if !usable(id.index()) {
                continue;
            }
            let score = member.hash_code(&hasher, &digest);
            // Same order as the crate's sort: score descending, then node id descending.
            let better = match &best {
                None => true,
                Some((best_score, best_id)) => (&score, id) > (best_score, *best_id),
            };
            if better {
                best = Some((score, id));
            }
        }
        best.map(|(_, id)| id.index())
    }

    /// All nodes that take keys, best first, through the crate's `calc_candidates`.
    /// Allocates and sorts: for tools and tests, not the per-connection path.
    pub fn rank(&self, key: &[u8]) -> Vec<usize> {
        self.members
            .calc_candidates(&KeyDigest::of(key))
            .map(|m| m.node_id().index())
            .collect()
    }

    /// [`Router::rank`] as node names.
    pub fn rank_names(&self, key: &[u8]) -> Vec<&str> {
        self.rank(key)
            .into_iter()
            .map(|i| &*self.nodes[i].name)
            .collect()
    }

    /// The name of node `index`.
    pub fn name(&self, index: usize) -> &str {
        &self.nodes[index].name
    }
}

/// XXH3-64 over the nodes sorted by name, each as `name bytes, 0x00, weight as u32 LE`.
fn fingerprint(nodes: &[RouteNode]) -> u64 {
    let mut sorted: Vec<&RouteNode> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    let mut h = Xxh3::new();
    for n in sorted {
        h.update(n.name.as_bytes());
        h.update(&[0]);
        h.update(&n.weight.to_le_bytes());
    }
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn router(n: usize) -> Router {
        Router::new((0..n).map(|i| (format!("node-{i}"), 1))).unwrap()
    }

    fn key(i: u32) -> Vec<u8> {
        format!("user:{i}").into_bytes()
    }

    #[test]
    fn rejects_bad_membership() {
        assert_eq!(
            Router::new([("a", 1), ("a", 2)]).unwrap_err(),
            RoutingError::DuplicateName("a".into())
        );
        assert_eq!(Router::new([("", 1)]).unwrap_err(), RoutingError::EmptyName);
        assert!(matches!(
            Router::new([("a", MAX_WEIGHT + 1)]).unwrap_err(),
            RoutingError::BadWeight { .. }
        ));
    }

    #[test]
    fn empty_and_drained_tables_pick_nothing() {
        assert_eq!(
            Router::new(Vec::<(String, u32)>::new()).unwrap().pick(b"k"),
            None
        );
        let r = Router::new([("a", 0), ("b", 0)]).unwrap();
        assert_eq!(r.pick(b"k"), None);
        assert!(r.rank(b"k").is_empty());
    }

    #[test]
    fn weight_zero_takes_no_keys_and_moves_only_its_own() {
        let full = Router::new([("a", 1), ("b", 1), ("c", 1)]).unwrap();
        let drained = Router::new([("a", 1), ("b", 0), ("c", 1)]).unwrap();
        for i in 0..5000 {
            let k = key(i);
            let before = full.pick(&k).unwrap();
            let after = drained.pick(&k).unwrap();
            assert_ne!(drained.name(after), "b");
            if full.name(before) != "b" {
                assert_eq!(full.name(before), drained.name(after));
            } else {
                assert_eq!(drained.name(after), full.rank_names(&k)[1]);
            }
        }
    }

    #[test]
    fn balance_within_a_few_percent() {
        for n in [3usize, 5, 10] {
            let r = router(n);
            let mut counts = vec![0u32; n];
            let total = 100_000u32;
            for i in 0..total {
                counts[r.pick(&key(i)).unwrap()] += 1;
            }
            let expected = f64::from(total) / n as f64;
            for (i, c) in counts.iter().enumerate() {
                let dev = (f64::from(*c) - expected).abs() / expected;
                assert!(dev < 0.03, "n={n} node {i}: {c} keys, {dev:.3} off 1/n");
            }
        }
    }

    #[test]
    fn adding_a_node_moves_about_one_in_n_plus_one_all_onto_it() {
        let before = router(4);
        let after = router(5);
        let total = 50_000u32;
        let mut moved = 0u32;
        for i in 0..total {
            let k = key(i);
            let (b, a) = (before.pick(&k).unwrap(), after.pick(&k).unwrap());
            if before.name(b) != after.name(a) {
                assert_eq!(after.name(a), "node-4", "a key moved between old nodes");
                moved += 1;
            }
        }
        let share = f64::from(moved) / f64::from(total);
        assert!((share - 0.2).abs() < 0.01, "moved share {share}");
    }

    #[test]
    fn removing_a_node_moves_only_its_keys_spread_evenly() {
        let before = router(5);
        let after =
            Router::new((0..5).filter(|&i| i != 2).map(|i| (format!("node-{i}"), 1))).unwrap();
        let mut landed: HashMap<String, u32> = HashMap::new();
        for i in 0..50_000 {
            let k = key(i);
            let b = before.name(before.pick(&k).unwrap()).to_string();
            let a = after.name(after.pick(&k).unwrap()).to_string();
            if b == "node-2" {
                assert_eq!(a, before.rank_names(&k)[1], "not its second choice");
                *landed.entry(a).or_default() += 1;
            } else {
                assert_eq!(a, b, "a surviving node's key moved");
            }
        }
        let total: u32 = landed.values().sum();
        for (name, c) in &landed {
            let share = f64::from(*c) / f64::from(total);
            assert!(
                (share - 0.25).abs() < 0.03,
                "{name} got {share:.3} of the orphans"
            );
        }
    }

    #[test]
    fn weights_are_proportional() {
        let r = Router::new([("a", 1), ("b", 2), ("c", 3), ("d", 4)]).unwrap();
        let mut counts = [0u32; 4];
        let total = 100_000u32;
        for i in 0..total {
            counts[r.pick(&key(i)).unwrap()] += 1;
        }
        for (i, c) in counts.iter().enumerate() {
            let want = (i as f64 + 1.0) / 10.0;
            let got = f64::from(*c) / f64::from(total);
            assert!((got - want).abs() < 0.01, "node {i}: {got:.4} vs {want}");
        }
    }

    #[test]
    fn order_of_the_list_does_not_matter() {
        let a = Router::new([("x", 1), ("y", 2), ("z", 3)]).unwrap();
        let b = Router::new([("z", 3), ("x", 1), ("y", 2)]).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        for i in 0..2000 {
            let k = key(i);
            assert_eq!(a.rank_names(&k), b.rank_names(&k));
        }
    }

    proptest! {
        /// The O(n) path agrees with the crate's full sort, with any exclusion set.
        #[test]
        fn pick_agrees_with_rank(k in proptest::collection::vec(any::<u8>(), 1..64),
                                 weights in proptest::collection::vec(0u32..5, 1..12),
                                 skip in 0usize..4) {
            let r = Router::new(weights.iter().enumerate().map(|(i, w)| (format!("n{i}"), *w))).unwrap();
            let ranked = r.rank(&k);
            let digest = KeyDigest::of(&k);
            let mut tried = Vec::new();
            for want in ranked.iter().take(skip + 1) {
                prop_assert_eq!(r.pick_excluding(digest, &tried), Some(*want));
                tried.push(*want);
            }
            if ranked.len() <= skip + 1 {
                let all: Vec<usize> = ranked.clone();
                prop_assert_eq!(r.pick_excluding(digest, &all), None);
            }
        }
    }
}
