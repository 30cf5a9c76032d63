//! The benchmark dataset (issue #6 item 1): deterministic reference sets of N PDQ hashes and one
//! query set with ground truth, shared by `bench/engines.rs`, `bench/startup.rs` and
//! `bench/compare_faiss.py`.
//!
//! - **Real frames**: clips rendered from the conformance photos (`../shared/conformance/pdq`)
//!   with motion (a 16:9 window that pans and zooms across the photo, [`FRAMES_PER_CLIP`] frames a
//!   clip), rendered at 640x360 and hashed with our PDQ. The [`HELD_OUT`] photos stay out of the
//!   references and only give non-matching queries.
//! - **Distractors**: seeded random 256-bit hashes fill the reference set up to N (unrelated PDQ
//!   hashes sit about 128 bits apart, as random ones do), so 10M frames take seconds.
//! - **Queries**: every [`QUERY_STRIDE`]-th real reference frame, transformed on its pixels
//!   ([`QueryKind`]: JPEG at quality 15, scaled to 320x180, brightened, a caption bar and logo
//!   drawn over it, and all of these at once); plus frames of the held-out photos and random
//!   hashes as known non-matches. The query set is the same for every N.
//! - **Ground truth** comes from the `exact` engine at radius [`RADIUS`], per N.
//!
//! Files in `bench/data/` (gitignored), all little-endian, readable by numpy:
//! - `real.bin`: the real frames and queries, cached (rendering them takes a minute);
//! - `refs-N.u8`: N x 32 bytes, reference hash `i` at offset `32 i` (the first ones are real);
//! - `queries.u8`: Q x 32 bytes; `queries.tsv`: `kind<TAB>source` per query (source: index of the
//!   reference frame it was made from, or -1);
//! - `truth-N.bin`: u64 Q, then u64 lims[Q + 1], u32 ids[lims[Q]], u32 distances[lims[Q]] (faiss's
//!   range-search layout), ids ascending within each query.
//!
//! Reference `i` is loaded into a `FrameIndex` as frame `i % FRAMES_PER_REFERENCE` of reference
//! `i / FRAMES_PER_REFERENCE + 1`, so a [`Match`] maps back to `i` with [`position`].

#![allow(dead_code, unreachable_pub)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use framematch::hash::PdqHash;
use framematch::hash::pdq;
use framematch::index::{EngineKind, FrameIndex, HnswParams, Match};
use framematch::model::{BankId, FrameSignal, IndexedFrame, ReferenceId};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Match radius, as the service's default (distance <= 31).
pub const RADIUS: u32 = 31;
/// Reference frames per reference in the index.
pub const FRAMES_PER_REFERENCE: usize = 1000;
/// Frames per rendered clip.
pub const FRAMES_PER_CLIP: usize = 40;
/// Clips per reference photo.
pub const CLIPS_PER_PHOTO: usize = 4;
/// Clips per held-out photo.
pub const CLIPS_PER_HELD_OUT: usize = 3;
/// One query source every this many real reference frames.
pub const QUERY_STRIDE: usize = 19;
/// Random non-matching queries.
pub const RANDOM_QUERIES: usize = 500;
/// Rendered frame size.
pub const WIDTH: u32 = 640;
/// Rendered frame size.
pub const HEIGHT: u32 = 360;
/// Photos whose clips never enter the references: distinct pictures, unlike the many conformance
/// files that are variants of one another (modes, rotations, blur levels of the same photo).
pub const HELD_OUT: [&str; 4] = ["c.png", "pen-and-coaster.png", "q0291.jpg", "q2821.jpg"];
const SEED: u64 = 0x00f4_a3e5_ca7c_4000;
const REAL_MAGIC: &[u8; 8] = b"FMREAL03";

/// How a query was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QueryKind {
    /// Re-encoded as JPEG at quality 15.
    Jpeg,
    /// Scaled to 320x180.
    Scale,
    /// Every channel +40, saturating.
    Brightness,
    /// A dark caption bar with white glyph strokes and a logo box, drawn on the pixels.
    Overlay,
    /// Overlay, brightness +20, scale and JPEG at quality 30 together.
    Combined,
    /// A frame of a held-out photo: not in the references.
    HeldOut,
    /// A random hash: not in the references.
    Random,
}

impl QueryKind {
    /// Kinds made from a reference frame, expected to match it.
    pub const TRANSFORMS: [QueryKind; 5] = [
        QueryKind::Jpeg,
        QueryKind::Scale,
        QueryKind::Brightness,
        QueryKind::Overlay,
        QueryKind::Combined,
    ];

