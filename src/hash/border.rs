//! Borders: letterbox and pillarbox bars, flat frames around a picture in general, and the blurred
//! backdrops of vertical video.
//!
//! PDQ hashes the whole picture, so bars added (or removed) by a re-upload move every coefficient
//! and defeat matching (DESIGN.md §4: the shared `pattern-hd-no-bar` and `pattern-sd-grey-bar`
//! clips match at 0 % under plain vPDQ). [`content_area`] finds the rectangle inside such bars so
//! that it can be hashed as a second signal on both the reference and the upload side.
//!
//! A row (or column) at the edge belongs to a border when nearly all its pixels are within
//! [`TOLERANCE`] luma levels of the edge's own colour; borders grow inward from each edge until a
//! row breaks that rule. Only borders of a meaningful thickness are removed, and only when a
//! meaningful content area remains, so ordinary pictures with a dark edge are left alone.
//!
//! What "meaningful" guards against: a false border is a flat band that belongs to the picture
//! (night sky, a dark floor, a title card's black around one line of text). Cutting it away leaves
//! a strip, and a strip stretched to PDQ's square is a weak, generic hash that unrelated videos
//! share. So the content must keep [`MIN_CONTENT_SHARE`] of each dimension *and* look like a
//! picture: no more elongated than [`MAX_CONTENT_ASPECT`]. The share is low enough for a 16:9
//! video inside a 9:16 frame (31.6 % of the height, the vertical-video re-upload of issue #11) and
//! its mirror, 9:16 inside 16:9; the aspect limit still refuses strips such as a 640x150 band of a
//! 640x360 frame (4.3:1) that the old 40 % share let through.
//!
//! Bars that are not flat: the usual vertical-video layout puts the video's own enlarged, blurred
//! copy behind it. No row there is uniform, but every row is smooth, so when no uniform border is
//! found, [`smooth_borders`] looks for that: smooth bars in centred opposite pairs around content
//! several times sharper. One-sided smooth areas (a sky, a wall) never count, and a picture that
//! is smooth everywhere has no content area.

use image::DynamicImage;

use super::pdq::{self, PdqOutput};

/// Largest luma difference from the border colour that still counts as border.
pub const TOLERANCE: u8 = 20;
/// Share of a row's pixels that must be border-coloured (leaves room for noise and compression).
pub const MIN_UNIFORM_SHARE: f64 = 0.98;
/// A border thinner than this share of its dimension is ignored.
pub const MIN_BORDER_SHARE: f64 = 0.02;
/// The content must keep at least this share of each dimension: 16:9 inside 9:16 keeps
/// 0.316 of the height (and 9:16 inside 16:9 as much of the width), with a little room for a
/// content edge that is as dark as the bars. 2.39:1 inside 9:16 (0.235) stays out.
pub const MIN_CONTENT_SHARE: f64 = 0.3;
/// The content's longer side may be at most this many times its shorter side: 2.39:1 and 2.76:1
/// cinema letterboxes pass, strips of text or horizon do not.
pub const MAX_CONTENT_ASPECT: f64 = 3.0;

/// A rectangle in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    /// Left column.
    pub x: u32,
    /// Top row.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

/// Integer Rec. 601 luma of one RGB pixel, 0..=255 (only used to find borders, not for PDQ).
fn luma(pixel: &[u8]) -> u8 {
    let [r, g, b] = [pixel[0], pixel[1], pixel[2]].map(u32::from);
    // (299 + 587 + 114) * 255 / 1000 = 255, so the result fits in a u8.
    ((299 * r + 587 * g + 114 * b) / 1000) as u8
}

/// A luma plane of a packed RGB24 picture.
struct Plane {
    width: usize,
    height: usize,
    luma: Vec<u8>,
}

impl Plane {
    fn from_rgb(width: u32, height: u32, rgb: &[u8]) -> Option<Self> {
        let (width, height) = (width as usize, height as usize);
        if width == 0 || height == 0 || rgb.len() != width * height * 3 {
            return None;
        }
        Some(Self {
            width,
            height,
            luma: rgb.chunks_exact(3).map(luma).collect(),
        })
    }

    fn at(&self, x: usize, y: usize) -> u8 {
        self.luma[y * self.width + x]
    }

