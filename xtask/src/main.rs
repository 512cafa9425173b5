//! Developer commands for kiam-rs: `cargo xtask <command>`.
//!
//! - `setup`: installs what building and testing need, skipping what is already there.
//! - `build-ebpf`: builds the kernel programs into `target/bpfel-unknown-none/release/kiam-ebpf`.
//! - `test`: setup, build-ebpf, formatting, lints, unit tests, then the privileged
//!   end-to-end tests (one at a time).
//! - `bench`: release builds, then `kiam-bench run` (speed and scale, see `kiam_e2e::bench`).
//! - `image`: the agent and server images (amd64, arm64) as OCI archives, smoke-tested.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

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

/// Where `build-ebpf` leaves the object; `kiam-agent/build.rs` embeds it from here.
pub const EBPF_OBJECT: &str = "target/bpfel-unknown-none/release/kiam-ebpf";

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

/// `cargo +nightly <subcommand>` for the eBPF crate. It needs rustup's proxy from PATH, not the
/// toolchain cargo in $CARGO, and none of the variables the outer stable `cargo xtask` set.
fn nightly_ebpf(subcommand: &str) -> Command {
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
fn without_outer_toolchain(cmd: &mut Command) -> &mut Command {
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

fn build_ebpf() -> anyhow::Result<()> {
    run(&mut nightly_ebpf("build"))?;
    eprintln!(
        "eBPF object: {}",
        workspace_root().join(EBPF_OBJECT).display()
    );
    Ok(())
}

/// Where `build-ebpf --variant` leaves the upgrade test's object.
const EBPF_VARIANT_OBJECT: &str = "target/ebpf-variant/bpfel-unknown-none/release/kiam-ebpf";

/// The same programs built with another `KIAM_EBPF_VARIANT`: different code, as an upgrade
/// brings, with the same maps. Its own target directory, so neither build undoes the other.
fn build_ebpf_variant() -> anyhow::Result<()> {
    run(nightly_ebpf("build")
        .args(["--target-dir", "target/ebpf-variant"])
        .env("KIAM_EBPF_VARIANT", "1"))?;
    eprintln!(
        "eBPF variant object: {}",
        workspace_root().join(EBPF_VARIANT_OBJECT).display()
    );
    Ok(())
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

/// Removes `dirs` under target/ when `prune` is set, saying how much that freed.
fn prune_target(prune: bool, dirs: &[&str]) -> anyhow::Result<()> {
    if !prune {
        return Ok(());
    }
    for dir in dirs {
        let path = workspace_root().join("target").join(dir);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
            eprintln!("prune: removed {}", path.display());
        }
    }
    Ok(())
}

fn test(no_setup: bool, e2e_filter: Option<String>, prune: bool) -> anyhow::Result<()> {
    if !no_setup {
        setup::setup()?;
    }
    build_ebpf()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "kiam-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(nightly_ebpf("clippy").args(["--", "-D", "warnings"]))?;
    // Unit tests of the default members (no root needed).
    run(cargo().args(["test"]))?;
    // A short fuzz of every target (`cargo xtask fuzz` runs them longer).
    fuzz(10, &[])?;
    prune_target(prune, &["fuzz"])?;
    // Privileged tests: real eBPF, cgroups and network namespaces, one at a time.
    build_all()?;
    build_ebpf_variant()?;
    let mut e2e = cargo();
    e2e.args(["test", "--package", "kiam-e2e", "--tests", "--"])
        .arg("--test-threads=1")
        .env(
            "KIAM_AGENT_BIN",
            workspace_root().join("target/debug/kiam-agent"),
        )
        .env(
            "KIAM_SERVER_BIN",
            workspace_root().join("target/debug/kiam-server"),
        )
        .env("KIAM_MOTO_SERVER", setup::venv().join("bin/moto_server"))
        .env(
            "KIAM_EBPF_VARIANT_OBJECT",
            workspace_root().join(EBPF_VARIANT_OBJECT),
        );
    if let Some(filter) = e2e_filter {
        e2e.arg(filter);
    }
    promtool()?;
    image::build(&[image::Arch::Amd64, image::Arch::Arm64])?;
    lab::images()?;
    prune_target(
        prune,
        &[
            "release",
            "aarch64-unknown-linux-gnu",
            "ebpf-aarch64",
            "images/work",
            "lab",
        ],
    )?;
    run(Command::new(setup::venv().join("bin/python"))
        .arg(workspace_root().join("deploy/validate.py"))
        .arg(workspace_root().join("target/debug/kiam-agent"))
        .arg(workspace_root().join("target/debug/kiam-server")))
    .context("deploy/ validation (needs kubectl for kustomize)")?;
    if is_root() {
        // As root nothing may be skipped: a skip would hide a broken environment.
        e2e.env("KIAM_E2E_REQUIRE_PRIVILEGED", "1")
            .env("KIAM_REQUIRE_PROMTOOL", "1");
    } else {
        eprintln!(
            "!!! not root: the privileged end-to-end tests will SKIP (run `sudo -E cargo xtask test`)"
        );
    }
    run(&mut e2e)
}

/// The alerting rules: valid (`promtool check rules`) and doing what their unit tests say
/// (`promtool test rules`).
const RULES: &str = "deploy/helm/kiam/files/kiam.rules.yaml";
const RULES_TESTS: &str = "deploy/helm/kiam/files/kiam.rules.test.yaml";

fn promtool() -> anyhow::Result<()> {
    run(Command::new("promtool").args(["check", "rules", RULES]))
        .context("promtool (Debian's prometheus package)")?;
    run(Command::new("promtool").args(["test", "rules", RULES_TESTS]))
}

fn build_all() -> anyhow::Result<()> {
    build_ebpf()?;
    run(cargo().args([
        "build",
        "--package",
        "kiam-agent",
        "--package",
        "kiam-server",
        "--package",
        "kiam-e2e",
        "--bins",
    ]))
}

/// The cargo-fuzz targets in fuzz/.
const FUZZ_TARGETS: [&str; 5] = [
    "route",
    "cgroup_path",
    "token",
    "namespace_rules",
    "http_request",
];

fn fuzz(seconds: u64, targets: &[String]) -> anyhow::Result<()> {
    let targets: Vec<&str> = match targets.is_empty() {
        true => FUZZ_TARGETS.to_vec(),
        false => targets.iter().map(String::as_str).collect(),
    };
    let cargo_fuzz = |subcommand: &str| {
        let mut cmd = Command::new("cargo");
        cmd.args(["+nightly", "fuzz", subcommand])
            .args(["--fuzz-dir", "fuzz", "--target-dir", "target/fuzz"])
            // Rust code without unsafe: panics are what is looked for, and no sanitizer
            // keeps the build and the runs fast.
            .args(["-O", "--sanitizer", "none"])
            .env("PATH", setup::path_with_cargo_bin());
        without_outer_toolchain(&mut cmd);
        cmd
    };
    run(&mut cargo_fuzz("build"))?;
    for target in targets {
        run(cargo_fuzz("run")
            .arg(target)
            .arg("--")
            .arg(format!("-max_total_time={seconds}")))
        .with_context(|| {
            format!("fuzz target {target} failed: its input is under fuzz/artifacts/{target}/")
        })?;
    }
    Ok(())
}

fn bench(args: Vec<String>) -> anyhow::Result<()> {
    setup::setup()?;
    build_ebpf()?;
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "kiam-agent",
        "--package",
        "kiam-server",
        "--package",
        "kiam-e2e",
        "--bins",
    ]))?;
    run(
        Command::new(workspace_root().join("target/release/kiam-bench"))
            .arg("run")
            .args(args)
            .env("KIAM_MOTO_SERVER", setup::venv().join("bin/moto_server")),
    )
}

