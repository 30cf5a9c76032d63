//! PDQ conformance: our hasher against the reference values in `../shared/conformance/pdq`
//! (shared/PDQ.md §3, conformance/README.md "pdq/").
//!
//! Expected values are read from `expected.tsv` and `expected-details.tsv` at run time, columns
//! found by header name. PNG and WebP decode to the reference's exact pixels, so they must match
//! bit for bit; JPEG decoders differ slightly, so a JPEG is held to bit-exactness only where
//! `image_crate_dist` says the `image` crate's pixels already gave the reference hash, and
//! otherwise to Meta's rule: distance <= 10 when quality >= 80.
//!
//! Every picture is hashed once per test run and shared between the tests.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use framematch::hash::PdqHash;
use framematch::hash::pdq::{self, DecodeLimits, Dihedral, PdqOutput};

/// Meta's tolerance for decoder differences on pictures of quality >= 80 (PDQ.md §1.9).
const DECODER_TOLERANCE: u32 = 10;
/// Transformed bridge files must land this close to the matching variant (PDQ.md §3).
const DIHEDRAL_TOLERANCE: u32 = 10;

/// One data row of a TSV file, keyed by header name.
type Row = BTreeMap<String, String>;

/// Reads a tab-separated file whose first line names the columns.
fn read_tsv(path: &Path) -> Vec<Row> {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut lines = text.lines().filter(|line| !line.trim().is_empty());
    let header: Vec<String> = lines
        .next()
        .unwrap_or_else(|| panic!("{} has no header", path.display()))
        .split('\t')
        .map(str::to_owned)
        .collect();
    lines
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            assert_eq!(
                fields.len(),
                header.len(),
                "{}: row has {} fields, header has {}: {line}",
                path.display(),
                fields.len(),
                header.len()
            );
            header
                .iter()
                .cloned()
                .zip(fields.into_iter().map(str::to_owned))
                .collect()
        })
        .collect()
}

fn column<'a>(row: &'a Row, name: &str) -> &'a str {
    row.get(name)
        .unwrap_or_else(|| panic!("column {name:?} missing in {row:?}"))
}

fn hash_column(row: &Row, name: &str) -> PdqHash {
    column(row, name)
        .parse()
        .unwrap_or_else(|e| panic!("column {name:?} of {row:?}: {e}"))
}

fn number_column(row: &Row, name: &str) -> u32 {
    column(row, name)
        .parse()
        .unwrap_or_else(|e| panic!("column {name:?} of {row:?}: {e}"))
}

/// The conformance data, and our output for every picture in `expected.tsv`.
struct Conformance {
    dir: PathBuf,
    /// `expected.tsv` rows by file name.
    expected: BTreeMap<String, Row>,
    /// `expected-details.tsv` rows by file name.
    details: BTreeMap<String, Row>,
    /// Our output by file name.
    ours: BTreeMap<String, PdqOutput>,
}

impl Conformance {
    fn expected_hash(&self, file: &str) -> PdqHash {
        hash_column(self.row(file), "pdq_hex")
    }

    fn expected_quality(&self, file: &str) -> u32 {
        number_column(self.row(file), "quality")
    }

    fn row(&self, file: &str) -> &Row {
        self.expected
            .get(file)
            .unwrap_or_else(|| panic!("{file} is not in expected.tsv"))
    }

    fn ours(&self, file: &str) -> &PdqOutput {
        self.ours
            .get(file)
            .unwrap_or_else(|| panic!("{file} was not hashed"))
    }

    fn distance(&self, file: &str) -> u32 {
        self.ours(file).hash().distance(&self.expected_hash(file))
    }

    /// `image_crate_dist` from the details file: the distance the `image` crate's pixels gave.
    fn image_crate_dist(&self, file: &str) -> u32 {
        let row = self
            .details
            .get(file)
            .unwrap_or_else(|| panic!("{file} is not in expected-details.tsv"));
        number_column(row, "image_crate_dist")
    }

    fn files_with_extension<'a>(&'a self, extensions: &'a [&str]) -> impl Iterator<Item = &'a str> {
        self.expected.keys().map(String::as_str).filter(|file| {
            Path::new(file)
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| extensions.contains(&e.to_ascii_lowercase().as_str()))
        })
    }

    fn jpegs(&self) -> impl Iterator<Item = &str> {
        self.files_with_extension(&["jpg", "jpeg"])
    }
}

