//! Matching: one query frame against the index, and a stream's frames aggregated into per-reference
//! video verdicts by vPDQ's rules (shared/PDQ.md §2.3, DESIGN.md §4).
//!
//! Rules, in python-threatexchange form:
//! - upload frames are deduplicated by exact hash (first occurrence kept) and then filtered by
//!   quality; what remains is the denominator of the query percentage;
//! - reference frames were deduplicated by the store; those of quality >= the minimum are the
//!   denominator of the reference percentage;
//! - a frame counts as matched when some frame on the other side is within the distance.
//!
//! Embeddings (issue #11) are a second signal beside PDQ: an upload frame may carry vectors of
//! named embedding spaces, and a reference frame matches it by a space when their score reaches
//! the reference's bank's threshold for that space. A frame counts as matched when any signal
//! matches; the percentages, the run rule and early final verdicts count frames, not signals, so
//! they combine signals with no rule of their own. Two refinements keep the PDQ rules whole:
//! - an upload frame whose PDQ quality is below the minimum is not searched by any signal (a flat
//!   or dark frame has a confident but meaningless descriptor); a frame that carries only
//!   vectors (a client that computed them itself and sent no PDQ) is searched by its vectors and
//!   is never deduplicated;
//! - a reference frame reached by a vector counts only when its own PDQ quality passes, so the
//!   reference percentage keeps its denominator.
//!
//! Nothing here knows about tonic or the store: the API layer feeds frames in and turns the
//! results into wire messages.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::hash::border::Rect;
use crate::hash::pdq::Dihedral;
use crate::hash::{DEFAULT_MAX_DISTANCE, DEFAULT_MIN_QUALITY, PdqHash};
use crate::index::{FrameIndex, Match, SignalIndex, VectorMatch};
use crate::model::{BankId, FrameSignal, ReferenceId};

/// Most reference frames one vector search returns (before the bank thresholds): the k of the
/// k-nearest-neighbour search in an embedding space.
pub const VECTOR_SEARCH_K: usize = 32;

/// What the matcher asks of the index, one call per signal: the seam between matching and the
/// index engines (PDQ in [`FrameIndex`], embedding spaces beside it).
pub trait SignalSearch {
    /// Live PDQ frames within `max_distance` of `query` in banks `bank_filter` accepts, into
    /// `out` (cleared first), nearest first.
    fn search_pdq(
        &self,
        query: &PdqHash,
        max_distance: u32,
        bank_filter: &dyn Fn(BankId) -> bool,
        out: &mut Vec<Match>,
    );

    /// The best (at most `k`) live reference frames of space `space` scoring at least
    /// `min_score` against `query`, in banks `bank_filter` accepts, into `out` (cleared first),
    /// best first. A space the index does not hold finds nothing.
    fn search_space(
        &self,
        space: &str,
        query: &[f32],
        min_score: f32,
        k: usize,
        bank_filter: &dyn Fn(BankId) -> bool,
        out: &mut Vec<VectorMatch>,
    );

    /// The live PDQ frame `frame_index` of `reference`, if any (for a frame a vector reached).
    fn reference_frame(&self, reference: ReferenceId, frame_index: u32) -> Option<FrameSignal>;
}

impl SignalSearch for FrameIndex {
    fn search_pdq(
        &self,
        query: &PdqHash,
        max_distance: u32,
        bank_filter: &dyn Fn(BankId) -> bool,
        out: &mut Vec<Match>,
    ) {
        self.search(query, max_distance, bank_filter, out);
    }

    fn search_space(
        &self,
        _space: &str,
        _query: &[f32],
        _min_score: f32,
        _k: usize,
        _bank_filter: &dyn Fn(BankId) -> bool,
        out: &mut Vec<VectorMatch>,
    ) {
        // A PDQ-only index holds no embedding space.
        out.clear();
    }

