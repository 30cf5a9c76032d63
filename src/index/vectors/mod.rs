//! The index of one embedding space: every live reference frame's vector, searchable by score
//! (issue #11 item 2).
//!
//! Layout, as [`super::FrameIndex`]'s:
//! - [`VectorIndex`] owns per-entry metadata, the per-reference table (each reference one
//!   contiguous run of entry ids) and the tombstones;
//! - [`codes::Codes`] holds the vectors int8-quantised, `dimension + 4` bytes each;
//! - [`graph::Graph`], an HNSW graph built by hnsw_rs and flattened, covers entries
//!   `0..graph.len()`; entries added since (the *tail*) are scanned exactly. A space smaller than
//!   [`VectorParams::graph_min`] has no graph at all: the scan is the engine.
//!
//! Scores are `query · vector` (cosine spaces hold unit vectors, so that is their cosine) with the
//! query as 15-bit integers ([`codes::Query`], within 10^-5 of the f32 query) and the vector as
//! stored (int8), whether it was found through the graph or the scan, so [`VectorIndex::search_exact`] (the flat scan of every live entry) is the oracle of
//! [`VectorIndex::search`] up to the graph's recall.
//!
//! Withdrawal is a tombstone; a rebuild (background, see `super::signals`) drops the tombstones
//! and rebuilds the graph over everything. It is due when tombstones reach
//! [`super::REBUILD_FRACTION`] of the entries, when a space without a graph reaches
//! [`VectorParams::graph_min`], or when the tail outgrows [`TAIL_SHARE`].

use std::collections::HashMap;
use std::fmt;
use std::mem::size_of;
use std::sync::Arc;

use super::{
    BitSet, REBUILD_FRACTION, REBUILD_MIN_TOMBSTONES, Rebuild, RefEntry, entry_id, reserve,
};
use crate::model::{BankId, FrameEmbedding, Metric, ReferenceId};

pub mod codes;
pub mod graph;

use codes::{Codes, Query};
use graph::Graph;

/// A graph rebuild is due once the tail exceeds the graph over this (and [`TAIL_MIN`]).
pub const TAIL_SHARE: usize = 16;
/// The tail may always hold this many entries (a 4 MB scan at 512 dimensions).
pub const TAIL_MIN: usize = 8192;

pub use crate::model::{BadVectorParams, VectorParams};

/// One result: a reference frame scoring at least the minimum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VectorMatch {
    /// The reference the frame belongs to.
    pub reference: ReferenceId,
    /// That reference's bank.
    pub bank: BankId,
    /// The reference frame's index.
    pub frame_index: u32,
    /// Its presentation time.
    pub timestamp_ms: u64,
    /// `query · vector`: the cosine for a cosine space.
    pub score: f32,
}

/// Per-entry metadata. 16 bytes.
#[derive(Clone, Copy, Debug)]
struct Entry {
    timestamp_ms: u64,
    frame_index: u32,
    slot: u32,
}

/// The index of one embedding space. See the module docs.
pub struct VectorIndex {
    dimension: usize,
    metric: Metric,
    params: VectorParams,
    /// Shared with a graph build while one runs on this (fresh) index; pushes copy-on-write.
    codes: Arc<Codes>,
    entries: Vec<Entry>,
    graph: Graph,
    tombstoned: BitSet,
    tombstones: usize,
    references: Vec<RefEntry>,
    slots: HashMap<ReferenceId, u32>,
    live_references: usize,
    /// Withdrawals since a background rebuild started (`Some` while one runs).
    journal: Option<Vec<ReferenceId>>,
    rebuild_min_tombstones: usize,
}

impl fmt::Debug for VectorIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VectorIndex")
            .field("dimension", &self.dimension)
            .field("metric", &self.metric)
            .field("entries", &self.entries.len())
            .field("graph", &self.graph.len())
            .field("tombstones", &self.tombstones)
            .finish_non_exhaustive()
    }
}