/// Loads and hashes everything once; `None` (after a message) when the data is absent locally.
fn conformance() -> Option<&'static Conformance> {
    static DATA: OnceLock<Option<Conformance>> = OnceLock::new();
    DATA.get_or_init(|| {
        let dir = crate::support::conformance_dir()?.join("pdq");
        let by_file = |rows: Vec<Row>| -> BTreeMap<String, Row> {
            rows.into_iter()
                .map(|row| (column(&row, "file").to_owned(), row))
                .collect()
        };
        let expected = by_file(read_tsv(&dir.join("expected.tsv")));
        let details = by_file(read_tsv(&dir.join("expected-details.tsv")));
        assert!(!expected.is_empty(), "expected.tsv lists no pictures");
        let ours = expected
            .keys()
            .map(|file| {
                let path = dir.join(file);
                let bytes = fs::read(&path)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
                let output = pdq::hash_image_bytes(&bytes, &DecodeLimits::default())
                    .unwrap_or_else(|e| panic!("{file}: {e}"));
                (file.clone(), output)
            })
            .collect();
        Some(Conformance {
            dir,
            expected,
            details,
            ours,
        })
    })
    .as_ref()
}

#[test]
fn png_and_webp_hashes_are_bit_exact() {
    let Some(data) = conformance() else { return };
    let files: Vec<&str> = data.files_with_extension(&["png", "webp"]).collect();
    assert!(!files.is_empty(), "no png or webp files in expected.tsv");
    for file in files {
        let ours = data.ours(file);
        assert_eq!(
            ours.hash(),
            data.expected_hash(file),
            "{file}: distance {}",
            data.distance(file)
        );
        assert_eq!(
            u32::from(ours.quality()),
            data.expected_quality(file),
            "{file}"
        );
    }
}

#[test]
fn jpegs_the_image_crate_decodes_like_libjpeg_are_bit_exact() {
    let Some(data) = conformance() else { return };
    let files: Vec<&str> = data
        .jpegs()
        .filter(|file| data.image_crate_dist(file) == 0)
        .collect();
    assert!(!files.is_empty(), "no jpeg with image_crate_dist 0");
    for file in files {
        let ours = data.ours(file);
        assert_eq!(
            ours.hash(),
            data.expected_hash(file),
            "{file}: distance {}",
            data.distance(file)
        );
        assert_eq!(
            u32::from(ours.quality()),
            data.expected_quality(file),
            "{file}"
        );
    }
}

#[test]
fn other_high_quality_jpegs_are_within_ten_bits() {
    let Some(data) = conformance() else { return };
    let far: Vec<String> = data
        .jpegs()
        .filter(|file| data.image_crate_dist(file) != 0 && data.expected_quality(file) >= 80)
        .map(|file| (file, data.distance(file)))
        .inspect(|(file, distance)| eprintln!("{file}: distance {distance}"))
        .filter(|&(_, distance)| distance > DECODER_TOLERANCE)
        .map(|(file, distance)| format!("{file} at {distance}"))
        .collect();
    assert!(
        far.is_empty(),
        "more than {DECODER_TOLERANCE} bits off: {far:?}"
    );
}

#[test]
fn every_picture_matches_the_reference_core_on_image_crate_pixels() {
    // `image_crate_dist` / `image_crate_quality` are what the reference C++ core gave on the
    // pixels the `image` crate decodes, so they are what we must give too, JPEGs included.
    let Some(data) = conformance() else { return };
    for (file, row) in &data.details {
        let ours = data.ours(file);
        assert_eq!(
            data.distance(file),
            number_column(row, "image_crate_dist"),
            "{file}: distance from the reference"
        );
        assert_eq!(
            u32::from(ours.quality()),
            number_column(row, "image_crate_quality"),
            "{file}: quality"
        );
    }
}

#[test]
fn featureless_pictures_score_below_quality_fifty() {
    let Some(data) = conformance() else { return };
    for file in ["small.jpg", "q0003.jpg"] {
        let quality = data.ours(file).quality();
        assert!(quality < 50, "{file}: quality {quality}");
    }
}

#[test]
fn bridge_dihedral_variants_are_bit_exact() {
    let Some(data) = conformance() else { return };
    let file = "bridge-1-original.jpg";
    let row = data
        .details
        .get(file)
        .unwrap_or_else(|| panic!("{file} is not in expected-details.tsv"));
    let ours = data.ours(file).dihedral();
    for d in Dihedral::ALL {
        let column_name = match d {
            Dihedral::Original => "pdq_hex",
            other => other.as_str(),
        };
        let expected = hash_column(row, column_name);
        let got = ours[d.index()];
        assert_eq!(got, expected, "{d}: distance {}", got.distance(&expected));
    }
}

