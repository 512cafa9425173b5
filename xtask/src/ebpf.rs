//! The kernel programs' builds: `cargo xtask build-ebpf` (the object the agent embeds), its
//! `--variant` (the upgrade test's object), clippy for the eBPF crate, and the check that the
//! object does not depend on the architecture aya's bindings were chosen for.
//!
//! All of them run `cargo +nightly` with `build-std=core` for `bpfel-unknown-none`, linked by
//! bpf-linker with BTF.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{run, setup, stdout_of, workspace_root};

/// Where `build-ebpf` leaves the object; `kiam-agent/build.rs` embeds it from here.
pub const OBJECT: &str = "target/bpfel-unknown-none/release/kiam-ebpf";

/// The upgrade test's variant gets its own target directory, so neither build undoes the
/// other; `build-ebpf --variant` leaves its object at `VARIANT_OBJECT`.
const VARIANT_DIR: &str = "target/ebpf-variant";
pub const VARIANT_OBJECT: &str = "target/ebpf-variant/bpfel-unknown-none/release/kiam-ebpf";

/// Where the eBPF object built with aya's aarch64 bindings goes.
const AARCH64_DIR: &str = "target/ebpf-aarch64";

/// `cargo +nightly <subcommand>` for the eBPF crate. It needs rustup's proxy from PATH, not the
/// toolchain cargo in $CARGO, and none of the variables the outer stable `cargo xtask` set.
fn nightly(subcommand: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args([
        "+nightly",
        subcommand,
        "--package",
        "kiam-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ])
    // BTF is only emitted with debug info and the linker's --btf.
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
    )
    .env("PATH", setup::path_with_cargo_bin());
    without_outer_toolchain(&mut cmd);
    cmd
}

/// Forgets the toolchain this xtask was started with, so a nested `cargo +nightly` uses its own.
pub fn without_outer_toolchain(cmd: &mut Command) -> &mut Command {
    for var in [
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

pub fn build() -> anyhow::Result<()> {
    run(&mut nightly("build"))?;
    eprintln!("eBPF object: {}", workspace_root().join(OBJECT).display());
    Ok(())
}

/// The same programs built with another `KIAM_EBPF_VARIANT`: different code, as an upgrade
/// brings, with the same maps.
pub fn build_variant() -> anyhow::Result<()> {
    run(nightly("build")
        .args(["--target-dir", VARIANT_DIR])
        .env("KIAM_EBPF_VARIANT", "1"))?;
    eprintln!(
        "eBPF variant object: {}",
        workspace_root().join(VARIANT_OBJECT).display()
    );
    Ok(())
}

/// Clippy for the eBPF crate, warnings denied (the workspace's clippy excludes it).
pub fn clippy() -> anyhow::Result<()> {
    run(nightly("clippy").args(["--", "-D", "warnings"]))
}

/// The programs read the context structures (`bpf_sock_addr`, `bpf_sock_ops`, `__sk_buff`)
/// through aya's per-architecture bindings. Built with the aarch64 bindings, the object must
/// be the same instructions, relocations and sections as the one the agent embeds: then it
/// reads the same fields on arm64 kernels.
pub fn is_architecture_independent() -> anyhow::Result<()> {
    run(nightly("build")
        .args(["--target-dir", AARCH64_DIR])
        .env("AYA_BPF_TARGET_ARCH", "aarch64"))?;
    // The comparison proves nothing unless aya's bindings really were aarch64's: their build
    // script says which architecture it chose.
    let build_dir = workspace_root()
        .join(AARCH64_DIR)
        .join("bpfel-unknown-none/release/build");
    let chose_aarch64 = std::fs::read_dir(&build_dir)
        .with_context(|| format!("reading {}", build_dir.display()))?
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("aya-ebpf-bindings-")
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("output")).ok())
        .any(|out| out.contains("cargo:rustc-cfg=bpf_target_arch=\"aarch64\""));
    if !chose_aarch64 {
        bail!(
            "aya-ebpf-bindings was not built for aarch64 under {} (AYA_BPF_TARGET_ARCH ignored?)",
            build_dir.display()
        );
    }
    let native = workspace_root().join(OBJECT);
    let aarch64 = workspace_root()
        .join(AARCH64_DIR)
        .join("bpfel-unknown-none/release/kiam-ebpf");
    let dump = |object: &Path| -> anyhow::Result<String> {
        let text = stdout_of(
            Command::new(setup::LLVM_OBJDUMP)
                .args(["--disassemble", "--reloc", "--section-headers"])
                .arg(object),
        )?;
        // The first lines name the file; the sizes of the debug and BTF sections differ by
        // the source paths of aya's per-architecture bindings (`…/x86_64/…`, `…/aarch64/…`)
        // in their string tables and line info.
        Ok(text
            .lines()
            .filter(|l| !l.contains(&*object.to_string_lossy()))
            .filter(|l| !(l.contains(" .debug_") || l.contains(" .BTF")))
            .collect::<Vec<_>>()
            .join("\n"))
    };
    let (a, b) = (dump(&native)?, dump(&aarch64)?);
    if a != b {
        let first = a
            .lines()
            .zip(b.lines())
            .find(|(x, y)| x != y)
            .map(|(x, y)| format!("x86_64: {x}\naarch64: {y}"))
            .unwrap_or_else(|| "the dumps differ in length".into());
        bail!(
            "the eBPF object differs when built with aya's aarch64 bindings: the programs read an architecture-dependent context field\n{first}"
        );
    }
    let instructions = a.lines().filter(|l| l.contains("\t")).count();
    eprintln!(
        "eBPF object: identical with aya's x86_64 and aarch64 bindings ({instructions} lines of instructions and relocations)"
    );
    Ok(())
}
