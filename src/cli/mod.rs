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

/// `println!` for command output: a closed stdout (the reader of `framematch stats | head -1`
/// has gone) ends the process quietly with exit 0 instead of panicking, as `println!` does on
/// EPIPE. Any other write error is reported on stderr and exits 2.
#[macro_export]
#[doc(hidden)]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::print_line(::std::format_args!($($arg)*))
    };
}

/// Writes one line of command output to stdout; see [`outln!`](crate::outln).
#[doc(hidden)]
pub fn print_line(line: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"));
    exit_unless_written(written);
}

/// Writes `text` (whole lines) to stdout and flushes it, as [`print_line`] does for one line.
pub(crate) fn print_text(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    exit_unless_written(written);
}

/// Exits quietly (0) when stdout's reader has gone (`| head`), with an error (2) on any other
/// write failure.
fn exit_unless_written(written: std::io::Result<()>) {
    match written {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(error) => {
            eprintln!("framematch: cannot write to stdout: {error}");
            std::process::exit(i32::from(EXIT_ERROR));
        }
    }
}

mod admin;
mod banks;
mod hashing;
mod scan;
pub mod serve;
pub mod transfer;

pub use admin::*;
pub use banks::*;
pub use hashing::*;
pub use scan::*;

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

    #[test]
    fn timestamps_round_to_milliseconds() {
        assert_eq!(timestamp_ms(2.0 / 30.0), 67);
        assert_eq!(timestamp_ms(0.0), 0);
        assert_eq!(timestamp_ms(-1.0), 0);
    }
}
