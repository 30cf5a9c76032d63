use super::*;

#[test]
fn a_seq_is_complete_when_a_higher_one_arrives() {
    let mut cursor = Cursor::new(10);
    assert_eq!(cursor.resume_from(), 10);
    assert_eq!(cursor.unsaved(), None);
    // A bank made visible at 12 comes with its references, all at 12.
    for _ in 0..3 {
        cursor.begin(12).expect("in order");
        assert_eq!(cursor.unsaved(), None, "12 is not complete yet");
        assert_eq!(cursor.resume_from(), 10);
    }
    cursor.begin(15).expect("in order");
    assert_eq!(cursor.unsaved(), Some(12));
    assert_eq!(cursor.resume_from(), 12);
    cursor.saved(12);
    assert_eq!(cursor.unsaved(), None);
    cursor.begin(16).expect("in order");
    assert_eq!(cursor.unsaved(), Some(15));
    // Recorded less often than seqs complete: still the latest complete one.
    cursor.begin(20).expect("in order");
    assert_eq!(cursor.unsaved(), Some(16));
    cursor.saved(16);
    assert_eq!(cursor.persisted, 16);
    // saved never moves the record backwards.
    cursor.saved(3);
    assert_eq!(cursor.persisted, 16);
}

#[test]
fn a_reconnect_replays_the_pending_group() {
    let mut cursor = Cursor::new(0);
    cursor.begin(4).expect("in order");
    cursor.begin(7).expect("in order");
    cursor.begin(7).expect("in order");
    // The stream breaks in the middle of group 7: resume after 4, and 7 comes again.
    cursor.reconnecting();
    assert_eq!(cursor.resume_from(), 4);
    cursor.begin(7).expect("in order");
    cursor.begin(7).expect("in order");
    cursor.begin(9).expect("in order");
    assert_eq!(cursor.unsaved(), Some(7));
}

#[test]
fn a_feed_going_backwards_is_refused() {
    let mut cursor = Cursor::new(5);
    let err = cursor.begin(5).expect_err("not after 5");
    assert!(err.contains("seq 5 after 5"), "{err}");
    assert!(cursor.begin(3).is_err());
    cursor.begin(8).expect("in order");
    assert!(cursor.begin(6).is_err());
    assert_eq!(cursor.pending, Some(8), "a refused seq changes nothing");
    assert_eq!(cursor.resume_from(), 5);
}

#[test]
fn bank_names_keep_to_the_alphabet() {
    assert_eq!(
        bank_name("platform-a", "attacks_2024.v1"),
        "platform-a.attacks_2024.v1"
    );
    assert_eq!(bank_name("Platform A", "ü bank/1"), "Platform_A.__bank_1");
    assert_eq!(
        bank_name("local@127.0.0.1:5000", "shared"),
        "local_127.0.0.1_5000.shared"
    );
    let long = bank_name(&"o".repeat(100), &"n".repeat(100));
    assert_eq!(long.chars().count(), MAX_NAME_CHARS);
    assert!(long.starts_with(&"o".repeat(100)));
    // What the store accepts: 1 to 128 characters of the alphabet.
    for name in [long, bank_name("", "")] {
        assert!(!name.is_empty());
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        );
    }
    let fallback = fallback_bank_name(&"x".repeat(128), 4567);
    assert_eq!(fallback.len(), MAX_NAME_CHARS);
    assert!(fallback.ends_with("x-4567"));
    assert_eq!(fallback_bank_name("a.b", 3), "a.b-3");
}

#[test]
fn owners_named_like_our_default_organisation_are_renamed() {
    assert_eq!(
        mirror_org_name("platform-a", "local", "a.example:50051"),
        "platform-a"
    );
    assert_eq!(
        mirror_org_name("local", "local", "a.example:50051"),
        "local@a.example:50051"
    );
    let long = mirror_org_name("local", "local", &"h".repeat(200));
    assert_eq!(long.chars().count(), MAX_NAME_CHARS);
    assert_eq!(
        mirror_org_name(&"é".repeat(200), "local", "x")
            .chars()
            .count(),
        MAX_NAME_CHARS
    );
}

#[test]
fn partner_frames_are_checked() {
    let hash = PdqHash::from_bit_fn(|k| k % 3 == 0);
    let good = pb::StoredFrame {
        embeddings: Vec::new(),
        frame_index: 4,
        timestamp_ms: 4000,
        pdq: hash.as_bytes().to_vec(),
        quality: 90,
    };
    let frame = frame_from_pb(&good).expect("a good frame");
    assert_eq!(
        (frame.frame_index, frame.timestamp_ms, frame.quality),
        (4, 4000, 90)
    );
    assert_eq!(frame.hash, hash);
    let short = pb::StoredFrame {
        pdq: vec![0; 31],
        ..good.clone()
    };
    assert!(
        frame_from_pb(&short)
            .expect_err("31 bytes")
            .contains("31 bytes")
    );
    let bad_quality = pb::StoredFrame {
        quality: 101,
        ..good
    };
    assert!(
        frame_from_pb(&bad_quality)
            .expect_err("quality 101")
            .contains("quality 101")
    );
}

#[test]
fn reasons_and_descriptions_fit_the_store() {
    assert_eq!(withdrawal_reason(""), "withdrawn by the partner");
    assert_eq!(
        withdrawal_reason("false positive"),
        "withdrawn by the partner: false positive"
    );
    let long = withdrawal_reason(&"é".repeat(3000));
    assert!(long.len() <= MAX_TEXT_BYTES);
    assert!(long.is_char_boundary(long.len()));
    assert_eq!(
        category(pb::Category::Terrorism as i32),
        Category::Terrorism
    );
    assert_eq!(category(99), Category::Other);
}
