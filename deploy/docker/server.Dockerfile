# kiam-server image, for your own CI. Build from the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t kiam-server .
# This project builds the same image without Docker: `cargo xtask image` (umoci, from scratch,
# smoke-tested with runc; arm64 too). The server needs no eBPF toolchain.
FROM docker.io/library/rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --package kiam-server

# glibc, libgcc and CA certificates (STS over HTTPS); no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/kiam-server /usr/local/bin/kiam-server
USER 65534:65534
ENTRYPOINT ["/usr/local/bin/kiam-server"]
