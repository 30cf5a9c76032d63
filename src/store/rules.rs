//! The rules both backends share: input validation with its documented limits, run before a
//! write transaction starts, so every backend accepts and rejects exactly the same inputs.

use std::collections::HashSet;

use super::*;

/// Bank names: 1..=[`MAX_NAME_CHARS`] characters of `[A-Za-z0-9_.-]`.
pub(super) fn validate_bank_name(name: &str) -> Result<(), Error> {
    validate_name_length("bank name", name)?;
    if let Some((position, found)) = name
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(Error::InvalidInput {
            field: "bank name",
            reason: format!(
                "{found:?} at position {position} is not allowed; use A-Z, a-z, 0-9, '_', '.', '-'"
            ),
        });
    }
    Ok(())
}

/// Organisation names: 1..=[`MAX_NAME_CHARS`] printable characters, no leading or trailing
/// whitespace (so "local" and "local " cannot both exist).
pub(super) fn validate_org_name(name: &str) -> Result<(), Error> {
    validate_name_length("organisation name", name)?;
    if let Some((position, found)) = name.chars().enumerate().find(|(_, c)| c.is_control()) {
        return Err(Error::InvalidInput {
            field: "organisation name",
            reason: format!("control character {found:?} at position {position}"),
        });
    }
    if name.trim() != name {
        return Err(Error::InvalidInput {
            field: "organisation name",
            reason: "leading or trailing whitespace".to_string(),
        });
    }
    Ok(())
}

pub(super) fn validate_name_length(field: &'static str, name: &str) -> Result<(), Error> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(Error::InvalidInput {
            field,
            reason: format!("{chars} characters, must be 1 to {MAX_NAME_CHARS}"),
        });
    }
    Ok(())
}

/// A bank as [`Store::create_bank`] accepts it: valid name and description, normalised shares,
/// valid embedding spaces sorted by name.
pub(super) fn validate_new_bank(new: NewBank) -> Result<NewBank, Error> {
    validate_bank_name(&new.name)?;
    validate_text("description", &new.description)?;
    let mut spaces = new.embedding_spaces;
    if spaces.len() > MAX_SPACES_PER_BANK {
        return Err(Error::InvalidInput {
            field: "embedding_spaces",
            reason: format!("{} spaces, limit is {MAX_SPACES_PER_BANK}", spaces.len()),
        });
    }
    for space in &spaces {
        validate_space(space)?;
    }
    spaces.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(pair) = spaces.windows(2).find(|pair| pair[0].name == pair[1].name) {
        return Err(Error::InvalidInput {
            field: "embedding_spaces",
            reason: format!("embedding space {:?} is declared twice", pair[0].name),
        });
    }
    Ok(NewBank {
        visibility: normalise_visibility(new.visibility),
        embedding_spaces: spaces,
        ..new
    })
}

/// Checks an embedding space declaration against the documented rules.
///
/// # Errors
/// [`Error::InvalidInput`] (`"embedding_spaces"`) naming the space and the numbers.
pub fn validate_space(space: &EmbeddingSpace) -> Result<(), Error> {
    let invalid = |reason: String| Error::InvalidInput {
        field: "embedding_spaces",
        reason,
    };
    let chars = space.name.chars().count();
    if chars == 0 || chars > MAX_SPACE_NAME_CHARS {
        return Err(invalid(format!(
            "embedding space name {:?} has {chars} characters, must be 1 to {MAX_SPACE_NAME_CHARS}",
            space.name
        )));
    }
    if let Some(found) = space
        .name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-')))
    {
        return Err(invalid(format!(
            "embedding space name {:?} has {found:?}; use a-z, 0-9, '_', '-'",
            space.name
        )));
    }
    if !(1..=MAX_DIMENSION).contains(&space.dimension) {
        return Err(invalid(format!(
            "embedding space {:?} has dimension {}, must be 1 to {MAX_DIMENSION}",
            space.name, space.dimension
        )));
    }
    let threshold_ok = match space.metric {
        Metric::Cosine => space.threshold > 0.0 && space.threshold <= 1.0,
        Metric::Dot => space.threshold.is_finite(),
    };
    if !threshold_ok {
        return Err(invalid(format!(
            "embedding space {:?} has threshold {}; a {} threshold must be {}",
            space.name,
            space.threshold,
            space.metric,
            match space.metric {
                Metric::Cosine => "above 0 and at most 1",
                Metric::Dot => "finite",
            }
        )));
    }
    Ok(())
}

