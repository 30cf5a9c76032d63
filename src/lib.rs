//! framematch: a shared perceptual-hash matcher that keeps known violent videos (filmed suicides,
//! attacks, executions) from being published again once one platform has found them.
//!
//! Upload services stream an upload's frames over gRPC and get an answer per frame, then a
//! verdict per matched reference for the whole video. Platforms share hashes, never media.
//!
//! # Layout
//! - [`hash`]: the `PdqHash` type and its distance; [`hash::pdq`] computes PDQ from pixels,
//!   bit-compatible with Meta's reference (shared/PDQ.md §1).
//! - [`index`]: the in-memory frame index, one trait over two engines: `exact` (linear popcount
//!   scan, the oracle) and `hnsw` (hnsw_rs with our own bit distance). Tombstones for withdrawals.
//! - [`embed`]: the server's own embedding models (SSCD through ONNX Runtime, issue #11), behind
//!   [`embed::SpaceModel`] (the trait the API calls them through).
//! - [`matching`]: one frame against the index, and a stream's frames into vPDQ-style verdicts.
//! - [`store`]: the durable reference store (embedded SQLite by default) with its change log.
//! - [`model`]: the domain types of the data model (DESIGN.md §2).
//! - [`api`]: the gRPC edge: state, conversions, status codes, the Matcher and Banks services.
//! - [`server`]: `serve(listener, config, shutdown)`; health, reflection, index load.
//! - [`video`]: decoding with the real FFmpeg (a subprocess) and vPDQ frame selection and hashing;
//!   [`hash::vpdq`] reads and writes vPDQ files and compares two videos as vPDQ does.
//! - [`formats`]: hash-list exchange formats (threatexchange `pdq` lines and CSV, vPDQ text and
//!   JSON) read into references to import and written from a bank's export.
//!   [`cli::transfer`] is the client side: `framematch export` and `import`.
//! - [`loadgen`]: the `framematch bench` load generator (many MatchVideo streams; issue #6).
//! - [`config`]: plain configuration values; [`cli`]: the command line by command group
//!   ([`cli::serve`] validates the flags and environment once into an [`api::ServeConfig`]).
//! - [`follow`]: `serve --follow`: mirrors the banks a partner server shares, from its change feed.
//! - [`client`]: the one way client commands and the load generator connect (TLS, API key);
//!   [`tls`]: PEM certificates and keys, checked when the configuration is read.
//! - [`telemetry`]: logs, one span per RPC or stream, metrics (Prometheus `/metrics` and OTLP).
//! - [`pb`]: generated protobuf code, nothing else.
//!
//! # One frame's path
//! 1. A client sends `pb::MatchRequest` on `MatchVideo`.
//! 2. `api::matcher` opens a [`matching::Session`] and a task per stream, answering through a
//!    small bounded channel (backpressure).
//! 3. `api::convert` validates the frame; a malformed frame ends the stream with INVALID_ARGUMENT.
//! 4. `hash::pdq` runs on the blocking pool behind a semaphore (skipped for precomputed hashes),
//!    then the index is searched under a read lock never held across an `.await`.
//! 5. `Session::record` tallies the hits; the answer goes back as a `pb::FrameResult`. When the
//!    client closes its side, one verdict per matched reference and a summary follow.
//!
//! The store is never on this path: the index is loaded from it at start-up, and every write is
//! committed to it before it is applied to the index and acknowledged.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod embed;
pub mod follow;
pub mod formats;
pub mod hash;
pub mod index;
pub mod loadgen;
pub mod matching;
pub mod model;
pub mod pb;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod video;
