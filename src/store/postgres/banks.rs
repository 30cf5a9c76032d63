//! Organisations, banks, their sharing and their embedding spaces.

use super::*;

impl PostgresStore {
    /// See [`super::Store::create_org`].
    pub(in crate::store) async fn create_org(
        &self,
        name: String,
        actor: Option<Actor>,
    ) -> Result<Organisation, Error> {
        bounded("create_org", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let org = insert_org(&tx, name, actor).await?;
            tx.commit().await?;
            Ok(org)
        })
        .await
    }

    /// See [`super::Store::list_orgs`].
    pub(in crate::store) async fn list_orgs(&self) -> Result<Vec<Organisation>, Error> {
        bounded("list_orgs", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("SELECT id, name FROM organisations ORDER BY id")
                .await?;
            let orgs = client
                .query(&stmt, &[])
                .await?
                .iter()
                .map(|row| {
                    Ok(Organisation {
                        id: OrgId(row.try_get(0)?),
                        name: row.try_get(1)?,
                    })
                })
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
            Ok(orgs)
        })
        .await
    }

    /// See [`super::Store::create_bank`]. `new` is validated and its share list normalised.
    pub(in crate::store) async fn create_bank(
        &self,
        new: NewBank,
        actor: Actor,
    ) -> Result<Bank, Error> {
        bounded("create_bank", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let bank = insert_bank(&tx, new, actor).await?;
            tx.commit().await?;
            Ok(bank)
        })
        .await
    }

    /// See [`super::Store::list_banks`]. One statement, so banks and shares come from one
    /// snapshot.
    pub(in crate::store) async fn list_banks(&self) -> Result<Vec<Bank>, Error> {
        bounded("list_banks", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!("{BANK_SELECT} ORDER BY b.id"))
                .await?;
            client
                .query(&stmt, &[])
                .await?
                .iter()
                .map(bank_from_row)
                .collect()
        })
        .await
    }

    /// See [`super::Store::get_bank`].
    pub(in crate::store) async fn get_bank(&self, id: BankId) -> Result<Bank, Error> {
        bounded("get_bank", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!("{BANK_SELECT} WHERE b.id = $1"))
                .await?;
            let row = client
                .query_opt(&stmt, &[&id.0])
                .await?
                .ok_or_else(|| Error::NotFound {
                    kind: "bank",
                    key: id.to_string(),
                })?;
            bank_from_row(&row)
        })
        .await
    }

    /// See [`super::Store::bank_by_name`].
    pub(in crate::store) async fn bank_by_name(&self, name: String) -> Result<Bank, Error> {
        bounded("bank_by_name", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!("{BANK_SELECT} WHERE b.name = $1"))
                .await?;
            let row = client
                .query_opt(&stmt, &[&name])
                .await?
                .ok_or(Error::NotFound {
                    kind: "bank",
                    key: name,
                })?;
            bank_from_row(&row)
        })
        .await
    }

    /// See [`super::Store::update_bank_visibility`]. `visibility` is normalised.
    pub(in crate::store) async fn update_bank_visibility(
        &self,
        bank: BankId,
        visibility: Visibility,
        actor: Actor,
    ) -> Result<Bank, Error> {
        bounded("update_bank_visibility", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            // The row lock orders concurrent updates of one bank: the last to commit wins, with
            // its shares, and the log records both in that order.
            let stmt = tx
                .prepare_cached("SELECT 1 FROM banks WHERE id = $1 FOR NO KEY UPDATE")
                .await?;
            if tx.query_opt(&stmt, &[&bank.0]).await?.is_none() {
                return Err(Error::NotFound {
                    kind: "bank",
                    key: bank.to_string(),
                });
            }
            let shares: &[OrgId] = match &visibility {
                Visibility::SharedWith(orgs) => orgs,
                Visibility::Private | Visibility::Public => &[],
            };
            require_orgs(&tx, shares).await?;
            require_actor(&tx, actor).await?;
            let stmt = tx
                .prepare_cached("UPDATE banks SET visibility = $2 WHERE id = $1")
                .await?;
            tx.execute(&stmt, &[&bank.0, &rows::visibility_text(&visibility)])
                .await?;
            let stmt = tx
                .prepare_cached("DELETE FROM bank_shares WHERE bank_id = $1")
                .await?;
            tx.execute(&stmt, &[&bank.0]).await?;
            insert_shares(&tx, bank, shares).await?;
            let updated = read_bank(&tx, bank).await?;
            append_change(
                &tx,
                &ChangeKind::BankUpdated(bank),
                actor,
                &rows::visibility_detail(&visibility),
                now_ms(),
            )
            .await?;
            tx.commit().await?;
            Ok(updated)
        })
        .await
    }
}

