//! vPDQ hash files and whole-video matching (shared/PDQ.md §2.2, §2.3).
//!
//! A vPDQ hash is a list of [`VpdqFeature`]s, one per hashed frame. Two serialisations exist and
//! both are read and written here:
//! * the reference text file (`vpdq-hash-video`): one `frame,quality,hex,timestamp` line per frame,
//!   timestamp in seconds with exactly 3 decimals;
//! * HMA / python-threatexchange's JSON signal: an array of `"hex,quality,timestamp"` strings with
//!   no frame number, the timestamp in Python's 3-significant-digit general format (`18.8`,
//!   `1.23e+02`).
//!
//! [`Vpdq::parse`] tells them apart by the first non-blank character (`[` is JSON). Hex is
//! accepted in either case and always written lowercase.
//!
//! [`match_brute`] compares two videos as unordered bags of frame hashes and reports both
//! percentages, with python-threatexchange's rules ([`Semantics::Pytx`]: dedupe by hash keeping the
//! first occurrence *before* the quality filter, distance `<=` the tolerance) or the C++
//! `match-hashes-brute` rules ([`Semantics::Cpp`]: no dedupe, distance strictly `<`). Frame
//! numbers and timestamps play no part in matching.

use std::collections::HashSet;
use std::fmt::Write as _;

use super::{DEFAULT_MAX_DISTANCE, DEFAULT_MIN_QUALITY, PdqHash};

/// python-threatexchange's `VPDQ_QUERY_MATCH_THRESHOLD_PERCENT`.
pub const DEFAULT_QUERY_THRESHOLD_PCT: f64 = 80.0;
/// python-threatexchange's `VPDQ_INDEX_MATCH_THRESHOLD_PERCENT`.
pub const DEFAULT_COMPARED_THRESHOLD_PCT: f64 = 0.0;

// === impl Error ===

/// Why a vPDQ file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A text line has fewer than the 4 comma-separated fields.
    #[error("line {line}: a vPDQ line has 4 comma-separated fields, found {found}")]
    FieldCount {
        /// 1-based line number.
        line: usize,
        /// Fields found.
        found: usize,
    },
    /// A JSON entry is not `hex,quality,timestamp`.
    #[error("entry {entry}: a vPDQ JSON entry has 3 comma-separated fields, found {found}")]
    JsonFieldCount {
        /// 0-based position in the array.
        entry: usize,
        /// Fields found.
        found: usize,
    },
    /// The frame number is not a non-negative integer.
    #[error("{location}: frame number {text:?} is not a non-negative integer")]
    FrameNumber {
        /// `line N` or `entry N`.
        location: String,
        /// The field as found.
        text: String,
    },
    /// The quality is not an integer from 0 to 100.
    #[error("{location}: quality {text:?} is not an integer from 0 to 100")]
    Quality {
        /// `line N` or `entry N`.
        location: String,
        /// The field as found.
        text: String,
    },
    /// The timestamp is not a finite, non-negative number of seconds.
    #[error("{location}: timestamp {text:?} is not a non-negative number of seconds")]
    Timestamp {
        /// `line N` or `entry N`.
        location: String,
        /// The field as found.
        text: String,
    },
    /// The hash is not 64 hex digits.
    #[error("{location}: {source}")]
    Hash {
        /// `line N` or `entry N`.
        location: String,
        /// Why.
        #[source]
        source: super::ParseError,
    },
    /// The text starts with `[` but is not a JSON array of strings.
    #[error("not a vPDQ JSON array of strings")]
    Json {
        /// The JSON parser's error.
        #[source]
        source: serde_json::Error,
    },
}

// === impl VpdqFeature ===

/// One hashed frame of a video.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VpdqFeature {
    /// 0-based index of the frame in decoder order. HMA's JSON form has none; reading it numbers
    /// the entries 0, 1, 2, … in array order.
    pub frame_number: u64,
    /// The frame's PDQ hash.
    pub hash: PdqHash,
    /// PDQ quality, 0..=100.
    pub quality: u8,
    /// Seconds from the start: frame number / frame rate, as the reference computes it.
    pub timestamp_s: f64,
}

impl VpdqFeature {
    /// The timestamp in whole milliseconds, rounded to nearest (the wire unit of `pb::Frame`).
    /// Negative or non-finite values, which the parsers reject, give 0.
    pub fn timestamp_ms(&self) -> u64 {
        let ms = (self.timestamp_s * 1000.0).round();
        if ms.is_finite() && ms >= 0.0 {
            // Saturating float-to-int conversion; the value is non-negative and finite.
            ms as u64
        } else {
            0
        }
    }
}

