use super::*;

fn limits() -> Limits {
    Limits {
        max_image_bytes: 100,
        max_pixels: 64,
        ..Limits::default()
    }
}

fn frame(signal: pb::frame::Signal) -> pb::Frame {
    pb::Frame {
        embeddings: Vec::new(),
        frame_index: 3,
        timestamp_ms: 3000,
        signal: Some(signal),
    }
}

#[test]
fn a_frame_without_content_is_missing_a_field() {
    let empty = pb::Frame::default();
    assert!(matches!(
        FrameInput::try_from_pb(empty, &limits()),
        Err(Error::MissingField { .. })
    ));
}

#[test]
fn image_limits_are_checked_at_and_over_the_limit() {
    let at = frame(pb::frame::Signal::Image(vec![1; 100]));
    assert!(FrameInput::try_from_pb(at, &limits()).is_ok());
    let over = frame(pb::frame::Signal::Image(vec![1; 101]));
    assert!(matches!(
        FrameInput::try_from_pb(over, &limits()),
        Err(Error::OverLimit {
            actual: 101,
            limit: 100,
            ..
        })
    ));
    let empty = frame(pb::frame::Signal::Image(Vec::new()));
    assert!(matches!(
        FrameInput::try_from_pb(empty, &limits()),
        Err(Error::InvalidField { .. })
    ));
}

#[test]
fn rgb_frames_are_checked_for_size_and_length() {
    let rgb = |width, height, len| {
        frame(pb::frame::Signal::Rgb(pb::RawRgb {
            width,
            height,
            data: vec![0; len],
        }))
    };
    assert!(FrameInput::try_from_pb(rgb(8, 8, 192), &limits()).is_ok());
    assert!(matches!(
        FrameInput::try_from_pb(rgb(0, 8, 0), &limits()),
        Err(Error::InvalidField { .. })
    ));
    assert!(matches!(
        FrameInput::try_from_pb(rgb(8, 8, 191), &limits()),
        Err(Error::InvalidField { .. })
    ));
    assert!(matches!(
        FrameInput::try_from_pb(rgb(9, 8, 216), &limits()),
        Err(Error::OverLimit { .. })
    ));
}

#[test]
fn pdq_frames_need_32_bytes_and_a_quality_up_to_100() {
    let pdq = |len, quality| {
        frame(pb::frame::Signal::Pdq(pb::PdqSignal {
            hash: vec![0xab; len],
            quality,
            variants: Vec::new(),
            content: None,
        }))
    };
    let ok = FrameInput::try_from_pb(pdq(32, 100), &limits()).expect("valid");
    assert_eq!(
        ok.content,
        Content::Pdq {
            hash: PdqHash::from_bytes([0xab; 32]),
            quality: 100,
            variants: None,
            content: None,
        }
    );
    assert!(FrameInput::try_from_pb(pdq(31, 100), &limits()).is_err());
    assert!(FrameInput::try_from_pb(pdq(32, 101), &limits()).is_err());
}

#[test]
fn options_override_defaults_within_range() {
    let defaults = MatchParams::default();
    let (params, banks) = match_params(None, &defaults).expect("defaults");
    assert_eq!(params, defaults);
    assert!(banks.is_empty());
    let options = pb::MatchOptions {
        banks: vec!["a".into()],
        max_distance: Some(10),
        dihedral: true,
        ..Default::default()
    };
    let (params, banks) = match_params(Some(options), &defaults).expect("valid");
    assert_eq!(params.max_distance, 10);
    assert!(params.dihedral);
    assert_eq!(banks, vec!["a".to_string()]);
    let bad = pb::MatchOptions {
        max_distance: Some(129),
        ..Default::default()
    };
    assert!(match_params(Some(bad), &defaults).is_err());
    let bad = pb::MatchOptions {
        query_match_threshold_pct: Some(101.0),
        ..Default::default()
    };
    assert!(match_params(Some(bad), &defaults).is_err());
}

fn with_vectors(embeddings: Vec<pb::Embedding>) -> pb::Frame {
    pb::Frame {
        embeddings,
        signal: None,
        ..frame(pb::frame::Signal::Image(Vec::new()))
    }
}

fn vector(space: &str, values: Vec<f32>) -> pb::Embedding {
    pb::Embedding {
        space: space.into(),
        values,
    }
}

fn scope(dimension: u32, metric: Metric) -> SpaceScope {
    SpaceScope {
        space: Arc::from("sscd"),
        dimension,
        metric,
        thresholds: std::collections::HashMap::new(),
    }
}

fn reason(error: Error) -> String {
    error.to_string()
}

#[test]
fn a_frame_may_carry_only_vectors_and_they_are_checked_without_a_bank() {
    let ok = FrameInput::try_from_pb(
        with_vectors(vec![vector("sscd", vec![3.0, 4.0])]),
        &limits(),
    )
    .expect("vector-only frame");
    assert_eq!(ok.content, Content::Vectors);
    assert_eq!(ok.embeddings[0].frame_index, 3);
    assert_eq!(ok.embeddings[0].timestamp_ms, 3000);
    let cases = [
        (vec![vector("", vec![1.0])], "is empty in frame 3"),
        (vec![vector("sscd", Vec::new())], "has 0 values"),
        (vec![vector("sscd", vec![1.0, f32::NAN])], "value 1 is NaN"),
        (
            vec![vector("sscd", vec![1.0]), vector("sscd", vec![2.0])],
            "two vectors of embedding space \"sscd\" in frame 3",
        ),
    ];
    for (embeddings, expected) in cases {
        let error =
            FrameInput::try_from_pb(with_vectors(embeddings), &limits()).expect_err(expected);
        assert!(reason(error).contains(expected), "{expected}");
    }
}

