//! PDQ hashing of pictures and video frames, bit-compatible with Meta's reference (shared/PDQ.md §1).
//!
//! This module owns the path from pixels to a [`PdqOutput`]: decoding (`image` crate, with size
//! limits checked before any pixel buffer exists), the float32 luminance plane, the two-pass
//! Jarosz box blur, the 64x64 decimation, the quality metric, the 16x16 DCT block and the
//! median threshold. The DCT block is kept so the eight dihedral variants (§1.8) cost a sign flip
//! and a median each, with no second pass over the pixels.
//!
//! Bit-exactness invariants (§1.10), which every optimisation here must keep:
//! * all sample arithmetic is `f32`; only the DCT matrix and the decimation indices use `f64`;
//! * each box-filter line keeps one running sum, updated add-then-subtract in line order, and
//!   every output is that sum divided by the current window count (§1.3);
//! * every DCT sum runs over k = 0..64 in increasing order, with no fused multiply-add (Rust never
//!   contracts `a * b + c` on its own);
//! * the median is the 128th smallest coefficient and bits use a strict `>` (§1.6).
//!
//! Speed comes from the data layout, not from changing the arithmetic. A box pass is sequential
//! along its own line but independent across lines, so every pass walks the *line axis* and
//! advances many lines' running sums at once, in contiguous memory the compiler vectorises. The
//! row passes therefore work on bands of 16 rows held transposed in small cache-resident buffers;
//! the only picture-sized buffer is one f32 plane between the first row pass and the first column
//! pass. The second pass pair only divides at the 64 rows and columns the decimation samples.
//! `blur_and_decimate` has the details; a literal transcription of §1 in the tests checks the
//! result bit for bit.

use std::f64::consts::PI;
use std::fmt;
use std::io::Cursor;
use std::sync::OnceLock;

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits};

use super::PdqHash;

/// Pictures with a side shorter than this hash to all zeros with quality 0 (§1.1 step 2).
const MIN_HASHABLE_DIM: u32 = 5;
/// Side of the decimated buffer.
const DOWNSAMPLED: usize = 64;
/// Side of the kept DCT block.
const DCT_SIDE: usize = 16;
/// Number of DCT coefficients, and of hash bits.
const COEFFICIENTS: usize = DCT_SIDE * DCT_SIDE;

/// Luma weights. The reference declares them `const float x = 0.299;`, a double literal rounded to
/// float, so they are written the same way here (§1.2).
const LUMA_R: f32 = 0.299_f64 as f32;
const LUMA_G: f32 = 0.587_f64 as f32;
const LUMA_B: f32 = 0.114_f64 as f32;

/// Largest decoded pixel our enabled decoders produce (RGBA, 16 bits per channel), used to size
/// the `image` crate's allocation limit.
const MAX_DECODED_BYTES_PER_PIXEL: u64 = 8;
/// Room for decoders' own working buffers on top of the output image.
const DECODER_SCRATCH_BYTES: u64 = 64 * 1024 * 1024;
/// Default [`DecodeLimits::max_decoded_bytes`] (and the server's `--max-decode-bytes`): 256 MiB.
pub const DEFAULT_MAX_DECODED_BYTES: u64 = 256 * 1024 * 1024;

// === impl Dihedral ===

/// The eight rotations and flips of a picture (shared/PDQ.md §1.8), in the reference's order.
///
/// Variants are derived from the original picture's DCT block, not by re-hashing transformed
/// pixels, so they match the hash of a really transformed file only approximately (0–8 bits on
/// the reference's test pictures). Query with all eight to catch rotated or mirrored uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dihedral {
    /// The picture as given.
    Original,
    /// Turned 90° anticlockwise.
    Rot90,
    /// Turned 180°.
    Rot180,
    /// Turned 90° clockwise.
    Rot270,
    /// Upside down (rows reversed).
    FlipX,
    /// Mirrored left to right (columns reversed).
    FlipY,
    /// Transposed about the main diagonal.
    FlipPlus1,
    /// Transposed about the anti-diagonal.
    FlipMinus1,
}

impl Dihedral {
    /// All eight, in index order 0..8 (the order of [`PdqOutput::dihedral`]).
    pub const ALL: [Dihedral; 8] = [
        Dihedral::Original,
        Dihedral::Rot90,
        Dihedral::Rot180,
        Dihedral::Rot270,
        Dihedral::FlipX,
        Dihedral::FlipY,
        Dihedral::FlipPlus1,
        Dihedral::FlipMinus1,
    ];

