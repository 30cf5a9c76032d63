//! The `mih` engine: exact radius search by multi-index hashing (Norouzi et al.; DESIGN.md §5).
//!
//! Each 256-bit hash is cut into `m` contiguous substrings ("tables") of `256 / m` or
//! `256 / m + 1` bits. If two hashes are within distance `r`, write `r = m * s + a` (`a < m`):
//! then some table among the first `a + 1` differs by at most `s` bits, or some table among the
//! others by at most `s - 1` bits (otherwise the distance would be at least
//! `(a + 1)(s + 1) + (m - a - 1) s = r + 1`). So a query looks, in each table, for the stored
//! substrings within that table's radius of its own, and verifies every candidate found with a
//! full 256-bit popcount. Nothing within the radius is missed and nothing outside is reported.
//!
//! The table count follows the size: `m = round(256 / log2 n)` within 10..=16 (so a substring has
//! about `log2 n` bits and a bucket holds about one entry), as the MIH paper recommends: 16 tables
//! of 16 bits around 100k entries, 13 of 19-20 bits at 1M, 11 of 23-24 bits at 10M. Wider
//! substrings mean more keys to probe per table but far fewer candidates to verify, and
//! verification (a random access into the codes) is what costs.
//!
//! Layout, compact and allocation-free per entry:
//! - `codes`: every hash as four words, 32-byte aligned (one code never straddles two cache
//!   lines), entry id = position, as in the exact engine;
//! - per table, entries sorted by substring as 5-byte slots (the substring's low `b - h` bits,
//!   then the entry id), plus a directory of `2^h + 1` offsets over the high `h` bits, with `h`
//!   chosen so that a directory bucket holds 8 to 16 entries on average. A probe reads one
//!   directory pair and scans that bucket's slots, comparing their low bits with the query's
//!   under the remaining bit budget; only entries that pass cost a code read. Probes are
//!   gathered in batches before their buckets are read, and candidates before their codes are
//!   read, so that those cache misses overlap instead of waiting on each other.
//!   That is 5 bytes per entry per table and `4 (2^h + 1)` bytes of directory per table
//!   (at most `m / 2` bytes per entry).
//! - Incremental inserts: entries added after the main tables were built sit in a linear tail.
//!   When the tail outgrows `max(MIN_TAIL, delta / 8)` it is indexed into a second, smaller set
//!   of tables (the delta, rebuilt over everything after the main tables); when the delta plus
//!   tail outgrow an eighth of the main tables, everything is rebuilt. Each entry is thus rebuilt
//!   a bounded number of times on average (amortised O(m) per insert), and the linear tail stays
//!   below `max(MIN_TAIL, n / 64)` entries.
//!   Inside a `FrameIndex` ([`MihEngine::with_owner_rebuilds`]) the full rebuild is not run by
//!   the insert that makes it due (it would hold the index's write lock for seconds at 10M):
//!   [`Engine::rebuild_due`] reports it and the index is rebuilt in the background, while the
//!   delta keeps absorbing the tail.
//!
//! A candidate can match in several tables. It is reported only from the first table in which
//! it is within that table's radius, so results carry no duplicates and need no scratch state
//! (searches take `&self` and run concurrently).
//!
//! Supported radii: every radius 0..=256 returns exactly what the linear scan returns. Table
//! probes are used while the substring radius `s` is at most [`MAX_SUB_RADIUS`] and the
//! estimated probe and verification cost is below half a scan of the same entries (by that
//! estimate, for random codes: radius up to 39 at 100k entries, 48 at 1M, 43 at 10M); beyond
//! that, and for sets of tables too small to pay, the entries are scanned.

use std::mem::size_of;

use super::{Engine, reserve};
use crate::hash::{PdqHash, hamming as distance};

