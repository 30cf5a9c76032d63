//! The end-to-end load generator behind `framematch bench` (issue #6 item 4): many concurrent
//! `MatchVideo` streams against a running server, at a fixed or maximal rate, with precomputed
//! hashes or with 720p JPEG frames for the server to hash.
//!
//! Each of [`LoadConfig::streams`] workers opens its own connection and runs one stream of
//! [`LoadConfig::frames_per_stream`] frames, or, with a [`LoadConfig::duration`], streams back to
//! back until the time is up (the stream in progress stops sending at the deadline and is drained).
//! A stream keeps at most [`LoadConfig::max_in_flight`] frames unanswered, so that "maximal rate"
//! measures the server rather than a queue of our own making.
//!
//! Per-frame latency is the time from handing a frame to the stream until its `FrameResult`
//! arrives. The server answers frames in the order they were sent (match.proto), so each stream
//! keeps its send instants in a FIFO and pops one per result. The server's CPU time comes from
//! `/proc/<pid>/stat` when its pid is given (Linux; clock ticks of 10 ms), read before and after.
//!
//! Everything is loopback-friendly and bounded: the test in tests/it/loadgen.rs runs a few dozen
//! frames and checks the counts, never the timings (STYLE.md §3.6: speed is measured in bench/).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{Semaphore, mpsc};

use crate::client::{ClientOptions, Connection, Connector};
use crate::hash::PdqHash;
use crate::pb;

/// Width of the JPEG frames sent with [`Payload::Jpeg`] made by [`jpeg_720p_frames`].
pub const JPEG_WIDTH: u32 = 1280;
/// Height of those frames.
pub const JPEG_HEIGHT: u32 = 720;
/// JPEG quality of those frames.
pub const JPEG_QUALITY: u8 = 85;
/// Clock ticks per second in `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// What each frame carries; frames cycle through the list.
#[derive(Clone, Debug)]
pub enum Payload {
    /// Precomputed PDQ hashes (the server only searches).
    Hashes(Vec<PdqHash>),
    /// Encoded images (the server decodes and hashes, then searches).
    Jpeg(Vec<Vec<u8>>),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::Hashes(h) => h.len(),
            Payload::Jpeg(j) => j.len(),
        }
    }

    fn frame(&self, frame_index: u32, timestamp_ms: u64, item: usize) -> pb::Frame {
        let signal = match self {
            Payload::Hashes(hashes) => {
                let hash = hashes.get(item % hashes.len().max(1)).copied();
                pb::frame::Signal::Pdq(pb::PdqSignal {
                    hash: hash.unwrap_or_default().as_bytes().to_vec(),
                    quality: 100,
                    variants: Vec::new(),
                    content: None,
                })
            }
            Payload::Jpeg(images) => pb::frame::Signal::Image(
                images
                    .get(item % images.len().max(1))
                    .cloned()
                    .unwrap_or_default(),
            ),
        };
        pb::Frame {
            embeddings: Vec::new(),
            frame_index,
            timestamp_ms,
            signal: Some(signal),
        }
    }
}

/// One load run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// The server and how to reach it (URL, API key, TLS).
    pub client: ClientOptions,
    /// Concurrent streams, each on its own connection.
    pub streams: usize,
    /// Frames per stream.
    pub frames_per_stream: u32,
    /// Frames per second per stream; `None` sends as fast as answers allow.
    pub rate: Option<f64>,
    /// Keep streaming (new streams back to back) until this much time has passed.
    pub duration: Option<Duration>,
    /// Most unanswered frames per stream.
    pub max_in_flight: usize,
    /// What the frames carry.
    pub payload: Payload,
    /// The server's process id, for its CPU time.
    pub server_pid: Option<u32>,
}

/// What a run measured.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Report {
    /// Streams opened.
    pub streams_opened: u64,
    /// Streams that ended with their summary.
    pub streams_completed: u64,
    /// Frames handed to streams.
    pub frames_sent: u64,
    /// `FrameResult`s received.
    pub frames_answered: u64,
    /// Answered frames with at least one match.
    pub frames_matched: u64,
    /// Streams that failed (connection or gRPC status), and frames left unanswered by them.
    pub errors: u64,
    /// Up to five error messages.
    pub error_samples: Vec<String>,
    /// Wall time of the run in seconds.
    pub elapsed_s: f64,
    /// Answered frames per second of wall time.
    pub frames_per_s: f64,
    /// Median per-frame latency in milliseconds.
    pub latency_p50_ms: f64,
    /// 99th percentile per-frame latency in milliseconds.
    pub latency_p99_ms: f64,
    /// Largest per-frame latency in milliseconds.
    pub latency_max_ms: f64,
    /// Server CPU seconds (user + system) over the run, when its pid was given.
    pub server_cpu_s: Option<f64>,
    /// Server CPU milliseconds per answered frame.
    pub server_cpu_ms_per_frame: Option<f64>,
}

