//! Hash-list exchange formats: reading files of hashes into references to import, and writing a
//! bank's references out (issue #4, part 6). Pure text in and out; the command line
//! (`framematch import` / `export`) moves the results over gRPC.
//!
//! Four formats (README "Import and export" has examples):
//! - [`Format::Pdq`]: one image per line, as the field writes PDQ lists: `pdq <hex>`
//!   (python-threatexchange's local-file exchange and `threatexchange hash`), a bare `<hex>`
//!   (ThreatExchange's sample hash lists), or `<hex>,<quality>[,…]` (Meta's `pdq-photo-hasher` and
//!   `framematch hash`). The exchange forms carry no quality: such a hash is taken at quality
//!   [`DEFAULT_QUALITY`], as python-threatexchange and HMA, which bank every shared hash as
//!   usable, do.
//! - [`Format::Csv`]: python-threatexchange's `dataset -P --csv` file, columns found by header
//!   name (`signal_type`, `signal_str`, and optionally `collab`, `category`, `tags`). `pdq` rows
//!   are images, `vpdq` rows videos (signal in HMA's JSON form or the reference text form); other
//!   signal types, rows whose category says `FALSE_POSITIVE`, and rows tagged `withdrawn=…` are
//!   reported and skipped.
//! - [`Format::Vpdq`]: Meta's reference text form, `frame,quality,hex,timestamp` lines; one file is
//!   one video, or several when `# reference {json}` lines start each one.
//! - [`Format::VpdqJson`]: HMA's JSON array of `"hex,quality,timestamp"` strings (one video), or
//!   JSON Lines, one `{"external_id", "note", "vpdq", "frame_numbers", "withdrawn",
//!   "embeddings"}` object per reference. `embeddings` (issue #11) lists the reference's vectors,
//!   `{"frame", "timestamp_ms", "space", "values"}` each: this is the one format that carries them.
//!   The others hold PDQ only; exporting a reference with vectors to them drops its vectors (the
//!   command line says so).
//!
//! Invariants: parsing never half-succeeds: a malformed line is an [`Error`] naming its 1-based
//! line, and the caller imports nothing; an item that is well-formed but not importable (another
//! signal type, a withdrawn or false-positive signal) is a [`Skip`] with its line and reason,
//! never silently dropped or mis-imported. Writing what was read gives back the same items, except
//! where a format cannot hold something, which [`Writer::write`] reports as a skip (export) or the
//! README states (the CSV's vPDQ JSON numbers frames by position).

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::hash::vpdq::{self, VpdqFeature};
use crate::hash::{ParseError, PdqHash};
use crate::model::{Category, FrameEmbedding, FrameSignal};

/// Quality given to a PDQ hash that comes without one (`pdq <hex>` lines, CSV `pdq` rows).
pub const DEFAULT_QUALITY: u8 = 100;

/// The header python-threatexchange's CSV export documents, and the one [`Writer`] writes.
pub const CSV_HEADER: [&str; 5] = ["signal_type", "signal_str", "collab", "category", "tags"];

/// python-threatexchange's opinion category for a signal that does not fit its collaboration.
const FALSE_POSITIVE: &str = "FALSE_POSITIVE";

/// python-threatexchange's other opinion categories, accepted on import.
const PYTX_POSITIVE_CATEGORIES: [&str; 2] = ["TRUE_POSITIVE", "WORTH_INVESTIGATING"];

/// Starts a reference in the multi-reference vPDQ text layout.
const REFERENCE_MARKER: &str = "# reference";

// === impl Format ===

/// A hash-list format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `pdq <hex>`, `<hex>` or `<hex>,<quality>` lines, one image each.
    Pdq,
    /// python-threatexchange's CSV.
    Csv,
    /// Meta's vPDQ text form, with `# reference` lines between videos.
    Vpdq,
    /// HMA's vPDQ JSON array, or JSON Lines of references.
    VpdqJson,
}

