//! Organisations, banks, their sharing and their embedding spaces.

use super::*;

impl EmbeddedStore {
    /// See [`super::Store::create_org`].
    pub(in crate::store) async fn create_org(
        &self,
        name: String,
        actor: Option<Actor>,
    ) -> Result<Organisation, Error> {
        self.write(move |tx| insert_org(tx, name, actor)).await
    }

    /// See [`super::Store::list_orgs`].
    pub(in crate::store) async fn list_orgs(&self) -> Result<Vec<Organisation>, Error> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached("SELECT id, name FROM organisations ORDER BY id")?;
            let orgs = stmt
                .query_map([], |row| {
                    Ok(Organisation {
                        id: OrgId(row.get(0)?),
                        name: row.get(1)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
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
        self.write(move |tx| insert_bank(tx, new, actor)).await
    }

    /// See [`super::Store::list_banks`].
    pub(in crate::store) async fn list_banks(&self) -> Result<Vec<Bank>, Error> {
        self.read(|tx| {
            let mut shares: std::collections::HashMap<i64, Vec<OrgId>> =
                std::collections::HashMap::new();
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT bank_id, org_id FROM bank_shares ORDER BY bank_id, org_id",
                )?;
                let mut rows = stmt.query([])?;
                while let Some(row) = rows.next()? {
                    shares
                        .entry(row.get(0)?)
                        .or_default()
                        .push(OrgId(row.get(1)?));
                }
            }
            let mut spaces = all_bank_spaces(tx)?;
            let mut stmt = tx.prepare_cached(&format!("{BANK_SELECT} ORDER BY id"))?;
            let raw = stmt
                .query_map([], BankRow::from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            raw.into_iter()
                .map(|bank| {
                    let orgs = shares.remove(&bank.id).unwrap_or_default();
                    let bank_spaces = spaces.remove(&bank.id).unwrap_or_default();
                    bank.into_bank(orgs, bank_spaces)
                })
                .collect()
        })
        .await
    }

    /// See [`super::Store::get_bank`].
    pub(in crate::store) async fn get_bank(&self, id: BankId) -> Result<Bank, Error> {
        self.read(move |tx| read_bank(tx, id)).await
    }

    /// See [`super::Store::bank_by_name`].
    pub(in crate::store) async fn bank_by_name(&self, name: String) -> Result<Bank, Error> {
        self.read(move |tx| {
            let raw = tx
                .prepare_cached(&format!("{BANK_SELECT} WHERE name = ?1"))?
                .query_row([&name], BankRow::from_row)
                .optional()?
                .ok_or(Error::NotFound {
                    kind: "bank",
                    key: name,
                })?;
            finish_bank(tx, raw)
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
        self.write(move |tx| {
            require_bank(tx, bank)?;
            let shares: &[OrgId] = match &visibility {
                Visibility::SharedWith(orgs) => orgs,
                Visibility::Private | Visibility::Public => &[],
            };
            for &org in shares {
                require_org(tx, org)?;
            }
            require_actor(tx, actor)?;
            tx.prepare_cached("UPDATE banks SET visibility = ?2 WHERE id = ?1")?
                .execute((bank.0, rows::visibility_text(&visibility)))?;
            tx.prepare_cached("DELETE FROM bank_shares WHERE bank_id = ?1")?
                .execute([bank.0])?;
            insert_shares(tx, bank, shares)?;
            append_change(
                tx,
                &ChangeKind::BankUpdated(bank),
                actor,
                &rows::visibility_detail(&visibility),
                now_ms(),
            )?;
            read_bank(tx, bank)
        })
        .await
    }
}

/// Inserts an organisation and its change entry, naming `actor`, or without one the new
/// organisation itself.
pub(super) fn insert_org(
    tx: &Transaction<'_>,
    name: String,
    actor: Option<Actor>,
) -> Result<Organisation, Error> {
    if let Some(actor) = actor {
        require_actor(tx, actor)?;
    }
    let created_ms = now_ms();
    let inserted = tx
        .prepare_cached("INSERT INTO organisations (name, created_ms) VALUES (?1, ?2)")?
        .execute((&name, created_ms));
    match inserted {
        Ok(_) => {}
        Err(err) if is_unique_violation(&err) => {
            return Err(Error::AlreadyExists {
                kind: "organisation",
                key: name,
            });
        }
        Err(err) => return Err(err.into()),
    }
    let id = OrgId(tx.last_insert_rowid());
    let actor = actor.unwrap_or(Actor::system(id));
    append_change(tx, &ChangeKind::OrgCreated(id), actor, "", created_ms)?;
    Ok(Organisation { id, name })
}

/// Inserts a bank with its shares and its change entry. `new` is validated and normalised.
pub(super) fn insert_bank(tx: &Transaction<'_>, new: NewBank, actor: Actor) -> Result<Bank, Error> {
    require_org(tx, new.owner)?;
    let shares: &[OrgId] = match &new.visibility {
        Visibility::SharedWith(orgs) => orgs,
        Visibility::Private | Visibility::Public => &[],
    };
    for &org in shares {
        require_org(tx, org)?;
    }
    require_actor(tx, actor)?;
    let created_ms = now_ms();
    let inserted = tx
        .prepare_cached(
            "INSERT INTO banks
                 (name, category, owner_org, visibility, description, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute((
            &new.name,
            new.category.as_str(),
            new.owner.0,
            rows::visibility_text(&new.visibility),
            &new.description,
            created_ms,
        ));
    match inserted {
        Ok(_) => {}
        Err(err) if is_unique_violation(&err) => {
            return Err(Error::AlreadyExists {
                kind: "bank",
                key: new.name,
            });
        }
        Err(err) => return Err(err.into()),
    }
    let id = BankId(tx.last_insert_rowid());
    insert_shares(tx, id, shares)?;
    let embedding_spaces = insert_bank_spaces(tx, id, &new.embedding_spaces)?;
    append_change(tx, &ChangeKind::BankCreated(id), actor, "", created_ms)?;
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
/// its settings. The spaces as declared: each with the settings its index has.
pub(super) fn insert_bank_spaces(
    conn: &Connection,
    bank: BankId,
    spaces: &[EmbeddingSpace],
) -> Result<Vec<EmbeddingSpace>, Error> {
    let mut declared = Vec::with_capacity(spaces.len());
    for space in spaces {
        conn.prepare_cached(
            "INSERT INTO embedding_spaces (name, dimension, metric, index_params)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO NOTHING",
        )?
        .execute((
            &space.name,
            space.dimension,
            space.metric.as_str(),
            space.index.map(|params| params.to_string()),
        ))?;
        let (space_id, dimension, metric, index): (i64, i64, String, Option<String>) = conn
            .prepare_cached(
                "SELECT id, dimension, metric, index_params FROM embedding_spaces WHERE name = ?1",
            )?
            .query_row([&space.name], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })?;
        let stored = rows::space(
            bank.0,
            space.name.clone(),
            dimension,
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
        conn.prepare_cached(
            "INSERT INTO bank_spaces (bank_id, space_id, threshold) VALUES (?1, ?2, ?3)",
        )?
        .execute((bank.0, space_id, f64::from(space.threshold)))?;
        declared.push(stored);
    }
    Ok(declared)
}

/// The spaces of every bank, by bank id, each bank's sorted by name.
pub(super) fn all_bank_spaces(
    conn: &Connection,
) -> Result<std::collections::HashMap<i64, Vec<EmbeddingSpace>>, Error> {
    let mut spaces: std::collections::HashMap<i64, Vec<EmbeddingSpace>> =
        std::collections::HashMap::new();
    let mut stmt = conn.prepare_cached(
        "SELECT b.bank_id, s.name, s.dimension, s.metric, b.threshold, s.index_params
         FROM bank_spaces AS b JOIN embedding_spaces AS s ON s.id = b.space_id
         ORDER BY b.bank_id, s.name",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let bank: i64 = row.get(0)?;
        let metric: String = row.get(3)?;
        let threshold: f64 = row.get(4)?;
        let index: Option<String> = row.get(5)?;
        let space = rows::space(
            bank,
            row.get(1)?,
            row.get(2)?,
            &metric,
            threshold as f32,
            index.as_deref(),
        )?;
        spaces.entry(bank).or_default().push(space);
    }
    Ok(spaces)
}

/// The spaces of one bank, sorted by name.
pub(super) fn bank_spaces(conn: &Connection, bank: i64) -> Result<Vec<EmbeddingSpace>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT s.name, s.dimension, s.metric, b.threshold, s.index_params
         FROM bank_spaces AS b JOIN embedding_spaces AS s ON s.id = b.space_id
         WHERE b.bank_id = ?1 ORDER BY s.name",
    )?;
    let mut rows = stmt.query([bank])?;
    let mut spaces = Vec::new();
    while let Some(row) = rows.next()? {
        let metric: String = row.get(2)?;
        let threshold: f64 = row.get(3)?;
        let index: Option<String> = row.get(4)?;
        spaces.push(rows::space(
            bank,
            row.get(0)?,
            row.get(1)?,
            &metric,
            threshold as f32,
            index.as_deref(),
        )?);
    }
    Ok(spaces)
}

pub(super) fn insert_shares(
    conn: &Connection,
    bank: BankId,
    shares: &[OrgId],
) -> Result<(), Error> {
    let mut share =
        conn.prepare_cached("INSERT INTO bank_shares (bank_id, org_id) VALUES (?1, ?2)")?;
    for &org in shares {
        share.execute((bank.0, org.0))?;
    }
    Ok(())
}

pub(super) fn require_bank(conn: &Connection, id: BankId) -> Result<(), Error> {
    let exists = conn
        .prepare_cached("SELECT 1 FROM banks WHERE id = ?1")?
        .exists([id.0])?;
    if exists {
        Ok(())
    } else {
        Err(Error::NotFound {
            kind: "bank",
            key: id.to_string(),
        })
    }
}

pub(super) fn require_org(conn: &Connection, id: OrgId) -> Result<(), Error> {
    let exists = conn
        .prepare_cached("SELECT 1 FROM organisations WHERE id = ?1")?
        .exists([id.0])?;
    if exists {
        Ok(())
    } else {
        Err(Error::NotFound {
            kind: "organisation",
            key: id.to_string(),
        })
    }
}

pub(super) fn read_bank(conn: &Connection, id: BankId) -> Result<Bank, Error> {
    let raw = conn
        .prepare_cached(&format!("{BANK_SELECT} WHERE id = ?1"))?
        .query_row([id.0], BankRow::from_row)
        .optional()?
        .ok_or_else(|| Error::NotFound {
            kind: "bank",
            key: id.to_string(),
        })?;
    finish_bank(conn, raw)
}

pub(super) const BANK_SELECT: &str =
    "SELECT id, name, category, owner_org, visibility, description, created_ms FROM banks";

/// A `banks` row before its text columns are parsed and its shares attached.
pub(super) struct BankRow {
    id: i64,
    name: String,
    category: String,
    owner: i64,
    visibility: String,
    description: String,
    created_ms: i64,
}

impl BankRow {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            name: row.get(1)?,
            category: row.get(2)?,
            owner: row.get(3)?,
            visibility: row.get(4)?,
            description: row.get(5)?,
            created_ms: row.get(6)?,
        })
    }

    fn into_bank(self, shares: Vec<OrgId>, spaces: Vec<EmbeddingSpace>) -> Result<Bank, Error> {
        rows::bank(rows::BankColumns {
            id: self.id,
            name: self.name,
            category: &self.category,
            owner: self.owner,
            visibility: &self.visibility,
            shares,
            description: self.description,
            created_ms: self.created_ms,
            spaces,
        })
    }
}

/// Attaches the shares and embedding spaces of one bank.
pub(super) fn finish_bank(conn: &Connection, raw: BankRow) -> Result<Bank, Error> {
    let shares = conn
        .prepare_cached("SELECT org_id FROM bank_shares WHERE bank_id = ?1 ORDER BY org_id")?
        .query_map([raw.id], |row| Ok(OrgId(row.get(0)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    let spaces = bank_spaces(conn, raw.id)?;
    raw.into_bank(shares, spaces)
}
