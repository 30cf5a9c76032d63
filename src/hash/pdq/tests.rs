use super::*;

/// A small deterministic generator for test pictures (64-bit LCG, top bits).
struct Lcg(u64);

impl Lcg {
    fn next_u8(&mut self) -> u8 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 56) as u8
    }
}

fn noise_rgb(width: u32, height: u32, seed: u64) -> Vec<u8> {
    let mut rng = Lcg(seed);
    (0..width * height * 3).map(|_| rng.next_u8()).collect()
}

/// Smooth content with some noise, so hashes are not dominated by ties.
fn scene_rgb(width: u32, height: u32, seed: u64) -> Vec<u8> {
    let mut rng = Lcg(seed);
    let mut out = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        for x in 0..width {
            let fx = x as f32 / width as f32;
            let fy = y as f32 / height as f32;
            let base = 128.0 + 100.0 * (7.0 * fx + 3.0 * fy * fy).sin() * (5.0 * fy).cos();
            for c in 0..3u8 {
                let v = base + f32::from(c) * 10.0 + f32::from(rng.next_u8() % 16);
                out.push(v.clamp(0.0, 255.0) as u8);
            }
        }
    }
    out
}

/// The reference algorithm transcribed literally from shared/PDQ.md §1: row-major buffers,
/// one line at a time, full 2-pass filter, then decimation. Used as an oracle for the
/// restructured pipeline, compared on exact f32 bits. Index loops and `(dim + 127) / 128` are
/// kept deliberately, to read like the description.
#[allow(clippy::needless_range_loop, clippy::manual_div_ceil)]
fn literal_reference(width: usize, height: usize, luma: &[f32]) -> ([f32; COEFFICIENTS], u8) {
    fn box_1d(input: &[f32], output: &mut [f32], start: usize, n: usize, stride: usize, w: usize) {
        let half = (w + 2) / 2;
        let (mut li, mut ri, mut oi) = (start, start, start);
        let mut sum = 0.0_f32;
        let mut size = 0;
        for _ in 0..half - 1 {
            sum += input[ri];
            size += 1;
            ri += stride;
        }
        for _ in 0..w - half + 1 {
            sum += input[ri];
            size += 1;
            output[oi] = sum / size as f32;
            ri += stride;
            oi += stride;
        }
        for _ in 0..n - w {
            sum += input[ri];
            sum -= input[li];
            output[oi] = sum / size as f32;
            li += stride;
            ri += stride;
            oi += stride;
        }
        for _ in 0..half - 1 {
            sum -= input[li];
            size -= 1;
            output[oi] = sum / size as f32;
            li += stride;
            oi += stride;
        }
    }
    let mut a = [[0.0_f32; 64]; 64];
    if width == 64 && height == 64 {
        for i in 0..64 {
            for j in 0..64 {
                a[i][j] = luma[i * 64 + j];
            }
        }
    } else {
        let wx = (width + 127) / 128;
        let wy = (height + 127) / 128;
        let mut b1 = luma.to_vec();
        let mut b2 = vec![0.0_f32; luma.len()];
        for _ in 0..2 {
            for r in 0..height {
                box_1d(&b1, &mut b2, r * width, width, 1, wx);
            }
            for c in 0..width {
                box_1d(&b2, &mut b1, c, height, width, wy);
            }
        }
        for i in 0..64 {
            let y = (((i as f64 + 0.5) * height as f64) / 64.0) as usize;
            for j in 0..64 {
                let x = (((j as f64 + 0.5) * width as f64) / 64.0) as usize;
                a[i][j] = b1[y * width + x];
            }
        }
    }
    let mut gradient = 0;
    for i in 0..63 {
        for j in 0..64 {
            gradient += ((((a[i][j] - a[i + 1][j]) * 100.0) / 255.0) as i32).abs();
        }
    }
    for i in 0..64 {
        for j in 0..63 {
            gradient += ((((a[i][j] - a[i][j + 1]) * 100.0) / 255.0) as i32).abs();
        }
    }
    let quality = (gradient / 90).min(100) as u8;
    let scale = (2.0_f64 / 64.0).sqrt() as f32;
    let mut d = [[0.0_f32; 64]; 16];
    for i in 0..16 {
        for k in 0..64 {
            d[i][k] = (f64::from(scale)
                * ((PI / 2.0 / 64.0) * (i + 1) as f64 * (2 * k + 1) as f64).cos())
                as f32;
        }
    }
    let mut t = [[0.0_f32; 64]; 16];
    for i in 0..16 {
        for j in 0..64 {
            let mut sum = 0.0_f32;
            for k in 0..64 {
                sum += d[i][k] * a[k][j];
            }
            t[i][j] = sum;
        }
    }
    let mut b = [0.0_f32; 256];
    for i in 0..16 {
        for j in 0..16 {
            let mut sum = 0.0_f32;
            for k in 0..64 {
                sum += t[i][k] * d[j][k];
            }
            b[i * 16 + j] = sum;
        }
    }
    (b, quality)
}