impl VectorIndex {
    /// An empty index of `dimension`-value vectors.
    pub fn new(dimension: usize, metric: Metric, params: VectorParams) -> Self {
        Self {
            dimension,
            metric,
            params,
            codes: Arc::new(Codes::new(dimension)),
            entries: Vec::new(),
            graph: Graph::default(),
            tombstoned: BitSet::default(),
            tombstones: 0,
            references: Vec::new(),
            slots: HashMap::new(),
            live_references: 0,
            journal: None,
            rebuild_min_tombstones: REBUILD_MIN_TOMBSTONES,
        }
    }

    /// The vector length.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// The metric.
    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// The settings.
    pub fn params(&self) -> VectorParams {
        self.params
    }

    /// Changes the search beam width (at least 1) without a rebuild: the graph does not depend
    /// on it (`cargo bench --bench vectors` sweeps it on one built index).
    pub fn set_ef_search(&mut self, ef_search: usize) {
        self.params.ef_search = ef_search.max(1);
    }

    /// `"graph"` once a graph covers the space, `"flat"` while the scan serves it alone.
    pub fn engine_name(&self) -> &'static str {
        if self.graph.is_empty() {
            "flat"
        } else {
            "graph"
        }
    }

    /// Adds the vectors of one reference (those of the wrong length or with a non-finite value
    /// are skipped: the API refuses them before). Idempotent per reference, as
    /// [`super::FrameIndex::insert_reference`]: false for a known or withdrawn id.
    pub fn insert_reference(
        &mut self,
        reference: ReferenceId,
        bank: BankId,
        vectors: &[&FrameEmbedding],
    ) -> bool {
        if self.slots.contains_key(&reference) {
            return false;
        }
        let valid = |e: &&&FrameEmbedding| {
            e.vector.len() == self.dimension && e.vector.iter().all(|x| x.is_finite())
        };
        let count = vectors.iter().filter(valid).count();
        let slot = entry_id(self.references.len());
        let first = entry_id(self.entries.len());
        reserve(&mut self.entries, count);
        let codes = Arc::make_mut(&mut self.codes);
        codes.reserve(count);
        for embedding in vectors.iter().filter(valid) {
            codes.push(&embedding.vector);
            self.entries.push(Entry {
                timestamp_ms: embedding.timestamp_ms,
                frame_index: embedding.frame_index,
                slot,
            });
        }
        self.references.push(RefEntry {
            id: reference,
            bank,
            first,
            count: entry_id(count),
            active: true,
        });
        self.slots.insert(reference, slot);
        self.live_references += 1;
        true
    }

    /// Bulk load: as [`insert_reference`](Self::insert_reference) per reference (grouped by
    /// reference, order kept within one), then, when the space was empty and is now at least
    /// [`VectorParams::graph_min`], the graph is built right away (on all cores).
    pub fn load(&mut self, mut vectors: Vec<(ReferenceId, BankId, &FrameEmbedding)>) {
        let was_empty = self.entries.is_empty();
        vectors.sort_by_key(|(reference, _, _)| *reference);
        let mut rest = vectors.as_slice();
        while let Some(&(reference, bank, _)) = rest.first() {
            let run = rest
                .iter()
                .position(|(r, _, _)| *r != reference)
                .unwrap_or(rest.len());
            let (group, tail) = rest.split_at(run);
            let group: Vec<&FrameEmbedding> = group.iter().map(|(_, _, e)| *e).collect();
            self.insert_reference(reference, bank, &group);
            rest = tail;
        }
        if was_empty && self.entries.len() >= self.params.graph_min.max(1) {
            self.build_graph();
        }
    }

    /// Builds the graph over every entry (the tail becomes empty).
    fn build_graph(&mut self) {
        self.graph = Graph::build(
            Arc::clone(&self.codes),
            self.params.max_connections,
            self.params.ef_construction,
        );
    }

    /// Tombstones every vector of the reference; whether it was present and active. Unlike
    /// [`super::FrameIndex::withdraw`] an unknown id is not remembered: [`super::SignalIndex`]
    /// asks the PDQ index, which does remember, before inserting anywhere.
    pub fn withdraw(&mut self, reference: ReferenceId) -> bool {
        let Some(&slot) = self.slots.get(&reference) else {
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
        if let Some(journal) = &mut self.journal {
            journal.push(reference);
        }
        true
    }

    /// The entry as a match if it is live and its bank passes.
    fn matched(
        &self,
        id: u32,
        score: f32,
        bank_filter: &dyn Fn(BankId) -> bool,
    ) -> Option<VectorMatch> {
        if self.tombstoned.contains(id) {
            return None;
        }
        let entry = self.entries.get(id as usize)?;
        let reference = self.references.get(entry.slot as usize)?;
        if !bank_filter(reference.bank) {
            return None;
        }
        Some(VectorMatch {
            reference: reference.id,
            bank: reference.bank,
            frame_index: entry.frame_index,
            timestamp_ms: entry.timestamp_ms,
            score,
        })
    }

    /// Scans entries `from..` exactly, pushing live matches scoring at least `min_score`.
    fn scan(
        &self,
        query: &Query,
        from: usize,
        min_score: f32,
        bank_filter: &dyn Fn(BankId) -> bool,
        out: &mut Vec<VectorMatch>,
    ) {
        for id in from as u32..self.entries.len() as u32 {
            let score = self.codes.score_query(query, id);
            if score >= min_score
                && let Some(m) = self.matched(id, score, bank_filter)
            {
                out.push(m);
            }
        }
    }

    /// The `k` best live reference frames scoring at least `min_score` against `query` whose
    /// bank passes `bank_filter`, written to `out` (cleared first), best first (ties by
    /// reference, then frame index). Approximate where the graph serves (recall measured in the
    /// tests and `cargo bench --bench vectors`); exact on the tail and in spaces without a graph.
    /// A query of the wrong length finds nothing.
    ///
    /// When tombstones or the bank filter reject some of the graph's candidates and fewer than
    /// `k` remain, the beam is widened (up to four times, each time 4x).
    pub fn search(
        &self,
        query: &[f32],
        min_score: f32,
        k: usize,
        bank_filter: &dyn Fn(BankId) -> bool,
        out: &mut Vec<VectorMatch>,
    ) {
        out.clear();
        if query.len() != self.dimension || k == 0 {
            return;
        }
        let query = &Query::new(query);
        if !self.graph.is_empty() {
            let mut ef = self.params.ef_search.max(k);
            let mut candidates = Vec::new();
            for _ in 0..5 {
                out.clear();
                self.graph
                    .search_query(&self.codes, query, ef, &mut candidates);
                let mut rejected = false;
                for &(id, score) in &candidates {
                    if score < min_score {
                        break;
                    }
                    match self.matched(id, score, bank_filter) {
                        Some(m) => out.push(m),
                        None => rejected = true,
                    }
                }
                let exhausted = candidates.len() < ef || ef >= self.graph.len();
                if out.len() >= k || !rejected || exhausted {
                    break;
                }
                ef = ef.saturating_mul(4).min(self.graph.len());
            }
        }
        self.scan(query, self.graph.len(), min_score, bank_filter, out);
        sort_and_truncate(out, k);
    }

    /// The exact answer [`search`](Self::search) approximates: every live entry scanned.
    pub fn search_exact(
        &self,
        query: &[f32],
        min_score: f32,
        k: usize,
        bank_filter: &dyn Fn(BankId) -> bool,
        out: &mut Vec<VectorMatch>,
    ) {
        out.clear();
        if query.len() != self.dimension || k == 0 {
            return;
        }
        self.scan(&Query::new(query), 0, min_score, bank_filter, out);
        sort_and_truncate(out, k);
    }

    /// Vectors not tombstoned.
    pub fn live_vectors(&self) -> usize {
        self.entries.len() - self.tombstones
    }

    /// References inserted and not withdrawn.
    pub fn live_references(&self) -> usize {
        self.live_references
    }

    /// Withdrawn vectors still held, awaiting the next rebuild.
    pub fn tombstones(&self) -> usize {
        self.tombstones
    }

    /// Entries covered by the graph (0 while the scan serves alone).
    pub fn graph_len(&self) -> usize {
        self.graph.len()
    }

    /// Mean layer-0 links per graph node.
    pub fn graph_mean_degree(&self) -> f64 {
        self.graph.mean_degree()
    }

    /// Heap bytes: codes, metadata, graph, tombstones, reference table and its map.
    pub fn memory_bytes(&self) -> usize {
        let buckets = (self.slots.capacity() * 8).div_ceil(7).next_power_of_two();
        let map = if self.slots.capacity() == 0 {
            0
        } else {
            buckets * (size_of::<(ReferenceId, u32)>() + 1)
        };
        self.codes.memory_bytes()
            + self.entries.capacity() * size_of::<Entry>()
            + self.graph.memory_bytes()
            + self.tombstoned.memory_bytes()
            + self.references.capacity() * size_of::<RefEntry>()
            + map
    }

    /// Lowers the tombstone floor of [`Rebuild::rebuild_due`] (tests).
    #[cfg(test)]
    pub(crate) fn set_rebuild_min_tombstones(&mut self, min: usize) {
        self.rebuild_min_tombstones = min;
    }
}

