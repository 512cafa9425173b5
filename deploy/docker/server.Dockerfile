# kiam-server image. Build from the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t kiam-server .
# (Not built in this project's CI: its machines have no container engine.)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --package kiam-server

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/kiam-server /usr/local/bin/kiam-server
USER 65532
ENTRYPOINT ["/usr/local/bin/kiam-server"]
