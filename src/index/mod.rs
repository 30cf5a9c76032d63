//! The in-memory frame index: every live reference frame's PDQ hash, searchable by Hamming radius
//! (shared/DESIGN.md §4-5). The match path reads it; the write path and start-up fill it.
//!
//! Layout:
//! - [`FrameIndex`] owns the per-frame metadata, the per-reference table and the tombstones, and
//!   assigns dense `u32` entry ids in insertion order.
//! - An [`Engine`] maps a query to candidate entry ids within a radius. [`exact::ExactEngine`] is a
//!   linear popcount scan: always correct, and the oracle every other engine is tested against.
//!   [`hnsw::HnswEngine`] is approximate (hnsw_rs); no `hnsw_rs` type leaves this module
//!   (STYLE.md §3.1).
//!
//! Invariants:
//! - The frames of one reference occupy one contiguous run of entry ids (`first..first + count`),
//!   because a reference is always inserted in one piece and rebuilds keep live entries in order.
//!   That makes [`FrameIndex::withdraw`] O(frames of that reference) with no per-reference list.
//! - Withdrawal is a tombstone: the entry stays in the engine and is filtered at search time,
//!   since hnsw_rs cannot delete (DESIGN.md §8). When tombstones reach [`REBUILD_FRACTION`] of
//!   the entries and at least [`REBUILD_MIN_TOMBSTONES`], or the engine asks for a build from
//!   scratch ([`Engine::rebuild_due`]: `mih` once inserts outgrow its main tables), a rebuild is
//!   due: the owner ([`SharedIndex`], in the background) rebuilds the engine from the live entries
//!   and entry ids are remapped. Neither `withdraw` nor `insert_reference` rebuilds.
//!   [`FrameIndex`]'s API never exposes entry ids.
//! - A withdrawn reference id stays known, so re-inserting it is refused: withdrawn content is
//!   never returned again, even if a replayed change adds it back.
//! - Methods are infallible; [`FrameIndex`] holds no lock (the caller wraps it in one).

use std::collections::HashMap;
use std::fmt;
use std::mem::size_of;
use std::str::FromStr;

use crate::hash::PdqHash;
use crate::model::{BankId, FrameSignal, IndexedFrame, ReferenceId};

pub mod exact;
pub mod hnsw;
pub mod mih;
pub mod signals;
pub mod vectors;

pub use signals::{RebuildReport, SharedIndex, Signal, SignalIndex, SpaceConflict};
pub use vectors::{VectorIndex, VectorMatch, VectorParams};

/// A rebuild happens once tombstones are at least this share of all entries ...
pub const REBUILD_FRACTION: f64 = 0.25;
/// ... and at least this many, so that small indexes are not rebuilt on every withdrawal.
pub const REBUILD_MIN_TOMBSTONES: usize = 1024;

/// Which search engine a [`FrameIndex`] uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// Linear popcount scan ([`exact::ExactEngine`]): exact, memory-bound.
    Exact,
    /// Exact multi-index hashing ([`mih::MihEngine`]): same results as `Exact`, far fewer
    /// distance computations. The default: `cargo bench --bench engines` measured 118 µs per
    /// query (p50) at 1M frames against 1.17 ms for the scan, and 12x the scan's queries/s at
    /// 1M (one core; README "Performance").
    #[default]
    Mih,
    /// Approximate graph search ([`hnsw::HnswEngine`]) with [`HnswParams`].
    Hnsw,
}

impl EngineKind {
    /// Every kind, in declaration order.
    pub const ALL: [EngineKind; 3] = [EngineKind::Exact, EngineKind::Mih, EngineKind::Hnsw];