fn sort_and_truncate(out: &mut Vec<VectorMatch>, k: usize) {
    out.sort_unstable_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(a.reference.cmp(&b.reference))
            .then(a.frame_index.cmp(&b.frame_index))
            .then(a.timestamp_ms.cmp(&b.timestamp_ms))
    });
    out.truncate(k);
}

impl Rebuild for VectorIndex {
    fn rebuild_due(&self) -> bool {
        if self.journal.is_some() {
            return false;
        }
        let entries = self.entries.len();
        let tombstoned = self.tombstones >= self.rebuild_min_tombstones
            && self.tombstones as f64 >= REBUILD_FRACTION * entries as f64;
        let live = entries - self.tombstones;
        let graph = if self.graph.is_empty() {
            live >= self.params.graph_min.max(1)
        } else {
            entries - self.graph.len() > TAIL_MIN.max(self.graph.len() / TAIL_SHARE)
        };
        tombstoned || graph
    }

    fn begin_rebuild(&mut self) -> Option<Self> {
        if self.journal.is_some() {
            return None;
        }
        self.journal = Some(Vec::new());
        let mut fresh = VectorIndex::new(self.dimension, self.metric, self.params);
        fresh.rebuild_min_tombstones = self.rebuild_min_tombstones;
        Some(fresh)
    }