    /// Whether the `len` pixels produced by `pixel(i)` are nearly all within the tolerance of
    /// `colour`.
    fn uniform(&self, colour: u8, len: usize, pixel: impl Fn(usize) -> u8) -> bool {
        let allowed_off = len - (len as f64 * MIN_UNIFORM_SHARE).ceil() as usize;
        let mut off = 0;
        for i in 0..len {
            if pixel(i).abs_diff(colour) > TOLERANCE {
                off += 1;
                if off > allowed_off {
                    return false;
                }
            }
        }
        true
    }

    /// Median luma of a line: the border colour, robust to a few odd pixels.
    fn median(len: usize, pixel: impl Fn(usize) -> u8) -> u8 {
        let mut values: Vec<u8> = (0..len).map(pixel).collect();
        values.sort_unstable();
        values[len / 2]
    }
}

/// Thickness of a border growing inward over `lines` lines, each `len` pixels long.
fn thickness(lines: usize, len: usize, plane: &Plane, pixel: impl Fn(usize, usize) -> u8) -> usize {
    let colour = Plane::median(len, |i| pixel(0, i));
    let mut t = 0;
    while t < lines && plane.uniform(colour, len, |i| pixel(t, i)) {
        t += 1;
    }
    t
}

/// The content area inside the borders of a packed RGB24 picture, or `None` when there are no
/// borders worth removing (or the picture is flat, or the buffer does not match its size).
///
/// Uniform bars are tried first; when there are none, blurred bars (see [`smooth_borders`]).
pub fn content_area(width: u32, height: u32, rgb: &[u8]) -> Option<Rect> {
    let plane = Plane::from_rgb(width, height, rgb)?;
    let (w, h) = (plane.width, plane.height);
    let top = thickness(h, w, &plane, |t, i| plane.at(i, t));
    if top == h {
        // The whole picture is one colour: nothing to hash differently.
        return None;
    }
    let bottom = thickness(h, w, &plane, |t, i| plane.at(i, h - 1 - t));
    let left = thickness(w, h, &plane, |t, i| plane.at(t, i));
    let right = thickness(w, h, &plane, |t, i| plane.at(w - 1 - t, i));

    let keep = |border: usize, dim: usize| {
        if (border as f64) < dim as f64 * MIN_BORDER_SHARE {
            0
        } else {
            border
        }
    };
    let borders = [keep(top, h), keep(bottom, h), keep(left, w), keep(right, w)];
    if borders == [0; 4] {
        return smooth_borders(&plane).and_then(|borders| accept(w, h, borders));
    }
    accept(w, h, borders)
}

/// The rectangle inside `[top, bottom, left, right]` borders, when it is a meaningful picture:
/// [`MIN_CONTENT_SHARE`] of each dimension and at most [`MAX_CONTENT_ASPECT`] elongated.
fn accept(w: usize, h: usize, [top, bottom, left, right]: [usize; 4]) -> Option<Rect> {
    let content_w = w.checked_sub(left + right)?;
    let content_h = h.checked_sub(top + bottom)?;
    if (content_w as f64) < w as f64 * MIN_CONTENT_SHARE
        || (content_h as f64) < h as f64 * MIN_CONTENT_SHARE
    {
        return None;
    }
    let (long, short) = (content_w.max(content_h), content_w.min(content_h));
    if short == 0 || long as f64 > short as f64 * MAX_CONTENT_ASPECT {
        return None;
    }
    Some(Rect {
        x: u32::try_from(left).ok()?,
        y: u32::try_from(top).ok()?,
        width: u32::try_from(content_w).ok()?,
        height: u32::try_from(content_h).ok()?,
    })
}

/// A line is smooth when its mean luma step between neighbours is at most this (a Gaussian blur
/// of sigma 10-20, as the vertical-video apps use, leaves 0.3-1.3 at 360x640; content rows of the
/// shared photos measure 2-10).
pub const SMOOTH_MAX_STEP: f64 = 1.5;
/// The content must be this many times sharper (mean step) than the blurred bars around it.
pub const MIN_SHARPNESS_RATIO: f64 = 3.0;
/// Opposite blurred bars may differ in thickness by at most this share of their dimension: the
/// apps centre the video, while a genuinely smooth area (sky, a wall) sits on one side.
pub const MAX_SMOOTH_ASYMMETRY: f64 = 0.05;

/// The edge between a blurred backdrop and the content is looked for this far (a share of the
/// dimension) either side of where the smooth lines end.
pub const EDGE_SEARCH_SHARE: f64 = 0.03;

