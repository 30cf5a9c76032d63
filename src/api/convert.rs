//! Conversions at the edge: wire messages into validated domain values (`TryFrom<pb::…>`), and
//! domain values into wire messages (`From<…> for pb::…`).
//!
//! Wire structs are destructured field by field, so a new proto field fails to compile here until
//! it is handled (STYLE.md §1.2). Every check on client input happens in this file or in the hasher.

use crate::config::Limits;
use crate::hash::pdq::Dihedral;
use crate::hash::{PDQ_BITS, PdqHash};
use crate::matching::{ContentSignal, FrameHit, HitSignal, MatchParams, QueryFrame, VerdictData};
use crate::model::{Bank, Category, FrameSignal, Reference, ReferenceState, Visibility};
use crate::pb;

use super::{Catalog, Error};

/// What a frame carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Encoded image bytes.
    Image(Vec<u8>),
    /// Packed RGB24 pixels (length already checked against the dimensions).
    Rgb {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// `width * height * 3` bytes.
        data: Vec<u8>,
    },
    /// A precomputed PDQ hash.
    Pdq {
        /// The hash.
        hash: PdqHash,
        /// Its quality, 0..=100.
        quality: u8,
        /// All 8 dihedral variants (the hash first), when the client sent the other seven.
        variants: Option<Box<[PdqHash; 8]>>,
        /// The content area's signal, when the client found uniform borders.
        content: Option<Box<ContentSignal>>,
    },
}

/// A validated frame from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameInput {
    /// Index in the video.
    pub frame_index: u32,
    /// Timestamp in milliseconds.
    pub timestamp_ms: u64,
    /// The content.
    pub content: Content,
}

impl FrameInput {
    /// Converts and validates a wire frame against the server's limits.
    ///
    /// # Errors
    /// [`Error::MissingField`] and [`Error::InvalidField`] for malformed frames (INVALID_ARGUMENT),
    /// [`Error::OverLimit`] for frames over a limit (RESOURCE_EXHAUSTED).
    pub fn try_from_pb(frame: pb::Frame, limits: &Limits) -> Result<Self, Error> {
        let pb::Frame {
            frame_index,
            timestamp_ms,
            signal,
            embeddings: _,
        } = frame;
        let content = match signal {
            None => {
                return Err(Error::MissingField {
                    field: "frame.signal (one of image, rgb, pdq)",
                });
            }
            Some(pb::frame::Signal::Image(bytes)) => {
                if bytes.is_empty() {
                    return Err(Error::InvalidField {
                        field: "frame.image",
                        reason: "is empty; send the encoded image bytes".into(),
                    });
                }
                if bytes.len() > limits.max_image_bytes {
                    return Err(Error::OverLimit {
                        what: "frame.image",
                        actual: bytes.len() as u64,
                        limit: limits.max_image_bytes as u64,
                        unit: "bytes",
                    });
                }
                Content::Image(bytes)
            }
            Some(pb::frame::Signal::Rgb(pb::RawRgb {
                width,
                height,
                data,
            })) => {
                if width == 0 || height == 0 {
                    return Err(Error::InvalidField {
                        field: "frame.rgb",
                        reason: format!("is {width}x{height}; both sides must be at least 1"),
                    });
                }
                let pixels = u64::from(width) * u64::from(height);
                if pixels > limits.max_pixels {
                    return Err(Error::OverLimit {
                        what: "frame.rgb pixels",
                        actual: pixels,
                        limit: limits.max_pixels,
                        unit: "pixels",
                    });
                }
                let expected = pixels * 3;
                if data.len() as u64 != expected {
                    return Err(Error::InvalidField {
                        field: "frame.rgb.data",
                        reason: format!(
                            "has {} bytes; {width}x{height} RGB24 needs {expected}",
                            data.len()
                        ),
                    });
                }
                Content::Rgb {
                    width,
                    height,
                    data,
                }
            }
            Some(pb::frame::Signal::Pdq(signal)) => {
                let pb::PdqSignal {
                    hash,
                    quality,
                    variants,
                    content,
                } = signal;
                let (hash, quality, variants) = pdq_signal("frame.pdq", hash, quality, &variants)?;
                let content = match content {
                    None => None,
                    Some(inner) => {
                        let pb::PdqSignal {
                            hash,
                            quality,
                            variants,
                            content,
                        } = *inner;
                        if content.is_some() {
                            return Err(Error::InvalidField {
                                field: "frame.pdq.content.content",
                                reason: "is set; a content hash has no content hash of its own"
                                    .into(),
                            });
                        }
                        let (hash, quality, variants) =
                            pdq_signal("frame.pdq.content", hash, quality, &variants)?;
                        Some(Box::new(ContentSignal {
                            hash,
                            quality,
                            variants: variants.map(|v| *v),
                        }))
                    }
                };
                Content::Pdq {
                    hash,
                    quality,
                    variants,
                    content,
                }
            }
        };
        Ok(Self {
            frame_index,
            timestamp_ms,
            content,
        })
    }
}

