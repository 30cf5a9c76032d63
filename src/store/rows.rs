//! Decoding of stored values into domain types, shared by both backends: each backend reads its
//! columns in its own driver's way and hands the plain values here, so the rules (and the
//! `Corrupt` errors for values no correct write produces) are written once.

use half::f16;

use super::{Error, MAX_QUALITY};
use crate::hash::PdqHash;
use crate::model::{
    Actor, ApiKey, Bank, BankId, Category, Change, ChangeKind, ChangeSeq, EmbeddingSpace,
    FrameEmbedding, FrameSignal, KeyDigest, KeyId, Metric, OrgId, ReferenceId, ReferenceState,
    Role, Visibility,
};

/// The stored text of a visibility; shared-with organisations live in `bank_shares`.
pub(super) fn visibility_text(visibility: &Visibility) -> &'static str {
    match visibility {
        Visibility::Private => "private",
        Visibility::SharedWith(_) => "shared",
        Visibility::Public => "public",
    }
}

/// How a [`ChangeKind`] is stored: the `kind` text and which id columns it sets.
pub(super) struct ChangeIds {
    pub(super) kind: &'static str,
    pub(super) org: Option<i64>,
    pub(super) bank: Option<i64>,
    pub(super) reference: Option<i64>,
    pub(super) key: Option<i64>,
}

/// The stored form of `kind`; [`change`] is its inverse.
pub(super) fn change_ids(kind: &ChangeKind) -> ChangeIds {
    let ids = |kind, org: Option<i64>, bank: Option<i64>, reference: Option<i64>, key| ChangeIds {
        kind,
        org,
        bank,
        reference,
        key,
    };
    match kind {
        ChangeKind::OrgCreated(org) => ids("org_created", Some(org.0), None, None, None),
        ChangeKind::BankCreated(bank) => ids("bank_created", None, Some(bank.0), None, None),
        ChangeKind::ReferenceAdded { reference, bank } => ids(
            "reference_added",
            None,
            Some(bank.0),
            Some(reference.0),
            None,
        ),
        ChangeKind::ReferenceWithdrawn { reference, bank } => ids(
            "reference_withdrawn",
            None,
            Some(bank.0),
            Some(reference.0),
            None,
        ),
        ChangeKind::BankUpdated(bank) => ids("bank_updated", None, Some(bank.0), None, None),
        ChangeKind::KeyCreated { key, org } => {
            ids("key_created", Some(org.0), None, None, Some(key.0))
        }
        ChangeKind::KeyRevoked { key, org } => {
            ids("key_revoked", Some(org.0), None, None, Some(key.0))
        }
    }
}

/// The columns of one `changes` row.
pub(super) struct ChangeColumns<'a> {
    pub(super) seq: i64,
    pub(super) kind: &'a str,
    pub(super) org: Option<i64>,
    pub(super) bank: Option<i64>,
    pub(super) reference: Option<i64>,
    pub(super) key: Option<i64>,
    pub(super) actor: i64,
    pub(super) actor_key: Option<i64>,
    pub(super) detail: String,
    pub(super) at_ms: i64,
}

/// A change-log row: `kind` names which of the id columns must be set.
pub(super) fn change(columns: ChangeColumns<'_>) -> Result<Change, Error> {
    let ChangeColumns {
        seq,
        kind,
        org,
        bank,
        reference,
        key,
        actor,
        actor_key,
        detail,
        at_ms,
    } = columns;
    let decoded = match (kind, org, bank, reference, key) {
        ("org_created", Some(org), _, _, _) => ChangeKind::OrgCreated(OrgId(org)),
        ("bank_created", _, Some(bank), _, _) => ChangeKind::BankCreated(BankId(bank)),
        ("reference_added", _, Some(bank), Some(reference), _) => ChangeKind::ReferenceAdded {
            reference: ReferenceId(reference),
            bank: BankId(bank),
        },
        ("reference_withdrawn", _, Some(bank), Some(reference), _) => {
            ChangeKind::ReferenceWithdrawn {
                reference: ReferenceId(reference),
                bank: BankId(bank),
            }
        }
        ("bank_updated", _, Some(bank), _, _) => ChangeKind::BankUpdated(BankId(bank)),
        ("key_created", Some(org), _, _, Some(key)) => ChangeKind::KeyCreated {
            key: KeyId(key),
            org: OrgId(org),
        },
        ("key_revoked", Some(org), _, _, Some(key)) => ChangeKind::KeyRevoked {
            key: KeyId(key),
            org: OrgId(org),
        },
        _ => {
            return Err(Error::Corrupt {
                detail: format!(
                    "change {seq} has kind {kind:?} with org {org:?}, bank {bank:?}, \
                     reference {reference:?}, key {key:?}"
                ),
            });
        }
    };
    Ok(Change {
        seq: ChangeSeq(seq),
        kind: decoded,
        actor: Actor {
            org: OrgId(actor),
            key: actor_key.map(KeyId),
        },
        detail,
        at_ms,
    })
}

