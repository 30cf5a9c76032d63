//! Conversions at the edge: wire messages into validated domain values (`TryFrom<pb::…>`), and
//! domain values into wire messages (`From<…> for pb::…`).
//!
//! Wire structs are destructured field by field, so a new proto field fails to compile here until
//! it is handled (STYLE.md §1.2). Every check on client input happens in this file or in the hasher.

use std::sync::Arc;

use crate::config::Limits;
use crate::hash::pdq::Dihedral;
use crate::hash::{PDQ_BITS, PdqHash};
use crate::matching::{
    ContentSignal, FrameHit, HitSignal, MatchParams, QueryEmbedding, QueryFrame, SpaceScope,
    VerdictData,
};
use crate::model::{
    Bank, Category, EmbeddingSpace, FrameEmbedding, FrameSignal, Metric, Reference, ReferenceState,
    Visibility,
};
use crate::pb;
use crate::store;

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
    /// No picture and no PDQ hash: the frame carries only the client's vectors.
    Vectors,
}

impl Content {
    /// Whether the frame carries pixels (to hash, and for the server's models to embed).
    pub fn has_pixels(&self) -> bool {
        matches!(self, Content::Image(_) | Content::Rgb { .. })
    }
}

/// Most vectors one frame may carry (one per embedding space).
pub const MAX_EMBEDDINGS_PER_FRAME: usize = store::MAX_SPACES_PER_BANK;

/// A validated frame from a client.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameInput {
    /// Index in the video.
    pub frame_index: u32,
    /// Timestamp in milliseconds.
    pub timestamp_ms: u64,
    /// The content.
    pub content: Content,
    /// The client's own vectors, at most one per space, each with 1 to
    /// [`store::MAX_DIMENSION`] finite values. Whether their spaces and dimensions fit is
    /// checked against the request's banks: [`query_embeddings`], [`reference_embeddings`].
    pub embeddings: Vec<FrameEmbedding>,
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
            embeddings,
        } = frame;
        let embeddings = frame_embeddings(frame_index, timestamp_ms, embeddings)?;
        let content = match signal {
            None if !embeddings.is_empty() => Content::Vectors,
            None => {
                return Err(Error::MissingField {
                    field: "frame.signal (one of image, rgb, pdq) or frame.embeddings",
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
            embeddings,
        })
    }
}

/// The checks on a frame's vectors that need no bank: a space name, 1 to
/// [`store::MAX_DIMENSION`] values, all finite, one vector per space.
fn frame_embeddings(
    frame_index: u32,
    timestamp_ms: u64,
    embeddings: Vec<pb::Embedding>,
) -> Result<Vec<FrameEmbedding>, Error> {
    if embeddings.len() > MAX_EMBEDDINGS_PER_FRAME {
        return Err(Error::OverLimit {
            what: "frame.embeddings",
            actual: embeddings.len() as u64,
            limit: MAX_EMBEDDINGS_PER_FRAME as u64,
            unit: "vectors",
        });
    }
    let mut out: Vec<FrameEmbedding> = Vec::with_capacity(embeddings.len());
    for pb::Embedding { space, values } in embeddings {
        if space.is_empty() {
            return Err(Error::InvalidField {
                field: "frame.embeddings.space",
                reason: format!("is empty in frame {frame_index}; name the embedding space"),
            });
        }
        if values.is_empty() || values.len() > store::MAX_DIMENSION as usize {
            return Err(Error::InvalidField {
                field: "frame.embeddings.values",
                reason: format!(
                    "of embedding space {space:?} in frame {frame_index} has {} values; a vector has 1 to {}",
                    values.len(),
                    store::MAX_DIMENSION
                ),
            });
        }
        if let Some((position, value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::InvalidField {
                field: "frame.embeddings.values",
                reason: format!(
                    "of embedding space {space:?} in frame {frame_index}: value {position} is {value}; values must be finite"
                ),
            });
        }
        if out.iter().any(|e| e.space == space) {
            return Err(Error::InvalidField {
                field: "frame.embeddings",
                reason: format!(
                    "has two vectors of embedding space {space:?} in frame {frame_index}; send one"
                ),
            });
        }
        out.push(FrameEmbedding {
            frame_index,
            timestamp_ms,
            space,
            vector: values,
        });
    }
    Ok(out)
}

/// A store validation error about vectors, as the client's field error.
fn vector_error(error: store::Error) -> Error {
    match error {
        store::Error::InvalidInput { reason, .. } => Error::InvalidField {
            field: "frame.embeddings",
            reason: format!("rejected: {reason}"),
        },
        other => Error::Store(other),
    }
}

