//! `cargo xtask fuzz`: the cargo-fuzz targets in fuzz/ (nightly), each for a number of
//! seconds. CI runs each for 10 s (`ci`); a crash is written under fuzz/artifacts/ and must
//! become a regression test.

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

pub fn run_targets(seconds: u64, targets: &[String]) -> anyhow::Result<()> {
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
