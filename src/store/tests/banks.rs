//! Backend-neutral store tests: Organisations, banks and their sharing.

use super::*;

pub(super) async fn fresh_store_has_the_default_org_and_its_change(store: Store) -> TestResult {
    let local = store.default_org().await?;
    assert_eq!(
        store.list_orgs().await?,
        vec![Organisation {
            id: local,
            name: DEFAULT_ORG_NAME.to_string()
        }]
    );
    let changes = store.changes_since(ChangeSeq(0), 100).await?;
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].seq, ChangeSeq(1));
    assert_eq!(changes[0].kind, ChangeKind::OrgCreated(local));
    assert_eq!(changes[0].actor, sys(local));
    assert_eq!(store.stats().await?.organisations, 1);
    Ok(())
}

pub(super) async fn orgs_round_trip_and_reject_duplicates(store: Store) -> TestResult {
    let acme = store.create_org("Acme Video Ltd", None).await?;
    assert_eq!(acme.name, "Acme Video Ltd");
    let orgs = store.list_orgs().await?;
    assert_eq!(orgs.len(), 2);
    assert_eq!(orgs[1], acme);
    let err = store.create_org("Acme Video Ltd", None).await;
    assert!(
        matches!(err, Err(Error::AlreadyExists { kind: "organisation", ref key }) if key == "Acme Video Ltd"),
        "{err:?}"
    );
    for bad in ["", " padded", "tab\there", &"x".repeat(MAX_NAME_CHARS + 1)] {
        let err = store.create_org(bad, None).await;
        assert!(
            matches!(
                err,
                Err(Error::InvalidInput {
                    field: "organisation name",
                    ..
                })
            ),
            "{bad:?}: {err:?}"
        );
    }
    store.create_org(&"é".repeat(MAX_NAME_CHARS), None).await?;
    Ok(())
}

pub(super) async fn banks_round_trip_by_id_and_name(store: Store) -> TestResult {
    let local = store.default_org().await?;
    let partner = store.create_org("partner", None).await?.id;
    let other = store.create_org("other", None).await?.id;

    let private = store
        .create_bank(new_bank("private.bank", local), sys(local))
        .await?;
    let shared = store
        .create_bank(
            NewBank {
                visibility: Visibility::SharedWith(vec![other, partner, other]),
                category: Category::Terrorism,
                ..new_bank("shared_bank-1", local)
            },
            sys(local),
        )
        .await?;
    let public = store
        .create_bank(
            NewBank {
                visibility: Visibility::Public,
                category: Category::SuicideSelfHarm,
                ..new_bank("public", partner)
            },
            sys(partner),
        )
        .await?;
    // Shares come back sorted and deduplicated.
    assert_eq!(
        shared.visibility,
        Visibility::SharedWith(vec![partner, other])
    );
    assert_eq!(private.owner, local);
    assert_eq!(private.description, "test bank");
    assert!(private.created_ms > 0);

    for bank in [&private, &shared, &public] {
        assert_eq!(&store.get_bank(bank.id).await?, bank);
        assert_eq!(&store.bank_by_name(&bank.name).await?, bank);
    }
    assert_eq!(store.list_banks().await?, vec![private, shared, public]);
    Ok(())
}

pub(super) async fn bank_errors(store: Store) -> TestResult {
    let local = store.default_org().await?;
    store
        .create_bank(new_bank("dup", local), sys(local))
        .await?;
    let err = store.create_bank(new_bank("dup", local), sys(local)).await;
    assert!(
        matches!(err, Err(Error::AlreadyExists { kind: "bank", ref key }) if key == "dup"),
        "{err:?}"
    );
    for bad in [
        "",
        "has space",
        "slash/",
        "ümlaut",
        &"b".repeat(MAX_NAME_CHARS + 1),
    ] {
        let err = store.create_bank(new_bank(bad, local), sys(local)).await;
        assert!(
            matches!(
                err,
                Err(Error::InvalidInput {
                    field: "bank name",
                    ..
                })
            ),
            "{bad:?}: {err:?}"
        );
    }
    let long = NewBank {
        description: "d".repeat(MAX_TEXT_BYTES + 1),
        ..new_bank("long", local)
    };
    assert!(matches!(
        store.create_bank(long, sys(local)).await,
        Err(Error::InvalidInput {
            field: "description",
            ..
        })
    ));
    let ghost = OrgId(9999);
    for (bank, actor) in [
        (new_bank("ghost-owner", ghost), local),
        (new_bank("ghost-actor", local), ghost),
        (
            NewBank {
                visibility: Visibility::SharedWith(vec![local, ghost]),
                ..new_bank("ghost-share", local)
            },
            local,
        ),
    ] {
        let err = store.create_bank(bank, sys(actor)).await;
        assert!(
            matches!(err, Err(Error::NotFound { kind: "organisation", ref key }) if key == "9999"),
            "{err:?}"
        );
    }
    assert!(matches!(
        store.get_bank(BankId(42)).await,
        Err(Error::NotFound { kind: "bank", ref key }) if key == "42"
    ));
    assert!(matches!(
        store.bank_by_name("nope").await,
        Err(Error::NotFound { kind: "bank", ref key }) if key == "nope"
    ));
    // Failed writes leave no trace in the log.
    assert_eq!(store.changes_since(ChangeSeq(0), 100).await?.len(), 2);
    Ok(())
}