/// Fewest tables the size rule picks (26-bit substrings, about 2^26 entries).
pub const MIN_TABLES: usize = 10;
/// Most tables the size rule picks (16-bit substrings).
pub const MAX_TABLES: usize = 16;
/// Largest substring radius served by table probes; larger ones scan.
pub const MAX_SUB_RADIUS: u32 = 3;
/// Low substring bits kept per entry (one byte).
const MAX_LOW_BITS: u32 = 8;
/// Directory bits are chosen so a bucket holds at least this many entries on average.
const BUCKET: usize = 8;
/// The linear tail is indexed once it is larger than this ...
const MIN_TAIL: usize = 4096;
/// ... and larger than the delta tables over this.
const TAIL_SHARE: usize = 8;
/// Everything is rebuilt once the delta and tail together exceed the main tables over this.
const DELTA_SHARE: usize = 8;
/// Estimated cost of one directory probe, in units of one code compared by a linear scan.
const PROBE_COST: usize = 16;
/// Estimated cost of verifying one candidate (a random code read), in the same units.
const VERIFY_COST: usize = 16;

/// A hash as four words, 32-byte aligned so that reading one touches one cache line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, align(32))]
struct Code([u64; 4]);

/// The table count the size rule picks for `n` entries: about one entry per substring value.
pub fn tables_for(n: usize) -> usize {
    if n < 2 {
        return MAX_TABLES;
    }
    let tables = (256.0 / (n as f64).log2()).round() as usize;
    tables.clamp(MIN_TABLES, MAX_TABLES)
}

/// One substring: where it sits in the hash and how it is split into directory and low bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Substring {
    /// First bit, counted from the most significant bit of word 0.
    start: u32,
    /// Width in bits, 1..=32.
    width: u32,
    /// Low bits kept per entry (`width - hi_bits`), 0..=8.
    low_bits: u32,
}

impl Substring {
    /// The substring's value in `words`.
    #[inline(always)]
    fn of(&self, words: &[u64; 4]) -> u32 {
        let word = (self.start / 64) as usize;
        let offset = self.start % 64;
        let high = words[word] << offset;
        let low = match words.get(word + 1) {
            Some(next) if offset > 0 => next >> (64 - offset),
            _ => 0,
        };
        // `width` <= 32, so the result fits.
        ((high | low) >> (64 - self.width)) as u32
    }
}

/// `m` substrings of `256 / m` or `256 / m + 1` bits covering the hash, wider ones first,
/// with `hi_bits` directory bits each.
fn substrings(m: usize, hi_bits: u32) -> Vec<Substring> {
    let base = 256 / m as u32;
    let extra = 256 % m as u32;
    let mut start = 0;
    (0..m as u32)
        .map(|t| {
            let width = base + u32::from(t < extra);
            let s = Substring {
                start,
                width,
                low_bits: width - hi_bits,
            };
            start += width;
            s
        })
        .collect()
}

/// Directory bits for `n` entries and substrings of `narrow..=wide` bits: buckets of `BUCKET` to
/// `2 * BUCKET` entries on average, at most `MAX_LOW_BITS` low bits, at most `narrow` bits.
fn hi_bits_for(n: usize, narrow: u32, wide: u32) -> u32 {
    let per_bucket = (n / BUCKET).max(1);
    let floor_log2 = usize::BITS - 1 - per_bucket.leading_zeros();
    floor_log2.clamp(wide.saturating_sub(MAX_LOW_BITS), narrow)
}

/// Every `bits`-bit mask with at most `MAX_SUB_RADIUS` bits set, by increasing popcount, and
/// where each popcount's masks start: masks with k bits set are `masks[ends[k]..ends[k + 1]]`.
fn probe_masks(bits: u32) -> (Vec<u32>, [usize; MAX_SUB_RADIUS as usize + 2]) {
    let mut masks = vec![0u32];
    let mut ends = [0usize; MAX_SUB_RADIUS as usize + 2];
    ends[1] = 1;
    for i in 0..bits {
        masks.push(1 << i);
    }
    ends[2] = masks.len();
    for i in 0..bits {
        for j in i + 1..bits {
            masks.push(1 << i | 1 << j);
        }
    }
    ends[3] = masks.len();
    for i in 0..bits {
        for j in i + 1..bits {
            for k in j + 1..bits {
                masks.push(1 << i | 1 << j | 1 << k);
            }
        }
    }
    ends[4] = masks.len();
    masks.shrink_to_fit();
    (masks, ends)
}

/// `n` choose `k` for small arguments.
fn choose(n: usize, k: usize) -> usize {
    (0..k).fold(1, |acc, i| acc * (n - i) / (i + 1))
}

