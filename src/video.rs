//! Video decoding with the real FFmpeg, and vPDQ hashing of the decoded frames (shared/PDQ.md §2.1).
//!
//! FFmpeg runs as a subprocess: `ffprobe` reads the first video stream's size and frame rate, then
//! `ffmpeg` decodes that stream and pipes packed RGB24 frames at native size, every decoded frame
//! exactly once (`-fps_mode passthrough`: no frame-rate conversion), in decoder output order.
//! Hashing those frames with [`crate::hash::pdq`] reproduces the reference `vpdq-hash-video` run
//! against the same FFmpeg bit for bit: its swscale conversion and FFmpeg's own are the same
//! unscaled YUV→RGB24 path.
//!
//! vPDQ's frame selection, kept exactly:
//! * `fps` is the stream's `avg_frame_rate`, else its `r_frame_rate`, as a double `num / den`;
//! * `step = (int)(seconds_per_hash × fps)`, 0 becoming 1, and frame `index` (0-based, decoder
//!   order) is hashed when `index % step == 0`;
//! * `timestamp = (float)index / (float)fps`, a float32 division, not the packet time.
//!
//! When `step > 1` FFmpeg itself drops the other frames (`select=not(mod(n\,step))`, whose `n` is
//! that same decoder-order counter) before the RGB conversion, so 1-fps sampling of a 30 fps
//! video converts and pipes a thirtieth of the pixels. The filter graph is never rebuilt
//! (`-reinit_filter 0`, so `n` never restarts) and ends in a scale to the probed size, a no-op
//! for frames of that size: a stream that changes size midway still yields whole frames.
//!
//! Invariants: a child process is always reaped (killed first when the reader stops early);
//! nothing here panics on a bad or hostile file: every failure is an [`Error`].

use std::io::{ErrorKind, Read};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use serde::Deserialize;

use crate::hash::PdqHash;
use crate::hash::vpdq::{Vpdq, VpdqFeature};
use crate::hash::{border, pdq};

/// Largest frame accepted, in pixels (width × height): 8K UHD is 33 MP. Bounds the frame buffers.
pub const MAX_FRAME_PIXELS: u64 = 50_000_000;

/// How many bytes of FFmpeg's stderr an error keeps.
const STDERR_TAIL_BYTES: usize = 2048;

// === impl Error ===