/// A reference as [`Store::add_reference`] accepts it into `bank`: valid texts, frames validated
/// and deduplicated, vectors checked against the bank's spaces (cosine ones normalised) and
/// sorted by space and frame index.
pub(super) fn validate_new_reference(
    new: NewReference,
    bank: &Bank,
) -> Result<NewReference, Error> {
    validate_text("external_id", &new.external_id)?;
    validate_text("note", &new.note)?;
    let embeddings = validate_embeddings(new.embeddings, &bank.embedding_spaces)?;
    let frames = if new.frames.is_empty() && !embeddings.is_empty() {
        Vec::new()
    } else {
        dedup_frames(new.frames)?
    };
    Ok(NewReference {
        frames,
        embeddings,
        ..new
    })
}

/// Checks one vector against its space: the dimension, finite values within f16's range, and
/// for cosine a non-zero length; returns it L2-normalised for cosine spaces. `frame_index` only
/// names the frame in errors.
///
/// # Errors
/// [`Error::InvalidInput`] (`"embeddings"`) naming the space and the numbers.
pub fn check_vector(
    space: &EmbeddingSpace,
    frame_index: u32,
    mut vector: Vec<f32>,
) -> Result<Vec<f32>, Error> {
    let invalid = |reason: String| Error::InvalidInput {
        field: "embeddings",
        reason,
    };
    if vector.len() != space.dimension as usize {
        return Err(invalid(format!(
            "embedding space {:?} expects {} values, frame {frame_index} has {}",
            space.name,
            space.dimension,
            vector.len()
        )));
    }
    if let Some((position, value)) = vector
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite() || v.abs() > MAX_VECTOR_VALUE)
    {
        return Err(invalid(format!(
            "embedding space {:?}: frame {frame_index} value {position} is {value}; values must be finite and within ±{MAX_VECTOR_VALUE}",
            space.name
        )));
    }
    if space.metric == Metric::Cosine {
        let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
        if !norm.is_normal() {
            return Err(invalid(format!(
                "embedding space {:?}: frame {frame_index} has a vector of length {norm}; a cosine vector cannot be zero",
                space.name
            )));
        }
        for value in &mut vector {
            *value /= norm;
        }
    }
    Ok(vector)
}

/// Vectors as [`Store::add_reference`] accepts them for a bank with `spaces`.
pub(super) fn validate_embeddings(
    mut embeddings: Vec<FrameEmbedding>,
    spaces: &[EmbeddingSpace],
) -> Result<Vec<FrameEmbedding>, Error> {
    if embeddings.len() > MAX_FRAMES_PER_REFERENCE {
        return Err(Error::InvalidInput {
            field: "embeddings",
            reason: format!(
                "{} vectors, limit is {MAX_FRAMES_PER_REFERENCE}",
                embeddings.len()
            ),
        });
    }
    for embedding in &mut embeddings {
        let Some(space) = spaces.iter().find(|s| s.name == embedding.space) else {
            let declared: Vec<&str> = spaces.iter().map(|s| s.name.as_str()).collect();
            return Err(Error::InvalidInput {
                field: "embeddings",
                reason: format!(
                    "frame {} has a vector of embedding space {:?}, which the bank does not declare (it declares [{}])",
                    embedding.frame_index,
                    embedding.space,
                    declared.join(", ")
                ),
            });
        };
        if i64::try_from(embedding.timestamp_ms).is_err() {
            return Err(Error::InvalidInput {
                field: "embeddings",
                reason: format!(
                    "frame {} has timestamp {} ms, limit is {} ms",
                    embedding.frame_index,
                    embedding.timestamp_ms,
                    i64::MAX
                ),
            });
        }
        embedding.vector = check_vector(
            space,
            embedding.frame_index,
            std::mem::take(&mut embedding.vector),
        )?;
    }
    embeddings.sort_by(|a, b| {
        a.space
            .cmp(&b.space)
            .then(a.frame_index.cmp(&b.frame_index))
    });
    if let Some(pair) = embeddings
        .windows(2)
        .find(|pair| pair[0].space == pair[1].space && pair[0].frame_index == pair[1].frame_index)
    {
        return Err(Error::InvalidInput {
            field: "embeddings",
            reason: format!(
                "frame {} has two vectors of embedding space {:?}; send one",
                pair[0].frame_index, pair[0].space
            ),
        });
    }
    Ok(embeddings)
}

