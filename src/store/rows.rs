//! Decoding of stored values into domain types, shared by both backends: each backend reads its
//! columns in its own driver's way and hands the plain values here, so the rules (and the
//! `Corrupt` errors for values no correct write produces) are written once.

use super::{Error, MAX_QUALITY};
use crate::hash::PdqHash;
use crate::model::{
    Bank, BankId, Category, Change, ChangeKind, ChangeSeq, FrameSignal, OrgId, ReferenceId,
    ReferenceState, Visibility,
};

/// The stored text of a visibility; shared-with organisations live in `bank_shares`.
pub(super) fn visibility_text(visibility: &Visibility) -> &'static str {
    match visibility {
        Visibility::Private => "private",
        Visibility::SharedWith(_) => "shared",
        Visibility::Public => "public",
    }
}

/// A change-log row: `kind` names which of the id columns must be set.
pub(super) fn change(
    seq: i64,
    kind: &str,
    org: Option<i64>,
    bank: Option<i64>,
    reference: Option<i64>,
    actor: i64,
    at_ms: i64,
) -> Result<Change, Error> {
    let kind = match (kind, org, bank, reference) {
        ("org_created", Some(org), _, _) => ChangeKind::OrgCreated(OrgId(org)),
        ("bank_created", _, Some(bank), _) => ChangeKind::BankCreated(BankId(bank)),
        ("reference_added", _, Some(bank), Some(reference)) => ChangeKind::ReferenceAdded {
            reference: ReferenceId(reference),
            bank: BankId(bank),
        },
        ("reference_withdrawn", _, Some(bank), Some(reference)) => ChangeKind::ReferenceWithdrawn {
            reference: ReferenceId(reference),
            bank: BankId(bank),
        },
        _ => {
            return Err(Error::Corrupt {
                detail: format!(
                    "change {seq} has kind {kind:?} with org {org:?}, bank {bank:?}, reference {reference:?}"
                ),
            });
        }
    };
    Ok(Change {
        seq: ChangeSeq(seq),
        kind,
        actor: OrgId(actor),
        at_ms,
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