// === impl Vpdq ===

/// Which serialisation a vPDQ hash came in, or should be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The reference text file: `frame,quality,hex,timestamp` lines.
    Text,
    /// HMA's JSON array of `"hex,quality,timestamp"` strings.
    Json,
}

/// A whole video's vPDQ hash: its features in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Vpdq {
    /// One entry per hashed frame.
    pub features: Vec<VpdqFeature>,
}

impl Vpdq {
    /// Reads either serialisation, telling them apart by the first non-blank character (`[`
    /// starts JSON). Blank text lines and `#` comment lines are skipped; extra text fields after
    /// the 4th are ignored, as the reference reader does.
    ///
    /// # Errors
    /// Text: [`Error::FieldCount`], [`Error::FrameNumber`], [`Error::Quality`], [`Error::Hash`],
    /// [`Error::Timestamp`] naming the 1-based line. JSON: [`Error::Json`] when it is not an
    /// array of strings, then [`Error::JsonFieldCount`], [`Error::Quality`], [`Error::Hash`],
    /// [`Error::Timestamp`] naming the 0-based entry.
    pub fn parse(text: &str) -> Result<Self, Error> {
        match Self::detect(text) {
            Format::Json => Self::parse_json(text),
            Format::Text => Self::parse_text(text),
        }
    }

    /// The serialisation `text` appears to be in.
    pub fn detect(text: &str) -> Format {
        if text.trim_start().starts_with('[') {
            Format::Json
        } else {
            Format::Text
        }
    }

    /// Reads the reference text form.
    ///
    /// # Errors
    /// As [`Vpdq::parse`] for text.
    pub fn parse_text(text: &str) -> Result<Self, Error> {
        let mut features = Vec::new();
        for (number, line) in text.lines().enumerate() {
            if let Some(feature) = parse_text_line(line, number + 1)? {
                features.push(feature);
            }
        }
        Ok(Self { features })
    }

    /// Reads HMA's JSON form. Frame numbers are the array positions.
    ///
    /// # Errors
    /// As [`Vpdq::parse`] for JSON.
    pub fn parse_json(text: &str) -> Result<Self, Error> {
        let entries: Vec<String> =
            serde_json::from_str(text).map_err(|source| Error::Json { source })?;
        let features = entries
            .iter()
            .enumerate()
            .map(|(entry, serialized)| parse_json_entry(serialized, entry))
            .collect::<Result<_, _>>()?;
        Ok(Self { features })
    }

    /// Writes `format`.
    pub fn to_format(&self, format: Format) -> String {
        match format {
            Format::Text => self.to_text(),
            Format::Json => self.to_json(),
        }
    }

    /// The reference text form: `frame,quality,hex,timestamp` lines, LF-terminated, timestamp
    /// with exactly 3 decimals (C++ `std::fixed << std::setprecision(3)`).
    pub fn to_text(&self) -> String {
        let mut out = String::with_capacity(self.features.len() * 80);
        for f in &self.features {
            // Writing to a String cannot fail.
            let _ = writeln!(out, "{}", text_line(f));
        }
        out
    }

    /// HMA's JSON form: an array of `"hex,quality,timestamp"` strings.
    ///
    /// The timestamp is written with 3 decimals rather than python-threatexchange's 3 significant
    /// digits (`18.767`, not `18.8`): its reader parses both with `float()`, and nothing is lost.
    pub fn to_json(&self) -> String {
        let entries: Vec<String> = self.features.iter().map(json_entry).collect();
        // Serialising a list of strings cannot fail; fall back to an empty array regardless.
        serde_json::to_string(&entries).unwrap_or_else(|_| "[]".to_string())
    }
}

/// Reads one line of the reference text form, `number` being its 1-based line number: `None` for
/// a blank or `#` comment line; extra fields after the 4th are ignored, as the reference reader
/// does.
///
/// # Errors
/// [`Error::FieldCount`], [`Error::FrameNumber`], [`Error::Quality`], [`Error::Hash`],
/// [`Error::Timestamp`] naming the line.
pub fn parse_text_line(line: &str, number: usize) -> Result<Option<VpdqFeature>, Error> {
    let line = line.trim();
    // `#` lines are not vPDQ; `framematch hash` writes one before each of several videos.
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let location = || format!("line {number}");
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    let [frame, quality, hash, timestamp, ..] = fields.as_slice() else {
        return Err(Error::FieldCount {
            line: number,
            found: fields.len(),
        });
    };
    let frame_number = frame.parse::<u64>().map_err(|_| Error::FrameNumber {
        location: location(),
        text: (*frame).to_string(),
    })?;
    Ok(Some(VpdqFeature {
        frame_number,
        quality: parse_quality(quality, &location)?,
        hash: parse_hash(hash, &location)?,
        timestamp_s: parse_timestamp(timestamp, &location)?,
    }))
}

