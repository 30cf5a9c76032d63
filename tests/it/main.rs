//! framematch's single integration-test binary (STYLE.md §3.6): one `mod` per area, all linked
//! once. Tests start the real server on 127.0.0.1:0 and speak real gRPC, or run the real binary.

mod support;

mod binary;
mod embed_model;
mod embeddings;
mod errors;
mod exchange_formats;
mod follow;
mod helm;
mod index_conformance;
mod loadgen;
mod matching;
mod memory;
mod pdq_conformance;
mod replicas;
mod sharing;
mod statuses;
mod telemetry;
mod tls;
mod video;