impl Format {
    /// Every format, in declaration order.
    pub const ALL: [Format; 4] = [Format::Pdq, Format::Csv, Format::Vpdq, Format::VpdqJson];

    /// The name used on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Format::Pdq => "pdq",
            Format::Csv => "csv",
            Format::Vpdq => "vpdq",
            Format::VpdqJson => "vpdq-json",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A format name that is not one of [`Format::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown format {0:?}; expected one of pdq, csv, vpdq, vpdq-json")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Format::ALL
            .into_iter()
            .find(|f| f.as_str() == text)
            .ok_or_else(|| UnknownFormat(text.to_string()))
    }
}

// === items ===

/// One reference, as read from or written to a file.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// The contributor's own id (may be empty).
    pub external_id: String,
    /// Free text (may be empty).
    pub note: String,
    /// Set for a withdrawn reference: why. Exported so that it is not lost, skipped on import.
    pub withdrawn: Option<String>,
    /// Its frame signals.
    pub frames: Vec<FrameSignal>,
    /// Its vectors in embedding spaces (only [`Format::VpdqJson`] holds them).
    pub embeddings: Vec<FrameEmbedding>,
}

impl Item {
    /// An active image or video without an external id, a note or vectors.
    fn bare(frames: Vec<FrameSignal>) -> Self {
        Self {
            external_id: String::new(),
            note: String::new(),
            withdrawn: None,
            frames,
            embeddings: Vec::new(),
        }
    }
}

/// An item with the 1-based line it starts on.
#[derive(Clone, Debug, PartialEq)]
pub struct Located {
    /// Where it starts.
    pub line: usize,
    /// The item.
    pub item: Item,
}

/// Something well-formed that is not imported, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skip {
    /// 1-based line.
    pub line: usize,
    /// Why, for a person.
    pub reason: String,
}

/// What a file holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    /// The references to import, in file order.
    pub items: Vec<Located>,
    /// What is left out, in file order.
    pub skipped: Vec<Skip>,
}

// === errors ===

/// A malformed file: where, and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct Error {
    /// 1-based line.
    pub line: usize,
    /// What is wrong there.
    pub problem: Problem,
}

/// What is wrong with a line.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// A PDQ hash that does not parse.
    #[error("{text:?} is not a PDQ hash: {source}")]
    Hash {
        /// The text found.
        text: String,
        /// Why.
        #[source]
        source: ParseError,
    },
    /// A quality that is not an integer from 0 to 100.
    #[error("quality {0:?} is not an integer from 0 to 100")]
    Quality(String),
    /// A line in none of the forms the format allows.
    #[error("expected {expected}, found {found:?}")]
    Unrecognised {
        /// The forms allowed.
        expected: &'static str,
        /// The line (shortened).
        found: String,
    },
    /// The CSV header lacks a column.
    #[error(
        "the csv header has no {0:?} column (expected signal_type,signal_str,collab,category,tags)"
    )]
    MissingColumn(&'static str),
    /// The CSV does not parse (quoting, a row with a different number of fields).
    #[error("{0}")]
    Csv(String),
    /// A vPDQ signal does not parse.
    #[error("{0}")]
    Vpdq(#[source] vpdq::Error),
    /// A JSON reference object or array does not parse.
    #[error("{0}")]
    Json(#[source] serde_json::Error),
    /// `frame_numbers` and `vpdq` differ in length.
    #[error("{numbers} frame_numbers for {entries} vpdq entries")]
    FrameNumbers {
        /// Frame numbers given.
        numbers: usize,
        /// vPDQ entries given.
        entries: usize,
    },
    /// A frame number beyond what a reference frame index holds.
    #[error("frame number {0} is over 4294967295")]
    FrameNumber(u64),
    /// A reference with no frame.
    #[error("the reference has no frames")]
    NoFrames,
    /// vPDQ lines before the first `# reference` line of a multi-reference file.
    #[error("vPDQ lines before the first `# reference` line")]
    OutsideReference,
    /// A percent-encoded tag value that does not decode.
    #[error("tag {0:?} is not valid percent-encoded UTF-8")]
    Tag(String),
    /// Nothing in the file tells its format.
    #[error("cannot tell the format from {0:?}; name it with --format")]
    Unknown(String),
}

fn at(line: usize, problem: Problem) -> Error {
    Error { line, problem }
}

/// At most this many characters of a bad line are quoted back.
const QUOTED_CHARS: usize = 80;

fn shorten(text: &str) -> String {
    match text.char_indices().nth(QUOTED_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

fn parse_hash(text: &str, line: usize) -> Result<PdqHash, Error> {
    text.parse::<PdqHash>().map_err(|source| {
        at(
            line,
            Problem::Hash {
                text: shorten(text),
                source,
            },
        )
    })
}

fn parse_quality(text: &str, line: usize) -> Result<u8, Error> {
    text.trim()
        .parse::<u8>()
        .ok()
        .filter(|q| *q <= 100)
        .ok_or_else(|| at(line, Problem::Quality(shorten(text))))
}

fn image(hash: PdqHash, quality: u8) -> Vec<FrameSignal> {
    vec![FrameSignal {
        frame_index: 0,
        timestamp_ms: 0,
        hash,
        quality,
    }]
}

fn frame_of(feature: &VpdqFeature, line: usize) -> Result<FrameSignal, Error> {
    Ok(FrameSignal {
        frame_index: u32::try_from(feature.frame_number)
            .map_err(|_| at(line, Problem::FrameNumber(feature.frame_number)))?,
        timestamp_ms: feature.timestamp_ms(),
        hash: feature.hash,
        quality: feature.quality,
    })
}

fn feature_of(frame: &FrameSignal) -> VpdqFeature {
    VpdqFeature {
        frame_number: u64::from(frame.frame_index),
        hash: frame.hash,
        quality: frame.quality,
        // Milliseconds written with 3 decimals read back exactly.
        timestamp_s: frame.timestamp_ms as f64 / 1000.0,
    }
}

// === reading ===

/// Tells the format from the first line that is not blank or a plain `#` comment.
///
/// # Errors
/// [`Problem::Unknown`] when that line fits no format, or the file has no such line.
pub fn sniff(text: &str) -> Result<Format, Error> {
    for (number, raw) in text.lines().enumerate() {
        let line = raw.trim().trim_start_matches('\u{feff}');
        if is_reference_marker(line) {
            return Ok(Format::Vpdq);
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') || line.starts_with('{') {
            return Ok(Format::VpdqJson);
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.contains(&"signal_type") && fields.contains(&"signal_str") {
            return Ok(Format::Csv);
        }
        if let [frame, _, hash, _, ..] = fields.as_slice()
            && frame.parse::<u64>().is_ok()
            && hash.parse::<PdqHash>().is_ok()
        {
            return Ok(Format::Vpdq);
        }
        if let Ok(PdqLine::Frame(..)) = pdq_line(line, number + 1) {
            return Ok(Format::Pdq);
        }
        return Err(at(number + 1, Problem::Unknown(shorten(line))));
    }
    Err(at(1, Problem::Unknown(String::new())))
}

/// Reads `text` in `format`.
///
/// # Errors
/// The first malformed line, as an [`Error`] naming it.
pub fn parse(format: Format, text: &str) -> Result<Parsed, Error> {
    match format {
        Format::Pdq => parse_pdq(text),
        Format::Csv => parse_csv(text),
        Format::Vpdq => parse_vpdq_text(text),
        Format::VpdqJson => parse_vpdq_json(text),
    }
}

/// What one pdq-format line holds.
enum PdqLine {
    Frame(PdqHash, u8),
    Other(String),
}

const PDQ_FORMS: &str = "`pdq <64 hex digits>`, a bare 64-hex-digit hash, or `<hash>,<quality>`";

fn pdq_line(line: &str, number: usize) -> Result<PdqLine, Error> {
    let unrecognised = || {
        at(
            number,
            Problem::Unrecognised {
                expected: PDQ_FORMS,
                found: shorten(line),
            },
        )
    };
    // Hash first: bare, or `hash,quality[,path]` (a path may hold spaces, so split on commas).
    let head = line.split([',', ' ', '\t']).next().unwrap_or_default();
    if head.len() == 64 && head.bytes().all(|b| b.is_ascii_hexdigit()) {
        let hash = parse_hash(head, number)?;
        let rest = &line[head.len()..];
        if rest.trim().is_empty() {
            return Ok(PdqLine::Frame(hash, DEFAULT_QUALITY));
        }
        let Some(fields) = rest.strip_prefix(',') else {
            return Err(unrecognised());
        };
        let quality = fields.split(',').next().unwrap_or_default();
        return Ok(PdqLine::Frame(hash, parse_quality(quality, number)?));
    }
    // `<signal_type> <signal>`.
    let Some((kind, signal)) = line.split_once(char::is_whitespace) else {
        return Err(unrecognised());
    };
    if !kind
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(unrecognised());
    }
    if kind == "pdq" {
        return Ok(PdqLine::Frame(
            parse_hash(signal.trim(), number)?,
            DEFAULT_QUALITY,
        ));
    }
    Ok(PdqLine::Other(kind.to_string()))
}

fn parse_pdq(text: &str) -> Result<Parsed, Error> {
    let mut parsed = Parsed::default();
    for (number, raw) in text.lines().enumerate() {
        let line = raw.trim().trim_start_matches('\u{feff}');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let number = number + 1;
        match pdq_line(line, number)? {
            PdqLine::Frame(hash, quality) => parsed.items.push(Located {
                line: number,
                item: Item::bare(image(hash, quality)),
            }),
            PdqLine::Other(kind) => parsed.skipped.push(Skip {
                line: number,
                reason: other_signal_type(&kind),
            }),
        }
    }
    Ok(parsed)
}

fn other_signal_type(kind: &str) -> String {
    format!("signal type {kind:?} is not imported: framematch holds PDQ frame hashes (pdq, vpdq)")
}

fn parse_csv(text: &str) -> Result<Parsed, Error> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    // From the byte offset: the csv crate's own line count leaves out blank lines, and a
    // record's position is where the reader stood, before any blank lines it then skipped.
    let line_of = |position: Option<&csv::Position>| {
        position.map_or(1, |p| {
            let bytes = text.as_bytes();
            let mut byte = usize::try_from(p.byte())
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            while matches!(bytes.get(byte), Some(b'\n' | b'\r')) {
                byte += 1;
            }
            bytes[..byte].iter().filter(|b| **b == b'\n').count() + 1
        })
    };
    let csv_error =
        |error: csv::Error| at(line_of(error.position()), Problem::Csv(error.to_string()));
    let headers = reader.headers().map_err(csv_error)?.clone();
    let column = |name: &'static str| headers.iter().position(|h| h == name);
    let required = |name: &'static str| column(name).ok_or(at(1, Problem::MissingColumn(name)));
    let signal_type = required("signal_type")?;
    let signal_str = required("signal_str")?;
    let (collab, category, tags) = (column("collab"), column("category"), column("tags"));

    let mut parsed = Parsed::default();
    for record in reader.records() {
        let record = record.map_err(csv_error)?;
        let line = line_of(record.position());
        let field = |index: Option<usize>| index.and_then(|i| record.get(i)).unwrap_or_default();
        let kind = field(Some(signal_type));
        let signal = field(Some(signal_str));
        let frames = match kind {
            "pdq" => image(parse_hash(signal, line)?, DEFAULT_QUALITY),
            "vpdq" => vpdq_signal(signal, line)?,
            other => {
                parsed.skipped.push(Skip {
                    line,
                    reason: other_signal_type(other),
                });
                continue;
            }
        };
        let category_text = field(category);
        if category_text.eq_ignore_ascii_case(FALSE_POSITIVE) {
            parsed.skipped.push(Skip {
                line,
                reason: format!(
                    "category {category_text} marks the signal as not fitting collaboration {:?}",
                    field(collab)
                ),
            });
            continue;
        }
        if !category_text.is_empty()
            && category_text.parse::<Category>().is_err()
            && !PYTX_POSITIVE_CATEGORIES
                .iter()
                .any(|c| c.eq_ignore_ascii_case(category_text))
        {
            parsed.skipped.push(Skip {
                line,
                reason: format!(
                    "unknown category {category_text:?}: expected a framematch category or \
                     TRUE_POSITIVE / WORTH_INVESTIGATING"
                ),
            });
            continue;
        }
        let item = item_from_tags(field(tags), frames, line)?;
        if let Some(reason) = &item.withdrawn {
            parsed.skipped.push(withdrawn_skip(line, reason));
            continue;
        }
        parsed.items.push(Located { line, item });
    }
    Ok(parsed)
}

fn withdrawn_skip(line: usize, reason: &str) -> Skip {
    Skip {
        line,
        reason: format!("the reference was withdrawn ({reason}); withdrawn references never match"),
    }
}

/// A vPDQ signal as a CSV cell holds it: HMA's JSON form, or the reference text form.
fn vpdq_signal(signal: &str, line: usize) -> Result<Vec<FrameSignal>, Error> {
    let features = match vpdq::Vpdq::detect(signal) {
        vpdq::Format::Json => {
            let entries: Vec<String> =
                serde_json::from_str(signal).map_err(|e| at(line, Problem::Json(e)))?;
            json_features(&entries, None, line)?
        }
        vpdq::Format::Text => {
            let mut features = Vec::new();
            for (offset, text) in signal.lines().enumerate() {
                if let Some(feature) = vpdq::parse_text_line(text, offset + 1)
                    .map_err(|e| at(line, Problem::Vpdq(e)))?
                {
                    features.push(frame_of(&feature, line)?);
                }
            }
            features
        }
    };
    if features.is_empty() {
        return Err(at(line, Problem::NoFrames));
    }
    Ok(features)
}

/// Frames from HMA's JSON strings, numbered by `numbers` when given, else by position.
fn json_features(
    entries: &[String],
    numbers: Option<&[u32]>,
    line: usize,
) -> Result<Vec<FrameSignal>, Error> {
    if let Some(numbers) = numbers
        && numbers.len() != entries.len()
    {
        return Err(at(
            line,
            Problem::FrameNumbers {
                numbers: numbers.len(),
                entries: entries.len(),
            },
        ));
    }
    entries
        .iter()
        .enumerate()
        .map(|(entry, text)| {
            let feature =
                vpdq::parse_json_entry(text, entry).map_err(|e| at(line, Problem::Vpdq(e)))?;
            let mut frame = frame_of(&feature, line)?;
            if let Some(numbers) = numbers {
                frame.frame_index = numbers[entry];
            }
            Ok(frame)
        })
        .collect()
}

/// The reference fields the CSV keeps in its space-separated `tags` cell.
const TAG_EXTERNAL_ID: &str = "external_id=";
const TAG_NOTE: &str = "note=";
const TAG_WITHDRAWN: &str = "withdrawn=";

/// Reads `external_id=`, `note=` and `withdrawn=` tags (percent-encoded); any other tags are kept
/// at the end of the note as `tags: a b`.
fn item_from_tags(tags: &str, frames: Vec<FrameSignal>, line: usize) -> Result<Item, Error> {
    let mut item = Item::bare(frames);
    let mut others = Vec::new();
    for tag in tags.split_whitespace() {
        let decode =
            |value: &str| percent_decode(value).ok_or_else(|| at(line, Problem::Tag(shorten(tag))));
        if let Some(value) = tag.strip_prefix(TAG_EXTERNAL_ID) {
            item.external_id = decode(value)?;
        } else if let Some(value) = tag.strip_prefix(TAG_NOTE) {
            item.note = decode(value)?;
        } else if let Some(value) = tag.strip_prefix(TAG_WITHDRAWN) {
            item.withdrawn = Some(decode(value)?);
        } else {
            others.push(tag);
        }
    }
    if !others.is_empty() {
        let kept = format!("tags: {}", others.join(" "));
        item.note = if item.note.is_empty() {
            kept
        } else {
            format!("{}; {kept}", item.note)
        };
    }
    Ok(item)
}

fn is_reference_marker(line: &str) -> bool {
    line.strip_prefix(REFERENCE_MARKER)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
}

/// The JSON object after `# reference` in the text layout.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TextHeader {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    external_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    note: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    withdrawn: Option<String>,
}

fn parse_vpdq_text(text: &str) -> Result<Parsed, Error> {
    let multi = text.lines().any(|l| is_reference_marker(l.trim()));
    let mut parsed = Parsed::default();
    // The reference being read: its line and item.
    let mut current: Option<Located> = if multi {
        None
    } else {
        Some(Located {
            line: 1,
            item: Item::bare(Vec::new()),
        })
    };
    let finish = |located: Located, parsed: &mut Parsed| -> Result<(), Error> {
        if located.item.frames.is_empty() {
            return Err(at(located.line, Problem::NoFrames));
        }
        match &located.item.withdrawn {
            Some(reason) => parsed.skipped.push(withdrawn_skip(located.line, reason)),
            None => parsed.items.push(located),
        }
        Ok(())
    };
    for (number, raw) in text.lines().enumerate() {
        let number = number + 1;
        let line = raw.trim();
        if is_reference_marker(line) {
            if let Some(done) = current.take() {
                finish(done, &mut parsed)?;
            }
            let json = line[REFERENCE_MARKER.len()..].trim();
            let header: TextHeader = if json.is_empty() {
                TextHeader::default()
            } else {
                serde_json::from_str(json).map_err(|e| at(number, Problem::Json(e)))?
            };
            current = Some(Located {
                line: number,
                item: Item {
                    external_id: header.external_id,
                    note: header.note,
                    withdrawn: header.withdrawn,
                    frames: Vec::new(),
                    embeddings: Vec::new(),
                },
            });
            continue;
        }
        let Some(feature) =
            vpdq::parse_text_line(line, number).map_err(|e| at(number, Problem::Vpdq(e)))?
        else {
            continue;
        };
        let Some(located) = current.as_mut() else {
            return Err(at(number, Problem::OutsideReference));
        };
        located.item.frames.push(frame_of(&feature, number)?);
    }
    if let Some(done) = current {
        finish(done, &mut parsed)?;
    }
    Ok(parsed)
}

/// One reference per line in the JSON Lines layout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonReference {
    #[serde(default)]
    external_id: String,
    #[serde(default)]
    note: String,
    /// HMA's vPDQ signal.
    vpdq: Vec<String>,
    /// The frame number of each `vpdq` entry; absent: their positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    frame_numbers: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    withdrawn: Option<String>,
    /// The reference's vectors (framematch's own addition; absent: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    embeddings: Vec<JsonEmbedding>,
}

/// One vector of a [`JsonReference`].
#[derive(Debug, Serialize, Deserialize)]
struct JsonEmbedding {
    /// The frame index it belongs to.
    frame: u32,
    #[serde(default)]
    timestamp_ms: u64,
    space: String,
    values: Vec<f32>,
}

fn parse_vpdq_json(text: &str) -> Result<Parsed, Error> {
    let mut parsed = Parsed::default();
    let trimmed = text.trim_start().trim_start_matches('\u{feff}');
    if trimmed.starts_with('[') {
        // One HMA signal, possibly spread over several lines: one video.
        let first = text.len() - trimmed.len();
        let line = text[..first].matches('\n').count() + 1;
        let entries: Vec<String> =
            serde_json::from_str(trimmed).map_err(|e| at(line + e.line() - 1, Problem::Json(e)))?;
        let frames = json_features(&entries, None, line)?;
        if frames.is_empty() {
            return Err(at(line, Problem::NoFrames));
        }
        parsed.items.push(Located {
            line,
            item: Item::bare(frames),
        });
        return Ok(parsed);
    }
    for (number, raw) in text.lines().enumerate() {
        let number = number + 1;
        let line = raw.trim().trim_start_matches('\u{feff}');
        if line.is_empty() {
            continue;
        }
        let reference: JsonReference =
            serde_json::from_str(line).map_err(|e| at(number, Problem::Json(e)))?;
        let frames = json_features(&reference.vpdq, reference.frame_numbers.as_deref(), number)?;
        if frames.is_empty() && reference.embeddings.is_empty() {
            return Err(at(number, Problem::NoFrames));
        }
        let embeddings = reference
            .embeddings
            .into_iter()
            .map(|e| FrameEmbedding {
                frame_index: e.frame,
                timestamp_ms: e.timestamp_ms,
                space: e.space,
                vector: e.values,
            })
            .collect();
        if let Some(reason) = &reference.withdrawn {
            parsed.skipped.push(withdrawn_skip(number, reason));
            continue;
        }
        parsed.items.push(Located {
            line: number,
            item: Item {
                external_id: reference.external_id,
                note: reference.note,
                withdrawn: None,
                frames,
                embeddings,
            },
        });
    }
    Ok(parsed)
}

// === writing ===

/// Whether [`Writer::write`] wrote an item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// It is in the output.
    Wrote,
    /// The format cannot hold it; why.
    Skipped(String),
}