    /// The stable text form used in config and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            EngineKind::Exact => "exact",
            EngineKind::Mih => "mih",
            EngineKind::Hnsw => "hnsw",
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An engine name that is not one of [`EngineKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown index engine {0:?}; expected one of exact, mih, hnsw")]
pub struct UnknownEngine(pub String);

impl FromStr for EngineKind {
    type Err = UnknownEngine;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        EngineKind::ALL
            .into_iter()
            .find(|k| k.as_str() == text)
            .ok_or_else(|| UnknownEngine(text.to_string()))
    }
}

/// Tuning of [`hnsw::HnswEngine`].
///
/// A radius search is a kNN search for `knn` neighbours with beam width `ef_search`, keeping those
/// within the radius, so a query never gets more than `knn` hits from this engine.
///
/// Defaults (M=16, ef_construction=128, ef_search=128, knn=64), measured on seeded sets of half
/// random hashes and half near-duplicate clusters of 10, radius 31
/// (tests/it/index_conformance.rs):
///
/// | set | M / ef_c / ef_s | recall | build | queries/s (1 thread, release) |
/// | --- | --- | --- | --- | --- |
/// | 20k | 16 / 128 / 128 | 1.0000 of 1,063 pairs | 13-25 s (test profile) | |
/// | 20k | 12 / 64 / 64 | 0.9981 | 7 s (test profile) | |
/// | 100k | 16 / 128 / 128 | 0.9997-1.0000 of 3,522 pairs | 90-174 s | 610-780 |
/// | 100k | 16 / 128 / 64 | 0.9974 | 108 s | 1,110-1,250 |
/// | 100k | 32 / 256 / 256 | 1.0000 | 295-542 s | 200-240 |
///
/// Ranges are two runs (parallel inserts differ between runs) on two cores shared with other
/// builds. The exact scan answered 6,200-10,600 queries/s on the same 100k set, so hnsw_rs does
/// not pay off for PDQ at this size. DESIGN.md §5 quotes M=32, ef=256 for 0.99 kNN recall on
/// PDQ-like codes at 1M (faiss); raise these if real data needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HnswParams {
    /// Links per node and layer (HNSW's `M`; layer 0 keeps twice as many). At most 256.
    pub max_connections: usize,
    /// Beam width while inserting.
    pub ef_construction: usize,
    /// Beam width while searching (raised to `knn` when smaller).
    pub ef_search: usize,
    /// Neighbours asked for per query: the most hits one query can return.
    pub knn: usize,
}

impl Default for HnswParams {
    fn default() -> Self {
        Self {
            max_connections: 16,
            ef_construction: 128,
            ef_search: 128,
            knn: 64,
        }
    }
}

/// One result: a reference frame within the radius.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match {
    /// The reference the frame belongs to.
    pub reference: ReferenceId,
    /// That reference's bank.
    pub bank: BankId,
    /// The matching reference frame.
    pub frame: FrameSignal,
    /// Hamming distance between the query and `frame.hash`, in bits.
    pub distance: u32,
}

/// A search engine over PDQ hashes, addressed by dense `u32` entry ids that [`FrameIndex`]
/// assigns. Engines know nothing of references or tombstones.
pub trait Engine: Send + Sync {
    /// Short stable name, as in [`EngineKind`]'s text form.
    fn name(&self) -> &'static str;

    /// Adds one hash under `entry`. Entries are added in increasing order starting at 0.
    fn add(&mut self, entry: u32, hash: &PdqHash);

    /// Adds `hashes` under entries `first`, `first + 1`, ...; engines may use several cores.
    fn add_batch(&mut self, first: u32, hashes: &[PdqHash]) {
        for (entry, hash) in (first..).zip(hashes) {
            self.add(entry, hash);
        }
    }

    /// Appends `(entry, distance)` for entries within `radius` bits of `query` to `out`, in no
    /// particular order. An approximate engine may miss some; it never reports one outside.
    fn search_radius(&self, query: &PdqHash, radius: u32, out: &mut Vec<(u32, u32)>);

    /// The hash added under `entry`, if any. [`FrameIndex`] keeps no copy of its own.
    fn hash(&self, entry: u32) -> Option<PdqHash>;

    /// Number of entries added.
    fn len(&self) -> usize;

    /// Whether no entry was added.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap use in bytes: the capacity of every allocation the engine owns (an estimate for
    /// hnsw, whose allocations hnsw_rs owns).
    fn memory_bytes(&self) -> usize;

    /// Whether the engine asks its owner for a build from scratch (a fresh engine given every
    /// entry), which it leaves to the owner rather than running it inside an insert: `mih` once
    /// its delta outgrows the main tables ([`mih::MihEngine::with_owner_rebuilds`]).
    fn rebuild_due(&self) -> bool {
        false
    }
}

/// Makes room in `vec` for `additional` more items, growing by at least an eighth of its length
/// rather than doubling: repeated small appends stay amortised O(1), a bulk load into an empty
/// vector allocates exactly, and at most an eighth of the capacity sits unused.
pub(crate) fn reserve<T>(vec: &mut Vec<T>, additional: usize) {
    if vec.capacity() - vec.len() < additional {
        vec.reserve_exact(additional.max(vec.len() / 8));
    }
}

/// Builds an empty engine, sized for `capacity` entries.
fn new_engine(kind: EngineKind, params: HnswParams, capacity: usize) -> Box<dyn Engine> {
    match kind {
        EngineKind::Exact => Box::new(exact::ExactEngine::with_capacity(capacity)),
        // The index rebuilds the engine in the background (`SharedIndex`), never inside an insert.
        EngineKind::Mih => Box::new(mih::MihEngine::new().with_owner_rebuilds()),
        EngineKind::Hnsw => Box::new(hnsw::HnswEngine::new(params, capacity)),
    }
}

/// Per-entry metadata: the frame's fields other than its hash (which the engine holds, see
/// [`Engine::hash`]) and quality (kept apart in `FrameIndex::quality`, which saves 7 bytes of
/// padding), plus the slot of its reference in `references`. 16 bytes.
#[derive(Clone, Copy, Debug)]
struct Entry {
    timestamp_ms: u64,
    frame_index: u32,
    slot: u32,
}

/// One reference: its ids and its run of entries.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RefEntry {
    id: ReferenceId,
    bank: BankId,
    /// First entry id of the run.
    first: u32,
    /// Length of the run (0 once withdrawn and compacted away).
    count: u32,
    active: bool,
}

/// A set of entry ids, one bit each.
#[derive(Clone, Debug, Default)]
pub(crate) struct BitSet {
    words: Vec<u64>,
}

impl BitSet {
    fn memory_bytes(&self) -> usize {
        self.words.capacity() * size_of::<u64>()
    }

    fn grow_to(&mut self, bits: usize) {
        self.words.resize(bits.div_ceil(64), 0);
    }

    fn set(&mut self, bit: u32) {
        let bit = bit as usize;
        self.grow_to((bit + 1).max(self.words.len() * 64));
        if let Some(word) = self.words.get_mut(bit / 64) {
            *word |= 1 << (bit % 64);
        }
    }

    fn contains(&self, bit: u32) -> bool {
        let bit = bit as usize;
        self.words
            .get(bit / 64)
            .is_some_and(|word| (word >> (bit % 64)) & 1 == 1)
    }
}

/// The index the service holds: reference frames by PDQ hash, with withdrawal by tombstone.
///
/// The service wraps it in an `Arc<parking_lot::RwLock<FrameIndex>>`: searches share the read
/// lock, writes take the write lock. See the module docs for the invariants.
pub struct FrameIndex {
    kind: EngineKind,
    params: HnswParams,
    engine: Box<dyn Engine>,
    /// Indexed by entry id; `entries.len() == quality.len() == engine.len()`.
    entries: Vec<Entry>,
    /// Each entry's PDQ quality.
    quality: Vec<u8>,
    /// Entry ids of withdrawn frames still present in the engine.
    tombstoned: BitSet,
    tombstones: usize,
    references: Vec<RefEntry>,
    slots: HashMap<ReferenceId, u32>,
    live_references: usize,
    /// Tombstones that make a rebuild due; [`REBUILD_MIN_TOMBSTONES`] outside tests.
    rebuild_min_tombstones: usize,
    /// Withdrawals since a background rebuild started (`Some` while one runs).
    journal: Option<Vec<ReferenceId>>,
    /// Hashes of entries copied into this (fresh) index by a rebuild and not yet in the engine.
    pending: Vec<PdqHash>,
}

impl fmt::Debug for FrameIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameIndex")
            .field("engine", &self.engine_name())
            .field("entries", &self.entries.len())
            .field("tombstones", &self.tombstones)
            .field("live_references", &self.live_references)
            .finish_non_exhaustive()
    }
}

impl FrameIndex {
    /// An empty index using engine `kind`; `hnsw` is used only by [`EngineKind::Hnsw`].
    pub fn new(kind: EngineKind, hnsw: HnswParams) -> Self {
        Self {
            kind,
            params: hnsw,
            engine: new_engine(kind, hnsw, 0),
            entries: Vec::new(),
            quality: Vec::new(),
            tombstoned: BitSet::default(),
            tombstones: 0,
            references: Vec::new(),
            slots: HashMap::new(),
            live_references: 0,
            rebuild_min_tombstones: REBUILD_MIN_TOMBSTONES,
            journal: None,
            pending: Vec::new(),
        }
    }

    /// The engine's name (`"exact"`, `"mih"` or `"hnsw"`).
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// Adds all frames of one reference. Idempotent per reference: a second call for the same id
    /// (or a call for a withdrawn id) changes nothing and returns false. A reference with no
    /// frames is recorded (and counts as live) but can never match.
    pub fn insert_reference(
        &mut self,
        reference: ReferenceId,
        bank: BankId,
        frames: &[FrameSignal],
    ) -> bool {
        if self.slots.contains_key(&reference) {
            return false;
        }
        let first = self.entries.len();
        self.push_reference(reference, bank, frames.iter().copied());
        let hashes: Vec<PdqHash> = frames.iter().map(|f| f.hash).collect();
        self.engine.add_batch(entry_id(first), &hashes);
        true
    }

    /// Bulk load at start-up, with the same semantics as calling
    /// [`insert_reference`](Self::insert_reference) once per reference in `frames` (a reference's
    /// bank is that of its first frame). The hnsw engine inserts on all cores.
    pub fn load(&mut self, mut frames: Vec<IndexedFrame>) {
        // Group each reference's frames together (stable: frame order within a reference is kept),
        // so each reference gets one contiguous run of entries.
        frames.sort_by_key(|f| f.reference);
        let first = self.entries.len();
        if first == 0 {
            // Size the engine for the load: hnsw_rs pre-allocates its layers from this hint.
            self.engine = new_engine(self.kind, self.params, frames.len());
        }
        // At most this many new entries (fewer if some references are already known).
        reserve(&mut self.entries, frames.len());
        reserve(&mut self.quality, frames.len());
        let mut hashes: Vec<PdqHash> = Vec::with_capacity(frames.len());
        let mut rest = frames.as_slice();
        while let Some(head) = rest.first() {
            let run = rest
                .iter()
                .position(|f| f.reference != head.reference)
                .unwrap_or(rest.len());
            let (group, tail) = rest.split_at(run);
            if !self.slots.contains_key(&head.reference) {
                self.push_reference(head.reference, head.bank, group.iter().map(|f| f.frame));
                hashes.extend(group.iter().map(|f| f.frame.hash));
            }
            rest = tail;
        }
        drop(frames);
        self.engine.add_batch(entry_id(first), &hashes);
    }

    /// Records a reference and its entries' metadata; the caller adds the hashes to the engine.
    fn push_reference(
        &mut self,
        reference: ReferenceId,
        bank: BankId,
        frames: impl ExactSizeIterator<Item = FrameSignal>,
    ) {
        let slot = entry_id(self.references.len());
        let first = entry_id(self.entries.len());
        let count = entry_id(frames.len());
        reserve(&mut self.entries, frames.len());
        reserve(&mut self.quality, frames.len());
        for frame in frames {
            self.entries.push(Entry {
                timestamp_ms: frame.timestamp_ms,
                frame_index: frame.frame_index,
                slot,
            });
            self.quality.push(frame.quality);
        }
        self.references.push(RefEntry {
            id: reference,
            bank,
            first,
            count,
            active: true,
        });
        self.slots.insert(reference, slot);
        self.live_references += 1;
    }

    /// Tombstones every frame of the reference: none is returned again, and the id cannot be
    /// inserted again. Returns whether it was present and active. An unknown id is remembered as
    /// withdrawn too, so that a late insert of it is refused.
    ///
    /// This never rebuilds: once [`Rebuild::rebuild_due`] says so (tombstones at
    /// [`REBUILD_FRACTION`] of the entries and at least [`REBUILD_MIN_TOMBSTONES`]), the owner
    /// rebuilds in the background ([`SharedIndex`]) or calls [`rebuild_now`](Self::rebuild_now).
    pub fn withdraw(&mut self, reference: ReferenceId) -> bool {
        if let Some(journal) = &mut self.journal {
            journal.push(reference);
        }
        let Some(&slot) = self.slots.get(&reference) else {
            let slot = entry_id(self.references.len());
            self.references.push(RefEntry {
                id: reference,
                bank: BankId(0),
                first: 0,
                count: 0,
                active: false,
            });
            self.slots.insert(reference, slot);
            return false;
        };
        let Some(entry) = self.references.get_mut(slot as usize) else {
            return false;
        };
        if !entry.active {
            return false;
        }
        entry.active = false;
        let (first, count) = (entry.first, entry.count);
        self.live_references -= 1;
        for id in first..first + count {
            self.tombstoned.set(id);
        }
        self.tombstones += count as usize;
        true
    }

    /// Drops tombstoned entries and rebuilds the engine from the live ones, in order, so that
    /// every reference keeps a contiguous run (entry ids are remapped), right here: the same
    /// steps as the background rebuild of [`SharedIndex`], without a lock in between. Costs a
    /// full engine build: milliseconds per 10^5 frames for `exact`, about 0.1 s per 10^6 for
    /// `mih` (4.3 s at 10^7), minutes per 10^5 for `hnsw`.
    pub fn rebuild_now(&mut self) {
        rebuild_in_place(self);
    }

    /// Every live frame within `max_distance` bits of `query` whose bank passes `bank_filter`,
    /// written to `out` (cleared first), sorted by (distance, reference, frame index).
    ///
    /// Reference frames are not filtered by quality here: the caller sees `frame.quality`.
    /// With the hnsw engine at most [`HnswParams::knn`] hits come back, and tombstoned entries
    /// still take up some of those slots until the next rebuild.
    pub fn search(
        &self,
        query: &PdqHash,
        max_distance: u32,
        bank_filter: &dyn Fn(BankId) -> bool,
        out: &mut Vec<Match>,
    ) {
        out.clear();
        let mut hits = Vec::new();
        self.engine.search_radius(query, max_distance, &mut hits);
        for (id, distance) in hits {
            if self.tombstoned.contains(id) {
                continue;
            }
            let Some(entry) = self.entries.get(id as usize) else {
                continue;
            };
            let Some(reference) = self.references.get(entry.slot as usize) else {
                continue;
            };
            if !bank_filter(reference.bank) {
                continue;
            }
            let (Some(hash), Some(&quality)) =
                (self.engine.hash(id), self.quality.get(id as usize))
            else {
                continue;
            };
            out.push(Match {
                reference: reference.id,
                bank: reference.bank,
                frame: FrameSignal {
                    frame_index: entry.frame_index,
                    timestamp_ms: entry.timestamp_ms,
                    hash,
                    quality,
                },
                distance,
            });
        }
        out.sort_unstable_by_key(|m| {
            (
                m.distance,
                m.reference,
                m.frame.frame_index,
                m.frame.timestamp_ms,
            )
        });
    }

    /// Number of distinct live frames (by frame index) of `reference` with quality >= `min_quality` (the denominator of
    /// "reference %" in video verdicts); `None` if the reference is unknown or withdrawn.
    pub fn reference_frame_count(&self, reference: ReferenceId, min_quality: u8) -> Option<u32> {
        let reference = self.references.get(*self.slots.get(&reference)? as usize)?;
        if !reference.active {
            return None;
        }
        let (first, count) = (reference.first as usize, reference.count as usize);
        let run = self.entries.get(first..first + count)?;
        let quality = self.quality.get(first..first + count)?;
        // Distinct frame indexes: a frame with uniform borders is stored under two hashes (the
        // whole picture and its content area) and still counts as one frame.
        let mut frames: Vec<u32> = run
            .iter()
            .zip(quality)
            .filter(|&(_, &q)| q >= min_quality)
            .map(|(e, _)| e.frame_index)
            .collect();
        frames.sort_unstable();
        frames.dedup();
        Some(entry_id(frames.len()))
    }

    /// The live frame `frame_index` of `reference` (its whole-picture entry, the first stored under
    /// that index), or `None` when the reference is unknown, withdrawn, or has no such frame. Used
    /// to give a frame matched by another signal (an embedding) its PDQ quality and timestamp.
    pub fn reference_frame(&self, reference: ReferenceId, frame_index: u32) -> Option<FrameSignal> {
        let reference = self.references.get(*self.slots.get(&reference)? as usize)?;
        if !reference.active {
            return None;
        }
        let first = reference.first as usize;
        let run = self.entries.get(first..first + reference.count as usize)?;
        let offset = run.iter().position(|e| e.frame_index == frame_index)?;
        let id = entry_id(first + offset);
        let entry = run.get(offset)?;
        Some(FrameSignal {
            frame_index,
            timestamp_ms: entry.timestamp_ms,
            hash: self.engine.hash(id)?,
            quality: *self.quality.get(id as usize)?,
        })
    }

    /// Whether `reference` was inserted or withdrawn here (a known id is never inserted again).
    pub fn is_known(&self, reference: ReferenceId) -> bool {
        self.slots.contains_key(&reference)
    }

    /// Frames not tombstoned.
    pub fn live_frames(&self) -> usize {
        self.entries.len() - self.tombstones
    }

    /// References inserted and not withdrawn (including any without frames).
    pub fn live_references(&self) -> usize {
        self.live_references
    }

    /// Withdrawn frames still held by the engine, awaiting the next rebuild.
    pub fn tombstones(&self) -> usize {
        self.tombstones
    }

    /// Heap use in bytes: the capacity of the metadata, the reference table and its map, the
    /// tombstones and the engine ([`Engine::memory_bytes`]).
    pub fn memory_bytes(&self) -> usize {
        // A hashbrown bucket holds the pair plus one control byte; capacity() is the usable
        // share (7/8) of the buckets.
        let buckets = (self.slots.capacity() * 8).div_ceil(7).next_power_of_two();
        let map = if self.slots.capacity() == 0 {
            0
        } else {
            buckets * (size_of::<(ReferenceId, u32)>() + 1)
        };
        self.entries.capacity() * size_of::<Entry>()
            + self.quality.capacity()
            + self.tombstoned.words.capacity() * size_of::<u64>()
            + self.references.capacity() * size_of::<RefEntry>()
            + map
            + self.engine.memory_bytes()
    }

    /// Lowers the rebuild floor so tests can trigger rebuilds with few frames.
    #[cfg(test)]
    pub(crate) fn set_rebuild_min_tombstones(&mut self, min: usize) {
        self.rebuild_min_tombstones = min;
    }
}

/// The steps of a rebuild that swaps a fresh copy of an index in, written so that every step but
/// two short ones runs under a read lock or none (see `signals::rebuild`):
///
/// 1. [`begin_rebuild`](Self::begin_rebuild) (write lock, microseconds): starts recording
///    withdrawals in a journal and returns an empty index with the same settings;
/// 2. [`copy_live`](Self::copy_live) (read lock, in chunks): copies references in slot order,
///    live ones with their frames, withdrawn ones as empty, into the fresh index, whose slots
///    therefore equal the old ones;
/// 3. [`index_copied`](Self::index_copied) (no lock): builds the fresh engine (the long part);
/// 4. 2 and 3 again for references added meanwhile;
/// 5. [`finish_rebuild`](Self::finish_rebuild) (write lock): copies the last additions, replays
///    the journal's withdrawals and swaps; the old index is returned, to be dropped unlocked.
///
/// References are append-only between rebuilds and only one rebuild runs at a time, so what was
/// copied never changes but for withdrawals, which the journal replays.
pub(crate) trait Rebuild: Sized {
    /// Whether enough has changed since the last build for a rebuild to pay; false while one runs.
    fn rebuild_due(&self) -> bool;
    /// Step 1; `None` if a rebuild is running already.
    fn begin_rebuild(&mut self) -> Option<Self>;
    /// References recorded (live and withdrawn): the end of the slots to copy.
    fn reference_slots(&self) -> usize;
    /// Step 2: copies references from slot `from` on, stopping after about `budget` frames;
    /// returns the next slot to copy.
    fn copy_live(&self, fresh: &mut Self, from: usize, budget: usize) -> usize;
    /// Step 3, on the fresh index.
    fn index_copied(&mut self);
    /// Step 5: `from` is the next slot step 2 would have copied.
    fn finish_rebuild(&mut self, fresh: Self, from: usize) -> Self;
}

/// All steps of [`Rebuild`] at once, on an index the caller holds exclusively.
pub(crate) fn rebuild_in_place<I: Rebuild>(index: &mut I) {
    if let Some(mut fresh) = index.begin_rebuild() {
        let next = index.copy_live(&mut fresh, 0, usize::MAX);
        fresh.index_copied();
        drop(index.finish_rebuild(fresh, next));
    }
}

impl Rebuild for FrameIndex {
    fn rebuild_due(&self) -> bool {
        let tombstoned = self.tombstones >= self.rebuild_min_tombstones
            && self.tombstones as f64 >= REBUILD_FRACTION * self.entries.len() as f64;
        self.journal.is_none() && (tombstoned || self.engine.rebuild_due())
    }

    fn begin_rebuild(&mut self) -> Option<Self> {
        if self.journal.is_some() {
            return None;
        }
        self.journal = Some(Vec::new());
        let mut fresh = FrameIndex::new(self.kind, self.params);
        fresh.rebuild_min_tombstones = self.rebuild_min_tombstones;
        // Sized for the live frames: hnsw_rs pre-allocates its layers from this hint.
        fresh.engine = new_engine(self.kind, self.params, self.entries.len() - self.tombstones);
        Some(fresh)
    }

    fn reference_slots(&self) -> usize {
        self.references.len()
    }

    fn copy_live(&self, fresh: &mut Self, from: usize, budget: usize) -> usize {
        let mut copied = 0;
        let mut slot = from;
        while let Some(reference) = self.references.get(slot) {
            if copied >= budget {
                break;
            }
            let new_slot = entry_id(fresh.references.len());
            let first = entry_id(fresh.entries.len());
            let count = if reference.active { reference.count } else { 0 };
            let (start, end) = (reference.first as usize, (reference.first + count) as usize);
            if let (Some(run), Some(quality)) =
                (self.entries.get(start..end), self.quality.get(start..end))
            {
                reserve(&mut fresh.entries, run.len());
                fresh.entries.extend(run.iter().map(|e| Entry {
                    slot: new_slot,
                    ..*e
                }));
                fresh.quality.extend_from_slice(quality);
                let ids = reference.first..reference.first + count;
                fresh
                    .pending
                    .extend(ids.filter_map(|id| self.engine.hash(id)));
            }
            fresh.references.push(RefEntry {
                first,
                count,
                ..*reference
            });
            fresh.slots.insert(reference.id, new_slot);
            if reference.active {
                fresh.live_references += 1;
            }
            copied += count as usize + 1;
            slot += 1;
        }
        slot
    }

    fn index_copied(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        let first = entry_id(self.engine.len());
        debug_assert_eq!(self.engine.len() + pending.len(), self.entries.len());
        self.engine.add_batch(first, &pending);
    }

    fn finish_rebuild(&mut self, mut fresh: Self, from: usize) -> Self {
        self.copy_live(&mut fresh, from, usize::MAX);
        debug_assert_eq!(fresh.references.len(), self.references.len());
        fresh.index_copied();
        for reference in self.journal.take().unwrap_or_default() {
            fresh.withdraw(reference);
        }
        std::mem::replace(self, fresh)
    }
}

/// An entry id, slot or count as `u32`. 2^32 frames would take over 200 GiB of metadata alone,
/// far beyond one replica (DESIGN.md §9 shards at about 10^8 frames).
fn entry_id(n: usize) -> u32 {
    u32::try_from(n).expect("fewer than 2^32 frames in one index")
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random_hash(rng: &mut StdRng) -> PdqHash {
        PdqHash::from_words(rng.random())
    }

    /// `hash` with `bits` distinct random bits flipped.
    fn flip(rng: &mut StdRng, hash: &PdqHash, bits: usize) -> PdqHash {
        let mut words = hash.words();
        let positions = rand::seq::index::sample(rng, 256, bits);
        for k in positions {
            words[k / 64] ^= 1 << (k % 64);
        }
        PdqHash::from_words(words)
    }

    fn frame(index: u32, hash: PdqHash, quality: u8) -> FrameSignal {
        FrameSignal {
            frame_index: index,
            timestamp_ms: u64::from(index) * 1000,
            hash,
            quality,
        }
    }

    /// A seeded set: `refs` references of 1..=8 frames, each frame a near-duplicate of one of a
    /// few bases, so that queries near a base hit several references.
    fn corpus(rng: &mut StdRng, refs: i64, bases: &[PdqHash]) -> Vec<IndexedFrame> {
        let mut frames = Vec::new();
        for r in 0..refs {
            let n = rng.random_range(1..=8u32);
            for i in 0..n {
                let base = bases[rng.random_range(0..bases.len())];
                let bits = rng.random_range(0..40);
                frames.push(IndexedFrame {
                    reference: ReferenceId(1000 + r),
                    bank: BankId(r % 3),
                    frame: frame(i, flip(rng, &base, bits), rng.random_range(0..=100)),
                });
            }
        }
        frames
    }

    /// Brute force over the live frames, with the result order `search` promises.
    fn brute(
        live: &[IndexedFrame],
        query: &PdqHash,
        radius: u32,
        banks: &dyn Fn(BankId) -> bool,
    ) -> Vec<Match> {
        let mut out: Vec<Match> = live
            .iter()
            .filter(|f| banks(f.bank))
            .map(|f| Match {
                reference: f.reference,
                bank: f.bank,
                frame: f.frame,
                distance: f.frame.hash.distance(query),
            })
            .filter(|m| m.distance <= radius)
            .collect();
        out.sort_by_key(|m| (m.distance, m.reference, m.frame.frame_index));
        out
    }

    #[test]
    fn frame_index_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<FrameIndex>();
    }

    #[test]
    fn engine_kind_text_round_trips() {
        for kind in EngineKind::ALL {
            assert_eq!(kind.to_string().parse::<EngineKind>(), Ok(kind));
        }
        assert_eq!(EngineKind::default(), EngineKind::Mih);
        assert_eq!(
            "annoy".parse::<EngineKind>(),
            Err(UnknownEngine("annoy".to_string()))
        );
    }

    #[test]
    fn exact_index_matches_brute_force_with_bank_filter() {
        let mut rng = StdRng::seed_from_u64(1);
        let bases: Vec<PdqHash> = (0..5).map(|_| random_hash(&mut rng)).collect();
        let frames = corpus(&mut rng, 200, &bases);
        let mut index = FrameIndex::new(EngineKind::Exact, HnswParams::default());
        index.load(frames.clone());
        assert_eq!(index.live_frames(), frames.len());
        assert_eq!(index.live_references(), 200);
        let mut out = Vec::new();
        for radius in [0, 15, 31, 256] {
            for base in &bases {
                let query = flip(&mut rng, base, 5);
                let all = |_: BankId| true;
                index.search(&query, radius, &all, &mut out);
                assert_eq!(out, brute(&frames, &query, radius, &all));
                let not_bank_1 = |b: BankId| b != BankId(1);
                index.search(&query, radius, &not_bank_1, &mut out);
                let expected = brute(&frames, &query, radius, &not_bank_1);
                assert_eq!(out, expected);
                assert!(out.iter().all(|m| m.bank != BankId(1)));
            }
        }
        // Radius 256 returns everything in one query.
        index.search(&bases[0], 256, &|_| true, &mut out);
        assert_eq!(out.len(), frames.len());
    }

    #[test]
    fn insert_reference_is_idempotent() {
        let mut rng = StdRng::seed_from_u64(2);
        let hash = random_hash(&mut rng);
        let mut index = FrameIndex::new(EngineKind::Exact, HnswParams::default());
        let frames = [frame(0, hash, 90), frame(1, flip(&mut rng, &hash, 3), 90)];
        assert!(index.insert_reference(ReferenceId(7), BankId(1), &frames));
        assert!(!index.insert_reference(ReferenceId(7), BankId(2), &frames[..1]));
        // load() skips it too.
        index.load(vec![IndexedFrame {
            reference: ReferenceId(7),
            bank: BankId(3),
            frame: frame(9, hash, 90),
        }]);
        assert_eq!(index.live_frames(), 2);
        assert_eq!(index.live_references(), 1);
        let mut out = Vec::new();
        index.search(&hash, 31, &|_| true, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|m| m.bank == BankId(1)));
        assert_eq!(out[0].distance, 0);
        assert_eq!(out[1].distance, 3);
    }

    #[test]
    fn withdrawn_frames_are_never_returned() {
        let mut rng = StdRng::seed_from_u64(3);
        let hash = random_hash(&mut rng);
        let mut index = FrameIndex::new(EngineKind::Exact, HnswParams::default());
        for r in 0..4 {
            let frames = [frame(0, flip(&mut rng, &hash, r), 80)];
            assert!(index.insert_reference(ReferenceId(r as i64), BankId(0), &frames));
        }
        assert!(index.withdraw(ReferenceId(1)));
        assert!(
            !index.withdraw(ReferenceId(1)),
            "second withdraw is a no-op"
        );
        assert!(!index.withdraw(ReferenceId(99)), "unknown reference");
        assert!(
            !index.insert_reference(ReferenceId(1), BankId(0), &[frame(0, hash, 80)]),
            "a withdrawn id cannot come back"
        );
        assert!(
            !index.insert_reference(ReferenceId(99), BankId(0), &[frame(0, hash, 80)]),
            "an id withdrawn before it was known cannot come later"
        );
        assert_eq!(index.tombstones(), 1);
        assert_eq!(index.live_frames(), 3);
        assert_eq!(index.live_references(), 3);
        assert_eq!(index.reference_frame_count(ReferenceId(1), 0), None);
        let mut out = Vec::new();
        index.search(&hash, 256, &|_| true, &mut out);
        let refs: Vec<i64> = out.iter().map(|m| m.reference.0).collect();
        assert_eq!(refs, [0, 2, 3]);
    }

    #[test]
    fn reference_frame_count_applies_quality() {
        let mut rng = StdRng::seed_from_u64(4);
        let frames: Vec<FrameSignal> = [10, 49, 50, 51, 100]
            .into_iter()
            .enumerate()
            .map(|(i, q)| frame(i as u32, random_hash(&mut rng), q))
            .collect();
        let mut index = FrameIndex::new(EngineKind::Exact, HnswParams::default());
        assert!(index.insert_reference(ReferenceId(5), BankId(0), &frames));
        assert!(index.insert_reference(ReferenceId(6), BankId(0), &[]));
        assert_eq!(index.reference_frame_count(ReferenceId(5), 0), Some(5));
        assert_eq!(index.reference_frame_count(ReferenceId(5), 50), Some(3));
        assert_eq!(index.reference_frame_count(ReferenceId(5), 101), Some(0));
        assert_eq!(index.reference_frame_count(ReferenceId(6), 50), Some(0));
        assert_eq!(index.reference_frame_count(ReferenceId(8), 50), None);
        assert_eq!(index.live_references(), 2);
    }

    /// Withdraws references one by one until several rebuilds have happened, checking every
    /// step against brute force over the remaining frames.
    fn rebuild_keeps_results(kind: EngineKind, refs: i64) {
        let mut rng = StdRng::seed_from_u64(5);
        let bases: Vec<PdqHash> = (0..4).map(|_| random_hash(&mut rng)).collect();
        let mut live = corpus(&mut rng, refs, &bases);
        // A beam as wide as the set, so hnsw must agree with brute force (see hnsw.rs tests).
        let params = HnswParams {
            ef_search: 512,
            knn: 512,
            ..HnswParams::default()
        };
        let mut index = FrameIndex::new(kind, params);
        index.set_rebuild_min_tombstones(16);
        // Half through load, half through insert_reference.
        let loaded = live[..live.len() / 2].to_vec();
        let mut pending = live[live.len() / 2..].to_vec();
        index.load(loaded.clone());
        while let Some(head) = pending.first().copied() {
            let run = pending
                .iter()
                .position(|f| f.reference != head.reference)
                .unwrap_or(pending.len());
            let frames: Vec<FrameSignal> = pending.drain(..run).map(|f| f.frame).collect();
            // A reference split across load and insert keeps only its loaded frames.
            if !index.insert_reference(head.reference, head.bank, &frames) {
                live.retain(|f| f.reference != head.reference || loaded.contains(f));
            }
        }
        let mut ids: Vec<ReferenceId> = live.iter().map(|f| f.reference).collect();
        ids.dedup();
        let mut rebuilds = 0;
        let mut out = Vec::new();
        for (step, id) in ids.iter().enumerate().filter(|(i, _)| i % 3 != 0) {
            assert!(index.withdraw(*id));
            live.retain(|f| f.reference != *id);
            if index.rebuild_due() {
                index.rebuild_now();
                rebuilds += 1;
                assert_eq!(index.tombstones(), 0);
                assert!(!index.rebuild_due());
            }
            assert_eq!(index.live_frames(), live.len());
            if step % 7 == 1 {
                for base in &bases {
                    let query = flip(&mut rng, base, 4);
                    index.search(&query, 31, &|_| true, &mut out);
                    assert_eq!(out, brute(&live, &query, 31, &|_| true), "step {step}");
                }
            }
            let frames = live.iter().filter(|f| f.reference == ids[0]).count();
            assert_eq!(index.reference_frame_count(ids[0], 0), Some(frames as u32));
        }
        assert!(rebuilds >= 2, "only {rebuilds} rebuilds");
        assert!(index.memory_bytes() > 0);
    }

    #[test]
    fn rebuild_after_many_withdrawals_keeps_results_identical() {
        rebuild_keeps_results(EngineKind::Exact, 400);
    }

    #[test]
    fn mih_rebuild_after_many_withdrawals_keeps_results_identical() {
        // Enough frames (about 9,000) that mih indexes them in tables rather than a tail.
        rebuild_keeps_results(EngineKind::Mih, 2000);
    }

    #[test]
    fn hnsw_rebuild_after_many_withdrawals_keeps_results_identical() {
        // Small: hnsw_rs is slow unoptimised.
        rebuild_keeps_results(EngineKind::Hnsw, 60);
    }

    #[test]
    fn search_order_is_distance_then_reference_then_frame() {
        let mut rng = StdRng::seed_from_u64(6);
        let hash = random_hash(&mut rng);
        let near = flip(&mut rng, &hash, 2);
        let mut index = FrameIndex::new(EngineKind::Exact, HnswParams::default());
        index.insert_reference(
            ReferenceId(9),
            BankId(0),
            &[frame(3, near, 90), frame(1, hash, 90)],
        );
        index.insert_reference(
            ReferenceId(2),
            BankId(0),
            &[frame(5, hash, 90), frame(4, hash, 90)],
        );
        let mut out = vec![Match {
            reference: ReferenceId(0),
            bank: BankId(0),
            frame: frame(0, hash, 0),
            distance: 0,
        }];
        index.search(&hash, 31, &|_| true, &mut out);
        let got: Vec<(u32, i64, u32)> = out
            .iter()
            .map(|m| (m.distance, m.reference.0, m.frame.frame_index))
            .collect();
        assert_eq!(got, [(0, 2, 4), (0, 2, 5), (0, 9, 1), (2, 9, 3)]);
    }
}