    fn reference_frame(&self, reference: ReferenceId, frame_index: u32) -> Option<FrameSignal> {
        FrameIndex::reference_frame(self, reference, frame_index)
    }
}

impl SignalSearch for SignalIndex {
    fn search_pdq(
        &self,
        query: &PdqHash,
        max_distance: u32,
        bank_filter: &dyn Fn(BankId) -> bool,
        out: &mut Vec<Match>,
    ) {
        self.pdq().search(query, max_distance, bank_filter, out);
    }

    fn search_space(
        &self,
        space: &str,
        query: &[f32],
        min_score: f32,
        k: usize,
        bank_filter: &dyn Fn(BankId) -> bool,
        out: &mut Vec<VectorMatch>,
    ) {
        match self.space(space) {
            Some(index) => index.search(query, min_score, k, bank_filter, out),
            None => out.clear(),
        }
    }

    fn reference_frame(&self, reference: ReferenceId, frame_index: u32) -> Option<FrameSignal> {
        self.pdq().reference_frame(reference, frame_index)
    }
}

/// The banks of a stream's scope that hold one embedding space, with their thresholds.
#[derive(Clone, Debug, PartialEq)]
pub struct SpaceScope {
    /// The space's name.
    pub space: Arc<str>,
    /// Its vector length.
    pub dimension: u32,
    /// How its vectors compare (client vectors of cosine spaces are normalised before search).
    pub metric: crate::model::Metric,
    /// Each bank in scope that declares the space, with its threshold.
    pub thresholds: HashMap<BankId, f32>,
}

impl SpaceScope {
    /// The lowest threshold of the banks in scope: the floor of the search.
    pub fn min_threshold(&self) -> f32 {
        self.thresholds
            .values()
            .copied()
            .fold(f32::INFINITY, f32::min)
    }
}

/// How a stream (or one image) is matched.
#[derive(Clone, Debug, PartialEq)]
pub struct MatchParams {
    /// Largest distance, in bits, that counts as a frame match.
    pub max_distance: u32,
    /// Frames of lower quality, on either side, never match.
    pub min_quality: u8,
    /// Also search with the 7 other dihedral variants of each upload frame.
    pub dihedral: bool,
    /// Verdict threshold on the share of upload frames matched, in percent.
    pub query_threshold_pct: f64,
    /// Verdict threshold on the share of reference frames matched, in percent.
    pub reference_threshold_pct: f64,
    /// Most matches reported per frame (verdicts count them all).
    pub max_matches_per_frame: usize,
    /// Frames the client said it will send, if it knows.
    pub expected_frames: Option<u32>,
    /// Shortest in-order run, in milliseconds, that counts as a match on its own (0: rule off).
    pub min_run_ms: u64,
    /// The embedding spaces the banks in scope declare (empty: PDQ only).
    pub spaces: Vec<SpaceScope>,
}

impl MatchParams {
    /// The scope of space `name`, if a bank in scope declares it.
    pub fn space(&self, name: &str) -> Option<&SpaceScope> {
        self.spaces.iter().find(|s| &*s.space == name)
    }
}

impl Default for MatchParams {
    fn default() -> Self {
        Self {
            max_distance: DEFAULT_MAX_DISTANCE,
            min_quality: DEFAULT_MIN_QUALITY,
            dihedral: false,
            // python-threatexchange / HMA defaults (shared/PDQ.md §2.3).
            query_threshold_pct: 80.0,
            reference_threshold_pct: 0.0,
            max_matches_per_frame: 10,
            expected_frames: None,
            min_run_ms: 5000,
            spaces: Vec::new(),
        }
    }
}

