# syntax=docker/dockerfile:1.7
#
# framematch container image: `docker build -t framematch:0.1.0 .` (the helm chart's default
# image is framematch:<appVersion>). Two stages: the official Rust image builds the release
# binary; a slim Debian runs it as a non-root user.
#
# ffmpeg is not in the image by default: the server (`framematch serve`) never runs it; only the
# CLI's video commands do (`hash clip.mp4`, `ref add bank clip.mp4`, `scan`, `vpdq-match --cpp`).
# For an image that also seeds references from videos (a Job, say), build with
#   docker build --build-arg WITH_FFMPEG=true -t framematch:0.1.0-ffmpeg .
# which adds Debian 12's ffmpeg 5.1 (the version README "Conformance" was checked with).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# --- build -------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
# protox compiles the protos in build.rs (no protoc), rusqlite bundles SQLite: the Rust image's
# C toolchain is all the build needs. .cargo/config.toml carries the x86-64-v2 target CPU level
# (README "Building"); it only applies to x86_64 targets.
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo ./.cargo
COPY proto ./proto
COPY src ./src
# Cargo.toml names the bench targets' files; they must exist for the manifest to load.
COPY bench/*.rs ./bench/
# The registry and target caches survive between builds (BuildKit); the binary is copied out of
# the cached target dir because cache mounts are not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin framematch \
    && install -D -m 0755 target/release/framematch /out/framematch

# --- runtime -----------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
ARG WITH_FFMPEG=false
RUN set -eux; \
    if [ "$WITH_FFMPEG" = "true" ]; then \
        apt-get update; \
        apt-get install -y --no-install-recommends ffmpeg; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --system --gid 10001 framematch; \
    useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin framematch; \
    install -d -o 10001 -g 10001 -m 0750 /data

COPY --from=build /out/framematch /usr/local/bin/framematch

# Every `serve` flag has a FRAMEMATCH_* variable (README "Configuration"); these are the image's
# defaults, overridden by the chart or `docker run -e`.
ENV FRAMEMATCH_LISTEN=0.0.0.0:50051 \
    FRAMEMATCH_METRICS_LISTEN=0.0.0.0:9090 \
    FRAMEMATCH_DATA_DIR=/data \
    FRAMEMATCH_LOG_FORMAT=json \
    RUST_LOG=info

# The numeric uid lets Kubernetes check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /data
# The embedded store (SQLite). In PostgreSQL mode (FRAMEMATCH_STORE=postgres://...) it stays empty.
VOLUME ["/data"]
# gRPC (health, reflection, framematch.v1) and Prometheus /metrics.
EXPOSE 50051 9090

# framematch handles SIGTERM itself (health turns NOT_SERVING, open streams get
# FRAMEMATCH_SHUTDOWN_GRACE_MS, telemetry is flushed), so it runs as PID 1 with no init.
# `docker run IMAGE` serves; `docker run IMAGE bank list --server ...` runs a client command.
ENTRYPOINT ["/usr/local/bin/framematch"]
CMD ["serve"]

LABEL org.opencontainers.image.title="framematch" \
      org.opencontainers.image.description="Perceptual-hash (PDQ/vPDQ) video matcher over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"