/// The output, by format.
enum Sink<W: Write> {
    Pdq(W),
    Csv(Box<csv::Writer<W>>),
    Vpdq(W),
    VpdqJson(W),
}

/// Writes a bank's references in one format, one at a time (nothing is buffered beyond the
/// current item, so a bank of any size streams through).
pub struct Writer<W: Write> {
    bank: String,
    category: Category,
    sink: Sink<W>,
}

impl<W: Write> Writer<W> {
    /// A writer for bank `bank` of `category` (the CSV's `collab` and `category` columns). The
    /// CSV header is written at once, so an empty bank still gives a well-formed file.
    ///
    /// # Errors
    /// Writing the header failed.
    pub fn new(format: Format, bank: &str, category: Category, out: W) -> io::Result<Self> {
        let sink = match format {
            Format::Csv => {
                let mut csv = csv::Writer::from_writer(out);
                csv.write_record(CSV_HEADER).map_err(io::Error::other)?;
                Sink::Csv(Box::new(csv))
            }
            Format::Pdq => Sink::Pdq(out),
            Format::Vpdq => Sink::Vpdq(out),
            Format::VpdqJson => Sink::VpdqJson(out),
        };
        Ok(Self {
            bank: bank.to_string(),
            category,
            sink,
        })
    }

    /// Writes one reference, or says why the format cannot hold it.
    ///
    /// # Errors
    /// The output failed.
    pub fn write(&mut self, item: &Item) -> io::Result<Written> {
        match &mut self.sink {
            Sink::Pdq(out) => write_pdq(out, item),
            Sink::Vpdq(out) => write_vpdq_text(out, item),
            Sink::VpdqJson(out) => write_vpdq_json(out, item),
            Sink::Csv(csv) => {
                let record = csv_record(item, &self.bank, self.category);
                csv.write_record(&record).map_err(io::Error::other)?;
                Ok(Written::Wrote)
            }
        }
    }