/// Reads one `"hex,quality,timestamp"` string of HMA's JSON form, at 0-based position `entry`
/// (which becomes its frame number).
///
/// # Errors
/// [`Error::JsonFieldCount`], [`Error::Quality`], [`Error::Hash`], [`Error::Timestamp`] naming
/// the entry.
pub fn parse_json_entry(serialized: &str, entry: usize) -> Result<VpdqFeature, Error> {
    let location = || format!("entry {entry}");
    let fields: Vec<&str> = serialized.split(',').map(str::trim).collect();
    let [hash, quality, timestamp] = fields.as_slice() else {
        return Err(Error::JsonFieldCount {
            entry,
            found: fields.len(),
        });
    };
    Ok(VpdqFeature {
        frame_number: entry as u64,
        hash: parse_hash(hash, &location)?,
        quality: parse_quality(quality, &location)?,
        timestamp_s: parse_timestamp(timestamp, &location)?,
    })
}

/// One entry of HMA's JSON form: `hex,quality,timestamp`, the timestamp with 3 decimals.
pub fn json_entry(f: &VpdqFeature) -> String {
    format!("{},{},{:.3}", f.hash, f.quality, f.timestamp_s)
}

/// One reference text line, without its newline: `frame,quality,hex,timestamp`.
pub fn text_line(f: &VpdqFeature) -> String {
    format!(
        "{},{},{},{:.3}",
        f.frame_number, f.quality, f.hash, f.timestamp_s
    )
}

fn parse_quality(text: &str, location: &dyn Fn() -> String) -> Result<u8, Error> {
    text.parse::<u8>()
        .ok()
        .filter(|q| *q <= 100)
        .ok_or_else(|| Error::Quality {
            location: location(),
            text: text.to_string(),
        })
}

fn parse_hash(text: &str, location: &dyn Fn() -> String) -> Result<PdqHash, Error> {
    text.parse::<PdqHash>().map_err(|source| Error::Hash {
        location: location(),
        source,
    })
}

fn parse_timestamp(text: &str, location: &dyn Fn() -> String) -> Result<f64, Error> {
    // Rust's float parser takes `1.23e+02` as Python's `float()` does.
    text.parse::<f64>()
        .ok()
        .filter(|t| t.is_finite() && *t >= 0.0)
        .ok_or_else(|| Error::Timestamp {
            location: location(),
            text: text.to_string(),
        })
}

// === matching ===

/// Which implementation's rules [`match_brute`] follows (shared/PDQ.md §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Semantics {
    /// python-threatexchange / HMA: distinct hashes only (first occurrence kept, deduplicated
    /// before the quality filter), a frame matches at distance `<=` the tolerance.
    #[default]
    Pytx,
    /// The C++ `match-hashes-brute`: every frame counts, a frame matches at distance strictly
    /// `<` the tolerance.
    Cpp,
}

/// Parameters of [`match_brute`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatchConfig {
    /// Frames of lower quality, on either side, are left out.
    pub quality_tolerance: u8,
    /// Distance tolerance in bits; see [`Semantics`] for `<=` or `<`.
    pub distance_tolerance: u32,
    /// Which rules.
    pub semantics: Semantics,
}

impl Default for MatchConfig {
    /// python-threatexchange's defaults: quality 50, distance 31.
    fn default() -> Self {
        Self {
            quality_tolerance: DEFAULT_MIN_QUALITY,
            distance_tolerance: DEFAULT_MAX_DISTANCE,
            semantics: Semantics::Pytx,
        }
    }
}

/// The outcome of comparing a query video with a compared video.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatchResult {
    /// Share of the query's counted frames with a match in the compared video, in percent.
    pub query_match_pct: f64,
    /// Share of the compared video's counted frames with a match in the query, in percent.
    pub compared_match_pct: f64,
    /// Query frames matched.
    pub query_matched: usize,
    /// Query frames counted (after dedupe and the quality filter).
    pub query_total: usize,
    /// Compared frames matched.
    pub compared_matched: usize,
    /// Compared frames counted.
    pub compared_total: usize,
}

