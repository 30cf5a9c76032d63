//! Query windows: the parts of an upload picture the server embeds beside the whole of it, so a
//! reference shown small inside another video (picture-in-picture, a reaction inset, a screen
//! filmed in a room) still meets its own vector.
//!
//! A descriptor of the whole picture is dominated by whatever fills most of it; a window that
//! roughly frames the inset is dominated by the inset. The windows are fixed grids, not a
//! detector: `2x2@0.6` is four windows of 60 % of the picture's width and height, one in each
//! corner (overlapping across the middle), so an inset of up to about half the picture's size
//! lies mostly inside one of them wherever it sits. Each window costs one more model run per
//! embedded frame, which is why there are none unless the operator asks.
//!
//! Windows are searched on the upload side only: references store the vector of their whole
//! picture, as before.

use std::fmt;
use std::str::FromStr;

use crate::hash::border::Rect;

/// Most windows over all grids of one [`Windows`]: each is a model run per embedded frame.
pub const MAX_WINDOWS: usize = 16;

/// Smallest side of a window in pixels; a grid's windows on smaller pictures are skipped, as
/// the model's input side is (`InputSize::MIN_SIDE`).
const MIN_WINDOW_SIDE: u32 = super::InputSize::MIN_SIDE;

/// One grid: `columns` x `rows` windows, each `share` of the picture's width and height, spread
/// evenly from edge to edge.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Grid {
    /// Windows across.
    columns: u32,
    /// Windows down.
    rows: u32,
    /// Each window's width and height as a share of the picture's, above 0 and below 1.
    share: f32,
}

impl Grid {
    /// The windows of this grid over a `width` x `height` picture, row by row; none when they
    /// would be smaller than the model's smallest input.
    fn rects(&self, width: u32, height: u32, out: &mut Vec<Rect>) {
        let w = (f64::from(width) * f64::from(self.share)).round() as u32;
        let h = (f64::from(height) * f64::from(self.share)).round() as u32;
        if w < MIN_WINDOW_SIDE || h < MIN_WINDOW_SIDE || w > width || h > height {
            return;
        }
        for row in 0..self.rows {
            for column in 0..self.columns {
                out.push(Rect {
                    x: spread(column, self.columns, width - w),
                    y: spread(row, self.rows, height - h),
                    width: w,
                    height: h,
                });
            }
        }
    }
}

/// Offset of window `i` of `n` when the free space is `room`: the first at 0, the last at
/// `room`, the others evenly between; a single window is centred.
fn spread(i: u32, n: u32, room: u32) -> u32 {
    if n <= 1 {
        return room / 2;
    }
    ((u64::from(i) * u64::from(room) + u64::from(n - 1) / 2) / u64::from(n - 1)) as u32
}

impl fmt::Display for Grid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}@{}", self.columns, self.rows, self.share)
    }
}

/// The windows an upload picture is embedded in beside its whole: zero or more grids
/// (`--embedding-windows`, e.g. `2x2@0.6` or `2x2@0.6,3x3@0.4`; `none` for none).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Windows {
    grids: Vec<Grid>,
}

impl Windows {
    /// No windows: the whole picture (and its content area) only.
    pub const fn none() -> Self {
        Self { grids: Vec::new() }
    }

    /// Whether there are no windows.
    pub fn is_empty(&self) -> bool {
        self.grids.is_empty()
    }

    /// Windows per picture (on pictures large enough for all of them).
    pub fn count(&self) -> usize {
        self.grids
            .iter()
            .map(|g| (g.columns * g.rows) as usize)
            .sum()
    }

    /// The windows over a `width` x `height` picture, grid by grid, row by row.
    pub fn rects(&self, width: u32, height: u32) -> Vec<Rect> {
        let mut out = Vec::with_capacity(self.count());
        for grid in &self.grids {
            grid.rects(width, height, &mut out);
        }
        out
    }
}

impl fmt::Display for Windows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.grids.is_empty() {
            return f.write_str("none");
        }
        for (i, grid) in self.grids.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{grid}")?;
        }
        Ok(())
    }
}

