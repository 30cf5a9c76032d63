//! Embedding cost per frame in the server (issue #11 item 7, last sentence): decode (JPEG bytes to
//! RGB), resize to the model's input and the model itself, each timed apart, for both SSCD models,
//! one frame at a time on one single-threaded ONNX Runtime session, over the same 20 real frames:
//! 12 conformance JPEGs and 8 frames `ffmpeg` extracts from the vPDQ conformance videos. The
//! stages are the server's own functions, in the order its match path calls them
//! (`src/api/mod.rs`): `hash::pdq::decode_image` then `to_rgb8`, `embed::resize` (what
//! `OnnxModel::embed` does first) and `OnnxModel::embed_resized`.
//!
//! ```text
//! eval "$(.ci/fetch-models)"
//! cargo bench --bench embedding                      # both models, 10 timed runs per frame
//! python3 bench/embedding_python.py                  # the same frames through Python
//! ```
//!
//! The frames are written to `target/embedding-bench/` with their list (`frames.txt`), which
//! `bench/embedding_python.py` reads so both time the very same files. Environment:
//! `FRAMEMATCH_EMBEDDING_MODEL` (sscd.onnx; sscd_distilled.onnx beside it), `ORT_DYLIB_PATH`,
//! `EMBEDDING_BENCH_RUNS` (default 10; one untimed warm-up run first).
//! Reported: for each model and stage, the median over all frames and runs, in ms; the total is
//! the median of the per-run sums.

#![allow(clippy::print_stdout, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use framematch::embed::{DEFAULT_INPUT, DEFAULT_THRESHOLD, ModelConfig, OnnxModel, resize};
use framematch::hash::pdq::{self, DecodeLimits};

/// The conformance photos used: natural-looking JPEGs, 256x256 to 1600x1004.
const PHOTOS: [&str; 12] = [
    "bridge-1-original.jpg",
    "RGB.jpg",
    "blur-a-lot.jpg",
    "high-contrast.jpg",
    "sharpen-a-lot.jpg",
    "shrink-a-little.jpg",
    "q0003.jpg",
    "q0122.jpg",
    "q0291.jpg",
    "q0746.jpg",
    "q2821.jpg",
    "square-512x512.jpg",
];

/// The video frames: which conformance video, at which second (480x720, 1280x720, 720x1280).
const VIDEO_FRAMES: [(&str, &str); 8] = [
    ("chair-19-sd-bar.mp4", "2"),
    ("chair-19-sd-bar.mp4", "12"),
    ("chair-22-sd-sepia-bar.mp4", "6"),
    ("chair-22-sd-sepia-bar.mp4", "18"),
    ("doorknob-hd-no-bar.mp4", "1"),
    ("doorknob-hd-no-bar.mp4", "3"),
    ("pattern-hd-no-bar.mp4", "2"),
    ("pattern-hd-no-bar.mp4", "5"),
];

fn conformance() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance")
}

fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/embedding-bench");
    std::fs::create_dir_all(&dir).expect("create target/embedding-bench");
    dir
}

/// The frames' paths: the photos as they are, the video frames extracted once (JPEG, ffmpeg's
/// `-q:v 2`), and their list written to `frames.txt`.
fn frames(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = PHOTOS
        .iter()
        .map(|name| conformance().join("pdq").join(name))
        .collect();
    for (video, second) in VIDEO_FRAMES {
        let stem = video.trim_end_matches(".mp4");
        let out = dir.join(format!("{stem}-{second}s.jpg"));
        if !out.is_file() {
            let status = Command::new("ffmpeg")
                .args(["-v", "error", "-y", "-ss", second, "-i"])
                .arg(conformance().join("vpdq").join(video))
                .args(["-frames:v", "1", "-q:v", "2"])
                .arg(&out)
                .status()
                .expect("ffmpeg runs");
            assert!(status.success(), "ffmpeg failed on {video} at {second}s");
        }
        paths.push(out);
    }
    let list: String = paths.iter().map(|p| format!("{}\n", p.display())).collect();
    std::fs::write(dir.join("frames.txt"), list).expect("write frames.txt");
    paths
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Per stage, every (frame, run) time in ms: decode, resize, model, total.
fn time_model(model: &OnnxModel, jpegs: &[Vec<u8>], runs: usize) -> [Vec<f64>; 4] {
    let limits = DecodeLimits::default();
    let mut times: [Vec<f64>; 4] = Default::default();
    for run in 0..=runs {
        for bytes in jpegs {
            let t0 = Instant::now();
            let rgb = pdq::decode_image(bytes, &limits)
                .expect("decodes")
                .to_rgb8();
            let decode = ms(t0);
            let t1 = Instant::now();
            let resized = resize(&rgb, DEFAULT_INPUT);
            let resize_ms = ms(t1);
            let t2 = Instant::now();
            let vector = model.embed_resized(resized.as_raw()).expect("embeds");
            let model_ms = ms(t2);
            std::hint::black_box(vector);
            if run > 0 {
                for (stage, value) in times.iter_mut().zip([
                    decode,
                    resize_ms,
                    model_ms,
                    decode + resize_ms + model_ms,
                ]) {
                    stage.push(value);
                }
            }
        }
    }
    times
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument picks one model.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let sscd = std::env::var_os("FRAMEMATCH_EMBEDDING_MODEL")
        .map(PathBuf::from)
        .expect("set FRAMEMATCH_EMBEDDING_MODEL and ORT_DYLIB_PATH: eval \"$(.ci/fetch-models)\"");
    let runtime = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .expect("set ORT_DYLIB_PATH: eval \"$(.ci/fetch-models)\"");
    let runs: usize = std::env::var("EMBEDDING_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dir = out_dir();
    let paths = frames(&dir);
    let jpegs: Vec<Vec<u8>> = paths
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect();
    let models_dir = sscd.parent().expect("a directory").to_path_buf();
    println!(
        "{} frames ({} photos, {} video frames), {runs} timed runs each after one warm-up, \
         input {DEFAULT_INPUT}, one single-threaded session\n",
        paths.len(),
        PHOTOS.len(),
        paths.len() - PHOTOS.len()
    );
    println!("| model | decode ms | resize ms | model ms | total ms |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for name in ["sscd", "sscd_distilled"] {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let model = OnnxModel::open(&ModelConfig {
            space: name.to_string(),
            model: models_dir.join(format!("{name}.onnx")),
            runtime: runtime.clone(),
            input: DEFAULT_INPUT,
            threshold: DEFAULT_THRESHOLD,
            sessions: 1,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let mut times = time_model(&model, &jpegs, runs);
        let [d, r, m, t] = times.each_mut().map(|v| median(v));
        println!("| {name} | {d:.2} | {r:.2} | {m:.2} | {t:.2} |");
    }
    println!(
        "\nThe same frames through ONNX Runtime from Python (PIL decode, BILINEAR resize):\n  \
         python3 bench/embedding_python.py --frames {} --models-dir {} --runs {runs}",
        dir.join("frames.txt").display(),
        models_dir.display()
    );
}