impl Report {
    /// The report as a two-column markdown table.
    pub fn to_markdown(&self) -> String {
        let cpu = |v: Option<f64>, digits: usize| {
            v.map_or_else(
                || "n/a (pass --server-pid)".to_string(),
                |v| format!("{v:.digits$}"),
            )
        };
        let mut out = String::from("| measure | value |\n| --- | ---: |\n");
        let rows = [
            (
                "streams (opened / completed)",
                format!("{} / {}", self.streams_opened, self.streams_completed),
            ),
            (
                "frames (sent / answered / matched)",
                format!(
                    "{} / {} / {}",
                    self.frames_sent, self.frames_answered, self.frames_matched
                ),
            ),
            ("errors", self.errors.to_string()),
            ("elapsed s", format!("{:.2}", self.elapsed_s)),
            ("frames/s", format!("{:.0}", self.frames_per_s)),
            ("latency p50 ms", format!("{:.3}", self.latency_p50_ms)),
            ("latency p99 ms", format!("{:.3}", self.latency_p99_ms)),
            ("latency max ms", format!("{:.3}", self.latency_max_ms)),
            ("server CPU s", cpu(self.server_cpu_s, 2)),
            ("server CPU ms/frame", cpu(self.server_cpu_ms_per_frame, 3)),
        ];
        for (name, value) in rows {
            out.push_str(&format!("| {name} | {value} |\n"));
        }
        for sample in &self.error_samples {
            out.push_str(&format!("\nerror: {sample}"));
        }
        out
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is out of range.
    #[error("invalid load setting: {0}")]
    Invalid(String),
    /// The server URL, API key or TLS files cannot be used.
    #[error(transparent)]
    Client(#[from] crate::client::Error),
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An image could not be decoded or encoded.
    #[error("image {}: {source}", path.display())]
    Image {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: image::ImageError,
    },
}

/// `count` seeded random hashes (they match nothing real).
pub fn random_hashes(count: usize, seed: u64) -> Vec<PdqHash> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let mut bytes = [0u8; 32];
            rng.fill(&mut bytes);
            PdqHash::from_bytes(bytes)
        })
        .collect()
}

/// Hashes from a file of raw 32-byte records (such as `bench/data/queries.u8`).
///
/// # Errors
/// [`Error::Read`]; [`Error::Invalid`] when the file is empty or not a multiple of 32 bytes.
pub fn read_hashes(path: &Path) -> Result<Vec<PdqHash>, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.is_empty() || bytes.len() % 32 != 0 {
        return Err(Error::Invalid(format!(
            "{} is {} bytes, not a whole number of 32-byte hashes",
            path.display(),
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(32)
        .filter_map(|c| PdqHash::try_from_slice(c).ok())
        .collect())
}

/// 1280x720 JPEG frames, encoded once: the centre 16:9 crop of each image in `images`, scaled;
/// with no images, four seeded synthetic frames (gradients and boxes).
///
/// # Errors
/// [`Error::Read`] or [`Error::Image`] for an unreadable image.
pub fn jpeg_720p_frames(images: &[PathBuf]) -> Result<Vec<Vec<u8>>, Error> {
    let pictures: Vec<image::RgbImage> = if images.is_empty() {
        (0..4).map(synthetic_frame).collect()
    } else {
        images
            .iter()
            .map(|path| {
                let bytes = std::fs::read(path).map_err(|source| Error::Read {
                    path: path.clone(),
                    source,
                })?;
                let picture = image::load_from_memory(&bytes)
                    .map_err(|source| Error::Image {
                        path: path.clone(),
                        source,
                    })?
                    .to_rgb8();
                Ok(fit_720p(&picture))
            })
            .collect::<Result<_, Error>>()?
    };
    pictures
        .iter()
        .map(|picture| {
            let mut jpeg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, JPEG_QUALITY)
                .encode(
                    picture.as_raw(),
                    picture.width(),
                    picture.height(),
                    image::ExtendedColorType::Rgb8,
                )
                .map_err(|source| Error::Image {
                    path: PathBuf::from("<encoded frame>"),
                    source,
                })?;
            Ok(jpeg)
        })
        .collect()
}

/// The centre 16:9 crop of `picture`, scaled to 1280x720.
fn fit_720p(picture: &image::RgbImage) -> image::RgbImage {
    let (w, h) = (picture.width(), picture.height());
    let (cw, ch) = if u64::from(w) * 9 > u64::from(h) * 16 {
        ((h * 16 / 9).max(1), h)
    } else {
        (w, (w * 9 / 16).max(1))
    };
    let crop = image::imageops::crop_imm(picture, (w - cw) / 2, (h - ch) / 2, cw, ch).to_image();
    image::imageops::resize(
        &crop,
        JPEG_WIDTH,
        JPEG_HEIGHT,
        image::imageops::FilterType::Triangle,
    )
}

/// A deterministic picture with structure: diagonal gradients and a few filled boxes.
fn synthetic_frame(seed: u64) -> image::RgbImage {
    let mut rng = StdRng::seed_from_u64(seed);
    let boxes: Vec<(u32, u32, u32, u32, [u8; 3])> = (0..12)
        .map(|_| {
            let x = rng.random_range(0..JPEG_WIDTH - 100);
            let y = rng.random_range(0..JPEG_HEIGHT - 100);
            let w = rng.random_range(40..400).min(JPEG_WIDTH - x);
            let h = rng.random_range(40..300).min(JPEG_HEIGHT - y);
            (x, y, w, h, [rng.random(), rng.random(), rng.random()])
        })
        .collect();
    let phase = rng.random_range(0..256u32);
    image::RgbImage::from_fn(JPEG_WIDTH, JPEG_HEIGHT, |x, y| {
        for &(bx, by, bw, bh, rgb) in boxes.iter().rev() {
            if x >= bx && x < bx + bw && y >= by && y < by + bh {
                return image::Rgb(rgb);
            }
        }
        let v = ((x + y + phase) % 256) as u8;
        image::Rgb([
            v,
            (x * 255 / JPEG_WIDTH) as u8,
            (y * 255 / JPEG_HEIGHT) as u8,
        ])
    })
}

/// User plus system CPU seconds of process `pid`, from `/proc/<pid>/stat`.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses: state is field 3,
    // utime field 14 and stime field 15 (proc(5)).
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SECOND)
}