impl MatchResult {
    /// python-threatexchange's verdict: both percentages at or above their thresholds.
    pub fn is_match(&self, query_threshold_pct: f64, compared_threshold_pct: f64) -> bool {
        self.query_match_pct >= query_threshold_pct
            && self.compared_match_pct >= compared_threshold_pct
    }
}

/// Compares two vPDQ hashes frame against frame (O(|query| · |compared|) popcounts).
///
/// A side left empty by the filters gives 0 % on both sides, as the C++ does (python-threatexchange
/// would divide by zero).
pub fn match_brute(
    query: &[VpdqFeature],
    compared: &[VpdqFeature],
    config: &MatchConfig,
) -> MatchResult {
    let query = prepare(query, config);
    let compared = prepare(compared, config);
    if query.is_empty() || compared.is_empty() {
        return MatchResult {
            query_match_pct: 0.0,
            compared_match_pct: 0.0,
            query_matched: 0,
            query_total: query.len(),
            compared_matched: 0,
            compared_total: compared.len(),
        };
    }
    let within = |a: &[u64; 4], b: &[u64; 4]| {
        let d = super::hamming(a, b);
        match config.semantics {
            Semantics::Pytx => d <= config.distance_tolerance,
            Semantics::Cpp => d < config.distance_tolerance,
        }
    };
    let count = |from: &[[u64; 4]], to: &[[u64; 4]]| {
        from.iter()
            .filter(|a| to.iter().any(|b| within(a, b)))
            .count()
    };
    let query_matched = count(&query, &compared);
    let compared_matched = count(&compared, &query);
    MatchResult {
        query_match_pct: percent(query_matched, query.len()),
        compared_match_pct: percent(compared_matched, compared.len()),
        query_matched,
        query_total: query.len(),
        compared_matched,
        compared_total: compared.len(),
    }
}

/// `matched · 100 / total` as both references compute it: the product is an exact integer, then
/// one correctly rounded division.
fn percent(matched: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        (matched as f64 * 100.0) / total as f64
    }
}

