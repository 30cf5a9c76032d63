//! The multi-signal seam (issue #12 item 3): one [`SignalIndex`] holds the PDQ
//! [`FrameIndex`] and one [`VectorIndex`] per embedding space, and [`SharedIndex`] shares it
//! between the request handlers and the background rebuilds (issue #12 item 4).
//!
//! Writes go to every signal at once: a reference is inserted into PDQ and into the space of each
//! of its vectors, or nowhere (PDQ's table decides, so a withdrawn id stays refused everywhere);
//! a withdrawal tombstones it in every signal.
//!
//! No pauses: writes never rebuild. [`SharedIndex::insert_reference`] and
//! [`SharedIndex::withdraw`] start a background thread when a signal's rebuild is due, which
//! follows the steps of `Rebuild` (see `super::Rebuild`): the live entries are copied out in
//! chunks under the read lock, the new engine is built with no lock held, references added
//! meanwhile are copied in, and a short write lock replays the withdrawals made meanwhile and
//! swaps the new index in. Searches see the old index until the swap and the new one after, and
//! both have every withdrawal applied: a withdrawn reference is never returned. The old index is
//! dropped after the lock is released.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{FrameIndex, Rebuild, VectorIndex, VectorParams, rebuild_in_place};
use crate::model::{
    BankId, FrameEmbedding, FrameSignal, IndexedEmbedding, IndexedFrame, Metric, ReferenceId,
};

/// Frames copied per read-lock hold while a PDQ rebuild snapshots the index (about 50 bytes
/// each: a few milliseconds).
const PDQ_CHUNK: usize = 65_536;
/// Vectors copied per read-lock hold (about 530 bytes each at 512 dimensions).
const VECTOR_CHUNK: usize = 8_192;
/// Catch-up rounds stop once a round copied fewer frames than this; the rest is copied under the
/// final write lock.
const CATCH_UP_SMALL: usize = 1_024;

/// One signal of the index.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Signal {
    /// The PDQ hashes.
    Pdq,
    /// The embedding space of this name.
    Space(String),
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Signal::Pdq => f.write_str("pdq"),
            Signal::Space(name) => write!(f, "embedding space {name:?}"),
        }
    }
}

/// A space declared again with another dimension or metric.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "embedding space {name:?} is indexed as {dimension} values compared by {metric}, not {asked_dimension} by {asked_metric}: a space name means one model server-wide"
)]
pub struct SpaceConflict {
    /// The space.
    pub name: String,
    /// Its dimension in the index.
    pub dimension: usize,
    /// Its metric in the index.
    pub metric: Metric,
    /// The dimension asked for.
    pub asked_dimension: usize,
    /// The metric asked for.
    pub asked_metric: Metric,
}

/// What one rebuild did and how long it held the locks.
#[derive(Clone, Debug, PartialEq)]
pub struct RebuildReport {
    /// The signal rebuilt.
    pub signal: Signal,
    /// Live entries in the new index.
    pub entries: usize,
    /// Tombstones dropped.
    pub tombstones_dropped: usize,
    /// Start to swap.
    pub elapsed: Duration,
    /// Longest time the rebuild held the write lock (searches and writes wait that long).
    pub longest_write_lock: Duration,
    /// Longest time it held the read lock at once (writes wait that long, and searches that
    /// arrive behind a waiting write).
    pub longest_read_lock: Duration,
    /// Heap bytes of the new index.
    pub memory_bytes: usize,
}

/// Every signal's index. See the module docs.
pub struct SignalIndex {
    pdq: FrameIndex,
    spaces: BTreeMap<String, VectorIndex>,
    vector_params: VectorParams,
}

impl fmt::Debug for SignalIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignalIndex")
            .field("pdq", &self.pdq)
            .field("spaces", &self.spaces)
            .finish_non_exhaustive()
    }
}

/// A fresh index being built by a rebuild.
enum Fresh {
    Pdq(FrameIndex),
    Space(VectorIndex),
}

impl Fresh {
    fn index_copied(&mut self) {
        match self {
            Fresh::Pdq(index) => index.index_copied(),
            Fresh::Space(index) => index.index_copied(),
        }
    }
}

