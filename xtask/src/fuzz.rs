//! `cargo xtask fuzz`: the cargo-fuzz targets in fuzz/ (nightly), each for a number of
//! seconds. CI runs each for 10 s, built unoptimized ([`Build::Dev`], in `ci`); a crash is
//! written under fuzz/artifacts/ and must become a regression test.

use std::process::Command;

use anyhow::Context as _;

use crate::{ebpf, run, setup};

/// The cargo-fuzz targets in fuzz/.
const FUZZ_TARGETS: [&str; 6] = [
    "route",
    "cgroup_path",
    "token",
    "namespace_rules",
    "container_roles",
    "http_request",
];

/// How the fuzz targets are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// Optimized: many runs a second, for `cargo xtask fuzz`.
    Release,
    /// Unoptimized, with debug assertions: built in about half the time (4.4 against 7.9
    /// minutes on CI's two cores), for CI's 10-second smoke, which is there to show every
    /// target builds, starts and survives its first inputs.
    Dev,
}

pub fn run_targets(seconds: u64, targets: &[String], build: Build) -> anyhow::Result<()> {
    let targets: Vec<&str> = match targets.is_empty() {
        true => FUZZ_TARGETS.to_vec(),
        false => targets.iter().map(String::as_str).collect(),
    };
    let cargo_fuzz = |subcommand: &str| {
        let mut cmd = Command::new("cargo");
        cmd.args(["+nightly", "fuzz", subcommand])
            .args(["--fuzz-dir", "fuzz", "--target-dir", "target/fuzz"])
            .arg(match build {
                Build::Release => "-O",
                Build::Dev => "--dev",
            })
            // Rust code without unsafe: panics are what is looked for, and no sanitizer
            // keeps the build and the runs fast.
            .args(["--sanitizer", "none"])
            .env("PATH", setup::path_with_cargo_bin());
        ebpf::without_outer_toolchain(&mut cmd);
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