/// API key labels: up to [`MAX_LABEL_BYTES`] bytes, no control characters (they end up in logs
/// and in the audit trail).
pub(super) fn validate_label(label: &str) -> Result<(), Error> {
    if label.len() > MAX_LABEL_BYTES {
        return Err(Error::InvalidInput {
            field: "label",
            reason: format!("{} bytes, limit is {MAX_LABEL_BYTES}", label.len()),
        });
    }
    if let Some((position, found)) = label.chars().enumerate().find(|(_, c)| c.is_control()) {
        return Err(Error::InvalidInput {
            field: "label",
            reason: format!("control character {found:?} at position {position}"),
        });
    }
    Ok(())
}

/// Partner feed names: 1..=[`MAX_SOURCE_BYTES`] bytes.
pub(super) fn validate_source(source: &str) -> Result<(), Error> {
    if source.is_empty() || source.len() > MAX_SOURCE_BYTES {
        return Err(Error::InvalidInput {
            field: "source",
            reason: format!("{} bytes, must be 1 to {MAX_SOURCE_BYTES}", source.len()),
        });
    }
    Ok(())
}

pub(super) fn validate_text(field: &'static str, text: &str) -> Result<(), Error> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(Error::InvalidInput {
            field,
            reason: format!("{} bytes, limit is {MAX_TEXT_BYTES}", text.len()),
        });
    }
    Ok(())
}

/// Sorted, duplicate-free share lists, so that what is stored and read back compares equal.
pub(super) fn normalise_visibility(visibility: Visibility) -> Visibility {
    match visibility {
        Visibility::SharedWith(mut orgs) => {
            orgs.sort_unstable();
            orgs.dedup();
            Visibility::SharedWith(orgs)
        }
        other @ (Visibility::Private | Visibility::Public) => other,
    }
}

/// Validates frames and keeps the first frame of each distinct hash in frame-index order. The
/// result is sorted by frame index (stable, so equal indices keep input order).
pub(super) fn dedup_frames(mut frames: Vec<FrameSignal>) -> Result<Vec<FrameSignal>, Error> {
    if frames.is_empty() {
        return Err(Error::InvalidInput {
            field: "frames",
            reason: "a reference needs at least 1 frame, got 0".to_string(),
        });
    }
    if frames.len() > MAX_FRAMES_PER_REFERENCE {
        return Err(Error::InvalidInput {
            field: "frames",
            reason: format!(
                "{} frames, limit is {MAX_FRAMES_PER_REFERENCE}",
                frames.len()
            ),
        });
    }
    for frame in &frames {
        if frame.quality > MAX_QUALITY {
            return Err(Error::InvalidInput {
                field: "frames.quality",
                reason: format!(
                    "frame {} has quality {}, must be 0 to {MAX_QUALITY}",
                    frame.frame_index, frame.quality
                ),
            });
        }
        if i64::try_from(frame.timestamp_ms).is_err() {
            return Err(Error::InvalidInput {
                field: "frames.timestamp_ms",
                reason: format!(
                    "frame {} has timestamp {} ms, limit is {} ms",
                    frame.frame_index,
                    frame.timestamp_ms,
                    i64::MAX
                ),
            });
        }
    }
    frames.sort_by_key(|frame| frame.frame_index);
    let mut seen: HashSet<PdqHash> = HashSet::with_capacity(frames.len());
    frames.retain(|frame| seen.insert(frame.hash));
    Ok(frames)
}
