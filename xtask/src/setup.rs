//! `cargo xtask setup`: installs what building and testing kiam-rs needs on a Debian-like
//! machine, and skips every step that is already done.

use std::{env, ffi::OsString, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::run;

/// Debian packages: LLVM 22 for bpf-linker (must match nightly's LLVM; its llvm-objdump
/// compares eBPF objects), bpftool for inspection and the tests, iproute2/util-linux/curl for
/// the test topology, iptables for the DNAT a kube-proxy Service installs (node-safety tests),
/// iperf3 for `cargo xtask bench`, prometheus for promtool (rules, alerts and metrics lint);
/// for `cargo xtask image`: umoci (OCI assembly), runc (running the images), the arm64 cross
/// toolchain and glibc, qemu-user-static (running arm64 binaries), ca-certificates (the
/// server image's CA bundle); for the node lab: containerd (with its CRI plugin) and the CNI
/// plugins, debootstrap (the workload image), protobuf-compiler (the CRI bindings' build).
/// (kubectl, for rendering the kustomize bases, is not in Debian: it is checked for, not
/// installed.)
const APT_PACKAGES: [&str; 19] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "bpftool",
    "iproute2",
    "util-linux",
    "curl",
    "iptables",
    "iperf3",
    "prometheus",
    "umoci",
    "runc",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "qemu-user-static",
    "ca-certificates",
    "containerd",
    "containernetworking-plugins",
    "debootstrap",
    "protobuf-compiler",
];
/// Disassembles eBPF objects (from llvm-22).
pub const LLVM_OBJDUMP: &str = "llvm-objdump-22";
/// Cross-compilation targets `cargo xtask image` builds for.
const RUST_TARGETS: [&str; 1] = ["aarch64-unknown-linux-gnu"];
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Python packages for the tests, in the project's `.venv`: moto as the STS server, and the
/// AWS CLI and boto3 as real clients.
/// Also the offline deploy validation: Helm as a library, the Kubernetes schemas, and a CEL
/// interpreter for the admission policies.
const PYTHON_PACKAGES: [&str; 6] = [
    "moto[server]==5.2.1",
    "boto3",
    "awscli",
    "helm-python-sdk",
    "kubernetes-validate",
    "cel-python==0.5.0",
];

/// The project-local virtualenv the tests take moto and the AWS CLI from.
pub fn venv() -> PathBuf {
    crate::workspace_root().join(".venv")
}

/// `$PATH` with `~/.cargo/bin` in front (where `cargo install` puts bpf-linker).
pub fn path_with_cargo_bin() -> OsString {
    let mut paths: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
    {
        let bin = home.join("bin");
        if !paths.contains(&bin) {
            paths.insert(0, bin);
        }
    }
    env::join_paths(paths).unwrap_or_default()
}

fn output(cmd: &mut Command) -> Option<String> {
    cmd.env("PATH", path_with_cargo_bin());
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn apt_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn rustup(args: &[&str]) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(args).env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

fn python() -> anyhow::Result<()> {
    let venv = venv();
    // The list installed last: a changed list installs again.
    let stamp = venv.join("kiam-packages");
    let wanted = PYTHON_PACKAGES.join("\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        eprintln!("setup: {} present", venv.display());
        return Ok(());
    }
    if !venv.join("bin/pip").exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).context(
            "creating the test virtualenv (python3 -m venv; apt-get install python3-venv)",
        )?;
    }
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(PYTHON_PACKAGES))?;
    std::fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

/// The AWS SDK for JavaScript v3 (versions pinned in tests/js/package.json).
fn javascript() -> anyhow::Result<()> {
    let dir = crate::workspace_root().join("tests/js");
    if dir
        .join("node_modules/@aws-sdk/credential-providers")
        .exists()
    {
        eprintln!("setup: JavaScript SDK present");
        return Ok(());
    }
    if output(Command::new("npm").arg("--version")).is_none() {
        if !crate::is_root() {
            bail!("setup needs Node.js and npm (apt-get install nodejs npm)");
        }
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "nodejs", "npm"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    run(Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--no-package-lock",
            "--loglevel=error",
        ])
        .arg("--prefix")
        .arg(&dir))
}

pub fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !apt_installed(p))
        .collect();
    if missing.is_empty() {
        eprintln!("setup: apt packages present");
    } else {
        if !crate::is_root() {
            bail!(
                "setup needs these Debian packages: {} (run as root, or `sudo apt-get install` them)",
                missing.join(" ")
            );
        }
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    let toolchains = output(&mut rustup(&["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run(&mut rustup(&[
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("the eBPF programs need a nightly toolchain")?;
    }
    let components = output(&mut rustup(&[
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(&mut rustup(&[
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let stable = output(&mut rustup(&["component", "list", "--installed"])).unwrap_or_default();
    for component in ["clippy", "rustfmt"] {
        if !stable.lines().any(|l| l.starts_with(component)) {
            run(&mut rustup(&["component", "add", component]))?;
        }
    }

    let targets = output(&mut rustup(&["target", "list", "--installed"])).unwrap_or_default();
    for target in RUST_TARGETS {
        if !targets.lines().any(|l| l.trim() == target) {
            run(&mut rustup(&["target", "add", target]))?;
        }
    }

    python()?;
    javascript()?;

    let fuzz = output(Command::new("cargo").args(["fuzz", "--version"])).unwrap_or_default();
    if fuzz.contains(CARGO_FUZZ_VERSION) {
        eprintln!("setup: cargo-fuzz {CARGO_FUZZ_VERSION} present");
    } else {
        run(Command::new("cargo")
            .args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
            ])
            .env("PATH", path_with_cargo_bin())
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO"))?;
    }
    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if linker.contains(BPF_LINKER_VERSION) {
        eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} present");
    } else {
        // The default features want LLVM 23; nightly 1.97 is LLVM 22.
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("PATH", path_with_cargo_bin())
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO"))?;
    }
    crate::machine::prepare()
}
