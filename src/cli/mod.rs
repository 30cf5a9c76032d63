//! The command line: `framematch serve`, local hashing, and client commands that talk to a
//! running server over gRPC.
//!
//! Client commands print tab-separated lines meant for scripts, and report failures on stderr.
//! Exit codes: 0 success (for `match`, `scan` and `vpdq-match`: nothing matched), 1 (those three
//! only) something matched, 2 an error, 64 invalid server configuration.
//!
//! Videos (issue #3) are decoded by the real FFmpeg through [`crate::video`] and hashed locally as
//! vPDQ does. A file is told apart by its first bytes: a JPEG, PNG, WebP, GIF or BMP signature is
//! an image, valid UTF-8 text is a vPDQ hash file (reference text or HMA JSON, where a command
//! takes those), and anything else is handed to ffprobe as a video. Progress bars appear on stderr
//! only when it is a terminal, so scripts and logs see only the result lines.

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use image::ImageFormat;
use indicatif::{ProgressBar, ProgressStyle};

use crate::client::{self, ClientOptions, Connection};
use crate::hash::pdq::{self, DecodeLimits, Dihedral};
use crate::hash::vpdq::{self, MatchConfig, Semantics, Vpdq};
use crate::model::Category;
use crate::pb;
use crate::video::{self, FrameReader, HashOptions, SamplingOptions, Tools};
use serve::{EmbeddingArgs, ServeArgs};

pub mod serve;
pub mod transfer;

