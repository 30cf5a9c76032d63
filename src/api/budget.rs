//! The server-wide decode budget (issue #13 item 1): memory, not workers, bounds the pictures in
//! flight.
//!
//! Before a picture is decoded its header is read ([`pdq::probe_image`]) and its working set
//! computed ([`decode_cost`]); the job reserves that many bytes of `--decode-memory` (a
//! semaphore whose permits are KiB) before it may take a hashing worker, and returns them when
//! it is done. A 1080p frame reserves about 28 MB, so dozens run side by side, while a picture
//! near the per-image limits (0.6-0.9 GiB) waits until that much is free: peak resident memory
//! stays under the budget plus what the rest of the server holds, whatever arrives. Waiting jobs
//! count in the hashing queue (`--max-queued-hashes`); past it, RESOURCE_EXHAUSTED.
//!
//! The semaphore is fair (first come, first served), so a large picture is not starved by a
//! stream of small ones: those that arrive after it wait behind it.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Error;
use super::convert::Content;
use crate::config::Limits;
use crate::hash::pdq;

/// Bytes a picture's hashing holds at its peak besides its decoded form, per pixel: an 8-bit RGB
/// copy when the decoded form is not 8-bit RGB (3), the content area's crop (up to 3) and the
/// f32 luma plane of whichever picture is being hashed (4). Decoders' own scratch (a progressive
/// JPEG's coefficients, up to 6) is freed before the first two exist.
pub const WORKING_BYTES_PER_PIXEL: u64 = 10;
/// More per pixel when the server's models embed the picture: its 8-bit RGB copy, kept while
/// the PDQ signals are computed.
pub const EMBEDDING_BYTES_PER_PIXEL: u64 = 3;
/// Fixed room per picture: the 64x64 and DCT buffers, band buffers, decoder state.
pub const WORKING_SLACK_BYTES: u64 = 1024 * 1024;
/// Permits are KiB, so that a `u32` reservation covers 4 TiB.
const UNIT: u64 = 1024;

/// The bytes a picture of `pixels` pixels whose decoded form is `decoded_bytes` holds at its
/// peak while it is hashed (and embedded, with `embeds`). Raw RGB frames pass 0 for
/// `decoded_bytes`: their pixels are the request's own.
pub fn decode_cost(decoded_bytes: u64, pixels: u64, embeds: bool) -> u64 {
    let per_pixel = WORKING_BYTES_PER_PIXEL + if embeds { EMBEDDING_BYTES_PER_PIXEL } else { 0 };
    decoded_bytes
        .saturating_add(pixels.saturating_mul(per_pixel))
        .saturating_add(WORKING_SLACK_BYTES)
}

/// The most one picture within `limits` can cost: what `--decode-memory` must hold at least, so
/// that every picture the limits accept can run.
pub fn worst_decode_cost(limits: &Limits, embeds: bool) -> u64 {
    let decoded = limits
        .max_decode_bytes
        .min(limits.max_pixels.saturating_mul(8));
    decode_cost(decoded, limits.max_pixels, embeds)
}

/// The memory decodes in flight may hold together.
#[derive(Clone, Debug)]
pub struct DecodeBudget {
    permits: Arc<Semaphore>,
    total: u64,
}

/// Bytes of the budget held by one job, returned when dropped.
#[derive(Debug)]
pub struct Reservation {
    _permit: Option<OwnedSemaphorePermit>,
}

impl DecodeBudget {
    /// A budget of `total` bytes (rounded down to whole KiB).
    pub fn new(total: u64) -> Self {
        let units = usize::try_from(total / UNIT)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(units)),
            total: total / UNIT * UNIT,
        }
    }

    /// Bytes of the budget reserved now.
    pub fn in_use(&self) -> u64 {
        let free = self.permits.available_permits() as u64 * UNIT;
        self.total.saturating_sub(free)
    }

    /// Waits until `cost` bytes are free and reserves them; a cost of 0 reserves nothing.
    ///
    /// # Errors
    /// [`Error::DecodeBudget`] when `cost` is more than the whole budget (it could never run),
    /// [`Error::ShuttingDown`] if the budget is closed.
    pub async fn reserve(&self, cost: u64, width: u32, height: u32) -> Result<Reservation, Error> {
        if cost == 0 {
            return Ok(Reservation { _permit: None });
        }
        let units = cost.div_ceil(UNIT);
        let too_big = || Error::DecodeBudget {
            width,
            height,
            needed: cost,
            budget: self.total,
        };
        if units.saturating_mul(UNIT) > self.total {
            return Err(too_big());
        }
        let units = u32::try_from(units).map_err(|_| too_big())?;
        let permit = Arc::clone(&self.permits)
            .acquire_many_owned(units)
            .await
            .map_err(|_| Error::ShuttingDown)?;
        Ok(Reservation {
            _permit: Some(permit),
        })
    }
}

/// What a frame's content will cost to hash: its header is read (no pixel decoded) and checked
/// against `limits`, so pictures over the per-image limits are refused here, before they queue.
/// Returns the cost with the picture's size, or 0 for content without pixels.
///
/// # Errors
/// The header's [`pdq::Error`]s.
pub fn cost_of(
    content: &Content,
    limits: &pdq::DecodeLimits,
    embeds: bool,
) -> Result<(u64, u32, u32), Error> {
    match content {
        Content::Image(bytes) => {
            let probe = pdq::probe_image(bytes, limits)?;
            Ok((
                decode_cost(probe.decoded_bytes, probe.pixels(), embeds),
                probe.width,
                probe.height,
            ))
        }
        Content::Rgb { width, height, .. } => Ok((
            decode_cost(0, u64::from(*width) * u64::from(*height), embeds),
            *width,
            *height,
        )),
        Content::Pdq { .. } | Content::Vectors => Ok((0, 0, 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_count_the_decoded_form_and_the_working_buffers() {
        // A 1080p 8-bit RGB frame: 6.2 MB decoded, 20.7 MB of working buffers.
        let pixels = 1920 * 1080;
        assert_eq!(
            decode_cost(pixels * 3, pixels, false),
            pixels * 13 + WORKING_SLACK_BYTES
        );
        assert_eq!(
            decode_cost(pixels * 3, pixels, true),
            pixels * 16 + WORKING_SLACK_BYTES
        );
        // The defaults: one picture at both limits fits the default budget.
        let limits = Limits::default();
        assert!(worst_decode_cost(&limits, true) <= limits.decode_memory);
    }

    #[tokio::test]
    async fn reservations_wait_for_room_and_refuse_what_never_fits() {
        let budget = DecodeBudget::new(10 * UNIT);
        let first = budget.reserve(6 * UNIT, 1, 1).await.expect("fits");
        assert_eq!(budget.in_use(), 6 * UNIT);
        // 5 KiB does not fit beside 6: it waits until the first is returned.
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(5 * UNIT, 1, 1).await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        waiting
            .await
            .expect("task")
            .expect("fits once room is free");
        let over = budget.reserve(11 * UNIT, 7071, 7071).await;
        assert!(
            matches!(over, Err(Error::DecodeBudget { needed, budget: 10240, .. }) if needed == 11 * UNIT)
        );
        assert_eq!(budget.in_use(), 0);
        budget.reserve(0, 0, 0).await.expect("nothing to reserve");
    }
}