    /// The reference's lowercase name: `"original"`, `"rot90"`, … `"flipminus1"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Dihedral::Original => "original",
            Dihedral::Rot90 => "rot90",
            Dihedral::Rot180 => "rot180",
            Dihedral::Rot270 => "rot270",
            Dihedral::FlipX => "flipx",
            Dihedral::FlipY => "flipy",
            Dihedral::FlipPlus1 => "flipplus1",
            Dihedral::FlipMinus1 => "flipminus1",
        }
    }

    /// Position in [`Dihedral::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Applies this transform to a 16x16 DCT block (row i = vertical frequency, column j =
    /// horizontal): the coefficient rules of §1.8. Negation is exact, so this is bit-exact.
    fn transform(self, block: &[f32; COEFFICIENTS]) -> [f32; COEFFICIENTS] {
        let mut out = [0.0_f32; COEFFICIENTS];
        for (k, &value) in block.iter().enumerate() {
            let (i, j) = (k / DCT_SIDE, k % DCT_SIDE);
            let (transpose, negate) = match self {
                Dihedral::Original => (false, false),
                Dihedral::Rot90 => (true, j % 2 == 0),
                Dihedral::Rot180 => (false, (i + j) % 2 == 1),
                Dihedral::Rot270 => (true, i % 2 == 0),
                Dihedral::FlipX => (false, i % 2 == 0),
                Dihedral::FlipY => (false, j % 2 == 0),
                Dihedral::FlipPlus1 => (true, false),
                Dihedral::FlipMinus1 => (true, (i + j) % 2 == 1),
            };
            let target = if transpose { j * DCT_SIDE + i } else { k };
            if let Some(slot) = out.get_mut(target) {
                *slot = if negate { -value } else { value };
            }
        }
        out
    }
}

impl fmt::Display for Dihedral {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl PdqOutput ===

/// The result of hashing one picture: its quality and its 16x16 DCT block, from which the hash
/// and its dihedral variants are thresholded on demand.
#[derive(Debug, Clone, PartialEq)]
pub struct PdqOutput {
    /// DCT coefficients, k = 16·i + j (i vertical frequency, j horizontal), as in §1.7.
    coefficients: [f32; COEFFICIENTS],
    quality: u8,
}

impl PdqOutput {
    /// The hash of a picture too small to hash (§1.1 step 2): all zeros, quality 0.
    fn unhashable() -> Self {
        Self {
            coefficients: [0.0; COEFFICIENTS],
            quality: 0,
        }
    }

    /// The PDQ hash of the picture as given.
    pub fn hash(&self) -> PdqHash {
        threshold(&self.coefficients)
    }

    /// Quality, 0..=100: how many significant edges the picture has (§1.4). Below 50 the hash
    /// is not worth matching (§1.9).
    pub fn quality(&self) -> u8 {
        self.quality
    }

    /// The hash of the picture transformed by `d`, derived from the DCT block (§1.8).
    pub fn variant(&self, d: Dihedral) -> PdqHash {
        match d {
            Dihedral::Original => self.hash(),
            _ => threshold(&d.transform(&self.coefficients)),
        }
    }

    /// All eight variant hashes, in [`Dihedral::ALL`] order (index 0 is [`PdqOutput::hash`]).
    pub fn dihedral(&self) -> [PdqHash; 8] {
        Dihedral::ALL.map(|d| self.variant(d))
    }
}

/// One bit per coefficient: set when it is strictly greater than the 128th smallest (§1.6).
fn threshold(block: &[f32; COEFFICIENTS]) -> PdqHash {
    let mut sorted = *block;
    // `total_cmp` never panics, even on NaN from a caller's luma plane. It orders -0.0 before
    // +0.0, which cannot change a strict `>` against the median.
    let (_, median, _) = sorted.select_nth_unstable_by(COEFFICIENTS / 2 - 1, f32::total_cmp);
    let median = *median;
    PdqHash::from_bit_fn(|k| block.get(k).is_some_and(|&value| value > median))
}

// === impl DecodeLimits ===

/// Limits on an encoded picture, checked before any pixel buffer is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted encoded size in bytes.
    pub max_bytes: usize,
    /// Largest accepted width × height.
    pub max_pixels: u64,
    /// Largest accepted decoded size in bytes: width × height × bytes per pixel of the form the
    /// decoder produces (16-bit samples and alpha included), from the header.
    pub max_decoded_bytes: u64,
}

/// The decoder's side of the server's request limits.
impl crate::config::Limits {
    /// The decoder's limits.
    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_bytes: self.max_image_bytes,
            max_pixels: self.max_pixels,
            max_decoded_bytes: self.max_decode_bytes,
        }
    }
}

impl Default for DecodeLimits {
    /// 32 MiB, 50,000,000 pixels and 256 MiB decoded.
    ///
    /// 50 megapixels admits 48 MP phone-camera photos and 8K UHD frames (33 MP) while bounding
    /// memory: hashing holds the decoded image (3–4 bytes a pixel for 8-bit pictures) plus one f32
    /// plane (4 bytes a pixel), about 8 bytes a pixel or 400 MB at the limit, per picture in
    /// flight; callers bound how many are in flight. 256 MiB decoded admits 50 MP of 8-bit RGB
    /// (150 MB) and 8K UHD in 16-bit RGB (199 MB), and refuses a 16-bit RGBA picture over 33.5 MP
    /// (7071x7071 of it decodes to 400 MB from a 389 KB PNG). 32 MiB holds a high-quality JPEG of
    /// that size or a large PNG screenshot; anything bigger is refused before it is parsed.
    fn default() -> Self {
        Self {
            max_bytes: 32 * 1024 * 1024,
            max_pixels: 50_000_000,
            max_decoded_bytes: DEFAULT_MAX_DECODED_BYTES,
        }
    }
}

// === impl Error ===