/// An upload frame's own vectors as the index searches them: each must be of a space that a
/// bank in scope declares, with its dimension (the same rules as the store's,
/// [`store::check_vector`]); cosine vectors are L2-normalised.
///
/// # Errors
/// [`Error::InvalidField`] naming the space and the numbers.
pub fn query_embeddings(
    embeddings: Vec<FrameEmbedding>,
    scopes: &[SpaceScope],
) -> Result<Vec<QueryEmbedding>, Error> {
    embeddings
        .into_iter()
        .map(|embedding| {
            let Some(scope) = scopes.iter().find(|s| *s.space == *embedding.space) else {
                let names: Vec<&str> = scopes.iter().map(|s| &*s.space).collect();
                return Err(Error::InvalidField {
                    field: "frame.embeddings",
                    reason: format!(
                        "rejected: frame {} has a vector of embedding space {:?}, which no bank in scope declares (in scope: [{}])",
                        embedding.frame_index,
                        embedding.space,
                        names.join(", ")
                    ),
                });
            };
            let space = EmbeddingSpace {
                name: embedding.space,
                dimension: scope.dimension,
                metric: scope.metric,
                threshold: 1.0,
                index: None,
            };
            let vector = store::check_vector(&space, embedding.frame_index, embedding.vector)
                .map_err(vector_error)?;
            Ok(QueryEmbedding {
                space: Arc::clone(&scope.space),
                vector,
                content_area: false,
                window: None,
            })
        })
        .collect()
}

/// A reference frame's own vectors, checked against the bank's spaces (as the store will check
/// them) so a bad frame ends the stream at once.
///
/// # Errors
/// [`Error::InvalidField`] naming the space and the numbers.
pub fn reference_embeddings(
    embeddings: &[FrameEmbedding],
    spaces: &[EmbeddingSpace],
) -> Result<(), Error> {
    for embedding in embeddings {
        let Some(space) = spaces.iter().find(|s| s.name == embedding.space) else {
            let names: Vec<&str> = spaces.iter().map(|s| s.name.as_str()).collect();
            return Err(Error::InvalidField {
                field: "frame.embeddings",
                reason: format!(
                    "rejected: frame {} has a vector of embedding space {:?}, which the bank does not declare (it declares [{}])",
                    embedding.frame_index,
                    embedding.space,
                    names.join(", ")
                ),
            });
        };
        store::check_vector(space, embedding.frame_index, embedding.vector.clone())
            .map_err(vector_error)?;
    }
    Ok(())
}

/// The server's defaults for a space a request leaves partly unset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpaceDefaults {
    /// Threshold for a request's 0.
    pub threshold: f32,
    /// Dimension for a request's 0.
    pub dimension: u32,
    /// Metric for UNSPECIFIED.
    pub metric: Metric,
    /// Index settings for an empty `index` (the server's `--vector-index`).
    pub index: crate::index::VectorParams,
}

/// A bank's embedding space from a CreateBank request: 0 and UNSPECIFIED take the server's model
/// of that name (`model`), or else `defaults`; the result must pass
/// [`store::validate_space`] (threshold in (0, 1] for cosine, dimension 1 to 4096).
///
/// # Errors
/// [`Error::InvalidField`] naming the space and the numbers.
pub fn embedding_space_from_pb(
    space: pb::EmbeddingSpace,
    model: Option<(u32, Metric)>,
    defaults: SpaceDefaults,
) -> Result<EmbeddingSpace, Error> {
    let pb::EmbeddingSpace {
        name,
        dimension,
        metric,
        threshold,
        index,
    } = space;
    let index = if index.trim().is_empty() {
        defaults.index
    } else {
        index
            .parse::<crate::index::VectorParams>()
            .map_err(|bad| Error::InvalidField {
                field: "embedding_spaces.index",
                reason: format!("embedding space {name:?}: {bad}"),
            })?
    };
    let metric = match pb::EmbeddingMetric::try_from(metric) {
        Ok(pb::EmbeddingMetric::Unspecified) => model.map_or(defaults.metric, |(_, m)| m),
        Ok(pb::EmbeddingMetric::Cosine) => Metric::Cosine,
        Ok(pb::EmbeddingMetric::Dot) => Metric::Dot,
        Err(_) => {
            return Err(Error::InvalidField {
                field: "embedding_spaces.metric",
                reason: format!("{metric} is not a known metric of space {name:?}"),
            });
        }
    };
    let dimension = match dimension {
        0 => model.map_or(defaults.dimension, |(d, _)| d),
        d => d,
    };
    if let Some((model_dimension, model_metric)) = model
        && (model_dimension != dimension || model_metric != metric)
    {
        return Err(Error::InvalidField {
            field: "embedding_spaces",
            reason: format!(
                "declare embedding space {name:?} with dimension {dimension} ({metric}), but the server's model of that name gives {model_dimension} ({model_metric})"
            ),
        });
    }
    let space = EmbeddingSpace {
        name,
        dimension,
        metric,
        threshold: if threshold == 0.0 {
            defaults.threshold
        } else {
            threshold
        },
        index: Some(index),
    };
    store::validate_space(&space).map_err(|error| match error {
        store::Error::InvalidInput { field, reason } => Error::InvalidField { field, reason },
        other => Error::Store(other),
    })?;
    Ok(space)
}