/// A checked precomputed hash: the hash, its quality, and all 8 variants when they were sent.
type CheckedPdq = (PdqHash, u8, Option<Box<[PdqHash; 8]>>);

/// A precomputed hash, its quality and its optional 7 other variants. `field` names the message
/// in errors.
fn pdq_signal(
    field: &'static str,
    hash: Vec<u8>,
    quality: u32,
    variants: &[Vec<u8>],
) -> Result<CheckedPdq, Error> {
    let hash = PdqHash::try_from_slice(&hash).map_err(|e| Error::InvalidField {
        field,
        reason: format!("hash: {e}"),
    })?;
    let quality = u8::try_from(quality)
        .ok()
        .filter(|q| *q <= 100)
        .ok_or_else(|| Error::InvalidField {
            field,
            reason: format!("quality is {quality}; PDQ quality is 0 to 100"),
        })?;
    let variants = match variants.len() {
        0 => None,
        7 => {
            let mut all = [hash; 8];
            for (slot, bytes) in all.iter_mut().skip(1).zip(variants) {
                *slot = PdqHash::try_from_slice(bytes).map_err(|e| Error::InvalidField {
                    field,
                    reason: format!("variants: {e}"),
                })?;
            }
            Some(Box::new(all))
        }
        n => {
            return Err(Error::InvalidField {
                field,
                reason: format!(
                    "has {n} variants; send none or all 7 (rot90, rot180, rot270, flipx, flipy, flipplus1, flipminus1)"
                ),
            });
        }
    };
    Ok((hash, quality, variants))
}

