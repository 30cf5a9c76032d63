//! API keys and the audit trail.

use super::*;

impl EmbeddedStore {
    /// See [`super::Store::create_api_key`]. The label is validated.
    pub(in crate::store) async fn create_api_key(
        &self,
        new: NewApiKey,
        actor: Actor,
    ) -> Result<ApiKey, Error> {
        self.write(move |tx| {
            require_org(tx, new.org)?;
            require_actor(tx, actor)?;
            let created_ms = now_ms();
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO api_keys (org_id, role, key_hash, label, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute((
                    new.org.0,
                    new.role.as_str(),
                    new.digest.as_slice(),
                    &new.label,
                    created_ms,
                ));
            match inserted {
                Ok(_) => {}
                Err(err) if is_unique_violation(&err) => {
                    return Err(Error::AlreadyExists {
                        kind: "api key",
                        key: "with this digest".to_string(),
                    });
                }
                Err(err) => return Err(err.into()),
            }
            let id = KeyId(tx.last_insert_rowid());
            append_change(
                tx,
                &ChangeKind::KeyCreated {
                    key: id,
                    org: new.org,
                },
                actor,
                &rows::key_detail(new.role, &new.label),
                created_ms,
            )?;
            Ok(ApiKey {
                id,
                org: new.org,
                role: new.role,
                digest: new.digest,
                label: new.label,
                created_ms,
                revoked_ms: None,
            })
        })
        .await
    }

    /// See [`super::Store::revoke_api_key`].
    pub(in crate::store) async fn revoke_api_key(
        &self,
        id: KeyId,
        actor: Actor,
    ) -> Result<ApiKey, Error> {
        self.write(move |tx| {
            let key = read_api_key(tx, id)?;
            if key.revoked_ms.is_some() {
                return Err(Error::AlreadyRevoked { key: id });
            }
            require_actor(tx, actor)?;
            let at_ms = now_ms();
            tx.prepare_cached("UPDATE api_keys SET revoked_ms = ?2 WHERE id = ?1")?
                .execute((id.0, at_ms))?;
            append_change(
                tx,
                &ChangeKind::KeyRevoked {
                    key: id,
                    org: key.org,
                },
                actor,
                &rows::key_detail(key.role, &key.label),
                at_ms,
            )?;
            Ok(ApiKey {
                revoked_ms: Some(at_ms),
                ..key
            })
        })
        .await
    }

    /// See [`super::Store::get_api_key`].
    pub(in crate::store) async fn get_api_key(&self, id: KeyId) -> Result<ApiKey, Error> {
        self.read(move |tx| read_api_key(tx, id)).await
    }

    /// See [`super::Store::list_api_keys`].
    pub(in crate::store) async fn list_api_keys(&self) -> Result<Vec<ApiKey>, Error> {
        self.read(|tx| {
            tx.prepare_cached(&format!("{KEY_SELECT} ORDER BY id"))?
                .query_map([], KeyRow::from_row)?
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .map(KeyRow::into_key)
                .collect()
        })
        .await
    }

    /// See [`super::Store::audit`].
    pub(in crate::store) async fn audit(
        &self,
        bank: Option<BankId>,
        after: ChangeSeq,
        limit: usize,
    ) -> Result<Vec<Change>, Error> {
        let Some(bank) = bank else {
            return self.changes_since(after, limit).await;
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |tx| {
            require_bank(tx, bank)?;
            let mut stmt = tx.prepare_cached(&format!(
                "{CHANGE_SELECT} WHERE bank_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
            ))?;
            let mut rows = stmt.query((bank.0, after.0, limit))?;
            let mut changes = Vec::new();
            while let Some(row) = rows.next()? {
                changes.push(change_from_row(row)?);
            }
            Ok(changes)
        })
        .await
    }
}

/// The actor's organisation exists and so does its key, which acts for that organisation.
pub(super) fn require_actor(conn: &Connection, actor: Actor) -> Result<(), Error> {
    require_org(conn, actor.org)?;
    let Some(key) = actor.key else {
        return Ok(());
    };
    let org: i64 = conn
        .prepare_cached("SELECT org_id FROM api_keys WHERE id = ?1")?
        .query_row([key.0], |row| row.get(0))
        .optional()?
        .ok_or_else(|| Error::NotFound {
            kind: "api key",
            key: key.to_string(),
        })?;
    rows::check_actor(actor, OrgId(org))
}

pub(super) const KEY_SELECT: &str =
    "SELECT id, org_id, role, key_hash, label, created_ms, revoked_ms FROM api_keys";

/// An `api_keys` row before its role and digest are checked.
pub(super) struct KeyRow {
    id: i64,
    org: i64,
    role: String,
    digest: Vec<u8>,
    label: String,
    created_ms: i64,
    revoked_ms: Option<i64>,
}

impl KeyRow {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            org: row.get(1)?,
            role: row.get(2)?,
            digest: row.get(3)?,
            label: row.get(4)?,
            created_ms: row.get(5)?,
            revoked_ms: row.get(6)?,
        })
    }

    fn into_key(self) -> Result<ApiKey, Error> {
        rows::api_key(rows::ApiKeyColumns {
            id: self.id,
            org: self.org,
            role: &self.role,
            digest: &self.digest,
            label: self.label,
            created_ms: self.created_ms,
            revoked_ms: self.revoked_ms,
        })
    }
}

pub(super) fn read_api_key(conn: &Connection, id: KeyId) -> Result<ApiKey, Error> {
    conn.prepare_cached(&format!("{KEY_SELECT} WHERE id = ?1"))?
        .query_row([id.0], KeyRow::from_row)
        .optional()?
        .ok_or_else(|| Error::NotFound {
            kind: "api key",
            key: id.to_string(),
        })?
        .into_key()
}