/// The hashes one upload frame is searched with: the original, or all 8 dihedral variants, of the
/// whole picture and, when it has uniform borders, of its content area.
#[derive(Clone, Debug)]
pub struct QueryFrame {
    /// Index and timestamp as sent, the original hash and its quality.
    pub signal: FrameSignal,
    /// The 8 variants in [`Dihedral::ALL`] order when dihedral matching is on.
    pub variants: Option<[PdqHash; 8]>,
    /// The content area's signal, when the picture has uniform borders.
    pub content: Option<ContentSignal>,
    /// Whether the frame has a PDQ signal at all: false for a frame that carried only vectors
    /// (then `signal` holds its index and timestamp, and a zero hash that is never searched).
    pub has_pdq: bool,
    /// Its vectors in embedding spaces, sent by the client or computed by the server.
    pub embeddings: Vec<QueryEmbedding>,
}

/// One vector an upload frame is searched with.
#[derive(Clone, Debug, PartialEq)]
pub struct QueryEmbedding {
    /// The space's name.
    pub space: Arc<str>,
    /// The vector (L2-normalised for cosine spaces).
    pub vector: Vec<f32>,
    /// The vector is of the frame's content area inside uniform borders, not the whole picture.
    pub content_area: bool,
    /// The vector is of this window of the picture (`--embedding-windows`), not the whole of it.
    pub window: Option<Rect>,
}

impl QueryFrame {
    /// Whether the frame is worth searching at `min_quality`: it carries only vectors, or its
    /// whole picture or its content area has a good PDQ quality.
    pub fn searchable(&self, min_quality: u8) -> bool {
        !self.has_pdq
            || self.signal.quality >= min_quality
            || self.content.is_some_and(|c| c.quality >= min_quality)
    }

    /// A frame known by its PDQ signal only.
    pub fn pdq(signal: FrameSignal) -> Self {
        Self {
            signal,
            variants: None,
            content: None,
            has_pdq: true,
            embeddings: Vec::new(),
        }
    }
}

/// Which signal made a hit.
#[derive(Clone, Debug, PartialEq)]
pub enum HitSignal {
    /// PDQ: the hit's `distance`, `dihedral` and `content_area` say how.
    Pdq,
    /// A vector of an embedding space.
    Embedding {
        /// The space's name.
        space: Arc<str>,
        /// The score of the two vectors (higher is closer).
        score: f32,
    },
}

/// The PDQ of a frame's content area inside uniform borders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentSignal {
    /// The hash.
    pub hash: PdqHash,
    /// Its quality.
    pub quality: u8,
    /// Its 8 variants when dihedral matching is on.
    pub variants: Option<[PdqHash; 8]>,
}

/// One reference frame within the distance of an upload frame, or reached by one of its vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameHit {
    /// The matched reference.
    pub reference: ReferenceId,
    /// Its bank.
    pub bank: BankId,
    /// The matched reference frame.
    pub reference_frame: FrameSignal,
    /// Hamming distance in bits.
    pub distance: u32,
    /// Which variant of the upload frame matched.
    pub dihedral: Dihedral,
    /// The upload frame's content-area hash (or vector) made the match.
    pub content_area: bool,
    /// The vector of this window of the upload picture made the match.
    pub window: Option<Rect>,
    /// The signal that matched: for embeddings `distance` is 0 and `dihedral` the original.
    pub signal: HitSignal,
}

/// Searches the index for one upload frame, by every signal it has.
///
/// Returns every live reference frame of good quality within the distance, in a bank that
/// `bank_filter` accepts, nearest first; then the reference frames its vectors reached at or
/// above their bank's threshold, best score first. With several variants, a reference frame
/// reached by more than one keeps its smallest distance (the original wins ties); by vectors, its
/// best score. Low-quality upload frames are not searched: the result is empty. The content-area
/// signal, when present, is searched too.
pub fn search_frame(
    index: &dyn SignalSearch,
    query: &QueryFrame,
    params: &MatchParams,
    bank_filter: &dyn Fn(BankId) -> bool,
) -> Vec<FrameHit> {
    let mut hits = search_pdq(index, query, params, bank_filter);
    if query.searchable(params.min_quality) {
        hits.extend(search_vectors(index, query, params, bank_filter));
    }
    hits
}