/// Merges request options over the server's defaults.
///
/// # Errors
/// [`Error::InvalidField`] for an option out of range.
pub fn match_params(
    options: Option<pb::MatchOptions>,
    defaults: &MatchParams,
) -> Result<(MatchParams, Vec<String>), Error> {
    let Some(pb::MatchOptions {
        banks,
        max_distance,
        min_quality,
        dihedral,
        query_match_threshold_pct,
        reference_match_threshold_pct,
        max_matches_per_frame,
        expected_frame_count,
        min_run_ms,
    }) = options
    else {
        return Ok((defaults.clone(), Vec::new()));
    };
    let max_distance = match max_distance {
        None => defaults.max_distance,
        Some(d) if d <= PDQ_BITS / 2 => d,
        Some(d) => {
            return Err(Error::InvalidField {
                field: "options.max_distance",
                reason: format!("is {d} bits; at most {} (half the hash)", PDQ_BITS / 2),
            });
        }
    };
    let min_quality = match min_quality {
        None => defaults.min_quality,
        Some(q) => {
            u8::try_from(q)
                .ok()
                .filter(|q| *q <= 100)
                .ok_or_else(|| Error::InvalidField {
                    field: "options.min_quality",
                    reason: format!("is {q}; PDQ quality is 0 to 100"),
                })?
        }
    };
    let pct = |field: &'static str, value: Option<f64>, default: f64| match value {
        None => Ok(default),
        Some(v) if (0.0..=100.0).contains(&v) => Ok(v),
        Some(v) => Err(Error::InvalidField {
            field,
            reason: format!("is {v}; a percentage is 0 to 100"),
        }),
    };
    let max_matches_per_frame = match max_matches_per_frame {
        None => defaults.max_matches_per_frame,
        Some(n) if (1..=1000).contains(&n) => n as usize,
        Some(n) => {
            return Err(Error::InvalidField {
                field: "options.max_matches_per_frame",
                reason: format!("is {n}; allowed 1 to 1000"),
            });
        }
    };
    let params = MatchParams {
        max_distance,
        min_quality,
        dihedral,
        query_threshold_pct: pct(
            "options.query_match_threshold_pct",
            query_match_threshold_pct,
            defaults.query_threshold_pct,
        )?,
        reference_threshold_pct: pct(
            "options.reference_match_threshold_pct",
            reference_match_threshold_pct,
            defaults.reference_threshold_pct,
        )?,
        max_matches_per_frame,
        expected_frames: expected_frame_count.filter(|n| *n > 0),
        min_run_ms: min_run_ms.map_or(defaults.min_run_ms, u64::from),
        // Filled by the API layer from the banks in scope.
        spaces: Vec::new(),
    };
    Ok((params, banks))
}

/// A category from the wire.
///
/// # Errors
/// [`Error::InvalidField`] for UNSPECIFIED or an unknown number.
pub fn category_from_pb(value: i32) -> Result<Category, Error> {
    match pb::Category::try_from(value) {
        Ok(pb::Category::SuicideSelfHarm) => Ok(Category::SuicideSelfHarm),
        Ok(pb::Category::GraphicViolence) => Ok(Category::GraphicViolence),
        Ok(pb::Category::Terrorism) => Ok(Category::Terrorism),
        Ok(pb::Category::Other) => Ok(Category::Other),
        Ok(pb::Category::Unspecified) | Err(_) => Err(Error::InvalidField {
            field: "category",
            reason: format!(
                "is {value}; choose one of suicide_self_harm, graphic_violence, terrorism, other"
            ),
        }),
    }
}

/// A category for the wire.
pub fn category_to_pb(category: Category) -> pb::Category {
    match category {
        Category::SuicideSelfHarm => pb::Category::SuicideSelfHarm,
        Category::GraphicViolence => pb::Category::GraphicViolence,
        Category::Terrorism => pb::Category::Terrorism,
        Category::Other => pb::Category::Other,
    }
}

/// A dihedral variant for the wire.
pub fn dihedral_to_pb(dihedral: Dihedral) -> pb::Dihedral {
    match dihedral {
        Dihedral::Original => pb::Dihedral::Original,
        Dihedral::Rot90 => pb::Dihedral::Rot90,
        Dihedral::Rot180 => pb::Dihedral::Rot180,
        Dihedral::Rot270 => pb::Dihedral::Rot270,
        Dihedral::FlipX => pb::Dihedral::Flipx,
        Dihedral::FlipY => pb::Dihedral::Flipy,
        Dihedral::FlipPlus1 => pb::Dihedral::Flipplus1,
        Dihedral::FlipMinus1 => pb::Dihedral::Flipminus1,
    }
}

/// Where a reference comes from, as the wire says it.
pub fn source_to_pb(
    catalog: &Catalog,
    reference: crate::model::ReferenceId,
    bank: crate::model::BankId,
) -> pb::ReferenceSource {
    let (bank_name, category, owner) = match catalog.bank(bank) {
        Some(b) => (
            b.name.clone(),
            category_to_pb(b.category),
            catalog.org_name(b.owner),
        ),
        None => (
            format!("bank-{bank}"),
            pb::Category::Unspecified,
            String::new(),
        ),
    };
    pb::ReferenceSource {
        reference_id: reference.0,
        bank: bank_name,
        category: category as i32,
        owner,
    }
}