    /// Flushes and returns the output.
    ///
    /// # Errors
    /// The output failed.
    pub fn finish(self) -> io::Result<W> {
        match self.sink {
            Sink::Pdq(mut out) | Sink::Vpdq(mut out) | Sink::VpdqJson(mut out) => {
                out.flush()?;
                Ok(out)
            }
            Sink::Csv(csv) => csv.into_inner().map_err(|e| e.into_error()),
        }
    }
}

fn write_pdq<W: Write>(out: &mut W, item: &Item) -> io::Result<Written> {
    if item.withdrawn.is_some() {
        return Ok(Written::Skipped(
            "withdrawn: the pdq format cannot mark a hash as withdrawn (use csv, vpdq or vpdq-json)"
                .to_string(),
        ));
    }
    let [frame] = item.frames.as_slice() else {
        return Ok(Written::Skipped(format!(
            "{} frames: the pdq format holds one-frame references only (use csv, vpdq or vpdq-json)",
            item.frames.len()
        )));
    };
    if frame.quality == DEFAULT_QUALITY {
        writeln!(out, "pdq {}", frame.hash)?;
    } else {
        // `pdq <hex>` would read back at quality 100; a hash below it keeps its quality.
        writeln!(out, "{},{}", frame.hash, frame.quality)?;
    }
    Ok(Written::Wrote)
}