impl SignalIndex {
    /// PDQ only so far; spaces are added by [`ensure_space`](Self::ensure_space) and get
    /// `vector_params`.
    pub fn new(pdq: FrameIndex, vector_params: VectorParams) -> Self {
        Self {
            pdq,
            spaces: BTreeMap::new(),
            vector_params,
        }
    }

    /// The PDQ index.
    pub fn pdq(&self) -> &FrameIndex {
        &self.pdq
    }

    /// The index of space `name`, if declared.
    pub fn space(&self, name: &str) -> Option<&VectorIndex> {
        self.spaces.get(name)
    }

    /// Every space's index, by name.
    pub fn spaces(&self) -> impl Iterator<Item = (&str, &VectorIndex)> {
        self.spaces
            .iter()
            .map(|(name, index)| (name.as_str(), index))
    }

    /// Distinct live frames of `reference` with quality >= `min_quality`, whichever signal
    /// matches them: the denominator of its percentage in a video verdict; `None` once it is
    /// unknown or withdrawn. PDQ's table knows every reference (one of vectors alone is recorded
    /// there without frames), so it answers for all signals.
    pub fn reference_frame_count(&self, reference: ReferenceId, min_quality: u8) -> Option<u32> {
        self.pdq.reference_frame_count(reference, min_quality)
    }

    /// The settings new spaces get (the server's `--vector-index`).
    pub fn vector_params(&self) -> VectorParams {
        self.vector_params
    }

    /// Declares space `name` with the settings new spaces get
    /// ([`vector_params`](Self::vector_params)); see [`ensure_space_with`](Self::ensure_space_with).
    pub fn ensure_space(
        &mut self,
        name: &str,
        dimension: usize,
        metric: Metric,
    ) -> Result<bool, SpaceConflict> {
        self.ensure_space_with(name, dimension, metric, self.vector_params)
    }

    /// Declares space `name` (idempotent) with index settings `params` (a space's stored ones);
    /// true if it is new. A known space with another dimension or metric is refused; a known
    /// space keeps the settings it was built with.
    pub fn ensure_space_with(
        &mut self,
        name: &str,
        dimension: usize,
        metric: Metric,
        params: VectorParams,
    ) -> Result<bool, SpaceConflict> {
        if let Some(index) = self.spaces.get(name) {
            if index.dimension() == dimension && index.metric() == metric {
                return Ok(false);
            }
            return Err(SpaceConflict {
                name: name.to_string(),
                dimension: index.dimension(),
                metric: index.metric(),
                asked_dimension: dimension,
                asked_metric: metric,
            });
        }
        self.spaces.insert(
            name.to_string(),
            VectorIndex::new(dimension, metric, params),
        );
        Ok(true)
    }

    /// Adds one reference: its PDQ frames and its vectors, each into the space it names.
    /// Idempotent per reference as [`FrameIndex::insert_reference`] (false for a known or
    /// withdrawn id, and then nothing is added anywhere). Vectors of undeclared spaces, of the
    /// wrong length or with non-finite values are skipped (the API refuses them before).
    pub fn insert_reference(
        &mut self,
        reference: ReferenceId,
        bank: BankId,
        frames: &[FrameSignal],
        embeddings: &[FrameEmbedding],
    ) -> bool {
        if !self.pdq.insert_reference(reference, bank, frames) {
            return false;
        }
        for (name, index) in &mut self.spaces {
            let vectors: Vec<&FrameEmbedding> =
                embeddings.iter().filter(|e| e.space == *name).collect();
            if !vectors.is_empty() {
                index.insert_reference(reference, bank, &vectors);
            }
        }
        true
    }

    /// Tombstones the reference in every signal; whether it was live (in PDQ's table, which
    /// knows every reference).
    pub fn withdraw(&mut self, reference: ReferenceId) -> bool {
        for index in self.spaces.values_mut() {
            index.withdraw(reference);
        }
        self.pdq.withdraw(reference)
    }