/// The radius of each table for a search of `radius` over `m` tables (module docs), or `None`
/// above [`MAX_SUB_RADIUS`]. `-1` means the table cannot hold a match that no earlier one holds.
fn table_radii(radius: u32, m: usize) -> Option<[i32; MAX_TABLES]> {
    let (s, a) = (radius / m as u32, radius % m as u32);
    if s > MAX_SUB_RADIUS {
        return None;
    }
    let mut radii = [-1; MAX_TABLES];
    for (t, r) in radii.iter_mut().take(m).enumerate() {
        *r = if t as u32 <= a {
            s as i32
        } else {
            s as i32 - 1
        };
    }
    Some(radii)
}

/// One entry of one table: the substring's low bits, then the entry id (little-endian). Five
/// bytes with no padding, so a bucket scan reads the id from the cache line it already has.
type Slot = [u8; 5];

/// The entry id in a slot.
#[inline(always)]
fn slot_id(slot: &Slot) -> u32 {
    u32::from_le_bytes([slot[1], slot[2], slot[3], slot[4]])
}

/// Directory probes gathered before their buckets are read, so that the reads overlap.
const PROBE_BATCH: usize = 128;
/// Candidates gathered before their codes are read and verified, for the same reason.
const VERIFY_BATCH: usize = 256;

/// Tables over the entries `first..first + len`.
#[derive(Clone, Debug, Default)]
struct Level {
    first: usize,
    len: usize,
    subs: Vec<Substring>,
    hi_bits: u32,
    /// Per table, `2^hi_bits + 1` offsets into that table's run of `slots`.
    dir: Vec<u32>,
    /// Per table, `len` slots sorted by substring: [`Slot`].
    slots: Vec<Slot>,
    masks: Vec<u32>,
    ends: [usize; MAX_SUB_RADIUS as usize + 2],
}

impl Level {
    /// An empty level starting at entry `first`.
    fn empty(first: usize) -> Self {
        Self {
            first,
            ..Self::default()
        }
    }

    /// Builds `m` tables over `codes[first..]` (a counting sort per table, tables in parallel).
    fn build(codes: &[Code], first: usize, m: usize) -> Self {
        let entries = codes.get(first..).unwrap_or_default();
        let len = entries.len();
        let (narrow, wide) = (256 / m as u32, 256_u32.div_ceil(m as u32));
        let hi_bits = hi_bits_for(len, narrow, wide);
        let subs = substrings(m, hi_bits);
        let dir_len = (1usize << hi_bits) + 1;
        let mut dir = vec![0u32; m * dir_len];
        let mut slots: Vec<Slot> = vec![[0; 5]; m * len];
        let mut work: Vec<(Substring, &mut [u32], &mut [Slot])> = subs
            .iter()
            .copied()
            .zip(dir.chunks_exact_mut(dir_len))
            .zip(slots.chunks_mut(len.max(1)))
            .map(|((s, d), l)| (s, d, l))
            .collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(m);
        let per_thread = m.div_ceil(threads);
        std::thread::scope(|scope| {
            for chunk in work.chunks_mut(per_thread) {
                scope.spawn(move || {
                    for (sub, dir, slots) in chunk.iter_mut() {
                        sort_table(entries, first, *sub, dir, slots);
                    }
                });
            }
        });
        drop(work);
        let (masks, ends) = probe_masks(hi_bits);
        Self {
            first,
            len,
            subs,
            hi_bits,
            dir,
            slots,
            masks,
            ends,
        }
    }

    /// Entries past this level.
    fn end(&self) -> usize {
        self.first + self.len
    }

    /// Whether probing the tables for `radii` is expected to beat scanning the level.
    fn probes_pay(&self, radii: &[i32; MAX_TABLES]) -> bool {
        let buckets = 1usize << self.hi_bits;
        let mut cost = 0usize;
        for (sub, &r) in self.subs.iter().zip(radii) {
            for k in 0..=r.max(-1) {
                let k = k as usize;
                cost += choose(self.hi_bits as usize, k) * (PROBE_COST + self.len / buckets);
                // Expected candidates: entries whose substring is within r, for random codes.
                cost += (choose(sub.width as usize, k) * self.len * VERIFY_COST) >> sub.width;
            }
        }
        cost < self.len / 2
    }