fn demo(keep: bool) -> anyhow::Result<()> {
    setup::setup()?;
    build_all()?;
    // The node lab runs kiam from its images, and pods from the lab's.
    image::build(&[image::Arch::Amd64])?;
    lab::images()?;
    let mut cmd = Command::new(workspace_root().join("target/debug/kiam-dev"));
    cmd.arg("demo");
    if keep {
        cmd.arg("--keep");
    }
    cmd.current_dir(workspace_root());
    eprintln!("+ {}", display(&cmd));
    // Ctrl-C reaches the demo too, which cleans up and exits: wait for it.
    let _ = ctrlc::set_handler(|| {});
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", display(&cmd)))?;
    // Ctrl-C is how `--keep` ends: the demo cleaned up, and that is a normal exit.
    use std::os::unix::process::ExitStatusExt as _;
    if status.success() || status.code() == Some(130) || status.signal() == Some(2) {
        return Ok(());
    }
    bail!("the demo failed ({status})")
}

fn demo_exec(pod: &str, container: Option<&str>, command: &[String]) -> anyhow::Result<()> {
    let mut cmd = Command::new(workspace_root().join("target/debug/kiam-dev"));
    cmd.args(["demo-exec", pod]);
    if let Some(container) = container {
        cmd.args(["--container", container]);
    }
    let status = cmd
        .arg("--")
        .args(command)
        .current_dir(workspace_root())
        .status()
        .context("running kiam-dev (start `cargo xtask demo --keep` first)")?;
    std::process::exit(status.code().unwrap_or(1));
}

fn docs() -> anyhow::Result<()> {
    build_all()?;
    let out = Command::new(workspace_root().join("target/debug/kiam-dev"))
        .arg("flags-doc")
        .output()
        .context("running kiam-dev flags-doc")?;
    if !out.status.success() {
        bail!(
            "kiam-dev flags-doc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = workspace_root().join("docs/flags.md");
    std::fs::create_dir_all(workspace_root().join("docs"))?;
    std::fs::write(&path, out.stdout)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn certs(args: Vec<String>) -> anyhow::Result<()> {
    run(cargo().args(["build", "--package", "kiam-e2e", "--bin", "kiam-dev"]))?;
    run(Command::new(workspace_root().join("target/debug/kiam-dev"))
        .arg("certs")
        .args(args))
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
        } => demo_exec(&pod, container.as_deref(), &command),
        Cmd::Demo { keep, action: None } => demo(keep),
        Cmd::Bench { args } => bench(args),
        Cmd::Fuzz { seconds, targets } => {
            setup::setup()?;
            fuzz(seconds, &targets)
        }
        Cmd::Certs { args } => certs(args),
        Cmd::Docs => docs(),
        Cmd::Image { arch, lab } => {
            setup::setup()?;
            image::build(&arch)?;
            if lab {
                build_all()?;
                lab::images()?;
            }
            Ok(())
        }
        Cmd::BuildEbpf { variant: false } => build_ebpf(),
        Cmd::BuildEbpf { variant: true } => build_ebpf_variant(),
        Cmd::Test {
            no_setup,
            e2e_filter,
            prune,
        } => test(
            no_setup,
            e2e_filter,
            prune || env::var_os("KIAM_XTASK_PRUNE").is_some_and(|v| v == "1"),
        ),
    }
}
