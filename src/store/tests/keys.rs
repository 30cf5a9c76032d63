//! Backend-neutral store tests: API keys and the audit trail: who did each write.

use super::*;

pub(super) async fn api_keys_round_trip_and_revoke_once(store: Store) -> TestResult {
    let local = store.default_org().await?;
    let partner = store.create_org("partner", None).await?.id;

    let admin = store
        .create_api_key(new_key(local, Role::Admin, 1, "ops"), sys(local))
        .await?;
    assert_eq!(admin.org, local);
    assert_eq!(admin.role, Role::Admin);
    assert_eq!(admin.digest, digest(1));
    assert_eq!(admin.label, "ops");
    assert_eq!(admin.revoked_ms, None);
    assert!(admin.created_ms > 0);
    let change = last_change(&store).await?;
    assert_eq!(
        change.kind,
        ChangeKind::KeyCreated {
            key: admin.id,
            org: local
        }
    );
    assert_eq!(change.actor, sys(local));
    assert_eq!(change.detail, "admin: ops");

    // A key of one organisation made by another's admin key; labels may be empty.
    let by_admin = Actor {
        org: local,
        key: Some(admin.id),
    };
    let matcher = store
        .create_api_key(new_key(partner, Role::Matcher, 2, ""), by_admin)
        .await?;
    let change = last_change(&store).await?;
    assert_eq!(
        change.kind,
        ChangeKind::KeyCreated {
            key: matcher.id,
            org: partner
        }
    );
    assert_eq!(change.actor, by_admin);
    assert_eq!(change.detail, "matcher");
    let longest = store
        .create_api_key(
            new_key(partner, Role::Contributor, 3, &"l".repeat(MAX_LABEL_BYTES)),
            by_admin,
        )
        .await?;

    assert_eq!(store.get_api_key(admin.id).await?, admin);
    assert_eq!(store.get_api_key(matcher.id).await?, matcher);
    assert_eq!(
        store.list_api_keys().await?,
        vec![admin.clone(), matcher.clone(), longest.clone()]
    );
    assert_eq!(store.stats().await?.api_keys, 3);

    let before = store.last_seq().await?;
    let err = store
        .create_api_key(new_key(partner, Role::Matcher, 1, "again"), by_admin)
        .await;
    assert!(
        matches!(
            err,
            Err(Error::AlreadyExists {
                kind: "api key",
                ..
            })
        ),
        "{err:?}"
    );
    let err = store
        .create_api_key(new_key(OrgId(99), Role::Matcher, 4, ""), by_admin)
        .await;
    assert!(
        matches!(err, Err(Error::NotFound { kind: "organisation", ref key }) if key == "99"),
        "{err:?}"
    );
    for label in ["l".repeat(MAX_LABEL_BYTES + 1), "tab\there".to_string()] {
        let err = store
            .create_api_key(new_key(local, Role::Matcher, 5, &label), by_admin)
            .await;
        assert!(
            matches!(err, Err(Error::InvalidInput { field: "label", .. })),
            "{err:?}"
        );
    }
    // The acting key must exist and act for the acting organisation.
    let err = store
        .create_api_key(
            new_key(local, Role::Matcher, 6, ""),
            Actor {
                org: local,
                key: Some(KeyId(77)),
            },
        )
        .await;
    assert!(
        matches!(err, Err(Error::NotFound { kind: "api key", ref key }) if key == "77"),
        "{err:?}"
    );
    let err = store
        .create_api_key(
            new_key(local, Role::Matcher, 6, ""),
            Actor {
                org: partner,
                key: Some(admin.id),
            },
        )
        .await;
    assert!(
        matches!(err, Err(Error::InvalidInput { field: "actor", .. })),
        "{err:?}"
    );
    assert_eq!(store.last_seq().await?, before);
    assert_eq!(store.list_api_keys().await?.len(), 3);

    let revoked = store.revoke_api_key(matcher.id, by_admin).await?;
    let at_ms = revoked.revoked_ms.ok_or("not revoked")?;
    assert!(at_ms >= matcher.created_ms);
    assert_eq!(
        revoked,
        ApiKey {
            revoked_ms: Some(at_ms),
            ..matcher.clone()
        }
    );
    assert_eq!(store.get_api_key(matcher.id).await?, revoked);
    let change = last_change(&store).await?;
    assert_eq!(
        change.kind,
        ChangeKind::KeyRevoked {
            key: matcher.id,
            org: partner
        }
    );
    assert_eq!(change.actor, by_admin);
    assert_eq!(change.detail, "matcher");
    // Revoked keys stay listed; only active ones count.
    assert_eq!(
        store.list_api_keys().await?,
        vec![admin.clone(), revoked, longest]
    );
    assert_eq!(store.stats().await?.api_keys, 2);

    let seq = store.last_seq().await?;
    let err = store.revoke_api_key(matcher.id, by_admin).await;
    assert!(
        matches!(err, Err(Error::AlreadyRevoked { key }) if key == matcher.id),
        "{err:?}"
    );
    let err = store.revoke_api_key(KeyId(555), by_admin).await;
    assert!(
        matches!(err, Err(Error::NotFound { kind: "api key", ref key }) if key == "555"),
        "{err:?}"
    );
    let err = store.get_api_key(KeyId(555)).await;
    assert!(
        matches!(err, Err(Error::NotFound { kind: "api key", ref key }) if key == "555"),
        "{err:?}"
    );
    assert_eq!(store.last_seq().await?, seq);

    // A key may revoke itself; the change names it.
    let own = Actor {
        org: local,
        key: Some(admin.id),
    };
    store.revoke_api_key(admin.id, own).await?;
    let change = last_change(&store).await?;
    assert_eq!(change.actor, own);
    assert_eq!(change.detail, "admin: ops");
    assert_eq!(store.stats().await?.api_keys, 1);
    Ok(())
}

