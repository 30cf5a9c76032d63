//! Issue #13 item 1 on the real server: the per-image decode limit is checked from the header
//! (a 389 KB PNG declaring 7071x7071 of 16-bit RGBA is refused before one pixel is decoded), a
//! picture that could never fit the server-wide decode budget is refused with the numbers, and
//! pictures that fit one at a time wait for the budget and all succeed.

use framematch::hash::pdq;
use framematch::pb;
use tonic::Code;

use crate::errors::crc32;
use crate::support::{self, TestServer};

/// A PNG whose IHDR declares `width` x `height` pixels of `depth` bits and PNG colour type
/// `color` (2 RGB, 6 RGBA), followed by a tiny IDAT and IEND: the header is all the server reads
/// before refusing it.
fn png_header(width: u32, height: u32, depth: u8, color: u8) -> Vec<u8> {
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
    ihdr.extend_from_slice(&[depth, color, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(
        &mut png,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut png, b"IEND", &[]);
    png
}

/// A real `side` x `side` 8-bit RGB PNG with some texture, so that it hashes with quality.
fn textured_png(side: u32) -> Vec<u8> {
    let picture = image::RgbImage::from_fn(side, side, |x, y| {
        let v = ((x * 7 + y * 13) ^ (x * y)) as u8;
        image::Rgb([v, v.wrapping_mul(3), 255 - v])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    picture
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encode png");
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_over_the_decode_limit_is_refused_from_its_header_with_the_numbers() {
    // Defaults: 50,000,000 pixels, 256 MiB decoded.
    let server = TestServer::start().await;
    let bomb = png_header(7071, 7071, 16, 6);
    let status = support::match_image(&server, support::image_frame(bomb.clone()), None)
        .await
        .expect_err("7071x7071 16-bit RGBA");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    for needle in [
        "7071x7071",
        "16-bit RGBA",
        "399992328 bytes decoded",
        "268435456",
    ] {
        assert!(
            status.message().contains(needle),
            "{:?} should say {needle:?}",
            status.message()
        );
    }
    // The same pixels in 8-bit RGB (150 MB) are within the decode limit: the header passes and
    // the (empty) pixel data is what fails, as INVALID_ARGUMENT.
    let rgb8 = support::match_image(
        &server,
        support::image_frame(png_header(7071, 7071, 8, 2)),
        None,
    )
    .await
    .expect_err("no pixel data");
    assert_eq!(rgb8.code(), Code::InvalidArgument, "{rgb8:?}");
    // AddReference refuses it the same way, and stores nothing.
    support::create_bank(&server, "bombs").await;
    let added = support::add_reference(&server, "bombs", vec![support::image_frame(bomb)]).await;
    let status = added.expect_err("bomb as a reference");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decode_limit_is_configurable_and_checked_at_and_over_it() {
    let png = textured_png(256);
    // 256 x 256 x 3 bytes decoded.
    let decoded = 256 * 256 * 3;
    let at = TestServer::start_with(|config| config.limits.max_decode_bytes = decoded).await;
    support::match_image(&at, support::image_frame(png.clone()), None)
        .await
        .expect("at the limit");
    at.stop().await;
    let under = TestServer::start_with(|config| config.limits.max_decode_bytes = decoded - 1).await;
    let status = support::match_image(&under, support::image_frame(png), None)
        .await
        .expect_err("one byte over");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.message(),
        format!(
            "image is 256x256 pixels of 8-bit RGB, {decoded} bytes decoded, limit is {} bytes decoded",
            decoded - 1
        )
    );
    under.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_larger_than_the_whole_decode_budget_is_resource_exhausted() {
    let png = textured_png(256);
    let probe = pdq::probe_image(&png, &pdq::DecodeLimits::default()).expect("probe");
    let needed = framematch::api::budget::decode_cost(probe.decoded_bytes, probe.pixels(), false);
    let server = TestServer::start_with(|config| config.limits.decode_memory = needed - 1024).await;
    let status = support::match_image(&server, support::image_frame(png), None)
        .await
        .expect_err("never fits");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    for needle in [
        "256x256",
        &format!("needs {needed} bytes"),
        "--decode-memory",
    ] {
        assert!(
            status.message().contains(needle),
            "{:?} should say {needle:?}",
            status.message()
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pictures_that_fit_one_at_a_time_wait_for_the_budget_and_all_succeed() {
    let png = textured_png(256);
    let probe = pdq::probe_image(&png, &pdq::DecodeLimits::default()).expect("probe");
    let one = framematch::api::budget::decode_cost(probe.decoded_bytes, probe.pixels(), false);
    // Room for one picture, not two; four workers that would otherwise decode four at once.
    let server = TestServer::start_with(|config| {
        config.limits.decode_memory = one + one / 2;
        config.hash_workers = 4;
    })
    .await;
    let expected = pdq::hash_image_bytes(&png, &pdq::DecodeLimits::default())
        .expect("hash")
        .hash()
        .to_hex();
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let matcher = server.matcher().await;
        let png = png.clone();
        requests.spawn(async move {
            let mut matcher = matcher;
            matcher
                .match_image(pb::MatchImageRequest {
                    options: None,
                    frame: Some(support::image_frame(png)),
                })
                .await
                .map(|r| r.into_inner().result.expect("result").pdq_hex)
        });
    }
    while let Some(answer) = requests.join_next().await {
        let hex = answer
            .expect("task")
            .expect("every picture is hashed in turn");
        assert_eq!(hex, expected);
    }
    server.stop().await;
}