/// Why a picture could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No bytes at all.
    #[error("image is empty")]
    Empty,
    /// The encoded picture is larger than [`DecodeLimits::max_bytes`].
    #[error("image is {bytes} bytes, limit is {limit} bytes")]
    TooManyBytes {
        /// Size of the encoded picture.
        bytes: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// The picture's header declares more than [`DecodeLimits::max_pixels`] pixels.
    #[error("image is {width}x{height} pixels, limit is {limit} pixels")]
    TooManyPixels {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit width × height exceeds.
        limit: u64,
    },
    /// The picture's header declares a decoded form larger than
    /// [`DecodeLimits::max_decoded_bytes`].
    #[error(
        "image is {width}x{height} pixels of {color}, {bytes} bytes decoded, limit is {limit} bytes decoded"
    )]
    TooManyDecodedBytes {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The decoded form, e.g. `16-bit RGBA` (see [`Probe::color`]).
        color: &'static str,
        /// width × height × bytes per pixel of that form.
        bytes: u64,
        /// The limit it exceeds.
        limit: u64,
    },
    /// The bytes are not a JPEG, PNG, WebP, GIF or BMP picture.
    #[error("image format not recognised, expected jpeg, png, webp, gif or bmp")]
    UnknownFormat,
    /// The decoder rejected the picture (corrupt data, unsupported variant, or its own
    /// allocation limit).
    #[error("image could not be decoded")]
    Decode {
        /// The decoder's error.
        #[source]
        source: ImageError,
    },
    /// The picture's data stops before its format's end (a JPEG without its end-of-image marker,
    /// say): refused rather than hashed with the decoder's grey filler for the missing part.
    #[error("image is truncated or corrupt: {format} data ends before its {missing}")]
    Truncated {
        /// The format, e.g. `jpeg`.
        format: &'static str,
        /// What is missing, e.g. `end-of-image marker (FFD9)`.
        missing: &'static str,
    },
    /// A packed RGB buffer whose length is not width × height × 3.
    #[error("rgb buffer for {width}x{height} pixels must be {expected} bytes, got {actual}")]
    RgbLength {
        /// Stated width.
        width: u32,
        /// Stated height.
        height: u32,
        /// width × height × 3, saturating at `u64::MAX`.
        expected: u64,
        /// Actual buffer length.
        actual: usize,
    },
    /// A luminance plane whose length is not width × height.
    #[error("luma plane for {width}x{height} pixels must be {expected} samples, got {actual}")]
    LumaLength {
        /// Stated width.
        width: u32,
        /// Stated height.
        height: u32,
        /// width × height.
        expected: u64,
        /// Actual number of samples.
        actual: usize,
    },
    /// A picture with a zero width or height.
    #[error("image is {width}x{height} pixels, both sides must be at least 1")]
    ZeroSize {
        /// Stated width.
        width: u32,
        /// Stated height.
        height: u32,
    },
}

impl From<ImageError> for Error {
    fn from(source: ImageError) -> Self {
        Error::Decode { source }
    }
}

// === public entry points ===

/// Decodes a JPEG, PNG, WebP, GIF (first frame) or BMP picture and hashes it at full resolution.
///
/// Grey pictures (8- or 16-bit, with or without alpha) use the grey sample as luma; everything
/// else is converted to 8-bit RGB first. Alpha is ignored, not composited, and EXIF orientation is
/// not applied, exactly as the reference does (§1.2, §1.10).
///
/// # Errors
/// [`Error::Empty`], [`Error::TooManyBytes`], [`Error::UnknownFormat`], then from the header,
/// before any pixel is decoded, [`Error::ZeroSize`], [`Error::TooManyPixels`] or
/// [`Error::TooManyDecodedBytes`]; and
/// [`Error::Truncated`] for a JPEG cut before its end-of-image marker, and [`Error::Decode`] for
/// anything the decoder rejects (the other decoders fail on truncation themselves). Sides of 1 to 4 give the all-zero hash with
/// quality 0.
pub fn hash_image_bytes(bytes: &[u8], limits: &DecodeLimits) -> Result<PdqOutput, Error> {
    decode_image(bytes, limits).map(hash_decoded)
}

/// Decodes a JPEG, PNG, WebP, GIF (first frame) or BMP picture within `limits`, for callers that
/// need the pixels as well as the hash (border detection). [`hash_decoded`] then hashes it exactly
/// as [`hash_image_bytes`] would.
///
/// # Errors
/// As [`hash_image_bytes`].
pub fn decode_image(bytes: &[u8], limits: &DecodeLimits) -> Result<DynamicImage, Error> {
    let (mut decoder, mut decoder_limits, _) = open(bytes, limits)?;
    // As `ImageReader::decode` does: the output buffer counts against the allocation limit.
    decoder_limits.reserve(decoder.total_bytes())?;
    decoder.set_limits(decoder_limits)?;
    Ok(DynamicImage::from_decoder(decoder)?)
}

/// What a picture's header says, read without decoding a pixel: what [`decode_image`] would
/// allocate, so that a caller can budget memory before decoding (the server's decode budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Size of the decoded form, width × height × bytes per pixel (16-bit and alpha included).
    pub decoded_bytes: u64,
    /// The decoded form, e.g. `8-bit RGB` or `16-bit RGBA`.
    pub color: &'static str,
}