fn luma_of(rgb: &[u8]) -> Vec<f32> {
    rgb.chunks_exact(3)
        .map(|p| rgb_luma(p[0], p[1], p[2]))
        .collect()
}

fn bits(block: &[f32; COEFFICIENTS]) -> Vec<u32> {
    block.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn pipeline_matches_the_literal_reference_bit_for_bit() {
    let sizes = [
        (5, 5),
        (5, 9),
        (6, 200),
        (200, 6),
        (33, 41),
        (63, 64),
        (64, 64),
        (64, 65),
        (127, 129),
        (128, 128),
        (129, 130),
        (255, 257),
        (300, 129),
        (400, 225),
        (700, 520),
        (1000, 7),
    ];
    for (n, &(width, height)) in sizes.iter().enumerate() {
        for rgb in [
            noise_rgb(width, height, n as u64),
            scene_rgb(width, height, n as u64),
        ] {
            let out = hash_rgb(width, height, &rgb).expect("valid buffer");
            let (block, quality) =
                literal_reference(width as usize, height as usize, &luma_of(&rgb));
            assert_eq!(bits(&out.coefficients), bits(&block), "{width}x{height}");
            assert_eq!(out.quality, quality, "{width}x{height}");
        }
    }
}

#[test]
fn luma_weights_are_the_rounded_double_literals() {
    // Rounding 0.299 straight to f32 happens to agree for these weights; this pins it.
    assert_eq!(LUMA_R, 0.299_f32);
    assert_eq!(LUMA_G, 0.587_f32);
    assert_eq!(LUMA_B, 0.114_f32);
}

#[test]
fn hash_luma_equals_hash_rgb_on_the_same_luma() {
    let (width, height) = (150, 97);
    let rgb = scene_rgb(width, height, 7);
    let from_rgb = hash_rgb(width, height, &rgb).expect("valid buffer");
    let from_luma = hash_luma(width, height, &luma_of(&rgb)).expect("valid plane");
    assert_eq!(from_rgb, from_luma);
}

#[test]
fn dihedral_order_and_names_follow_the_reference() {
    let names: Vec<&str> = Dihedral::ALL.iter().map(|d| d.as_str()).collect();
    assert_eq!(
        names,
        [
            "original",
            "rot90",
            "rot180",
            "rot270",
            "flipx",
            "flipy",
            "flipplus1",
            "flipminus1"
        ]
    );
    for (index, d) in Dihedral::ALL.iter().enumerate() {
        assert_eq!(d.index(), index);
        assert_eq!(d.to_string(), d.as_str());
    }
}

#[test]
fn variants_of_transformed_pixels_land_near_the_transformed_picture() {
    // Rotating the pixels themselves and hashing should give (nearly) the variant hash.
    let (width, height) = (192_u32, 128_u32);
    let rgb = scene_rgb(width, height, 3);
    let pixel = |x: u32, y: u32| {
        let at = ((y * width + x) * 3) as usize;
        [rgb[at], rgb[at + 1], rgb[at + 2]]
    };
    // 90° anticlockwise: new (x', y') = (y, width − 1 − x), new size height × width.
    let mut rotated = Vec::with_capacity(rgb.len());
    for y2 in 0..width {
        for x2 in 0..height {
            rotated.extend(pixel(width - 1 - y2, x2));
        }
    }
    let original = hash_rgb(width, height, &rgb).expect("valid buffer");
    let turned = hash_rgb(height, width, &rotated).expect("valid buffer");
    let distances: Vec<u32> = original
        .dihedral()
        .iter()
        .map(|h| h.distance(&turned.hash()))
        .collect();
    let best = distances
        .iter()
        .enumerate()
        .min_by_key(|&(_, d)| d)
        .map(|(i, _)| i);
    assert_eq!(best, Some(Dihedral::Rot90.index()), "{distances:?}");
}

#[test]
fn variant_original_is_the_hash_and_the_table_has_eight() {
    let out = hash_rgb(80, 60, &scene_rgb(80, 60, 1)).expect("valid buffer");
    assert_eq!(out.variant(Dihedral::Original), out.hash());
    let all = out.dihedral();
    assert_eq!(all[0], out.hash());
    for d in Dihedral::ALL {
        assert_eq!(all[d.index()], out.variant(d));
        assert_eq!(out.variant(d).popcount(), 128, "{d}");
    }
    // Flips are involutions on the block, so flipping twice gives the original back.
    let twice = Dihedral::FlipX.transform(&Dihedral::FlipX.transform(&out.coefficients));
    assert_eq!(threshold(&twice), out.hash());
}

#[test]
fn pictures_under_five_pixels_hash_to_zero_with_quality_zero() {
    for (width, height) in [(4, 100), (100, 4), (1, 1), (4, 4)] {
        let out = hash_rgb(width, height, &noise_rgb(width, height, 1)).expect("valid buffer");
        assert_eq!(out.hash(), PdqHash::default());
        assert_eq!(out.quality(), 0);
        assert!(out.dihedral().iter().all(|h| *h == PdqHash::default()));
    }
    let out = hash_luma(3, 3, &[1.0; 9]).expect("valid plane");
    assert_eq!(out.hash(), PdqHash::default());
}

#[test]
fn wrong_buffer_lengths_and_zero_sides_are_errors() {
    assert!(matches!(
        hash_rgb(10, 10, &[0; 299]),
        Err(Error::RgbLength {
            width: 10,
            height: 10,
            expected: 300,
            actual: 299
        })
    ));
    assert!(matches!(
        hash_luma(10, 10, &[0.0; 101]),
        Err(Error::LumaLength {
            expected: 100,
            actual: 101,
            ..
        })
    ));
    assert!(matches!(
        hash_rgb(0, 10, &[]),
        Err(Error::ZeroSize {
            width: 0,
            height: 10
        })
    ));
    assert!(matches!(hash_luma(10, 0, &[]), Err(Error::ZeroSize { .. })));
    let message = hash_rgb(10, 10, &[0; 299])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(
        message,
        "rgb buffer for 10x10 pixels must be 300 bytes, got 299"
    );
}

#[test]
fn flat_and_smooth_pictures_have_low_quality() {
    let flat = hash_rgb(100, 80, &vec![128; 100 * 80 * 3]).expect("valid buffer");
    assert_eq!(flat.quality(), 0);
    let gradient: Vec<f32> = (0..200 * 150).map(|i| ((i % 200) as f32) * 0.2).collect();
    let smooth = hash_luma(200, 150, &gradient).expect("valid plane");
    assert!(smooth.quality() < 50, "quality {}", smooth.quality());
    let busy = hash_rgb(200, 150, &noise_rgb(200, 150, 9)).expect("valid buffer");
    assert_eq!(busy.quality(), 100);
}

#[test]
fn a_two_dimensional_gradient_hash_has_half_its_bits_set() {
    let (width, height) = (320_u32, 240_u32);
    // Not separable (x·y term), so every DCT coefficient is distinct.
    let luma: Vec<f32> = (0..height)
        .flat_map(|y| {
            (0..width).map(move |x| 0.5 * x as f32 + 0.3 * y as f32 + (x * y) as f32 / 400.0)
        })
        .collect();
    let out = hash_luma(width, height, &luma).expect("valid plane");
    assert_eq!(out.hash().popcount(), 128);
    assert_ne!(out.hash(), PdqHash::default());
}

#[test]
fn grey_pixels_use_the_sample_directly() {
    let (width, height) = (90_u32, 70_u32);
    let grey: Vec<u8> = noise_rgb(width, height, 4).into_iter().step_by(3).collect();
    let out = hash_pixels(width, height, Pixels::Grey1(&grey));
    let plane: Vec<f32> = grey.iter().map(|&g| f32::from(g)).collect();
    assert_eq!(out, hash_luma(width, height, &plane).expect("valid plane"));
}

fn encode(picture: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Cursor::new(Vec::new());
    picture.write_to(&mut bytes, format).expect("encodes");
    bytes.into_inner()
}

#[test]
fn decoded_png_hashes_like_its_raw_pixels_and_alpha_is_ignored() {
    let (width, height) = (120_u32, 90_u32);
    let rgb = scene_rgb(width, height, 11);
    let raw = hash_rgb(width, height, &rgb).expect("valid buffer");
    let picture = DynamicImage::ImageRgb8(
        image::RgbImage::from_raw(width, height, rgb.clone()).expect("sized"),
    );
    let png = encode(&picture, ImageFormat::Png);
    let decoded = hash_image_bytes(&png, &DecodeLimits::default()).expect("decodes");
    assert_eq!(decoded, raw);
    // Same colours with a varying alpha channel: alpha is dropped, not composited.
    let mut rgba = picture.to_rgba8();
    for (i, pixel) in rgba.pixels_mut().enumerate() {
        pixel.0[3] = (i % 256) as u8;
    }
    let png = encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png);
    let decoded = hash_image_bytes(&png, &DecodeLimits::default()).expect("decodes");
    assert_eq!(decoded, raw);
    // BMP and lossless WebP decode to the same pixels too.
    for format in [ImageFormat::Bmp, ImageFormat::WebP] {
        let bytes = encode(&picture, format);
        let decoded = hash_image_bytes(&bytes, &DecodeLimits::default()).expect("decodes");
        assert_eq!(decoded, raw, "{format:?}");
    }
}