#[test]
fn transformed_bridge_files_land_near_the_matching_variant() {
    let Some(data) = conformance() else { return };
    let original = data.ours("bridge-1-original.jpg");
    let pairs = [
        ("bridge-2-rotate-90.jpg", Dihedral::Rot90),
        ("bridge-4-rotate-270.jpg", Dihedral::Rot270),
        ("bridge-5-flipx.jpg", Dihedral::FlipX),
        ("bridge-7-flip-plus-1.jpg", Dihedral::FlipPlus1),
    ];
    for (file, d) in pairs {
        let distance = data.ours(file).hash().distance(&original.variant(d));
        eprintln!("{file} vs bridge-1 {d}: distance {distance}");
        assert!(
            distance <= DIHEDRAL_TOLERANCE,
            "{file} is {distance} bits from bridge-1's {d} variant"
        );
        // And it is the closest of the eight.
        let nearest = Dihedral::ALL
            .into_iter()
            .min_by_key(|&v| data.ours(file).hash().distance(&original.variant(v)));
        assert_eq!(nearest, Some(d), "{file}");
    }
}

#[test]
fn conformance_summary_counts_exact_hashes_and_the_largest_distance() {
    let Some(data) = conformance() else { return };
    let mut exact = 0;
    let mut quality_exact = 0;
    let mut largest: Option<(u32, &str)> = None;
    for file in data.expected.keys().map(String::as_str) {
        let distance = data.distance(file);
        if distance == 0 {
            exact += 1;
        } else {
            eprintln!(
                "{file}: distance {distance}, quality {} (reference {})",
                data.ours(file).quality(),
                data.expected_quality(file)
            );
        }
        if u32::from(data.ours(file).quality()) == data.expected_quality(file) {
            quality_exact += 1;
        }
        if largest.is_none_or(|(d, _)| distance > d) {
            largest = Some((distance, file));
        }
    }
    let total = data.expected.len();
    let (largest_distance, largest_file) = largest.unwrap_or((0, "-"));
    eprintln!(
        "pdq conformance: {exact}/{total} hashes bit-exact, {quality_exact}/{total} qualities \
         exact, largest distance {largest_distance} ({largest_file})"
    );
    // Every mismatch must be one the README documents for the image crate's JPEG decoder.
    for file in data.expected.keys() {
        let distance = data.distance(file);
        if distance != 0 {
            assert!(
                data.image_crate_dist(file) != 0,
                "{file}: distance {distance} but the image crate's pixels should be exact"
            );
        }
    }
    assert!(
        exact + 4 >= total,
        "only {exact} of {total} exact; the README expects at most 4 JPEG misses"
    );
}

#[test]
fn raw_rgb_of_a_decoded_png_hashes_like_the_file() {
    let Some(data) = conformance() else { return };
    for file in ["pen-and-coaster.png", "c.png"] {
        let path = data.dir.join(file);
        let picture = image::ImageReader::open(&path)
            .expect("opens")
            .with_guessed_format()
            .expect("reads")
            .decode()
            .expect("decodes");
        assert!(
            !matches!(
                picture.color(),
                image::ColorType::L8 | image::ColorType::La8
            ),
            "{file} should be a colour picture"
        );
        let rgb = picture.to_rgb8();
        let from_rgb =
            pdq::hash_rgb(rgb.width(), rgb.height(), rgb.as_raw()).expect("valid rgb buffer");
        assert_eq!(&from_rgb, data.ours(file), "{file}");
        assert_eq!(from_rgb.hash(), data.expected_hash(file), "{file}");
    }
}

#[test]
fn exif_orientation_is_not_applied() {
    let Some(data) = conformance() else { return };
    // The reference hashes stored pixels; this file carries orientation 6 and hashes exactly.
    let file = "exif-rotn-6.jpg";
    assert_eq!(data.image_crate_dist(file), 0);
    assert_eq!(data.ours(file).hash(), data.expected_hash(file));
}

/// The bridge photo cut to 16:9 (the shape of a landscape video frame).
fn bridge_sixteen_nine() -> Option<image::RgbImage> {
    let dir = crate::support::conformance_dir()?.join("pdq");
    let photo = image::open(dir.join("bridge-1-original.jpg"))
        .expect("decode bridge-1-original.jpg")
        .to_rgb8();
    let height = photo.width() * 9 / 16;
    let top = (photo.height() - height) / 2;
    Some(image::imageops::crop_imm(&photo, 0, top, photo.width(), height).to_image())
}