impl Probe {
    /// width × height.
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

/// Reads a picture's header and checks it against `limits`, decoding no pixel.
///
/// # Errors
/// As [`decode_image`], except for errors in the pixel data ([`Error::Decode`] past the header).
pub fn probe_image(bytes: &[u8], limits: &DecodeLimits) -> Result<Probe, Error> {
    open(bytes, limits).map(|(_, _, probe)| probe)
}

/// A decoder past the picture's header, its allocation limits, and the header's figures, once
/// every limit of `limits` has been checked.
fn open<'a>(
    bytes: &'a [u8],
    limits: &DecodeLimits,
) -> Result<(Box<dyn ImageDecoder + 'a>, Limits, Probe), Error> {
    if bytes.is_empty() {
        return Err(Error::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(Error::TooManyBytes {
            bytes: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(ImageError::IoError)?;
    match reader.format() {
        // The jpeg decoder (zune-jpeg, in the image crate's lenient mode) fills whatever a
        // truncated file lacks with grey and reports success: check the structure first.
        Some(ImageFormat::Jpeg) => {
            if !jpeg_is_complete(bytes) {
                return Err(Error::Truncated {
                    format: "jpeg",
                    missing: "end-of-image marker (FFD9)",
                });
            }
        }
        Some(ImageFormat::Png | ImageFormat::WebP | ImageFormat::Gif | ImageFormat::Bmp) => {}
        _ => return Err(Error::UnknownFormat),
    }
    // Second guard, after our own checks below: the decoders' allocation limit.
    let mut decoder_limits = Limits::default();
    decoder_limits.max_alloc = Some(
        limits
            .max_pixels
            .saturating_mul(MAX_DECODED_BYTES_PER_PIXEL)
            .min(limits.max_decoded_bytes)
            .saturating_add(DECODER_SCRATCH_BYTES),
    );
    reader.limits(decoder_limits.clone());
    // Building the decoder reads only the header.
    let decoder = reader.into_decoder()?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(Error::ZeroSize { width, height });
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(Error::TooManyPixels {
            width,
            height,
            limit: limits.max_pixels,
        });
    }
    let probe = Probe {
        width,
        height,
        decoded_bytes: decoder.total_bytes(),
        color: color_name(decoder.color_type()),
    };
    if probe.decoded_bytes > limits.max_decoded_bytes {
        return Err(Error::TooManyDecodedBytes {
            width,
            height,
            color: probe.color,
            bytes: probe.decoded_bytes,
            limit: limits.max_decoded_bytes,
        });
    }
    Ok((Box::new(decoder), decoder_limits, probe))
}

/// How an error message names a decoded form.
fn color_name(color: image::ColorType) -> &'static str {
    use image::ColorType;
    match color {
        ColorType::L8 => "8-bit grey",
        ColorType::La8 => "8-bit grey with alpha",
        ColorType::Rgb8 => "8-bit RGB",
        ColorType::Rgba8 => "8-bit RGBA",
        ColorType::L16 => "16-bit grey",
        ColorType::La16 => "16-bit grey with alpha",
        ColorType::Rgb16 => "16-bit RGB",
        ColorType::Rgba16 => "16-bit RGBA",
        ColorType::Rgb32F => "32-bit float RGB",
        ColorType::Rgba32F => "32-bit float RGBA",
        _ => "an unnamed colour type",
    }
}

/// Whether a JPEG's marker structure runs from its start-of-image marker to its end-of-image
/// marker (FFD9) within `bytes`: header segments are skipped by their stated length (so a
/// thumbnail's own FFD9 inside EXIF does not count), entropy-coded data up to the next marker
/// that is neither a stuffed `FF00` nor a restart marker. Bytes after the end marker are allowed.
/// Stray bytes between segments are skipped, as the lenient decoder does.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let mut at = 2;
    loop {
        // The next marker: its 0xFF (and any fill bytes), then its code.
        let Some(offset) = bytes[at..].iter().position(|&b| b == 0xFF) else {
            return false;
        };
        at += offset;
        while bytes.get(at) == Some(&0xFF) {
            at += 1;
        }
        let Some(&code) = bytes.get(at) else {
            return false;
        };
        at += 1;
        match code {
            0xD9 => return true,
            // Standalone markers (and a stray zero after fill bytes).
            0x00 | 0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        let Some(length) = bytes.get(at..at + 2) else {
            return false;
        };
        let length = usize::from(u16::from_be_bytes([length[0], length[1]]));
        if length < 2 || at + length > bytes.len() {
            return false;
        }
        at += length;
        if code == 0xDA {
            // Entropy-coded data after start-of-scan: up to a real marker.
            loop {
                let Some(offset) = bytes[at..].iter().position(|&b| b == 0xFF) else {
                    return false;
                };
                at += offset;
                match bytes.get(at + 1) {
                    None => return false,
                    Some(0x00 | 0xD0..=0xD7) => at += 2,
                    Some(_) => break,
                }
            }
        }
    }
}

/// Hashes packed 8-bit RGB (`rgb[3·(y·width + x)..][..3]` = R, G, B), e.g. an RGB24 video frame.
///
/// # Errors
/// [`Error::ZeroSize`] when a side is 0, [`Error::RgbLength`] when `rgb.len()` is not
/// width × height × 3. Sides of 1 to 4 give the all-zero hash with quality 0, not an error.
pub fn hash_rgb(width: u32, height: u32, rgb: &[u8]) -> Result<PdqOutput, Error> {
    if width == 0 || height == 0 {
        return Err(Error::ZeroSize { width, height });
    }
    let expected = u64::from(width)
        .saturating_mul(u64::from(height))
        .saturating_mul(3);
    if u64::try_from(rgb.len()) != Ok(expected) {
        return Err(Error::RgbLength {
            width,
            height,
            expected,
            actual: rgb.len(),
        });
    }
    Ok(hash_pixels(width, height, Pixels::Rgb3(rgb)))
}

/// Hashes a luminance plane computed elsewhere, row-major (`luma[y·width + x]`), on the 0..255
/// scale of §1.2.
///
/// Non-finite samples give an unspecified hash, never a panic.
///
/// # Errors
/// [`Error::ZeroSize`] when a side is 0, [`Error::LumaLength`] when `luma.len()` is not
/// width × height. Sides of 1 to 4 give the all-zero hash with quality 0.
pub fn hash_luma(width: u32, height: u32, luma: &[f32]) -> Result<PdqOutput, Error> {
    if width == 0 || height == 0 {
        return Err(Error::ZeroSize { width, height });
    }
    let expected = u64::from(width) * u64::from(height);
    if u64::try_from(luma.len()) != Ok(expected) {
        return Err(Error::LumaLength {
            width,
            height,
            expected,
            actual: luma.len(),
        });
    }
    Ok(hash_pixels(width, height, Pixels::Luma(luma)))
}

// === decoding to luma ===

/// A picture's samples, row-major, with length already checked against its size.
#[derive(Clone, Copy)]
enum Pixels<'a> {
    /// One grey byte a pixel (L8), used directly as luma (§1.2).
    Grey1(&'a [u8]),
    /// Grey then alpha (LA8); alpha ignored.
    Grey2(&'a [u8]),
    /// R, G, B (RGB8): the float32 luma formula.
    Rgb3(&'a [u8]),
    /// R, G, B, alpha (RGBA8); alpha ignored.
    Rgb4(&'a [u8]),
    /// Luma computed by the caller.
    Luma(&'a [f32]),
}

impl<'a> Pixels<'a> {
    /// Row `y`'s luma: the caller's own slice for [`Pixels::Luma`], otherwise computed into
    /// `buffer` (at least `width` long).
    fn luma_row<'b>(&self, y: usize, width: usize, buffer: &'b mut [f32]) -> &'b [f32]
    where
        'a: 'b,
    {
        fn convert<const N: usize>(
            samples: &[u8],
            y: usize,
            width: usize,
            out: &mut [f32],
            luma: impl Fn(&[u8; N]) -> f32,
        ) {
            let row = samples
                .get(y * width * N..(y + 1) * width * N)
                .unwrap_or(&[]);
            for (value, pixel) in out.iter_mut().zip(row.as_chunks::<N>().0) {
                *value = luma(pixel);
            }
        }
        match *self {
            Pixels::Luma(plane) => return plane.get(y * width..(y + 1) * width).unwrap_or(&[]),
            Pixels::Grey1(s) => convert::<1>(s, y, width, buffer, |&[g]| f32::from(g)),
            Pixels::Grey2(s) => convert::<2>(s, y, width, buffer, |&[g, _]| f32::from(g)),
            Pixels::Rgb3(s) => convert::<3>(s, y, width, buffer, |&[r, g, b]| rgb_luma(r, g, b)),
            Pixels::Rgb4(s) => convert::<4>(s, y, width, buffer, |&[r, g, b, _]| rgb_luma(r, g, b)),
        }
        buffer
    }
}

/// `(0.299f·R + 0.587f·G) + 0.114f·B` in float32, left to right (§1.2).
#[inline(always)]
fn rgb_luma(r: u8, g: u8, b: u8) -> f32 {
    (LUMA_R * f32::from(r) + LUMA_G * f32::from(g)) + LUMA_B * f32::from(b)
}

/// Hashes a decoded picture, keeping at most one pixel copy besides the float plane.
pub fn hash_decoded(picture: DynamicImage) -> PdqOutput {
    let (width, height) = (picture.width(), picture.height());
    match picture {
        DynamicImage::ImageLuma8(buffer) => hash_pixels(width, height, Pixels::Grey1(&buffer)),
        DynamicImage::ImageLumaA8(buffer) => hash_pixels(width, height, Pixels::Grey2(&buffer)),
        DynamicImage::ImageRgb8(buffer) => hash_pixels(width, height, Pixels::Rgb3(&buffer)),
        DynamicImage::ImageRgba8(buffer) => hash_pixels(width, height, Pixels::Rgb4(&buffer)),
        // 16-bit grey: reduced to 8 bits with the `image` crate's rounding, then used as grey.
        grey @ (DynamicImage::ImageLuma16(_) | DynamicImage::ImageLumaA16(_)) => {
            let buffer = grey.to_luma8();
            drop(grey);
            hash_pixels(width, height, Pixels::Grey1(&buffer))
        }
        // Everything else (16-bit and float colour) via 8-bit RGB, alpha dropped.
        other => {
            let buffer = other.to_rgb8();
            drop(other);
            hash_pixels(width, height, Pixels::Rgb3(&buffer))
        }
    }
}

// === the hashing pipeline ===

/// Rows handled together by the row passes; see [`blur_and_decimate`].
const BAND: usize = 16;
/// One position of a band: the same column of [`BAND`] consecutive rows.
type Lanes = [f32; BAND];

/// Hashes a picture whose sample count matches its size; sides under 5 give the zero hash.
fn hash_pixels(width: u32, height: u32, pixels: Pixels<'_>) -> PdqOutput {
    if width < MIN_HASHABLE_DIM || height < MIN_HASHABLE_DIM {
        return PdqOutput::unhashable();
    }
    let (width, height) = (width as usize, height as usize);
    let mut buffer = [[0.0_f32; DOWNSAMPLED]; DOWNSAMPLED];
    if width == DOWNSAMPLED && height == DOWNSAMPLED {
        // The reference copies a 64x64 input straight through, unblurred (pdqFloat256FromFloatLuma).
        let mut scratch = [0.0_f32; DOWNSAMPLED];
        for (y, row) in buffer.iter_mut().enumerate() {
            for (slot, &value) in row.iter_mut().zip(pixels.luma_row(y, width, &mut scratch)) {
                *slot = value;
            }
        }
    } else {
        blur_and_decimate(pixels, width, height, &mut buffer);
    }
    PdqOutput {
        quality: quality(&buffer),
        coefficients: dct(&buffer),
    }
}

/// The Jarosz filter (row box, column box, row box, column box; §1.3), then centre-sample
/// decimation to 64x64, into `out`.
///
/// A box pass is sequential along its own line and independent across lines, so each pass walks
/// the line axis and advances many lines' running sums at once, in contiguous memory:
/// * pass 1, rows: per band of 16 rows, luma is laid out transposed (`lanes[x]` = column x of
///   the band) and the pass walks x, writing its output into the row-major `plane`;
/// * pass 1, columns: walks y over `plane`, every column at once, and hands each finished row to
///   a band buffer, transposed again;
/// * pass 2, rows: per band, walks x, dividing only at the 64 sampled columns;
/// * pass 2, columns: walks y over those 64 columns, dividing only at the 64 sampled rows.
///
/// Only `plane` is picture-sized; the band buffers stay in cache.
fn blur_and_decimate(
    pixels: Pixels<'_>,
    width: usize,
    height: usize,
    out: &mut [[f32; DOWNSAMPLED]; DOWNSAMPLED],
) {
    // Window along a row comes from the width, down a column from the height: ceil(dim / 128).
    let row_window = width.div_ceil(2 * DOWNSAMPLED);
    let column_window = height.div_ceil(2 * DOWNSAMPLED);
    let sampled_x = sample_positions(width);
    let sampled_y = sample_positions(height);
    let wanted_x = membership(&sampled_x, width);
    let wanted_y = membership(&sampled_y, height);

    let stride = padded_stride(width);
    let mut plane = vec![0.0_f32; stride * height];
    // Band buffers: row-major rows, and the same rows transposed in and out of the row passes.
    let mut strip = vec![0.0_f32; BAND * width];
    let mut lanes: Vec<Lanes> = vec![[0.0; BAND]; width];
    let mut lanes_out: Vec<Lanes> = vec![[0.0; BAND]; width];
    let mut sums = [0.0; BAND];

    // Pass 1, rows, one band of rows at a time.
    for (band, band_rows) in plane.chunks_mut(stride * BAND).enumerate() {
        let first = band * BAND;
        let mut rows: [&[f32]; BAND] = [&[]; BAND];
        for (lane, (row, buffer)) in rows
            .iter_mut()
            .zip(strip.chunks_exact_mut(width))
            .enumerate()
        {
            if first + lane < height {
                *row = pixels.luma_row(first + lane, width, buffer);
            }
        }
        rows_to_lanes(&rows, &mut lanes);
        // Lanes past the picture's last row hold stale values; their outputs are never stored.
        box_filter_lines(
            width,
            row_window,
            |x| lanes.get(x).map_or(&[][..], |l| &l[..]),
            &mut sums,
            |_| true,
            |x, sums, count| {
                if let Some(out) = lanes_out.get_mut(x) {
                    for (slot, &sum) in out.iter_mut().zip(sums) {
                        *slot = sum / count;
                    }
                }
            },
        );
        lanes_to_rows(&lanes_out, band_rows, stride);
    }

    // Pass 1, columns, feeding pass 2, rows, one band at a time.
    let mut picked: Vec<[f32; DOWNSAMPLED]> = vec![[0.0; DOWNSAMPLED]; height];
    let mut column_sums = vec![0.0_f32; width];
    box_filter_lines(
        height,
        column_window,
        |y| plane.get(y * stride..y * stride + width).unwrap_or(&[]),
        &mut column_sums,
        |_| true,
        |y, sums, count| {
            let lane = y % BAND;
            if let Some(out) = strip.chunks_exact_mut(width).nth(lane) {
                for (slot, &sum) in out.iter_mut().zip(sums) {
                    *slot = sum / count;
                }
            }
            if lane + 1 < BAND && y + 1 < height {
                return;
            }
            let mut rows: [&[f32]; BAND] = [&[]; BAND];
            for (row, filled) in rows
                .iter_mut()
                .zip(strip.chunks_exact(width))
                .take(lane + 1)
            {
                *row = filled;
            }
            rows_to_lanes(&rows, &mut lanes);
            let band_picked = picked.get_mut(y - lane..=y).unwrap_or(&mut []);
            let mut sums = [0.0; BAND];
            box_filter_lines(
                width,
                row_window,
                |x| lanes.get(x).map_or(&[][..], |l| &l[..]),
                &mut sums,
                |x| wanted_x.get(x).copied().unwrap_or(false),
                |x, sums, count| {
                    for (j, _) in sampled_x.iter().enumerate().filter(|&(_, &sx)| sx == x) {
                        for (row, &sum) in band_picked.iter_mut().zip(sums) {
                            if let Some(slot) = row.get_mut(j) {
                                *slot = sum / count;
                            }
                        }
                    }
                },
            );
        },
    );
    drop(plane);

    // Pass 2, columns.
    let mut sums = [0.0; DOWNSAMPLED];
    box_filter_lines(
        height,
        column_window,
        |y| picked.get(y).map_or(&[][..], |l| &l[..]),
        &mut sums,
        |y| wanted_y.get(y).copied().unwrap_or(false),
        |y, sums, count| {
            for (i, _) in sampled_y.iter().enumerate().filter(|&(_, &sy)| sy == y) {
                if let Some(row) = out.get_mut(i) {
                    for (slot, &sum) in row.iter_mut().zip(sums) {
                        *slot = sum / count;
                    }
                }
            }
        },
    );
}

/// Transposes a band's rows into lanes, `lanes[x][l] = rows[l][x]`, in tiles of [`BAND`]
/// positions so both sides stay in L1. An empty row (past the picture's last row) leaves its lane
/// stale; nobody stores that lane's output.
fn rows_to_lanes(rows: &[&[f32]; BAND], lanes: &mut [Lanes]) {
    for (tile_index, tile) in lanes.chunks_mut(BAND).enumerate() {
        let x0 = tile_index * BAND;
        for (l, row) in rows.iter().enumerate() {
            let source = row.get(x0..x0 + tile.len()).unwrap_or(&[]);
            for (lane, &value) in tile.iter_mut().zip(source) {
                if let Some(slot) = lane.get_mut(l) {
                    *slot = value;
                }
            }
        }
    }
}

/// The inverse of [`rows_to_lanes`]: `rows[l][x] = lanes[x][l]` for the rows of `band` (row
/// stride `stride`, at most [`BAND`] rows).
fn lanes_to_rows(lanes: &[Lanes], band: &mut [f32], stride: usize) {
    for (tile_index, tile) in lanes.chunks(BAND).enumerate() {
        let x0 = tile_index * BAND;
        for (l, row) in band.chunks_mut(stride).enumerate() {
            let Some(target) = row.get_mut(x0..x0 + tile.len()) else {
                continue;
            };
            for (slot, lane) in target.iter_mut().zip(tile) {
                if let Some(&value) = lane.get(l) {
                    *slot = value;
                }
            }
        }
    }
}

/// Row stride of the picture-sized plane: at least `width`, and an odd number of 64-byte cache
/// lines, so the 16 rows of a band never compete for the same cache sets.
fn padded_stride(width: usize) -> usize {
    const FLOATS_PER_LINE: usize = 16;
    let stride = width.next_multiple_of(FLOATS_PER_LINE);
    if (stride / FLOATS_PER_LINE).is_multiple_of(2) {
        stride + FLOATS_PER_LINE
    } else {
        stride
    }
}

/// Centre sampling (§1.3): source index `(int)(((i + 0.5) · dim) / 64)`, computed in f64.
fn sample_positions(dim: usize) -> [usize; DOWNSAMPLED] {
    std::array::from_fn(|i| (((i as f64 + 0.5) * dim as f64) / DOWNSAMPLED as f64) as usize)
}

/// `mask[p]` is true when `p` is one of `positions`.
fn membership(positions: &[usize; DOWNSAMPLED], len: usize) -> Vec<bool> {
    let mut mask = vec![false; len];
    for &p in positions {
        if let Some(slot) = mask.get_mut(p) {
            *slot = true;
        }
    }
    mask
}

/// One 1-D box pass of window `window` over `lines` lines (`line(i)`, all the same length), along
/// the line axis. Every position within a line is an independent filter, so all the running sums
/// in `sums` advance together, one whole line per step.
///
/// The arithmetic is the reference's, per position (§1.3): add the first `half − 1` lines; then
/// add a line and emit while the window grows; then add the incoming line, subtract the outgoing
/// one, and emit; then only subtract and emit while it shrinks. Output line `o` is offered to
/// `emit(o, sums, count)` when `wanted(o)`; the caller divides each sum by `count` (float32).
fn box_filter_lines<'a>(
    lines: usize,
    window: usize,
    line: impl Fn(usize) -> &'a [f32],
    sums: &mut [f32],
    wanted: impl Fn(usize) -> bool,
    mut emit: impl FnMut(usize, &[f32], f32),
) {
    sums.fill(0.0);
    let half = (window + 2) / 2;
    let (mut incoming, mut outgoing, mut written, mut count) = (0, 0, 0, 0_usize);
    for _ in 1..half {
        add_line(sums, line(incoming));
        incoming += 1;
        count += 1;
    }
    for _ in 0..=(window - half) {
        add_line(sums, line(incoming));
        incoming += 1;
        count += 1;
        if wanted(written) {
            emit(written, sums, count as f32);
        }
        written += 1;
    }
    for _ in 0..lines.saturating_sub(window) {
        slide_line(sums, line(incoming), line(outgoing));
        incoming += 1;
        outgoing += 1;
        if wanted(written) {
            emit(written, sums, count as f32);
        }
        written += 1;
    }
    for _ in 1..half {
        subtract_line(sums, line(outgoing));
        outgoing += 1;
        count -= 1;
        if wanted(written) {
            emit(written, sums, count as f32);
        }
        written += 1;
    }
}

#[inline(always)]
fn add_line(sums: &mut [f32], add: &[f32]) {
    for (sum, &a) in sums.iter_mut().zip(add) {
        *sum += a;
    }
}

#[inline(always)]
fn subtract_line(sums: &mut [f32], sub: &[f32]) {
    for (sum, &s) in sums.iter_mut().zip(sub) {
        *sum -= s;
    }
}

/// Add then subtract, two roundings, in the reference's order.
#[inline(always)]
fn slide_line(sums: &mut [f32], add: &[f32], sub: &[f32]) {
    for ((sum, &a), &s) in sums.iter_mut().zip(add).zip(sub) {
        *sum += a;
        *sum -= s;
    }
}

/// Quality (§1.4): sum of `|(int)(((u − v) · 100) / 255)|` over vertical then horizontal
/// neighbours of the 64x64 buffer, float32 arithmetic, divided by 90 and capped at 100.
fn quality(buffer: &[[f32; DOWNSAMPLED]; DOWNSAMPLED]) -> u8 {
    let step = |u: f32, v: f32| (((u - v) * 100.0) / 255.0) as i32;
    let mut gradient_sum: i32 = 0;
    for pair in buffer.windows(2) {
        if let [upper, lower] = pair {
            for (&u, &v) in upper.iter().zip(lower) {
                gradient_sum += step(u, v).abs();
            }
        }
    }
    for row in buffer {
        for pair in row.windows(2) {
            if let [u, v] = *pair {
                gradient_sum += step(u, v).abs();
            }
        }
    }
    // At most 8064 · 100 / 90, so the cap also makes the cast lossless.
    (gradient_sum / 90).clamp(0, 100) as u8
}

/// The DCT matrix D (16x64) and its transpose (64x16).
type DctMatrices = (
    [[f32; DOWNSAMPLED]; DCT_SIDE],
    [[f32; DCT_SIDE]; DOWNSAMPLED],
);

/// The 16x64 DCT matrix (§1.5): `D[i][k] = float(sqrt(2/64)) · cos((π/2/64) · (i+1) · (2k+1))`,
/// each entry computed in f64 and stored as f32, and its 64x16 transpose; built once.
fn dct_matrices() -> &'static DctMatrices {
    static MATRICES: OnceLock<DctMatrices> = OnceLock::new();
    MATRICES.get_or_init(|| {
        let scale = f64::from((2.0_f64 / DOWNSAMPLED as f64).sqrt() as f32);
        let mut d = [[0.0_f32; DOWNSAMPLED]; DCT_SIDE];
        let mut d_transposed = [[0.0_f32; DCT_SIDE]; DOWNSAMPLED];
        for (i, row) in d.iter_mut().enumerate() {
            for (k, entry) in row.iter_mut().enumerate() {
                let angle = (PI / 2.0 / DOWNSAMPLED as f64) * (i + 1) as f64 * (2 * k + 1) as f64;
                *entry = (scale * angle.cos()) as f32;
                if let Some(slot) = d_transposed.get_mut(k).and_then(|r| r.get_mut(i)) {
                    *slot = *entry;
                }
            }
        }
        (d, d_transposed)
    })
}

/// `B = D · A · Dᵀ` (§1.5). Each element is a float32 sum over k = 0..64 in increasing k; the
/// loops are arranged so that sum is accumulated across a whole row at once.
fn dct(a: &[[f32; DOWNSAMPLED]; DOWNSAMPLED]) -> [f32; COEFFICIENTS] {
    let (d, d_transposed) = dct_matrices();
    // T = D · A, 16x64: T[i][j] = Σ_k D[i][k] · A[k][j].
    let mut t = [[0.0_f32; DOWNSAMPLED]; DCT_SIDE];
    for (t_row, d_row) in t.iter_mut().zip(d) {
        for (&d_ik, a_row) in d_row.iter().zip(a) {
            for (sum, &a_kj) in t_row.iter_mut().zip(a_row) {
                *sum += d_ik * a_kj;
            }
        }
    }
    // B = T · Dᵀ, 16x16: B[i][j] = Σ_k T[i][k] · D[j][k].
    let mut b = [0.0_f32; COEFFICIENTS];
    for (b_row, t_row) in b.chunks_exact_mut(DCT_SIDE).zip(&t) {
        for (&t_ik, dt_row) in t_row.iter().zip(d_transposed) {
            for (sum, &d_jk) in b_row.iter_mut().zip(dt_row) {
                *sum += t_ik * d_jk;
            }
        }
    }
    b
}

#[cfg(test)]
mod tests;
