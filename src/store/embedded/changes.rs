//! The change log, follow cursors and the mirrored writes of a follower.

use super::*;

impl EmbeddedStore {
    /// See [`super::Store::follow_cursor`].
    pub(in crate::store) async fn follow_cursor(&self, source: String) -> Result<ChangeSeq, Error> {
        self.read(move |tx| {
            let cursor: Option<i64> = tx
                .prepare_cached("SELECT cursor FROM follows WHERE source = ?1")?
                .query_row([&source], |row| row.get(0))
                .optional()?;
            Ok(ChangeSeq(cursor.unwrap_or(0)))
        })
        .await
    }

    /// See [`super::Store::set_follow_cursor`]. `seq` is not negative.
    pub(in crate::store) async fn set_follow_cursor(
        &self,
        source: String,
        seq: ChangeSeq,
    ) -> Result<(), Error> {
        self.write(move |tx| {
            tx.prepare_cached(
                "INSERT INTO follows (source, cursor, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (source) DO UPDATE
                     SET cursor = excluded.cursor, updated_ms = excluded.updated_ms",
            )?
            .execute((&source, seq.0, now_ms()))?;
            Ok(())
        })
        .await
    }

    /// See [`super::Store::mirrored_bank`].
    pub(in crate::store) async fn mirrored_bank(
        &self,
        source: String,
        remote_id: i64,
    ) -> Result<Option<Bank>, Error> {
        self.read(move |tx| {
            mirrored_bank_id(tx, &source, remote_id)?
                .map(|bank| read_bank(tx, bank))
                .transpose()
        })
        .await
    }

    /// See [`super::Store::create_mirrored_bank`]. `new` is validated and normalised.
    pub(in crate::store) async fn create_mirrored_bank(
        &self,
        source: String,
        remote_id: i64,
        new: NewBank,
        actor: Actor,
    ) -> Result<Bank, Error> {
        self.write(move |tx| {
            if let Some(existing) = mirrored_bank_id(tx, &source, remote_id)? {
                return read_bank(tx, existing);
            }
            let bank = insert_bank(tx, new, actor)?;
            tx.prepare_cached(
                "INSERT INTO mirrored_banks (source, remote_id, bank_id) VALUES (?1, ?2, ?3)",
            )?
            .execute((&source, remote_id, bank.id.0))?;
            Ok(bank)
        })
        .await
    }

    /// See [`super::Store::mirrored_reference`].
    pub(in crate::store) async fn mirrored_reference(
        &self,
        source: String,
        remote_id: i64,
    ) -> Result<Option<ReferenceId>, Error> {
        self.read(move |tx| mirrored_reference_id(tx, &source, remote_id))
            .await
    }

    /// See [`super::Store::add_mirrored_reference`]. `new` is validated and its frames
    /// deduplicated.
    pub(in crate::store) async fn add_mirrored_reference(
        &self,
        source: String,
        remote_id: i64,
        new: NewReference,
        actor: Actor,
    ) -> Result<(Reference, bool), Error> {
        self.write(move |tx| {
            if let Some(existing) = mirrored_reference_id(tx, &source, remote_id)? {
                return Ok((read_reference(tx, existing)?, false));
            }
            let reference = insert_reference(tx, new, actor)?;
            tx.prepare_cached(
                "INSERT INTO mirrored_refs (source, remote_id, reference_id) VALUES (?1, ?2, ?3)",
            )?
            .execute((&source, remote_id, reference.id.0))?;
            Ok((reference, true))
        })
        .await
    }

    /// See [`super::Store::changes_since`].
    pub(in crate::store) async fn changes_since(
        &self,
        after: ChangeSeq,
        limit: usize,
    ) -> Result<Vec<Change>, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |tx| {
            let mut stmt = tx.prepare_cached(&format!(
                "{CHANGE_SELECT} WHERE seq > ?1 ORDER BY seq LIMIT ?2"
            ))?;
            let mut rows = stmt.query((after.0, limit))?;
            let mut changes = Vec::new();
            while let Some(row) = rows.next()? {
                changes.push(change_from_row(row)?);
            }
            Ok(changes)
        })
        .await
    }

    /// See [`super::Store::last_seq`].
    pub(in crate::store) async fn last_seq(&self) -> Result<ChangeSeq, Error> {
        self.read(|tx| last_seq(tx)).await
    }
}

pub(super) fn mirrored_bank_id(
    conn: &Connection,
    source: &str,
    remote_id: i64,
) -> Result<Option<BankId>, Error> {
    let id = conn
        .prepare_cached("SELECT bank_id FROM mirrored_banks WHERE source = ?1 AND remote_id = ?2")?
        .query_row((source, remote_id), |row| row.get(0))
        .optional()?;
    Ok(id.map(BankId))
}

pub(super) fn mirrored_reference_id(
    conn: &Connection,
    source: &str,
    remote_id: i64,
) -> Result<Option<ReferenceId>, Error> {
    let id = conn
        .prepare_cached(
            "SELECT reference_id FROM mirrored_refs WHERE source = ?1 AND remote_id = ?2",
        )?
        .query_row((source, remote_id), |row| row.get(0))
        .optional()?;
    Ok(id.map(ReferenceId))
}

/// Appends the one change entry of the current write transaction.
pub(super) fn append_change(
    conn: &Connection,
    kind: &ChangeKind,
    actor: Actor,
    detail: &str,
    at_ms: i64,
) -> Result<ChangeSeq, Error> {
    let ids = rows::change_ids(kind);
    conn.prepare_cached(
        "INSERT INTO changes
             (kind, org_id, bank_id, reference_id, key_id, actor, actor_key, detail, at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute((
        ids.kind,
        ids.org,
        ids.bank,
        ids.reference,
        ids.key,
        actor.org.0,
        actor.key.map(|key| key.0),
        detail,
        at_ms,
    ))?;
    Ok(ChangeSeq(conn.last_insert_rowid()))
}

pub(super) fn last_seq(conn: &Connection) -> Result<ChangeSeq, Error> {
    let seq = conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM changes")?
        .query_row([], |row| row.get(0))?;
    Ok(ChangeSeq(seq))
}

pub(super) const CHANGE_SELECT: &str =
    "SELECT seq, kind, org_id, bank_id, reference_id, key_id, actor,
        actor_key, detail, at_ms FROM changes";

pub(super) fn change_from_row(row: &Row<'_>) -> Result<Change, Error> {
    let kind: String = row.get(1)?;
    rows::change(rows::ChangeColumns {
        seq: row.get(0)?,
        kind: &kind,
        org: row.get(2)?,
        bank: row.get(3)?,
        reference: row.get(4)?,
        key: row.get(5)?,
        actor: row.get(6)?,
        actor_key: row.get(7)?,
        detail: row.get(8)?,
        at_ms: row.get(9)?,
    })
}