/// What one worker saw.
#[derive(Debug, Default)]
struct WorkerOutcome {
    opened: u64,
    completed: u64,
    sent: u64,
    answered: u64,
    matched: u64,
    errors: u64,
    error_samples: Vec<String>,
    latencies: Vec<Duration>,
}

/// Runs the load and reports.
///
/// # Errors
/// [`Error::Invalid`] for out-of-range settings, an empty payload or a malformed URL. Failures while streaming are counted in [`Report::errors`], not returned.
pub async fn run(config: &LoadConfig) -> Result<Report, Error> {
    if config.streams == 0 || config.frames_per_stream == 0 || config.max_in_flight == 0 {
        return Err(Error::Invalid(
            "streams, frames per stream and max in flight must be at least 1".into(),
        ));
    }
    if config.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(Error::Invalid("the rate must be a positive number".into()));
    }
    if config.payload.len() == 0 {
        return Err(Error::Invalid("no frames to send".into()));
    }
    let connector = Connector::new(&config.client)?;
    let payload = Arc::new(config.payload.clone());
    let cpu_before = config.server_pid.and_then(process_cpu_seconds);
    let started = Instant::now();
    let deadline = config.duration.map(|d| started + d);
    let mut workers = Vec::with_capacity(config.streams);
    for worker in 0..config.streams {
        let connector = connector.clone();
        let payload = Arc::clone(&payload);
        let config = config.clone();
        workers.push(tokio::spawn(async move {
            run_worker(worker, connector, payload, &config, deadline).await
        }));
    }
    let mut total = WorkerOutcome::default();
    for worker in workers {
        match worker.await {
            Ok(outcome) => {
                total.opened += outcome.opened;
                total.completed += outcome.completed;
                total.sent += outcome.sent;
                total.answered += outcome.answered;
                total.matched += outcome.matched;
                total.errors += outcome.errors;
                total.latencies.extend(outcome.latencies);
                for sample in outcome.error_samples {
                    if total.error_samples.len() < 5 {
                        total.error_samples.push(sample);
                    }
                }
            }
            Err(error) => {
                total.errors += 1;
                total
                    .error_samples
                    .push(format!("worker task failed: {error}"));
            }
        }
    }
    let elapsed = started.elapsed();
    let cpu_after = config.server_pid.and_then(process_cpu_seconds);
    total.latencies.sort_unstable();
    let percentile = |p: f64| -> f64 {
        let n = total.latencies.len();
        if n == 0 {
            return 0.0;
        }
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        total.latencies[rank.clamp(1, n) - 1].as_secs_f64() * 1000.0
    };
    let server_cpu_s = cpu_before.zip(cpu_after).map(|(b, a)| a - b);
    Ok(Report {
        streams_opened: total.opened,
        streams_completed: total.completed,
        frames_sent: total.sent,
        frames_answered: total.answered,
        frames_matched: total.matched,
        errors: total.errors,
        error_samples: total.error_samples,
        elapsed_s: elapsed.as_secs_f64(),
        frames_per_s: total.answered as f64 / elapsed.as_secs_f64().max(1e-9),
        latency_p50_ms: percentile(50.0),
        latency_p99_ms: percentile(99.0),
        latency_max_ms: total
            .latencies
            .last()
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        server_cpu_ms_per_frame: server_cpu_s
            .filter(|_| total.answered > 0)
            .map(|s| s * 1000.0 / total.answered as f64),
        server_cpu_s,
    })
}

