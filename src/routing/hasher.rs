//! The stable node hasher: the 64-bit score of a (key, node) pair, fixed to the byte.
//!
//! `docs/routing.md` is the normative spec; this file must agree with it and with the golden
//! vectors under `tests/golden/`. It uses XXH3-64 (implementations exist in every mainstream
//! language) and never `std`'s `DefaultHasher`, whose algorithm may change between releases.
//!
//! ```text
//! k        = XXH3_64(key bytes, seed 0)
//! s_node   = XXH3_64(UTF-8 bytes of the node name, seed 0)
//! raw      = XXH3_64_withSeed(k as 8 little-endian bytes, seed = s_node)
//! ```

use std::cmp::Ordering;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use rendezvous_hash::NodeHasher;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// The digest of a key: hashed once per connection, then mixed with each node's seed.
///
/// Its `Hash` impl writes exactly its 8 little-endian bytes, so it is what the `rendezvous_hash`
/// crate hands to [`StableNodeHasher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDigest(pub u64);

impl KeyDigest {
    /// Digests the raw key bytes (no length prefix, no terminator).
    pub fn of(key: &[u8]) -> Self {
        KeyDigest(xxh3_64(key))
    }
}

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.0.to_le_bytes());
    }
}

/// A node's identity: its name. The seed is derived from the name once, when the table is
/// built, and `index` points back into the owner's list; neither takes part in comparisons.
#[derive(Debug, Clone)]
pub struct NodeId {
    name: Arc<str>,
    seed: u64,
    index: usize,
}

impl NodeId {
    /// A node id for `name`, remembering its position `index` in the caller's list.
    pub fn new(name: Arc<str>, index: usize) -> Self {
        let seed = xxh3_64(name.as_bytes());
        NodeId { name, seed, index }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Position of the node in the list the table was built from.
    pub fn index(&self) -> usize {
        self.index
    }

    /// `XXH3_64(name)`: the seed this node mixes into every key digest.
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

impl PartialEq for NodeId {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}
impl Eq for NodeId {}
impl PartialOrd for NodeId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for NodeId {
    /// Byte-wise order of the names: the tie-break of the ranking.
    fn cmp(&self, other: &Self) -> Ordering {
        self.name.as_bytes().cmp(other.name.as_bytes())
    }
}
impl Hash for NodeId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.name.as_bytes());
    }
}

/// The `rendezvous_hash` node hasher: `raw = XXH3_64_withSeed(item bytes, s_node)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StableNodeHasher;

impl NodeHasher<NodeId> for StableNodeHasher {
    fn hash<T: Hash>(&self, node: &NodeId, item: &T) -> u64 {
        let mut chain = SeedChain(node.seed);
        item.hash(&mut chain);
        chain.0
    }
}

/// A `Hasher` that folds each write into XXH3 seeded by the previous state. For a
/// [`KeyDigest`] (one write of 8 bytes) this is exactly `XXH3_64_withSeed(le8(k), s_node)`.
struct SeedChain(u64);

impl Hasher for SeedChain {
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxh3_64_with_seed(bytes, self.0);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The raw 64-bit score of `key` on the node called `name` (spec helper, used by tests and
/// by clients in other languages as a reference).
pub fn raw_score(key: &[u8], name: &str) -> u64 {
    let node = NodeId::new(Arc::from(name), 0);
    StableNodeHasher.hash(&node, &KeyDigest::of(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer values of XXH3-64 from the reference implementation, so a change of the
    /// underlying crate cannot slip through.
    #[test]
    fn xxh3_known_answers() {
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        assert_eq!(xxh3_64_with_seed(b"", 0), 0x2D06_8005_38D3_94C2);
    }

    #[test]
    fn raw_score_is_the_documented_composition() {
        let k = xxh3_64(b"user:42");
        let s = xxh3_64(b"b1");
        assert_eq!(
            raw_score(b"user:42", "b1"),
            xxh3_64_with_seed(&k.to_le_bytes(), s)
        );
    }
}