/// Every write appends exactly one change naming the acting organisation and key; the
/// follow cursor and repeated mirror writes append none.
pub(super) async fn each_write_names_its_actor_org_and_key(store: Store) -> TestResult {
    let local = store.default_org().await?;
    let admin = store
        .create_api_key(new_key(local, Role::Admin, 1, "admin"), sys(local))
        .await?;
    let actor = Actor {
        org: local,
        key: Some(admin.id),
    };
    let mut seq = store.last_seq().await?;
    // Checks that exactly one change was appended since the previous check, by `actor`.
    let mut one_more = async |store: &Store, expected: ChangeKind| -> TestResult {
        let changes = store.changes_since(seq, 10).await?;
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].seq.0, seq.0 + 1);
        assert_eq!(changes[0].kind, expected);
        assert_eq!(changes[0].actor, actor);
        seq = changes[0].seq;
        Ok(())
    };

    let org = store.create_org("partner", Some(actor)).await?.id;
    one_more(&store, ChangeKind::OrgCreated(org)).await?;
    let bank = store.create_bank(new_bank("b", org), actor).await?.id;
    one_more(&store, ChangeKind::BankCreated(bank)).await?;
    store
        .update_bank_visibility(bank, Visibility::Public, actor)
        .await?;
    one_more(&store, ChangeKind::BankUpdated(bank)).await?;
    let reference = store
        .add_reference(new_reference(bank, org, vec![frame(0, 1)]), actor)
        .await?;
    // added_by is the reference's; the actor is the change's.
    assert_eq!(reference.added_by, org);
    let reference = reference.id;
    one_more(&store, ChangeKind::ReferenceAdded { reference, bank }).await?;
    let withdrawn = store
        .withdraw_reference(reference, "duplicate of 7", actor)
        .await?;
    assert!(matches!(withdrawn.state, ReferenceState::Withdrawn { .. }));
    one_more(&store, ChangeKind::ReferenceWithdrawn { reference, bank }).await?;
    assert_eq!(last_change(&store).await?.detail, "duplicate of 7");
    let key = store
        .create_api_key(new_key(org, Role::Contributor, 2, "k"), actor)
        .await?
        .id;
    one_more(&store, ChangeKind::KeyCreated { key, org }).await?;
    store.revoke_api_key(key, actor).await?;
    one_more(&store, ChangeKind::KeyRevoked { key, org }).await?;

    let mirrored = store
        .create_mirrored_bank("peer", 10, new_bank("peer.b", org), actor)
        .await?
        .id;
    one_more(&store, ChangeKind::BankCreated(mirrored)).await?;
    let (mirrored_ref, created) = store
        .add_mirrored_reference(
            "peer",
            20,
            new_reference(mirrored, org, vec![frame(0, 2)]),
            actor,
        )
        .await?;
    assert!(created);
    one_more(
        &store,
        ChangeKind::ReferenceAdded {
            reference: mirrored_ref.id,
            bank: mirrored,
        },
    )
    .await?;

    // No change for these.
    store
        .create_mirrored_bank("peer", 10, new_bank("peer.b", org), actor)
        .await?;
    store
        .add_mirrored_reference(
            "peer",
            20,
            new_reference(mirrored, org, vec![frame(0, 2)]),
            actor,
        )
        .await?;
    store.set_follow_cursor("peer", ChangeSeq(42)).await?;
    assert_eq!(store.last_seq().await?, seq);
    Ok(())
}

