//! References with their frames and vectors: adding, withdrawing, reading and the start-up load.

use super::*;

impl EmbeddedStore {
    /// See [`super::Store::add_reference`]. `new.frames` is validated, non-empty and already
    /// deduplicated.
    pub(in crate::store) async fn add_reference(
        &self,
        new: NewReference,
        actor: Actor,
    ) -> Result<Reference, Error> {
        self.write(move |tx| insert_reference(tx, new, actor)).await
    }

    /// See [`super::Store::withdraw_reference`]. `reason` is validated.
    pub(in crate::store) async fn withdraw_reference(
        &self,
        id: ReferenceId,
        reason: String,
        actor: Actor,
    ) -> Result<Reference, Error> {
        self.write(move |tx| {
            let (bank, withdrawn): (i64, bool) = tx
                .prepare_cached("SELECT bank_id, withdrawn_ms IS NOT NULL FROM refs WHERE id = ?1")?
                .query_row([id.0], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?
                .ok_or_else(|| Error::NotFound {
                    kind: "reference",
                    key: id.to_string(),
                })?;
            if withdrawn {
                return Err(Error::AlreadyWithdrawn { reference: id });
            }
            require_actor(tx, actor)?;
            let at_ms = now_ms();
            tx.prepare_cached(
                "UPDATE refs SET withdrawn_ms = ?2, withdrawn_reason = ?3 WHERE id = ?1",
            )?
            .execute((id.0, at_ms, &reason))?;
            append_change(
                tx,
                &ChangeKind::ReferenceWithdrawn {
                    reference: id,
                    bank: BankId(bank),
                },
                actor,
                &reason,
                at_ms,
            )?;
            read_reference(tx, id)
        })
        .await
    }

    /// See [`super::Store::get_reference`].
    pub(in crate::store) async fn get_reference(
        &self,
        id: ReferenceId,
    ) -> Result<Reference, Error> {
        self.read(move |tx| read_reference(tx, id)).await
    }

    /// See [`super::Store::list_references`].
    pub(in crate::store) async fn list_references(
        &self,
        bank: BankId,
        include_withdrawn: bool,
    ) -> Result<Vec<Reference>, Error> {
        self.read(move |tx| {
            require_bank(tx, bank)?;
            let mut stmt = tx.prepare_cached(&format!(
                "{REF_SELECT} WHERE bank_id = ?1 AND (?2 OR withdrawn_ms IS NULL) ORDER BY id"
            ))?;
            let mut rows = stmt.query((bank.0, include_withdrawn))?;
            let mut references = Vec::new();
            while let Some(row) = rows.next()? {
                references.push(reference_from_row(row)?);
            }
            Ok(references)
        })
        .await
    }

    /// See [`super::Store::reference_frames`].
    pub(in crate::store) async fn reference_frames(
        &self,
        id: ReferenceId,
    ) -> Result<Vec<FrameSignal>, Error> {
        self.read(move |tx| {
            reference_exists(tx, id)?;
            let mut stmt = tx.prepare_cached(
                "SELECT frame_index, timestamp_ms, hash, quality FROM frames
                 WHERE reference_id = ?1 ORDER BY frame_index",
            )?;
            let mut rows = stmt.query([id.0])?;
            let mut frames = Vec::new();
            while let Some(row) = rows.next()? {
                frames.push(frame_from_row(row, 0, id)?);
            }
            Ok(frames)
        })
        .await
    }

    /// See [`super::Store::reference_embeddings`].
    pub(in crate::store) async fn reference_embeddings(
        &self,
        id: ReferenceId,
    ) -> Result<Vec<FrameEmbedding>, Error> {
        self.read(move |tx| {
            reference_exists(tx, id)?;
            let mut stmt = tx.prepare_cached(
                "SELECT e.frame_index, e.timestamp_ms, s.name, s.dimension, e.vector
                 FROM embeddings AS e JOIN embedding_spaces AS s ON s.id = e.space_id
                 WHERE e.reference_id = ?1 ORDER BY s.name, e.frame_index",
            )?;
            let mut rows = stmt.query([id.0])?;
            let mut embeddings = Vec::new();
            while let Some(row) = rows.next()? {
                embeddings.push(embedding_from_row(row, 0, id)?);
            }
            Ok(embeddings)
        })
        .await
    }

    /// See [`super::Store::load_active`]. One read transaction: the frames, the vectors and the
    /// sequence number come from the same snapshot. Each is one prepared join, driven by `refs`
    /// (few rows) into the `frames` or `embeddings` primary key (each reference's rows
    /// contiguous), so the scans are close to sequential; the frame vector is sized up front.
    pub(in crate::store) async fn load_active(&self) -> Result<ActiveSignals, Error> {
        self.read(|tx| {
            let declared: i64 = tx.query_row(
                "SELECT COALESCE(SUM(frame_count), 0) FROM refs WHERE withdrawn_ms IS NULL",
                [],
                |row| row.get(0),
            )?;
            let seq = last_seq(tx)?;
            let declared = usize::try_from(declared).map_err(|_| Error::Corrupt {
                detail: format!("active references declare {declared} frames"),
            })?;
            let mut frames = Vec::with_capacity(declared.min(MAX_PREALLOCATED_FRAMES));
            // CROSS JOIN pins refs as the outer loop (SQLite never reorders a CROSS JOIN).
            let mut stmt = tx.prepare(
                "SELECT r.id, r.bank_id, f.frame_index, f.timestamp_ms, f.hash, f.quality
                 FROM refs AS r CROSS JOIN frames AS f ON f.reference_id = r.id
                 WHERE r.withdrawn_ms IS NULL",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let reference = ReferenceId(row.get(0)?);
                frames.push(IndexedFrame {
                    reference,
                    bank: BankId(row.get(1)?),
                    frame: frame_from_row(row, 2, reference)?,
                });
            }
            if frames.len() != declared {
                return Err(Error::Corrupt {
                    detail: format!(
                        "active references declare {declared} frames but {} are stored",
                        frames.len()
                    ),
                });
            }
            let mut embeddings = Vec::new();
            let mut stmt = tx.prepare(
                "SELECT r.id, r.bank_id, e.frame_index, e.timestamp_ms, s.name, s.dimension,
                        e.vector
                 FROM refs AS r CROSS JOIN embeddings AS e ON e.reference_id = r.id
                 JOIN embedding_spaces AS s ON s.id = e.space_id
                 WHERE r.withdrawn_ms IS NULL",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let reference = ReferenceId(row.get(0)?);
                embeddings.push(IndexedEmbedding {
                    reference,
                    bank: BankId(row.get(1)?),
                    embedding: embedding_from_row(row, 2, reference)?,
                });
            }
            Ok(ActiveSignals {
                frames,
                embeddings,
                seq,
            })
        })
        .await
    }
}

/// Per-connection settings the durability guarantee depends on, each read back.
/// [`Error::NotFound`] unless reference `id` exists.
pub(super) fn reference_exists(tx: &Transaction<'_>, id: ReferenceId) -> Result<(), Error> {
    if tx
        .prepare_cached("SELECT 1 FROM refs WHERE id = ?1")?
        .exists([id.0])?
    {
        Ok(())
    } else {
        Err(Error::NotFound {
            kind: "reference",
            key: id.to_string(),
        })
    }
}

/// Inserts a reference's vectors. They are validated against the bank's spaces (which never
/// change), so every space named exists.
pub(super) fn insert_embeddings(
    tx: &Transaction<'_>,
    reference: ReferenceId,
    embeddings: &[FrameEmbedding],
) -> Result<(), Error> {
    if embeddings.is_empty() {
        return Ok(());
    }
    let mut ids: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    let mut insert = tx.prepare_cached(
        "INSERT INTO embeddings (reference_id, space_id, frame_index, timestamp_ms, vector)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for embedding in embeddings {
        let space_id = match ids.get(embedding.space.as_str()) {
            Some(id) => *id,
            None => {
                let id: i64 = tx
                    .prepare_cached("SELECT id FROM embedding_spaces WHERE name = ?1")?
                    .query_row([&embedding.space], |row| row.get(0))?;
                ids.insert(&embedding.space, id);
                id
            }
        };
        let timestamp_ms =
            i64::try_from(embedding.timestamp_ms).map_err(|_| Error::InvalidInput {
                field: "embeddings",
                reason: format!("{} ms does not fit an i64", embedding.timestamp_ms),
            })?;
        insert.execute((
            reference.0,
            space_id,
            embedding.frame_index,
            timestamp_ms,
            rows::encode_vector(&embedding.vector),
        ))?;
    }
    Ok(())
}

/// Inserts a reference with its frames and its change entry. `new.frames` is validated,
/// non-empty and already deduplicated.
pub(super) fn insert_reference(
    tx: &Transaction<'_>,
    new: NewReference,
    actor: Actor,
) -> Result<Reference, Error> {
    require_bank(tx, new.bank)?;
    require_org(tx, new.added_by)?;
    require_actor(tx, actor)?;
    let frame_count = u32::try_from(new.frames.len()).map_err(|_| Error::InvalidInput {
        field: "frames",
        reason: format!("{} frames do not fit a u32 count", new.frames.len()),
    })?;
    let added_ms = now_ms();
    tx.prepare_cached(
        "INSERT INTO refs (bank_id, external_id, note, added_by, added_ms, frame_count)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute((
        new.bank.0,
        &new.external_id,
        &new.note,
        new.added_by.0,
        added_ms,
        frame_count,
    ))?;
    let id = ReferenceId(tx.last_insert_rowid());
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO frames (reference_id, hash, frame_index, timestamp_ms, quality)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for frame in &new.frames {
            let timestamp_ms =
                i64::try_from(frame.timestamp_ms).map_err(|_| Error::InvalidInput {
                    field: "frames.timestamp_ms",
                    reason: format!("{} ms does not fit an i64", frame.timestamp_ms),
                })?;
            insert.execute((
                id.0,
                frame.hash.as_bytes().as_slice(),
                frame.frame_index,
                timestamp_ms,
                frame.quality,
            ))?;
        }
    }
    insert_embeddings(tx, id, &new.embeddings)?;
    append_change(
        tx,
        &ChangeKind::ReferenceAdded {
            reference: id,
            bank: new.bank,
        },
        actor,
        "",
        added_ms,
    )?;
    Ok(Reference {
        id,
        bank: new.bank,
        external_id: new.external_id,
        note: new.note,
        added_by: new.added_by,
        added_ms,
        state: ReferenceState::Active,
        frame_count,
    })
}