    /// Appends the level's entries within `radius` of `q` to `out`.
    fn search(&self, codes: &[Code], q: &[u64; 4], radius: u32, out: &mut Vec<(u32, u32)>) {
        if self.len == 0 {
            return;
        }
        let m = self.subs.len();
        let radii = match table_radii(radius, m) {
            Some(radii) if self.probes_pay(&radii) => radii,
            _ => return scan(codes, self.first..self.end(), q, radius, out),
        };
        let mut qsubs = [0u32; MAX_TABLES];
        for (qs, sub) in qsubs.iter_mut().zip(&self.subs) {
            *qs = sub.of(q);
        }
        let dir_len = (1usize << self.hi_bits) + 1;
        let mut verifier = Verifier {
            codes,
            q,
            radius,
            subs: &self.subs,
            qsubs: &qsubs,
            radii: &radii,
            table: 0,
            ids: [0; VERIFY_BATCH],
            count: 0,
        };
        for (t, sub) in self.subs.iter().enumerate() {
            let Ok(r) = u32::try_from(radii[t]) else {
                continue;
            };
            verifier.flush(out);
            verifier.table = t;
            let dir = &self.dir[t * dir_len..(t + 1) * dir_len];
            let slots = &self.slots[t * self.len..(t + 1) * self.len];
            let q_hi = qsubs[t] >> sub.low_bits;
            // `low_bits` <= 8, so the low part fits a byte.
            let q_low = (qsubs[t] & ((1 << sub.low_bits) - 1)) as u8;
            let masks = &self.masks[..self.ends[r as usize + 1]];
            for chunk in masks.chunks(PROBE_BATCH) {
                // Read the directory pairs and each bucket's first slot for the whole chunk
                // first: independent loads the CPU overlaps.
                let mut buckets = [(0u32, 0u32, 0u8, [0u8; 5]); PROBE_BATCH];
                for (bucket, &mask) in buckets.iter_mut().zip(chunk) {
                    let probe = (q_hi ^ mask) as usize;
                    let (from, to) = (dir[probe], dir[probe + 1]);
                    let first = if from < to {
                        slots[from as usize]
                    } else {
                        [0; 5]
                    };
                    *bucket = (from, to, (r - mask.count_ones()) as u8, first);
                }
                for &(from, to, budget, first) in &buckets[..chunk.len()] {
                    if from == to {
                        continue;
                    }
                    if (first[0] ^ q_low).count_ones() <= u32::from(budget) {
                        verifier.push(slot_id(&first), out);
                    }
                    for slot in &slots[from as usize + 1..to as usize] {
                        if (slot[0] ^ q_low).count_ones() <= u32::from(budget) {
                            verifier.push(slot_id(slot), out);
                        }
                    }
                }
            }
        }
        verifier.flush(out);
    }

    fn memory_bytes(&self) -> usize {
        self.dir.capacity() * size_of::<u32>()
            + self.slots.capacity() * size_of::<Slot>()
            + self.masks.capacity() * size_of::<u32>()
            + self.subs.capacity() * size_of::<Substring>()
    }
}

/// Candidates of one table awaiting verification against the full codes.
struct Verifier<'a> {
    codes: &'a [Code],
    q: &'a [u64; 4],
    radius: u32,
    subs: &'a [Substring],
    qsubs: &'a [u32; MAX_TABLES],
    radii: &'a [i32; MAX_TABLES],
    /// The table the candidates come from.
    table: usize,
    ids: [u32; VERIFY_BATCH],
    count: usize,
}

impl Verifier<'_> {
    #[inline(always)]
    fn push(&mut self, id: u32, out: &mut Vec<(u32, u32)>) {
        if self.count == VERIFY_BATCH {
            self.flush(out);
        }
        self.ids[self.count] = id;
        self.count += 1;
    }

    /// Verifies the gathered candidates: full distance, and reported only from the first table
    /// within whose radius the entry's substring lies.
    fn flush(&mut self, out: &mut Vec<(u32, u32)>) {
        for &id in &self.ids[..self.count] {
            let code = &self.codes[id as usize].0;
            let d = distance(code, self.q);
            if d > self.radius {
                continue;
            }
            let earlier = self.subs[..self.table]
                .iter()
                .zip(self.qsubs)
                .zip(self.radii)
                .any(|((s, &qs), &r)| r >= 0 && (s.of(code) ^ qs).count_ones() <= r as u32);
            if !earlier {
                out.push((id, d));
            }
        }
        self.count = 0;
    }
}