/// The PDQ part of [`search_frame`].
fn search_pdq(
    index: &dyn SignalSearch,
    query: &QueryFrame,
    params: &MatchParams,
    bank_filter: &dyn Fn(BankId) -> bool,
) -> Vec<FrameHit> {
    let full = [query.signal.hash];
    let content = query.content.map(|c| [c.hash]);
    let mut searches: Vec<(&[PdqHash], bool)> = Vec::with_capacity(2);
    if query.has_pdq && query.signal.quality >= params.min_quality {
        searches.push((query.variants.as_ref().map_or(&full[..], |v| &v[..]), false));
    }
    if let (Some(signal), Some(content)) = (&query.content, &content)
        && signal.quality >= params.min_quality
    {
        searches.push((
            signal.variants.as_ref().map_or(&content[..], |v| &v[..]),
            true,
        ));
    }
    let mut best: HashMap<(ReferenceId, u32), FrameHit> = HashMap::new();
    let mut found: Vec<Match> = Vec::new();
    for (hashes, content_area) in searches {
        for (variant_hash, dihedral) in hashes.iter().zip(Dihedral::ALL) {
            index.search_pdq(variant_hash, params.max_distance, bank_filter, &mut found);
            for m in found
                .iter()
                .filter(|m| m.frame.quality >= params.min_quality)
            {
                let hit = FrameHit {
                    reference: m.reference,
                    bank: m.bank,
                    reference_frame: m.frame,
                    distance: m.distance,
                    dihedral,
                    content_area,
                    window: None,
                    signal: HitSignal::Pdq,
                };
                match best.entry((m.reference, m.frame.frame_index)) {
                    Entry::Vacant(slot) => {
                        slot.insert(hit);
                    }
                    Entry::Occupied(mut slot) => {
                        if hit.distance < slot.get().distance {
                            slot.insert(hit);
                        }
                    }
                }
            }
        }
    }
    let mut hits: Vec<FrameHit> = best.into_values().collect();
    hits.sort_by_key(|h| {
        (
            h.distance,
            h.reference,
            h.reference_frame.frame_index,
            h.dihedral as u8,
        )
    });
    hits
}

/// The embedding part of [`search_frame`]: each vector of the frame in its space, kept where the
/// score reaches the threshold of the reference's bank. A reference frame reached by several
/// vectors (the whole picture and its content area, or several spaces) keeps its best score.
fn search_vectors(
    index: &dyn SignalSearch,
    query: &QueryFrame,
    params: &MatchParams,
    bank_filter: &dyn Fn(BankId) -> bool,
) -> Vec<FrameHit> {
    let mut best: HashMap<(ReferenceId, u32), FrameHit> = HashMap::new();
    let mut found: Vec<VectorMatch> = Vec::new();
    for embedding in &query.embeddings {
        let Some(scope) = params.space(&embedding.space) else {
            continue;
        };
        let in_scope = |bank: BankId| scope.thresholds.contains_key(&bank) && bank_filter(bank);
        index.search_space(
            &embedding.space,
            &embedding.vector,
            scope.min_threshold(),
            VECTOR_SEARCH_K,
            &in_scope,
            &mut found,
        );
        for v in &found {
            if scope.thresholds.get(&v.bank).is_none_or(|&t| v.score < t) {
                continue;
            }
            // A frame the PDQ side knows keeps its quality rule; one it does not know (a
            // reference of vectors alone) counts as it is.
            let frame = index
                .reference_frame(v.reference, v.frame_index)
                .unwrap_or(FrameSignal {
                    frame_index: v.frame_index,
                    timestamp_ms: v.timestamp_ms,
                    hash: PdqHash::default(),
                    quality: 100,
                });
            if frame.quality < params.min_quality {
                continue;
            }
            let hit = FrameHit {
                reference: v.reference,
                bank: v.bank,
                reference_frame: frame,
                distance: 0,
                dihedral: Dihedral::Original,
                content_area: embedding.content_area,
                window: embedding.window,
                signal: HitSignal::Embedding {
                    space: Arc::clone(&embedding.space),
                    score: v.score,
                },
            };
            match best.entry((v.reference, v.frame_index)) {
                Entry::Vacant(slot) => {
                    slot.insert(hit);
                }
                Entry::Occupied(mut slot) => {
                    if hit_score(&hit) > hit_score(slot.get()) {
                        slot.insert(hit);
                    }
                }
            }
        }
    }
    let mut hits: Vec<FrameHit> = best.into_values().collect();
    hits.sort_by(|a, b| {
        hit_score(b)
            .total_cmp(&hit_score(a))
            .then(a.reference.cmp(&b.reference))
            .then(
                a.reference_frame
                    .frame_index
                    .cmp(&b.reference_frame.frame_index),
            )
    });
    hits
}