pub(super) const REF_SELECT: &str =
    "SELECT id, bank_id, external_id, note, added_by, added_ms, frame_count,
        withdrawn_ms, withdrawn_reason FROM refs";

pub(super) fn read_reference(conn: &Connection, id: ReferenceId) -> Result<Reference, Error> {
    let mut stmt = conn.prepare_cached(&format!("{REF_SELECT} WHERE id = ?1"))?;
    let mut rows = stmt.query([id.0])?;
    match rows.next()? {
        Some(row) => reference_from_row(row),
        None => Err(Error::NotFound {
            kind: "reference",
            key: id.to_string(),
        }),
    }
}

pub(super) fn reference_from_row(row: &Row<'_>) -> Result<Reference, Error> {
    let id = ReferenceId(row.get(0)?);
    let state = rows::reference_state(id, row.get(7)?, row.get(8)?)?;
    let frame_count = rows::frame_count(id, row.get(6)?)?;
    Ok(Reference {
        id,
        bank: BankId(row.get(1)?),
        external_id: row.get(2)?,
        note: row.get(3)?,
        added_by: OrgId(row.get(4)?),
        added_ms: row.get(5)?,
        state,
        frame_count,
    })
}

/// Reads `frame_index, timestamp_ms, hash, quality` starting at column `first`, checking every
/// value against its domain type. The hash is borrowed from SQLite, not allocated.
pub(super) fn frame_from_row(
    row: &Row<'_>,
    first: usize,
    reference: ReferenceId,
) -> Result<FrameSignal, Error> {
    let frame_index: i64 = row.get(first)?;
    let hash = row.get_ref(first + 2)?;
    let bytes = hash.as_blob().map_err(|_| Error::Corrupt {
        detail: format!(
            "reference {reference} frame {frame_index}: hash is stored as {}",
            hash.data_type()
        ),
    })?;
    rows::frame(
        reference,
        frame_index,
        row.get(first + 1)?,
        bytes,
        row.get(first + 3)?,
    )
}

/// Reads `frame_index, timestamp_ms, space name, dimension, vector` starting at column `first`.
pub(super) fn embedding_from_row(
    row: &Row<'_>,
    first: usize,
    reference: ReferenceId,
) -> Result<FrameEmbedding, Error> {
    let frame_index: i64 = row.get(first)?;
    let vector = row.get_ref(first + 4)?;
    let bytes = vector.as_blob().map_err(|_| Error::Corrupt {
        detail: format!(
            "reference {reference} frame {frame_index}: vector is stored as {}",
            vector.data_type()
        ),
    })?;
    rows::embedding(rows::EmbeddingColumns {
        reference,
        frame_index,
        timestamp_ms: row.get(first + 1)?,
        space: row.get(first + 2)?,
        dimension: row.get(first + 3)?,
        vector: bytes,
    })
}
