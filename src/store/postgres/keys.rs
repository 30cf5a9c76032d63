//! API keys and the audit trail.

use super::*;

impl PostgresStore {
    /// See [`super::Store::create_api_key`]. The label is validated.
    pub(in crate::store) async fn create_api_key(
        &self,
        new: NewApiKey,
        actor: Actor,
    ) -> Result<ApiKey, Error> {
        bounded("create_api_key", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            require_orgs(&tx, &[new.org]).await?;
            require_actor(&tx, actor).await?;
            let created_ms = now_ms();
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO api_keys (org_id, role, key_hash, label, created_ms)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (key_hash) DO NOTHING
                     RETURNING id",
                )
                .await?;
            let inserted = tx
                .query_opt(
                    &stmt,
                    &[
                        &new.org.0,
                        &new.role.as_str(),
                        &new.digest.as_slice(),
                        &new.label,
                        &created_ms,
                    ],
                )
                .await?;
            let Some(row) = inserted else {
                return Err(Error::AlreadyExists {
                    kind: "api key",
                    key: "with this digest".to_string(),
                });
            };
            let id = KeyId(row.try_get(0)?);
            append_change(
                &tx,
                &ChangeKind::KeyCreated {
                    key: id,
                    org: new.org,
                },
                actor,
                &rows::key_detail(new.role, &new.label),
                created_ms,
            )
            .await?;
            tx.commit().await?;
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
        bounded("revoke_api_key", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            // The row lock makes a concurrent revocation wait, then see this one's result.
            let stmt = tx
                .prepare_cached(&format!("{KEY_SELECT} WHERE id = $1 FOR NO KEY UPDATE"))
                .await?;
            let key = tx
                .query_opt(&stmt, &[&id.0])
                .await?
                .as_ref()
                .map(key_from_row)
                .transpose()?
                .ok_or_else(|| Error::NotFound {
                    kind: "api key",
                    key: id.to_string(),
                })?;
            if key.revoked_ms.is_some() {
                return Err(Error::AlreadyRevoked { key: id });
            }
            require_actor(&tx, actor).await?;
            let at_ms = now_ms();
            let stmt = tx
                .prepare_cached("UPDATE api_keys SET revoked_ms = $2 WHERE id = $1")
                .await?;
            tx.execute(&stmt, &[&id.0, &at_ms]).await?;
            append_change(
                &tx,
                &ChangeKind::KeyRevoked {
                    key: id,
                    org: key.org,
                },
                actor,
                &rows::key_detail(key.role, &key.label),
                at_ms,
            )
            .await?;
            tx.commit().await?;
            Ok(ApiKey {
                revoked_ms: Some(at_ms),
                ..key
            })
        })
        .await
    }

    /// See [`super::Store::get_api_key`].
    pub(in crate::store) async fn get_api_key(&self, id: KeyId) -> Result<ApiKey, Error> {
        bounded("get_api_key", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!("{KEY_SELECT} WHERE id = $1"))
                .await?;
            client
                .query_opt(&stmt, &[&id.0])
                .await?
                .as_ref()
                .map(key_from_row)
                .transpose()?
                .ok_or_else(|| Error::NotFound {
                    kind: "api key",
                    key: id.to_string(),
                })
        })
        .await
    }

    /// See [`super::Store::list_api_keys`].
    pub(in crate::store) async fn list_api_keys(&self) -> Result<Vec<ApiKey>, Error> {
        bounded("list_api_keys", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!("{KEY_SELECT} ORDER BY id"))
                .await?;
            client
                .query(&stmt, &[])
                .await?
                .iter()
                .map(key_from_row)
                .collect()
        })
        .await
    }

    /// See [`super::Store::audit`]. The bank check and the changes come from one statement, so
    /// one snapshot.
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
        bounded("audit", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("SELECT 1 FROM banks WHERE id = $1")
                .await?;
            // Banks are never deleted: checking first and reading after cannot disagree.
            if client.query_opt(&stmt, &[&bank.0]).await?.is_none() {
                return Err(Error::NotFound {
                    kind: "bank",
                    key: bank.to_string(),
                });
            }
            let stmt = client
                .prepare_cached(&format!(
                    "{CHANGE_SELECT} WHERE bank_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                ))
                .await?;
            client
                .query(&stmt, &[&bank.0, &after.0, &limit])
                .await?
                .iter()
                .map(change_from_row)
                .collect()
        })
        .await
    }
}

/// The actor's organisation exists and so does its key, which acts for that organisation.
pub(super) async fn require_actor(tx: &Transaction<'_>, actor: Actor) -> Result<(), Error> {
    require_orgs(tx, &[actor.org]).await?;
    let Some(key) = actor.key else {
        return Ok(());
    };
    let stmt = tx
        .prepare_cached("SELECT org_id FROM api_keys WHERE id = $1")
        .await?;
    let org: i64 = tx
        .query_opt(&stmt, &[&key.0])
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: "api key",
            key: key.to_string(),
        })?
        .try_get(0)?;
    rows::check_actor(actor, OrgId(org))
}

pub(super) const KEY_SELECT: &str =
    "SELECT id, org_id, role, key_hash, label, created_ms, revoked_ms FROM api_keys";

pub(super) fn key_from_row(row: &Row) -> Result<ApiKey, Error> {
    rows::api_key(rows::ApiKeyColumns {
        id: row.try_get(0)?,
        org: row.try_get(1)?,
        role: row.try_get(2)?,
        digest: row.try_get(3)?,
        label: row.try_get(4)?,
        created_ms: row.try_get(5)?,
        revoked_ms: row.try_get(6)?,
    })
}