    /// Stable text form (queries.tsv).
    pub fn as_str(self) -> &'static str {
        match self {
            QueryKind::Jpeg => "jpeg_q15",
            QueryKind::Scale => "scale_320x180",
            QueryKind::Brightness => "brightness_+40",
            QueryKind::Overlay => "text_overlay",
            QueryKind::Combined => "combined",
            QueryKind::HeldOut => "held_out_photo",
            QueryKind::Random => "random",
        }
    }

    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(code: u8) -> Option<Self> {
        [
            QueryKind::Jpeg,
            QueryKind::Scale,
            QueryKind::Brightness,
            QueryKind::Overlay,
            QueryKind::Combined,
            QueryKind::HeldOut,
            QueryKind::Random,
        ]
        .get(code as usize)
        .copied()
    }
}

/// One query: its hash, how it was made, and the reference frame it came from.
#[derive(Clone, Copy, Debug)]
pub struct Query {
    /// The hash searched.
    pub hash: PdqHash,
    /// How it was made.
    pub kind: QueryKind,
    /// Position of its source reference frame, for transforms.
    pub source: Option<u32>,
}

/// Real frames and queries, independent of N.
#[derive(Clone, Debug)]
pub struct Real {
    /// Hashes of the rendered reference frames.
    pub frames: Vec<PdqHash>,
    /// Their PDQ quality.
    pub quality: Vec<u8>,
    /// Queries made from frames (real ones, then random ones).
    pub queries: Vec<Query>,
    /// Source photos used.
    pub photos: usize,
}

/// Ground truth for one N: per query, the reference positions within [`RADIUS`].
#[derive(Clone, Debug, Default)]
pub struct Truth {
    /// `lims[q]..lims[q + 1]` indexes `ids` and `distances` for query `q`.
    pub lims: Vec<u64>,
    /// Reference positions, ascending per query.
    pub ids: Vec<u32>,
    /// Their distances.
    pub distances: Vec<u32>,
}

impl Truth {
    /// The positions for query `q`.
    pub fn ids(&self, q: usize) -> &[u32] {
        &self.ids[self.lims[q] as usize..self.lims[q + 1] as usize]
    }

    /// Pairs in all.
    pub fn pairs(&self) -> usize {
        self.ids.len()
    }
}

/// A dataset of N references.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// N reference hashes; the first `real` are real frames.
    pub refs: Vec<PdqHash>,
    /// Real frames at the start of `refs`.
    pub real: usize,
    /// Quality of the real frames (distractors: 100).
    pub real_quality: Vec<u8>,
    /// The queries.
    pub queries: Vec<Query>,
    /// Ground truth from `exact`.
    pub truth: Truth,
}

/// `bench/data`, created on demand.
pub fn data_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/data");
    fs::create_dir_all(&dir).expect("create bench/data");
    dir
}

/// `../shared/conformance/pdq`.
pub fn photo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance/pdq")
}

/// The conformance photos at least 200 pixels on each side, sorted by name.
pub fn photos() -> Vec<(String, RgbImage)> {
    let mut paths: Vec<PathBuf> = fs::read_dir(photo_dir())
        .expect("../shared/conformance/pdq must exist beside the clone")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("jpg" | "png" | "webp")
            )
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|path| {
            let picture = image::open(&path).ok()?.to_rgb8();
            (picture.width() >= 200 && picture.height() >= 200).then(|| {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                (name.unwrap_or_default(), picture)
            })
        })
        .collect()
}

/// Bilinear sample of a window `(x0, y0, w, h)` of `src` into a `width x height` picture.
pub fn render(src: &RgbImage, window: (f64, f64, f64, f64), width: u32, height: u32) -> RgbImage {
    let (x0, y0, w, h) = window;
    let (sw, sh) = (src.width() as usize, src.height() as usize);
    let raw = src.as_raw();
    let mut out = RgbImage::new(width, height);
    let sx = w / f64::from(width);
    let sy = h / f64::from(height);
    for (y, row) in out.chunks_exact_mut(width as usize * 3).enumerate() {
        let fy = (y0 + (y as f64 + 0.5) * sy - 0.5).clamp(0.0, (sh - 1) as f64);
        let y_lo = fy.floor() as usize;
        let y_hi = (y_lo + 1).min(sh - 1);
        let ty = fy - y_lo as f64;
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            let fx = (x0 + (x as f64 + 0.5) * sx - 0.5).clamp(0.0, (sw - 1) as f64);
            let x_lo = fx.floor() as usize;
            let x_hi = (x_lo + 1).min(sw - 1);
            let tx = fx - x_lo as f64;
            for (c, value) in px.iter_mut().enumerate() {
                let at = |xx: usize, yy: usize| f64::from(raw[(yy * sw + xx) * 3 + c]);
                let top = at(x_lo, y_lo) * (1.0 - tx) + at(x_hi, y_lo) * tx;
                let bottom = at(x_lo, y_hi) * (1.0 - tx) + at(x_hi, y_hi) * tx;
                *value = (top * (1.0 - ty) + bottom * ty).round() as u8;
            }
        }
    }
    out
}

