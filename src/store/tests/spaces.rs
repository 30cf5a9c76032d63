//! Backend-neutral store tests: Embedding spaces and the vectors stored in them.

use super::*;

/// A space's index settings are written when it is first created and kept: a second bank
/// declaring it with other settings gets the stored ones, and so does every read.
pub(super) async fn space_index_settings_are_stored_once(store: Store) -> TestResult {
    let local = store.default_org().await?;
    let tuned: crate::index::VectorParams = "m=24,ef_construction=200,ef_search=96,graph_min=5"
        .parse()
        .map_err(|e| format!("{e}"))?;
    let first = store
        .create_bank(
            bank_with_spaces(
                "tuned",
                local,
                vec![
                    EmbeddingSpace {
                        index: Some(tuned),
                        ..space("sscd", 8, Metric::Cosine, 0.8)
                    },
                    space("plain", 4, Metric::Dot, 1.0),
                ],
            ),
            sys(local),
        )
        .await?;
    let by_name = |bank: &Bank, name: &str| {
        bank.embedding_spaces
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| format!("bank {} has no space {name}", bank.name))
    };
    assert_eq!(by_name(&first, "sscd")?.index, Some(tuned));
    // No settings asked: NULL, the defaults.
    assert_eq!(by_name(&first, "plain")?.index, None);
    assert_eq!(
        by_name(&first, "plain")?.index_params(),
        crate::index::VectorParams::default()
    );
    assert_eq!(store.get_bank(first.id).await?, first);

    let other: crate::index::VectorParams = "m=8".parse().map_err(|e| format!("{e}"))?;
    let second = store
        .create_bank(
            bank_with_spaces(
                "later",
                local,
                vec![EmbeddingSpace {
                    index: Some(other),
                    ..space("sscd", 8, Metric::Cosine, 0.9)
                }],
            ),
            sys(local),
        )
        .await?;
    let declared = by_name(&second, "sscd")?;
    assert_eq!(declared.index, Some(tuned), "the stored settings are kept");
    assert_eq!(declared.threshold, 0.9, "the threshold is the bank's own");
    assert_eq!(store.get_bank(second.id).await?, second);
    assert_eq!(store.bank_by_name("later").await?, second);
    assert_eq!(store.list_banks().await?, vec![first, second]);
    Ok(())
}

pub(super) async fn embeddings_round_trip_in_f16(store: Store) -> TestResult {
    let local = store.default_org().await?;
    let bank = store
        .create_bank(
            bank_with_spaces(
                "vectors",
                local,
                vec![
                    space("sscd", 64, Metric::Cosine, 0.75),
                    space("raw", 3, Metric::Dot, -2.5),
                ],
            ),
            sys(local),
        )
        .await?;
    // Sorted by name whatever the request's order.
    let expected_spaces = vec![
        space("raw", 3, Metric::Dot, -2.5),
        space("sscd", 64, Metric::Cosine, 0.75),
    ];
    assert_eq!(bank.embedding_spaces, expected_spaces);
    assert_eq!(store.get_bank(bank.id).await?, bank);
    assert_eq!(store.bank_by_name("vectors").await?, bank);
    assert_eq!(store.list_banks().await?, vec![bank.clone()]);

    let sscd0 = wavy(64, 0.37);
    let sscd1 = wavy(64, 1.91);
    let raw = vec![120.5, -3.25, 0.001];
    let reference = store
        .add_reference(
            NewReference {
                embeddings: vec![
                    vector_of(1, "sscd", sscd1.clone()),
                    vector_of(0, "sscd", sscd0.clone()),
                    vector_of(0, "raw", raw.clone()),
                ],
                ..new_reference(bank.id, local, vec![frame(0, 1), frame(1, 2)])
            },
            sys(local),
        )
        .await?;
    let stored = store.reference_embeddings(reference.id).await?;
    assert_eq!(stored.len(), 3);
    assert_eq!(
        stored
            .iter()
            .map(|e| (e.space.as_str(), e.frame_index, e.timestamp_ms))
            .collect::<Vec<_>>(),
        vec![("raw", 0, 0), ("sscd", 0, 0), ("sscd", 1, 1000)]
    );
    // Dot vectors are kept as sent (f16 keeps 11 significant bits); cosine ones normalised.
    assert_close(&stored[0].vector, &raw, 0.07);
    assert_close(&stored[1].vector, &unit(sscd0), 1e-3);
    assert_close(&stored[2].vector, &unit(sscd1), 1e-3);

    let active = store.load_active().await?;
    assert_eq!(active.frames.len(), 2);
    assert_eq!(active.seq, store.last_seq().await?);
    let mut loaded: Vec<FrameEmbedding> = active
        .embeddings
        .iter()
        .map(|e| {
            assert_eq!((e.reference, e.bank), (reference.id, bank.id));
            e.embedding.clone()
        })
        .collect();
    loaded.sort_by(|a, b| {
        a.space
            .cmp(&b.space)
            .then(a.frame_index.cmp(&b.frame_index))
    });
    assert_eq!(loaded, stored);

    // A second bank may declare the same space with its own threshold.
    let other = store
        .create_bank(
            bank_with_spaces("other", local, vec![space("sscd", 64, Metric::Cosine, 0.9)]),
            sys(local),
        )
        .await?;
    assert_eq!(
        store.get_bank(other.id).await?.embedding_spaces,
        vec![space("sscd", 64, Metric::Cosine, 0.9)]
    );

    // A reference with vectors and no PDQ frame.
    let vector_only = store
        .add_reference(
            NewReference {
                embeddings: vec![vector_of(4, "sscd", wavy(64, 0.5))],
                ..new_reference(other.id, local, Vec::new())
            },
            sys(local),
        )
        .await?;
    assert_eq!(vector_only.frame_count, 0);
    assert!(store.reference_frames(vector_only.id).await?.is_empty());
    assert_eq!(store.reference_embeddings(vector_only.id).await?.len(), 1);
    assert_eq!(store.load_active().await?.embeddings.len(), 4);
    Ok(())
}