/// One frame's answer.
pub fn frame_result_to_pb(
    catalog: &Catalog,
    query: &QueryFrame,
    hits: &[FrameHit],
    params: &MatchParams,
) -> pb::FrameResult {
    let signal = &query.signal;
    let matches = hits
        .iter()
        .take(params.max_matches_per_frame)
        .map(|hit| pb::FrameMatch {
            source: Some(source_to_pb(catalog, hit.reference, hit.bank)),
            reference_frame_index: hit.reference_frame.frame_index,
            reference_timestamp_ms: hit.reference_frame.timestamp_ms,
            distance: hit.distance,
            dihedral: dihedral_to_pb(hit.dihedral) as i32,
            content_area: hit.content_area,
            signal: match hit.signal {
                HitSignal::Pdq => pb::Signal::Pdq,
                HitSignal::Embedding { .. } => pb::Signal::Embedding,
            } as i32,
            space: match &hit.signal {
                HitSignal::Pdq => String::new(),
                HitSignal::Embedding { space, .. } => space.to_string(),
            },
            score: match hit.signal {
                HitSignal::Pdq => 0.0,
                HitSignal::Embedding { score, .. } => score,
            },
        })
        .collect();
    pb::FrameResult {
        frame_index: signal.frame_index,
        timestamp_ms: signal.timestamp_ms,
        pdq: signal.hash.as_bytes().to_vec(),
        pdq_hex: signal.hash.to_hex(),
        quality: u32::from(signal.quality),
        low_quality: signal.quality < params.min_quality,
        matches,
        total_matches: u32::try_from(hits.len()).unwrap_or(u32::MAX),
        content_pdq: query
            .content
            .map(|c| c.hash.as_bytes().to_vec())
            .unwrap_or_default(),
        content_quality: query.content.map_or(0, |c| u32::from(c.quality)),
    }
}

/// One verdict; its status follows `is_final`.
pub fn verdict_to_pb(catalog: &Catalog, v: &VerdictData) -> pb::Verdict {
    let status = if v.is_final {
        pb::VerdictStatus::Final
    } else {
        pb::VerdictStatus::Provisional
    };
    pb::Verdict {
        source: Some(source_to_pb(catalog, v.reference, v.bank)),
        query_match_pct: v.query_match_pct,
        reference_match_pct: v.reference_match_pct,
        query_frames_matched: v.query_frames_matched,
        query_frames_total: v.query_frames_total,
        reference_frames_matched: v.reference_frames_matched,
        reference_frames_total: v.reference_frames_total,
        is_match: v.is_match,
        status: status as i32,
        percentage_match: v.percentage_match,
        run_match: v.run_match,
        run: v.run.map(|r| pb::MatchedRun {
            query_start_ms: r.query_start_ms,
            query_end_ms: r.query_end_ms,
            reference_start_ms: r.reference_start_ms,
            reference_end_ms: r.reference_end_ms,
            frames: r.frames,
        }),
    }
}

/// A bank for the wire.
///
/// The list of organisations a bank is shared with is told only to callers that may change the
/// bank (`show_shares`): a partner learns that a bank is shared with it, not with whom else.
pub fn bank_to_pb(catalog: &Catalog, bank: &Bank, show_shares: bool) -> pb::Bank {
    let (visibility, shared_with) = match &bank.visibility {
        Visibility::Private => (pb::Visibility::Private, Vec::new()),
        Visibility::Public => (pb::Visibility::Public, Vec::new()),
        Visibility::SharedWith(orgs) => (
            pb::Visibility::Shared,
            if show_shares {
                orgs.iter().map(|org| catalog.org_name(*org)).collect()
            } else {
                Vec::new()
            },
        ),
    };
    pb::Bank {
        embedding_spaces: Vec::new(),
        id: bank.id.0,
        name: bank.name.clone(),
        category: category_to_pb(bank.category) as i32,
        owner: catalog.org_name(bank.owner),
        description: bank.description.clone(),
        created_ms: bank.created_ms,
        visibility: visibility as i32,
        shared_with,
    }
}

