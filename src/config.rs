//! Configuration values: plain data that the command line's flags are validated into (see
//! [`crate::cli::serve`]) and that the runtime modules take. Imports no runtime module; the
//! validation that needs runtime types lives with those types' owners.

use std::path::PathBuf;

/// Hard caps on what one request or the whole server accepts (DESIGN.md §6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded image, in bytes.
    pub max_image_bytes: usize,
    /// Largest picture, in pixels (width x height), encoded or raw.
    pub max_pixels: u64,
    /// Most frames in one MatchVideo or AddReference stream.
    pub max_frames_per_stream: u32,
    /// Most MatchVideo streams open at once.
    pub max_concurrent_streams: usize,
    /// Most hashing jobs waiting for a worker before new ones are refused.
    pub max_queued_hashes: usize,
    /// Largest decoded picture, in bytes: width x height x bytes per pixel of the decoded form
    /// (16-bit samples and alpha included), checked from the header before decoding.
    pub max_decode_bytes: u64,
    /// Memory all decodes in flight may hold together, in bytes: each picture reserves its
    /// working set (see `api::decode_cost`) before it is decoded and returns it when hashed.
    pub decode_memory: u64,
}

impl Limits {
    /// Largest gRPC message tonic accepts: a frame at the image cap plus room for the other fields.
    /// Above it tonic answers OUT_OF_RANGE itself; at or under it our own checks answer
    /// RESOURCE_EXHAUSTED with the numbers.
    pub fn max_message_bytes(&self) -> usize {
        self.max_image_bytes.saturating_add(64 * 1024)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_image_bytes: 16 * 1024 * 1024,
            // 8K UHD is 33.2 MP; 50 MP leaves room for stills while keeping one decode under
            // 150 MiB of RGB.
            max_pixels: 50_000_000,
            max_frames_per_stream: 200_000,
            max_concurrent_streams: 1024,
            max_queued_hashes: 4096,
            // 50 MP of 8-bit RGB is 150 MB; 7071x7071 of 16-bit RGBA (400 MB) is refused.
            max_decode_bytes: 256 * 1024 * 1024,
            // One picture at both limits needs at most 256 MiB + 13 B x 50 MP (~0.91 GiB); the
            // chart's 2Gi memory limit keeps the rest for the index and requests in flight.
            decode_memory: 1024 * 1024 * 1024,
        }
    }
}

/// What `--follow` asks for: the partner to mirror and how (see [`crate::follow`]).
#[derive(Clone, PartialEq, Eq)]
pub struct FollowConfig {
    /// The partner's URL, without a trailing slash: also the name under which its cursor and
    /// mirrored ids are kept.
    pub url: String,
    /// The API key sent to the partner.
    pub key: String,
    /// Local organisations the mirrored banks are shared with (empty: the default organisation).
    pub share_with: Vec<String>,
    /// The CA trusted for an https:// partner (default: the system's roots).
    pub tls_ca: Option<PathBuf>,
    /// This platform's client certificate for a partner that requires one.
    pub tls_client_cert: Option<PathBuf>,
    /// Its private key.
    pub tls_client_key: Option<PathBuf>,
}

impl std::fmt::Debug for FollowConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("FollowConfig")
            .field("url", &self.url)
            .field("share_with", &self.share_with)
            .finish_non_exhaustive()
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A configuration value that is out of range or malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --{flag}: {reason}")]
pub struct Error {
    /// The flag, without dashes.
    pub flag: &'static str,
    /// What is wrong and what is allowed.
    pub reason: String,
}

/// An [`Error`] for `--flag`.
pub fn invalid(flag: &'static str, reason: impl Into<String>) -> Error {
    Error {
        flag,
        reason: reason.into(),
    }
}