fn write_vpdq_text<W: Write>(out: &mut W, item: &Item) -> io::Result<Written> {
    let header = TextHeader {
        external_id: item.external_id.clone(),
        note: item.note.clone(),
        withdrawn: item.withdrawn.clone(),
    };
    let json = serde_json::to_string(&header).map_err(io::Error::other)?;
    writeln!(out, "{REFERENCE_MARKER} {json}")?;
    for frame in &item.frames {
        writeln!(out, "{}", vpdq::text_line(&feature_of(frame)))?;
    }
    Ok(Written::Wrote)
}

fn write_vpdq_json<W: Write>(out: &mut W, item: &Item) -> io::Result<Written> {
    let reference = JsonReference {
        external_id: item.external_id.clone(),
        note: item.note.clone(),
        vpdq: item
            .frames
            .iter()
            .map(|f| vpdq::json_entry(&feature_of(f)))
            .collect(),
        frame_numbers: Some(item.frames.iter().map(|f| f.frame_index).collect()),
        withdrawn: item.withdrawn.clone(),
        embeddings: item
            .embeddings
            .iter()
            .map(|e| JsonEmbedding {
                frame: e.frame_index,
                timestamp_ms: e.timestamp_ms,
                space: e.space.clone(),
                values: e.vector.clone(),
            })
            .collect(),
    };
    serde_json::to_writer(&mut *out, &reference).map_err(io::Error::other)?;
    writeln!(out)?;
    Ok(Written::Wrote)
}

