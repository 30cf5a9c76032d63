//! PDQ hashing speed per frame (issue #6 item 6): 1080p, 720p and 360p frames rendered from a
//! conformance photo (`bench/dataset.rs`), hashed from packed RGB (`pdq::hash_rgb`) and from JPEG
//! bytes at quality 85 (`pdq::hash_image_bytes`: decode plus hash), on one core; and 720p from RGB
//! with two frames hashed at once on two threads (the per-frame cost when a stream's frames
//! use both cores).
//!
//! ```text
//! cargo bench --bench hashing            # criterion, then a table of medians
//! cargo bench --bench hashing -- 720p    # a criterion filter
//! ```
//!
//! The reference (Meta's C++ PDQ on this machine, issue #6): 12 ms per 720p frame, 8.5 ms without
//! its luma conversion. Criterion keeps its data in `bench/data/criterion`.

#![allow(clippy::print_stdout, missing_docs)]

#[path = "dataset.rs"]
mod dataset;

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{Criterion, Throughput};
use framematch::hash::pdq::{self, DecodeLimits};
use image::RgbImage;

const SIZES: [(&str, u32, u32); 3] = [
    ("1080p", 1920, 1080),
    ("720p", 1280, 720),
    ("360p", 640, 360),
];
const REFERENCE_720P_MS: f64 = 12.0;
const REFERENCE_720P_NO_LUMA_MS: f64 = 8.5;

fn frame(width: u32, height: u32) -> RgbImage {
    let path = dataset::photo_dir().join("bridge-1-original.jpg");
    let photo = image::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    // A 16:9 window of the photo, as a video frame would frame it.
    let w = f64::from(photo.width());
    let h = (w * 9.0 / 16.0).min(f64::from(photo.height()));
    dataset::render(&photo, (0.0, 0.0, w, h), width, height)
}

fn output_dir() -> PathBuf {
    dataset::data_dir().join("criterion")
}

fn benches(c: &mut Criterion) {
    let limits = DecodeLimits::default();
    let mut group = c.benchmark_group("pdq");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(6));
    for (name, width, height) in SIZES {
        let picture = frame(width, height);
        let jpeg = dataset::encode_jpeg(&picture, 85);
        group.bench_function(format!("rgb_{name}"), |b| {
            b.iter(|| pdq::hash_rgb(width, height, black_box(picture.as_raw())).map(|o| o.hash()))
        });
        group.bench_function(format!("jpeg_{name}"), |b| {
            b.iter(|| pdq::hash_image_bytes(black_box(&jpeg), &limits).map(|o| o.hash()))
        });
        group.bench_function(format!("jpeg_decode_only_{name}"), |b| {
            b.iter(|| pdq::decode_image(black_box(&jpeg), &limits).map(|i| i.width()))
        });
        if name == "720p" {
            // Two frames per iteration on two threads: the time per frame is half of it.
            group.throughput(Throughput::Elements(2));
            group.bench_function("rgb_720p_2_threads_2_frames", |b| {
                b.iter(|| {
                    std::thread::scope(|s| {
                        let a = s.spawn(|| pdq::hash_rgb(width, height, picture.as_raw()).is_ok());
                        let b = s.spawn(|| pdq::hash_rgb(width, height, picture.as_raw()).is_ok());
                        a.join().is_ok() && b.join().is_ok()
                    })
                })
            });
            group.throughput(Throughput::Elements(1));
        }
    }
    group.finish();
}

/// Median of one benchmark in nanoseconds, from criterion's estimates.json.
fn median_ns(dir: &Path, id: &str) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join("pdq").join(id).join("new/estimates.json")).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value["median"]["point_estimate"].as_f64()
}

fn main() {
    let mut c = Criterion::default()
        .output_directory(&output_dir())
        .configure_from_args();
    benches(&mut c);
    c.final_summary();
    let dir = output_dir();
    println!("\nPDQ per frame, one core, medians (criterion):\n");
    println!("| frame | from RGB ms | from JPEG ms (decode + hash) | JPEG decode alone ms |");
    println!("| --- | ---: | ---: | ---: |");
    let ms =
        |id: String| median_ns(&dir, &id).map_or("-".to_string(), |ns| format!("{:.2}", ns / 1e6));
    for (name, _, _) in SIZES {
        println!(
            "| {name} | {} | {} | {} |",
            ms(format!("rgb_{name}")),
            ms(format!("jpeg_{name}")),
            ms(format!("jpeg_decode_only_{name}"))
        );
    }
    if let Some(rgb) = median_ns(&dir, "rgb_720p") {
        let rgb_ms = rgb / 1e6;
        println!(
            "\n720p from RGB: {rgb_ms:.2} ms = {:.2}x faster than the reference's {REFERENCE_720P_MS} ms \
             ({:.2}x its {REFERENCE_720P_NO_LUMA_MS} ms without luma); target >= 1.5x.",
            REFERENCE_720P_MS / rgb_ms,
            REFERENCE_720P_NO_LUMA_MS / rgb_ms
        );
    }
    if let Some(two) = median_ns(&dir, "rgb_720p_2_threads_2_frames") {
        println!(
            "720p from RGB, 2 frames on 2 threads: {:.2} ms per frame of wall time.",
            two / 2e6
        );
    }
}
