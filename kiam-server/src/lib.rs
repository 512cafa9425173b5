//! kiam-server: the only kiam component allowed to assume roles.
//!
//! Layers, kept apart: [`policy`] (pod and namespace annotations → role decision, no
//! Kubernetes or AWS types), [`index`] (kube-rs watchers, pods by UID), [`credentials`]
//! (STS and the cache), [`service`] (the gRPC API), [`tls`] (mutual TLS), [`metrics`].

pub mod config;
pub mod credentials;
pub mod index;
pub mod metrics;
pub mod policy;
pub mod service;
pub mod tls;

/// The gRPC API, generated in `kiam-proto`.
pub use kiam_proto as proto;