/// Sorts one table: entries of `codes` (ids from `first`) by substring `sub`, into `dir` (bucket
/// offsets over the high bits), `lows` and `ids`.
fn sort_table(codes: &[Code], first: usize, sub: Substring, dir: &mut [u32], slots: &mut [Slot]) {
    let buckets = dir.len() - 1;
    for code in codes {
        dir[(sub.of(&code.0) >> sub.low_bits) as usize + 1] += 1;
    }
    for key in 0..buckets {
        dir[key + 1] += dir[key];
    }
    let mut next: Vec<u32> = dir[..buckets].to_vec();
    let low_mask = (1u32 << sub.low_bits) - 1;
    for (offset, code) in codes.iter().enumerate() {
        let value = sub.of(&code.0);
        let slot = &mut next[(value >> sub.low_bits) as usize];
        let at = *slot as usize;
        *slot += 1;
        // Entry ids are u32 (FrameIndex assigns them); low bits fit a byte.
        let [a, b, c, d] = ((first + offset) as u32).to_le_bytes();
        slots[at] = [(value & low_mask) as u8, a, b, c, d];
    }
}

/// Appends entries in `range` within `radius` of `q`, by linear scan.
fn scan(
    codes: &[Code],
    range: std::ops::Range<usize>,
    q: &[u64; 4],
    radius: u32,
    out: &mut Vec<(u32, u32)>,
) {
    let from = range.start;
    let Some(codes) = codes.get(range) else {
        return;
    };
    for (offset, code) in codes.iter().enumerate() {
        let d = distance(&code.0, q);
        if d <= radius {
            // Entry ids fit in u32: FrameIndex assigns them.
            out.push(((from + offset) as u32, d));
        }
    }
}

/// Exact multi-index hashing: main tables, delta tables and a linear tail (module docs).
#[derive(Clone, Debug)]
pub struct MihEngine {
    codes: Vec<Code>,
    /// A fixed table count, or `None` for [`tables_for`] the size at each build.
    tables: Option<usize>,
    /// Tables over `codes[..main.len]`.
    main: Level,
    /// Tables over `codes[main.len..delta.end()]`.
    delta: Level,
    /// Leave rebuilds of the main tables (after the first build) to the owner, which rebuilds a
    /// fresh engine in the background once [`Engine::rebuild_due`] says so; until then the delta
    /// grows past its share. See [`MihEngine::with_owner_rebuilds`].
    owner_rebuilds: bool,
}

impl Default for MihEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl MihEngine {
    /// An empty engine whose table count follows its size ([`tables_for`]).
    pub fn new() -> Self {
        Self {
            codes: Vec::new(),
            tables: None,
            main: Level::empty(0),
            delta: Level::empty(0),
            owner_rebuilds: false,
        }
    }

    /// This engine, leaving the rebuilds of its main tables to its owner: inserts never build the
    /// main tables again once they exist (that is a full build, 4.3 s at 10M frames, which the
    /// caller would run under its write lock); [`Engine::rebuild_due`] turns true when they would
    /// have, and the owner builds a fresh engine off the lock (`FrameIndex` through
    /// `SharedIndex`'s background rebuild). Meanwhile the tail is still folded into the delta.
    pub fn with_owner_rebuilds(self) -> Self {
        Self {
            owner_rebuilds: true,
            ..self
        }
    }

    /// Whether delta and tail outgrew the main tables' share (a full build is due).
    fn main_outgrown(&self) -> bool {
        self.codes.len() - self.main.len > MIN_TAIL.max(self.main.len / DELTA_SHARE)
    }

    /// An empty engine with a fixed number of tables (clamped to
    /// [`MIN_TABLES`]..=[`MAX_TABLES`]), for benchmarks and tests.
    pub fn with_tables(tables: usize) -> Self {
        Self {
            tables: Some(tables.clamp(MIN_TABLES, MAX_TABLES)),
            ..Self::new()
        }
    }

