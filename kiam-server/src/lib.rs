//! kiam-server: the only kiam component allowed to assume roles.
//!
//! Layers, kept apart: `policy` (pod and namespace annotations → role decision, no Kubernetes
//! or AWS types); the Kubernetes index, credentials and gRPC service follow.

pub mod policy;