/// Why a video could not be decoded or hashed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be read at all.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `ffmpeg` or `ffprobe` is not installed (or not on `PATH`).
    #[error("{program} not found: install ffmpeg (for example `apt-get install ffmpeg`)")]
    ToolMissing {
        /// The program that could not be started.
        program: PathBuf,
    },
    /// `ffmpeg` or `ffprobe` could not be started for another reason.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// ffprobe could not make sense of the file.
    #[error("{path} is not a video: {detail}")]
    NotAVideo {
        /// The file.
        path: PathBuf,
        /// ffprobe's last words.
        detail: String,
    },
    /// The file has no video stream (audio only, for example).
    #[error("{path} has no video stream")]
    NoVideoStream {
        /// The file.
        path: PathBuf,
    },
    /// The video stream's size is missing, zero, or beyond [`MAX_FRAME_PIXELS`].
    #[error(
        "{path}: video is {width}x{height} pixels, sides must be 1 or more and at most {limit} pixels in all"
    )]
    BadSize {
        /// The file.
        path: PathBuf,
        /// Stated width.
        width: u32,
        /// Stated height.
        height: u32,
        /// [`MAX_FRAME_PIXELS`].
        limit: u64,
    },
    /// Neither `avg_frame_rate` nor `r_frame_rate` is a positive rate.
    #[error(
        "{path}: frame rate is zero or unknown (avg_frame_rate {avg:?}, r_frame_rate {real:?})"
    )]
    NoFrameRate {
        /// The file.
        path: PathBuf,
        /// ffprobe's `avg_frame_rate`.
        avg: String,
        /// ffprobe's `r_frame_rate`.
        real: String,
    },
    /// `seconds_per_hash` is negative or not a number.
    #[error("seconds per hash must be a finite number of 0 or more, got {0}")]
    Sampling(f64),
    /// ffprobe's output is not the JSON asked for.
    #[error("cannot read ffprobe's output for {path}: {source}")]
    ProbeOutput {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// ffmpeg exited with an error.
    #[error("ffmpeg failed on {path} ({status}): {stderr_tail}")]
    Ffmpeg {
        /// The file.
        path: PathBuf,
        /// Its exit status.
        status: ExitStatus,
        /// The end of its stderr.
        stderr_tail: String,
    },
    /// ffmpeg's output ended inside a frame.
    #[error("{path}: frame {frame_index} is truncated: {got} of {expected} bytes")]
    TruncatedFrame {
        /// The file.
        path: PathBuf,
        /// Index of the incomplete frame.
        frame_index: u64,
        /// Bytes received.
        got: usize,
        /// width × height × 3.
        expected: usize,
    },
    /// Reading ffmpeg's output failed.
    #[error("reading ffmpeg's output for {path}: {source}")]
    Pipe {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A decoded frame could not be hashed (a bug: sizes are checked up front).
    #[error("{path}: frame {frame_index} could not be hashed: {source}")]
    Hash {
        /// The file.
        path: PathBuf,
        /// The frame.
        frame_index: u64,
        /// Why.
        #[source]
        source: pdq::Error,
    },
}

// === impl Tools ===

/// Where the FFmpeg programs are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    /// The `ffmpeg` program (looked up on `PATH` when it has no directory).
    pub ffmpeg: PathBuf,
    /// The `ffprobe` program.
    pub ffprobe: PathBuf,
}

impl Default for Tools {
    /// `ffmpeg` and `ffprobe` from `PATH`.
    fn default() -> Self {
        Self {
            ffmpeg: PathBuf::from("ffmpeg"),
            ffprobe: PathBuf::from("ffprobe"),
        }
    }
}

// === impl SamplingOptions ===

/// Which frames are hashed (vPDQ's `secondsPerHash`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingOptions {
    /// One hash every this many seconds: the step is `(int)(seconds_per_hash × fps)`, at least 1.
    /// 0 hashes every frame.
    pub seconds_per_hash: f64,
    /// Hash every frame whatever `seconds_per_hash` says.
    pub every_frame: bool,
}

impl Default for SamplingOptions {
    /// One hash per second, as python-threatexchange and HMA do.
    fn default() -> Self {
        Self {
            seconds_per_hash: 1.0,
            every_frame: false,
        }
    }
}

impl SamplingOptions {
    /// The frame step for a stream of `fps` frames per second.
    ///
    /// # Errors
    /// [`Error::Sampling`] when `seconds_per_hash` is negative or not finite.
    pub fn step(&self, fps: f64) -> Result<u64, Error> {
        if !self.seconds_per_hash.is_finite() || self.seconds_per_hash < 0.0 {
            return Err(Error::Sampling(self.seconds_per_hash));
        }
        if self.every_frame {
            return Ok(1);
        }
        // C++ `static_cast<int>`: truncation toward zero; `as` saturates instead of overflowing.
        let step = (self.seconds_per_hash * fps) as u64;
        Ok(step.max(1))
    }
}

// === impl VideoInfo ===

/// What ffprobe says about a file's first video stream.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoInfo {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Frames per second: `avg_frame_rate`, else `r_frame_rate`.
    pub fps: f64,
    /// The container's frame count, when it states one. An estimate: edit lists can make the
    /// decoder output fewer.
    pub frame_count: Option<u64>,
}

#[derive(Deserialize)]
struct ProbeOutput {
    #[serde(default)]
    streams: Vec<ProbeStream>,
}