pub(super) async fn embedding_space_conflicts_and_bad_vectors_are_refused(
    store: Store,
) -> TestResult {
    let local = store.default_org().await?;
    let bank = store
        .create_bank(
            bank_with_spaces("b", local, vec![space("sscd", 4, Metric::Cosine, 0.8)]),
            sys(local),
        )
        .await?;
    let seq = store.last_seq().await?;
    let err = store
        .create_bank(
            bank_with_spaces("c", local, vec![space("sscd", 8, Metric::Cosine, 0.8)]),
            sys(local),
        )
        .await
        .map(|_| ());
    let Err(err @ Error::SpaceConflict { .. }) = err else {
        panic!("expected a space conflict, got {err:?}");
    };
    assert_eq!(
        err.to_string(),
        "embedding space \"sscd\" exists with dimension 4 (cosine); cannot declare it with dimension 8 (cosine)"
    );
    let err = store
        .create_bank(
            bank_with_spaces("c", local, vec![space("sscd", 4, Metric::Dot, 0.8)]),
            sys(local),
        )
        .await;
    assert!(matches!(err, Err(Error::SpaceConflict { .. })), "{err:?}");
    // Nothing of the refused banks was kept.
    assert_eq!(store.last_seq().await?, seq);
    assert!(matches!(
        store.bank_by_name("c").await,
        Err(Error::NotFound { .. })
    ));

    for (bad, expected) in [
        (space("", 4, Metric::Cosine, 0.5), "has 0 characters"),
        (space("SSCD", 4, Metric::Cosine, 0.5), "'S'"),
        (
            space("x", 0, Metric::Cosine, 0.5),
            "dimension 0, must be 1 to 4096",
        ),
        (space("x", 4097, Metric::Cosine, 0.5), "dimension 4097"),
        (space("x", 4, Metric::Cosine, 0.0), "threshold 0"),
        (space("x", 4, Metric::Cosine, 1.5), "threshold 1.5"),
        (space("x", 4, Metric::Dot, f32::NAN), "threshold NaN"),
    ] {
        let err = store
            .create_bank(bank_with_spaces("d", local, vec![bad]), sys(local))
            .await;
        assert!(
            matches!(&err, Err(Error::InvalidInput { field: "embedding_spaces", reason }) if reason.contains(expected)),
            "{expected}: {err:?}"
        );
    }
    let twice = store
        .create_bank(
            bank_with_spaces(
                "d",
                local,
                vec![
                    space("x", 4, Metric::Cosine, 0.5),
                    space("x", 4, Metric::Cosine, 0.6),
                ],
            ),
            sys(local),
        )
        .await;
    assert!(
        matches!(twice, Err(Error::InvalidInput { .. })),
        "{twice:?}"
    );

    let add = |embeddings: Vec<FrameEmbedding>| {
        let store = store.clone();
        async move {
            store
                .add_reference(
                    NewReference {
                        embeddings,
                        ..new_reference(bank.id, local, vec![frame(0, 1)])
                    },
                    sys(local),
                )
                .await
        }
    };
    for (embeddings, expected) in [
        (
            vec![vector_of(3, "sscd", vec![1.0; 3])],
            "embedding space \"sscd\" expects 4 values, frame 3 has 3",
        ),
        (
            vec![vector_of(2, "other", vec![1.0; 4])],
            "frame 2 has a vector of embedding space \"other\", which the bank does not declare (it declares [sscd])",
        ),
        (
            vec![vector_of(1, "sscd", vec![1.0, f32::NAN, 0.0, 0.0])],
            "frame 1 value 1 is NaN",
        ),
        (
            vec![vector_of(1, "sscd", vec![1.0, 0.0, f32::INFINITY, 0.0])],
            "frame 1 value 2 is inf",
        ),
        (
            vec![vector_of(0, "sscd", vec![0.0; 4])],
            "a cosine vector cannot be zero",
        ),
        (
            vec![
                vector_of(5, "sscd", vec![1.0; 4]),
                vector_of(5, "sscd", vec![2.0; 4]),
            ],
            "frame 5 has two vectors of embedding space \"sscd\"",
        ),
    ] {
        let err = add(embeddings).await;
        assert!(
            matches!(&err, Err(Error::InvalidInput { field: "embeddings", reason }) if reason.contains(expected)),
            "{expected}: {err:?}"
        );
    }
    assert_eq!(store.last_seq().await?, seq);
    assert_eq!(store.stats().await?.active_references, 0);
    // Neither frames nor vectors: still an error.
    let empty = store
        .add_reference(new_reference(bank.id, local, Vec::new()), sys(local))
        .await;
    assert!(
        matches!(
            empty,
            Err(Error::InvalidInput {
                field: "frames",
                ..
            })
        ),
        "{empty:?}"
    );
    Ok(())
}

