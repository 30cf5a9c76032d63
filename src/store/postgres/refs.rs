//! References with their frames and vectors: adding, withdrawing, reading and the start-up load.

use super::*;

impl PostgresStore {
    /// See [`super::Store::add_reference`]. `new.frames` is validated, non-empty and already
    /// deduplicated.
    pub(in crate::store) async fn add_reference(
        &self,
        new: NewReference,
        actor: Actor,
    ) -> Result<Reference, Error> {
        bounded("add_reference", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let reference = insert_reference(&tx, new, actor).await?;
            tx.commit().await?;
            Ok(reference)
        })
        .await
    }

    /// See [`super::Store::withdraw_reference`]. `reason` is validated.
    pub(in crate::store) async fn withdraw_reference(
        &self,
        id: ReferenceId,
        reason: String,
        actor: Actor,
    ) -> Result<Reference, Error> {
        bounded("withdraw_reference", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            // The row lock makes a concurrent withdrawal wait, then see this one's result.
            let stmt = tx
                .prepare_cached(
                    "SELECT bank_id, withdrawn_ms IS NOT NULL FROM refs WHERE id = $1
                     FOR NO KEY UPDATE",
                )
                .await?;
            let row = tx
                .query_opt(&stmt, &[&id.0])
                .await?
                .ok_or_else(|| Error::NotFound {
                    kind: "reference",
                    key: id.to_string(),
                })?;
            let bank = BankId(row.try_get(0)?);
            if row.try_get::<_, bool>(1)? {
                return Err(Error::AlreadyWithdrawn { reference: id });
            }
            require_actor(&tx, actor).await?;
            let at_ms = now_ms();
            let stmt = tx
                .prepare_cached(
                    "UPDATE refs SET withdrawn_ms = $2, withdrawn_reason = $3 WHERE id = $1",
                )
                .await?;
            tx.execute(&stmt, &[&id.0, &at_ms, &reason]).await?;
            append_change(
                &tx,
                &ChangeKind::ReferenceWithdrawn {
                    reference: id,
                    bank,
                },
                actor,
                &reason,
                at_ms,
            )
            .await?;
            let reference = read_reference(&tx, id).await?;
            tx.commit().await?;
            Ok(reference)
        })
        .await
    }

    /// See [`super::Store::get_reference`].
    pub(in crate::store) async fn get_reference(
        &self,
        id: ReferenceId,
    ) -> Result<Reference, Error> {
        bounded("get_reference", async {
            let client = self.client().await?;
            read_reference(&client, id).await
        })
        .await
    }

    /// See [`super::Store::list_references`]. One statement, one snapshot.
    pub(in crate::store) async fn list_references(
        &self,
        bank: BankId,
        include_withdrawn: bool,
    ) -> Result<Vec<Reference>, Error> {
        bounded("list_references", async {
            let client = self.client().await?;
            // Banks are never deleted: checking first and reading after cannot disagree.
            let stmt = client
                .prepare_cached("SELECT 1 FROM banks WHERE id = $1")
                .await?;
            if client.query_opt(&stmt, &[&bank.0]).await?.is_none() {
                return Err(Error::NotFound {
                    kind: "bank",
                    key: bank.to_string(),
                });
            }
            let stmt = client
                .prepare_cached(&format!(
                    "{REF_SELECT} WHERE bank_id = $1 AND ($2 OR withdrawn_ms IS NULL) ORDER BY id"
                ))
                .await?;
            client
                .query(&stmt, &[&bank.0, &include_withdrawn])
                .await?
                .iter()
                .map(reference_from_row)
                .collect()
        })
        .await
    }

    /// See [`super::Store::reference_frames`]. References are never deleted, so checking
    /// existence and reading frames need not share a snapshot.
    pub(in crate::store) async fn reference_frames(
        &self,
        id: ReferenceId,
    ) -> Result<Vec<FrameSignal>, Error> {
        bounded("reference_frames", async {
            let client = self.client().await?;
            reference_exists(&client, id).await?;
            let stmt = client
                .prepare_cached(
                    "SELECT frame_index, timestamp_ms, hash, quality FROM frames
                     WHERE reference_id = $1 ORDER BY frame_index",
                )
                .await?;
            client
                .query(&stmt, &[&id.0])
                .await?
                .iter()
                .map(|row| frame_from_row(row, 0, id))
                .collect()
        })
        .await
    }

    /// See [`super::Store::reference_embeddings`]. References are never deleted, so checking
    /// existence and reading vectors need not share a snapshot.
    pub(in crate::store) async fn reference_embeddings(
        &self,
        id: ReferenceId,
    ) -> Result<Vec<FrameEmbedding>, Error> {
        bounded("reference_embeddings", async {
            let client = self.client().await?;
            reference_exists(&client, id).await?;
            let stmt = client
                .prepare_cached(
                    "SELECT e.frame_index, e.timestamp_ms, s.name, s.dimension, e.vector
                     FROM embeddings AS e JOIN embedding_spaces AS s ON s.id = e.space_id
                     WHERE e.reference_id = $1 ORDER BY s.name, e.frame_index",
                )
                .await?;
            client
                .query(&stmt, &[&id.0])
                .await?
                .iter()
                .map(|row| embedding_from_row(row, 0, id))
                .collect()
        })
        .await
    }

    /// See [`super::Store::load_active`]. One `REPEATABLE READ READ ONLY` transaction:
    /// the frames, the vectors and the sequence number come from one snapshot, and because
    /// sequence numbers commit in order, that snapshot holds exactly the changes up to the
    /// returned one. Rows are streamed, not buffered. Exempt from [`OPERATION_TIMEOUT`] and
    /// `statement_timeout`: its duration is the data's; a dead connection still fails through
    /// TCP keepalives.
    pub(in crate::store) async fn load_active(&self) -> Result<ActiveSignals, Error> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
        let row = tx
            .query_one(
                "SELECT (SELECT COALESCE(SUM(frame_count), 0)::bigint FROM refs
                         WHERE withdrawn_ms IS NULL),
                        (SELECT COALESCE(MAX(seq), 0) FROM changes)",
                &[],
            )
            .await?;
        let declared: i64 = row.try_get(0)?;
        let seq = ChangeSeq(row.try_get(1)?);
        let declared = usize::try_from(declared).map_err(|_| Error::Corrupt {
            detail: format!("active references declare {declared} frames"),
        })?;
        let mut frames = Vec::with_capacity(declared.min(MAX_PREALLOCATED_FRAMES));
        let stmt = tx
            .prepare(
                "SELECT r.id, r.bank_id, f.frame_index, f.timestamp_ms, f.hash, f.quality
                 FROM refs AS r JOIN frames AS f ON f.reference_id = r.id
                 WHERE r.withdrawn_ms IS NULL
                 ORDER BY r.id",
            )
            .await?;
        let no_params: [i64; 0] = [];
        let mut rows = pin!(tx.query_raw(&stmt, no_params).await?);
        while let Some(row) = rows.next().await {
            let row = row?;
            let reference = ReferenceId(row.try_get(0)?);
            frames.push(IndexedFrame {
                reference,
                bank: BankId(row.try_get(1)?),
                frame: frame_from_row(&row, 2, reference)?,
            });
        }
        let stmt = tx
            .prepare(
                "SELECT r.id, r.bank_id, e.frame_index, e.timestamp_ms, s.name, s.dimension,
                        e.vector
                 FROM refs AS r JOIN embeddings AS e ON e.reference_id = r.id
                 JOIN embedding_spaces AS s ON s.id = e.space_id
                 WHERE r.withdrawn_ms IS NULL
                 ORDER BY r.id",
            )
            .await?;
        let mut embeddings = Vec::new();
        let mut rows = pin!(tx.query_raw(&stmt, no_params).await?);
        while let Some(row) = rows.next().await {
            let row = row?;
            let reference = ReferenceId(row.try_get(0)?);
            embeddings.push(IndexedEmbedding {
                reference,
                bank: BankId(row.try_get(1)?),
                embedding: embedding_from_row(&row, 2, reference)?,
            });
        }
        tx.commit().await?;
        if frames.len() != declared {
            return Err(Error::Corrupt {
                detail: format!(
                    "active references declare {declared} frames but {} are stored",
                    frames.len()
                ),
            });
        }
        Ok(ActiveSignals {
            frames,
            embeddings,
            seq,
        })
    }
}