/// A visibility from the wire: `VISIBILITY_UNSPECIFIED` is private when `default_private`, and
/// an error otherwise; organisation names must exist; `shared_with` goes with SHARED only.
///
/// # Errors
/// [`Error::InvalidField`] for an unknown value or a list that does not fit the visibility;
/// [`Error::UnknownOrg`] for a name the server does not know.
pub fn visibility_from_pb(
    catalog: &Catalog,
    value: i32,
    shared_with: &[String],
    default_private: bool,
) -> Result<Visibility, Error> {
    let visibility = pb::Visibility::try_from(value).map_err(|_| Error::InvalidField {
        field: "visibility",
        reason: format!("{value} is not a known visibility"),
    })?;
    let needs_list = matches!(visibility, pb::Visibility::Shared);
    if !needs_list && !shared_with.is_empty() {
        return Err(Error::InvalidField {
            field: "shared_with",
            reason: "lists organisations, so visibility must be VISIBILITY_SHARED".to_string(),
        });
    }
    match visibility {
        pb::Visibility::Unspecified if default_private => Ok(Visibility::Private),
        pb::Visibility::Unspecified => Err(Error::MissingField {
            field: "visibility (VISIBILITY_PRIVATE, VISIBILITY_SHARED or VISIBILITY_PUBLIC)",
        }),
        pb::Visibility::Private => Ok(Visibility::Private),
        pb::Visibility::Public => Ok(Visibility::Public),
        pb::Visibility::Shared => {
            if shared_with.is_empty() {
                return Err(Error::InvalidField {
                    field: "shared_with",
                    reason: "is empty; VISIBILITY_SHARED needs at least one organisation"
                        .to_string(),
                });
            }
            shared_with
                .iter()
                .map(|name| {
                    catalog
                        .org_id(name)
                        .ok_or_else(|| Error::UnknownOrg { name: name.clone() })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Visibility::SharedWith)
        }
    }
}

/// A stored frame for the wire (export and the change feed).
pub fn stored_frame_to_pb(frame: &FrameSignal) -> pb::StoredFrame {
    pb::StoredFrame {
        embeddings: Vec::new(),
        frame_index: frame.frame_index,
        timestamp_ms: frame.timestamp_ms,
        pdq: frame.hash.as_bytes().to_vec(),
        quality: u32::from(frame.quality),
    }
}

/// A reference for the wire.
pub fn reference_to_pb(catalog: &Catalog, reference: &Reference) -> pb::Reference {
    let (state, withdrawn_reason, withdrawn_ms) = match &reference.state {
        ReferenceState::Active => (pb::ReferenceState::Active, String::new(), 0),
        ReferenceState::Withdrawn { reason, at_ms } => {
            (pb::ReferenceState::Withdrawn, reason.clone(), *at_ms)
        }
    };
    pb::Reference {
        id: reference.id.0,
        bank: catalog
            .bank(reference.bank)
            .map_or_else(|| format!("bank-{}", reference.bank), |b| b.name.clone()),
        external_id: reference.external_id.clone(),
        note: reference.note.clone(),
        added_by: catalog.org_name(reference.added_by),
        added_ms: reference.added_ms,
        state: state as i32,
        withdrawn_reason,
        withdrawn_ms,
        frame_count: reference.frame_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_image_bytes: 100,
            max_pixels: 64,
            ..Limits::default()
        }
    }

    fn frame(signal: pb::frame::Signal) -> pb::Frame {
        pb::Frame {
            embeddings: Vec::new(),
            frame_index: 3,
            timestamp_ms: 3000,
            signal: Some(signal),
        }
    }

    #[test]
    fn a_frame_without_content_is_missing_a_field() {
        let empty = pb::Frame::default();
        assert!(matches!(
            FrameInput::try_from_pb(empty, &limits()),
            Err(Error::MissingField { .. })
        ));
    }

    #[test]
    fn image_limits_are_checked_at_and_over_the_limit() {
        let at = frame(pb::frame::Signal::Image(vec![1; 100]));
        assert!(FrameInput::try_from_pb(at, &limits()).is_ok());
        let over = frame(pb::frame::Signal::Image(vec![1; 101]));
        assert!(matches!(
            FrameInput::try_from_pb(over, &limits()),
            Err(Error::OverLimit {
                actual: 101,
                limit: 100,
                ..
            })
        ));
        let empty = frame(pb::frame::Signal::Image(Vec::new()));
        assert!(matches!(
            FrameInput::try_from_pb(empty, &limits()),
            Err(Error::InvalidField { .. })
        ));
    }

    #[test]
    fn rgb_frames_are_checked_for_size_and_length() {
        let rgb = |width, height, len| {
            frame(pb::frame::Signal::Rgb(pb::RawRgb {
                width,
                height,
                data: vec![0; len],
            }))
        };
        assert!(FrameInput::try_from_pb(rgb(8, 8, 192), &limits()).is_ok());
        assert!(matches!(
            FrameInput::try_from_pb(rgb(0, 8, 0), &limits()),
            Err(Error::InvalidField { .. })
        ));
        assert!(matches!(
            FrameInput::try_from_pb(rgb(8, 8, 191), &limits()),
            Err(Error::InvalidField { .. })
        ));
        assert!(matches!(
            FrameInput::try_from_pb(rgb(9, 8, 216), &limits()),
            Err(Error::OverLimit { .. })
        ));
    }

    #[test]
    fn pdq_frames_need_32_bytes_and_a_quality_up_to_100() {
        let pdq = |len, quality| {
            frame(pb::frame::Signal::Pdq(pb::PdqSignal {
                hash: vec![0xab; len],
                quality,
                variants: Vec::new(),
                content: None,
            }))
        };
        let ok = FrameInput::try_from_pb(pdq(32, 100), &limits()).expect("valid");
        assert_eq!(
            ok.content,
            Content::Pdq {
                hash: PdqHash::from_bytes([0xab; 32]),
                quality: 100,
                variants: None,
                content: None,
            }
        );
        assert!(FrameInput::try_from_pb(pdq(31, 100), &limits()).is_err());
        assert!(FrameInput::try_from_pb(pdq(32, 101), &limits()).is_err());
    }

    #[test]
    fn options_override_defaults_within_range() {
        let defaults = MatchParams::default();
        let (params, banks) = match_params(None, &defaults).expect("defaults");
        assert_eq!(params, defaults);
        assert!(banks.is_empty());
        let options = pb::MatchOptions {
            banks: vec!["a".into()],
            max_distance: Some(10),
            dihedral: true,
            ..Default::default()
        };
        let (params, banks) = match_params(Some(options), &defaults).expect("valid");
        assert_eq!(params.max_distance, 10);
        assert!(params.dihedral);
        assert_eq!(banks, vec!["a".to_string()]);
        let bad = pb::MatchOptions {
            max_distance: Some(129),
            ..Default::default()
        };
        assert!(match_params(Some(bad), &defaults).is_err());
        let bad = pb::MatchOptions {
            query_match_threshold_pct: Some(101.0),
            ..Default::default()
        };
        assert!(match_params(Some(bad), &defaults).is_err());
    }

    #[test]
    fn categories_round_trip_and_unspecified_is_rejected() {
        for c in Category::ALL {
            assert_eq!(category_from_pb(category_to_pb(c) as i32).ok(), Some(c));
        }
        assert!(category_from_pb(0).is_err());
        assert!(category_from_pb(99).is_err());
    }
}