pub(super) async fn bank_visibility_updates_rewrite_shares_and_log_the_change(
    store: Store,
) -> TestResult {
    let local = store.default_org().await?;
    let a = store.create_org("a", None).await?.id;
    let b = store.create_org("b", None).await?.id;
    let bank = store.create_bank(new_bank("b1", local), sys(local)).await?;
    let other = store
        .create_bank(
            NewBank {
                visibility: Visibility::SharedWith(vec![a]),
                ..new_bank("b2", local)
            },
            sys(local),
        )
        .await?;
    let actor = sys(a);

    let shared = store
        .update_bank_visibility(bank.id, Visibility::SharedWith(vec![b, a, b]), actor)
        .await?;
    assert_eq!(shared.visibility, Visibility::SharedWith(vec![a, b]));
    assert_eq!(
        shared,
        Bank {
            visibility: Visibility::SharedWith(vec![a, b]),
            ..bank.clone()
        }
    );
    assert_eq!(store.get_bank(bank.id).await?, shared);
    let change = last_change(&store).await?;
    assert_eq!(change.kind, ChangeKind::BankUpdated(bank.id));
    assert_eq!(change.actor, actor);
    assert_eq!(change.detail, format!("shared with {a},{b}"));

    let public = store
        .update_bank_visibility(bank.id, Visibility::Public, actor)
        .await?;
    assert_eq!(public.visibility, Visibility::Public);
    assert_eq!(
        store.get_bank(bank.id).await?.visibility,
        Visibility::Public
    );
    assert_eq!(last_change(&store).await?.detail, "public");

    // Back to shared with one: the old shares are gone, not merged.
    store
        .update_bank_visibility(bank.id, Visibility::SharedWith(vec![b]), actor)
        .await?;
    assert_eq!(
        store.get_bank(bank.id).await?.visibility,
        Visibility::SharedWith(vec![b])
    );
    let private = store
        .update_bank_visibility(bank.id, Visibility::Private, actor)
        .await?;
    assert_eq!(private.visibility, Visibility::Private);
    assert_eq!(last_change(&store).await?.detail, "private");
    // Another bank's shares are untouched.
    assert_eq!(store.get_bank(other.id).await?, other);
    assert_eq!(
        store.list_banks().await?,
        vec![private.clone(), other.clone()]
    );

    let before = store.last_seq().await?;
    let err = store
        .update_bank_visibility(BankId(999), Visibility::Public, actor)
        .await;
    assert!(
        matches!(err, Err(Error::NotFound { kind: "bank", ref key }) if key == "999"),
        "{err:?}"
    );
    let err = store
        .update_bank_visibility(bank.id, Visibility::SharedWith(vec![a, OrgId(998)]), actor)
        .await;
    assert!(
        matches!(err, Err(Error::NotFound { kind: "organisation", ref key }) if key == "998"),
        "{err:?}"
    );
    let err = store
        .update_bank_visibility(bank.id, Visibility::Public, sys(OrgId(997)))
        .await;
    assert!(
        matches!(err, Err(Error::NotFound { kind: "organisation", ref key }) if key == "997"),
        "{err:?}"
    );
    // Failed updates change nothing and log nothing.
    assert_eq!(store.get_bank(bank.id).await?, private);
    assert_eq!(store.last_seq().await?, before);
    Ok(())
}