    /// Bulk load at start-up, as [`insert_reference`](Self::insert_reference) per reference.
    /// References with vectors but no PDQ frame are recorded in PDQ's table without frames.
    pub fn load(&mut self, frames: Vec<IndexedFrame>, embeddings: Vec<IndexedEmbedding>) {
        let fresh: Vec<ReferenceId> = {
            let mut ids: Vec<ReferenceId> = frames
                .iter()
                .map(|f| f.reference)
                .chain(embeddings.iter().map(|e| e.reference))
                .filter(|id| !self.pdq.is_known(*id))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        self.pdq.load(frames);
        let mut by_space: BTreeMap<&str, Vec<(ReferenceId, BankId, &FrameEmbedding)>> =
            BTreeMap::new();
        for e in &embeddings {
            if fresh.binary_search(&e.reference).is_err() {
                continue;
            }
            if !self.pdq.is_known(e.reference) {
                self.pdq.insert_reference(e.reference, e.bank, &[]);
            }
            by_space
                .entry(e.embedding.space.as_str())
                .or_default()
                .push((e.reference, e.bank, &e.embedding));
        }
        for (name, vectors) in by_space {
            match self.spaces.get_mut(name) {
                Some(index) => index.load(vectors),
                None => tracing::warn!(
                    space = name,
                    vectors = vectors.len(),
                    "vectors of an undeclared embedding space not indexed"
                ),
            }
        }
    }

    /// The signals whose rebuild is due (none while one runs).
    pub fn rebuilds_due(&self) -> Vec<Signal> {
        let mut due = Vec::new();
        if self.pdq.rebuild_due() {
            due.push(Signal::Pdq);
        }
        for (name, index) in &self.spaces {
            if index.rebuild_due() {
                due.push(Signal::Space(name.clone()));
            }
        }
        due
    }

    /// Rebuilds `signal` right here (whether due or not), under whatever lock the caller holds.
    pub fn rebuild_now(&mut self, signal: &Signal) {
        match signal {
            Signal::Pdq => rebuild_in_place(&mut self.pdq),
            Signal::Space(name) => {
                if let Some(index) = self.spaces.get_mut(name) {
                    rebuild_in_place(index);
                }
            }
        }
    }

    /// Heap bytes of every signal's index.
    pub fn memory_bytes(&self) -> usize {
        self.pdq.memory_bytes()
            + self
                .spaces
                .values()
                .map(VectorIndex::memory_bytes)
                .sum::<usize>()
    }

    fn begin(&mut self, signal: &Signal) -> Option<Fresh> {
        match signal {
            Signal::Pdq => self.pdq.begin_rebuild().map(Fresh::Pdq),
            Signal::Space(name) => self.spaces.get_mut(name)?.begin_rebuild().map(Fresh::Space),
        }
    }

    fn slots(&self, signal: &Signal) -> usize {
        match signal {
            Signal::Pdq => self.pdq.reference_slots(),
            Signal::Space(name) => self.spaces.get(name).map_or(0, |i| i.reference_slots()),
        }
    }

    fn tombstones(&self, signal: &Signal) -> usize {
        match signal {
            Signal::Pdq => self.pdq.tombstones(),
            Signal::Space(name) => self.spaces.get(name).map_or(0, VectorIndex::tombstones),
        }
    }

    /// Copies slots `from..` into `fresh` (up to about `budget` entries); the next slot and the
    /// entries copied.
    fn copy(&self, signal: &Signal, fresh: &mut Fresh, from: usize, budget: usize) -> usize {
        match (signal, fresh) {
            (Signal::Pdq, Fresh::Pdq(fresh)) => self.pdq.copy_live(fresh, from, budget),
            (Signal::Space(name), Fresh::Space(fresh)) => match self.spaces.get(name) {
                Some(index) => index.copy_live(fresh, from, budget),
                None => from,
            },
            _ => from,
        }
    }

    /// Swaps `fresh` in; the old index, to be dropped without the lock, and the new one's size.
    fn finish(
        &mut self,
        signal: &Signal,
        fresh: Fresh,
        from: usize,
    ) -> (Option<Fresh>, usize, usize) {
        match (signal, fresh) {
            (Signal::Pdq, Fresh::Pdq(fresh)) => {
                let old = self.pdq.finish_rebuild(fresh, from);
                (
                    Some(Fresh::Pdq(old)),
                    self.pdq.live_frames(),
                    self.pdq.memory_bytes(),
                )
            }
            (Signal::Space(name), Fresh::Space(fresh)) => match self.spaces.get_mut(name) {
                Some(index) => {
                    let old = index.finish_rebuild(fresh, from);
                    let (live, bytes) = (index.live_vectors(), index.memory_bytes());
                    (Some(Fresh::Space(old)), live, bytes)
                }
                None => (None, 0, 0),
            },
            _ => (None, 0, 0),
        }
    }
}

/// Rebuilds `signal` of the index behind `lock` without pausing it (module docs). `None` if a
/// rebuild of it was running already or the signal is unknown.
fn rebuild(lock: &RwLock<SignalIndex>, signal: &Signal) -> Option<RebuildReport> {
    let started = Instant::now();
    let mut longest_read = Duration::ZERO;
    let (mut fresh, tombstones) = {
        let mut index = lock.write();
        let held = Instant::now();
        let tombstones = index.tombstones(signal);
        let fresh = index.begin(signal);
        let write = held.elapsed();
        (fresh?, (tombstones, write))
    };
    let (tombstones, mut longest_write) = tombstones;
    let budget = match signal {
        Signal::Pdq => PDQ_CHUNK,
        Signal::Space(_) => VECTOR_CHUNK,
    };
    // Copy in chunks, each under its own read lock.
    let mut next = 0;
    let copy_round = |next: &mut usize, fresh: &mut Fresh, longest: &mut Duration| -> usize {
        let mut copied_slots = 0;
        loop {
            let index = lock.read();
            let held = Instant::now();
            if *next >= index.slots(signal) {
                break;
            }
            let after = index.copy(signal, fresh, *next, budget);
            copied_slots += after - *next;
            *next = after;
            *longest = (*longest).max(held.elapsed());
        }
        copied_slots
    };
    copy_round(&mut next, &mut fresh, &mut longest_read);
    fresh.index_copied();
    // References added while the engine was built: copy and index them unlocked too.
    for _ in 0..3 {
        let added = copy_round(&mut next, &mut fresh, &mut longest_read);
        fresh.index_copied();
        if added < CATCH_UP_SMALL {
            break;
        }
    }
    let (old, entries, memory_bytes) = {
        let mut index = lock.write();
        let held = Instant::now();
        let finished = index.finish(signal, fresh, next);
        longest_write = longest_write.max(held.elapsed());
        finished
    };
    drop(old);
    let report = RebuildReport {
        signal: signal.clone(),
        entries,
        tombstones_dropped: tombstones,
        elapsed: started.elapsed(),
        longest_write_lock: longest_write,
        longest_read_lock: longest_read,
        memory_bytes,
    };
    tracing::info!(
        signal = %report.signal,
        entries = report.entries,
        tombstones_dropped = report.tombstones_dropped,
        elapsed_ms = report.elapsed.as_millis() as u64,
        longest_write_lock_us = report.longest_write_lock.as_micros() as u64,
        longest_read_lock_us = report.longest_read_lock.as_micros() as u64,
        "index rebuilt in the background"
    );
    Some(report)
}

/// Runs every due rebuild, one after the other, until none is due.
fn rebuild_all(lock: &RwLock<SignalIndex>, reports: &Mutex<Vec<RebuildReport>>) {
    loop {
        let due = lock.read().rebuilds_due();
        let Some(signal) = due.into_iter().next() else {
            return;
        };
        match rebuild(lock, &signal) {
            Some(report) => reports.lock().push(report),
            None => return,
        }
    }
}

/// The index as the service shares it: [`SignalIndex`] behind a `parking_lot` read-write lock
/// (searches share the read lock), plus the background rebuilder. Cheap to clone.
#[derive(Clone)]
pub struct SharedIndex {
    inner: Arc<RwLock<SignalIndex>>,
    worker: Arc<Mutex<Option<JoinHandle<()>>>>,
    reports: Arc<Mutex<Vec<RebuildReport>>>,
}

impl fmt::Debug for SharedIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedIndex").finish_non_exhaustive()
    }
}