#[test]
fn gif_first_frame_hashes_like_its_decoded_pixels() {
    let (width, height) = (60_u32, 50_u32);
    let picture = DynamicImage::ImageRgb8(
        image::RgbImage::from_raw(width, height, scene_rgb(width, height, 2)).expect("sized"),
    );
    let gif = encode(&picture, ImageFormat::Gif);
    let decoded = image::load_from_memory(&gif).expect("decodes").to_rgb8();
    let expected = hash_rgb(width, height, decoded.as_raw()).expect("valid buffer");
    let ours = hash_image_bytes(&gif, &DecodeLimits::default()).expect("decodes");
    assert_eq!(ours, expected);
}

#[test]
fn sixteen_bit_grey_is_reduced_like_to_luma8() {
    let (width, height) = (40_u32, 30_u32);
    let samples: Vec<u16> = (0..width * height).map(|i| (i * 53) as u16).collect();
    let picture = DynamicImage::ImageLuma16(
        image::ImageBuffer::from_raw(width, height, samples).expect("sized"),
    );
    let expected = hash_pixels(width, height, Pixels::Grey1(picture.to_luma8().as_raw()));
    let png = encode(&picture, ImageFormat::Png);
    let decoded = hash_image_bytes(&png, &DecodeLimits::default()).expect("decodes");
    assert_eq!(decoded, expected);
}

