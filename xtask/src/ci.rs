//! `cargo xtask test`: everything CI runs, as a list of stages run in order. Each stage says
//! when it starts and how long it took, and the run ends with the table of stage times, so
//! a slow CI run shows where its minutes went.
//!
//! The privileged end-to-end tests come last: they need the debug binaries, the variant
//! eBPF object, the lab's images and moto, all built by the stages before them.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{cargo, dev, ebpf, fuzz, image, is_root, lab, run, setup, workspace_root};

/// What `cargo xtask test` was asked for.
pub struct Options {
    /// Skip the set-up stage.
    pub no_setup: bool,
    /// Only the end-to-end tests whose name contains this.
    pub e2e_filter: Option<String>,
    /// Remove each stage's build output once it has served.
    pub prune: bool,
}

/// The alerting rules: valid (`promtool check rules`) and doing what their unit tests say
/// (`promtool test rules`).
const RULES: &str = "deploy/helm/kiam/files/kiam.rules.yaml";
const RULES_TESTS: &str = "deploy/helm/kiam/files/kiam.rules.test.yaml";

/// Build output the images leave behind that nothing after them reads.
const AFTER_IMAGES: [&str; 5] = [
    "release",
    "aarch64-unknown-linux-gnu",
    "ebpf-aarch64",
    "images/work",
    "lab",
];

type Stage<'a> = (&'static str, Box<dyn Fn() -> anyhow::Result<()> + 'a>);

pub fn test(options: Options) -> anyhow::Result<()> {
    let prune = options.prune;
    let mut stages: Vec<Stage> = Vec::new();
    if !options.no_setup {
        stages.push(("setup", Box::new(setup::setup)));
    }
    stages.extend([
        ("build-ebpf", Box::new(ebpf::build) as Box<dyn Fn() -> _>),
        (
            "fmt",
            Box::new(|| run(cargo().args(["fmt", "--all", "--check"]))),
        ),
        ("clippy", Box::new(clippy)),
        ("clippy (eBPF)", Box::new(ebpf::clippy)),
        // The default members' unit tests (no root needed).
        ("unit tests", Box::new(|| run(cargo().arg("test")))),
        // A short fuzz of every target (`cargo xtask fuzz` runs them longer).
        (
            "fuzz smoke",
            Box::new(move || {
                fuzz::run_targets(10, &[], fuzz::Build::Dev)?;
                prune_target(prune, &["fuzz"])
            }),
        ),
        ("debug binaries", Box::new(dev::build_all)),
        ("eBPF variant", Box::new(ebpf::build_variant)),
        ("promtool", Box::new(promtool)),
        (
            "images",
            Box::new(move || {
                image::build(&[image::Arch::Amd64, image::Arch::Arm64])?;
                lab::images()?;
                prune_target(prune, &AFTER_IMAGES)
            }),
        ),
        ("deploy validation", Box::new(validate_deploy)),
        (
            "end-to-end tests",
            Box::new(|| run(&mut e2e(options.e2e_filter.as_deref()))),
        ),
    ]);
    let mut times = Vec::new();
    let result = stages.iter().try_for_each(|(name, stage)| {
        eprintln!("=== stage: {name}");
        let started = Instant::now();
        let result = stage().with_context(|| format!("stage {name}"));
        times.push((*name, started.elapsed()));
        result
    });
    eprintln!("=== stage times");
    for (name, took) in &times {
        eprintln!("{:>8}  {name}", minutes(*took));
    }
    let total = times.iter().map(|(_, took)| *took).sum();
    eprintln!("{:>8}  total", minutes(total));
    result
}

fn minutes(d: Duration) -> String {
    format!("{:.1} min", d.as_secs_f64() / 60.0)
}

fn clippy() -> anyhow::Result<()> {
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "kiam-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

fn promtool() -> anyhow::Result<()> {
    run(Command::new("promtool").args(["check", "rules", RULES]))
        .context("promtool (Debian's prometheus package)")?;
    run(Command::new("promtool").args(["test", "rules", RULES_TESTS]))
}

fn validate_deploy() -> anyhow::Result<()> {
    run(Command::new(setup::venv().join("bin/python"))
        .arg(workspace_root().join("deploy/validate.py"))
        .arg(workspace_root().join("target/debug/kiam-agent"))
        .arg(workspace_root().join("target/debug/kiam-server")))
    .context("deploy/ validation (needs kubectl for kustomize)")
}

/// The privileged tests: real eBPF, cgroups and network namespaces, one at a time.
fn e2e(filter: Option<&str>) -> Command {
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
            workspace_root().join(ebpf::VARIANT_OBJECT),
        );
    if let Some(filter) = filter {
        e2e.arg(filter);
    }
    if is_root() {
        // As root nothing may be skipped: a skip would hide a broken environment.
        e2e.env("KIAM_E2E_REQUIRE_PRIVILEGED", "1")
            .env("KIAM_REQUIRE_PROMTOOL", "1");
    } else {
        eprintln!(
            "!!! not root: the privileged end-to-end tests will SKIP (run `sudo -E cargo xtask test`)"
        );
    }
    e2e
}

/// Removes `dirs` under target/ when `prune` is set.
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
