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
//! Nothing here knows about tonic or the store: the API layer feeds frames in and turns the
//! results into wire messages.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};

use crate::hash::pdq::Dihedral;
use crate::hash::{DEFAULT_MAX_DISTANCE, DEFAULT_MIN_QUALITY, PdqHash};
use crate::index::{FrameIndex, Match};
use crate::model::{BankId, FrameSignal, ReferenceId};

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
        }
    }
}

/// The hashes one upload frame is searched with: the original, or all 8 dihedral variants.
#[derive(Clone, Debug)]
pub struct QueryFrame {
    /// Index and timestamp as sent, the original hash and its quality.
    pub signal: FrameSignal,
    /// The 8 variants in [`Dihedral::ALL`] order when dihedral matching is on.
    pub variants: Option<[PdqHash; 8]>,
}

/// One reference frame within the distance of an upload frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

/// Searches the index for one upload frame.
///
/// Returns every live reference frame of good quality within the distance, in a bank that
/// `bank_filter` accepts, nearest first. With several variants, a reference frame reached by more
/// than one keeps its smallest distance (the original wins ties). Low-quality upload frames are
/// not searched: the result is empty.
pub fn search_frame(
    index: &FrameIndex,
    query: &QueryFrame,
    params: &MatchParams,
    bank_filter: &dyn Fn(BankId) -> bool,
) -> Vec<FrameHit> {
    if query.signal.quality < params.min_quality {
        return Vec::new();
    }
    let original = [query.signal.hash];
    let variants: &[PdqHash] = match &query.variants {
        Some(all) => all,
        None => &original,
    };
    let mut best: HashMap<(ReferenceId, u32), FrameHit> = HashMap::new();
    let mut found: Vec<Match> = Vec::new();
    for (variant_hash, dihedral) in variants.iter().zip(Dihedral::ALL) {
        index.search(variant_hash, params.max_distance, bank_filter, &mut found);
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

/// Per-reference tally within one stream.
#[derive(Clone, Debug)]
struct Tally {
    bank: BankId,
    /// Distinct good-quality upload hashes that matched this reference.
    query_frames_matched: u32,
    /// Distinct reference frames (by index; the store keeps one frame per distinct hash) matched.
    reference_frames_matched: BTreeSet<u32>,
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
    /// Both thresholds met.
    pub is_match: bool,
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

/// One upload's matching state: fed frame by frame, asked for verdicts at the end.
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

    /// Records one upload frame and the hits [`search_frame`] found for it. A repeated hash counts
    /// once towards the percentages (vPDQ deduplication), but its hits are still reported.
    pub fn record(&mut self, frame: &FrameSignal, hits: &[FrameHit]) {
        self.summary.frames_received = self.summary.frames_received.saturating_add(1);
        // python-threatexchange order: deduplicate by hash first (the first occurrence decides),
        // then drop low quality.
        let first_occurrence = self.seen.insert(frame.hash);
        if frame.quality < self.params.min_quality {
            self.summary.frames_low_quality = self.summary.frames_low_quality.saturating_add(1);
            return;
        }
        if !hits.is_empty() {
            self.summary.frames_matched = self.summary.frames_matched.saturating_add(1);
        }
        if !first_occurrence {
            return;
        }
        self.summary.distinct_frames = self.summary.distinct_frames.saturating_add(1);
        let mut counted: HashSet<ReferenceId> = HashSet::new();
        for hit in hits {
            let tally = self.tallies.entry(hit.reference).or_insert_with(|| Tally {
                bank: hit.bank,
                query_frames_matched: 0,
                reference_frames_matched: BTreeSet::new(),
            });
            if counted.insert(hit.reference) {
                tally.query_frames_matched = tally.query_frames_matched.saturating_add(1);
            }
            tally
                .reference_frames_matched
                .insert(hit.reference_frame.frame_index);
        }
    }

    /// Counts so far.
    pub fn summary(&self) -> SessionSummary {
        self.summary
    }

    /// One verdict per reference that matched any frame, matches first, then by query share.
    ///
    /// `reference_total` gives a reference's number of distinct good-quality frames (the index
    /// knows it); a reference it no longer knows (withdrawn meanwhile) is left out.
    pub fn verdicts(
        &self,
        reference_total: &dyn Fn(ReferenceId) -> Option<u32>,
    ) -> Vec<VerdictData> {
        let query_total = self.summary.distinct_frames;
        let mut verdicts: Vec<VerdictData> = self
            .tallies
            .iter()
            .filter_map(|(&reference, tally)| {
                let reference_total = reference_total(reference)?;
                let reference_matched =
                    u32::try_from(tally.reference_frames_matched.len()).unwrap_or(u32::MAX);
                let query_match_pct = percent(tally.query_frames_matched, query_total);
                let reference_match_pct = percent(reference_matched, reference_total);
                Some(VerdictData {
                    reference,
                    bank: tally.bank,
                    query_match_pct,
                    reference_match_pct,
                    query_frames_matched: tally.query_frames_matched,
                    query_frames_total: query_total,
                    reference_frames_matched: reference_matched,
                    reference_frames_total: reference_total,
                    is_match: query_match_pct >= self.params.query_threshold_pct
                        && reference_match_pct >= self.params.reference_threshold_pct,
                })
            })
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
mod tests {
    use super::*;

    fn frame(index: u32, hash: PdqHash, quality: u8) -> FrameSignal {
        FrameSignal {
            frame_index: index,
            timestamp_ms: u64::from(index) * 1000,
            hash,
            quality,
        }
    }

    fn hash_with_bits(bits: &[usize]) -> PdqHash {
        PdqHash::from_bit_fn(|k| bits.contains(&k))
    }

    fn hit(reference: i64, reference_frame: u32, distance: u32) -> FrameHit {
        FrameHit {
            reference: ReferenceId(reference),
            bank: BankId(1),
            reference_frame: frame(reference_frame, PdqHash::default(), 100),
            distance,
            dihedral: Dihedral::Original,
        }
    }

    #[test]
    fn percentages_follow_vpdq_dedup_and_quality_rules() {
        let mut session = Session::new(MatchParams::default());
        let a = hash_with_bits(&[1]);
        let b = hash_with_bits(&[2]);
        let c = hash_with_bits(&[3]);
        let low = hash_with_bits(&[4]);
        session.record(&frame(0, a, 100), &[hit(7, 0, 0)]);
        // The same hash again: reported, but counted once.
        session.record(&frame(1, a, 100), &[hit(7, 0, 0)]);
        session.record(&frame(2, b, 90), &[hit(7, 1, 3), hit(8, 0, 20)]);
        session.record(&frame(3, c, 90), &[]);
        session.record(&frame(4, low, 10), &[]);
        let summary = session.summary();
        assert_eq!(summary.frames_received, 5);
        assert_eq!(summary.frames_low_quality, 1);
        assert_eq!(summary.frames_matched, 3);
        assert_eq!(summary.distinct_frames, 3);

        let verdicts = session.verdicts(&|r| match r.0 {
            7 => Some(4),
            8 => Some(1),
            _ => None,
        });
        assert_eq!(verdicts.len(), 2);
        let seven = &verdicts[0];
        assert_eq!(seven.reference, ReferenceId(7));
        assert_eq!(
            (seven.query_frames_matched, seven.query_frames_total),
            (2, 3)
        );
        assert_eq!(
            (seven.reference_frames_matched, seven.reference_frames_total),
            (2, 4)
        );
        assert!((seven.query_match_pct - 200.0 / 3.0).abs() < 1e-9);
        assert!((seven.reference_match_pct - 50.0).abs() < 1e-9);
        assert!(
            !seven.is_match,
            "66.7% of the upload is under the 80% default"
        );
        let eight = &verdicts[1];
        assert_eq!(eight.reference_match_pct, 100.0);
    }

    #[test]
    fn a_verdict_is_a_match_when_both_thresholds_are_met() {
        let params = MatchParams {
            query_threshold_pct: 50.0,
            reference_threshold_pct: 100.0,
            ..MatchParams::default()
        };
        let mut session = Session::new(params);
        session.record(&frame(0, hash_with_bits(&[1]), 100), &[hit(1, 0, 0)]);
        session.record(&frame(1, hash_with_bits(&[2]), 100), &[]);
        let full = session.verdicts(&|_| Some(1));
        assert!(full[0].is_match);
        let partial = session.verdicts(&|_| Some(2));
        assert!(!partial[0].is_match);
    }

    #[test]
    fn withdrawn_references_get_no_verdict() {
        let mut session = Session::new(MatchParams::default());
        session.record(&frame(0, hash_with_bits(&[1]), 100), &[hit(1, 0, 0)]);
        assert!(session.verdicts(&|_| None).is_empty());
    }

    #[test]
    fn percent_of_nothing_is_zero() {
        assert_eq!(percent(0, 0), 0.0);
        assert_eq!(percent(1, 4), 25.0);
    }
}