/// Borders made of the picture's own blurred copy (the vertical-video layout of issue #11): no
/// row there is uniform, but every one is smooth. They count only in centred opposite pairs, each
/// at least [`MIN_BORDER_SHARE`] thick, around content [`MIN_SHARPNESS_RATIO`] times sharper.
/// Returns `[top, bottom, left, right]`.
fn smooth_borders(plane: &Plane) -> Option<[usize; 4]> {
    let (w, h) = (plane.width, plane.height);
    if w < 2 || h < 2 {
        return None;
    }
    // Mean absolute step along each row (horizontal neighbours) and each column (vertical ones).
    let rows: Vec<f64> = (0..h)
        .map(|y| {
            (1..w)
                .map(|x| plane.at(x, y).abs_diff(plane.at(x - 1, y)) as f64)
                .sum::<f64>()
                / (w - 1) as f64
        })
        .collect();
    let mut columns = vec![0.0; w];
    for y in 1..h {
        for (x, column) in columns.iter_mut().enumerate() {
            *column += plane.at(x, y).abs_diff(plane.at(x, y - 1)) as f64;
        }
    }
    columns.iter_mut().for_each(|c| *c /= (h - 1) as f64);

    let pair = |steps: &[f64]| -> Option<(usize, usize)> {
        let n = steps.len();
        let lead = steps.iter().take_while(|&&e| e <= SMOOTH_MAX_STEP).count();
        let trail = steps
            .iter()
            .rev()
            .take_while(|&&e| e <= SMOOTH_MAX_STEP)
            .count();
        let min = n as f64 * MIN_BORDER_SHARE;
        let centred = lead.abs_diff(trail) as f64 <= n as f64 * MAX_SMOOTH_ASYMMETRY;
        (lead as f64 >= min && trail as f64 >= min && centred && lead + trail < n)
            .then_some((lead, trail))
    };
    let mean = |steps: &[f64]| steps.iter().sum::<f64>() / steps.len().max(1) as f64;
    let sharp = |steps: &[f64], (lead, trail): (usize, usize)| {
        let inside = mean(&steps[lead..steps.len() - trail]);
        let outside = (mean(&steps[..lead]) * lead as f64
            + mean(&steps[steps.len() - trail..]) * trail as f64)
            / (lead + trail) as f64;
        inside >= outside.max(0.1) * MIN_SHARPNESS_RATIO
    };
    // Compression rings a few lines into the blur next to the sharp content (8x8 or 16x16
    // blocks), so the smooth run stops short of the real edge. The edge itself is the largest
    // jump between neighbouring lines nearby: the backdrop and the video meet there.
    let row_jump = |y: usize| -> f64 {
        (0..w)
            .map(|x| plane.at(x, y).abs_diff(plane.at(x, y - 1)) as f64)
            .sum::<f64>()
            / w as f64
    };
    let column_jump = |x: usize| -> f64 {
        (0..h)
            .map(|y| plane.at(x, y).abs_diff(plane.at(x - 1, y)) as f64)
            .sum::<f64>()
            / h as f64
    };
    let refine = |(lead, trail): (usize, usize), n: usize, jump: &dyn Fn(usize) -> f64| {
        let reach = ((n as f64 * EDGE_SEARCH_SHARE) as usize).max(2);
        // The first content line `e` (1..n) maximising the jump between lines e-1 and e.
        let best = |around: usize| {
            (around.saturating_sub(reach).max(1)..=(around + reach).min(n - 1))
                .max_by(|&a, &b| jump(a).total_cmp(&jump(b)).then(b.cmp(&a)))
                .unwrap_or(around)
        };
        let start = best(lead);
        let end = best(n - trail);
        (start < end).then(|| (start, n - end))
    };
    let vertical = pair(&rows)
        .filter(|&p| sharp(&rows, p))
        .and_then(|p| refine(p, h, &row_jump));
    let horizontal = pair(&columns)
        .filter(|&p| sharp(&columns, p))
        .and_then(|p| refine(p, w, &column_jump));
    if vertical.is_none() && horizontal.is_none() {
        return None;
    }
    let (top, bottom) = vertical.unwrap_or((0, 0));
    let (left, right) = horizontal.unwrap_or((0, 0));
    Some([top, bottom, left, right])
}

/// Copies `area` out of a packed RGB24 picture `width` pixels wide. `area` must lie inside the
/// picture (as [`content_area`] guarantees).
pub fn crop_rgb(width: u32, rgb: &[u8], area: Rect) -> Vec<u8> {
    let stride = width as usize * 3;
    let (x, y) = (area.x as usize * 3, area.y as usize);
    let row_bytes = area.width as usize * 3;
    let mut out = Vec::with_capacity(row_bytes * area.height as usize);
    for row in rgb.chunks_exact(stride).skip(y).take(area.height as usize) {
        out.extend_from_slice(&row[x..x + row_bytes]);
    }
    out
}