impl FromStr for Windows {
    type Err = String;

    /// `none`, or grids `COLUMNSxROWS@SHARE` separated by commas.
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() || text.eq_ignore_ascii_case("none") {
            return Ok(Self::none());
        }
        let mut grids = Vec::new();
        for part in text.split(',') {
            grids.push(parse_grid(part.trim())?);
        }
        let windows = Self { grids };
        if windows.count() > MAX_WINDOWS {
            return Err(format!(
                "{text:?}: {} windows per frame, at most {MAX_WINDOWS} (each is a model run)",
                windows.count()
            ));
        }
        Ok(windows)
    }
}

fn parse_grid(part: &str) -> Result<Grid, String> {
    let expected = || {
        format!(
            "{part:?}: expected COLUMNSxROWS@SHARE, e.g. 2x2@0.6 (four windows of 60 % of the \
             picture's sides), or none"
        )
    };
    let (shape, share) = part.split_once('@').ok_or_else(expected)?;
    let (columns, rows) = shape.split_once(['x', 'X']).ok_or_else(expected)?;
    let count = |s: &str| {
        s.trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=4).contains(n))
            .ok_or_else(|| format!("{part:?}: columns and rows must be whole numbers from 1 to 4"))
    };
    let share = share
        .trim()
        .parse::<f32>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.1 && *s <= 0.9)
        .ok_or_else(|| {
            format!("{part:?}: the share must be a number from 0.1 to 0.9 of the picture's sides")
        })?;
    Ok(Grid {
        columns: count(columns)?,
        rows: count(rows)?,
        share,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_print_and_refuse_nonsense() {
        assert!("none".parse::<Windows>().expect("none").is_empty());
        assert!("".parse::<Windows>().expect("empty").is_empty());
        let w: Windows = "2x2@0.6, 3x1@0.5".parse().expect("valid");
        assert_eq!(w.count(), 7);
        assert_eq!(w.to_string(), "2x2@0.6,3x1@0.5");
        assert_eq!(w.to_string().parse::<Windows>().expect("round trip"), w);
        assert_eq!(Windows::none().to_string(), "none");
        for bad in [
            "2x2",
            "2x2@",
            "2@0.6",
            "0x2@0.6",
            "5x1@0.5",
            "2x2@1.0",
            "2x2@0.05",
            "2x2@nan",
            "axb@0.5",
            "4x4@0.5,1x1@0.5",
        ] {
            let error = bad.parse::<Windows>().expect_err(bad);
            assert!(error.contains(bad.split(',').next().unwrap_or(bad)) || error.contains(bad));
        }
    }

    #[test]
    fn a_two_by_two_grid_has_one_window_in_each_corner() {
        let w: Windows = "2x2@0.6".parse().expect("valid");
        let rects = w.rects(640, 360);
        let at = |x, y| Rect {
            x,
            y,
            width: 384,
            height: 216,
        };
        assert_eq!(rects, vec![at(0, 0), at(256, 0), at(0, 144), at(256, 144)]);
        // Every window lies inside the picture.
        for r in &rects {
            assert!(r.x + r.width <= 640 && r.y + r.height <= 360, "{r:?}");
        }
    }

    #[test]
    fn windows_spread_evenly_and_a_single_one_is_centred() {
        let rects = "3x1@0.5".parse::<Windows>().expect("valid").rects(100, 100);
        assert_eq!(rects.iter().map(|r| r.x).collect::<Vec<_>>(), [0, 25, 50]);
        assert!(rects.iter().all(|r| r.y == 25 && r.width == 50));
        let centre = "1x1@0.5".parse::<Windows>().expect("valid").rects(101, 64);
        assert_eq!(
            centre,
            vec![Rect {
                x: 25,
                y: 16,
                width: 51,
                height: 32
            }]
        );
    }

    #[test]
    fn windows_smaller_than_the_model_input_are_skipped() {
        let w: Windows = "2x2@0.5".parse().expect("valid");
        assert!(w.rects(60, 60).is_empty(), "30 px windows");
        assert_eq!(w.rects(64, 64).len(), 4, "32 px windows");
    }
}