/// Inserts an organisation and its change entry, naming `actor`, or without one the new
/// organisation itself.
pub(super) async fn insert_org(
    tx: &Transaction<'_>,
    name: String,
    actor: Option<Actor>,
) -> Result<Organisation, Error> {
    if let Some(actor) = actor {
        require_actor(tx, actor).await?;
    }
    let created_ms = now_ms();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO organisations (name, created_ms) VALUES ($1, $2)
             ON CONFLICT (name) DO NOTHING
             RETURNING id",
        )
        .await?;
    let Some(row) = tx.query_opt(&stmt, &[&name, &created_ms]).await? else {
        return Err(Error::AlreadyExists {
            kind: "organisation",
            key: name,
        });
    };
    let id = OrgId(row.try_get(0)?);
    let actor = actor.unwrap_or(Actor::system(id));
    append_change(tx, &ChangeKind::OrgCreated(id), actor, "", created_ms).await?;
    Ok(Organisation { id, name })
}

/// Inserts a bank with its shares and its change entry. `new` is validated and normalised.
pub(super) async fn insert_bank(
    tx: &Transaction<'_>,
    new: NewBank,
    actor: Actor,
) -> Result<Bank, Error> {
    let shares: &[OrgId] = match &new.visibility {
        Visibility::SharedWith(orgs) => orgs,
        Visibility::Private | Visibility::Public => &[],
    };
    let mut needed = vec![new.owner];
    needed.extend_from_slice(shares);
    require_orgs(tx, &needed).await?;
    require_actor(tx, actor).await?;
    let created_ms = now_ms();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO banks
                 (name, category, owner_org, visibility, description, created_ms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (name) DO NOTHING
             RETURNING id",
        )
        .await?;
    let inserted = tx
        .query_opt(
            &stmt,
            &[
                &new.name,
                &new.category.as_str(),
                &new.owner.0,
                &rows::visibility_text(&new.visibility),
                &new.description,
                &created_ms,
            ],
        )
        .await?;
    let Some(row) = inserted else {
        return Err(Error::AlreadyExists {
            kind: "bank",
            key: new.name,
        });
    };
    let id = BankId(row.try_get(0)?);
    insert_shares(tx, id, shares).await?;
    let embedding_spaces = insert_bank_spaces(tx, id, &new.embedding_spaces).await?;
    append_change(tx, &ChangeKind::BankCreated(id), actor, "", created_ms).await?;
    Ok(Bank {
        id,
        name: new.name,
        category: new.category,
        owner: new.owner,
        visibility: new.visibility,
        description: new.description,
        created_ms,
        embedding_spaces,
    })
}

/// Declares `spaces` for `bank`: each space is created on first use, with its index settings;
/// one that exists must have the same dimension and metric ([`Error::SpaceConflict`]) and keeps
/// its settings. Returns the spaces as declared, each with the settings its index has. Two banks declaring a new space at
/// once: the second insert waits for the first's commit and then does nothing, and the read
/// after it (a new statement, so a new snapshot under READ COMMITTED) sees the winner's row.
pub(super) async fn insert_bank_spaces(
    tx: &Transaction<'_>,
    bank: BankId,
    spaces: &[EmbeddingSpace],
) -> Result<Vec<EmbeddingSpace>, Error> {
    if spaces.is_empty() {
        return Ok(Vec::new());
    }
    let create = tx
        .prepare_cached(
            "INSERT INTO embedding_spaces (name, dimension, metric, index_params)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO NOTHING",
        )
        .await?;
    let read = tx
        .prepare_cached(
            "SELECT id, dimension, metric, index_params FROM embedding_spaces WHERE name = $1",
        )
        .await?;
    let declare = tx
        .prepare_cached(
            "INSERT INTO bank_spaces (bank_id, space_id, threshold) VALUES ($1, $2, $3)",
        )
        .await?;
    let mut declared = Vec::with_capacity(spaces.len());
    for space in spaces {
        tx.execute(
            &create,
            &[
                &space.name,
                &i64::from(space.dimension),
                &space.metric.as_str(),
                &space.index.map(|params| params.to_string()),
            ],
        )
        .await?;
        let row = tx.query_one(&read, &[&space.name]).await?;
        let space_id: i64 = row.try_get(0)?;
        let metric: String = row.try_get(2)?;
        let index: Option<String> = row.try_get(3)?;
        let stored = rows::space(
            bank.0,
            space.name.clone(),
            row.try_get(1)?,
            &metric,
            space.threshold,
            index.as_deref(),
        )?;
        if stored.dimension != space.dimension || stored.metric != space.metric {
            return Err(Error::SpaceConflict {
                space: space.name.clone(),
                dimension: stored.dimension,
                metric: stored.metric,
                asked_dimension: space.dimension,
                asked_metric: space.metric,
            });
        }
        tx.execute(&declare, &[&bank.0, &space_id, &space.threshold])
            .await?;
        declared.push(stored);
    }
    Ok(declared)
}