/// Exit code for errors.
pub const EXIT_ERROR: u8 = 2;
/// Exit code for `match` when something matched.
pub const EXIT_MATCHED: u8 = 1;
/// Exit code for invalid configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// framematch: keeps known violent videos from being published again, by matching perceptual
/// hashes of uploads against banks of known content.
#[derive(Debug, Parser)]
#[command(name = "framematch", version, about, long_about = None)]
pub struct Cli {
    /// How client commands reach the server (`--server`, `--api-key`, `--tls-*`).
    #[command(flatten)]
    pub client: ClientOptions,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
// Parsed once per process: the size of the `serve` variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC service on the embedded store.
    Serve(ServeArgs),
    /// Print the PDQ hash of image files (`pdq_hex,quality,path` per file) and the vPDQ hash of
    /// videos (`frame,quality,pdq_hex,timestamp` per hashed frame, as Meta's vpdq-hash-video).
    Hash(HashArgs),
    /// Compare two vPDQ hashes (text or JSON files, or videos, hashed first) as
    /// python-threatexchange does: prints `query_match_pct<TAB>compared_match_pct<TAB>is_match`;
    /// exits 0 when they do not match, 1 when they do, 2 on error.
    VpdqMatch(VpdqMatchArgs),
    /// Decode videos with ffmpeg, stream their frames to the server and print one line per
    /// reference verdict: `path<TAB>reference_id<TAB>bank<TAB>query_pct<TAB>reference_pct<TAB>
    /// match|no-match`; exits 0 when nothing matched, 1 when something did, 2 on error.
    Scan(ScanArgs),
    /// Manage banks.
    Bank {
        /// The bank command.
        #[command(subcommand)]
        command: BankCommand,
    },
    /// Manage references.
    Ref {
        /// The reference command.
        #[command(subcommand)]
        command: RefCommand,
    },
    /// Match image files: prints `path<TAB>reference_id<TAB>bank<TAB>distance` per match (for a
    /// match by an embedding space, `space=score` instead of the distance); exits 0
    /// when nothing matched, 1 when something matched, 2 on error. Images are sent as they are,
    /// so a server with an embedding model also searches the spaces of the banks in scope.
    Match {
        /// Only search these banks (repeatable); default: all.
        #[arg(long = "bank")]
        banks: Vec<String>,
        /// Largest Hamming distance counted as a match (default: the server's, normally 31).
        #[arg(long)]
        max_distance: Option<u32>,
        /// Also match rotated and mirrored versions of each image.
        #[arg(long)]
        dihedral: bool,
        /// Image files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the server's counts.
    Stats,
    /// Manage organisations (admin key).
    Org {
        /// The organisation command.
        #[command(subcommand)]
        command: OrgCommand,
    },
    /// Manage API keys (admin key).
    Key {
        /// The key command.
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Print the audit trail (admin key): `seq<TAB>time<TAB>actor<TAB>actor_key<TAB>kind<TAB>
    /// bank<TAB>reference<TAB>key<TAB>organisation<TAB>detail`, oldest first.
    Audit {
        /// Only changes to this bank and its references.
        #[arg(long)]
        bank: Option<String>,
        /// Only changes after this change-log position.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// At most this many entries (all of them by default).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Write a bank's references as a hash list (python-threatexchange CSV by default; see README
    /// "Import and export"); a summary and skipped references go to stderr.
    Export(transfer::ExportArgs),
    /// Add every item of a hash-list file (threatexchange pdq lines or CSV, vPDQ text or JSON) to
    /// a bank as one reference each; prints `imported N references (M frames), skipped K`.
    Import(transfer::ImportArgs),
    /// Load generator (issue #6): runs concurrent MatchVideo streams against the server and prints
    /// frames/s, per-frame p50/p99 latency, errors and the server's CPU time per frame.
    Bench(BenchArgs),
}

/// `framematch bench …`
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Concurrent MatchVideo streams, each on its own connection.
    #[arg(long, default_value_t = 8)]
    pub streams: usize,
    /// Frames per stream.
    #[arg(long, default_value_t = 1000)]
    pub frames_per_stream: u32,
    /// Frames per second per stream; default: as fast as the answers come.
    #[arg(long, value_name = "FPS")]
    pub rate: Option<f64>,
    /// Send 1280x720 JPEG frames for the server to hash instead of precomputed hashes.
    #[arg(long)]
    pub jpeg_720p: bool,
    /// Pictures for the 720p JPEG frames (centre 16:9 crop, scaled, encoded once); default: four
    /// synthetic frames.
    #[arg(long = "image", value_name = "FILE")]
    pub images: Vec<PathBuf>,
    /// Hashes to send, as raw 32-byte records (e.g. bench/data/queries.u8); default: seeded random
    /// hashes, which match nothing.
    #[arg(long, value_name = "FILE")]
    pub hashes: Option<PathBuf>,
    /// Keep opening streams until this many seconds have passed.
    #[arg(long, value_name = "S")]
    pub duration_s: Option<f64>,
    /// Most unanswered frames per stream.
    #[arg(long, default_value_t = 4)]
    pub max_in_flight: usize,
    /// The server's process id, to report its CPU time per frame (from /proc/PID/stat).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Which video frames are hashed (vPDQ's sampling, shared/PDQ.md §2.1).
#[derive(Debug, Clone, Copy, Args)]
pub struct SamplingArgs {
    /// Hash one frame every this many seconds of video: every `(int)(S × fps)`-th frame, as
    /// vPDQ does; 0 hashes every frame.
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    pub seconds_per_hash: f64,
    /// Hash every frame (vpdq-hash-video's default; same as --seconds-per-hash 0).
    #[arg(long)]
    pub every_frame: bool,
}

impl SamplingArgs {
    /// As [`SamplingOptions`].
    pub fn options(&self) -> SamplingOptions {
        SamplingOptions {
            seconds_per_hash: self.seconds_per_hash,
            every_frame: self.every_frame,
        }
    }
}

/// `framematch hash …`
#[derive(Debug, Args)]
pub struct HashArgs {
    /// Also print the seven other dihedral variants (rot90, rot180, rot270, flipx, flipy,
    /// flipplus1, flipminus1): after the path for an image, after the timestamp for a video frame.
    #[arg(long)]
    pub dihedral: bool,
    /// Which video frames to hash.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print videos as HMA's JSON array of `"pdq_hex,quality,timestamp"` strings instead.
    #[arg(long)]
    pub json: bool,
    /// Print embedding descriptors instead of PDQ hashes, computed by `--embedding-model`
    /// exactly as the server does: one JSON object per line (JSON Lines) for each image and each
    /// sampled video frame, `{"path", "space", "frame_index", "timestamp_ms", "content_area",
    /// "values"}`, with a second line (`content_area` true) for the picture inside its borders
    /// when it has letterbox or pillarbox bars. `values` is the L2-normalised vector.
    #[arg(long)]
    pub embedding: bool,
    /// The model `--embedding` runs.
    #[command(flatten)]
    pub model: EmbeddingArgs,
    /// Image files (JPEG, PNG, WebP, GIF, BMP) or videos (anything ffmpeg decodes). With several
    /// files, each video's lines follow a `# path` line.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// `framematch vpdq-match …`
#[derive(Debug, Args)]
pub struct VpdqMatchArgs {
    /// The query: a vPDQ file (reference text or HMA JSON) or a video.
    pub query: PathBuf,
    /// The video it is compared with: a vPDQ file or a video.
    pub compared: PathBuf,
    /// Match when at least this share of the query's frames match, in percent.
    #[arg(long, default_value_t = vpdq::DEFAULT_QUERY_THRESHOLD_PCT)]
    pub query_threshold: f64,
    /// ... and at least this share of the compared video's frames match, in percent.
    #[arg(long, default_value_t = vpdq::DEFAULT_COMPARED_THRESHOLD_PCT)]
    pub compared_threshold: f64,
    /// Frame distance tolerance in bits.
    #[arg(long, default_value_t = crate::hash::DEFAULT_MAX_DISTANCE)]
    pub max_distance: u32,
    /// Frames of lower quality are left out.
    #[arg(long, default_value_t = crate::hash::DEFAULT_MIN_QUALITY)]
    pub min_quality: u8,
    /// The C++ match-hashes-brute rules (no dedupe, distance strictly below --max-distance)
    /// instead of python-threatexchange's.
    #[arg(long)]
    pub cpp: bool,
    /// Which frames of a video argument are hashed.
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// `framematch scan …`
#[derive(Debug, Args)]
pub struct ScanArgs {
    /// Only search these banks (repeatable); default: all.
    #[arg(long = "bank")]
    pub banks: Vec<String>,
    /// Send each selected frame as a JPEG for the server to hash, instead of hashing locally.
    /// This is also what happens when a bank in scope declares embedding spaces, so that the
    /// server computes the frames' vectors (it embeds one frame per its
    /// --embedding-interval-ms, one per second by default).
    #[arg(long)]
    pub send_images: bool,
    /// Also match rotated and mirrored versions of the frames.
    #[arg(long)]
    pub dihedral: bool,
    /// Send one frame every this many seconds of video (vPDQ sampling).
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    pub seconds_per_hash: f64,
    /// Temporal rule: an in-order run of matching frames this long matches on its own, in
    /// milliseconds; 0 turns it off (default: the server's).
    #[arg(long, value_name = "N")]
    pub min_run_ms: Option<u32>,
    /// Percentage rule: share of the upload's frames that must match (default: the server's, 80).
    #[arg(long, value_name = "P")]
    pub query_threshold: Option<f64>,
    /// Percentage rule: share of the reference's frames that must be matched (default: the
    /// server's, 0).
    #[arg(long, value_name = "P")]
    pub reference_threshold: Option<f64>,
    /// Largest Hamming distance counted as a frame match (default: the server's, normally 31).
    #[arg(long)]
    pub max_distance: Option<u32>,
    /// Video files.
    #[arg(required = true)]
    pub videos: Vec<PathBuf>,
}

/// `framematch bank …`
#[derive(Debug, Subcommand)]
pub enum BankCommand {
    /// Create a bank; prints `id<TAB>name`.
    Create {
        /// Bank name: 1-128 characters of A-Z a-z 0-9 _ . -
        name: String,
        /// suicide_self_harm, graphic_violence, terrorism or other.
        #[arg(long)]
        category: Category,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        /// Who else may see it: private (default), shared (with `--share-with`) or public.
        #[arg(long, default_value = "private")]
        visibility: VisibilityArg,
        /// An organisation to share it with (repeatable; with `--visibility shared`).
        #[arg(long = "share-with")]
        share_with: Vec<String>,
        /// Owning organisation (admin keys only; default: the key's organisation).
        #[arg(long)]
        owner: Option<String>,
        /// An embedding space the bank holds beside PDQ (repeatable):
        /// `SPACE[:THRESHOLD[:DIM[:METRIC]]]`, e.g. `sscd`, `sscd:0.8`, `mine:0.9:256:dot`.
        /// Unset parts take the server's model of that name, else threshold 0.75, dimension 512
        /// and metric cosine.
        #[arg(long = "embedding", value_name = "SPACE[:THRESHOLD[:DIM[:METRIC]]]")]
        embeddings: Vec<EmbeddingArg>,
    },
    /// Change who may see a bank; prints the bank as `list` does.
    Share {
        /// Bank name.
        name: String,
        /// private, shared (with `--share-with`) or public.
        #[arg(long)]
        visibility: VisibilityArg,
        /// An organisation to share it with (repeatable; with `--visibility shared`).
        #[arg(long = "share-with")]
        share_with: Vec<String>,
    },
    /// List the banks the key may see:
    /// `id<TAB>name<TAB>category<TAB>owner<TAB>visibility<TAB>shared_with<TAB>spaces`
    /// (`shared_with` comma-separated, shown only to the bank's owner and admins; `spaces` the
    /// embedding spaces as `name:threshold:dimension:metric`, comma-separated).
    List,
}

/// `--embedding SPACE[:THRESHOLD[:DIM[:METRIC]]]`: an embedding space for `bank create`. Unset
/// parts are sent as 0 / unspecified, which the server fills in.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingArg {
    /// The space's name.
    pub name: String,
    /// 0: the server's default.
    pub threshold: f32,
    /// 0: the server's model's, or 512.
    pub dimension: u32,
    /// Unset: the server's model's, or cosine.
    pub metric: Option<crate::model::Metric>,
}

impl std::str::FromStr for EmbeddingArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = text.split(':');
        let name = parts.next().unwrap_or_default().to_string();
        if name.is_empty() {
            return Err(format!(
                "{text:?} names no space; expected SPACE[:THRESHOLD[:DIM[:METRIC]]]"
            ));
        }
        let threshold = match parts.next() {
            None | Some("") => 0.0,
            Some(t) => t
                .parse::<f32>()
                .map_err(|e| format!("threshold {t:?} of {name:?}: {e}"))?,
        };
        let dimension = match parts.next() {
            None | Some("") => 0,
            Some(d) => d
                .parse::<u32>()
                .map_err(|e| format!("dimension {d:?} of {name:?}: {e}"))?,
        };
        let metric = match parts.next() {
            None | Some("") => None,
            Some(m) => Some(m.parse().map_err(|e| format!("{e}"))?),
        };
        if let Some(extra) = parts.next() {
            return Err(format!(
                "{text:?} has an extra part {extra:?}; expected SPACE[:THRESHOLD[:DIM[:METRIC]]]"
            ));
        }
        Ok(Self {
            name,
            threshold,
            dimension,
            metric,
        })
    }
}

impl EmbeddingArg {
    fn to_pb(&self) -> pb::EmbeddingSpace {
        pb::EmbeddingSpace {
            name: self.name.clone(),
            dimension: self.dimension,
            metric: match self.metric {
                None => pb::EmbeddingMetric::Unspecified,
                Some(crate::model::Metric::Cosine) => pb::EmbeddingMetric::Cosine,
                Some(crate::model::Metric::Dot) => pb::EmbeddingMetric::Dot,
            } as i32,
            threshold: self.threshold,
            index: String::new(),
        }
    }
}

/// A bank visibility on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum VisibilityArg {
    /// Only the owning organisation.
    Private,
    /// The owner and the organisations named with `--share-with`.
    Shared,
    /// Every organisation.
    Public,
}

impl VisibilityArg {
    fn to_pb(self) -> pb::Visibility {
        match self {
            VisibilityArg::Private => pb::Visibility::Private,
            VisibilityArg::Shared => pb::Visibility::Shared,
            VisibilityArg::Public => pb::Visibility::Public,
        }
    }
}

/// `framematch org …`
#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an organisation; prints `id<TAB>name`.
    Create {
        /// Unique name.
        name: String,
    },
    /// List organisations: `id<TAB>name`.
    List,
}

