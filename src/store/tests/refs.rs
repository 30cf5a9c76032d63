//! Backend-neutral store tests: References and their frames: adding, deduplicating, withdrawing, listing and loading.

use super::*;

pub(super) async fn references_round_trip_with_dedup_by_exact_hash(store: Store) -> TestResult {
    let local = store.default_org().await?;
    let bank = store
        .create_bank(new_bank("b", local), sys(local))
        .await?
        .id;
    // Out of order; hash 1 appears at indices 0, 2 and 5; hash 2 at 1 and 3.
    let frames = vec![
        frame(5, 1),
        frame(3, 2),
        frame(2, 1),
        frame(0, 1),
        frame(4, 3),
        frame(1, 2),
    ];
    let reference = store
        .add_reference(new_reference(bank, local, frames), sys(local))
        .await?;
    assert_eq!(reference.frame_count, 3);
    assert_eq!(reference.state, ReferenceState::Active);
    assert_eq!(reference.bank, bank);
    assert_eq!(reference.external_id, "ext-1");
    assert_eq!(reference.note, "a note");
    assert_eq!(reference.added_by, local);
    assert_eq!(store.get_reference(reference.id).await?, reference);
    assert_eq!(
        store.reference_frames(reference.id).await?,
        vec![frame(0, 1), frame(1, 2), frame(4, 3)]
    );
    // The same hash in another reference is a separate frame.
    let second = store
        .add_reference(new_reference(bank, local, vec![frame(0, 1)]), sys(local))
        .await?;
    assert_eq!(second.frame_count, 1);
    assert_eq!(store.stats().await?.frames, 4);
    Ok(())
}

pub(super) async fn reference_errors(store: Store) -> TestResult {
    let local = store.default_org().await?;
    let bank = store
        .create_bank(new_bank("b", local), sys(local))
        .await?
        .id;
    let before = store.last_seq().await?;

    let err = store
        .add_reference(new_reference(bank, local, vec![]), sys(local))
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
    let bad_quality = FrameSignal {
        quality: 101,
        ..frame(0, 1)
    };
    assert!(matches!(
        store
            .add_reference(new_reference(bank, local, vec![bad_quality]), sys(local))
            .await,
        Err(Error::InvalidInput {
            field: "frames.quality",
            ..
        })
    ));
    let bad_time = FrameSignal {
        timestamp_ms: u64::MAX,
        ..frame(0, 1)
    };
    assert!(matches!(
        store
            .add_reference(new_reference(bank, local, vec![bad_time]), sys(local))
            .await,
        Err(Error::InvalidInput {
            field: "frames.timestamp_ms",
            ..
        })
    ));
    let long_note = NewReference {
        note: "n".repeat(MAX_TEXT_BYTES + 1),
        ..new_reference(bank, local, vec![frame(0, 1)])
    };
    assert!(matches!(
        store.add_reference(long_note, sys(local)).await,
        Err(Error::InvalidInput { field: "note", .. })
    ));
    let err = store
        .add_reference(
            new_reference(BankId(77), local, vec![frame(0, 1)]),
            sys(local),
        )
        .await;
    assert!(
        matches!(err, Err(Error::NotFound { kind: "bank", ref key }) if key == "77"),
        "{err:?}"
    );
    let err = store
        .add_reference(
            new_reference(bank, OrgId(78), vec![frame(0, 1)]),
            sys(OrgId(78)),
        )
        .await;
    assert!(
        matches!(err, Err(Error::NotFound { kind: "organisation", ref key }) if key == "78"),
        "{err:?}"
    );
    for err in [
        store.get_reference(ReferenceId(5)).await.map(|_| ()),
        store.reference_frames(ReferenceId(5)).await.map(|_| ()),
        store
            .withdraw_reference(ReferenceId(5), "fp", sys(local))
            .await
            .map(|_| ()),
    ] {
        assert!(
            matches!(err, Err(Error::NotFound { kind: "reference", ref key }) if key == "5"),
            "{err:?}"
        );
    }
    assert_eq!(store.last_seq().await?, before);
    Ok(())
}