/// The audit detail of a visibility change: `private`, `public`, `shared with 2,5`.
pub(super) fn visibility_detail(visibility: &Visibility) -> String {
    match visibility {
        Visibility::Private => "private".to_string(),
        Visibility::Public => "public".to_string(),
        Visibility::SharedWith(orgs) if orgs.is_empty() => "shared with nobody".to_string(),
        Visibility::SharedWith(orgs) => {
            let list: Vec<String> = orgs.iter().map(ToString::to_string).collect();
            format!("shared with {}", list.join(","))
        }
    }
}

/// The audit detail of a key's creation or revocation: its role, then its label if it has one,
/// e.g. `contributor: upload pipeline eu-west`.
pub(super) fn key_detail(role: Role, label: &str) -> String {
    if label.is_empty() {
        role.to_string()
    } else {
        format!("{role}: {label}")
    }
}

/// An actor's key (which acts for `key_org`) must act for the actor's organisation: a change
/// never names a key of one organisation acting for another.
pub(super) fn check_actor(actor: Actor, key_org: OrgId) -> Result<(), Error> {
    match actor.key {
        Some(key) if key_org != actor.org => Err(Error::InvalidInput {
            field: "actor",
            reason: format!(
                "api key {key} acts for organisation {key_org}, not {}",
                actor.org
            ),
        }),
        _ => Ok(()),
    }
}

/// The columns of one `api_keys` row.
pub(super) struct ApiKeyColumns<'a> {
    pub(super) id: i64,
    pub(super) org: i64,
    pub(super) role: &'a str,
    pub(super) digest: &'a [u8],
    pub(super) label: String,
    pub(super) created_ms: i64,
    pub(super) revoked_ms: Option<i64>,
}

/// An API key from its columns: the role text and the digest length are checked.
pub(super) fn api_key(columns: ApiKeyColumns<'_>) -> Result<ApiKey, Error> {
    let ApiKeyColumns {
        id,
        org,
        role,
        digest,
        label,
        created_ms,
        revoked_ms,
    } = columns;
    let role: Role = role.parse().map_err(|_| Error::Corrupt {
        detail: format!("api key {id} has unknown role {role:?}"),
    })?;
    let digest: KeyDigest = digest.try_into().map_err(|_| Error::Corrupt {
        detail: format!(
            "api key {id} has a {}-byte digest, expected 32",
            digest.len()
        ),
    })?;
    Ok(ApiKey {
        id: KeyId(id),
        org: OrgId(org),
        role,
        digest,
        label,
        created_ms,
        revoked_ms,
    })
}

/// The columns of one `banks` row with its sorted shares.
pub(super) struct BankColumns<'a> {
    pub(super) id: i64,
    pub(super) name: String,
    pub(super) category: &'a str,
    pub(super) owner: i64,
    pub(super) visibility: &'a str,
    pub(super) shares: Vec<OrgId>,
    pub(super) description: String,
    pub(super) created_ms: i64,
    /// Its embedding spaces, by name.
    pub(super) spaces: Vec<EmbeddingSpace>,
}

/// A bank from its columns: the category and visibility texts are checked, and shares must go
/// with (and only with) the `shared` visibility.
pub(super) fn bank(columns: BankColumns<'_>) -> Result<Bank, Error> {
    let BankColumns {
        id,
        name,
        category,
        owner,
        visibility,
        shares,
        description,
        created_ms,
        spaces,
    } = columns;
    let category: Category = category.parse().map_err(|_| Error::Corrupt {
        detail: format!("bank {id} has unknown category {category:?}"),
    })?;
    let visibility = match (visibility, shares.is_empty()) {
        ("private", true) => Visibility::Private,
        ("public", true) => Visibility::Public,
        ("shared", _) => Visibility::SharedWith(shares),
        (other, _) => {
            return Err(Error::Corrupt {
                detail: format!(
                    "bank {id} has visibility {other:?} with {} shares",
                    shares.len()
                ),
            });
        }
    };
    Ok(Bank {
        id: BankId(id),
        name,
        category,
        owner: OrgId(owner),
        visibility,
        description,
        created_ms,
        embedding_spaces: spaces,
    })
}

/// One embedding space of `bank` from its columns: the dimension is 1 to
/// [`super::MAX_DIMENSION`], the metric a known one, the threshold finite, the index settings
/// (`embedding_spaces.index_params`, schema 4) NULL or their text form.
pub(super) fn space(
    bank: i64,
    name: String,
    dimension: i64,
    metric: &str,
    threshold: f32,
    index: Option<&str>,
) -> Result<EmbeddingSpace, Error> {
    let corrupt = |what: String| Error::Corrupt {
        detail: format!("bank {bank} embedding space {name:?}: {what}"),
    };
    let dimension = u32::try_from(dimension)
        .ok()
        .filter(|d| (1..=super::MAX_DIMENSION).contains(d))
        .ok_or_else(|| corrupt(format!("dimension {dimension}")))?;
    let metric: Metric = metric
        .parse()
        .map_err(|_| corrupt(format!("unknown metric {metric:?}")))?;
    if !threshold.is_finite() {
        return Err(corrupt(format!("threshold {threshold}")));
    }
    let index = index
        .map(|text| text.parse::<crate::index::VectorParams>())
        .transpose()
        .map_err(|bad| corrupt(bad.to_string()))?;
    Ok(EmbeddingSpace {
        name,
        dimension,
        metric,
        threshold,
        index,
    })
}