/// The frames of one clip: a 16:9 window panning and zooming across `photo`, seeded.
pub fn clip(photo: &RgbImage, seed: u64, frames: usize, width: u32, height: u32) -> Vec<RgbImage> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (pw, ph) = (f64::from(photo.width()), f64::from(photo.height()));
    let aspect = f64::from(width) / f64::from(height);
    let (max_w, max_h) = if pw / ph > aspect {
        (ph * aspect, ph)
    } else {
        (pw, pw / aspect)
    };
    let s0: f64 = rng.random_range(0.55..1.0);
    let s1: f64 = rng.random_range(0.55..1.0);
    let (u0, v0, u1, v1): (f64, f64, f64, f64) =
        (rng.random(), rng.random(), rng.random(), rng.random());
    (0..frames)
        .map(|f| {
            let t = f as f64 / (frames.max(2) - 1) as f64;
            let s = s0 + (s1 - s0) * t;
            let (w, h) = (max_w * s, max_h * s);
            let u = u0 + (u1 - u0) * t;
            let v = v0 + (v1 - v0) * t;
            render(photo, ((pw - w) * u, (ph - h) * v, w, h), width, height)
        })
        .collect()
}

/// JPEG round trip at `quality`.
pub fn jpeg_round_trip(picture: &RgbImage, quality: u8) -> RgbImage {
    let bytes = encode_jpeg(picture, quality);
    image::load_from_memory(&bytes)
        .expect("decode our own jpeg")
        .to_rgb8()
}

/// Encodes a picture as JPEG.
pub fn encode_jpeg(picture: &RgbImage, quality: u8) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality)
        .encode(
            picture.as_raw(),
            picture.width(),
            picture.height(),
            image::ExtendedColorType::Rgb8,
        )
        .expect("jpeg encode to memory");
    bytes
}

fn brighten(picture: &RgbImage, delta: u8) -> RgbImage {
    let mut out = picture.clone();
    for value in out.iter_mut() {
        *value = value.saturating_add(delta);
    }
    out
}

fn fill(picture: &mut RgbImage, x0: u32, y0: u32, w: u32, h: u32, rgb: [u8; 3], alpha: f32) {
    for y in y0..(y0 + h).min(picture.height()) {
        for x in x0..(x0 + w).min(picture.width()) {
            let px = picture.get_pixel_mut(x, y);
            for (c, &target) in rgb.iter().enumerate() {
                px.0[c] = (f32::from(px.0[c]) * (1.0 - alpha) + f32::from(target) * alpha) as u8;
            }
        }
    }
}

/// A translucent caption bar (a twelfth of the height) with blocky white "text", and a logo box top left,
/// drawn by hand in proportion to the picture.
pub fn overlay(picture: &RgbImage, seed: u64) -> RgbImage {
    let mut out = picture.clone();
    let (w, h) = (out.width(), out.height());
    let bar_h = h / 12;
    let bar_y = h - bar_h - h / 30;
    fill(&mut out, w / 8, bar_y, w - w / 4, bar_h, [0, 0, 0], 0.45);
    // Glyphs: 5x7 cells of random strokes, like a line of capitals.
    let mut rng = StdRng::seed_from_u64(seed);
    let cell = (bar_h * 6 / 10 / 7).max(1);
    let glyphs = ((w - w / 3) / (cell * 6)).min(24);
    let text_y = bar_y + (bar_h - cell * 7) / 2;
    for g in 0..glyphs {
        if rng.random_ratio(1, 6) {
            continue; // a space
        }
        let gx = w / 6 + g * cell * 6;
        for row in 0..7 {
            for col in 0..5 {
                if rng.random_ratio(2, 5) {
                    fill(
                        &mut out,
                        gx + col * cell,
                        text_y + row * cell,
                        cell,
                        cell,
                        [255, 255, 255],
                        0.8,
                    );
                }
            }
        }
    }
    fill(&mut out, w / 30, h / 20, w / 14, h / 14, [230, 40, 40], 0.7);
    out
}