/// framematch's timeouts and name, where the URL did not choose its own.
/// [`Error::NotFound`] unless reference `id` exists.
pub(super) async fn reference_exists(
    client: &impl GenericClient,
    id: ReferenceId,
) -> Result<(), Error> {
    let stmt = client
        .prepare_cached("SELECT 1 FROM refs WHERE id = $1")
        .await?;
    match client.query_opt(&stmt, &[&id.0]).await? {
        Some(_) => Ok(()),
        None => Err(Error::NotFound {
            kind: "reference",
            key: id.to_string(),
        }),
    }
}

/// Inserts a reference's vectors, up to [`VECTOR_BYTES_PER_INSERT`] per statement. They are
/// validated against the bank's spaces (which never change), so every space named exists.
pub(super) async fn insert_embeddings(
    tx: &Transaction<'_>,
    reference: ReferenceId,
    embeddings: &[FrameEmbedding],
) -> Result<(), Error> {
    if embeddings.is_empty() {
        return Ok(());
    }
    let read = tx
        .prepare_cached("SELECT id FROM embedding_spaces WHERE name = $1")
        .await?;
    let mut ids: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for embedding in embeddings {
        if !ids.contains_key(embedding.space.as_str()) {
            let id: i64 = tx.query_one(&read, &[&embedding.space]).await?.try_get(0)?;
            ids.insert(&embedding.space, id);
        }
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO embeddings (reference_id, space_id, frame_index, timestamp_ms, vector)
             SELECT $1, space_id, frame_index, timestamp_ms, vector
             FROM UNNEST($2::bigint[], $3::bigint[], $4::bigint[], $5::bytea[])
                 AS e (space_id, frame_index, timestamp_ms, vector)",
        )
        .await?;
    let per_insert = embeddings.first().map_or(1, |e| {
        (VECTOR_BYTES_PER_INSERT / (e.vector.len() * 2).max(1)).max(1)
    });
    for chunk in embeddings.chunks(per_insert) {
        let space_ids: Vec<i64> = chunk
            .iter()
            .map(|e| ids.get(e.space.as_str()).copied().unwrap_or_default())
            .collect();
        let indices: Vec<i64> = chunk.iter().map(|e| i64::from(e.frame_index)).collect();
        let timestamps = chunk
            .iter()
            .map(|e| {
                i64::try_from(e.timestamp_ms).map_err(|_| Error::InvalidInput {
                    field: "embeddings",
                    reason: format!("{} ms does not fit an i64", e.timestamp_ms),
                })
            })
            .collect::<Result<Vec<i64>, Error>>()?;
        let vectors: Vec<Vec<u8>> = chunk
            .iter()
            .map(|e| rows::encode_vector(&e.vector))
            .collect();
        tx.execute(
            &stmt,
            &[&reference.0, &space_ids, &indices, &timestamps, &vectors],
        )
        .await?;
    }
    Ok(())
}