#[derive(Deserialize)]
struct ProbeStream {
    width: Option<u32>,
    height: Option<u32>,
    #[serde(default)]
    avg_frame_rate: String,
    #[serde(default)]
    r_frame_rate: String,
    nb_frames: Option<String>,
}

/// `"30000/1001"` as a double division, as the reference computes it; `None` unless positive.
fn parse_rate(text: &str) -> Option<f64> {
    let (num, den) = text.split_once('/')?;
    let num: i64 = num.trim().parse().ok()?;
    let den: i64 = den.trim().parse().ok()?;
    if num <= 0 || den <= 0 {
        return None;
    }
    Some(num as f64 / den as f64)
}

/// Reads the size and frame rate of `path`'s first video stream with ffprobe.
///
/// # Errors
/// [`Error::Read`] when the file cannot be opened, [`Error::ToolMissing`] / [`Error::Spawn`],
/// [`Error::NotAVideo`] when ffprobe rejects it, [`Error::ProbeOutput`], [`Error::NoVideoStream`],
/// [`Error::BadSize`], [`Error::NoFrameRate`].
pub fn probe(tools: &Tools, path: &Path) -> Result<VideoInfo, Error> {
    // Our own check first, for a plain "no such file" rather than ffprobe's wording.
    std::fs::File::open(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let output = Command::new(&tools.ffprobe)
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=width,height,avg_frame_rate,r_frame_rate,nb_frames",
            "-of",
            "json",
        ])
        .arg(file_url(path))
        .stdin(Stdio::null())
        .output()
        .map_err(|source| spawn_error(&tools.ffprobe, source))?;
    if !output.status.success() {
        // ffprobe names the input as given; drop that echo of our own `file:` URL.
        let url = file_url(path).to_string_lossy().into_owned();
        let detail = tail(&output.stderr).replace(&format!("{url}: "), "");
        return Err(Error::NotAVideo {
            path: path.to_path_buf(),
            detail: if detail.is_empty() {
                format!("ffprobe {}", output.status)
            } else {
                detail
            },
        });
    }
    let parsed: ProbeOutput =
        serde_json::from_slice(&output.stdout).map_err(|source| Error::ProbeOutput {
            path: path.to_path_buf(),
            source,
        })?;
    let stream = parsed
        .streams
        .into_iter()
        .next()
        .ok_or_else(|| Error::NoVideoStream {
            path: path.to_path_buf(),
        })?;
    let (width, height) = (stream.width.unwrap_or(0), stream.height.unwrap_or(0));
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 || pixels > MAX_FRAME_PIXELS {
        return Err(Error::BadSize {
            path: path.to_path_buf(),
            width,
            height,
            limit: MAX_FRAME_PIXELS,
        });
    }
    let fps = parse_rate(&stream.avg_frame_rate)
        .or_else(|| parse_rate(&stream.r_frame_rate))
        .ok_or_else(|| Error::NoFrameRate {
            path: path.to_path_buf(),
            avg: stream.avg_frame_rate.clone(),
            real: stream.r_frame_rate.clone(),
        })?;
    Ok(VideoInfo {
        width,
        height,
        fps,
        frame_count: stream
            .nb_frames
            .and_then(|n| n.parse().ok())
            .filter(|n| *n > 0),
    })
}

/// `file:PATH`, so FFmpeg never reads a path as a protocol (`pipe:`, `concat:`, `http:`…).
fn file_url(path: &Path) -> std::ffi::OsString {
    let mut url = std::ffi::OsString::from("file:");
    url.push(path.as_os_str());
    url
}

fn spawn_error(program: &Path, source: std::io::Error) -> Error {
    if source.kind() == ErrorKind::NotFound {
        Error::ToolMissing {
            program: program.to_path_buf(),
        }
    } else {
        Error::Spawn {
            program: program.to_path_buf(),
            source,
        }
    }
}