fn scale(picture: &RgbImage, width: u32, height: u32) -> RgbImage {
    let window = (
        0.0,
        0.0,
        f64::from(picture.width()),
        f64::from(picture.height()),
    );
    render(picture, window, width, height)
}

fn hash(picture: &RgbImage) -> (PdqHash, u8) {
    let out = pdq::hash_rgb(picture.width(), picture.height(), picture.as_raw()).expect("rgb");
    (out.hash(), out.quality())
}

fn transform(picture: &RgbImage, kind: QueryKind, seed: u64) -> RgbImage {
    match kind {
        QueryKind::Jpeg => jpeg_round_trip(picture, 15),
        QueryKind::Scale => scale(picture, 320, 180),
        QueryKind::Brightness => brighten(picture, 40),
        QueryKind::Overlay => overlay(picture, seed),
        QueryKind::Combined => {
            jpeg_round_trip(&scale(&brighten(&overlay(picture, seed), 20), 320, 180), 30)
        }
        QueryKind::HeldOut | QueryKind::Random => picture.clone(),
    }
}

/// One rendered clip's output.
struct ClipOut {
    frames: Vec<(PdqHash, u8)>,
    /// (index within clip, kind, hash)
    queries: Vec<(usize, QueryKind, PdqHash)>,
}

/// Renders and hashes every clip on all cores.
fn render_real() -> Real {
    let started = Instant::now();
    let photos = photos();
    assert!(
        photos.len() >= 5,
        "expected the conformance photos, found {}",
        photos.len()
    );
    // (photo, clip, held_out)
    let mut jobs = Vec::new();
    for (p, _) in photos.iter().enumerate() {
        let held_out = HELD_OUT.contains(&photos[p].0.as_str());
        let clips = if held_out {
            CLIPS_PER_HELD_OUT
        } else {
            CLIPS_PER_PHOTO
        };
        for c in 0..clips {
            jobs.push((p, c, held_out));
        }
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut outputs: Vec<Option<ClipOut>> = (0..jobs.len()).map(|_| None).collect();
    let results = std::sync::Mutex::new(&mut outputs);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(p, c, held_out)) = jobs.get(j) else {
                        break;
                    };
                    let seed = SEED ^ ((p as u64) << 16) ^ c as u64;
                    let pictures = clip(&photos[p].1, seed, FRAMES_PER_CLIP, WIDTH, HEIGHT);
                    let out = if held_out {
                        ClipOut {
                            frames: Vec::new(),
                            queries: pictures
                                .iter()
                                .enumerate()
                                .step_by(2)
                                .map(|(i, pic)| {
                                    let q = jpeg_round_trip(pic, 50);
                                    (i, QueryKind::HeldOut, hash(&q).0)
                                })
                                .collect(),
                        }
                    } else {
                        let frames: Vec<(PdqHash, u8)> = pictures.iter().map(hash).collect();
                        let mut queries = Vec::new();
                        // Query sources spread over the clip: frame j where (j + clip offset)
                        // is a multiple of the stride, over the transforms in turn.
                        for (i, pic) in pictures.iter().enumerate() {
                            let global = j * FRAMES_PER_CLIP + i;
                            if !global.is_multiple_of(QUERY_STRIDE) {
                                continue;
                            }
                            for kind in QueryKind::TRANSFORMS {
                                let q = transform(pic, kind, seed ^ global as u64);
                                queries.push((i, kind, hash(&q).0));
                            }
                        }
                        ClipOut { frames, queries }
                    };
                    results.lock().expect("no panics while holding")[j] = Some(out);
                }
            });
        }
    });
    let mut real = Real {
        frames: Vec::new(),
        quality: Vec::new(),
        queries: Vec::new(),
        photos: photos.len(),
    };
    for out in outputs.into_iter().flatten() {
        let base = real.frames.len() as u32;
        for (i, kind, hash) in out.queries {
            let source = (kind != QueryKind::HeldOut).then_some(base + i as u32);
            real.queries.push(Query { hash, kind, source });
        }
        for (hash, quality) in out.frames {
            real.frames.push(hash);
            real.quality.push(quality);
        }
    }
    let mut rng = StdRng::seed_from_u64(SEED ^ 0x5eed);
    for _ in 0..RANDOM_QUERIES {
        real.queries.push(Query {
            hash: random_hash(&mut rng),
            kind: QueryKind::Random,
            source: None,
        });
    }
    eprintln!(
        "rendered {} real frames and {} queries from {} photos in {:.1} s",
        real.frames.len(),
        real.queries.len(),
        real.photos,
        started.elapsed().as_secs_f64()
    );
    real
}