/// Inserts a reference with its frames and its change entry. `new.frames` is validated,
/// non-empty and already deduplicated.
pub(super) async fn insert_reference(
    tx: &Transaction<'_>,
    new: NewReference,
    actor: Actor,
) -> Result<Reference, Error> {
    let frame_count = u32::try_from(new.frames.len()).map_err(|_| Error::InvalidInput {
        field: "frames",
        reason: format!("{} frames do not fit a u32 count", new.frames.len()),
    })?;
    let stmt = tx
        .prepare_cached("SELECT 1 FROM banks WHERE id = $1")
        .await?;
    if tx.query_opt(&stmt, &[&new.bank.0]).await?.is_none() {
        return Err(Error::NotFound {
            kind: "bank",
            key: new.bank.to_string(),
        });
    }
    require_orgs(tx, &[new.added_by]).await?;
    require_actor(tx, actor).await?;
    let added_ms = now_ms();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO refs (bank_id, external_id, note, added_by, added_ms, frame_count)
             VALUES ($1, $2, $3, $4, $5, $6)
             RETURNING id",
        )
        .await?;
    let row = tx
        .query_one(
            &stmt,
            &[
                &new.bank.0,
                &new.external_id,
                &new.note,
                &new.added_by.0,
                &added_ms,
                &i64::from(frame_count),
            ],
        )
        .await?;
    let id = ReferenceId(row.try_get(0)?);
    insert_frames(tx, id, &new.frames).await?;
    insert_embeddings(tx, id, &new.embeddings).await?;
    append_change(
        tx,
        &ChangeKind::ReferenceAdded {
            reference: id,
            bank: new.bank,
        },
        actor,
        "",
        added_ms,
    )
    .await?;
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