    fn reference_slots(&self) -> usize {
        self.references.len()
    }

    fn copy_live(&self, fresh: &mut Self, from: usize, budget: usize) -> usize {
        let mut copied = 0;
        let mut slot = from;
        let codes = Arc::make_mut(&mut fresh.codes);
        while let Some(reference) = self.references.get(slot) {
            if copied >= budget {
                break;
            }
            let new_slot = entry_id(fresh.references.len());
            let first = entry_id(fresh.entries.len());
            let count = if reference.active { reference.count } else { 0 };
            for id in reference.first..reference.first + count {
                if let Some(entry) = self.entries.get(id as usize) {
                    codes.push_from(&self.codes, id);
                    fresh.entries.push(Entry {
                        slot: new_slot,
                        ..*entry
                    });
                }
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
        if self.graph.is_empty() && self.entries.len() >= self.params.graph_min.max(1) {
            self.build_graph();
        }
    }

    fn finish_rebuild(&mut self, mut fresh: Self, from: usize) -> Self {
        let slots = self.references.len();
        self.copy_live(&mut fresh, from, usize::MAX);
        debug_assert_eq!(fresh.references.len(), slots);
        fresh.index_copied();
        for reference in self.journal.take().unwrap_or_default() {
            fresh.withdraw(reference);
        }
        std::mem::replace(self, fresh)
    }
}

#[cfg(test)]
mod tests;
