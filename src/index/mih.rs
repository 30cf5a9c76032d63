//! The `mih` engine: exact radius search by multi-index hashing (Norouzi et al.; DESIGN.md §5).
//!
//! Each 256-bit hash is cut into [`TABLES`] substrings of [`SUB_BITS`] bits. By the pigeonhole
//! principle, two hashes within distance `r` agree to within `r / TABLES` bits (rounded down) on
//! at least one substring. So a query looks up, in each substring's table, its own substring and
//! every value within that many bits of it (for r = 31: itself and its 16 one-bit neighbours), and
//! verifies the candidates found with a full popcount. Nothing within the radius is missed.
//!
//! Layout, compact and allocation-free per entry:
//! - `codes`: every hash as four words, entry id = position (as in the exact engine);
//! - one table per substring in compressed-row form: `offsets[key]..offsets[key + 1]` indexes a
//!   slice of entry ids whose substring equals `key`. That is 4 bytes per entry per table (64
//!   bytes per entry) plus 256 KiB of offsets per table.
//! - entries added after the tables were built form a tail that is scanned linearly; the tables
//!   are rebuilt (a counting sort, O(entries x tables)) when the tail grows past an eighth of the
//!   indexed entries, so a stream of single inserts costs amortised O(tables) each.
//!
//! A candidate can sit in several tables' buckets. It is reported only from the first table in
//! which it is within the substring radius, so results carry no duplicates and need no scratch
//! state (searches take `&self` and run concurrently).
//!
//! For radii above `3 * TABLES + 15` bits the probe lists grow past the point where they pay; such
//! searches scan linearly, still exact, as do searches before the tables are first built.

use std::mem::size_of;

use super::Engine;
use crate::hash::{PdqHash, hamming as distance};

/// Number of substrings (and tables).
pub const TABLES: usize = 16;
/// Bits per substring.
pub const SUB_BITS: u32 = 16;
/// Distinct substring values.
const KEYS: usize = 1 << SUB_BITS;
/// Largest substring radius served by table probes; larger radii scan linearly.
const MAX_SUB_RADIUS: u32 = 3;
/// The tail is folded into the tables once it is larger than this share of the indexed entries...
const TAIL_SHARE: usize = 8;
/// ... and larger than this many entries.
const MIN_TAIL: usize = 4096;

/// Substring `t` (0..16) of a hash in word form.
#[inline(always)]
fn substring(words: &[u64; 4], t: usize) -> u16 {
    // 4 substrings per word; `as u16` keeps the low 16 bits, by design.
    (words[t / 4] >> (48 - 16 * (t % 4))) as u16
}

/// Every 16-bit mask with at most `MAX_SUB_RADIUS` bits set, by increasing popcount, and where
/// each popcount's masks start.
fn probe_masks() -> (Vec<u16>, [usize; MAX_SUB_RADIUS as usize + 2]) {
    let mut masks: Vec<u16> = Vec::new();
    let mut ends = [0usize; MAX_SUB_RADIUS as usize + 2];
    for bits in 0..=MAX_SUB_RADIUS {
        masks.extend((0..=u16::MAX).filter(|m| m.count_ones() == bits));
        ends[bits as usize + 1] = masks.len();
    }
    (masks, ends)
}

/// Exact multi-index hashing over 16 tables of 16-bit substrings.
#[derive(Clone, Debug)]
pub struct MihEngine {
    codes: Vec<[u64; 4]>,
    /// `TABLES` runs of `KEYS + 1` offsets into the table's slice of `ids`.
    offsets: Vec<u32>,
    /// `TABLES` runs of `indexed` entry ids, each run sorted by that table's substring.
    ids: Vec<u32>,
    /// Entries covered by the tables: `codes[..indexed]`.
    indexed: usize,
    /// Probe masks by popcount: masks with k bits set are `masks[ends[k]..ends[k + 1]]`.
    masks: Vec<u16>,
    ends: [usize; MAX_SUB_RADIUS as usize + 2],
}

impl Default for MihEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl MihEngine {
    /// An empty engine.
    pub fn new() -> Self {
        let (masks, ends) = probe_masks();
        Self {
            codes: Vec::new(),
            offsets: Vec::new(),
            ids: Vec::new(),
            indexed: 0,
            masks,
            ends,
        }
    }

