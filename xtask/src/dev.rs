//! The commands that build the workspace's binaries and run them: the debug builds the
//! tests and the lab use, the bench (release builds), the demo on the node lab, the flags
//! reference and the development PKI.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{cargo, display, ebpf, image, lab, run, setup, stdout_of, workspace_root};

/// The eBPF object, then the agent, the server and the test crate's tools (`--release` for
/// the bench).
fn build_binaries(profile: &[&str]) -> anyhow::Result<()> {
    ebpf::build()?;
    run(cargo().arg("build").args(profile).args([
        "--package",
        "kiam-agent",
        "--package",
        "kiam-server",
        "--package",
        "kiam-e2e",
        "--bins",
    ]))
}

/// The debug binaries, which the tests and the lab use.
pub fn build_all() -> anyhow::Result<()> {
    build_binaries(&[])
}

/// `target/debug/kiam-dev`, the test crate's developer tool.
fn kiam_dev() -> Command {
    Command::new(workspace_root().join("target/debug/kiam-dev"))
}

pub fn bench(args: Vec<String>) -> anyhow::Result<()> {
    setup::setup()?;
    build_binaries(&["--release"])?;
    run(
        Command::new(workspace_root().join("target/release/kiam-bench"))
            .arg("run")
            .args(args)
            .env("KIAM_MOTO_SERVER", setup::venv().join("bin/moto_server")),
    )
}

pub fn demo(keep: bool) -> anyhow::Result<()> {
    setup::setup()?;
    build_all()?;
    // The node lab runs kiam from its images, and pods from the lab's.
    image::build(&[image::Arch::Amd64])?;
    lab::images()?;
    let mut cmd = kiam_dev();
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

pub fn demo_exec(pod: &str, container: Option<&str>, command: &[String]) -> anyhow::Result<()> {
    let mut cmd = kiam_dev();
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

pub fn docs() -> anyhow::Result<()> {
    build_all()?;
    let flags = stdout_of(kiam_dev().arg("flags-doc"))?;
    let path = workspace_root().join("docs/flags.md");
    std::fs::create_dir_all(workspace_root().join("docs"))?;
    std::fs::write(&path, flags)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

pub fn certs(args: Vec<String>) -> anyhow::Result<()> {
    run(cargo().args(["build", "--package", "kiam-e2e", "--bin", "kiam-dev"]))?;
    run(kiam_dev().arg("certs").args(args))
}