pub(super) async fn withdrawn_vectors_are_not_loaded(store: Store) -> TestResult {
    let local = store.default_org().await?;
    let bank = store
        .create_bank(
            bank_with_spaces("b", local, vec![space("sscd", 8, Metric::Cosine, 0.8)]),
            sys(local),
        )
        .await?;
    let mut ids = Vec::new();
    for seed in 1..=3u8 {
        let reference = store
            .add_reference(
                NewReference {
                    embeddings: vec![vector_of(0, "sscd", wavy(8, f32::from(seed)))],
                    ..new_reference(bank.id, local, vec![frame(0, seed)])
                },
                sys(local),
            )
            .await?;
        ids.push(reference.id);
    }
    store.withdraw_reference(ids[1], "fp", sys(local)).await?;
    let active = store.load_active().await?;
    let mut loaded: Vec<ReferenceId> = active.embeddings.iter().map(|e| e.reference).collect();
    loaded.sort_unstable();
    assert_eq!(loaded, vec![ids[0], ids[2]]);
    // Kept for audit.
    assert_eq!(store.reference_embeddings(ids[1]).await?.len(), 1);
    assert!(matches!(
        store.reference_embeddings(ReferenceId(999)).await,
        Err(Error::NotFound {
            kind: "reference",
            ..
        })
    ));
    Ok(())
}

pub(super) async fn mirrored_references_keep_their_vectors(store: Store) -> TestResult {
    let local = store.default_org().await?;
    let bank = store
        .create_mirrored_bank(
            "peer",
            7,
            bank_with_spaces("mirror", local, vec![space("sscd", 4, Metric::Cosine, 0.8)]),
            sys(local),
        )
        .await?;
    assert_eq!(bank.embedding_spaces.len(), 1);
    let (reference, added) = store
        .add_mirrored_reference(
            "peer",
            70,
            NewReference {
                embeddings: vec![vector_of(0, "sscd", vec![0.5, 0.5, 0.5, 0.5])],
                ..new_reference(bank.id, local, vec![frame(0, 1)])
            },
            sys(local),
        )
        .await?;
    assert!(added);
    let stored = store.reference_embeddings(reference.id).await?;
    assert_eq!(stored.len(), 1);
    assert_close(&stored[0].vector, &[0.5; 4], 1e-3);
    Ok(())
}
