//! Bad input gets a clear status and never hurts the server: each case below is followed by a
//! valid request that must still succeed.

use framematch::hash::PdqHash;
use framematch::pb;
use tonic::Code;

use crate::support::{self, TestServer};

/// CRC-32 (IEEE) of `bytes`, to build PNG chunks whose headers lie about their size.
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

/// A PNG whose IHDR claims `width` x `height` RGB pixels, followed by a tiny IDAT and IEND.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let chunk = |png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]| {
        png.extend_from_slice(&u32::try_from(data.len()).expect("len").to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(
        &mut png,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut png, b"IEND", &[]);
    png
}

fn good_hash() -> PdqHash {
    PdqHash::from_bit_fn(|k| k % 2 == 0)
}

async fn assert_still_serving(server: &TestServer) {
    let result = support::match_image(server, support::pdq_frame(0, 0, &good_hash(), 100), None)
        .await
        .expect("the server keeps serving after bad input");
    assert_eq!(result.pdq_hex, good_hash().to_hex());
}

fn frame(signal: Option<pb::frame::Signal>) -> pb::Frame {
    pb::Frame {
        embeddings: Vec::new(),
        frame_index: 0,
        timestamp_ms: 0,
        signal,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_invalid_argument_with_a_clear_message() {
    let server = TestServer::start().await;
    let cases: Vec<(&str, pb::Frame, &str)> = vec![
        ("empty frame", frame(None), "missing frame.signal"),
        (
            "empty image",
            frame(Some(pb::frame::Signal::Image(Vec::new()))),
            "frame.image is empty",
        ),
        (
            "garbage bytes",
            frame(Some(pb::frame::Signal::Image(
                b"this is not an image at all".to_vec(),
            ))),
            "",
        ),
        (
            "0x0 raw image",
            frame(Some(pb::frame::Signal::Rgb(pb::RawRgb {
                width: 0,
                height: 0,
                data: Vec::new(),
            }))),
            "0x0",
        ),
        ("0x0 PNG", support::image_frame(png_claiming(0, 0)), ""),
        (
            "short RGB buffer",
            frame(Some(pb::frame::Signal::Rgb(pb::RawRgb {
                width: 10,
                height: 10,
                data: vec![0; 299],
            }))),
            "needs 300",
        ),
        (
            "31-byte hash",
            frame(Some(pb::frame::Signal::Pdq(pb::PdqSignal {
                hash: vec![0; 31],
                quality: 100,
                variants: Vec::new(),
                content: None,
            }))),
            "32 bytes, got 31",
        ),
        (
            "quality over 100",
            frame(Some(pb::frame::Signal::Pdq(pb::PdqSignal {
                hash: vec![0; 32],
                quality: 101,
                variants: Vec::new(),
                content: None,
            }))),
            "0 to 100",
        ),
    ];
    for (name, frame, needle) in cases {
        let status = support::match_image(&server, frame, None)
            .await
            .expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            !status.message().is_empty() && status.message().contains(needle),
            "{name}: message {:?} should mention {needle:?}",
            status.message()
        );
        assert_still_serving(&server).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_input_is_resource_exhausted_with_the_numbers() {
    let server = TestServer::start_with(|config| {
        config.limits.max_image_bytes = 100_000;
        config.limits.max_pixels = 1_000_000;
    })
    .await;

    let huge = support::match_image(
        &server,
        support::image_frame(png_claiming(50_000, 50_000)),
        None,
    )
    .await
    .expect_err("50000x50000 PNG");
    assert_eq!(huge.code(), Code::ResourceExhausted, "{huge:?}");
    assert!(huge.message().contains("50000"), "{}", huge.message());
    assert_still_serving(&server).await;

    let at_limit = support::match_image(&server, support::image_frame(vec![0xff; 100_000]), None)
        .await
        .expect_err("garbage at the byte limit");
    assert_eq!(
        at_limit.code(),
        Code::InvalidArgument,
        "at the limit the bytes are decoded"
    );

    let over = support::match_image(&server, support::image_frame(vec![0xff; 100_001]), None)
        .await
        .expect_err("one byte over");
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert_eq!(
        over.message(),
        "frame.image is 100001 bytes, limit is 100000 bytes"
    );

    let raw = support::match_image(
        &server,
        frame(Some(pb::frame::Signal::Rgb(pb::RawRgb {
            width: 2000,
            height: 1000,
            data: Vec::new(),
        }))),
        None,
    )
    .await
    .expect_err("too many raw pixels");
    assert_eq!(raw.code(), Code::ResourceExhausted);

    // Far above the message limit tonic itself refuses the message, with OUT_OF_RANGE.
    let message_limit = 100_000 + 64 * 1024;
    let too_big = support::match_image(
        &server,
        support::image_frame(vec![0; message_limit + 1]),
        None,
    )
    .await
    .expect_err("over the message limit");
    assert_eq!(too_big.code(), Code::OutOfRange, "{too_big:?}");
    assert_still_serving(&server).await;
    server.stop().await;
}

fn request(frame: pb::Frame, options: Option<pb::MatchOptions>) -> pb::MatchRequest {
    pb::MatchRequest {
        options,
        frame: Some(frame),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_frame_mid_stream_ends_it_after_the_good_ones_are_answered() {
    let server = TestServer::start().await;
    let good = support::pdq_frame(0, 0, &good_hash(), 100);
    let mut responses = server
        .matcher()
        .await
        .match_video(tokio_stream::iter(vec![
            request(good.clone(), Some(pb::MatchOptions::default())),
            request(good.clone(), None),
            request(
                frame(Some(pb::frame::Signal::Image(b"junk".to_vec()))),
                None,
            ),
            request(good.clone(), None),
        ]))
        .await
        .expect("stream opens")
        .into_inner();
    let mut answered = 0;
    let status = loop {
        match responses.message().await {
            Ok(Some(_)) => answered += 1,
            Ok(None) => panic!("stream ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(answered, 2);
    assert_eq!(status.code(), Code::InvalidArgument);

    let late_options = support::match_video(
        &server,
        vec![
            request(good.clone(), None),
            request(good.clone(), Some(pb::MatchOptions::default())),
        ],
    )
    .await
    .expect_err("options on the second message");
    assert_eq!(late_options.code(), Code::InvalidArgument);
    assert!(late_options.message().contains("first message"));

    let no_frame = support::match_video(
        &server,
        vec![pb::MatchRequest {
            options: None,
            frame: None,
        }],
    )
    .await
    .expect_err("message without a frame");
    assert_eq!(no_frame.code(), Code::InvalidArgument);
    assert_still_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_limits_are_resource_exhausted() {
    let server = TestServer::start_with(|config| {
        config.limits.max_frames_per_stream = 3;
        config.limits.max_concurrent_streams = 1;
    })
    .await;
    let good = support::pdq_frame(0, 0, &good_hash(), 100);
    let at_limit = support::match_video(&server, vec![request(good.clone(), None); 3])
        .await
        .expect("three frames are allowed");
    assert_eq!(at_limit.len(), 4, "3 frames and a summary");
    let over = support::match_video(&server, vec![request(good.clone(), None); 4])
        .await
        .expect_err("four frames are not");
    assert_eq!(over.code(), Code::ResourceExhausted);
    assert!(
        over.message().contains("limit is 3 frames"),
        "{}",
        over.message()
    );

    // Hold one stream open (its sender stays alive), then try a second.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::MatchRequest>(4);
    tx.send(request(good.clone(), None)).await.expect("send");
    let mut first = server
        .matcher()
        .await
        .match_video(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("first stream")
        .into_inner();
    first
        .message()
        .await
        .expect("first answer")
        .expect("a frame result");
    let second = support::match_video(&server, vec![request(good.clone(), None)])
        .await
        .expect_err("second concurrent stream");
    assert_eq!(second.code(), Code::ResourceExhausted);
    drop(tx);
    while first.message().await.expect("rest of first").is_some() {}
    // The permit is released when the first stream's task ends; a new stream then opens.
    let mut retries = 0;
    loop {
        match support::match_video(&server, vec![request(good.clone(), None)]).await {
            Ok(_) => break,
            Err(status) if status.code() == Code::ResourceExhausted && retries < 100 => {
                retries += 1;
                tokio::task::yield_now().await;
            }
            Err(status) => panic!("unexpected {status:?}"),
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_reference_checks_its_protocol() {
    let server = TestServer::start().await;
    support::create_bank(&server, "b").await;
    let unknown = support::add_reference(
        &server,
        "nope",
        vec![support::pdq_frame(0, 0, &good_hash(), 100)],
    )
    .await
    .expect_err("unknown bank");
    assert_eq!(unknown.code(), Code::NotFound);
    let empty = support::add_reference(&server, "b", Vec::new())
        .await
        .expect_err("no frames");
    assert_eq!(empty.code(), Code::InvalidArgument);
    let headless = server
        .banks()
        .await
        .add_reference(tokio_stream::iter(vec![pb::AddReferenceRequest {
            item: Some(pb::add_reference_request::Item::Frame(support::pdq_frame(
                0,
                0,
                &good_hash(),
                100,
            ))),
        }]))
        .await
        .expect_err("no header");
    assert_eq!(headless.code(), Code::InvalidArgument);
    let bad_frame =
        support::add_reference(&server, "b", vec![support::image_frame(b"junk".to_vec())])
            .await
            .expect_err("undecodable frame");
    assert_eq!(bad_frame.code(), Code::InvalidArgument);
    // Nothing half-written: the store has no reference.
    let stats = server
        .banks()
        .await
        .stats(pb::StatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.active_references, 0);
    assert_eq!(stats.stored_frames, 0);

    let dup = support::add_reference(
        &server,
        "b",
        vec![
            support::pdq_frame(0, 0, &good_hash(), 100),
            support::pdq_frame(1, 1000, &good_hash(), 100),
        ],
    )
    .await
    .expect("duplicate frames are deduplicated");
    assert_eq!((dup.frames_received, dup.frames_stored), (2, 1));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_images_are_invalid_argument_and_never_stored() {
    let Some(conformance) = support::conformance_dir() else {
        return;
    };
    let original =
        std::fs::read(conformance.join("pdq/bridge-1-original.jpg")).expect("read bridge photo");
    let server = TestServer::start().await;
    support::create_bank(&server, "b").await;
    // The first third of a real JPEG, and the same cut padded back to full length with zeros.
    let third = original[..original.len() / 3].to_vec();
    let mut padded = third.clone();
    padded.resize(original.len(), 0);
    // A PNG re-encoded from it, cut in half.
    let mut png = std::io::Cursor::new(Vec::new());
    image::load_from_memory(&original)
        .expect("decodes")
        .thumbnail(200, 200)
        .write_to(&mut png, image::ImageFormat::Png)
        .expect("encodes");
    let mut png = png.into_inner();
    png.truncate(png.len() / 2);
    for (name, bytes, needle) in [
        ("jpeg third", third, "truncated"),
        ("zero-padded jpeg", padded, "truncated"),
        ("half png", png, "decoded"),
    ] {
        let status = support::match_image(&server, support::image_frame(bytes.clone()), None)
            .await
            .expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{name}: message {:?} should mention {needle:?}",
            status.message()
        );
        let status = support::add_reference(&server, "b", vec![support::image_frame(bytes)])
            .await
            .expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(status.message().contains(needle), "{name}: {status:?}");
        assert_still_serving(&server).await;
    }
    let stats = server
        .banks()
        .await
        .stats(pb::StatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    assert_eq!((stats.active_references, stats.stored_frames), (0, 0));
    // The whole file is still accepted.
    support::add_reference(&server, "b", vec![support::image_frame(original)])
        .await
        .expect("the complete photo is stored");
    server.stop().await;
}