pub(super) async fn insert_shares(
    tx: &Transaction<'_>,
    bank: BankId,
    shares: &[OrgId],
) -> Result<(), Error> {
    if shares.is_empty() {
        return Ok(());
    }
    let share_ids: Vec<i64> = shares.iter().map(|org| org.0).collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO bank_shares (bank_id, org_id)
             SELECT $1, org FROM UNNEST($2::bigint[]) AS org",
        )
        .await?;
    tx.execute(&stmt, &[&bank.0, &share_ids]).await?;
    Ok(())
}

pub(super) async fn read_bank(client: &impl GenericClient, id: BankId) -> Result<Bank, Error> {
    let stmt = client
        .prepare_cached(&format!("{BANK_SELECT} WHERE b.id = $1"))
        .await?;
    let row = client
        .query_opt(&stmt, &[&id.0])
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: "bank",
            key: id.to_string(),
        })?;
    bank_from_row(&row)
}

/// Fails with the first of `ids`, in order, that is not an organisation.
pub(super) async fn require_orgs(tx: &Transaction<'_>, ids: &[OrgId]) -> Result<(), Error> {
    let raw: Vec<i64> = ids.iter().map(|id| id.0).collect();
    let stmt = tx
        .prepare_cached("SELECT id FROM organisations WHERE id = ANY($1)")
        .await?;
    let found = tx
        .query(&stmt, &[&raw])
        .await?
        .iter()
        .map(|row| row.try_get::<_, i64>(0))
        .collect::<Result<std::collections::HashSet<i64>, _>>()?;
    match ids.iter().find(|id| !found.contains(&id.0)) {
        Some(missing) => Err(Error::NotFound {
            kind: "organisation",
            key: missing.to_string(),
        }),
        None => Ok(()),
    }
}

/// A bank with its sorted shares and its embedding spaces (five parallel arrays, by name), in
/// one statement.
pub(super) const BANK_SELECT: &str = "SELECT b.id, b.name, b.category, b.owner_org, b.visibility,
        b.description, b.created_ms,
        ARRAY(SELECT s.org_id FROM bank_shares AS s WHERE s.bank_id = b.id ORDER BY s.org_id),
        ARRAY(SELECT e.name FROM bank_spaces AS p JOIN embedding_spaces AS e ON e.id = p.space_id
              WHERE p.bank_id = b.id ORDER BY e.name),
        ARRAY(SELECT e.dimension FROM bank_spaces AS p
              JOIN embedding_spaces AS e ON e.id = p.space_id
              WHERE p.bank_id = b.id ORDER BY e.name),
        ARRAY(SELECT e.metric FROM bank_spaces AS p
              JOIN embedding_spaces AS e ON e.id = p.space_id
              WHERE p.bank_id = b.id ORDER BY e.name),
        ARRAY(SELECT p.threshold FROM bank_spaces AS p
              JOIN embedding_spaces AS e ON e.id = p.space_id
              WHERE p.bank_id = b.id ORDER BY e.name),
        ARRAY(SELECT e.index_params FROM bank_spaces AS p
              JOIN embedding_spaces AS e ON e.id = p.space_id
              WHERE p.bank_id = b.id ORDER BY e.name)
    FROM banks AS b";

pub(super) fn bank_from_row(row: &Row) -> Result<Bank, Error> {
    let shares: Vec<i64> = row.try_get(7)?;
    let id: i64 = row.try_get(0)?;
    let names: Vec<String> = row.try_get(8)?;
    let dimensions: Vec<i64> = row.try_get(9)?;
    let metrics: Vec<String> = row.try_get(10)?;
    let thresholds: Vec<f32> = row.try_get(11)?;
    let indexes: Vec<Option<String>> = row.try_get(12)?;
    if dimensions.len() != names.len()
        || metrics.len() != names.len()
        || thresholds.len() != names.len()
        || indexes.len() != names.len()
    {
        return Err(Error::Corrupt {
            detail: format!("bank {id}: its embedding spaces changed while read"),
        });
    }
    let spaces = names
        .into_iter()
        .zip(dimensions)
        .zip(metrics.iter().zip(thresholds))
        .zip(indexes)
        .map(|(((name, dimension), (metric, threshold)), index)| {
            rows::space(id, name, dimension, metric, threshold, index.as_deref())
        })
        .collect::<Result<Vec<_>, _>>()?;
    rows::bank(rows::BankColumns {
        spaces,
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        category: row.try_get(2)?,
        owner: row.try_get(3)?,
        visibility: row.try_get(4)?,
        shares: shares.into_iter().map(OrgId).collect(),
        description: row.try_get(5)?,
        created_ms: row.try_get(6)?,
    })
}