pub(super) async fn audit_filters_by_bank_in_order(store: Store) -> TestResult {
    let local = store.default_org().await?;
    let actor = sys(local);
    let b1 = store.create_bank(new_bank("b1", local), actor).await?.id;
    let b2 = store.create_bank(new_bank("b2", local), actor).await?.id;
    let r1 = store
        .add_reference(new_reference(b1, local, vec![frame(0, 1)]), actor)
        .await?
        .id;
    let r2 = store
        .add_reference(new_reference(b2, local, vec![frame(0, 2)]), actor)
        .await?
        .id;
    store.create_org("unrelated", None).await?;
    store
        .update_bank_visibility(b1, Visibility::Public, actor)
        .await?;
    store.withdraw_reference(r2, "fp", actor).await?;
    store.withdraw_reference(r1, "fp", actor).await?;

    let all = store.changes_since(ChangeSeq(0), 100).await?;
    assert_eq!(store.audit(None, ChangeSeq(0), 100).await?, all);
    assert_eq!(
        store.audit(None, ChangeSeq(3), 2).await?,
        store.changes_since(ChangeSeq(3), 2).await?
    );

    let of_b1 = store.audit(Some(b1), ChangeSeq(0), 100).await?;
    let kinds: Vec<ChangeKind> = of_b1.iter().map(|c| c.kind.clone()).collect();
    assert_eq!(
        kinds,
        vec![
            ChangeKind::BankCreated(b1),
            ChangeKind::ReferenceAdded {
                reference: r1,
                bank: b1
            },
            ChangeKind::BankUpdated(b1),
            ChangeKind::ReferenceWithdrawn {
                reference: r1,
                bank: b1
            },
        ]
    );
    // The same entries as in the full log.
    for change in &of_b1 {
        assert!(all.contains(change), "{change:?}");
    }
    assert!(of_b1.windows(2).all(|w| w[0].seq < w[1].seq));
    // Paging by sequence number within the filter.
    assert_eq!(store.audit(Some(b1), of_b1[1].seq, 2).await?, of_b1[2..4]);
    assert_eq!(store.audit(Some(b1), ChangeSeq(0), 1).await?, of_b1[..1]);
    assert!(store.audit(Some(b1), of_b1[3].seq, 10).await?.is_empty());
    assert_eq!(store.audit(Some(b2), ChangeSeq(0), 100).await?.len(), 3);

    let err = store.audit(Some(BankId(404)), ChangeSeq(0), 10).await;
    assert!(
        matches!(err, Err(Error::NotFound { kind: "bank", ref key }) if key == "404"),
        "{err:?}"
    );
    Ok(())
}