/// `content` scaled to a 360-pixel-wide 16:9 band, centred in a 360x640 vertical frame over
/// `background`, then JPEG-compressed and decoded as a video encoder's output would be.
fn vertical_frame(content: &image::RgbImage, background: image::RgbImage) -> image::RgbImage {
    use image::imageops::{self, FilterType};
    let band = imageops::resize(content, 360, 202, FilterType::Triangle);
    let mut frame = background;
    imageops::overlay(&mut frame, &band, 0, (640 - 202) / 2);
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 80)
        .encode_image(&frame)
        .expect("encode jpeg");
    image::load_from_memory(&jpeg)
        .expect("decode jpeg")
        .to_rgb8()
}

#[test]
fn sixteen_nine_photo_in_a_vertical_frame_hashes_near_the_original() {
    use framematch::hash::border;
    let Some(original) = bridge_sixteen_nine() else {
        return;
    };
    let reference = pdq::hash_rgb(original.width(), original.height(), original.as_raw())
        .expect("hash the original");
    let frame = vertical_frame(&original, image::RgbImage::new(360, 640));
    let hashes = border::hash_rgb(360, 640, frame.as_raw()).expect("hash the frame");
    // Issue #11: the bars keep 31.6 % of the height, and the whole frame is far from the original.
    assert!(hashes.full.hash().distance(&reference.hash()) > 31);
    let content = hashes
        .content
        .expect("a 16:9 band inside 9:16 is a content area");
    let distance = content.hash().distance(&reference.hash());
    assert!(
        distance <= DECODER_TOLERANCE,
        "content area is {distance} bits from the original"
    );
}

#[test]
fn blurred_background_bars_are_found_and_cut_away() {
    use framematch::hash::border;
    use image::imageops::{self, FilterType};
    let Some(original) = bridge_sixteen_nine() else {
        return;
    };
    let reference = pdq::hash_rgb(original.width(), original.height(), original.as_raw())
        .expect("hash the original");
    // The vertical-video layout: the video's own enlarged, blurred copy fills the frame behind it.
    let wide = imageops::resize(&original, 1138, 640, FilterType::Triangle);
    let backdrop = imageops::blur(
        &imageops::crop_imm(&wide, 389, 0, 360, 640).to_image(),
        15.0,
    );
    let frame = vertical_frame(&original, backdrop);
    let hashes = border::hash_rgb(360, 640, frame.as_raw()).expect("hash the frame");
    assert!(hashes.full.hash().distance(&reference.hash()) > 31);
    let area = border::content_area(360, 640, frame.as_raw()).expect("blurred bars are borders");
    assert!(
        area.y.abs_diff(219) <= 3 && area.height.abs_diff(202) <= 6,
        "{area:?}"
    );
    let content = hashes.content.expect("content hash");
    let distance = content.hash().distance(&reference.hash());
    assert!(
        distance <= 2 * DECODER_TOLERANCE,
        "content area is {distance} bits from the original"
    );
}

#[test]
fn smooth_areas_of_ordinary_photos_are_not_borders() {
    use framematch::hash::border;
    let Some(dir) = crate::support::conformance_dir() else {
        return;
    };
    // Real photos without bars, whole and cut to 9:16 (the bridge's sky is smooth on one side).
    for file in [
        "bridge-1-original.jpg",
        "pen-and-coaster.png",
        "exif-rotn-6.jpg",
    ] {
        let photo = image::open(dir.join("pdq").join(file))
            .expect("decode")
            .to_rgb8();
        let (w, h) = photo.dimensions();
        let tall =
            image::imageops::crop_imm(&photo, (w - h * 9 / 16) / 2, 0, h * 9 / 16, h).to_image();
        let (tw, th) = tall.dimensions();
        for (what, w, h, rgb) in [
            ("whole", w, h, photo.as_raw()),
            ("cut to 9:16", tw, th, tall.as_raw()),
        ] {
            // A thin dark edge may still go (the uniform rule, as before), never a band.
            if let Some(area) = border::content_area(w, h, rgb) {
                assert!(
                    area.width * 10 >= w * 9 && area.height * 10 >= h * 9,
                    "{file} {what}: {area:?}"
                );
            }
        }
    }
}