    /// Rebuilds every table over all codes (counting sort by substring).
    fn rebuild(&mut self) {
        // Entry ids are u32 (FrameIndex assigns them), so every offset fits in a u32.
        let n = self.codes.len();
        self.offsets.clear();
        self.offsets.resize(TABLES * (KEYS + 1), 0);
        self.ids.clear();
        self.ids.resize(TABLES * n, 0);
        for t in 0..TABLES {
            let offsets = &mut self.offsets[t * (KEYS + 1)..(t + 1) * (KEYS + 1)];
            for code in &self.codes {
                offsets[usize::from(substring(code, t)) + 1] += 1;
            }
            for key in 0..KEYS {
                offsets[key + 1] += offsets[key];
            }
            let ids = &mut self.ids[t * n..(t + 1) * n];
            let mut next: Vec<u32> = offsets[..KEYS].to_vec();
            for (id, code) in (0u32..).zip(&self.codes) {
                let slot = &mut next[usize::from(substring(code, t))];
                ids[*slot as usize] = id;
                *slot += 1;
            }
        }
        self.indexed = n;
    }

    /// Folds the tail into the tables when it has grown too large.
    fn maybe_rebuild(&mut self) {
        let tail = self.codes.len() - self.indexed;
        if tail > MIN_TAIL && tail > self.indexed / TAIL_SHARE {
            self.rebuild();
        }
    }

    /// Linear scan of `codes[from..]`.
    fn scan(&self, from: usize, q: &[u64; 4], radius: u32, out: &mut Vec<(u32, u32)>) {
        let Some(tail) = self.codes.get(from..) else {
            return;
        };
        for (offset, code) in tail.iter().enumerate() {
            let d = distance(code, q);
            if d <= radius {
                // Entry ids fit in u32: FrameIndex assigns them.
                out.push(((from + offset) as u32, d));
            }
        }
    }
}

