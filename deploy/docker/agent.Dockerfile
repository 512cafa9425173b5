# kiam-agent image, for your own CI. Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t kiam-agent .
# This project builds the same image without Docker: `cargo xtask image` (umoci, from scratch,
# smoke-tested with runc; arm64 too).
#
# Toolchains are pinned: Rust 1.95.0 builds user space; the eBPF programs need a nightly whose
# LLVM (22) matches bpf-linker's, so nightly is pinned by date and linked as `nightly` (what
# `cargo xtask build-ebpf` asks for).
FROM docker.io/library/rust:1.95.0-bookworm AS build
ARG NIGHTLY=nightly-2026-05-20
ARG BPF_LINKER=0.13.0
RUN apt-get update \
    && apt-get install -y --no-install-recommends llvm-22-dev libpolly-22-dev \
    && rm -rf /var/lib/apt/lists/* \
    && rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src \
    && rustup toolchain link nightly "$(rustc +"$NIGHTLY" --print sysroot)" \
    && LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --locked --version "$BPF_LINKER" \
       --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo xtask build-ebpf && cargo build --release --locked --package kiam-agent

# glibc and libgcc only; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/kiam-agent /usr/local/bin/kiam-agent
# Loads eBPF programs: Kubernetes grants the capabilities it adds to uid 0 only.
USER 0:0
ENTRYPOINT ["/usr/local/bin/kiam-agent"]
CMD ["run"]
