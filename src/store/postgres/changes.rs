//! The change log and its tailing (`LISTEN`/`NOTIFY`), follow cursors and the mirrored writes of a follower.

use super::*;

impl PostgresStore {
    /// Wake-ups for change-log tailers: a dedicated connection runs `LISTEN framematch_changes`
    /// and the receiver gets the sequence number of each change committed from then on, by any
    /// replica, in commit order. They are hints only: read the changes with
    /// [`super::Store::changes_since`], and poll on a timer as well, because notifications are
    /// dropped when the receiver falls 64 behind and die with the connection.
    ///
    /// The receiver is closed (`recv` returns `None`) when the connection is lost; listen again
    /// once the database is back, and read `changes_since` to cover the gap. Dropping the
    /// receiver closes the connection.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the database cannot be reached; [`Error::Postgres`].
    pub async fn listen_changes(&self) -> Result<mpsc::Receiver<ChangeSeq>, Error> {
        let config = self.inner.config.clone();
        bounded("listening for changes", async move {
            let (client, mut connection) = config.connect(NoTls).await?;
            let client = Arc::new(client);
            let (sender, receiver) = mpsc::channel(LISTEN_BUFFER);
            // The task owns the connection (and a handle to the client, which must outlive the
            // LISTEN) until the receiver is dropped or the connection ends.
            let keep_alive = Arc::clone(&client);
            tokio::spawn(async move {
                let _client = keep_alive;
                loop {
                    let message = tokio::select! {
                        () = sender.closed() => break,
                        message = std::future::poll_fn(|cx| connection.poll_message(cx)) => message,
                    };
                    match message {
                        Some(Ok(AsyncMessage::Notification(note)))
                            if note.channel() == CHANGES_CHANNEL =>
                        {
                            let Ok(seq) = note.payload().parse::<i64>() else {
                                tracing::warn!(
                                    payload = note.payload(),
                                    "unreadable change notification"
                                );
                                continue;
                            };
                            // Full means wake-ups are already pending: this one adds nothing.
                            if let Err(mpsc::error::TrySendError::Closed(_)) =
                                sender.try_send(ChangeSeq(seq))
                            {
                                break;
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(error)) => {
                            tracing::warn!(%error, "change listener connection lost");
                            break;
                        }
                        None => break,
                    }
                }
            });
            client
                .batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))
                .await?;
            Ok(receiver)
        })
        .await
    }

    /// See [`super::Store::follow_cursor`].
    pub(in crate::store) async fn follow_cursor(&self, source: String) -> Result<ChangeSeq, Error> {
        bounded("follow_cursor", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("SELECT cursor FROM follows WHERE source = $1")
                .await?;
            let cursor = match client.query_opt(&stmt, &[&source]).await? {
                Some(row) => row.try_get(0)?,
                None => 0,
            };
            Ok(ChangeSeq(cursor))
        })
        .await
    }

    /// See [`super::Store::set_follow_cursor`]. `seq` is not negative. One statement, committed
    /// on its own.
    pub(in crate::store) async fn set_follow_cursor(
        &self,
        source: String,
        seq: ChangeSeq,
    ) -> Result<(), Error> {
        bounded("set_follow_cursor", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "INSERT INTO follows (source, cursor, updated_ms) VALUES ($1, $2, $3)
                     ON CONFLICT (source) DO UPDATE
                         SET cursor = excluded.cursor, updated_ms = excluded.updated_ms",
                )
                .await?;
            client.execute(&stmt, &[&source, &seq.0, &now_ms()]).await?;
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
        bounded("mirrored_bank", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "{BANK_SELECT} JOIN mirrored_banks AS m ON m.bank_id = b.id
                     WHERE m.source = $1 AND m.remote_id = $2"
                ))
                .await?;
            client
                .query_opt(&stmt, &[&source, &remote_id])
                .await?
                .as_ref()
                .map(bank_from_row)
                .transpose()
        })
        .await
    }

    /// See [`super::Store::create_mirrored_bank`]. `new` is validated and normalised.
    ///
    /// Two followers racing to mirror the same bank: the loser's insert of the bank name (or of
    /// the mapping) waits for the winner's commit and then does nothing, and the loser returns
    /// the winner's bank.
    pub(in crate::store) async fn create_mirrored_bank(
        &self,
        source: String,
        remote_id: i64,
        new: NewBank,
        actor: Actor,
    ) -> Result<Bank, Error> {
        bounded("create_mirrored_bank", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            if let Some(existing) = mirrored_bank_id(&tx, &source, remote_id).await? {
                return read_bank(&tx, existing).await;
            }
            let bank = match insert_bank(&tx, new, actor).await {
                Ok(bank) => bank,
                Err(err @ Error::AlreadyExists { .. }) => {
                    // A fresh snapshot: a racing follower may have just committed the mapping.
                    return match mirrored_bank_id(&tx, &source, remote_id).await? {
                        Some(existing) => read_bank(&tx, existing).await,
                        None => Err(err),
                    };
                }
                Err(err) => return Err(err),
            };
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO mirrored_banks (source, remote_id, bank_id) VALUES ($1, $2, $3)
                     ON CONFLICT (source, remote_id) DO NOTHING",
                )
                .await?;
            if tx
                .execute(&stmt, &[&source, &remote_id, &bank.id.0])
                .await?
                == 0
            {
                drop(tx);
                let existing = mirrored_bank_id(&client, &source, remote_id)
                    .await?
                    .ok_or_else(|| Error::Corrupt {
                        detail: format!("mirrored bank {source} {remote_id} vanished"),
                    })?;
                return read_bank(&client, existing).await;
            }
            tx.commit().await?;
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
        bounded("mirrored_reference", async {
            let client = self.client().await?;
            mirrored_reference_id(&client, &source, remote_id).await
        })
        .await
    }

    /// See [`super::Store::add_mirrored_reference`]. `new` is validated and its frames
    /// deduplicated. A racing follower that loses on the mapping rolls back and returns the
    /// winner's reference with `false`.
    pub(in crate::store) async fn add_mirrored_reference(
        &self,
        source: String,
        remote_id: i64,
        new: NewReference,
        actor: Actor,
    ) -> Result<(Reference, bool), Error> {
        bounded("add_mirrored_reference", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            if let Some(existing) = mirrored_reference_id(&tx, &source, remote_id).await? {
                return Ok((read_reference(&tx, existing).await?, false));
            }
            let reference = insert_reference(&tx, new, actor).await?;
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO mirrored_refs (source, remote_id, reference_id)
                     VALUES ($1, $2, $3)
                     ON CONFLICT (source, remote_id) DO NOTHING",
                )
                .await?;
            if tx
                .execute(&stmt, &[&source, &remote_id, &reference.id.0])
                .await?
                == 0
            {
                drop(tx);
                let existing = mirrored_reference_id(&client, &source, remote_id)
                    .await?
                    .ok_or_else(|| Error::Corrupt {
                        detail: format!("mirrored reference {source} {remote_id} vanished"),
                    })?;
                return Ok((read_reference(&client, existing).await?, false));
            }
            tx.commit().await?;
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
        bounded("changes_since", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "{CHANGE_SELECT} WHERE seq > $1 ORDER BY seq LIMIT $2"
                ))
                .await?;
            client
                .query(&stmt, &[&after.0, &limit])
                .await?
                .iter()
                .map(change_from_row)
                .collect()
        })
        .await
    }

    /// See [`super::Store::last_seq`].
    pub(in crate::store) async fn last_seq(&self) -> Result<ChangeSeq, Error> {
        bounded("last_seq", async {
            let client = self.client().await?;
            last_seq(&client).await
        })
        .await
    }
}

