# kiam-agent image. Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t kiam-agent .
# (Not built in this project's CI: its machines have no container engine.)
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends llvm-22-dev libpolly-22-dev \
    && rustup toolchain install nightly --profile minimal --component rust-src \
    && LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 \
       --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo xtask build-ebpf && cargo build --release --locked --package kiam-agent

FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/kiam-agent /usr/local/bin/kiam-agent
ENTRYPOINT ["/usr/local/bin/kiam-agent"]
CMD ["run"]
