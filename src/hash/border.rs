//! Uniform borders: letterbox and pillarbox bars, and flat frames around a picture in general.
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

use image::DynamicImage;

use super::pdq::{self, PdqOutput};

/// Largest luma difference from the border colour that still counts as border.
pub const TOLERANCE: u8 = 20;
/// Share of a row's pixels that must be border-coloured (leaves room for noise and compression).
pub const MIN_UNIFORM_SHARE: f64 = 0.98;
/// A border thinner than this share of its dimension is ignored.
pub const MIN_BORDER_SHARE: f64 = 0.02;
/// The content must keep at least this share of each dimension.
pub const MIN_CONTENT_SHARE: f64 = 0.4;

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

/// The content area inside uniform borders of a packed RGB24 picture, or `None` when there are
/// no borders worth removing (or the picture is flat, or the buffer does not match its size).
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
    let (top, bottom) = (keep(top, h), keep(bottom, h));
    let (left, right) = (keep(left, w), keep(right, w));
    if top + bottom + left + right == 0 {
        return None;
    }
    let content_w = w.checked_sub(left + right)?;
    let content_h = h.checked_sub(top + bottom)?;
    if (content_w as f64) < w as f64 * MIN_CONTENT_SHARE
        || (content_h as f64) < h as f64 * MIN_CONTENT_SHARE
    {
        return None;
    }
    Some(Rect {
        x: u32::try_from(left).ok()?,
        y: u32::try_from(top).ok()?,
        width: u32::try_from(content_w).ok()?,
        height: u32::try_from(content_h).ok()?,
    })
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
}

/// Hashes packed RGB24 pixels, and their content area when they have uniform borders.
///
/// # Errors
/// As [`pdq::hash_rgb`].
pub fn hash_rgb(width: u32, height: u32, rgb: &[u8]) -> Result<Hashes, pdq::Error> {
    let full = pdq::hash_rgb(width, height, rgb)?;
    let content = content_area(width, height, rgb)
        .map(|area| pdq::hash_rgb(area.width, area.height, &crop_rgb(width, rgb, area)))
        .transpose()?;
    Ok(Hashes { full, content })
}

/// Hashes a decoded picture exactly as [`pdq::hash_decoded`] does, and its content area when it
/// has uniform borders.
pub fn hash_picture(picture: DynamicImage) -> Hashes {
    let (width, height) = (picture.width(), picture.height());
    let content = {
        let converted;
        let rgb: &[u8] = match picture.as_rgb8() {
            Some(buffer) => buffer.as_raw(),
            None => {
                converted = picture.to_rgb8();
                converted.as_raw()
            }
        };
        content_area(width, height, rgb).and_then(|area| {
            pdq::hash_rgb(area.width, area.height, &crop_rgb(width, rgb, area)).ok()
        })
    };
    Hashes {
        full: pdq::hash_decoded(picture),
        content,
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