pub(super) async fn mirrored_bank_id(
    client: &impl GenericClient,
    source: &str,
    remote_id: i64,
) -> Result<Option<BankId>, Error> {
    let stmt = client
        .prepare_cached("SELECT bank_id FROM mirrored_banks WHERE source = $1 AND remote_id = $2")
        .await?;
    match client.query_opt(&stmt, &[&source, &remote_id]).await? {
        Some(row) => Ok(Some(BankId(row.try_get(0)?))),
        None => Ok(None),
    }
}

pub(super) async fn mirrored_reference_id(
    client: &impl GenericClient,
    source: &str,
    remote_id: i64,
) -> Result<Option<ReferenceId>, Error> {
    let stmt = client
        .prepare_cached(
            "SELECT reference_id FROM mirrored_refs WHERE source = $1 AND remote_id = $2",
        )
        .await?;
    match client.query_opt(&stmt, &[&source, &remote_id]).await? {
        Some(row) => Ok(Some(ReferenceId(row.try_get(0)?))),
        None => Ok(None),
    }
}

/// Appends the one change entry of the current write transaction and queues its notification.
/// Takes [`CHANGE_LOG_LOCK`], held until the transaction ends: call it last, just before
/// `COMMIT`, to keep the serialised part of a write short.
pub(super) async fn append_change(
    tx: &Transaction<'_>,
    kind: &ChangeKind,
    actor: Actor,
    detail: &str,
    at_ms: i64,
) -> Result<ChangeSeq, Error> {
    let ids = rows::change_ids(kind);
    // Its own statement: in READ COMMITTED the next statement takes a fresh snapshot, which
    // includes the previous lock holder's commit, so MAX(seq) below is current.
    let lock = tx
        .prepare_cached("SELECT pg_advisory_xact_lock($1, $2)")
        .await?;
    tx.execute(&lock, &[&LOCK_SPACE, &CHANGE_LOG_LOCK]).await?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO changes (seq, kind, org_id, bank_id, reference_id, key_id, actor,
                                  actor_key, detail, at_ms)
             SELECT COALESCE(MAX(seq), 0) + 1, $1, $2, $3, $4, $5, $6, $7, $8, $9 FROM changes
             RETURNING seq",
        )
        .await?;
    let actor_key = actor.key.map(|key| key.0);
    let seq = ChangeSeq(
        tx.query_one(
            &insert,
            &[
                &ids.kind,
                &ids.org,
                &ids.bank,
                &ids.reference,
                &ids.key,
                &actor.org.0,
                &actor_key,
                &detail,
                &at_ms,
            ],
        )
        .await?
        .try_get(0)?,
    );
    let notify = tx.prepare_cached("SELECT pg_notify($1, $2)").await?;
    tx.execute(&notify, &[&CHANGES_CHANNEL, &seq.0.to_string()])
        .await?;
    Ok(seq)
}

pub(super) async fn last_seq(client: &impl GenericClient) -> Result<ChangeSeq, Error> {
    let stmt = client
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM changes")
        .await?;
    Ok(ChangeSeq(client.query_one(&stmt, &[]).await?.try_get(0)?))
}

pub(super) const CHANGE_SELECT: &str =
    "SELECT seq, kind, org_id, bank_id, reference_id, key_id, actor,
        actor_key, detail, at_ms FROM changes";

pub(super) fn change_from_row(row: &Row) -> Result<Change, Error> {
    rows::change(rows::ChangeColumns {
        seq: row.try_get(0)?,
        kind: row.try_get(1)?,
        org: row.try_get(2)?,
        bank: row.try_get(3)?,
        reference: row.try_get(4)?,
        key: row.try_get(5)?,
        actor: row.try_get(6)?,
        actor_key: row.try_get(7)?,
        detail: row.try_get(8)?,
        at_ms: row.try_get(9)?,
    })
}