/// A uniformly random hash.
pub fn random_hash(rng: &mut StdRng) -> PdqHash {
    let mut bytes = [0u8; 32];
    rng.fill(&mut bytes);
    PdqHash::from_bytes(bytes)
}

fn read_real(path: &Path) -> Option<Real> {
    let bytes = fs::read(path).ok()?;
    let rest = bytes.strip_prefix(REAL_MAGIC.as_slice())?;
    let u32_at = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let frames = u32_at(rest, 0)? as usize;
    let queries = u32_at(rest, 4)? as usize;
    let photos = u32_at(rest, 8)? as usize;
    let mut at = 12;
    let mut real = Real {
        frames: Vec::with_capacity(frames),
        quality: Vec::with_capacity(frames),
        queries: Vec::with_capacity(queries),
        photos,
    };
    for _ in 0..frames {
        real.frames
            .push(PdqHash::try_from_slice(rest.get(at..at + 32)?).ok()?);
        real.quality.push(*rest.get(at + 32)?);
        at += 33;
    }
    for _ in 0..queries {
        let hash = PdqHash::try_from_slice(rest.get(at..at + 32)?).ok()?;
        let kind = QueryKind::from_code(*rest.get(at + 32)?)?;
        let source = u32_at(rest, at + 33)?;
        real.queries.push(Query {
            hash,
            kind,
            source: (source != u32::MAX).then_some(source),
        });
        at += 37;
    }
    Some(real)
}

fn write_real(path: &Path, real: &Real) {
    let mut bytes = REAL_MAGIC.to_vec();
    bytes.extend((real.frames.len() as u32).to_le_bytes());
    bytes.extend((real.queries.len() as u32).to_le_bytes());
    bytes.extend((real.photos as u32).to_le_bytes());
    for (hash, quality) in real.frames.iter().zip(&real.quality) {
        bytes.extend(hash.as_bytes());
        bytes.push(*quality);
    }
    for q in &real.queries {
        bytes.extend(q.hash.as_bytes());
        bytes.push(q.kind.code());
        bytes.extend(q.source.unwrap_or(u32::MAX).to_le_bytes());
    }
    fs::write(path, bytes).expect("write real.bin");
}

/// The real frames and queries, rendered once and cached in `bench/data/real.bin`.
pub fn real() -> Real {
    let path = data_dir().join("real.bin");
    if let Some(real) = read_real(&path) {
        return real;
    }
    let real = render_real();
    write_real(&path, &real);
    let mut tsv = String::new();
    for q in &real.queries {
        let source = q.source.map_or(-1, i64::from);
        tsv.push_str(&format!("{}\t{source}\n", q.kind.as_str()));
    }
    fs::write(data_dir().join("queries.tsv"), tsv).expect("write queries.tsv");
    let raw: Vec<u8> = real
        .queries
        .iter()
        .flat_map(|q| *q.hash.as_bytes())
        .collect();
    fs::write(data_dir().join("queries.u8"), raw).expect("write queries.u8");
    real
}

/// The reference hashes for N: the real frames, then seeded random distractors.
fn references(real: &Real, n: usize) -> Vec<PdqHash> {
    assert!(
        n >= real.frames.len(),
        "N must be at least the {} real frames",
        real.frames.len()
    );
    let mut refs = Vec::with_capacity(n);
    refs.extend_from_slice(&real.frames);
    let mut rng = StdRng::seed_from_u64(SEED ^ 0xd157_4ac7);
    let mut bytes = vec![0u8; (n - real.frames.len()) * 32];
    rng.fill(bytes.as_mut_slice());
    refs.extend(
        bytes
            .chunks_exact(32)
            .map(|c| PdqHash::try_from_slice(c).expect("32 bytes")),
    );
    refs
}