/// The last few lines of a tool's stderr, trimmed, on one line.
fn tail(stderr: &[u8]) -> String {
    let start = stderr.len().saturating_sub(STDERR_TAIL_BYTES);
    let text = String::from_utf8_lossy(stderr.get(start..).unwrap_or_default());
    text.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

// === impl FrameReader ===

/// One selected frame's place in the video.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FramePosition {
    /// 0-based index in decoder output order.
    pub frame_index: u64,
    /// `(float)frame_index / (float)fps`, in seconds.
    pub timestamp_s: f32,
}

/// Reads the frames vPDQ selects from a running `ffmpeg`, one packed RGB24 buffer at a time.
///
/// Dropping it before the end kills and reaps ffmpeg.
#[derive(Debug)]
pub struct FrameReader {
    path: PathBuf,
    info: VideoInfo,
    step: u64,
    frame_bytes: usize,
    child: Child,
    stdout: Option<ChildStdout>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    ordinal: u64,
    finished: bool,
}

impl FrameReader {
    /// Probes `path` and starts ffmpeg on its first video stream.
    ///
    /// # Errors
    /// Everything [`probe`] returns, [`Error::Sampling`], and [`Error::ToolMissing`] /
    /// [`Error::Spawn`] for ffmpeg.
    pub fn open(tools: &Tools, path: &Path, sampling: &SamplingOptions) -> Result<Self, Error> {
        let info = probe(tools, path)?;
        let step = sampling.step(info.fps)?;
        // Checked in `probe`: at most MAX_FRAME_PIXELS · 3 bytes, which fits any usize ≥ 32 bits.
        let frame_bytes = usize::try_from(u64::from(info.width) * u64::from(info.height) * 3)
            .map_err(|_| Error::BadSize {
                path: path.to_path_buf(),
                width: info.width,
                height: info.height,
                limit: MAX_FRAME_PIXELS,
            })?;
        let mut command = Command::new(&tools.ffmpeg);
        command
            // One filter graph for the whole stream: a rebuilt graph would restart `select`'s `n`.
            .args([
                "-nostdin",
                "-hide_banner",
                "-v",
                "error",
                "-reinit_filter",
                "0",
                "-i",
            ])
            .arg(file_url(path))
            .args(["-map", "0:v:0"]);
        // Every frame comes out at the probed size, so the pipe stays frame-aligned even if the
        // stream changes size midway; such frames are scaled with SWS_AREA, the reference's flag.
        // Frames already at that size pass the scale filter untouched.
        let scale = format!("scale={}:{}:flags=area", info.width, info.height);
        let filters = if step > 1 {
            // `n` counts the frames entering the filter graph: the decoder's output order.
            format!("select=not(mod(n\\,{step})),{scale}")
        } else {
            scale
        };
        command
            .args(["-vf", &filters])
            .args([
                "-fps_mode",
                "passthrough",
                "-f",
                "rawvideo",
                "-pix_fmt",
                "rgb24",
                "-",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|source| spawn_error(&tools.ffmpeg, source))?;
        let stdout = child.stdout.take();
        // Drained on its own thread, so a chatty ffmpeg never blocks on a full stderr pipe.
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut kept = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match pipe.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            kept.extend_from_slice(chunk.get(..n).unwrap_or_default());
                            if kept.len() > 4 * STDERR_TAIL_BYTES {
                                kept.drain(..kept.len() - STDERR_TAIL_BYTES);
                            }
                        }
                    }
                }
                kept
            })
        });
        Ok(Self {
            path: path.to_path_buf(),
            info,
            step,
            frame_bytes,
            child,
            stdout,
            stderr,
            ordinal: 0,
            finished: false,
        })
    }

    /// The probed stream.
    pub fn info(&self) -> &VideoInfo {
        &self.info
    }

    /// Every `step`-th decoded frame is returned.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Bytes in one frame: width × height × 3.
    pub fn frame_bytes(&self) -> usize {
        self.frame_bytes
    }

    /// How many selected frames a video of `decoded` frames yields: ⌈decoded / step⌉.
    pub fn selected_count(&self, decoded: u64) -> u64 {
        decoded.div_ceil(self.step)
    }

    /// Reads the next selected frame into `rgb` (resized to [`FrameReader::frame_bytes`]), or
    /// returns `None` once ffmpeg has ended cleanly.
    ///
    /// # Errors
    /// [`Error::Ffmpeg`] when ffmpeg exits with an error (with its stderr),
    /// [`Error::TruncatedFrame`] when its output ends inside a frame, [`Error::Pipe`].
    pub fn next_frame(&mut self, rgb: &mut Vec<u8>) -> Result<Option<FramePosition>, Error> {
        if self.finished {
            return Ok(None);
        }
        rgb.resize(self.frame_bytes, 0);
        let Some(stdout) = self.stdout.as_mut() else {
            return self.finish(0).map(|()| None);
        };
        let mut got = 0;
        while got < self.frame_bytes {
            let Some(unfilled) = rgb.get_mut(got..) else {
                break;
            };
            match stdout.read(unfilled) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(Error::Pipe {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        }
        if got < self.frame_bytes {
            return self.finish(got).map(|()| None);
        }
        let frame_index = self.ordinal.saturating_mul(self.step);
        self.ordinal += 1;
        Ok(Some(FramePosition {
            frame_index,
            // vPDQ's float32 division (hasher.h: `static_cast<float>(frameNumber) / framerate`).
            timestamp_s: frame_index as f32 / self.info.fps as f32,
        }))
    }

    /// End of output: reaps ffmpeg and turns its exit status, or a partial frame, into a result.
    fn finish(&mut self, partial: usize) -> Result<(), Error> {
        self.finished = true;
        self.stdout = None;
        let status = self.child.wait().map_err(|source| Error::Pipe {
            path: self.path.clone(),
            source,
        })?;
        let stderr = self
            .stderr
            .take()
            .and_then(|handle| handle.join().ok())
            .unwrap_or_default();
        if !status.success() {
            return Err(Error::Ffmpeg {
                path: self.path.clone(),
                status,
                stderr_tail: tail(&stderr),
            });
        }
        if partial > 0 {
            return Err(Error::TruncatedFrame {
                path: self.path.clone(),
                frame_index: self.ordinal.saturating_mul(self.step),
                got: partial,
                expected: self.frame_bytes,
            });
        }
        Ok(())
    }
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        if !self.finished {
            // Our own child, by handle: stop it and reap it so no zombie is left.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// === hashing ===

/// One hashed video frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoFrame {
    /// 0-based index in decoder output order.
    pub frame_index: u64,
    /// `(float)frame_index / (float)fps`, in seconds.
    pub timestamp_s: f32,
    /// The frame's PDQ hash.
    pub hash: PdqHash,
    /// PDQ quality, 0..=100.
    pub quality: u8,
    /// All eight dihedral variants, in [`pdq::Dihedral::ALL`] order, when asked for.
    pub variants: Option<[PdqHash; 8]>,
    /// The PDQ of the frame's content area when it has uniform borders (letterbox or pillarbox
    /// bars), with its variants when asked for. Not part of the vPDQ text form.
    pub content: Option<ContentHash>,
}

/// The PDQ of a frame's content area inside uniform borders.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContentHash {
    /// The hash.
    pub hash: PdqHash,
    /// Its quality.
    pub quality: u8,
    /// Its eight dihedral variants, when asked for.
    pub variants: Option<[PdqHash; 8]>,
}

impl From<&VideoFrame> for VpdqFeature {
    fn from(frame: &VideoFrame) -> Self {
        Self {
            frame_number: frame.frame_index,
            hash: frame.hash,
            quality: frame.quality,
            timestamp_s: f64::from(frame.timestamp_s),
        }
    }
}

/// A video's hashed frames, in frame order.
#[derive(Debug, Clone, PartialEq)]
pub struct HashedVideo {
    /// The probed stream.
    pub info: VideoInfo,
    /// The sampling step used.
    pub step: u64,
    /// The hashed frames, by increasing index.
    pub frames: Vec<VideoFrame>,
}

impl HashedVideo {
    /// The frames as a vPDQ hash (shared/PDQ.md §2.2).
    pub fn to_vpdq(&self) -> Vpdq {
        Vpdq {
            features: self.frames.iter().map(VpdqFeature::from).collect(),
        }
    }
}

/// Options of [`hash_video`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HashOptions {
    /// Which frames.
    pub sampling: SamplingOptions,
    /// Also keep every frame's 8 dihedral variants.
    pub dihedral: bool,
    /// The FFmpeg programs.
    pub tools: Tools,
    /// Hashing threads; 0 uses every core.
    pub threads: usize,
}

