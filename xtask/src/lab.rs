//! The node lab's own images (the shipped agent and server images come from `image`):
//! - `kiam.rs/lab/pause`: the sandbox image containerd's CRI runs for every pod
//!   (`kiam-lab-pause` and the libraries it needs, nothing else);
//! - `kiam.rs/lab/workload`: a pod as tenants run them, with real SDKs: Debian bookworm
//!   (`debootstrap --variant=minbase` with python3 and ca-certificates), the AWS CLI and boto3
//!   from PyPI, and the project's Rust SDK client (`kiam-e2e-sdk`) and probe helper
//!   (`kiam-e2e-helper`), its idle command `kiam-lab-pause`.
//!
//! Archives go to `target/images/kiam-lab-{pause,workload}.tar`; the Debian root file system
//! is kept in `target/lab/rootfs-bookworm` between runs.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{image, run, workspace_root};

/// The tag of the lab's images (the workspace version).
pub const TAG: &str = env!("CARGO_PKG_VERSION");
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
/// The Python packages of the workload image, at the versions the project's `.venv` has.
const PYTHON_PACKAGES: [&str; 2] = ["awscli", "boto3"];

fn debug_bin(name: &str) -> PathBuf {
    workspace_root().join("target/debug").join(name)
}

/// Builds both archives (the debug binaries must be built).
pub fn images() -> anyhow::Result<Vec<PathBuf>> {
    Ok(vec![pause()?, workload()?])
}

fn archive(name: &str) -> PathBuf {
    image::images_dir().join(format!("kiam-lab-{name}.tar"))
}

/// `binary` stripped into `rootfs` at `inside`.
fn install_stripped(rootfs: &Path, inside: &str, binary: &Path) -> anyhow::Result<()> {
    let to = rootfs.join(inside.trim_start_matches('/'));
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(binary)
        .arg(&to))
    .with_context(|| format!("stripping {}", binary.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&to, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn pause() -> anyhow::Result<PathBuf> {
    let binary = debug_bin("kiam-lab-pause");
    image::assemble_rootfs(
        "lab-pause",
        &archive("pause"),
        TAG,
        &[
            "--config.entrypoint=/pause".to_owned(),
            "--config.user=65535:65535".to_owned(),
        ],
        |rootfs| {
            install_stripped(rootfs, "/pause", &binary)?;
            for (inside, host) in image::runtime_files(&binary, image::Arch::Amd64)? {
                image::install(rootfs, &inside, &host, 0o755)?;
            }
            Ok(())
        },
    )
}

/// Debian's minimal root file system with python3, made once.
fn debian_rootfs() -> anyhow::Result<PathBuf> {
    let dir = workspace_root().join("target/lab/rootfs-bookworm");
    let done = dir.with_extension("complete");
    if done.exists() {
        return Ok(dir);
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    eprintln!(
        "lab: debootstrap bookworm (minbase, python3) into {}",
        dir.display()
    );
    run(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            "--include=python3,ca-certificates",
            "bookworm",
        ])
        .arg(&dir)
        .arg(DEBIAN_MIRROR))
    .context("debootstrap (apt-get install debootstrap; needs the Debian mirror)")?;
    // Nothing of the build machine's apt cache belongs in an image.
    let _ = fs::remove_dir_all(dir.join("var/cache/apt/archives"));
    fs::write(&done, "")?;
    Ok(dir)
}

/// `package==version` as the project's `.venv` has it (the versions its tests run).
fn pinned(package: &str) -> anyhow::Result<String> {
    let out = Command::new(crate::setup::venv().join("bin/pip"))
        .args(["show", package])
        .output()
        .context("pip show (run `cargo xtask setup`)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .with_context(|| format!("{package} is not in the .venv: run `cargo xtask setup`"))?;
    Ok(format!("{package}=={}", version.trim()))
}

fn workload() -> anyhow::Result<PathBuf> {
    let debian = debian_rootfs()?;
    let site = workspace_root().join("target/lab/python-packages");
    let packages: Vec<String> = PYTHON_PACKAGES
        .iter()
        .map(|p| pinned(p))
        .collect::<anyhow::Result<_>>()?;
    let stamp = site.join(".packages");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(packages.join("\n").as_str()) {
        let _ = fs::remove_dir_all(&site);
        run(Command::new(crate::setup::venv().join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&site)
            .args(&packages))
        .context("pip install of the workload image's SDKs (needs PyPI)")?;
        fs::write(&stamp, packages.join("\n"))?;
    }
    let binaries = ["kiam-e2e-sdk", "kiam-e2e-helper", "kiam-lab-pause"];
    for name in binaries {
        if !debug_bin(name).exists() {
            bail!(
                "{} missing: build the kiam-e2e binaries first",
                debug_bin(name).display()
            );
        }
    }
    image::assemble_rootfs(
        "lab-workload",
        &archive("workload"),
        TAG,
        &[
            "--config.entrypoint=/usr/local/bin/kiam-lab-pause".to_owned(),
            "--config.user=0:0".to_owned(),
            "--config.env=PATH=/usr/local/bin:/usr/bin:/bin".to_owned(),
        ],
        |rootfs| {
            run(Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", debian.display()))
                .arg(rootfs))?;
            let python = rootfs.join("usr/local/lib/python3.11/dist-packages");
            fs::create_dir_all(&python)?;
            run(Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", site.display()))
                .arg(&python))?;
            // pip's scripts carry the .venv's interpreter: the image's is /usr/bin/python3.
            let scripts = python.join("bin");
            for entry in fs::read_dir(&scripts).with_context(|| format!("{}", scripts.display()))? {
                let path = entry?.path();
                if !path.is_file() {
                    continue;
                }
                let text = fs::read(&path)?;
                let target = rootfs
                    .join("usr/local/bin")
                    .join(path.file_name().unwrap_or_default());
                match text.strip_prefix(b"#!") {
                    Some(rest) => {
                        let body = rest.splitn(2, |b| *b == b'\n').nth(1).unwrap_or_default();
                        let mut script = b"#!/usr/bin/python3\n".to_vec();
                        script.extend_from_slice(body);
                        fs::write(&target, script)?;
                    }
                    None => {
                        fs::copy(&path, &target)?;
                    }
                }
                use std::os::unix::fs::PermissionsExt as _;
                fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
            }
            fs::remove_dir_all(&scripts)?;
            for name in binaries {
                install_stripped(rootfs, &format!("/usr/local/bin/{name}"), &debug_bin(name))?;
            }
            Ok(())
        },
    )
}