/// `signal_type,signal_str,collab,category,tags` for one reference: a `pdq` row for one frame of
/// quality 100 (the exchange's PDQ signal has no quality), else a `vpdq` row in HMA's JSON form.
fn csv_record(item: &Item, bank: &str, category: Category) -> [String; 5] {
    let (kind, signal) = match item.frames.as_slice() {
        [frame] if frame.quality == DEFAULT_QUALITY => ("pdq", frame.hash.to_string()),
        frames => {
            let entries: Vec<String> = frames
                .iter()
                .map(|f| vpdq::json_entry(&feature_of(f)))
                .collect();
            let json = serde_json::to_string(&entries).unwrap_or_else(|_| "[]".to_string());
            ("vpdq", json)
        }
    };
    let mut tags = Vec::new();
    for (prefix, value) in [
        (TAG_EXTERNAL_ID, Some(&item.external_id)),
        (TAG_NOTE, Some(&item.note)),
        (TAG_WITHDRAWN, item.withdrawn.as_ref()),
    ] {
        if let Some(value) = value.filter(|v| !v.is_empty() || prefix == TAG_WITHDRAWN) {
            tags.push(format!("{prefix}{}", percent_encode(value)));
        }
    }
    [
        kind.to_string(),
        signal,
        bank.to_string(),
        category.as_str().to_string(),
        tags.join(" "),
    ]
}

// === percent-encoding of tag values ===

/// Every byte but ASCII letters, digits and `-._~` as `%XX`, so a value holds no space.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The inverse of [`percent_encode`]; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        if byte == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(byte);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests;
