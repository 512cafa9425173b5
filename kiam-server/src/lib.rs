//! kiam-server: the only kiam component allowed to assume roles.
//!
//! Layers, kept apart: [`policy`] (annotations, ARNs, namespace and pass-through rules, no
//! Kubernetes or AWS types), [`decision`] (what a pod may have: pure), [`refusal`] (why not:
//! typed reasons, codes, labels),
//! [`containers`] (per-container roles), [`index`] (kube-rs watchers, pods by UID), [`credentials`] (STS and the cache),
//! [`identity`] (which node an agent proved: tokens reviewed, certificates),
//! [`service`] (the thin gRPC layer), [`upkeep`] (prefetch and refresh: which credentials are held), [`events`] (Kubernetes Events), [`tls`] (mutual TLS),
//! [`metrics`], [`clock`] (the clocks tests control).

pub mod clock;
pub mod config;
pub mod containers;
pub mod credentials;
pub mod decision;
pub mod events;
pub mod health;
pub mod identity;
pub mod index;
pub mod metrics;
pub mod policy;
pub mod refusal;
pub mod service;
pub mod sessions;
pub mod tls;
pub mod upkeep;

/// The gRPC API, generated in `kiam-proto`.
pub use kiam_proto as proto;
