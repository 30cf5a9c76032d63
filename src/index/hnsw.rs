//! The hnsw engine: an approximate graph index over hnsw_rs (shared/DESIGN.md §5, §8).
//!
//! - Distance is our own `PdqHamming` (popcount of the xor of the four words): hnsw_rs's
//!   built-in Hamming distance counts differing *elements*, not bits, which is wrong for PDQ.
//! - A radius search is a kNN search for [`HnswParams::knn`] neighbours with beam width
//!   [`HnswParams::ef_search`], keeping those within the radius. It can miss matches (recall is
//!   measured in tests/it/index_conformance.rs) and never returns more than `knn`.
//! - hnsw_rs cannot delete: the owner ([`super::FrameIndex`]) filters tombstones and rebuilds.
//! - The graph owns copies of the hashes (`Hnsw<'static, ..>`); no hnsw_rs type is public. The
//!   engine keeps its own flat copy too, by entry id, so that [`Engine::hash`] needs nothing
//!   from hnsw_rs (32 bytes per entry beside its ~2.4 KB).

use anndists::dist::Distance;
use hnsw_rs::hnsw::Hnsw;

use super::{Engine, HnswParams};
use crate::hash::{PdqHash, hamming};

/// hnsw_rs caps layers at 16; the level sampler rarely goes above 4 at our sizes.
const MAX_LAYERS: usize = 16;

/// Batches at least this large are inserted on all cores (rayon); smaller ones serially, where
/// thread start-up would dominate.
const PARALLEL_BATCH: usize = 256;

/// Bits that differ between two PDQ hashes given as four `u64` words each.
#[derive(Clone, Copy, Debug, Default)]
struct PdqHamming;

impl Distance<u64> for PdqHamming {
    fn eval(&self, va: &[u64], vb: &[u64]) -> f32 {
        let bits = match (<&[u64; 4]>::try_from(va), <&[u64; 4]>::try_from(vb)) {
            (Ok(a), Ok(b)) => hamming(a, b),
            // Every vector we insert or query has four words; stay total anyway.
            _ => va.iter().zip(vb).map(|(a, b)| (a ^ b).count_ones()).sum(),
        };
        // At most 256, so exact in f32.
        bits as f32
    }
}

/// Approximate radius search over an hnsw_rs graph with `PdqHamming` distance.
pub struct HnswEngine {
    graph: Hnsw<'static, u64, PdqHamming>,
    params: HnswParams,
    len: usize,
    /// Every hash by entry id.
    codes: Vec<PdqHash>,
}

impl std::fmt::Debug for HnswEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HnswEngine")
            .field("params", &self.params)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl HnswEngine {
    /// An empty graph; `capacity` is hnsw_rs's allocation hint, not a limit.
    /// `params.max_connections` is clamped to 1..=256 (hnsw_rs exits the process above 256).
    pub fn new(params: HnswParams, capacity: usize) -> Self {
        let params = HnswParams {
            max_connections: params.max_connections.clamp(1, 256),
            ..params
        };
        let graph = Hnsw::new(
            params.max_connections,
            capacity.max(1),
            MAX_LAYERS,
            params.ef_construction,
            PdqHamming,
        );
        Self {
            graph,
            params,
            len: 0,
            codes: Vec::new(),
        }
    }

    /// The parameters in use.
    pub fn params(&self) -> HnswParams {
        self.params
    }
}