/// A vector hit's score (PDQ hits score nothing).
fn hit_score(hit: &FrameHit) -> f32 {
    match hit.signal {
        HitSignal::Embedding { score, .. } => score,
        HitSignal::Pdq => f32::NEG_INFINITY,
    }
}

/// Upload frames a run may skip (no hit, low quality) and still go on: "a few missed frames".
pub const RUN_MAX_MISSED_FRAMES: u32 = 3;
/// Speed change a run tolerates between upload and reference: ±25 %.
pub const RUN_SPEED_TOLERANCE: f64 = 0.25;
/// Timing slack on top of the speed tolerance, in milliseconds: frames sampled once a second on
/// each side can be up to half a second off the other side's sampling grid.
pub const RUN_SLACK_MS: f64 = 600.0;
/// Candidate alignments followed per reference at once.
const MAX_CHAINS_PER_REFERENCE: usize = 4;

/// A stretch of upload frames matching a stretch of a reference, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// First upload frame's timestamp.
    pub query_start_ms: u64,
    /// Last upload frame's timestamp.
    pub query_end_ms: u64,
    /// Reference timestamp matched by the first upload frame.
    pub reference_start_ms: u64,
    /// Reference timestamp matched by the last upload frame.
    pub reference_end_ms: u64,
    /// Upload frames in the run.
    pub frames: u32,
}

impl Run {
    /// The run's length on the upload's clock.
    pub fn duration_ms(&self) -> u64 {
        self.query_end_ms.saturating_sub(self.query_start_ms)
    }
}

/// One alignment being followed: a run plus the ordinal of its last upload frame.
#[derive(Clone, Copy, Debug)]
struct Chain {
    run: Run,
    last_ordinal: u32,
}

impl Chain {
    /// Whether an upload frame at `ordinal`/`query_ms` matching reference time `reference_ms`
    /// continues this chain: not too many frames skipped, and the reference advanced about as much
    /// as the upload did (speed within ±25 %, plus sampling slack).
    fn accepts(&self, ordinal: u32, query_ms: u64, reference_ms: u64) -> bool {
        if ordinal <= self.last_ordinal
            || ordinal - self.last_ordinal > RUN_MAX_MISSED_FRAMES + 1
            || query_ms < self.run.query_end_ms
        {
            return false;
        }
        let dq = (query_ms - self.run.query_end_ms) as f64;
        let dr = reference_ms as f64 - self.run.reference_end_ms as f64;
        dr >= dq * (1.0 - RUN_SPEED_TOLERANCE) - RUN_SLACK_MS
            && dr <= dq * (1.0 + RUN_SPEED_TOLERANCE) + RUN_SLACK_MS
    }
}