/// A bank's embedding space for the wire.
pub fn embedding_space_to_pb(space: &EmbeddingSpace) -> pb::EmbeddingSpace {
    pb::EmbeddingSpace {
        name: space.name.clone(),
        dimension: space.dimension,
        metric: match space.metric {
            Metric::Cosine => pb::EmbeddingMetric::Cosine,
            Metric::Dot => pb::EmbeddingMetric::Dot,
        } as i32,
        threshold: space.threshold,
        index: space.index_params().to_string(),
    }
}

/// A reference's stored vectors as wire frames (GetReference's `include_embeddings`): one frame
/// per frame index, in order, with its timestamp and its vectors, no signal.
pub fn embedding_frames_to_pb(embeddings: &[FrameEmbedding]) -> Vec<pb::Frame> {
    let mut frames: std::collections::BTreeMap<u32, pb::Frame> = std::collections::BTreeMap::new();
    for embedding in embeddings {
        frames
            .entry(embedding.frame_index)
            .or_insert_with(|| pb::Frame {
                frame_index: embedding.frame_index,
                timestamp_ms: embedding.timestamp_ms,
                signal: None,
                embeddings: Vec::new(),
            })
            .embeddings
            .push(embedding_to_pb(embedding));
    }
    frames.into_values().collect()
}

/// A stored vector for the wire.
pub fn embedding_to_pb(embedding: &FrameEmbedding) -> pb::Embedding {
    pb::Embedding {
        space: embedding.space.clone(),
        values: embedding.vector.clone(),
    }
}

/// A reference's stored frames and vectors for the wire (export and the change feed): each
/// frame with the vectors of its frame index; vectors of a frame index without a PDQ frame come
/// as a frame with an empty `pdq` (quality 0). Frames by index; a frame index stored twice (the
/// whole picture and its content area) carries its vectors on the first.
pub fn stored_frames_to_pb(
    frames: &[FrameSignal],
    embeddings: &[FrameEmbedding],
) -> Vec<pb::StoredFrame> {
    let mut out: Vec<pb::StoredFrame> = frames.iter().map(stored_frame_to_pb).collect();
    let mut first: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for (position, frame) in out.iter().enumerate() {
        first.entry(frame.frame_index).or_insert(position);
    }
    for embedding in embeddings {
        match first
            .get(&embedding.frame_index)
            .and_then(|&p| out.get_mut(p))
        {
            Some(frame) => frame.embeddings.push(embedding_to_pb(embedding)),
            None => out.push(pb::StoredFrame {
                frame_index: embedding.frame_index,
                timestamp_ms: embedding.timestamp_ms,
                pdq: Vec::new(),
                quality: 0,
                embeddings: vec![embedding_to_pb(embedding)],
            }),
        }
    }
    // Stable: the frames of one index keep their order.
    out.sort_by_key(|f| f.frame_index);
    out
}

/// The frames and vectors of wire stored frames (import and the follower): a frame with an
/// empty `pdq` carries vectors only.
///
/// # Errors
/// [`Error::InvalidField`] for a hash that is not 32 bytes, a quality above 100, or a vector
/// that breaks the rules of [`FrameInput`]'s.
pub fn stored_frames_from_pb(
    frames: Vec<pb::StoredFrame>,
) -> Result<(Vec<FrameSignal>, Vec<FrameEmbedding>), Error> {
    let mut signals = Vec::with_capacity(frames.len());
    let mut vectors = Vec::new();
    for pb::StoredFrame {
        frame_index,
        timestamp_ms,
        pdq,
        quality,
        embeddings,
    } in frames
    {
        vectors.extend(frame_embeddings(frame_index, timestamp_ms, embeddings)?);
        if pdq.is_empty() {
            continue;
        }
        let (hash, quality, _) = pdq_signal("frames.pdq", pdq, quality, &[])?;
        signals.push(FrameSignal {
            frame_index,
            timestamp_ms,
            hash,
            quality,
        });
    }
    Ok((signals, vectors))
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
            window: hit.window.map(|r| pb::Region {
                x: r.x,
                y: r.y,
                width: r.width,
                height: r.height,
            }),
        })
        .collect();
    pb::FrameResult {
        frame_index: signal.frame_index,
        timestamp_ms: signal.timestamp_ms,
        pdq: signal.hash.as_bytes().to_vec(),
        pdq_hex: signal.hash.to_hex(),
        quality: u32::from(signal.quality),
        low_quality: query.has_pdq && signal.quality < params.min_quality,
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
        embedding_spaces: bank
            .embedding_spaces
            .iter()
            .map(embedding_space_to_pb)
            .collect(),
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
        frames: Vec::new(),
    }
}

#[cfg(test)]
mod tests;