impl SharedIndex {
    /// Shares `index`.
    pub fn new(index: SignalIndex) -> Self {
        Self {
            inner: Arc::new(RwLock::new(index)),
            worker: Arc::new(Mutex::new(None)),
            reports: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The read lock: searches and counts. Hold it only inside synchronous code.
    pub fn read(&self) -> RwLockReadGuard<'_, SignalIndex> {
        self.inner.read()
    }

    /// The write lock, for changes not covered by the methods below. A change made through it
    /// does not start a due rebuild; call [`start_due_rebuilds`](Self::start_due_rebuilds).
    pub fn write(&self) -> RwLockWriteGuard<'_, SignalIndex> {
        self.inner.write()
    }

    /// [`SignalIndex::insert_reference`] under the write lock, then starts any rebuild due.
    pub fn insert_reference(
        &self,
        reference: ReferenceId,
        bank: BankId,
        frames: &[FrameSignal],
        embeddings: &[FrameEmbedding],
    ) -> bool {
        let inserted = self
            .inner
            .write()
            .insert_reference(reference, bank, frames, embeddings);
        self.start_due_rebuilds();
        inserted
    }

    /// [`SignalIndex::withdraw`] under the write lock (microseconds: it never rebuilds), then
    /// starts any rebuild due.
    pub fn withdraw(&self, reference: ReferenceId) -> bool {
        let withdrawn = self.inner.write().withdraw(reference);
        self.start_due_rebuilds();
        withdrawn
    }