/// Per-reference tally within one stream.
#[derive(Clone, Debug)]
struct Tally {
    bank: BankId,
    /// Distinct good-quality frames of the reference (the reference % denominator), read once.
    reference_total: u32,
    /// Distinct good-quality upload hashes that matched this reference.
    query_frames_matched: u32,
    /// Distinct reference frames (by index; the store keeps one frame per distinct hash) matched.
    reference_frames_matched: BTreeSet<u32>,
    /// Alignments being followed for the temporal rule.
    chains: Vec<Chain>,
    /// The longest run seen so far.
    best_run: Option<Run>,
    /// The last decision sent to the client, and whether it was final.
    announced: Option<(bool, bool)>,
}

impl Tally {
    /// Extends the alignments with one upload frame's matched reference timestamps.
    fn extend_runs(&mut self, ordinal: u32, query_ms: u64, reference_times: &[u64]) {
        self.chains
            .retain(|c| ordinal - c.last_ordinal <= RUN_MAX_MISSED_FRAMES + 1);
        let mut used = vec![false; reference_times.len()];
        for chain in &mut self.chains {
            // Of the reference times that continue this chain, take the one nearest the
            // prediction (same speed).
            let predicted =
                chain.run.reference_end_ms as f64 + (query_ms - chain.run.query_end_ms) as f64;
            let best = reference_times
                .iter()
                .enumerate()
                .filter(|&(_, &r)| chain.accepts(ordinal, query_ms, r))
                .min_by(|a, b| {
                    (*a.1 as f64 - predicted)
                        .abs()
                        .total_cmp(&(*b.1 as f64 - predicted).abs())
                });
            if let Some((i, &reference_ms)) = best {
                used[i] = true;
                chain.run.query_end_ms = query_ms;
                chain.run.reference_end_ms = reference_ms;
                chain.run.frames = chain.run.frames.saturating_add(1);
                chain.last_ordinal = ordinal;
            }
        }
        for (i, &reference_ms) in reference_times.iter().enumerate() {
            if used[i] || self.chains.len() >= MAX_CHAINS_PER_REFERENCE {
                continue;
            }
            self.chains.push(Chain {
                run: Run {
                    query_start_ms: query_ms,
                    query_end_ms: query_ms,
                    reference_start_ms: reference_ms,
                    reference_end_ms: reference_ms,
                    frames: 1,
                },
                last_ordinal: ordinal,
            });
        }
        for chain in &self.chains {
            let longer = self
                .best_run
                .is_none_or(|best| chain.run.duration_ms() > best.duration_ms());
            if longer {
                self.best_run = Some(chain.run);
            }
        }
    }
}

/// The whole-video result for one reference.
#[derive(Clone, Debug, PartialEq)]
pub struct VerdictData {
    /// The reference.
    pub reference: ReferenceId,
    /// Its bank.
    pub bank: BankId,
    /// Share of the upload's distinct good-quality frames that matched, in percent.
    pub query_match_pct: f64,
    /// Share of the reference's distinct good-quality frames that were matched, in percent.
    pub reference_match_pct: f64,
    /// Numerator of `query_match_pct`.
    pub query_frames_matched: u32,
    /// Denominator of `query_match_pct`.
    pub query_frames_total: u32,
    /// Numerator of `reference_match_pct`.
    pub reference_frames_matched: u32,
    /// Denominator of `reference_match_pct`.
    pub reference_frames_total: u32,
    /// Both percentage thresholds met.
    pub percentage_match: bool,
    /// The longest in-order run lasts at least `min_run_ms`.
    pub run_match: bool,
    /// The longest in-order run, if any.
    pub run: Option<Run>,
    /// `percentage_match || run_match`.
    pub is_match: bool,
    /// No frame still to come can change `is_match`.
    pub is_final: bool,
}

/// Counts over a whole stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionSummary {
    /// Frames received.
    pub frames_received: u32,
    /// Frames below the quality minimum.
    pub frames_low_quality: u32,
    /// Frames with at least one hit.
    pub frames_matched: u32,
    /// Distinct good-quality frames.
    pub distinct_frames: u32,
}