/// The stored form of a vector: each value as an IEEE 754 half-precision float, little-endian,
/// 2 bytes per value. Values are validated first (finite, within f16's range), so nothing
/// overflows to infinity; the rounding error is at most 2^-11 of a value (under 5e-4 for the
/// components of a unit vector).
pub(super) fn encode_vector(vector: &[f32]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(vector.len() * 2);
    for value in vector {
        bytes.extend_from_slice(&f16::from_f32(*value).to_le_bytes());
    }
    bytes
}

/// The columns of one `embeddings` row, with its space's name and dimension.
pub(super) struct EmbeddingColumns<'a> {
    pub(super) reference: ReferenceId,
    pub(super) frame_index: i64,
    pub(super) timestamp_ms: i64,
    pub(super) space: String,
    pub(super) dimension: i64,
    pub(super) vector: &'a [u8],
}

/// One stored vector, checked: `dimension` f16 values, all finite.
pub(super) fn embedding(columns: EmbeddingColumns<'_>) -> Result<FrameEmbedding, Error> {
    let EmbeddingColumns {
        reference,
        frame_index,
        timestamp_ms,
        space,
        dimension,
        vector,
    } = columns;
    let corrupt = |what: String| Error::Corrupt {
        detail: format!("reference {reference} frame {frame_index} space {space:?}: {what}"),
    };
    let expected = usize::try_from(dimension).unwrap_or(0).saturating_mul(2);
    if vector.len() != expected || expected == 0 {
        return Err(corrupt(format!(
            "vector is {} bytes, dimension {dimension} needs {expected}",
            vector.len()
        )));
    }
    let mut values = Vec::with_capacity(expected / 2);
    for pair in vector.chunks_exact(2) {
        let value = f16::from_le_bytes([pair[0], pair[1]]).to_f32();
        if !value.is_finite() {
            return Err(corrupt(format!("value {value} is not finite")));
        }
        values.push(value);
    }
    Ok(FrameEmbedding {
        frame_index: u32::try_from(frame_index)
            .map_err(|_| corrupt("frame index out of range".to_string()))?,
        timestamp_ms: u64::try_from(timestamp_ms)
            .map_err(|_| corrupt(format!("timestamp {timestamp_ms} ms is negative")))?,
        space,
        vector: values,
    })
}

/// A reference's state from its withdrawal columns, which are both set or both null.
pub(super) fn reference_state(
    id: ReferenceId,
    withdrawn_ms: Option<i64>,
    reason: Option<String>,
) -> Result<ReferenceState, Error> {
    match (withdrawn_ms, reason) {
        (None, None) => Ok(ReferenceState::Active),
        (Some(at_ms), Some(reason)) => Ok(ReferenceState::Withdrawn { reason, at_ms }),
        (at_ms, reason) => Err(Error::Corrupt {
            detail: format!("reference {id} has withdrawal time {at_ms:?} but reason {reason:?}"),
        }),
    }
}

/// A reference's stored frame count.
pub(super) fn frame_count(id: ReferenceId, count: i64) -> Result<u32, Error> {
    u32::try_from(count).map_err(|_| Error::Corrupt {
        detail: format!("reference {id} has frame count {count}"),
    })
}

/// One frame of `reference`, every value checked against its domain type.
pub(super) fn frame(
    reference: ReferenceId,
    frame_index: i64,
    timestamp_ms: i64,
    hash: &[u8],
    quality: i64,
) -> Result<FrameSignal, Error> {
    let corrupt = |what: String| Error::Corrupt {
        detail: format!("reference {reference} frame {frame_index}: {what}"),
    };
    let hash = PdqHash::try_from_slice(hash)
        .map_err(|_| corrupt(format!("hash is {} bytes, expected 32", hash.len())))?;
    Ok(FrameSignal {
        frame_index: u32::try_from(frame_index)
            .map_err(|_| corrupt("frame index out of range".to_string()))?,
        timestamp_ms: u64::try_from(timestamp_ms)
            .map_err(|_| corrupt(format!("timestamp {timestamp_ms} ms is negative")))?,
        hash,
        quality: u8::try_from(quality)
            .ok()
            .filter(|q| *q <= MAX_QUALITY)
            .ok_or_else(|| corrupt(format!("quality {quality} is not 0 to 100")))?,
    })
}