pub(super) async fn withdraw_twice_is_already_withdrawn(store: Store) -> TestResult {
    let local = store.default_org().await?;
    let bank = store
        .create_bank(new_bank("b", local), sys(local))
        .await?
        .id;
    let reference = store
        .add_reference(new_reference(bank, local, vec![frame(0, 1)]), sys(local))
        .await?;
    assert!(matches!(
        store
            .withdraw_reference(reference.id, " ", sys(local))
            .await,
        Err(Error::InvalidInput {
            field: "reason",
            ..
        })
    ));
    assert!(matches!(
        store
            .withdraw_reference(reference.id, "fp", sys(OrgId(999)))
            .await,
        Err(Error::NotFound {
            kind: "organisation",
            ..
        })
    ));
    let withdrawn = store
        .withdraw_reference(reference.id, "false positive", sys(local))
        .await?;
    let ReferenceState::Withdrawn { reason, at_ms } = &withdrawn.state else {
        panic!("not withdrawn: {withdrawn:?}");
    };
    assert_eq!(reason, "false positive");
    assert!(*at_ms >= reference.added_ms);
    assert_eq!(store.get_reference(reference.id).await?, withdrawn);
    let seq = store.last_seq().await?;
    let err = store
        .withdraw_reference(reference.id, "again", sys(local))
        .await;
    assert!(
        matches!(err, Err(Error::AlreadyWithdrawn { reference: r }) if r == reference.id),
        "{err:?}"
    );
    assert_eq!(store.last_seq().await?, seq);
    // Frames of a withdrawn reference stay readable.
    assert_eq!(
        store.reference_frames(reference.id).await?,
        vec![frame(0, 1)]
    );
    Ok(())
}

pub(super) async fn list_references_of_a_bank(store: Store) -> TestResult {
    let local = store.default_org().await?;
    let actor = sys(local);
    let b1 = store.create_bank(new_bank("b1", local), actor).await?.id;
    let b2 = store.create_bank(new_bank("b2", local), actor).await?.id;
    let r1 = store
        .add_reference(new_reference(b1, local, vec![frame(0, 1)]), actor)
        .await?;
    store
        .add_reference(new_reference(b2, local, vec![frame(0, 2)]), actor)
        .await?;
    let r3 = store
        .add_reference(
            new_reference(b1, local, vec![frame(0, 3), frame(1, 4)]),
            actor,
        )
        .await?;
    let r3 = store.withdraw_reference(r3.id, "fp", actor).await?;
    assert_eq!(store.list_references(b1, false).await?, vec![r1.clone()]);
    assert_eq!(store.list_references(b1, true).await?, vec![r1, r3]);
    let empty = store.create_bank(new_bank("b3", local), actor).await?.id;
    assert!(store.list_references(empty, true).await?.is_empty());
    let err = store.list_references(BankId(404), true).await;
    assert!(
        matches!(err, Err(Error::NotFound { kind: "bank", ref key }) if key == "404"),
        "{err:?}"
    );
    Ok(())
}

pub(super) async fn load_active_frames_excludes_withdrawn(store: Store) -> TestResult {
    let local = store.default_org().await?;
    let b1 = store
        .create_bank(new_bank("b1", local), sys(local))
        .await?
        .id;
    let b2 = store
        .create_bank(new_bank("b2", local), sys(local))
        .await?
        .id;
    let r1 = store
        .add_reference(
            new_reference(b1, local, vec![frame(0, 1), frame(1, 2)]),
            sys(local),
        )
        .await?
        .id;
    let r2 = store
        .add_reference(new_reference(b2, local, vec![frame(0, 3)]), sys(local))
        .await?
        .id;
    let r3 = store
        .add_reference(new_reference(b1, local, vec![frame(7, 4)]), sys(local))
        .await?
        .id;
    store.withdraw_reference(r2, "fp", sys(local)).await?;

    let (mut frames, seq) = store.load_active_frames().await?;
    assert_eq!(seq, store.last_seq().await?);
    frames.sort_by_key(|f| (f.reference, f.frame.frame_index));
    let expected = vec![
        IndexedFrame {
            reference: r1,
            bank: b1,
            frame: frame(0, 1),
        },
        IndexedFrame {
            reference: r1,
            bank: b1,
            frame: frame(1, 2),
        },
        IndexedFrame {
            reference: r3,
            bank: b1,
            frame: frame(7, 4),
        },
    ];
    assert_eq!(frames, expected);

    let stats = store.stats().await?;
    assert_eq!(
        stats,
        StoreStats {
            organisations: 1,
            banks: 2,
            active_references: 2,
            withdrawn_references: 1,
            frames: 4,
            api_keys: 0,
            last_seq: seq,
        }
    );
    Ok(())
}