/// One upload's matching state: fed frame by frame, it reports verdicts as soon as they are known
/// and all of them at the end.
#[derive(Debug)]
pub struct Session {
    params: MatchParams,
    seen: HashSet<PdqHash>,
    tallies: HashMap<ReferenceId, Tally>,
    summary: SessionSummary,
}

impl Session {
    /// A session with the given parameters.
    pub fn new(params: MatchParams) -> Self {
        Self {
            params,
            seen: HashSet::new(),
            tallies: HashMap::new(),
            summary: SessionSummary::default(),
        }
    }

    /// The session's parameters.
    pub fn params(&self) -> &MatchParams {
        &self.params
    }

    /// Records one upload frame and the hits [`search_frame`] found for it, and returns the
    /// verdicts that changed because of it: a reference whose decision flipped (provisional), or
    /// whose decision can no longer change (final; sent once).
    ///
    /// A repeated hash counts once towards the percentages (vPDQ deduplication, the first
    /// occurrence decides) but still extends in-order runs. `reference_total` gives a reference's
    /// number of distinct good-quality frames; it is asked once per reference.
    pub fn record(
        &mut self,
        query: &QueryFrame,
        hits: &[FrameHit],
        reference_total: &dyn Fn(ReferenceId) -> Option<u32>,
    ) -> Vec<VerdictData> {
        let frame = &query.signal;
        self.summary.frames_received = self.summary.frames_received.saturating_add(1);
        let ordinal = self.summary.frames_received;
        // A frame of vectors alone has no hash to deduplicate by: each one counts.
        let first_occurrence = !query.has_pdq || self.seen.insert(frame.hash);
        if query.has_pdq && frame.quality < self.params.min_quality {
            self.summary.frames_low_quality = self.summary.frames_low_quality.saturating_add(1);
        } else {
            if !hits.is_empty() {
                self.summary.frames_matched = self.summary.frames_matched.saturating_add(1);
            }
            if first_occurrence {
                self.summary.distinct_frames = self.summary.distinct_frames.saturating_add(1);
            }
            self.tally_hits(frame, hits, ordinal, first_occurrence, reference_total);
        }
        // A decision may flip for any reference announced before (its query % falls as unmatched
        // frames arrive), and for the ones this frame hit.
        let mut changed = Vec::new();
        let candidates: Vec<ReferenceId> = self
            .tallies
            .iter()
            .filter(|(r, t)| t.announced.is_some() || hits.iter().any(|h| h.reference == **r))
            .map(|(r, _)| *r)
            .collect();
        for reference in candidates {
            let Some(verdict) = self.verdict(reference, false) else {
                continue;
            };
            let Some(tally) = self.tallies.get_mut(&reference) else {
                continue;
            };
            let decision = (verdict.is_match, verdict.is_final);
            let worth_sending = match tally.announced {
                // Say nothing until something matches.
                None => verdict.is_match,
                Some((_, true)) => false,
                Some(before) => before != decision,
            };
            if worth_sending {
                tally.announced = Some(decision);
                changed.push(verdict);
            }
        }
        changed
    }

    fn tally_hits(
        &mut self,
        frame: &FrameSignal,
        hits: &[FrameHit],
        ordinal: u32,
        first_occurrence: bool,
        reference_total: &dyn Fn(ReferenceId) -> Option<u32>,
    ) {
        let mut by_reference: HashMap<ReferenceId, (BankId, Vec<&FrameHit>)> = HashMap::new();
        for hit in hits {
            by_reference
                .entry(hit.reference)
                .or_insert_with(|| (hit.bank, Vec::new()))
                .1
                .push(hit);
        }
        for (reference, (bank, hits)) in by_reference {
            let tally = match self.tallies.entry(reference) {
                Entry::Occupied(slot) => slot.into_mut(),
                Entry::Vacant(slot) => {
                    // A reference withdrawn between the search and now is left out.
                    let Some(total) = reference_total(reference) else {
                        continue;
                    };
                    slot.insert(Tally {
                        bank,
                        reference_total: total,
                        query_frames_matched: 0,
                        reference_frames_matched: BTreeSet::new(),
                        chains: Vec::new(),
                        best_run: None,
                        announced: None,
                    })
                }
            };
            if first_occurrence {
                tally.query_frames_matched = tally.query_frames_matched.saturating_add(1);
                tally
                    .reference_frames_matched
                    .extend(hits.iter().map(|h| h.reference_frame.frame_index));
            }
            if self.params.min_run_ms > 0 {
                let mut times: Vec<u64> = hits
                    .iter()
                    .map(|h| h.reference_frame.timestamp_ms)
                    .collect();
                times.sort_unstable();
                times.dedup();
                tally.extend_runs(ordinal, frame.timestamp_ms, &times);
            }
        }
    }