/// Inserts a reference's frames, [`FRAMES_PER_INSERT`] per statement.
pub(super) async fn insert_frames(
    tx: &Transaction<'_>,
    reference: ReferenceId,
    frames: &[FrameSignal],
) -> Result<(), Error> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO frames (reference_id, hash, frame_index, timestamp_ms, quality)
             SELECT $1, hash, frame_index, timestamp_ms, quality
             FROM UNNEST($2::bytea[], $3::bigint[], $4::bigint[], $5::smallint[])
                 AS f (hash, frame_index, timestamp_ms, quality)",
        )
        .await?;
    for chunk in frames.chunks(FRAMES_PER_INSERT) {
        let hashes: Vec<&[u8]> = chunk.iter().map(|f| f.hash.as_bytes().as_slice()).collect();
        let indices: Vec<i64> = chunk.iter().map(|f| i64::from(f.frame_index)).collect();
        let timestamps = chunk
            .iter()
            .map(|f| {
                i64::try_from(f.timestamp_ms).map_err(|_| Error::InvalidInput {
                    field: "frames.timestamp_ms",
                    reason: format!("{} ms does not fit an i64", f.timestamp_ms),
                })
            })
            .collect::<Result<Vec<i64>, Error>>()?;
        let qualities: Vec<i16> = chunk.iter().map(|f| i16::from(f.quality)).collect();
        tx.execute(
            &stmt,
            &[&reference.0, &hashes, &indices, &timestamps, &qualities],
        )
        .await?;
    }
    Ok(())
}

pub(super) const REF_SELECT: &str =
    "SELECT id, bank_id, external_id, note, added_by, added_ms, frame_count,
        withdrawn_ms, withdrawn_reason FROM refs";

pub(super) async fn read_reference(
    client: &impl GenericClient,
    id: ReferenceId,
) -> Result<Reference, Error> {
    let stmt = client
        .prepare_cached(&format!("{REF_SELECT} WHERE id = $1"))
        .await?;
    let row = client
        .query_opt(&stmt, &[&id.0])
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: "reference",
            key: id.to_string(),
        })?;
    reference_from_row(&row)
}

pub(super) fn reference_from_row(row: &Row) -> Result<Reference, Error> {
    let id = ReferenceId(row.try_get(0)?);
    let state = rows::reference_state(id, row.try_get(7)?, row.try_get(8)?)?;
    let frame_count = rows::frame_count(id, row.try_get(6)?)?;
    Ok(Reference {
        id,
        bank: BankId(row.try_get(1)?),
        external_id: row.try_get(2)?,
        note: row.try_get(3)?,
        added_by: OrgId(row.try_get(4)?),
        added_ms: row.try_get(5)?,
        state,
        frame_count,
    })
}

/// Reads `frame_index, timestamp_ms, hash, quality` starting at column `first`, checking every
/// value against its domain type. The hash is borrowed from the row, not allocated.
pub(super) fn frame_from_row(
    row: &Row,
    first: usize,
    reference: ReferenceId,
) -> Result<FrameSignal, Error> {
    let quality: i16 = row.try_get(first + 3)?;
    rows::frame(
        reference,
        row.try_get(first)?,
        row.try_get(first + 1)?,
        row.try_get(first + 2)?,
        i64::from(quality),
    )
}

/// Reads `frame_index, timestamp_ms, space name, dimension, vector` starting at column `first`.
pub(super) fn embedding_from_row(
    row: &Row,
    first: usize,
    reference: ReferenceId,
) -> Result<FrameEmbedding, Error> {
    rows::embedding(rows::EmbeddingColumns {
        reference,
        frame_index: row.try_get(first)?,
        timestamp_ms: row.try_get(first + 1)?,
        space: row.try_get(first + 2)?,
        dimension: row.try_get(first + 3)?,
        vector: row.try_get(first + 4)?,
    })
}