/// CRC-32 (IEEE), for patching PNG chunks in tests.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0_u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn huge_png_header_is_rejected_before_decoding() {
    let picture = DynamicImage::ImageRgb8(image::RgbImage::new(8, 8));
    let mut png = encode(&picture, ImageFormat::Png);
    // IHDR data starts at byte 16 (8 signature + 4 length + 4 type); its CRC follows 13 bytes.
    png[16..20].copy_from_slice(&50_000_u32.to_be_bytes());
    png[20..24].copy_from_slice(&50_000_u32.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    let started = std::time::Instant::now();
    let result = hash_image_bytes(&png, &DecodeLimits::default());
    assert!(
        matches!(
            result,
            Err(Error::TooManyPixels {
                width: 50_000,
                height: 50_000,
                limit: 50_000_000
            })
        ),
        "{result:?}"
    );
    assert!(started.elapsed().as_secs() < 5);
}

#[test]
fn pixel_limit_admits_exactly_the_limit() {
    let png = encode(
        &DynamicImage::ImageRgb8(image::RgbImage::new(8, 8)),
        ImageFormat::Png,
    );
    let at = |max_pixels| DecodeLimits {
        max_pixels,
        ..DecodeLimits::default()
    };
    assert!(hash_image_bytes(&png, &at(64)).is_ok());
    assert!(matches!(
        hash_image_bytes(&png, &at(63)),
        Err(Error::TooManyPixels {
            width: 8,
            height: 8,
            limit: 63
        })
    ));
}