impl WorkerOutcome {
    /// Counts an error, keeping its message if fewer than five are kept.
    fn error(&mut self, message: String) {
        self.errors += 1;
        if self.error_samples.len() < 5 {
            self.error_samples.push(message);
        }
    }
}

/// One connection; one stream, or streams back to back until the deadline.
async fn run_worker(
    worker: usize,
    connector: Connector,
    payload: Arc<Payload>,
    config: &LoadConfig,
    deadline: Option<Instant>,
) -> WorkerOutcome {
    let mut outcome = WorkerOutcome::default();
    let channel = match connector.connect().await {
        Ok(channel) => channel,
        Err(error) => {
            outcome.error(error.to_string());
            return outcome;
        }
    };
    let client = pb::matcher_client::MatcherClient::new(channel)
        .max_encoding_message_size(64 * 1024 * 1024)
        .max_decoding_message_size(64 * 1024 * 1024);
    // Workers start at different places in the payload, so streams differ.
    let mut item = worker * 7919;
    loop {
        outcome.opened += 1;
        run_stream(
            client.clone(),
            &payload,
            config,
            deadline,
            &mut item,
            &mut outcome,
        )
        .await;
        let more = deadline.is_some_and(|d| Instant::now() < d);
        if !more {
            return outcome;
        }
    }
}

async fn run_stream(
    mut client: pb::matcher_client::MatcherClient<Connection>,
    payload: &Arc<Payload>,
    config: &LoadConfig,
    deadline: Option<Instant>,
    item: &mut usize,
    outcome: &mut WorkerOutcome,
) {
    let (tx, rx) = mpsc::channel::<pb::MatchRequest>(config.max_in_flight);
    let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
    let sent_at: Arc<parking_lot::Mutex<VecDeque<Instant>>> = Arc::default();
    let frames = config.frames_per_stream;
    let first_item = *item;
    *item = item.wrapping_add(frames as usize);
    let sender = {
        let payload = Arc::clone(payload);
        let in_flight = Arc::clone(&in_flight);
        let sent_at = Arc::clone(&sent_at);
        let rate = config.rate;
        tokio::spawn(async move {
            let mut ticker = rate.map(|r| {
                let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            let frame_ms = rate.map_or(33.0, |r| 1000.0 / r);
            let mut sent = 0u64;
            for i in 0..frames {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                if let Some(ticker) = ticker.as_mut() {
                    ticker.tick().await;
                }
                let Ok(permit) = in_flight.acquire().await else {
                    break;
                };
                permit.forget();
                let frame = payload.frame(
                    i,
                    (f64::from(i) * frame_ms) as u64,
                    first_item.wrapping_add(i as usize),
                );
                let request = pb::MatchRequest {
                    options: None,
                    frame: Some(frame),
                };
                sent_at.lock().push_back(Instant::now());
                if tx.send(request).await.is_err() {
                    sent_at.lock().pop_back();
                    break;
                }
                sent += 1;
            }
            sent
        })
    };
    let stream = client
        .match_video(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let mut answered = 0u64;
    let mut result = match stream {
        Ok(response) => {
            let mut responses = response.into_inner();
            loop {
                match responses.message().await {
                    Ok(Some(pb::MatchResponse {
                        result: Some(pb::match_response::Result::Frame(frame)),
                    })) => {
                        if let Some(at) = sent_at.lock().pop_front() {
                            outcome.latencies.push(at.elapsed());
                        }
                        in_flight.add_permits(1);
                        answered += 1;
                        outcome.matched += u64::from(!frame.matches.is_empty());
                    }
                    Ok(Some(pb::MatchResponse {
                        result: Some(pb::match_response::Result::Summary(_)),
                    })) => break Ok(true),
                    Ok(Some(_)) => {}
                    Ok(None) => break Ok(false),
                    Err(status) => break Err(format!("{:?}: {}", status.code(), status.message())),
                }
            }
        }
        Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
    };
    // The sender ends once every frame is out or the stream is gone (its channel closes).
    in_flight.close();
    let sent = match sender.await {
        Ok(sent) => sent,
        Err(error) => {
            result = Err(format!("sender task failed: {error}"));
            0
        }
    };
    outcome.sent += sent;
    outcome.answered += answered;
    match result {
        Ok(true) if answered == sent => outcome.completed += 1,
        Ok(true) => outcome.error(format!(
            "stream ended with {answered} of {sent} frames answered"
        )),
        Ok(false) => outcome.error("stream ended without a summary".to_string()),
        Err(message) => outcome.error(message),
    }
}
