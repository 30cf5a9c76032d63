//! The exact engine: a linear popcount scan over every hash (shared/DESIGN.md §5).
//!
//! Always correct, so it is the oracle every other engine is tested against. Hashes sit in one
//! contiguous `Vec<[u64; 4]>` (32 bytes each, no per-entry allocation) and entry id = position.
//! The scan is memory-bound; it relies on the POPCNT instruction, which the x86-64-v2 build floor
//! (.cargo/config.toml) provides.

use std::mem::size_of;

use super::{Engine, reserve};
use crate::hash::{PdqHash, hamming as distance};

/// Entries compared per block of the scan: the distance computations of a block are
/// independent, and the common "no hit in this block" case costs one branch.
const BLOCK: usize = 8;

/// Linear popcount scan over a flat array of hashes.
#[derive(Clone, Debug, Default)]
pub struct ExactEngine {
    words: Vec<[u64; 4]>,
}

impl ExactEngine {
    /// An empty engine.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty engine with room for `capacity` hashes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            words: Vec::with_capacity(capacity),
        }
    }
}

impl Engine for ExactEngine {
    fn name(&self) -> &'static str {
        "exact"
    }

    /// Entries must arrive in order 0, 1, 2, ...: the position is the id.
    fn add(&mut self, entry: u32, hash: &PdqHash) {
        debug_assert_eq!(entry as usize, self.words.len(), "entries are dense");
        reserve(&mut self.words, 1);
        self.words.push(hash.words());
    }

    fn add_batch(&mut self, first: u32, hashes: &[PdqHash]) {
        debug_assert_eq!(first as usize, self.words.len(), "entries are dense");
        reserve(&mut self.words, hashes.len());
        self.words.extend(hashes.iter().map(PdqHash::words));
    }

    fn search_radius(&self, query: &PdqHash, radius: u32, out: &mut Vec<(u32, u32)>) {
        let q = query.words();
        let blocks = self.words.chunks_exact(BLOCK);
        let tail = blocks.remainder();
        let mut base = 0u32;
        for block in blocks {
            let mut d = [0u32; BLOCK];
            for (slot, words) in d.iter_mut().zip(block) {
                *slot = distance(words, &q);
            }
            if d.iter().any(|&x| x <= radius) {
                for (id, &x) in (base..).zip(&d) {
                    if x <= radius {
                        out.push((id, x));
                    }
                }
            }
            base += BLOCK as u32;
        }
        for (id, words) in (base..).zip(tail) {
            let x = distance(words, &q);
            if x <= radius {
                out.push((id, x));
            }
        }
    }

    fn hash(&self, entry: u32) -> Option<PdqHash> {
        self.words
            .get(entry as usize)
            .map(|w| PdqHash::from_words(*w))
    }

    fn len(&self) -> usize {
        self.words.len()
    }

    fn memory_bytes(&self) -> usize {
        self.words.capacity() * size_of::<[u64; 4]>()
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn scan_matches_brute_force_at_every_radius() {
        let mut rng = StdRng::seed_from_u64(11);
        let base: [u64; 4] = rng.random();
        // Sizes around the block length exercise the tail.
        for n in [0usize, 1, 7, 8, 9, 100, 1001] {
            let hashes: Vec<PdqHash> = (0..n)
                .map(|_| {
                    // Mostly near `base`, so every radius has some hits and some misses.
                    let mut w = base;
                    for _ in 0..rng.random_range(0..80) {
                        let k = rng.random_range(0..256);
                        w[k / 64] ^= 1 << (k % 64);
                    }
                    PdqHash::from_words(w)
                })
                .collect();
            let mut engine = ExactEngine::new();
            let (head, rest) = hashes.split_at(n / 2);
            for (i, h) in head.iter().enumerate() {
                engine.add(i as u32, h);
            }
            engine.add_batch(head.len() as u32, rest);
            assert_eq!(engine.len(), n);
            let query = PdqHash::from_words(base);
            for radius in [0, 10, 31, 40, 256] {
                let mut got = Vec::new();
                engine.search_radius(&query, radius, &mut got);
                let expected: Vec<(u32, u32)> = hashes
                    .iter()
                    .enumerate()
                    .map(|(i, h)| (i as u32, h.distance(&query)))
                    .filter(|&(_, d)| d <= radius)
                    .collect();
                assert_eq!(got, expected, "n {n} radius {radius}");
            }
        }
    }

    #[test]
    fn search_appends_to_out() {
        let mut engine = ExactEngine::with_capacity(2);
        let hash = PdqHash::from_words([1, 2, 3, 4]);
        engine.add(0, &hash);
        let mut out = vec![(99, 99)];
        engine.search_radius(&hash, 0, &mut out);
        assert_eq!(out, [(99, 99), (0, 0)]);
        assert_eq!(engine.name(), "exact");
        assert_eq!(engine.memory_bytes(), 64);
        assert_eq!(engine.hash(0), Some(hash));
        assert_eq!(engine.hash(1), None);
    }
}
