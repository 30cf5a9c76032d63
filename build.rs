//! Compiles `proto/framematch/v1/*.proto` with protox (a pure-Rust protobuf compiler, so no system
//! `protoc` is needed) and generates prost messages plus tonic clients and servers into OUT_DIR.
//! The encoded descriptor set is written beside them for gRPC server reflection.

use std::path::PathBuf;

use anyhow::Context;
use protox::prost::Message;

const PROTO_DIR: &str = "proto";
const PROTOS: &[&str] = &[
    "proto/framematch/v1/common.proto",
    "proto/framematch/v1/match.proto",
    "proto/framematch/v1/banks.proto",
    "proto/framematch/v1/admin.proto",
    "proto/framematch/v1/exchange.proto",
];

fn main() -> anyhow::Result<()> {
    // tonic-prost-build does not emit these itself (STYLE.md §1.2).
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR is not set")?);
    let descriptors = protox::compile(PROTOS, [PROTO_DIR]).context("parsing the .proto files")?;
    std::fs::write(
        out_dir.join("framematch_descriptor.bin"),
        descriptors.encode_to_vec(),
    )
    .context("writing the descriptor set")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // prost's codec, with decoding errors as INVALID_ARGUMENT (src/pb/codec.rs).
        .codec_path("crate::pb::codec::WireCodec")
        .compile_fds(descriptors)
        .context("generating Rust code from the descriptors")?;
    Ok(())
}