#[test]
fn byte_limit_empty_and_garbage_inputs_are_errors() {
    let limits = DecodeLimits {
        max_bytes: 10,
        ..DecodeLimits::default()
    };
    assert!(matches!(
        hash_image_bytes(&[0; 11], &limits),
        Err(Error::TooManyBytes {
            bytes: 11,
            limit: 10
        })
    ));
    assert!(matches!(hash_image_bytes(&[], &limits), Err(Error::Empty)));
    assert!(matches!(
        hash_image_bytes(b"definitely not a picture", &DecodeLimits::default()),
        Err(Error::UnknownFormat)
    ));
    // A recognised signature with a broken body is a decode error, never a panic.
    let mut truncated = encode(
        &DynamicImage::ImageRgb8(image::RgbImage::new(30, 30)),
        ImageFormat::Png,
    );
    truncated.truncate(40);
    assert!(matches!(
        hash_image_bytes(&truncated, &DecodeLimits::default()),
        Err(Error::Decode { .. })
    ));
    let mut jpeg_head = vec![0xFF, 0xD8, 0xFF, 0xE0];
    jpeg_head.extend_from_slice(&[0x55; 64]);
    assert!(matches!(
        hash_image_bytes(&jpeg_head, &DecodeLimits::default()),
        Err(Error::Truncated { format: "jpeg", .. })
    ));
}

/// The bridge photograph from ../shared/conformance/pdq, shrunk so debug-build tests stay quick.
fn real_photo() -> DynamicImage {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/conformance/pdq/bridge-1-original.jpg");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    image::load_from_memory(&bytes).expect("decodes").resize(
        320,
        320,
        image::imageops::FilterType::Triangle,
    )
}