/// The frames that count, as hash words: deduplicated first (Pytx), then quality-filtered.
fn prepare(features: &[VpdqFeature], config: &MatchConfig) -> Vec<[u64; 4]> {
    let mut seen = HashSet::new();
    features
        .iter()
        .filter(|f| config.semantics == Semantics::Cpp || seen.insert(f.hash))
        .filter(|f| f.quality >= config.quality_tolerance)
        .map(|f| f.hash.words())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "e271017837246aaccddea259648fb7d62f435c89d9e99b2497763e216c8d055c";

    fn hash(seed: u32) -> PdqHash {
        PdqHash::from_bit_fn(|k| (k as u32 * 7 + seed * 13) % 5 < 2)
    }

    fn feature(frame: u64, hash: PdqHash, quality: u8) -> VpdqFeature {
        VpdqFeature {
            frame_number: frame,
            hash,
            quality,
            timestamp_s: f64::from(frame as f32 / 30.0_f32),
        }
    }

    /// `hash` with its first `n` bits flipped.
    fn flipped(hash: PdqHash, n: usize) -> PdqHash {
        PdqHash::from_bit_fn(|k| hash.bit(k) ^ (k < n))
    }

    #[test]
    fn text_round_trips_with_three_decimals_and_lowercase() {
        let text = format!(
            "0,100,{},0.000\n1,49,{},0.033\n30,80,{},1.000\n",
            A.to_uppercase(),
            A,
            hash(3)
        );
        let vpdq = Vpdq::parse(&text).expect("parses");
        assert_eq!(vpdq.features.len(), 3);
        assert_eq!(vpdq.features[0].hash.to_string(), A);
        assert_eq!(vpdq.features[1].quality, 49);
        assert_eq!(vpdq.features[2].frame_number, 30);
        assert_eq!(vpdq.to_text(), text.replace(&A.to_uppercase(), A));
    }

    #[test]
    fn json_round_trips_through_text() {
        let text = format!("0,100,{A},0.000\n7,61,{},18.767\n", hash(1));
        let vpdq = Vpdq::parse(&text).expect("text");
        let json = vpdq.to_json();
        assert!(json.starts_with('['), "{json}");
        let back = Vpdq::parse(&json).expect("json");
        assert_eq!(back.features[1].hash, vpdq.features[1].hash);
        assert_eq!(back.features[1].quality, 61);
        assert_eq!(back.features[1].timestamp_s, 18.767);
        // JSON carries no frame numbers: entries are numbered in order.
        assert_eq!(back.features[1].frame_number, 1);
    }

    #[test]
    fn json_with_exponent_and_short_timestamps_parses() {
        let json = format!(
            "[\"{A},100,0.0\", \"{},55,18.8\",\"{},90,1.23e+02\"]",
            hash(1),
            hash(2)
        );
        let vpdq = Vpdq::parse(&json).expect("parses");
        let times: Vec<f64> = vpdq.features.iter().map(|f| f.timestamp_s).collect();
        assert_eq!(times, vec![0.0, 18.8, 123.0]);
        assert_eq!(vpdq.features[2].timestamp_ms(), 123_000);
    }

    #[test]
    fn malformed_lines_are_rejected_with_their_position() {
        assert!(matches!(
            Vpdq::parse("0,100,abc\n"),
            Err(Error::FieldCount { line: 1, found: 3 })
        ));
        let bad_quality = format!("\n0,101,{A},0.000\n");
        assert!(matches!(
            Vpdq::parse(&bad_quality),
            Err(Error::Quality { ref location, .. }) if location == "line 2"
        ));
        let bad_time = format!("0,100,{A},-1\n");
        assert!(matches!(
            Vpdq::parse(&bad_time),
            Err(Error::Timestamp { .. })
        ));
        let bad_hash = format!("[\"{}z,100,0.0\"]", &A[1..]);
        assert!(matches!(
            Vpdq::parse(&bad_hash),
            Err(Error::Hash { ref location, .. }) if location == "entry 0"
        ));
        assert!(matches!(Vpdq::parse("[1, 2]"), Err(Error::Json { .. })));
        assert!(matches!(
            Vpdq::parse(&format!("[\"{A},100\"]")),
            Err(Error::JsonFieldCount { entry: 0, found: 2 })
        ));
    }

    #[test]
    fn pytx_dedupes_before_the_quality_filter() {
        let good = hash(1);
        // The first occurrence of `good` is low quality: the hash is dropped altogether.
        let query = vec![
            feature(0, good, 10),
            feature(1, good, 100),
            feature(2, hash(2), 100),
        ];
        let compared = vec![feature(0, good, 100)];
        let r = match_brute(&query, &compared, &MatchConfig::default());
        assert_eq!((r.query_matched, r.query_total), (0, 1));
        assert_eq!(r.query_match_pct, 0.0);
        assert_eq!((r.compared_matched, r.compared_total), (0, 1));
    }

    #[test]
    fn pytx_counts_distance_31_and_cpp_does_not() {
        let base = hash(5);
        let query = vec![feature(0, flipped(base, 31), 100), feature(1, hash(9), 100)];
        let compared = vec![feature(0, base, 100)];
        let pytx = match_brute(&query, &compared, &MatchConfig::default());
        assert_eq!(pytx.query_match_pct, 50.0);
        assert_eq!(pytx.compared_match_pct, 100.0);
        assert!(!pytx.is_match(80.0, 0.0));
        let cpp = MatchConfig {
            semantics: Semantics::Cpp,
            ..MatchConfig::default()
        };
        let r = match_brute(&query, &compared, &cpp);
        assert_eq!((r.query_match_pct, r.compared_match_pct), (0.0, 0.0));
    }

    #[test]
    fn cpp_counts_duplicates() {
        let a = hash(1);
        let query = vec![
            feature(0, a, 100),
            feature(1, a, 100),
            feature(2, hash(2), 100),
        ];
        let compared = vec![feature(0, a, 100)];
        let cpp = MatchConfig {
            semantics: Semantics::Cpp,
            ..MatchConfig::default()
        };
        let r = match_brute(&query, &compared, &cpp);
        assert_eq!((r.query_matched, r.query_total), (2, 3));
        let pytx = match_brute(&query, &compared, &MatchConfig::default());
        assert_eq!((pytx.query_matched, pytx.query_total), (1, 2));
    }

    #[test]
    fn an_empty_side_gives_zero_percent() {
        let r = match_brute(&[], &[feature(0, hash(1), 100)], &MatchConfig::default());
        assert_eq!((r.query_match_pct, r.compared_match_pct), (0.0, 0.0));
        assert!(!r.is_match(80.0, 0.0));
    }

    #[test]
    fn timestamps_print_like_the_reference() {
        // float32 frame/fps printed with 3 decimals, as `std::fixed << setprecision(3)` does.
        let f = feature(2, hash(1), 100);
        assert!(text_line(&f).ends_with(",0.067"), "{}", text_line(&f));
        assert_eq!(
            VpdqFeature {
                timestamp_s: 0.0335,
                ..f
            }
            .timestamp_ms(),
            34
        );
    }
}