    /// Table count of the main tables (0 before they are first built).
    pub fn main_tables(&self) -> usize {
        self.main.subs.len()
    }

    fn tables(&self, n: usize) -> usize {
        self.tables.unwrap_or_else(|| tables_for(n))
    }

    /// Indexes the tail into the delta or rebuilds everything, as the module docs describe.
    fn maybe_rebuild(&mut self) {
        let n = self.codes.len();
        let tail = n - self.delta.end();
        if tail <= MIN_TAIL.max(self.delta.len / TAIL_SHARE) {
            return;
        }
        let own_build = !self.owner_rebuilds || self.main.len == 0;
        if own_build && self.main_outgrown() {
            self.main = Level::build(&self.codes, 0, self.tables(n));
            self.delta = Level::empty(n);
        } else {
            let first = self.main.len;
            self.delta = Level::build(&self.codes, first, self.tables(n - first));
        }
    }

    /// Entries covered by no table (scanned linearly).
    pub fn tail_len(&self) -> usize {
        self.codes.len() - self.delta.end()
    }
}

impl Engine for MihEngine {
    fn name(&self) -> &'static str {
        "mih"
    }

    /// Entries must arrive in order 0, 1, 2, ...: the position is the id.
    fn add(&mut self, entry: u32, hash: &PdqHash) {
        debug_assert_eq!(entry as usize, self.codes.len(), "entries are dense");
        reserve(&mut self.codes, 1);
        self.codes.push(Code(hash.words()));
        self.maybe_rebuild();
    }

    fn add_batch(&mut self, first: u32, hashes: &[PdqHash]) {
        debug_assert_eq!(first as usize, self.codes.len(), "entries are dense");
        reserve(&mut self.codes, hashes.len());
        self.codes.extend(hashes.iter().map(|h| Code(h.words())));
        self.maybe_rebuild();
    }

    fn search_radius(&self, query: &PdqHash, radius: u32, out: &mut Vec<(u32, u32)>) {
        let q = query.words();
        self.main.search(&self.codes, &q, radius, out);
        self.delta.search(&self.codes, &q, radius, out);
        scan(
            &self.codes,
            self.delta.end()..self.codes.len(),
            &q,
            radius,
            out,
        );
    }

    fn hash(&self, entry: u32) -> Option<PdqHash> {
        let code = self.codes.get(entry as usize)?;
        Some(PdqHash::from_words(code.0))
    }

    fn len(&self) -> usize {
        self.codes.len()
    }

    fn memory_bytes(&self) -> usize {
        self.codes.capacity() * size_of::<Code>()
            + self.main.memory_bytes()
            + self.delta.memory_bytes()
    }

    fn rebuild_due(&self) -> bool {
        self.owner_rebuilds && self.main.len > 0 && self.main_outgrown()
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

    /// Queries near stored hashes (up to `radius + 4` bits away) and random ones, searched by
    /// both engines at `radius`.
    fn assert_same(mih: &MihEngine, exact: &ExactEngine, hashes: &[PdqHash], radius: u32) {
        let mut rng = StdRng::seed_from_u64(u64::from(radius));
        for q in 0..30 {
            let query = if q % 3 == 0 {
                random_hash(&mut rng)
            } else {
                let base = hashes[rng.random_range(0..hashes.len())];
                flip(&base, rng.random_range(0..=radius as usize + 4), &mut rng)
            };
            let (mut a, mut b) = (Vec::new(), Vec::new());
            mih.search_radius(&query, radius, &mut a);
            exact.search_radius(&query, radius, &mut b);
            // Equal as sorted lists: same entries, same distances, no duplicates.
            assert_eq!(sorted(a), sorted(b), "radius {radius}");
        }
    }

    #[test]
    fn results_equal_the_exact_scan_at_every_radius_and_table_count() {
        let mut rng = StdRng::seed_from_u64(7);
        let hashes = dataset(20_000, &mut rng);
        let mut exact = ExactEngine::new();
        exact.add_batch(0, &hashes);
        for tables in [None, Some(10), Some(11), Some(12), Some(13), Some(16)] {
            let mut mih = tables.map_or_else(MihEngine::new, MihEngine::with_tables);
            mih.add_batch(0, &hashes);
            assert_eq!(mih.tail_len(), 0, "a large batch is indexed at once");
            assert_eq!(mih.main_tables(), tables.unwrap_or(tables_for(20_000)));
            for radius in 0..=80 {
                assert_same(&mih, &exact, &hashes, radius);
            }
            for radius in [100, 128, 200, 256] {
                assert_same(&mih, &exact, &hashes, radius);
            }
        }
    }

    #[test]
    fn table_radii_follow_the_refined_pigeonhole_rule() {
        let radii = table_radii(31, 13).expect("radius 31 probes");
        assert_eq!(&radii[..13], &[2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]);
        // Every split of 31 into 13 parts that beats the radii somewhere sums to more than 31.
        let slack: i32 = radii[..13].iter().map(|r| r + 1).sum();
        assert_eq!(slack, 32);
        let radii = table_radii(31, 16).expect("radius 31 probes");
        assert!(radii[..16].iter().all(|&r| r == 1));
        let radii = table_radii(5, 11).expect("radius 5 probes");
        assert_eq!(&radii[..11], &[0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1]);
        assert_eq!(table_radii(64, 16), None);
    }

    #[test]
    fn the_size_rule_and_directory_stay_in_bounds() {
        assert_eq!(tables_for(0), 16);
        assert_eq!(tables_for(100_000), 15);
        assert_eq!(tables_for(1_000_000), 13);
        assert_eq!(tables_for(10_000_000), 11);
        assert_eq!(tables_for(usize::MAX), MIN_TABLES);
        for m in MIN_TABLES..=MAX_TABLES {
            for n in [0, 1, 5_000, 1 << 20, 1 << 26, 1 << 31] {
                let (narrow, wide) = (256 / m as u32, 256_u32.div_ceil(m as u32));
                let hi_bits = hi_bits_for(n, narrow, wide);
                let subs = substrings(m, hi_bits);
                assert_eq!(subs.iter().map(|s| s.width).sum::<u32>(), 256);
                assert!(subs.iter().all(|s| s.low_bits <= MAX_LOW_BITS));
                // At most m / 2 bytes of directory per entry at the table count the rule picks.
                if n >= 1 << 16 && m == tables_for(n) {
                    assert!((m << hi_bits) * 4 <= n * m / 2, "m {m} n {n}");
                }
            }
        }
    }

    #[test]
    fn substrings_cover_the_hash_in_order() {
        let hash = PdqHash::from_bit_fn(|k| k == 255 || k == 0);
        let words = hash.words();
        let subs = substrings(13, 12);
        assert_eq!(subs[0].width, 20);
        assert_eq!(subs[12].width, 19);
        assert_eq!(subs[0].of(&words), 1 << 19);
        assert_eq!(subs[12].of(&words), 1);
        assert!((1..12).all(|t| subs[t].of(&words) == 0));
        // A substring straddling two words.
        let all = [u64::MAX; 4];
        assert!(subs.iter().all(|s| s.of(&all) == (1u32 << s.width) - 1));
        let straddle = subs.iter().find(|s| s.start < 64 && s.start + s.width > 64);
        let straddle = straddle.expect("a substring across words 0 and 1");
        let one_bit = PdqHash::from_bit_fn(|k| k == 255 - 64).words();
        assert_eq!(
            straddle.of(&one_bit),
            1 << (straddle.start + straddle.width - 65)
        );
    }

    #[test]
    fn probe_masks_are_grouped_by_popcount() {
        let (masks, ends) = probe_masks(16);
        assert_eq!(ends, [0, 1, 17, 137, 697]);
        assert_eq!(masks[0], 0);
        for k in 0..4 {
            assert!(
                masks[ends[k]..ends[k + 1]]
                    .iter()
                    .all(|m| m.count_ones() == k as u32)
            );
        }
        let mut unique = masks.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), masks.len());
    }

    #[test]
    fn single_inserts_go_through_tail_delta_and_rebuilds() {
        let mut rng = StdRng::seed_from_u64(9);
        let hashes = dataset(60_000, &mut rng);
        let mut mih = MihEngine::new();
        let mut exact = ExactEngine::new();
        // A first bulk load, then single inserts.
        mih.add_batch(0, &hashes[..30_000]);
        exact.add_batch(0, &hashes[..30_000]);
        let (mut main_builds, mut delta_builds, mut delta_searches) = (0, 0, 0);
        for (id, hash) in (30_000u32..).zip(&hashes[30_000..]) {
            let (main, delta) = (mih.main.len, mih.delta.len);
            mih.add(id, hash);
            exact.add(id, hash);
            if mih.main.len != main {
                main_builds += 1;
            } else if mih.delta.len != delta {
                delta_builds += 1;
            }
            assert!(mih.tail_len() <= MIN_TAIL.max(mih.delta.len / TAIL_SHARE));
            if id % 499 == 0 {
                let query = flip(hash, 20, &mut rng);
                let (mut a, mut b) = (Vec::new(), Vec::new());
                mih.search_radius(&query, 31, &mut a);
                exact.search_radius(&query, 31, &mut b);
                assert!(b.iter().any(|&(e, _)| e == id), "the new entry is found");
                assert_eq!(sorted(a), sorted(b));
                assert_eq!(mih.hash(id), Some(*hash));
                delta_searches += usize::from(mih.delta.len > 0);
            }
        }
        assert!(main_builds >= 2, "{main_builds} main rebuilds");
        assert!(delta_builds >= 2, "{delta_builds} delta builds");
        assert!(
            delta_searches >= 2,
            "{delta_searches} searches used a delta"
        );
        for radius in [0, 15, 31, 40, 63] {
            assert_same(&mih, &exact, &hashes, radius);
        }
    }

    #[test]
    fn owner_rebuilds_leave_the_main_tables_to_the_owner() {
        let mut rng = StdRng::seed_from_u64(10);
        let hashes = dataset(50_000, &mut rng);
        let mut mih = MihEngine::new().with_owner_rebuilds();
        let mut exact = ExactEngine::new();
        // The first build is the engine's own (nothing to hand over yet).
        mih.add_batch(0, &hashes[..30_000]);
        exact.add_batch(0, &hashes[..30_000]);
        assert_eq!(mih.main.len, 30_000);
        assert!(!mih.rebuild_due());
        let mut due_at = None;
        for (id, hash) in (30_000u32..).zip(&hashes[30_000..]) {
            mih.add(id, hash);
            exact.add(id, hash);
            assert_eq!(
                mih.main.len, 30_000,
                "inserts never rebuild the main tables"
            );
            assert!(mih.tail_len() <= MIN_TAIL.max(mih.delta.len / TAIL_SHARE));
            if mih.rebuild_due() && due_at.is_none() {
                due_at = Some(id);
            }
        }
        // Due exactly where the engine would have rebuilt by itself.
        assert_eq!(due_at, Some(30_000 + MIN_TAIL as u32));
        assert!(
            mih.delta.len > 30_000 / DELTA_SHARE,
            "the delta took the excess"
        );
        for radius in [0, 15, 31, 40, 63] {
            assert_same(&mih, &exact, &hashes, radius);
        }
        // What the owner does: a fresh engine given every entry builds its main tables at once.
        let mut fresh = MihEngine::new().with_owner_rebuilds();
        fresh.add_batch(0, &hashes);
        assert_eq!(fresh.main.len, hashes.len());
        assert!(!fresh.rebuild_due());
        assert_same(&fresh, &exact, &hashes, 31);
    }

    #[test]
    fn memory_is_counted_and_under_80_bytes_per_entry_beyond_the_hash() {
        let mut rng = StdRng::seed_from_u64(3);
        let hashes: Vec<PdqHash> = (0..300_000).map(|_| random_hash(&mut rng)).collect();
        let mut mih = MihEngine::new();
        mih.add_batch(0, &hashes);
        let m = mih.main_tables();
        let level = &mih.main;
        assert_eq!(
            mih.memory_bytes(),
            hashes.len() * (32 + 5 * m)
                + level.dir.len() * 4
                + level.masks.len() * 4
                + m * size_of::<Substring>(),
            "exact-size allocations after a bulk load"
        );
        let per_entry = mih.memory_bytes() as f64 / hashes.len() as f64 - 32.0;
        assert!(per_entry < 80.0, "{per_entry} bytes per entry");
    }
}
