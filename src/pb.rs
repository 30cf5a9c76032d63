//! Generated protobuf and gRPC code for `framematch.v1`: the only home of generated code.
//!
//! Wire types are always written `pb::MatchRequest` elsewhere; conversions to and from domain
//! types live in `api::convert`.

#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

pub mod codec;

tonic::include_proto!("framematch.v1");

/// The encoded `FileDescriptorSet` of every framematch proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("framematch_descriptor");