/// Reference position `i` as the frame it is loaded as.
pub fn indexed_frames(ds: &Dataset) -> Vec<IndexedFrame> {
    ds.refs
        .iter()
        .enumerate()
        .map(|(i, hash)| IndexedFrame {
            reference: ReferenceId((i / FRAMES_PER_REFERENCE) as i64 + 1),
            bank: BankId(1),
            frame: FrameSignal {
                frame_index: (i % FRAMES_PER_REFERENCE) as u32,
                timestamp_ms: (i % FRAMES_PER_REFERENCE) as u64 * 1000,
                hash: *hash,
                quality: ds.real_quality.get(i).copied().unwrap_or(100),
            },
        })
        .collect()
}

/// The reference position of a search result.
pub fn position(m: &Match) -> u32 {
    ((m.reference.0 - 1) as usize * FRAMES_PER_REFERENCE + m.frame.frame_index as usize) as u32
}

/// Runs every query on `threads` threads and returns, per query, the sorted positions and
/// distances found.
pub fn run_all(index: &FrameIndex, queries: &[Query], threads: usize) -> Vec<Vec<(u32, u32)>> {
    let chunk = queries.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = queries
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    let mut out = Vec::new();
                    part.iter()
                        .map(|q| {
                            index.search(&q.hash, RADIUS, &|_| true, &mut out);
                            let mut found: Vec<(u32, u32)> =
                                out.iter().map(|m| (position(m), m.distance)).collect();
                            found.sort_unstable();
                            found
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("search thread"))
            .collect()
    })
}

fn read_truth(path: &Path, queries: usize) -> Option<Truth> {
    let bytes = fs::read(path).ok()?;
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
    };
    if u64_at(0)? as usize != queries {
        return None;
    }
    let lims: Vec<u64> = (0..=queries)
        .map(|q| u64_at(8 + q * 8))
        .collect::<Option<_>>()?;
    let total = *lims.last()? as usize;
    let base = 8 + (queries + 1) * 8;
    let words = |start: usize| -> Option<Vec<u32>> {
        bytes
            .get(start..start + total * 4)?
            .chunks_exact(4)
            .map(|c| c.try_into().ok().map(u32::from_le_bytes))
            .collect()
    };
    Some(Truth {
        ids: words(base)?,
        distances: words(base + total * 4)?,
        lims,
    })
}

fn write_truth(path: &Path, truth: &Truth) {
    let queries = truth.lims.len() - 1;
    let mut bytes = Vec::with_capacity(8 + truth.lims.len() * 8 + truth.ids.len() * 8);
    bytes.extend((queries as u64).to_le_bytes());
    for l in &truth.lims {
        bytes.extend(l.to_le_bytes());
    }
    for id in &truth.ids {
        bytes.extend(id.to_le_bytes());
    }
    for d in &truth.distances {
        bytes.extend(d.to_le_bytes());
    }
    fs::write(path, bytes).expect("write truth");
}

/// The dataset for `n` references: generated (and written to `bench/data`) unless cached.
/// Ground truth comes from an `exact` index built here when `truth-N.bin` is missing.
pub fn dataset(n: usize) -> Dataset {
    let real = real();
    let started = Instant::now();
    let refs = references(&real, n);
    let refs_path = data_dir().join(format!("refs-{n}.u8"));
    if fs::metadata(&refs_path).map(|m| m.len()).ok() != Some(n as u64 * 32) {
        let mut file = std::io::BufWriter::new(fs::File::create(&refs_path).expect("create refs"));
        for hash in &refs {
            file.write_all(hash.as_bytes()).expect("write refs");
        }
        file.flush().expect("flush refs");
    }
    let mut ds = Dataset {
        refs,
        real: real.frames.len(),
        real_quality: real.quality,
        queries: real.queries,
        truth: Truth::default(),
    };
    let truth_path = data_dir().join(format!("truth-{n}.bin"));
    ds.truth = match read_truth(&truth_path, ds.queries.len()) {
        Some(truth) => truth,
        None => {
            let mut index = FrameIndex::new(EngineKind::Exact, HnswParams::default());
            index.load(indexed_frames(&ds));
            let found = run_all(&index, &ds.queries, 2);
            let mut truth = Truth {
                lims: vec![0],
                ..Truth::default()
            };
            for hits in found {
                for (id, d) in hits {
                    truth.ids.push(id);
                    truth.distances.push(d);
                }
                truth.lims.push(truth.ids.len() as u64);
            }
            write_truth(&truth_path, &truth);
            truth
        }
    };
    eprintln!(
        "dataset N={n}: {} real + {} random references, {} queries, {} true pairs ({:.1} s)",
        ds.real,
        n - ds.real,
        ds.queries.len(),
        ds.truth.pairs(),
        started.elapsed().as_secs_f64()
    );
    ds
}
