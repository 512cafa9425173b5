//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is not built here: that needs nightly and bpf-linker, and `cargo check`,
//! `clippy` and unit tests of the agent must work without them. Without the object the agent
//! still builds, warns, and refuses to start with the command to run.

use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=KIAM_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let object = match env::var_os("KIAM_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => manifest.join("../target/bpfel-unknown-none/release/kiam-ebpf"),
    };
    println!("cargo::rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR")?).join("kiam-ebpf.o");
    if object.is_file() {
        fs::copy(&object, &out)?;
    } else {
        println!(
            "cargo::warning=eBPF object {} not found: this kiam-agent cannot load its programs; run `cargo xtask build-ebpf` and rebuild",
            object.display()
        );
        fs::write(&out, [])?;
    }
    Ok(())
}