struct Job {
    position: FramePosition,
    rgb: Vec<u8>,
}

struct Done {
    rgb: Vec<u8>,
    frame: Result<VideoFrame, Error>,
}

/// Decodes `path` with ffmpeg and hashes the frames vPDQ selects, on `options.threads` threads
/// while this one reads ffmpeg's output. `progress` is called after each selected frame is read,
/// with the probed stream (whose `frame_count` estimates the total) and the number of frames
/// decoded so far (to the nearest step).
///
/// # Errors
/// Everything [`FrameReader::open`] and [`FrameReader::next_frame`] return.
pub fn hash_video(
    path: &Path,
    options: &HashOptions,
    mut progress: impl FnMut(&VideoInfo, u64),
) -> Result<HashedVideo, Error> {
    let mut reader = FrameReader::open(&options.tools, path, &options.sampling)?;
    let info = reader.info().clone();
    let (width, height) = (info.width, info.height);
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        n => n,
    };
    let dihedral = options.dihedral;
    let mut frames = Vec::new();
    // At most `threads` frames wait for a hasher: bounded memory, and the reader never outruns
    // the hashers by more than that.
    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(threads);
    let job_rx = Mutex::new(job_rx);
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    std::thread::scope(|scope| -> Result<(), Error> {
        for _ in 0..threads {
            let done_tx = done_tx.clone();
            let job_rx = &job_rx;
            scope.spawn(move || {
                loop {
                    // The lock is held only to take one job.
                    let job = job_rx.lock().recv();
                    let Ok(Job { position, rgb }) = job else {
                        break;
                    };
                    let frame = hash_frame(path, width, height, &rgb, position, dihedral);
                    if done_tx.send(Done { rgb, frame }).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        let mut spare: Vec<Vec<u8>> = Vec::new();
        let mut collect = |done: Done, spare: &mut Vec<Vec<u8>>| -> Result<(), Error> {
            spare.push(done.rgb);
            frames.push(done.frame?);
            Ok(())
        };
        let read: Result<(), Error> = (|| {
            loop {
                while let Ok(done) = done_rx.try_recv() {
                    collect(done, &mut spare)?;
                }
                let mut rgb = spare.pop().unwrap_or_default();
                let Some(position) = reader.next_frame(&mut rgb)? else {
                    return Ok(());
                };
                progress(&info, position.frame_index + 1);
                if job_tx.send(Job { position, rgb }).is_err() {
                    return Ok(());
                }
            }
        })();
        // Closing the job channel lets the hashers finish; on error they drain what is queued.
        drop(job_tx);
        read?;
        for done in done_rx {
            collect(done, &mut spare)?;
        }
        Ok(())
    })?;
    // Hashers finish out of order; vPDQ output is by frame number.
    frames.sort_by_key(|f| f.frame_index);
    Ok(HashedVideo {
        info,
        step: reader.step(),
        frames,
    })
}

fn hash_frame(
    path: &Path,
    width: u32,
    height: u32,
    rgb: &[u8],
    position: FramePosition,
    dihedral: bool,
) -> Result<VideoFrame, Error> {
    let hashes = border::hash_rgb(width, height, rgb).map_err(|source| Error::Hash {
        path: path.to_path_buf(),
        frame_index: position.frame_index,
        source,
    })?;
    let output = &hashes.full;
    Ok(VideoFrame {
        frame_index: position.frame_index,
        timestamp_s: position.timestamp_s,
        hash: output.hash(),
        quality: output.quality(),
        variants: dihedral.then(|| output.dihedral()),
        content: hashes.content.map(|c| ContentHash {
            hash: c.hash(),
            quality: c.quality(),
            variants: dihedral.then(|| c.dihedral()),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_truncates_like_the_reference() {
        let one = SamplingOptions::default();
        assert_eq!(one.step(30.0).ok(), Some(30));
        // 29.97 fps at 1 s: (int)29.97 = 29, which drifts, as vPDQ does.
        assert_eq!(one.step(30000.0 / 1001.0).ok(), Some(29));
        // Below 1 fps the step would be 0: it becomes 1.
        assert_eq!(one.step(0.5).ok(), Some(1));
        let half = SamplingOptions {
            seconds_per_hash: 0.5,
            every_frame: false,
        };
        assert_eq!(half.step(30.0).ok(), Some(15));
        let zero = SamplingOptions {
            seconds_per_hash: 0.0,
            every_frame: false,
        };
        assert_eq!(zero.step(30.0).ok(), Some(1));
        let every = SamplingOptions {
            seconds_per_hash: 5.0,
            every_frame: true,
        };
        assert_eq!(every.step(30.0).ok(), Some(1));
    }

    #[test]
    fn negative_or_nan_sampling_is_rejected() {
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let options = SamplingOptions {
                seconds_per_hash: bad,
                every_frame: false,
            };
            assert!(matches!(options.step(30.0), Err(Error::Sampling(_))));
        }
    }

    #[test]
    fn frame_rates_parse_as_double_division() {
        assert_eq!(parse_rate("30/1"), Some(30.0));
        assert_eq!(parse_rate("30000/1001"), Some(30000.0 / 1001.0));
        assert_eq!(parse_rate("0/0"), None);
        assert_eq!(parse_rate("25"), None);
        assert_eq!(parse_rate("-1/2"), None);
    }

    #[test]
    fn stderr_tail_keeps_the_last_lines_on_one_line() {
        let text = b"first\n\nsecond error\r\n";
        assert_eq!(tail(text), "first; second error");
        let long = vec![b'x'; 3 * STDERR_TAIL_BYTES];
        assert_eq!(tail(&long).len(), STDERR_TAIL_BYTES);
    }

    #[test]
    fn missing_ffprobe_says_to_install_ffmpeg() {
        let tools = Tools {
            ffmpeg: PathBuf::from("/nonexistent/ffmpeg"),
            ffprobe: PathBuf::from("/nonexistent/ffprobe"),
        };
        // Any readable file: the tool is looked for before the content matters.
        let error = probe(
            &tools,
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("Cargo.toml")
                .as_path(),
        )
        .expect_err("no ffprobe");
        assert!(matches!(error, Error::ToolMissing { .. }));
        assert!(
            error.to_string().contains("apt-get install ffmpeg"),
            "{error}"
        );
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let error =
            probe(&Tools::default(), Path::new("/nonexistent/video.mp4")).expect_err("no file");
        assert!(matches!(error, Error::Read { .. }), "{error}");
    }

    #[test]
    fn timestamps_are_float32_divisions() {
        let frame = VideoFrame {
            frame_index: 2,
            timestamp_s: 2.0_f32 / 30.0_f32,
            hash: PdqHash::default(),
            quality: 100,
            variants: None,
            content: None,
        };
        let feature = VpdqFeature::from(&frame);
        assert_eq!(feature.timestamp_s, f64::from(2.0_f32 / 30.0_f32));
        assert_eq!(
            crate::hash::vpdq::text_line(&feature).rsplit(',').next(),
            Some("0.067")
        );
    }
}