/// Every supported format, re-encoded from a real photograph, decodes whole and is refused when
/// cut to its first third, its first two thirds, or all but its last 8 bytes (a JPEG also when
/// the cut is padded back to full length with zeros).
fn assert_truncation_refused(format: ImageFormat, photo: &DynamicImage) {
    let whole = encode(photo, format);
    let full = hash_image_bytes(&whole, &DecodeLimits::default())
        .unwrap_or_else(|e| panic!("{format:?} whole: {e}"));
    assert!(
        full.quality() > 50,
        "{format:?} whole: quality {}",
        full.quality()
    );
    for cut in [whole.len() / 3, whole.len() * 2 / 3, whole.len() - 8] {
        let result = hash_image_bytes(&whole[..cut], &DecodeLimits::default());
        assert!(
            matches!(result, Err(Error::Truncated { .. } | Error::Decode { .. })),
            "{format:?} cut to {cut} of {} bytes: {:?}",
            whole.len(),
            result.map(|out| out.quality())
        );
        // Cut and padded with zeros, as a preallocated partial download would be: only a JPEG
        // can tell (BMP and lossless WebP zeros are valid pixels, PNG's IDAT is already whole).
        if format != ImageFormat::Jpeg {
            continue;
        }
        let mut padded = whole[..cut].to_vec();
        padded.resize(whole.len(), 0);
        let result = hash_image_bytes(&padded, &DecodeLimits::default());
        assert!(
            matches!(result, Err(Error::Truncated { .. } | Error::Decode { .. })),
            "{format:?} cut to {cut} of {} bytes and zero-padded: {:?}",
            whole.len(),
            result.map(|out| out.quality())
        );
    }
}

#[test]
fn truncated_jpeg_is_refused() {
    let photo = real_photo();
    assert_truncation_refused(ImageFormat::Jpeg, &photo);
    // The original file itself, cut to its first third: the case issue #13 reports.
    let original = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/conformance/pdq/bridge-1-original.jpg"),
    )
    .expect("reads");
    let result = hash_image_bytes(&original[..original.len() / 3], &DecodeLimits::default());
    assert!(
        matches!(result, Err(Error::Truncated { format: "jpeg", .. })),
        "{:?}",
        result.map(|out| out.quality())
    );
}

#[test]
fn truncated_png_is_refused() {
    assert_truncation_refused(ImageFormat::Png, &real_photo());
}

#[test]
fn truncated_gif_is_refused() {
    assert_truncation_refused(ImageFormat::Gif, &real_photo());
}

#[test]
fn truncated_webp_is_refused() {
    assert_truncation_refused(ImageFormat::WebP, &real_photo());
}

#[test]
fn truncated_bmp_is_refused() {
    assert_truncation_refused(ImageFormat::Bmp, &real_photo());
}

#[test]
fn complete_jpegs_pass_the_structure_check() {
    // Bytes after the end marker (some cameras append data) are allowed.
    let mut whole = encode(&real_photo(), ImageFormat::Jpeg);
    whole.extend_from_slice(b"trailing vendor data \xFF\xD8");
    assert!(hash_image_bytes(&whole, &DecodeLimits::default()).is_ok());
    // Every JPEG in the conformance folder is complete.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance");
    let mut checked = 0;
    for sub in ["pdq", "vpdq"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("entry").path();
            if !path.is_file() {
                continue;
            }
            let bytes = std::fs::read(&path).expect("reads");
            if image::guess_format(&bytes).ok() == Some(ImageFormat::Jpeg) {
                assert!(jpeg_is_complete(&bytes), "{}", path.display());
                checked += 1;
            }
        }
    }
    assert!(
        checked > 0,
        "no conformance JPEG found in {}",
        dir.display()
    );
}

/// Rough timing for a 720p RGB frame: `cargo test --release --lib -- --ignored --nocapture`.
#[test]
#[ignore = "timing, run by hand in a release build"]
fn time_a_720p_rgb_frame() {
    let (width, height) = (1280_u32, 720_u32);
    let rgb = scene_rgb(width, height, 5);
    let runs = 50;
    let started = std::time::Instant::now();
    let mut quality_sum = 0_u32;
    for _ in 0..runs {
        let out = hash_rgb(width, height, &rgb).expect("valid buffer");
        quality_sum += u32::from(out.quality());
    }
    let per_frame = started.elapsed() / runs;
    eprintln!("1280x720 rgb: {per_frame:?} a frame (quality sum {quality_sum})");
}
