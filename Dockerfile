# syntax=docker/dockerfile:1
#
# One image for every pgevents binary: migrate, producer, consumer, purger, gateway, eventsctl.
# Compose picks the binary per service (its `entrypoint`).
#
#   docker build -t pgevents .
#   docker run --rm pgevents producer --help
#
# Stages: `chef` (Rust + cargo-chef) → `planner` (the dependency recipe; changes only when a
# Cargo.toml or Cargo.lock does) → `builder` (dependencies first, cached as their own layer, then
# the workspace) → `runtime` (Debian slim, non-root, the six binaries and nothing else).

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
RUN cargo install cargo-chef --locked --version ^0.1
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# Dependencies only: this layer is reused until the dependency graph changes.
RUN cargo chef cook --release --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bins -p services -p producer -p consumer -p purger \
       -p gateway -p eventsctl \
 && mkdir -p /out \
 && cp target/release/migrate target/release/producer target/release/consumer \
       target/release/purger target/release/gateway target/release/eventsctl /out/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 pgevents \
 && useradd --system --uid 10001 --gid pgevents --no-create-home --shell /usr/sbin/nologin pgevents
COPY --from=builder /out/ /usr/local/bin/
USER 10001:10001
ENV LOG_LEVEL=info
# /healthz and /metrics when HTTP_ADDR is set (compose sets 0.0.0.0:8081..8083); the gateway's
# streams, demo page, /healthz and /metrics on 8084.
EXPOSE 8081 8082 8083 8084
CMD ["producer", "--help"]
