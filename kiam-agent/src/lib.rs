//! The kiam node agent's parts: the eBPF [`loader`], its [`pins`] on [`bpffs`], caller resolution
//! ([`resolver`], [`cgroup`], [`identity`]), the instance-metadata API ([`api`], [`imds`],
//! [`route`], [`token`], [`forward`]), what is asked of the servers ([`upstream`],
//! [`client`]), and operations ([`config`], [`metrics`], [`status`], [`health`], [`address`], [`taint`]). The
//! `kiam-agent` binary wires them together; the fuzz targets drive them directly.
#![forbid(unsafe_code)]

pub mod address;
pub mod api;
pub mod bpffs;
pub mod caps;
pub mod cgroup;
pub mod client;
pub mod config;
pub mod forward;
pub mod health;
pub mod identity;
pub mod imds;
pub mod loader;
pub mod metrics;
pub mod pins;
pub mod port;
pub mod rate;
pub mod resolver;
pub mod route;
pub mod status;
pub mod taint;
pub mod token;
pub mod upstream;