impl Engine for HnswEngine {
    fn name(&self) -> &'static str {
        "hnsw"
    }

    fn add(&mut self, entry: u32, hash: &PdqHash) {
        self.graph.insert_slice((&hash.words(), entry as usize));
        self.codes.push(*hash);
        self.len += 1;
    }

    fn add_batch(&mut self, first: u32, hashes: &[PdqHash]) {
        if hashes.len() < PARALLEL_BATCH {
            for (entry, hash) in (first..).zip(hashes) {
                self.add(entry, hash);
            }
            return;
        }
        let words: Vec<[u64; 4]> = hashes.iter().map(PdqHash::words).collect();
        let batch: Vec<(&[u64], usize)> = (first as usize..)
            .zip(&words)
            .map(|(entry, w)| (w.as_slice(), entry))
            .collect();
        self.graph.parallel_insert_slice(&batch);
        self.codes.extend_from_slice(hashes);
        self.len += hashes.len();
    }

    fn search_radius(&self, query: &PdqHash, radius: u32, out: &mut Vec<(u32, u32)>) {
        if self.len == 0 {
            return;
        }
        let knn = self.params.knn.max(1);
        let ef = self.params.ef_search.max(knn);
        for n in self.graph.search(&query.words(), knn, ef) {
            // Distances are whole bit counts stored as f32, so the cast is exact.
            let distance = n.distance as u32;
            if distance <= radius
                && let Ok(entry) = u32::try_from(n.d_id)
            {
                out.push((entry, distance));
            }
        }
    }

    fn hash(&self, entry: u32) -> Option<PdqHash> {
        self.codes.get(entry as usize).copied()
    }

    fn len(&self) -> usize {
        self.len
    }

    /// An estimate from hnsw_rs 0.3.5's layout, counting allocator chunks: per point, the
    /// `Arc<Point>` with its own copy of the data and its lock (~180 bytes), a table of 16
    /// per-layer link vectors (~400 bytes) and its slot in the layer list; per link, a pointer
    /// to a separately allocated `Arc<PointWithOrder>` (8 + 48 bytes). Layer-0 lists fill up
    /// to `2 * max_connections`. At M=16 this says 2.4 KB per hash; the process RSS grew by
    /// 2.9 KB per hash building 20k (allocator overhead included), against 32 bytes for `exact`.
    fn memory_bytes(&self) -> usize {
        const PER_POINT: usize = 180 + 400 + 8;
        const PER_LINK: usize = 8 + 48;
        let links = self.params.max_connections * 2;
        self.len * (PER_POINT + links * PER_LINK)
            + self.codes.capacity() * std::mem::size_of::<PdqHash>()
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::super::exact::ExactEngine;
    use super::*;

    #[test]
    fn pdq_hamming_counts_bits_not_words() {
        let a = [0u64, 0, 0, 0];
        let b = [0b1011u64, 0, u64::MAX, 1];
        assert_eq!(PdqHamming.eval(&a, &b), 3.0 + 64.0 + 1.0);
        assert_eq!(PdqHamming.eval(&b, &b), 0.0);
        // Odd lengths fall back to the generic loop.
        assert_eq!(PdqHamming.eval(&[1, 3], &[0, 0]), 3.0);
    }

    /// With a beam as wide as the graph, results equal the exact engine's, whether inserted
    /// serially or in parallel (stable over 40 runs with the default graph; a sparser graph,
    /// M=16 and ef_construction=64, did miss a point here).
    #[test]
    fn small_graph_matches_exact() {
        let mut rng = StdRng::seed_from_u64(21);
        let bases: Vec<[u64; 4]> = (0..6).map(|_| rng.random()).collect();
        let hashes: Vec<PdqHash> = (0..400)
            .map(|i| {
                let mut w = bases[i % bases.len()];
                for _ in 0..rng.random_range(0..24) {
                    let k = rng.random_range(0..256);
                    w[k / 64] ^= 1 << (k % 64);
                }
                PdqHash::from_words(w)
            })
            .collect();
        let params = HnswParams {
            ef_search: 400,
            knn: 400,
            ..HnswParams::default()
        };
        let mut hnsw = HnswEngine::new(params, 0);
        let mut exact = ExactEngine::new();
        for (i, h) in hashes[..100].iter().enumerate() {
            hnsw.add(i as u32, h);
        }
        hnsw.add_batch(100, &hashes[100..]);
        exact.add_batch(0, &hashes);
        assert_eq!(hnsw.len(), 400);
        assert_eq!(hnsw.hash(7), Some(hashes[7]));
        assert_eq!(hnsw.hash(400), None);
        assert!(hnsw.memory_bytes() > 400 * 32);
        for base in &bases {
            let query = PdqHash::from_words(*base);
            for radius in [0, 12, 31] {
                let (mut got, mut want) = (Vec::new(), Vec::new());
                hnsw.search_radius(&query, radius, &mut got);
                exact.search_radius(&query, radius, &mut want);
                got.sort_unstable();
                assert_eq!(got, want, "radius {radius}");
            }
        }
    }

    #[test]
    fn empty_graph_finds_nothing_and_params_are_clamped() {
        let engine = HnswEngine::new(
            HnswParams {
                max_connections: 1000,
                ..HnswParams::default()
            },
            0,
        );
        let mut out = Vec::new();
        engine.search_radius(&PdqHash::from_words([0; 4]), 256, &mut out);
        assert!(out.is_empty());
        assert!(engine.is_empty());
        assert_eq!(engine.params().max_connections, 256);
    }
}