/// `framematch key …`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key; prints `id<TAB>secret`. The secret is shown once: the server keeps only
    /// its digest.
    Create {
        /// The organisation it acts for.
        #[arg(long)]
        org: String,
        /// matcher, contributor or admin.
        #[arg(long)]
        role: crate::model::Role,
        /// Free text naming its use.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Revoke an API key: it stops working at once.
    Revoke {
        /// The key's id.
        id: i64,
    },
    /// List keys: `id<TAB>organisation<TAB>role<TAB>label<TAB>created_ms<TAB>active|revoked`.
    List {
        /// Only this organisation's keys.
        #[arg(long)]
        org: Option<String>,
    },
}

/// `framematch ref …`
#[derive(Debug, Subcommand)]
pub enum RefCommand {
    /// Add one reference per file to a bank; prints `reference_id<TAB>path`. Images are sent as
    /// they are; videos are hashed here (vPDQ) and sent as hashes, or, when the bank declares
    /// embedding spaces, their sampled frames are sent as JPEGs for the server to hash and embed;
    /// vPDQ files (reference text or HMA JSON) are sent as they hash.
    Add {
        /// Target bank.
        bank: String,
        /// Images, videos or vPDQ files; each becomes its own reference.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Which video frames to hash.
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Free text stored with every reference added.
        #[arg(long, default_value = "")]
        note: String,
        /// Your own id for the content (only with a single file).
        #[arg(long, default_value = "")]
        external_id: String,
    },
    /// Withdraw a reference so it never matches again.
    Withdraw {
        /// Reference id.
        id: i64,
        /// Why (required).
        #[arg(long)]
        reason: String,
    },
    /// Show a reference.
    Get {
        /// Reference id.
        id: i64,
    },
}

