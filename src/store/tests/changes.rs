//! Backend-neutral store tests: The change log, follow cursors and the mirrored writes of a follower.

use super::*;

pub(super) async fn each_write_appends_one_change_in_order(store: Store) -> TestResult {
    let local = store.default_org().await?;
    let start = store.last_seq().await?;
    assert_eq!(start, ChangeSeq(1));

    let partner = store.create_org("partner", None).await?.id;
    let bank = store
        .create_bank(new_bank("b", partner), sys(local))
        .await?
        .id;
    let reference = store
        .add_reference(
            new_reference(bank, partner, vec![frame(0, 1), frame(1, 2)]),
            sys(partner),
        )
        .await?
        .id;
    store
        .withdraw_reference(reference, "fp", sys(local))
        .await?;

    let changes = store.changes_since(start, 100).await?;
    let kinds: Vec<_> = changes.iter().map(|c| (c.kind.clone(), c.actor)).collect();
    assert_eq!(
        kinds,
        vec![
            (ChangeKind::OrgCreated(partner), sys(partner)),
            (ChangeKind::BankCreated(bank), sys(local)),
            (ChangeKind::ReferenceAdded { reference, bank }, sys(partner)),
            (
                ChangeKind::ReferenceWithdrawn { reference, bank },
                sys(local)
            ),
        ]
    );
    let seqs: Vec<i64> = changes.iter().map(|c| c.seq.0).collect();
    assert_eq!(seqs, vec![2, 3, 4, 5]);
    assert!(changes.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    assert_eq!(store.last_seq().await?, ChangeSeq(5));
    // Paging.
    assert_eq!(store.changes_since(ChangeSeq(2), 2).await?, changes[1..3]);
    assert!(store.changes_since(ChangeSeq(5), 10).await?.is_empty());
    assert!(store.changes_since(ChangeSeq(0), 0).await?.is_empty());
    Ok(())
}

pub(super) async fn follow_cursors_are_per_source_and_upserted(store: Store) -> TestResult {
    let seq = store.last_seq().await?;
    assert_eq!(
        store.follow_cursor("https://a.example").await?,
        ChangeSeq(0)
    );
    store
        .set_follow_cursor("https://a.example", ChangeSeq(17))
        .await?;
    store
        .set_follow_cursor("https://b.example", ChangeSeq(3))
        .await?;
    assert_eq!(
        store.follow_cursor("https://a.example").await?,
        ChangeSeq(17)
    );
    assert_eq!(
        store.follow_cursor("https://b.example").await?,
        ChangeSeq(3)
    );
    store
        .set_follow_cursor("https://a.example", ChangeSeq(20))
        .await?;
    assert_eq!(
        store.follow_cursor("https://a.example").await?,
        ChangeSeq(20)
    );
    // Backwards is allowed: replaying a feed is safe.
    store
        .set_follow_cursor("https://a.example", ChangeSeq(0))
        .await?;
    assert_eq!(
        store.follow_cursor("https://a.example").await?,
        ChangeSeq(0)
    );
    assert_eq!(
        store.follow_cursor("https://b.example").await?,
        ChangeSeq(3)
    );

    let err = store.set_follow_cursor("x", ChangeSeq(-1)).await;
    assert!(
        matches!(
            err,
            Err(Error::InvalidInput {
                field: "cursor",
                ..
            })
        ),
        "{err:?}"
    );
    for bad in [String::new(), "s".repeat(MAX_SOURCE_BYTES + 1)] {
        let err = store.set_follow_cursor(&bad, ChangeSeq(1)).await;
        assert!(
            matches!(
                err,
                Err(Error::InvalidInput {
                    field: "source",
                    ..
                })
            ),
            "{err:?}"
        );
        let err = store.follow_cursor(&bad).await;
        assert!(
            matches!(
                err,
                Err(Error::InvalidInput {
                    field: "source",
                    ..
                })
            ),
            "{err:?}"
        );
    }
    // Bookkeeping, not data: no change entries.
    assert_eq!(store.last_seq().await?, seq);
    Ok(())
}

pub(super) async fn mirrored_banks_are_created_once(store: Store) -> TestResult {
    let local = store.default_org().await?;
    let partner = store.create_org("partner", None).await?.id;
    let actor = sys(local);
    assert_eq!(store.mirrored_bank("peer", 1).await?, None);

    let bank = store
        .create_mirrored_bank(
            "peer",
            1,
            NewBank {
                visibility: Visibility::SharedWith(vec![partner, partner]),
                ..new_bank("peer.violence", local)
            },
            actor,
        )
        .await?;
    assert_eq!(bank.visibility, Visibility::SharedWith(vec![partner]));
    assert_eq!(store.get_bank(bank.id).await?, bank);
    assert_eq!(store.mirrored_bank("peer", 1).await?, Some(bank.clone()));
    let seq = store.last_seq().await?;
    assert_eq!(
        last_change(&store).await?.kind,
        ChangeKind::BankCreated(bank.id)
    );

    // Again, even with different contents: the existing bank, unchanged, no change entry.
    let again = store
        .create_mirrored_bank(
            "peer",
            1,
            NewBank {
                visibility: Visibility::Public,
                ..new_bank("peer.other-name", local)
            },
            actor,
        )
        .await?;
    assert_eq!(again, bank);
    assert_eq!(store.last_seq().await?, seq);
    assert_eq!(store.list_banks().await?, vec![bank.clone()]);

    // The same remote id from another source is another bank.
    let other = store
        .create_mirrored_bank("peer2", 1, new_bank("peer2.violence", local), actor)
        .await?;
    assert_ne!(other.id, bank.id);
    assert_eq!(store.mirrored_bank("peer2", 1).await?, Some(other));
    assert_eq!(store.mirrored_bank("peer", 2).await?, None);

    // A name taken by a local bank: refused, and no mapping is left behind.
    store.create_bank(new_bank("taken", local), actor).await?;
    let seq = store.last_seq().await?;
    let err = store
        .create_mirrored_bank("peer", 3, new_bank("taken", local), actor)
        .await;
    assert!(
        matches!(err, Err(Error::AlreadyExists { kind: "bank", ref key }) if key == "taken"),
        "{err:?}"
    );
    let err = store
        .create_mirrored_bank("peer", 3, new_bank("bad name", local), actor)
        .await;
    assert!(
        matches!(
            err,
            Err(Error::InvalidInput {
                field: "bank name",
                ..
            })
        ),
        "{err:?}"
    );
    let err = store
        .create_mirrored_bank("", 3, new_bank("fine", local), actor)
        .await;
    assert!(
        matches!(
            err,
            Err(Error::InvalidInput {
                field: "source",
                ..
            })
        ),
        "{err:?}"
    );
    let err = store
        .create_mirrored_bank("peer", 3, new_bank("fine", OrgId(404)), actor)
        .await;
    assert!(
        matches!(
            err,
            Err(Error::NotFound {
                kind: "organisation",
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(store.mirrored_bank("peer", 3).await?, None);
    assert_eq!(store.last_seq().await?, seq);
    Ok(())
}

pub(super) async fn mirrored_references_are_added_once(store: Store) -> TestResult {
    let local = store.default_org().await?;
    let actor = sys(local);
    let bank = store
        .create_mirrored_bank("peer", 1, new_bank("peer.b", local), actor)
        .await?
        .id;
    assert_eq!(store.mirrored_reference("peer", 5).await?, None);

    let frames = vec![frame(1, 2), frame(0, 1), frame(2, 1)];
    let (reference, created) = store
        .add_mirrored_reference("peer", 5, new_reference(bank, local, frames.clone()), actor)
        .await?;
    assert!(created);
    // Validated and deduplicated like any reference.
    assert_eq!(reference.frame_count, 2);
    assert_eq!(
        store.reference_frames(reference.id).await?,
        vec![frame(0, 1), frame(1, 2)]
    );
    assert_eq!(store.get_reference(reference.id).await?, reference);
    assert_eq!(
        store.mirrored_reference("peer", 5).await?,
        Some(reference.id)
    );
    let seq = store.last_seq().await?;

    let (again, created) = store
        .add_mirrored_reference(
            "peer",
            5,
            new_reference(bank, local, vec![frame(0, 9)]),
            actor,
        )
        .await?;
    assert!(!created);
    assert_eq!(again, reference);
    assert_eq!(store.last_seq().await?, seq);
    assert_eq!(store.stats().await?.frames, 2);

    // After a withdrawal, the mapping returns the reference as it is now.
    let withdrawn = store.withdraw_reference(reference.id, "fp", actor).await?;
    let (again, created) = store
        .add_mirrored_reference("peer", 5, new_reference(bank, local, frames), actor)
        .await?;
    assert!(!created);
    assert_eq!(again, withdrawn);

    // Failed mirrors leave neither a reference, nor a mapping, nor a change.
    let seq = store.last_seq().await?;
    let err = store
        .add_mirrored_reference(
            "peer",
            6,
            new_reference(BankId(404), local, vec![frame(0, 3)]),
            actor,
        )
        .await;
    assert!(
        matches!(err, Err(Error::NotFound { kind: "bank", ref key }) if key == "404"),
        "{err:?}"
    );
    let err = store
        .add_mirrored_reference("peer", 6, new_reference(bank, local, vec![]), actor)
        .await;
    assert!(
        matches!(
            err,
            Err(Error::InvalidInput {
                field: "frames",
                ..
            })
        ),
        "{err:?}"
    );
    let err = store
        .add_mirrored_reference(
            "peer",
            6,
            new_reference(bank, local, vec![frame(0, 3)]),
            sys(OrgId(404)),
        )
        .await;
    assert!(
        matches!(err, Err(Error::NotFound { kind: "organisation", ref key }) if key == "404"),
        "{err:?}"
    );
    assert_eq!(store.mirrored_reference("peer", 6).await?, None);
    assert_eq!(store.last_seq().await?, seq);
    assert_eq!(store.stats().await?.active_references, 0);
    Ok(())
}