    /// [`SignalIndex::load`] under the write lock, then starts any rebuild due.
    pub fn load(&self, frames: Vec<IndexedFrame>, embeddings: Vec<IndexedEmbedding>) {
        self.inner.write().load(frames, embeddings);
        self.start_due_rebuilds();
    }

    /// [`SignalIndex::ensure_space`] under the write lock.
    pub fn ensure_space(
        &self,
        name: &str,
        dimension: usize,
        metric: Metric,
    ) -> Result<bool, SpaceConflict> {
        self.inner.write().ensure_space(name, dimension, metric)
    }

    /// [`SignalIndex::ensure_space_with`] under the write lock.
    pub fn ensure_space_with(
        &self,
        name: &str,
        dimension: usize,
        metric: Metric,
        params: VectorParams,
    ) -> Result<bool, SpaceConflict> {
        self.inner
            .write()
            .ensure_space_with(name, dimension, metric, params)
    }

    /// Starts the background rebuilder if a rebuild is due and it is not running.
    pub fn start_due_rebuilds(&self) {
        if self.inner.read().rebuilds_due().is_empty() {
            return;
        }
        let mut worker = self.worker.lock();
        if worker.as_ref().is_some_and(|h| !h.is_finished()) {
            // The running one re-checks what is due before it ends.
            return;
        }
        if let Some(done) = worker.take() {
            let _ = done.join();
        }
        let (inner, reports) = (Arc::clone(&self.inner), Arc::clone(&self.reports));
        let spawned = std::thread::Builder::new()
            .name("index-rebuild".to_string())
            .spawn(move || rebuild_all(&inner, &reports));
        match spawned {
            Ok(handle) => *worker = Some(handle),
            Err(error) => tracing::error!(%error, "cannot start the index rebuild thread"),
        }
    }

    /// Waits until the background rebuilder has nothing left to do (tests, benchmarks, shutdown).
    pub fn wait_for_rebuilds(&self) {
        loop {
            let handle = self.worker.lock().take();
            match handle {
                Some(handle) => {
                    let _ = handle.join();
                }
                None => return,
            }
        }
    }

    /// Runs the due rebuilds on this thread, with the same locking as the background ones.
    pub fn rebuild_due_here(&self) {
        rebuild_all(&self.inner, &self.reports);
    }

    /// Rebuilds `signal` on this thread now, due or not, with the locking of the background
    /// rebuilds; `None` if it is unknown or being rebuilt already.
    pub fn rebuild_here(&self, signal: &Signal) -> Option<RebuildReport> {
        let report = rebuild(&self.inner, signal)?;
        self.reports.lock().push(report.clone());
        Some(report)
    }

    /// Reports of the rebuilds done so far, oldest first.
    pub fn rebuild_reports(&self) -> Vec<RebuildReport> {
        self.reports.lock().clone()
    }
}

#[cfg(test)]
mod tests;