/// Failure of a client command, printed as one line on stderr.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be hashed.
    #[error("cannot hash {path}: {source}")]
    Hash {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: pdq::Error,
    },
    /// The connection could not be set up or made.
    #[error(transparent)]
    Client(#[from] client::Error),
    /// The server answered with an error.
    #[error("{context}: {code:?}: {message}")]
    Rpc {
        /// What was being done.
        context: String,
        /// The gRPC code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
    /// Flags that do not fit together.
    #[error("{0}")]
    Usage(String),
    /// A video could not be decoded or hashed.
    #[error(transparent)]
    Video(#[from] video::Error),
    /// A vPDQ file could not be read.
    #[error("{path}: {source}")]
    Vpdq {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: vpdq::Error,
    },
    /// A video frame could not be encoded as JPEG.
    #[error("{path}: frame {frame_index} could not be encoded as jpeg: {source}")]
    Encode {
        /// The video.
        path: PathBuf,
        /// The frame.
        frame_index: u64,
        /// Why.
        #[source]
        source: image::ImageError,
    },
    /// A video yielded no frame to send.
    #[error("{path}: the video has no frames to scan")]
    NoFrames {
        /// The video.
        path: PathBuf,
    },
    /// The load generator could not start.
    #[error(transparent)]
    Loadgen(#[from] crate::loadgen::Error),
    /// A hash-list file is malformed.
    #[error("{path}: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Which line, and what is wrong.
        #[source]
        source: crate::formats::Error,
    },
    /// An output file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server exported a reference that does not hold together.
    #[error("reference {reference}: {reason}")]
    BadExport {
        /// The reference (0 when unknown).
        reference: i64,
        /// What is wrong.
        reason: String,
    },
    /// The embedding model could not describe a file's picture.
    #[error("{}: {reason}", path.display())]
    Embed {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A background task stopped unexpectedly (a bug).
    #[error("internal error: {0}")]
    Task(String),
}

pub(crate) fn rpc_error(context: impl Into<String>, status: tonic::Status) -> Error {
    Error::Rpc {
        context: context.into(),
        code: status.code(),
        message: client::status_message(&status),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn image_frame(bytes: Vec<u8>) -> pb::Frame {
    pb::Frame {
        embeddings: Vec::new(),
        frame_index: 0,
        timestamp_ms: 0,
        signal: Some(pb::frame::Signal::Image(bytes)),
    }
}

/// What a file holds, judged from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    /// A JPEG, PNG, WebP, GIF or BMP picture (the `image` crate decodes it).
    Image,
    /// UTF-8 text: a vPDQ hash file, where one is accepted.
    Text,
    /// Anything else: left to ffprobe.
    Media,
}

/// Bytes read to tell a file's kind.
const SNIFF_BYTES: usize = 8192;

fn sniff(path: &Path) -> Result<FileKind, Error> {
    let read_error = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut head = Vec::with_capacity(SNIFF_BYTES);
    std::fs::File::open(path)
        .map_err(read_error)?
        .take(SNIFF_BYTES as u64)
        .read_to_end(&mut head)
        .map_err(read_error)?;
    Ok(kind_of(&head))
}

fn kind_of(head: &[u8]) -> FileKind {
    if let Ok(
        ImageFormat::Jpeg
        | ImageFormat::Png
        | ImageFormat::WebP
        | ImageFormat::Gif
        | ImageFormat::Bmp,
    ) = image::guess_format(head)
    {
        return FileKind::Image;
    }
    // Text: no NUL and valid UTF-8, except perhaps a character cut by the end of the sample.
    let utf8 = match std::str::from_utf8(head) {
        Ok(_) => true,
        Err(error) => error.error_len().is_none(),
    };
    if !head.is_empty() && utf8 && !head.contains(&0) {
        FileKind::Text
    } else {
        FileKind::Media
    }
}

/// A progress bar on stderr when it is a terminal, hidden otherwise. `len` is the expected
/// number of steps, when known.
fn progress_bar(len: Option<u64>, label: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (bar, template) = match len {
        Some(len) => (
            ProgressBar::new(len),
            "{prefix} [{bar:40}] {pos}/{len} frames {elapsed_precise} eta {eta}",
        ),
        None => (
            ProgressBar::new_spinner(),
            "{prefix} {spinner} {pos} frames {elapsed_precise}",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label.to_string());
    bar
}

/// Hashes a video with a progress bar over its decoded frames.
fn hash_video_file(
    path: &Path,
    sampling: SamplingOptions,
    dihedral: bool,
) -> Result<video::HashedVideo, Error> {
    let options = HashOptions {
        sampling,
        dihedral,
        ..HashOptions::default()
    };
    let mut bar: Option<ProgressBar> = None;
    let result = video::hash_video(path, &options, |info, decoded| {
        bar.get_or_insert_with(|| progress_bar(info.frame_count, &path.display().to_string()))
            .set_position(decoded);
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(result?)
}

/// Reads a vPDQ file, or hashes a video, into a vPDQ hash.
fn load_vpdq(path: &Path, sampling: SamplingOptions) -> Result<Vpdq, Error> {
    if sniff(path)? == FileKind::Text {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        return Vpdq::parse(&text).map_err(|source| Error::Vpdq {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(hash_video_file(path, sampling, false)?.to_vpdq())
}

/// `framematch hash`: hashes each file locally, printing a line per image and a vPDQ block per
/// video. A file that fails is reported on stderr and the rest go on; the exit code is 2 if any
/// failed.
pub fn hash_files(args: &HashArgs) -> ExitCode {
    if args.embedding {
        return embed_files(args);
    }
    let limits = DecodeLimits::default();
    let sampling = args.sampling.options();
    let several = args.files.len() > 1;
    let mut failed = false;
    for path in &args.files {
        let result = sniff(path).and_then(|kind| match kind {
            FileKind::Image => hash_image_file(path, &limits, args.dihedral),
            FileKind::Text | FileKind::Media => {
                let hashed = hash_video_file(path, sampling, args.dihedral)?;
                Ok(video_text(path, &hashed, args, several))
            }
        });
        match result {
            Ok(text) => {
                let mut stdout = std::io::stdout().lock();
                if let Err(error) = stdout
                    .write_all(text.as_bytes())
                    .and_then(|()| stdout.flush())
                {
                    eprintln!("framematch: writing the output: {error}");
                    return ExitCode::from(EXIT_ERROR);
                }
            }
            Err(error) => {
                eprintln!("framematch: {error}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(EXIT_ERROR)
    } else {
        ExitCode::SUCCESS
    }
}

// === hash --embedding ===

/// One line of `hash --embedding`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct EmbeddingLine {
    /// The file.
    pub path: String,
    /// The model's embedding space.
    pub space: String,
    /// 0 for an image; the frame's index in decoder order for a video.
    pub frame_index: u64,
    /// 0 for an image; the frame's time for a video (vPDQ's `frame_index / fps`), rounded.
    pub timestamp_ms: u64,
    /// Whether this is the vector of the picture inside its borders.
    pub content_area: bool,
    /// The L2-normalised vector.
    pub values: Vec<f32>,
}

/// `hash --embedding`: loads the model once, then prints each file's lines. A file that fails is
/// reported on stderr and the rest go on; exit 2 if any failed, 64 for a bad model flag.
fn embed_files(args: &HashArgs) -> ExitCode {
    let config = match args.model.model_config(crate::embed::DEFAULT_THRESHOLD, 1) {
        Ok(Some(config)) => config,
        Ok(None) => {
            eprintln!(
                "framematch: --embedding needs --embedding-model (or FRAMEMATCH_EMBEDDING_MODEL); \
                 run `eval \"$(.ci/fetch-models)\"` (README \"Embedding model\")"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(error) => {
            eprintln!("framematch: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let model: std::sync::Arc<dyn crate::api::embedding::SpaceModel> =
        match crate::embed::OnnxModel::open(&config) {
            Ok(model) => std::sync::Arc::new(model),
            Err(error) => {
                eprintln!("framematch: {error}");
                return ExitCode::from(EXIT_ERROR);
            }
        };
    let sampling = args.sampling.options();
    let mut failed = false;
    let mut stdout = std::io::stdout().lock();
    for path in &args.files {
        let mut emit = |frame_index: u64, timestamp_ms: u64, picture: &image::RgbImage| {
            embedding_lines(path, &model, frame_index, timestamp_ms, picture)
                .map(|text| stdout.write_all(text.as_bytes()).is_ok())
        };
        let result = sniff(path).and_then(|kind| match kind {
            FileKind::Image => {
                let bytes = read_file(path)?;
                let picture = pdq::decode_image(&bytes, &DecodeLimits::default())
                    .map_err(|source| Error::Hash {
                        path: path.to_path_buf(),
                        source,
                    })?
                    .to_rgb8();
                emit(0, 0, &picture).map(|_| ())
            }
            FileKind::Text | FileKind::Media => {
                let mut reader = FrameReader::open(&Tools::default(), path, &sampling)?;
                let (width, height) = (reader.info().width, reader.info().height);
                let mut rgb = Vec::new();
                while let Some(position) = reader.next_frame(&mut rgb)? {
                    let picture =
                        image::RgbImage::from_raw(width, height, std::mem::take(&mut rgb))
                            .ok_or_else(|| Error::Embed {
                                path: path.to_path_buf(),
                                reason: format!("frame {} is short", position.frame_index),
                            })?;
                    let open = emit(
                        position.frame_index,
                        timestamp_ms(position.timestamp_s),
                        &picture,
                    )?;
                    rgb = picture.into_raw();
                    if !open {
                        // A closed pipe (`| head`): the reader has what it wanted.
                        return Ok(());
                    }
                }
                Ok(())
            }
        });
        if let Err(error) = result {
            eprintln!("framematch: {error}");
            failed = true;
        }
    }
    if failed {
        ExitCode::from(EXIT_ERROR)
    } else {
        ExitCode::SUCCESS
    }
}

/// The lines of one picture: its vector, and its content area's when it has borders.
fn embedding_lines(
    path: &Path,
    model: &std::sync::Arc<dyn crate::api::embedding::SpaceModel>,
    frame_index: u64,
    timestamp_ms: u64,
    picture: &image::RgbImage,
) -> Result<String, Error> {
    let area =
        crate::hash::border::content_area(picture.width(), picture.height(), picture.as_raw());
    let (vectors, _) =
        crate::api::embedding::embed_picture(std::slice::from_ref(model), picture, area).map_err(
            |e| Error::Embed {
                path: path.to_path_buf(),
                reason: e.to_string(),
            },
        )?;
    let mut out = String::new();
    for vector in vectors {
        let line = EmbeddingLine {
            path: path.display().to_string(),
            space: vector.space.to_string(),
            frame_index,
            timestamp_ms,
            content_area: vector.content_area,
            values: vector.vector,
        };
        out.push_str(&serde_json::to_string(&line).map_err(|e| Error::Task(e.to_string()))?);
        out.push('\n');
    }
    Ok(out)
}

fn hash_image_file(path: &Path, limits: &DecodeLimits, dihedral: bool) -> Result<String, Error> {
    let bytes = read_file(path)?;
    let output = pdq::hash_image_bytes(&bytes, limits).map_err(|source| Error::Hash {
        path: path.to_path_buf(),
        source,
    })?;
    let mut line = format!("{},{},{}", output.hash(), output.quality(), path.display());
    if dihedral {
        for variant in Dihedral::ALL.into_iter().skip(1) {
            line.push(',');
            line.push_str(&output.variant(variant).to_hex());
        }
    }
    line.push('\n');
    Ok(line)
}

/// A video's vPDQ lines (the reference text form, with the dihedral variants appended when asked:
/// the reference reader ignores fields after the 4th), or its HMA JSON.
fn video_text(path: &Path, hashed: &video::HashedVideo, args: &HashArgs, several: bool) -> String {
    let mut out = String::new();
    if several {
        out.push_str(&format!("# {}\n", path.display()));
    }
    let vpdq = hashed.to_vpdq();
    if args.json {
        out.push_str(&vpdq.to_json());
        out.push('\n');
        return out;
    }
    for (feature, frame) in vpdq.features.iter().zip(&hashed.frames) {
        out.push_str(&vpdq::text_line(feature));
        if let Some(variants) = frame.variants.filter(|_| args.dihedral) {
            for variant in variants.iter().skip(1) {
                out.push(',');
                out.push_str(&variant.to_hex());
            }
        }
        out.push('\n');
    }
    out
}

/// `framematch vpdq-match`: returns whether the two match.
///
/// # Errors
/// [`Error::Read`], [`Error::Vpdq`] for a malformed vPDQ file, [`Error::Video`] for a video that
/// cannot be hashed.
pub fn vpdq_match(args: &VpdqMatchArgs) -> Result<bool, Error> {
    let sampling = args.sampling.options();
    let query = load_vpdq(&args.query, sampling)?;
    let compared = load_vpdq(&args.compared, sampling)?;
    let config = MatchConfig {
        quality_tolerance: args.min_quality,
        distance_tolerance: args.max_distance,
        semantics: if args.cpp {
            Semantics::Cpp
        } else {
            Semantics::Pytx
        },
    };
    let result = vpdq::match_brute(&query.features, &compared.features, &config);
    let is_match = result.is_match(args.query_threshold, args.compared_threshold);
    println!(
        "{:.2}\t{:.2}\t{is_match}",
        result.query_match_pct, result.compared_match_pct
    );
    Ok(is_match)
}

/// `framematch bank …`
///
/// # Errors
/// Connection and RPC failures.
pub async fn bank(command: BankCommand, server: &ClientOptions) -> Result<(), Error> {
    let mut client = pb::banks_client::BanksClient::new(client::connect(server).await?);
    match command {
        BankCommand::Create {
            name,
            category,
            description,
            visibility,
            share_with,
            owner,
            embeddings,
        } => {
            let bank = client
                .create_bank(pb::CreateBankRequest {
                    embedding_spaces: embeddings.iter().map(EmbeddingArg::to_pb).collect(),
                    name: name.clone(),
                    category: crate::api::convert::category_to_pb(category) as i32,
                    description,
                    visibility: visibility.to_pb() as i32,
                    shared_with: share_with,
                    owner: owner.unwrap_or_default(),
                })
                .await
                .map_err(|s| rpc_error(format!("creating bank {name}"), s))?
                .into_inner();
            println!("{}\t{}", bank.id, bank.name);
        }
        BankCommand::Share {
            name,
            visibility,
            share_with,
        } => {
            let bank = client
                .update_bank(pb::UpdateBankRequest {
                    bank: name.clone(),
                    visibility: visibility.to_pb() as i32,
                    shared_with: share_with,
                })
                .await
                .map_err(|s| rpc_error(format!("changing who may see bank {name}"), s))?
                .into_inner();
            println!("{}", bank_line(&bank));
        }
        BankCommand::List => {
            let banks = client
                .list_banks(pb::ListBanksRequest {})
                .await
                .map_err(|s| rpc_error("listing banks", s))?
                .into_inner()
                .banks;
            for bank in banks {
                println!("{}", bank_line(&bank));
            }
        }
    }
    Ok(())
}

fn bank_line(bank: &pb::Bank) -> String {
    let visibility = match pb::Visibility::try_from(bank.visibility) {
        Ok(pb::Visibility::Private) => "private",
        Ok(pb::Visibility::Shared) => "shared",
        Ok(pb::Visibility::Public) => "public",
        Ok(pb::Visibility::Unspecified) | Err(_) => "unspecified",
    };
    let spaces: Vec<String> = bank
        .embedding_spaces
        .iter()
        .map(|s| {
            let metric = match pb::EmbeddingMetric::try_from(s.metric) {
                Ok(pb::EmbeddingMetric::Cosine) => "cosine",
                Ok(pb::EmbeddingMetric::Dot) => "dot",
                Ok(pb::EmbeddingMetric::Unspecified) | Err(_) => "unspecified",
            };
            format!("{}:{}:{}:{metric}", s.name, s.threshold, s.dimension)
        })
        .collect();
    // The index settings contain commas: one `name:settings` per space, space-separated.
    let indexes: Vec<String> = bank
        .embedding_spaces
        .iter()
        .map(|s| format!("{}:{}", s.name, s.index))
        .collect();
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        bank.id,
        bank.name,
        category_name(bank.category),
        bank.owner,
        visibility,
        bank.shared_with.join(","),
        spaces.join(","),
        indexes.join(" ")
    )
}

/// `framematch org …`
///
/// # Errors
/// Connection and RPC failures.
pub async fn org(command: OrgCommand, server: &ClientOptions) -> Result<(), Error> {
    let mut client = pb::admin_client::AdminClient::new(client::connect(server).await?);
    match command {
        OrgCommand::Create { name } => {
            let org = client
                .create_organisation(pb::CreateOrganisationRequest { name: name.clone() })
                .await
                .map_err(|s| rpc_error(format!("creating organisation {name}"), s))?
                .into_inner();
            println!("{}\t{}", org.id, org.name);
        }
        OrgCommand::List => {
            let orgs = client
                .list_organisations(pb::ListOrganisationsRequest {})
                .await
                .map_err(|s| rpc_error("listing organisations", s))?
                .into_inner()
                .organisations;
            for org in orgs {
                println!("{}\t{}", org.id, org.name);
            }
        }
    }
    Ok(())
}

/// `framematch key …`
///
/// # Errors
/// Connection and RPC failures.
pub async fn key(command: KeyCommand, server: &ClientOptions) -> Result<(), Error> {
    let mut client = pb::admin_client::AdminClient::new(client::connect(server).await?);
    match command {
        KeyCommand::Create { org, role, label } => {
            let created = client
                .create_api_key(pb::CreateApiKeyRequest {
                    organisation: org.clone(),
                    role: crate::api::admin::role_to_pb(role) as i32,
                    label,
                })
                .await
                .map_err(|s| rpc_error(format!("creating a {role} key for {org}"), s))?
                .into_inner();
            let id = created.key.map_or(0, |k| k.id);
            println!("{id}\t{}", created.secret);
        }
        KeyCommand::Revoke { id } => {
            client
                .revoke_api_key(pb::RevokeApiKeyRequest { id })
                .await
                .map_err(|s| rpc_error(format!("revoking key {id}"), s))?;
        }
        KeyCommand::List { org } => {
            let keys = client
                .list_api_keys(pb::ListApiKeysRequest {
                    organisation: org.unwrap_or_default(),
                })
                .await
                .map_err(|s| rpc_error("listing keys", s))?
                .into_inner()
                .keys;
            for key in keys {
                let role = crate::api::admin::role_from_pb(key.role)
                    .map_or("unspecified", crate::model::Role::as_str);
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    key.id,
                    key.organisation,
                    role,
                    key.label,
                    key.created_ms,
                    if key.revoked_ms == 0 {
                        "active"
                    } else {
                        "revoked"
                    }
                );
            }
        }
    }
    Ok(())
}

/// `framematch audit …`: pages through the whole trail unless `limit` is given.
///
/// # Errors
/// Connection and RPC failures.
pub async fn audit(
    bank: Option<String>,
    after: i64,
    limit: Option<u32>,
    server: &ClientOptions,
) -> Result<(), Error> {
    let mut client = pb::admin_client::AdminClient::new(client::connect(server).await?);
    let mut after = after;
    let mut left = limit.map(u64::from);
    loop {
        let page = client
            .audit(pb::AuditRequest {
                bank: bank.clone().unwrap_or_default(),
                after_seq: after,
                limit: left.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
            })
            .await
            .map_err(|s| rpc_error("reading the audit trail", s))?
            .into_inner();
        if page.entries.is_empty() {
            return Ok(());
        }
        let mut stdout = std::io::stdout().lock();
        for entry in &page.entries {
            let line = format!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                entry.seq,
                entry.at_ms,
                entry.actor,
                entry.actor_key,
                entry.kind,
                entry.bank,
                entry.reference_id,
                entry.key_id,
                entry.organisation,
                entry.detail.replace(['\t', '\n'], " ")
            );
            if stdout.write_all(line.as_bytes()).is_err() {
                // A closed pipe (`| head`): the reader has what it wanted.
                return Ok(());
            }
        }
        after = page.last_seq;
        if let Some(n) = &mut left {
            *n = n.saturating_sub(page.entries.len() as u64);
            if *n == 0 {
                return Ok(());
            }
        }
    }
}

fn category_name(value: i32) -> &'static str {
    crate::api::convert::category_from_pb(value).map_or("unspecified", Category::as_str)
}

/// `framematch ref …`
///
/// # Errors
/// File, connection and RPC failures.
pub async fn reference(command: RefCommand, server: &ClientOptions) -> Result<(), Error> {
    let mut client = pb::banks_client::BanksClient::new(client::connect(server).await?);
    match command {
        RefCommand::Add {
            bank,
            files,
            sampling,
            note,
            external_id,
        } => {
            if !external_id.is_empty() && files.len() > 1 {
                return Err(Error::Usage(
                    "--external-id names one reference; give a single file with it".into(),
                ));
            }
            let pixels =
                banks_declare_spaces(client::connect(server).await?, std::slice::from_ref(&bank))
                    .await?;
            for path in files {
                let header = pb::AddReferenceRequest {
                    item: Some(pb::add_reference_request::Item::Header(
                        pb::ReferenceHeader {
                            bank: bank.clone(),
                            external_id: external_id.clone(),
                            note: note.clone(),
                        },
                    )),
                };
                let context = format!("adding {}", path.display());
                let added = if pixels && sniff(&path)? == FileKind::Media {
                    add_video_pixels(&mut client, header, &path, sampling.options(), &context)
                        .await?
                } else {
                    let frames = reference_frames(&path, sampling.options()).await?;
                    let mut messages = vec![header];
                    messages.extend(frames.into_iter().map(|frame| pb::AddReferenceRequest {
                        item: Some(pb::add_reference_request::Item::Frame(frame)),
                    }));
                    client
                        .add_reference(tokio_stream::iter(messages))
                        .await
                        .map_err(|s| rpc_error(context, s))?
                        .into_inner()
                };
                let id = added.reference.map_or(0, |r| r.id);
                println!("{id}\t{}", path.display());
            }
        }
        RefCommand::Withdraw { id, reason } => {
            let reference = client
                .withdraw_reference(pb::WithdrawReferenceRequest {
                    reference_id: id,
                    reason,
                })
                .await
                .map_err(|s| rpc_error(format!("withdrawing reference {id}"), s))?
                .into_inner();
            println!(
                "{}\twithdrawn\t{}",
                reference.id, reference.withdrawn_reason
            );
        }
        RefCommand::Get { id } => {
            let r = client
                .get_reference(pb::GetReferenceRequest {
                    reference_id: id,
                    include_embeddings: false,
                })
                .await
                .map_err(|s| rpc_error(format!("reading reference {id}"), s))?
                .into_inner();
            let state = match pb::ReferenceState::try_from(r.state) {
                Ok(pb::ReferenceState::Withdrawn) => "withdrawn",
                Ok(pb::ReferenceState::Active) => "active",
                Ok(pb::ReferenceState::Unspecified) | Err(_) => "unknown",
            };
            println!("id\t{}", r.id);
            println!("bank\t{}", r.bank);
            println!("state\t{state}");
            println!("frames\t{}", r.frame_count);
            println!("external_id\t{}", r.external_id);
            println!("note\t{}", r.note);
            println!("added_by\t{}", r.added_by);
            println!("added_ms\t{}", r.added_ms);
            if !r.withdrawn_reason.is_empty() {
                println!("withdrawn_reason\t{}", r.withdrawn_reason);
                println!("withdrawn_ms\t{}", r.withdrawn_ms);
            }
        }
    }
    Ok(())
}

/// Whether any bank in scope (`banks`, or every bank the key sees when empty) declares an
/// embedding space: then frames go to the server as pixels, so it computes their vectors. A
/// server too old to say, or a listing the key may not read, counts as no.
async fn banks_declare_spaces(channel: Connection, banks: &[String]) -> Result<bool, Error> {
    let mut banks_client = pb::banks_client::BanksClient::new(channel);
    let listed = match banks_client.list_banks(pb::ListBanksRequest {}).await {
        Ok(response) => response.into_inner().banks,
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unimplemented
            ) =>
        {
            return Ok(false);
        }
        Err(status) => return Err(rpc_error("listing banks", status)),
    };
    Ok(listed
        .iter()
        .filter(|bank| banks.is_empty() || banks.contains(&bank.name))
        .any(|bank| !bank.embedding_spaces.is_empty()))
}

/// A video reference for a bank with embedding spaces: its sampled frames decoded, JPEG-encoded
/// and streamed as they come (memory stays at a few frames), for the server to hash and embed.
async fn add_video_pixels(
    client: &mut pb::banks_client::BanksClient<Connection>,
    header: pb::AddReferenceRequest,
    path: &Path,
    sampling: SamplingOptions,
    context: &str,
) -> Result<pb::AddReferenceResponse, Error> {
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AddReferenceRequest>(4);
    let owned = path.to_path_buf();
    let producer = tokio::task::spawn_blocking(move || -> Result<u64, Error> {
        if tx.blocking_send(header).is_err() {
            return Ok(0);
        }
        let mut sent = 0;
        for_each_jpeg_frame(&owned, sampling, |frame| {
            let request = pb::AddReferenceRequest {
                item: Some(pb::add_reference_request::Item::Frame(frame)),
            };
            let open = tx.blocking_send(request).is_ok();
            sent += u64::from(open);
            open
        })?;
        Ok(sent)
    });
    let added = client
        .add_reference(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| rpc_error(context, s));
    let sent = producer.await.map_err(|e| Error::Task(e.to_string()))??;
    if sent == 0 {
        return Err(Error::NoFrames {
            path: path.to_path_buf(),
        });
    }
    Ok(added?.into_inner())
}

/// Decodes `path`'s sampled frames and hands each to `send` as a JPEG frame with its index and
/// time, with a progress bar; stops early when `send` returns false (the stream is gone).
fn for_each_jpeg_frame(
    path: &Path,
    sampling: SamplingOptions,
    mut send: impl FnMut(pb::Frame) -> bool,
) -> Result<(), Error> {
    let mut reader = FrameReader::open(&Tools::default(), path, &sampling)?;
    let expected = reader.info().frame_count.map(|n| reader.selected_count(n));
    let (width, height) = (reader.info().width, reader.info().height);
    let bar = progress_bar(expected, &path.display().to_string());
    let mut rgb = Vec::new();
    while let Some(position) = reader.next_frame(&mut rgb)? {
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, SCAN_JPEG_QUALITY)
            .encode(&rgb, width, height, image::ExtendedColorType::Rgb8)
            .map_err(|source| Error::Encode {
                path: path.to_path_buf(),
                frame_index: position.frame_index,
                source,
            })?;
        let frame = pb::Frame {
            embeddings: Vec::new(),
            frame_index: u32::try_from(position.frame_index).unwrap_or(u32::MAX),
            timestamp_ms: timestamp_ms(position.timestamp_s),
            signal: Some(pb::frame::Signal::Image(jpeg)),
        };
        if !send(frame) {
            break;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// The frames of one reference file: an image as its bytes, a vPDQ file's hashes, or a video
/// hashed here (on the blocking pool) and sent as hashes with their index and time.
async fn reference_frames(path: &Path, sampling: SamplingOptions) -> Result<Vec<pb::Frame>, Error> {
    let vpdq = match sniff(path)? {
        FileKind::Image => return Ok(vec![image_frame(read_file(path)?)]),
        FileKind::Text => {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.to_path_buf(),
                source,
            })?;
            Vpdq::parse(&text).map_err(|source| Error::Vpdq {
                path: path.to_path_buf(),
                source,
            })?
        }
        FileKind::Media => {
            let owned = path.to_path_buf();
            let hashed =
                tokio::task::spawn_blocking(move || hash_video_file(&owned, sampling, false))
                    .await
                    .map_err(|e| Error::Task(e.to_string()))??;
            // Straight from the frames, not via the vPDQ form, so that content-area hashes of
            // frames with bars travel too.
            return Ok(hashed
                .frames
                .iter()
                .map(|frame| pb::Frame {
                    embeddings: Vec::new(),
                    frame_index: u32::try_from(frame.frame_index).unwrap_or(u32::MAX),
                    timestamp_ms: timestamp_ms(frame.timestamp_s),
                    signal: Some(pb::frame::Signal::Pdq(video_signal(frame, false))),
                })
                .collect());
        }
    };
    Ok(vpdq
        .features
        .iter()
        .map(|f| pb::Frame {
            embeddings: Vec::new(),
            frame_index: u32::try_from(f.frame_number).unwrap_or(u32::MAX),
            timestamp_ms: f.timestamp_ms(),
            signal: Some(pb::frame::Signal::Pdq(pdq_signal(&f.hash, f.quality, None))),
        })
        .collect())
}

/// A hashed video frame as a precomputed signal: its hash, and its content-area hash when it has
/// borders; with `dihedral`, the variants of both.
fn video_signal(frame: &crate::video::VideoFrame, dihedral: bool) -> pb::PdqSignal {
    let variants = |v: &Option<[crate::hash::PdqHash; 8]>| v.filter(|_| dihedral);
    let mut signal = pdq_signal(
        &frame.hash,
        frame.quality,
        variants(&frame.variants).as_ref(),
    );
    signal.content = frame.content.map(|c| {
        Box::new(pdq_signal(
            &c.hash,
            c.quality,
            variants(&c.variants).as_ref(),
        ))
    });
    signal
}

/// A precomputed hash, with the 7 other dihedral variants when given all 8.
fn pdq_signal(
    hash: &crate::hash::PdqHash,
    quality: u8,
    variants: Option<&[crate::hash::PdqHash; 8]>,
) -> pb::PdqSignal {
    pb::PdqSignal {
        hash: hash.as_bytes().to_vec(),
        quality: u32::from(quality),
        // The proto's order, rot90 … flipminus1, is Dihedral::ALL without the original.
        variants: variants.map_or_else(Vec::new, |all| {
            all.iter().skip(1).map(|v| v.as_bytes().to_vec()).collect()
        }),
        content: None,
    }
}

/// `framematch match`: returns whether anything matched.
///
/// # Errors
/// File, connection and RPC failures.
pub async fn match_files(
    files: &[PathBuf],
    banks: Vec<String>,
    max_distance: Option<u32>,
    dihedral: bool,
    server: &ClientOptions,
) -> Result<bool, Error> {
    let mut client = pb::matcher_client::MatcherClient::new(client::connect(server).await?);
    let options = pb::MatchOptions {
        banks,
        max_distance,
        dihedral,
        ..Default::default()
    };
    let mut matched = false;
    for path in files {
        let bytes = read_file(path)?;
        let result = client
            .match_image(pb::MatchImageRequest {
                options: Some(options.clone()),
                frame: Some(image_frame(bytes)),
            })
            .await
            .map_err(|s| rpc_error(format!("matching {}", path.display()), s))?
            .into_inner()
            .result
            .unwrap_or_default();
        if result.low_quality {
            eprintln!(
                "framematch: {}: quality {} is below the minimum; it cannot match",
                path.display(),
                result.quality
            );
        }
        for m in result.matches {
            matched = true;
            let source = m.source.unwrap_or_default();
            // An embedding match has no distance: its column says `space=score` instead.
            let closeness = if m.signal == pb::Signal::Embedding as i32 {
                format!("{}={:.3}", m.space, m.score)
            } else {
                m.distance.to_string()
            };
            println!(
                "{}\t{}\t{}\t{closeness}",
                path.display(),
                source.reference_id,
                source.bank,
            );
        }
    }
    Ok(matched)
}

/// `framematch stats`
///
/// # Errors
/// Connection and RPC failures.
pub async fn stats(server: &ClientOptions) -> Result<(), Error> {
    let mut client = pb::banks_client::BanksClient::new(client::connect(server).await?);
    let s = client
        .stats(pb::StatsRequest {})
        .await
        .map_err(|s| rpc_error("reading stats", s))?
        .into_inner();
    println!("banks\t{}", s.banks);
    println!("active_references\t{}", s.active_references);
    println!("withdrawn_references\t{}", s.withdrawn_references);
    println!("stored_frames\t{}", s.stored_frames);
    println!("indexed_frames\t{}", s.indexed_frames);
    println!("index_tombstones\t{}", s.index_tombstones);
    println!("index_engine\t{}", s.index_engine);
    println!("index_memory_bytes\t{}", s.index_memory_bytes);
    println!("last_change_seq\t{}", s.last_change_seq);
    println!("open_streams\t{}", s.open_streams);
    Ok(())
}

// === scan ===

/// JPEG quality of frames sent with `scan --send-images`: high enough that the server's hash is
/// within a few bits of the local one.
const SCAN_JPEG_QUALITY: u8 = 90;

/// The last final verdict per reference, in the order references were first finalised.
#[derive(Default)]
struct FinalVerdicts {
    order: Vec<i64>,
    latest: HashMap<i64, pb::Verdict>,
}

impl FinalVerdicts {
    fn record(&mut self, verdict: pb::Verdict) {
        // Servers that predate streaming verdicts send only closing verdicts, without a status.
        let final_or_closing = matches!(
            pb::VerdictStatus::try_from(verdict.status),
            Ok(pb::VerdictStatus::Final | pb::VerdictStatus::Unspecified)
        );
        if !final_or_closing {
            return;
        }
        let id = verdict.source.as_ref().map_or(0, |s| s.reference_id);
        if self.latest.insert(id, verdict).is_none() {
            self.order.push(id);
        }
    }

    fn into_verdicts(mut self) -> Vec<pb::Verdict> {
        self.order
            .iter()
            .filter_map(|id| self.latest.remove(id))
            .collect()
    }
}

/// `framematch scan`: scans each video in turn, printing its verdict lines. A video that fails
/// is reported on stderr and the rest go on.
///
/// Exit code: 2 when any video failed (or the server could not be reached), else 1 when any
/// final verdict is a match, else 0.
pub async fn scan(args: &ScanArgs, server: &ClientOptions) -> ExitCode {
    let channel = match client::connect(server).await {
        Ok(channel) => channel,
        Err(error) => {
            eprintln!("framematch: {error}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    // Frames go as JPEGs when asked, or when the server is to compute their vectors.
    let send_images = args.send_images
        || match banks_declare_spaces(channel.clone(), &args.banks).await {
            Ok(declared) => declared,
            Err(error) => {
                eprintln!("framematch: {error}");
                return ExitCode::from(EXIT_ERROR);
            }
        };
    let mut client = pb::matcher_client::MatcherClient::new(channel);
    let mut matched = false;
    let mut failed = false;
    for path in &args.videos {
        match scan_video(&mut client, path, args, send_images).await {
            Ok(verdicts) => {
                for verdict in verdicts {
                    matched |= verdict.is_match;
                    let source = verdict.source.unwrap_or_default();
                    println!(
                        "{}\t{}\t{}\t{:.2}\t{:.2}\t{}",
                        path.display(),
                        source.reference_id,
                        source.bank,
                        verdict.query_match_pct,
                        verdict.reference_match_pct,
                        if verdict.is_match {
                            "match"
                        } else {
                            "no-match"
                        }
                    );
                }
            }
            Err(error) => {
                eprintln!("framematch: {error}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(EXIT_ERROR)
    } else if matched {
        ExitCode::from(EXIT_MATCHED)
    } else {
        ExitCode::SUCCESS
    }
}

/// One video's MatchVideo stream; returns its final verdicts.
async fn scan_video(
    client: &mut pb::matcher_client::MatcherClient<Connection>,
    path: &Path,
    args: &ScanArgs,
    send_images: bool,
) -> Result<Vec<pb::Verdict>, Error> {
    let sampling = SamplingOptions {
        seconds_per_hash: args.seconds_per_hash,
        every_frame: false,
    };
    let options = pb::MatchOptions {
        banks: args.banks.clone(),
        max_distance: args.max_distance,
        dihedral: args.dihedral,
        query_match_threshold_pct: args.query_threshold,
        reference_match_threshold_pct: args.reference_threshold,
        min_run_ms: args.min_run_ms,
        ..Default::default()
    };
    let context = format!("scanning {}", path.display());
    if send_images {
        return scan_images(client, path, sampling, options, &context).await;
    }
    // Hashing locally first costs little more than decoding (ffmpeg decodes every frame either
    // way), and gives the exact frame count, so the server can finalise verdicts at the last
    // frame (expected_frame_count).
    let owned = path.to_path_buf();
    let dihedral = args.dihedral;
    let hashed = tokio::task::spawn_blocking(move || hash_video_file(&owned, sampling, dihedral))
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
    let count = u32::try_from(hashed.frames.len()).ok();
    let options = pb::MatchOptions {
        expected_frame_count: count,
        ..options
    };
    let requests: Vec<pb::MatchRequest> = hashed
        .frames
        .iter()
        .enumerate()
        .map(|(i, frame)| pb::MatchRequest {
            options: (i == 0).then(|| options.clone()),
            frame: Some(pb::Frame {
                embeddings: Vec::new(),
                frame_index: u32::try_from(frame.frame_index).unwrap_or(u32::MAX),
                timestamp_ms: timestamp_ms(frame.timestamp_s),
                signal: Some(pb::frame::Signal::Pdq(video_signal(frame, dihedral))),
            }),
        })
        .collect();
    if requests.is_empty() {
        return Err(Error::NoFrames {
            path: path.to_path_buf(),
        });
    }
    collect_verdicts(client, tokio_stream::iter(requests), &context).await
}

/// `--send-images`: frames are decoded, JPEG-encoded and sent as they come, so memory stays at a
/// few frames whatever the video's length. The count is not known up front.
async fn scan_images(
    client: &mut pb::matcher_client::MatcherClient<Connection>,
    path: &Path,
    sampling: SamplingOptions,
    options: pb::MatchOptions,
    context: &str,
) -> Result<Vec<pb::Verdict>, Error> {
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::MatchRequest>(4);
    let owned = path.to_path_buf();
    let producer = tokio::task::spawn_blocking(move || -> Result<u64, Error> {
        let mut options = Some(options);
        let mut sent = 0;
        for_each_jpeg_frame(&owned, sampling, |frame| {
            let request = pb::MatchRequest {
                options: options.take(),
                frame: Some(frame),
            };
            // A failed send: the stream is gone; its status says why.
            let open = tx.blocking_send(request).is_ok();
            sent += u64::from(open);
            open
        })?;
        Ok(sent)
    });
    let verdicts = collect_verdicts(
        client,
        tokio_stream::wrappers::ReceiverStream::new(rx),
        context,
    )
    .await;
    let sent = producer.await.map_err(|e| Error::Task(e.to_string()))??;
    if sent == 0 {
        return Err(Error::NoFrames {
            path: path.to_path_buf(),
        });
    }
    verdicts
}

/// Runs one MatchVideo stream to its end and keeps the final verdicts.
async fn collect_verdicts(
    client: &mut pb::matcher_client::MatcherClient<Connection>,
    requests: impl tokio_stream::Stream<Item = pb::MatchRequest> + Send + 'static,
    context: &str,
) -> Result<Vec<pb::Verdict>, Error> {
    let mut responses = client
        .match_video(requests)
        .await
        .map_err(|s| rpc_error(context, s))?
        .into_inner();
    let mut verdicts = FinalVerdicts::default();
    while let Some(response) = responses
        .message()
        .await
        .map_err(|s| rpc_error(context, s))?
    {
        match response.result {
            Some(pb::match_response::Result::Verdict(verdict)) => verdicts.record(verdict),
            Some(pb::match_response::Result::Summary(_)) => break,
            Some(pb::match_response::Result::Frame(_)) | None => {}
        }
    }
    Ok(verdicts.into_verdicts())
}

/// `framematch bench`: builds the payload, runs the load and prints the report.
///
/// # Errors
/// [`Error::Loadgen`] for bad settings or unreadable inputs, [`Error::Usage`] for a bad duration.
pub async fn bench(args: BenchArgs, server: &ClientOptions) -> Result<(), Error> {
    use crate::loadgen::{self, LoadConfig, Payload};
    let payload = if args.jpeg_720p {
        let images = args.images.clone();
        let frames = tokio::task::spawn_blocking(move || loadgen::jpeg_720p_frames(&images))
            .await
            .map_err(|e| Error::Task(e.to_string()))??;
        Payload::Jpeg(frames)
    } else {
        match &args.hashes {
            Some(path) => Payload::Hashes(loadgen::read_hashes(path)?),
            None => Payload::Hashes(loadgen::random_hashes(4096, 6)),
        }
    };
    let duration = match args.duration_s {
        Some(s) if s.is_finite() && s > 0.0 => Some(std::time::Duration::from_secs_f64(s)),
        Some(s) => return Err(Error::Usage(format!("--duration-s {s}: must be positive"))),
        None => None,
    };
    let config = LoadConfig {
        client: server.clone(),
        streams: args.streams,
        frames_per_stream: args.frames_per_stream,
        rate: args.rate,
        duration,
        max_in_flight: args.max_in_flight,
        payload,
        server_pid: args.server_pid,
    };
    let report = loadgen::run(&config).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| Error::Task(e.to_string()))?
        );
    } else {
        println!("{}", report.to_markdown());
    }
    Ok(())
}

/// Seconds as whole milliseconds, rounded to nearest.
fn timestamp_ms(seconds: f32) -> u64 {
    let ms = (f64::from(seconds) * 1000.0).round();
    if ms.is_finite() && ms >= 0.0 {
        ms as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_flags_parse_each_optional_part() {
        let parse = |text: &str| text.parse::<EmbeddingArg>();
        assert_eq!(
            parse("sscd"),
            Ok(EmbeddingArg {
                name: "sscd".into(),
                threshold: 0.0,
                dimension: 0,
                metric: None,
            })
        );
        assert_eq!(
            parse("mine:0.9:256:dot"),
            Ok(EmbeddingArg {
                name: "mine".into(),
                threshold: 0.9,
                dimension: 256,
                metric: Some(crate::model::Metric::Dot),
            })
        );
        assert_eq!(
            parse("s::64").map(|a| (a.threshold, a.dimension)),
            Ok((0.0, 64))
        );
        assert!(parse("").is_err());
        assert!(parse("s:high").is_err_and(|e| e.contains("threshold \"high\"")));
        assert!(parse("s:0.5:64:l2").is_err_and(|e| e.contains("unknown embedding metric")));
        assert!(parse("s:0.5:64:dot:x").is_err_and(|e| e.contains("extra part")));
    }

    #[test]
    fn file_kinds_come_from_the_first_bytes() {
        assert_eq!(kind_of(b"\x89PNG\r\n\x1a\n0000"), FileKind::Image);
        assert_eq!(kind_of(b"\xff\xd8\xff\xe0\x00\x10JFIF"), FileKind::Image);
        assert_eq!(kind_of(b"0,100,abcd,0.000\n"), FileKind::Text);
        assert_eq!(kind_of(b"[\"ab,100,0.0\"]"), FileKind::Text);
        // An MP4 box header has NUL bytes.
        assert_eq!(kind_of(b"\x00\x00\x00\x20ftypisom"), FileKind::Media);
        assert_eq!(kind_of(b""), FileKind::Media);
        // A multi-byte character cut by the end of the sample is still text.
        assert_eq!(
            kind_of(
                "0,100,é"
                    .as_bytes()
                    .split_last()
                    .map_or(&[][..], |(_, rest)| rest)
            ),
            FileKind::Text
        );
    }

    fn verdict(id: i64, status: pb::VerdictStatus, is_match: bool) -> pb::Verdict {
        pb::Verdict {
            source: Some(pb::ReferenceSource {
                reference_id: id,
                ..Default::default()
            }),
            is_match,
            status: status as i32,
            ..Default::default()
        }
    }

    #[test]
    fn only_the_last_final_verdict_per_reference_is_kept() {
        let mut verdicts = FinalVerdicts::default();
        verdicts.record(verdict(7, pb::VerdictStatus::Provisional, true));
        verdicts.record(verdict(3, pb::VerdictStatus::Final, false));
        verdicts.record(verdict(7, pb::VerdictStatus::Final, false));
        verdicts.record(verdict(3, pb::VerdictStatus::Final, true));
        let kept: Vec<(i64, bool)> = verdicts
            .into_verdicts()
            .iter()
            .map(|v| (v.source.as_ref().map_or(0, |s| s.reference_id), v.is_match))
            .collect();
        assert_eq!(kept, vec![(3, true), (7, false)]);
    }

    #[test]
    fn timestamps_round_to_milliseconds() {
        assert_eq!(timestamp_ms(2.0 / 30.0), 67);
        assert_eq!(timestamp_ms(0.0), 0);
        assert_eq!(timestamp_ms(-1.0), 0);
    }
}