#[test]
fn query_vectors_must_fit_a_space_in_scope_and_cosine_ones_are_normalised() {
    let input = |values: Vec<f32>| {
        FrameInput::try_from_pb(with_vectors(vec![vector("sscd", values)]), &limits())
            .expect("valid")
            .embeddings
    };
    let cosine =
        query_embeddings(input(vec![3.0, 4.0]), &[scope(2, Metric::Cosine)]).expect("in scope");
    assert_eq!(cosine[0].vector, vec![0.6, 0.8]);
    assert!(!cosine[0].content_area);
    let dot = query_embeddings(input(vec![3.0, 4.0]), &[scope(2, Metric::Dot)]).expect("dot");
    assert_eq!(dot[0].vector, vec![3.0, 4.0]);
    let wrong =
        query_embeddings(input(vec![1.0; 3]), &[scope(2, Metric::Cosine)]).expect_err("dimension");
    assert!(reason(wrong).contains("embedding space \"sscd\" expects 2 values, frame 3 has 3"),);
    let none = query_embeddings(input(vec![1.0; 2]), &[]).expect_err("no scope");
    assert!(reason(none).contains("which no bank in scope declares (in scope: [])"));
}

#[test]
fn stored_frames_carry_their_vectors_and_vector_only_indices_come_without_a_hash() {
    let hash = PdqHash::from_bytes([1; 32]);
    let frames = [FrameSignal {
        frame_index: 2,
        timestamp_ms: 80,
        hash,
        quality: 90,
    }];
    let vectors = [
        FrameEmbedding {
            frame_index: 2,
            timestamp_ms: 80,
            space: "sscd".into(),
            vector: vec![1.0],
        },
        FrameEmbedding {
            frame_index: 0,
            timestamp_ms: 0,
            space: "sscd".into(),
            vector: vec![0.5],
        },
    ];
    let wire = stored_frames_to_pb(&frames, &vectors);
    assert_eq!(wire.len(), 2);
    assert_eq!((wire[0].frame_index, wire[0].pdq.len()), (0, 0));
    assert_eq!((wire[1].frame_index, wire[1].pdq.len()), (2, 32));
    assert_eq!(wire[1].embeddings[0].values, vec![1.0]);
    let (back_frames, mut back_vectors) = stored_frames_from_pb(wire).expect("valid");
    assert_eq!(back_frames, frames.to_vec());
    back_vectors.sort_by_key(|v| v.frame_index);
    assert_eq!(back_vectors, vec![vectors[1].clone(), vectors[0].clone()]);
}

#[test]
fn create_bank_spaces_take_the_model_then_the_defaults() {
    let flag: crate::index::VectorParams = "m=24".parse().expect("settings");
    let defaults = SpaceDefaults {
        threshold: 0.75,
        dimension: 512,
        metric: Metric::Cosine,
        index: flag,
    };
    let unset = pb::EmbeddingSpace {
        name: "sscd".into(),
        ..Default::default()
    };
    let plain = embedding_space_from_pb(unset.clone(), None, defaults).expect("defaults");
    assert_eq!(
        (plain.dimension, plain.metric, plain.threshold),
        (512, Metric::Cosine, 0.75)
    );
    assert_eq!(plain.index, Some(flag));
    assert_eq!(
        embedding_space_to_pb(&plain).index,
        "m=24,ef_construction=128,ef_search=64,graph_min=20000"
    );
    let asked = pb::EmbeddingSpace {
        index: "ef_search=200, m=32".into(),
        ..unset.clone()
    };
    let asked = embedding_space_from_pb(asked, None, defaults).expect("asked settings");
    assert_eq!(
        asked
            .index
            .map(|p| (p.max_connections, p.ef_search, p.ef_construction)),
        Some((32, 200, 128))
    );
    let bad = pb::EmbeddingSpace {
        index: "m=1".into(),
        ..unset.clone()
    };
    let error = embedding_space_from_pb(bad, None, defaults).expect_err("bad settings");
    assert!(reason(error).contains("m must be 2 to 256, not 1"));
    let model = embedding_space_from_pb(unset.clone(), Some((256, Metric::Dot)), defaults)
        .expect("model's");
    assert_eq!((model.dimension, model.metric), (256, Metric::Dot));
    let clash = pb::EmbeddingSpace {
        dimension: 128,
        ..unset
    };
    let error = embedding_space_from_pb(clash, Some((256, Metric::Dot)), defaults)
        .expect_err("model clash");
    assert!(reason(error).contains("the server's model of that name gives 256 (dot)"));
}

#[test]
fn categories_round_trip_and_unspecified_is_rejected() {
    for c in Category::ALL {
        assert_eq!(category_from_pb(category_to_pb(c) as i32).ok(), Some(c));
    }
    assert!(category_from_pb(0).is_err());
    assert!(category_from_pb(99).is_err());
}