/// The PDQ of a picture and, when it has uniform borders, of its content area.
#[derive(Clone, Debug, PartialEq)]
pub struct Hashes {
    /// The whole picture, as the reference hashes it.
    pub full: PdqOutput,
    /// The content area inside uniform borders, when there are any.
    pub content: Option<PdqOutput>,
    /// Where that content area lies ([`content_area`]), for other signals of the same picture.
    pub area: Option<Rect>,
}

/// Hashes packed RGB24 pixels, and their content area when they have uniform borders.
///
/// # Errors
/// As [`pdq::hash_rgb`].
pub fn hash_rgb(width: u32, height: u32, rgb: &[u8]) -> Result<Hashes, pdq::Error> {
    let full = pdq::hash_rgb(width, height, rgb)?;
    let area = content_area(width, height, rgb);
    let content = area
        .map(|area| pdq::hash_rgb(area.width, area.height, &crop_rgb(width, rgb, area)))
        .transpose()?;
    Ok(Hashes {
        full,
        content,
        area,
    })
}

/// Hashes a decoded picture exactly as [`pdq::hash_decoded`] does, and its content area when it
/// has uniform borders.
pub fn hash_picture(picture: DynamicImage) -> Hashes {
    let (width, height) = (picture.width(), picture.height());
    let (area, content) = {
        let converted;
        let rgb: &[u8] = match picture.as_rgb8() {
            Some(buffer) => buffer.as_raw(),
            None => {
                converted = picture.to_rgb8();
                converted.as_raw()
            }
        };
        let area = content_area(width, height, rgb);
        let content = area.and_then(|area| {
            pdq::hash_rgb(area.width, area.height, &crop_rgb(width, rgb, area)).ok()
        });
        (area, content)
    };
    Hashes {
        full: pdq::hash_decoded(picture),
        content,
        area,
    }
}