impl Engine for MihEngine {
    fn name(&self) -> &'static str {
        "mih"
    }

    /// Entries must arrive in order 0, 1, 2, ...: the position is the id.
    fn add(&mut self, entry: u32, hash: &PdqHash) {
        debug_assert_eq!(entry as usize, self.codes.len(), "entries are dense");
        self.codes.push(hash.words());
        self.maybe_rebuild();
    }

    fn add_batch(&mut self, first: u32, hashes: &[PdqHash]) {
        debug_assert_eq!(first as usize, self.codes.len(), "entries are dense");
        self.codes.extend(hashes.iter().map(PdqHash::words));
        self.maybe_rebuild();
    }

    fn search_radius(&self, query: &PdqHash, radius: u32, out: &mut Vec<(u32, u32)>) {
        let q = query.words();
        let sub_radius = radius / TABLES as u32;
        if sub_radius > MAX_SUB_RADIUS || self.indexed == 0 {
            self.scan(0, &q, radius, out);
            return;
        }
        let masks = &self.masks[..self.ends[sub_radius as usize + 1]];
        let n = self.indexed;
        for t in 0..TABLES {
            let key = substring(&q, t);
            let offsets = &self.offsets[t * (KEYS + 1)..(t + 1) * (KEYS + 1)];
            let ids = &self.ids[t * n..(t + 1) * n];
            for &mask in masks {
                let probe = usize::from(key ^ mask);
                let bucket = &ids[offsets[probe] as usize..offsets[probe + 1] as usize];
                for &id in bucket {
                    let code = &self.codes[id as usize];
                    let d = distance(code, &q);
                    if d > radius {
                        continue;
                    }
                    // Report from the first table that reaches this entry only.
                    let earlier = (0..t).any(|u| {
                        (substring(code, u) ^ substring(&q, u)).count_ones() <= sub_radius
                    });
                    if !earlier {
                        out.push((id, d));
                    }
                }
            }
        }
        self.scan(n, &q, radius, out);
    }

    fn len(&self) -> usize {
        self.codes.len()
    }

    fn memory_bytes(&self) -> usize {
        self.codes.capacity() * size_of::<[u64; 4]>()
            + self.offsets.capacity() * size_of::<u32>()
            + self.ids.capacity() * size_of::<u32>()
            + self.masks.capacity() * size_of::<u16>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::exact::ExactEngine;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random_hash(rng: &mut StdRng) -> PdqHash {
        let mut bytes = [0u8; 32];
        rng.fill(&mut bytes);
        PdqHash::from_bytes(bytes)
    }

    fn flip(hash: &PdqHash, bits: usize, rng: &mut StdRng) -> PdqHash {
        let mut bytes = *hash.as_bytes();
        for _ in 0..bits {
            let bit: usize = rng.random_range(0..256);
            bytes[bit / 8] ^= 1 << (bit % 8);
        }
        PdqHash::from_bytes(bytes)
    }

    fn sorted(mut v: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
        v.sort_unstable();
        v
    }

    /// Near-duplicates at every distance up to 40 around random centres, so that many pairs sit
    /// right at and around the radius, and the substring radius boundary is crossed.
    fn dataset(n: usize, rng: &mut StdRng) -> Vec<PdqHash> {
        let centres: Vec<PdqHash> = (0..n / 20).map(|_| random_hash(rng)).collect();
        (0..n)
            .map(|i| {
                if i % 2 == 0 {
                    random_hash(rng)
                } else {
                    let bits = rng.random_range(0..=40);
                    flip(&centres[i % centres.len()], bits, rng)
                }
            })
            .collect()
    }

    #[test]
    fn results_equal_the_exact_scan_at_every_radius() {
        let mut rng = StdRng::seed_from_u64(7);
        let hashes = dataset(20_000, &mut rng);
        let mut mih = MihEngine::new();
        let mut exact = ExactEngine::new();
        mih.add_batch(0, &hashes);
        exact.add_batch(0, &hashes);
        assert_eq!(
            mih.indexed,
            hashes.len(),
            "a large batch is indexed at once"
        );
        for radius in [0, 1, 15, 16, 31, 32, 47, 63, 64, 80] {
            for q in 0..60 {
                let query = if q % 3 == 0 {
                    random_hash(&mut rng)
                } else {
                    let base = hashes[rng.random_range(0..hashes.len())];
                    flip(&base, rng.random_range(0..=radius as usize + 4), &mut rng)
                };
                let (mut a, mut b) = (Vec::new(), Vec::new());
                mih.search_radius(&query, radius, &mut a);
                exact.search_radius(&query, radius, &mut b);
                assert_eq!(sorted(a), sorted(b), "radius {radius}");
            }
        }
    }

    #[test]
    fn single_inserts_are_found_before_and_after_rebuilds() {
        let mut rng = StdRng::seed_from_u64(9);
        let hashes = dataset(12_000, &mut rng);
        let mut mih = MihEngine::new();
        let mut exact = ExactEngine::new();
        let mut rebuilds = 0;
        for (id, hash) in (0u32..).zip(&hashes) {
            let before = mih.indexed;
            mih.add(id, hash);
            exact.add(id, hash);
            if mih.indexed != before {
                rebuilds += 1;
            }
            if id % 997 == 0 {
                let query = flip(hash, 20, &mut rng);
                let (mut a, mut b) = (Vec::new(), Vec::new());
                mih.search_radius(&query, 31, &mut a);
                exact.search_radius(&query, 31, &mut b);
                assert!(
                    b.iter().any(|&(e, _)| e == id),
                    "the new entry itself is found"
                );
                assert_eq!(sorted(a), sorted(b));
            }
        }
        assert!(rebuilds >= 1 && mih.len() - mih.indexed <= mih.indexed / TAIL_SHARE + MIN_TAIL);
    }

    #[test]
    fn substrings_cover_the_hash_in_order() {
        let hash = PdqHash::from_bit_fn(|k| k == 255 || k == 0);
        let words = hash.words();
        assert_eq!(substring(&words, 0), 0x8000);
        assert_eq!(substring(&words, 15), 0x0001);
        assert!((1..15).all(|t| substring(&words, t) == 0));
    }

    #[test]
    fn probe_masks_are_grouped_by_popcount() {
        let (masks, ends) = probe_masks();
        assert_eq!(ends, [0, 1, 17, 137, 697]);
        assert_eq!(masks.len(), 697);
        assert_eq!(masks[0], 0);
    }

    #[test]
    fn memory_per_entry_is_under_100_bytes_beyond_the_hash() {
        let mut rng = StdRng::seed_from_u64(3);
        let hashes: Vec<PdqHash> = (0..200_000).map(|_| random_hash(&mut rng)).collect();
        let mut mih = MihEngine::new();
        mih.add_batch(0, &hashes);
        let fixed = TABLES * (KEYS + 1) * size_of::<u32>() + 697 * size_of::<u16>();
        let per_entry = (mih.memory_bytes() - fixed) as f64 / hashes.len() as f64;
        assert!(
            per_entry <= 32.0 + 64.0 + 1.0,
            "{per_entry} bytes per entry"
        );
    }
}