    /// The current verdict for one reference. With `stream_ended`, every decision is final.
    fn verdict(&self, reference: ReferenceId, stream_ended: bool) -> Option<VerdictData> {
        let tally = self.tallies.get(&reference)?;
        let params = &self.params;
        let query_total = self.summary.distinct_frames;
        let reference_matched =
            u32::try_from(tally.reference_frames_matched.len()).unwrap_or(u32::MAX);
        let query_match_pct = percent(tally.query_frames_matched, query_total);
        let reference_match_pct = percent(reference_matched, tally.reference_total);
        let reference_ok = reference_match_pct >= params.reference_threshold_pct;
        let percentage_match = query_match_pct >= params.query_threshold_pct && reference_ok;
        let run_match = params.min_run_ms > 0
            && tally
                .best_run
                .is_some_and(|run| run.duration_ms() >= params.min_run_ms);
        // What the frames still to come could do: at worst every one is new and unmatched, at
        // best every one is new and matched. The reference % and the longest run never shrink.
        let remaining = params
            .expected_frames
            .map(|n| n.saturating_sub(self.summary.frames_received));
        let is_final = stream_ended
            || run_match
            || match remaining {
                None => false,
                Some(r) => {
                    let worst = percent(tally.query_frames_matched, query_total.saturating_add(r));
                    let best = percent(
                        tally.query_frames_matched.saturating_add(r),
                        query_total.saturating_add(r),
                    );
                    let certain_match = reference_ok && worst >= params.query_threshold_pct;
                    let certain_miss =
                        best < params.query_threshold_pct && (params.min_run_ms == 0 || r == 0);
                    certain_match || certain_miss
                }
            };
        Some(VerdictData {
            reference,
            bank: tally.bank,
            query_match_pct,
            reference_match_pct,
            query_frames_matched: tally.query_frames_matched,
            query_frames_total: query_total,
            reference_frames_matched: reference_matched,
            reference_frames_total: tally.reference_total,
            percentage_match,
            run_match,
            run: tally.best_run,
            is_match: percentage_match || run_match,
            is_final,
        })
    }

    /// Counts so far.
    pub fn summary(&self) -> SessionSummary {
        self.summary
    }

    /// The closing verdicts, all final: one per reference that matched any frame, matches first,
    /// then by query share. `still_indexed` drops references withdrawn during the stream.
    pub fn finish(&self, still_indexed: &dyn Fn(ReferenceId) -> bool) -> Vec<VerdictData> {
        let mut verdicts: Vec<VerdictData> = self
            .tallies
            .keys()
            .filter(|r| still_indexed(**r))
            .filter_map(|r| self.verdict(*r, true))
            .collect();
        verdicts.sort_by(|a, b| {
            b.is_match
                .cmp(&a.is_match)
                .then(b.query_match_pct.total_cmp(&a.query_match_pct))
                .then(a.reference.cmp(&b.reference))
        });
        verdicts
    }
}

/// `100 * part / whole`, and 0 when `whole` is 0 (the C++ reference's convention for an empty side).
pub fn percent(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * f64::from(part) / f64::from(whole)
    }
}

#[cfg(test)]
mod tests;