/// Decodes and hashes an encoded picture, with its content area.
///
/// # Errors
/// As [`pdq::hash_image_bytes`].
pub fn hash_image_bytes(bytes: &[u8], limits: &pdq::DecodeLimits) -> Result<Hashes, pdq::Error> {
    pdq::decode_image(bytes, limits).map(hash_picture)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `w`x`h` picture: a textured content area inside bars of `bar` luma.
    fn boxed(w: u32, h: u32, area: Rect, bar: u8) -> Vec<u8> {
        let mut rgb = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                let inside = x >= area.x
                    && x < area.x + area.width
                    && y >= area.y
                    && y < area.y + area.height;
                let v = if inside {
                    ((x * 37 + y * 91) % 200 + 30) as u8
                } else {
                    bar
                };
                rgb.extend_from_slice(&[v, v, v]);
            }
        }
        rgb
    }

    #[test]
    fn letterbox_bars_are_found() {
        let area = Rect {
            x: 0,
            y: 30,
            width: 320,
            height: 180,
        };
        let rgb = boxed(320, 240, area, 0);
        assert_eq!(content_area(320, 240, &rgb), Some(area));
    }

    #[test]
    fn pillarbox_and_grey_bars_are_found() {
        let area = Rect {
            x: 40,
            y: 0,
            width: 240,
            height: 240,
        };
        let rgb = boxed(320, 240, area, 128);
        assert_eq!(content_area(320, 240, &rgb), Some(area));
    }

    #[test]
    fn pictures_without_bars_are_left_alone() {
        let full = Rect {
            x: 0,
            y: 0,
            width: 320,
            height: 240,
        };
        assert_eq!(content_area(320, 240, &boxed(320, 240, full, 0)), None);
        // A one-pixel dark edge is under the minimum thickness.
        let almost = Rect {
            x: 0,
            y: 1,
            width: 320,
            height: 239,
        };
        assert_eq!(content_area(320, 240, &boxed(320, 240, almost, 0)), None);
    }

    #[test]
    fn flat_pictures_and_bad_buffers_give_none() {
        assert_eq!(content_area(10, 10, &[7; 300]), None);
        assert_eq!(content_area(10, 10, &[7; 299]), None);
        assert_eq!(content_area(0, 10, &[]), None);
    }

    #[test]
    fn bars_do_not_change_the_content_hash_much() {
        let area = Rect {
            x: 0,
            y: 40,
            width: 320,
            height: 160,
        };
        let barred = boxed(320, 240, area, 0);
        let bare = crop_rgb(320, &barred, area);
        let with_bars = hash_rgb(320, 240, &barred).expect("hash");
        let without = hash_rgb(320, 160, &bare).expect("hash");
        assert_eq!(without.content, None);
        let content = with_bars.content.expect("bars found");
        assert_eq!(content.hash(), without.full.hash());
        assert!(with_bars.full.hash().distance(&without.full.hash()) > 31);
    }

    #[test]
    fn sixteen_nine_inside_nine_sixteen_is_found() {
        // 360x202 content centred in a 360x640 vertical frame: 31.6 % of the height.
        let area = Rect {
            x: 0,
            y: 219,
            width: 360,
            height: 202,
        };
        let rgb = boxed(360, 640, area, 0);
        assert_eq!(content_area(360, 640, &rgb), Some(area));
        // And its mirror: 9:16 content inside a 16:9 frame, pillarboxed.
        let tall = Rect {
            x: 219,
            y: 0,
            width: 202,
            height: 360,
        };
        let rgb = boxed(640, 360, tall, 16);
        assert_eq!(content_area(640, 360, &rgb), Some(tall));
    }

    #[test]
    fn content_below_the_minimum_share_is_refused() {
        // 2.39:1 inside 9:16: 151 of 640 rows (23.6 %).
        let area = Rect {
            x: 0,
            y: 245,
            width: 360,
            height: 151,
        };
        assert_eq!(content_area(360, 640, &boxed(360, 640, area, 0)), None);
    }

    #[test]
    fn strips_are_refused_by_their_aspect() {
        // A 640x150 band of a 640x360 frame keeps 42 % of the height, but at 4.3:1 it is a strip
        // (a line of text on a title card, a horizon between dark sky and ground).
        let strip = Rect {
            x: 0,
            y: 105,
            width: 640,
            height: 150,
        };
        assert_eq!(content_area(640, 360, &boxed(640, 360, strip, 0)), None);
        // 2.39:1 cinema letterboxed in 16:9 is a picture and passes.
        let scope = Rect {
            x: 0,
            y: 46,
            width: 640,
            height: 268,
        };
        assert_eq!(
            content_area(640, 360, &boxed(640, 360, scope, 0)),
            Some(scope)
        );
    }

    /// A `w`x`h` picture whose bars are a smooth ramp across each row (a blurred backdrop: no
    /// row of it is uniform, every row is smooth) around sharp content: vertical stripes, which
    /// like a natural picture change little from one row to the next.
    fn blurred(w: u32, h: u32, area: Rect) -> Vec<u8> {
        let mut rgb = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                let inside = x >= area.x
                    && x < area.x + area.width
                    && y >= area.y
                    && y < area.y + area.height;
                let v = if inside {
                    (60 + (x / 4 % 2) * 60) as u8
                } else {
                    (40 + x / 6 + y / 10) as u8
                };
                rgb.extend_from_slice(&[v, v, v]);
            }
        }
        rgb
    }

    #[test]
    fn blurred_bars_around_sharp_content_are_found() {
        let area = Rect {
            x: 0,
            y: 219,
            width: 360,
            height: 202,
        };
        let rgb = blurred(360, 640, area);
        assert_eq!(content_area(360, 640, &rgb), Some(area));
    }

    #[test]
    fn one_sided_or_everywhere_smoothness_is_not_a_border() {
        // A smooth sky above sharp ground: one side only.
        let ground = Rect {
            x: 0,
            y: 250,
            width: 360,
            height: 390,
        };
        assert_eq!(content_area(360, 640, &blurred(360, 640, ground)), None);
        // Off-centre by more than the allowed asymmetry (bars of 150 and 288 rows).
        let off = Rect {
            x: 0,
            y: 150,
            width: 360,
            height: 202,
        };
        assert_eq!(content_area(360, 640, &blurred(360, 640, off)), None);
        // Smooth everywhere (a wall): no content area.
        let none = Rect {
            x: 0,
            y: 0,
            width: 0,
            height: 0,
        };
        assert_eq!(content_area(360, 640, &blurred(360, 640, none)), None);
    }

    #[test]
    fn cropping_copies_the_area() {
        let area = Rect {
            x: 1,
            y: 1,
            width: 2,
            height: 1,
        };
        let rgb: Vec<u8> = (0..4 * 3 * 3).map(|i| i as u8).collect();
        assert_eq!(crop_rgb(4, &rgb, area), vec![15, 16, 17, 18, 19, 20]);
    }
}
