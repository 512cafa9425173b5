//! Developer commands for kiam-rs: `cargo xtask <command>`.
//!
//! - `setup`: installs what building and testing need, skipping what is already there.
//! - `build-ebpf`: builds the kernel programs into `target/bpfel-unknown-none/release/kiam-ebpf`.
//! - `test`: setup, build-ebpf, formatting, lints, unit tests, then the privileged
//!   end-to-end tests (one at a time).
//! - `bench`: release builds, then `kiam-bench run` (speed and scale, see `kiam_e2e::bench`).
//! - `image`: the agent and server images (amd64, arm64) as OCI archives, smoke-tested.
//!
//! This file holds the CLI, its dispatch and the helpers every command runs processes with;
//! each command's work is in its module (`ci` is the `test` pipeline's list of stages).

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod ci;
mod dev;
mod ebpf;
mod fuzz;
mod image;
mod lab;
mod machine;
mod setup;

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "kiam-rs developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install build and test requirements (apt packages, nightly rust-src, bpf-linker) and
    /// bring the machine into shape (bpffs mounted and shared at /sys/fs/bpf, cgroup v2).
    /// Idempotent: skips what is installed or already in place.
    Setup,
    /// Build the eBPF object with nightly and bpf-linker.
    BuildEbpf {
        /// Build the upgrade test's variant instead (other program tags), into
        /// target/ebpf-variant/.
        #[arg(long)]
        variant: bool,
    },
    /// The demo: kiam from its shipped manifests and images on the node lab (containerd with
    /// CRI and CNI, a stand-in kubelet, the API emulator, moto as STS), and the AWS CLI in
    /// two real containers getting two different roles (root, cgroup v2, BPF).
    Demo {
        /// Keep everything running until Ctrl-C.
        #[arg(long)]
        keep: bool,
        #[command(subcommand)]
        action: Option<DemoAction>,
    },
    /// Regenerate docs/flags.md from the binaries' --help.
    Docs,
    /// Write a development PKI (CA, server and agent certificates) with rcgen.
    Certs {
        /// Passed on to `kiam-dev certs` (see `cargo xtask certs -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Speed and scale with release builds (root): the hot path against a bare responder,
    /// the cost to ordinary pod traffic, a new pod's first request, agent memory, the server
    /// at 10k and 100k pods. Prints a table and writes target/bench/report.json.
    Bench {
        /// Passed on to `kiam-bench run` (see `cargo xtask bench -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the parsers and the agent's HTTP service with cargo-fuzz (nightly): each target
    /// for `--seconds`. A crash is written under fuzz/artifacts/ and must become a
    /// regression test.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets (default: all).
        targets: Vec<String>,
    },
    /// Build the agent and server images without Docker (umoci), as OCI archives under
    /// target/images/, and smoke-test them offline (runc; arm64 under qemu-user).
    Image {
        /// Architectures (default: both).
        #[arg(long, value_enum, value_delimiter = ',', default_values = ["amd64", "arm64"])]
        arch: Vec<image::Arch>,
        /// Also the node lab's own images (the sandbox and a workload with real SDKs), from
        /// the debug binaries.
        #[arg(long)]
        lab: bool,
    },
    /// Everything CI runs: setup, build-ebpf, fmt, clippy, unit tests, fuzz smoke, promtool
    /// checks, deploy validation, images (amd64 and arm64), privileged tests.
    Test {
        /// Skip the set-up step (when you know the machine is ready).
        #[arg(long)]
        no_setup: bool,
        /// Only run the privileged end-to-end tests whose name contains this.
        #[arg(long)]
        e2e_filter: Option<String>,
        /// Remove each stage's build output once it has served (target/fuzz after the fuzz
        /// smoke; the release, arm64 and image work directories after the images), for
        /// machines with little disk such as CI. Also on with KIAM_XTASK_PRUNE=1.
        #[arg(long)]
        prune: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DemoAction {
    /// Run a command in a pod's container of a running `demo --keep` (CRI ExecSync, as
    /// `kubectl exec`), e.g. `cargo xtask demo exec frontend -- aws sts get-caller-identity`.
    Exec {
        /// frontend, backend, or one of kiam's pods (kiam-agent-lab01, ...).
        pod: String,
        /// The container, when the pod runs more than one.
        #[arg(long, short)]
        container: Option<String>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command in the workspace root, echoing it, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    cmd.current_dir(workspace_root());
    eprintln!("+ {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", display(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", display(cmd));
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<Output> {
    cmd.output()
        .with_context(|| format!("cannot run {}", display(cmd)))
}

/// A command's standard output, failing with its standard error on a non-zero exit.
fn stdout_of(cmd: &mut Command) -> anyhow::Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            display(cmd),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn display(cmd: &Command) -> String {
    let mut out = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    out
}

fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn is_root() -> bool {
    nix_like_geteuid() == 0
}

/// The effective uid, from `/proc/self/status` (no unsafe, no extra dependency).
fn nix_like_geteuid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|rest| rest.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|uid| uid.parse().ok())
        .unwrap_or(u32::MAX)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::setup(),
        Cmd::Demo {
            action:
                Some(DemoAction::Exec {
                    pod,
                    container,
                    command,
                }),
            ..
        } => dev::demo_exec(&pod, container.as_deref(), &command),
        Cmd::Demo { keep, action: None } => dev::demo(keep),
        Cmd::Bench { args } => dev::bench(args),
        Cmd::Fuzz { seconds, targets } => {
            setup::setup()?;
            fuzz::run_targets(seconds, &targets, fuzz::Build::Release)
        }
        Cmd::Certs { args } => dev::certs(args),
        Cmd::Docs => dev::docs(),
        Cmd::Image { arch, lab } => {
            setup::setup()?;
            image::build(&arch)?;
            if lab {
                dev::build_all()?;
                lab::images()?;
            }
            Ok(())
        }
        Cmd::BuildEbpf { variant: false } => ebpf::build(),
        Cmd::BuildEbpf { variant: true } => ebpf::build_variant(),
        Cmd::Test {
            no_setup,
            e2e_filter,
            prune,
        } => ci::test(ci::Options {
            no_setup,
            e2e_filter,
            prune: prune || env::var_os("KIAM_XTASK_PRUNE").is_some_and(|v| v == "1"),
        }),
    }
}
