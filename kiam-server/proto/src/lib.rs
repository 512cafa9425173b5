//! The gRPC API between kiam agents and kiam servers, generated from `kiam.proto`.
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("kiam.v1");
