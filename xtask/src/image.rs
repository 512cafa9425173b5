//! `cargo xtask image`: the agent and server images, without Docker, with Debian's tools.
//!
//! For each architecture (amd64 natively, arm64 with Debian's cross toolchain):
//! 1. release binaries (glibc), and exactly the shared libraries they name (`DT_NEEDED`,
//!    followed transitively) plus their program interpreter, from the build machine's
//!    (or the cross sysroot's) glibc; the server also gets the CA bundle STS is reached
//!    with. No shell, no package manager.
//! 2. umoci assembles an OCI image from scratch: entrypoint, user (the server runs as
//!    65534; the agent needs capabilities only uid 0 gets in Kubernetes), labels. The
//!    layout is written as an OCI archive, `target/images/kiam-<component>-<version>-<arch>.tar`
//!    (`skopeo copy oci-archive:… docker://…` or `podman load` take it).
//! 3. Smoke test, offline, from the archive: amd64 images run with runc in their own
//!    namespaces (no network; crun refuses this machine's hybrid cgroup layout): the entrypoint prints `--version`, the agent's `run` fails
//!    with its missing-capability error, the server runs as 65534 and its `health` says no
//!    server answers. arm64 binaries run from the image's own root file system under
//!    qemu-user (`--version`, and the server's `health` over loopback).
//!
//! Before any image, `ebpf::is_architecture_independent` shows that the object embedded in
//! the arm64 agent reads the same context fields as on amd64.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{ebpf, output, run, stdout_of, workspace_root};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    fn name(self) -> &'static str {
        match self {
            Self::Amd64 => "amd64",
            Self::Arm64 => "arm64",
        }
    }

    /// `None`: the host's own (target/release).
    fn rust_target(self) -> Option<&'static str> {
        match self {
            Self::Amd64 => None,
            Self::Arm64 => Some("aarch64-unknown-linux-gnu"),
        }
    }

    /// Debian's multiarch directory name.
    fn triplet(self) -> &'static str {
        match self {
            Self::Amd64 => "x86_64-linux-gnu",
            Self::Arm64 => "aarch64-linux-gnu",
        }
    }

    /// Where this architecture's glibc is found on the build machine.
    fn library_dirs(self) -> Vec<PathBuf> {
        match self {
            Self::Amd64 => vec![
                "/lib/x86_64-linux-gnu".into(),
                "/usr/lib/x86_64-linux-gnu".into(),
                "/lib64".into(),
            ],
            // libc6-arm64-cross (pulled in by gcc-aarch64-linux-gnu).
            Self::Arm64 => vec!["/usr/aarch64-linux-gnu/lib".into()],
        }
    }

    fn release_dir(self) -> PathBuf {
        let target = workspace_root().join("target");
        match self.rust_target() {
            None => target.join("release"),
            Some(t) => target.join(t).join("release"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Component {
    name: &'static str,
    binary: &'static str,
    /// `user[:group]` the image runs as.
    user: &'static str,
    cmd: Option<&'static str>,
    description: &'static str,
}

const AGENT: Component = Component {
    name: "agent",
    binary: "kiam-agent",
    // Loads BPF programs: Kubernetes grants added capabilities to uid 0 only.
    user: "0:0",
    cmd: Some("run"),
    description: "kiam node agent: answers pods' instance-metadata requests (eBPF redirect)",
};

const SERVER: Component = Component {
    name: "server",
    binary: "kiam-server",
    user: "65534:65534",
    cmd: None,
    description: "kiam server: assumes roles for pods and serves agents over mutual TLS",
};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const ENTRYPOINT_DIR: &str = "/usr/local/bin";
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

pub fn images_dir() -> PathBuf {
    workspace_root().join("target/images")
}

/// Builds, assembles and smoke-tests the images for `arches`.
pub fn build(arches: &[Arch]) -> anyhow::Result<Vec<PathBuf>> {
    ebpf::build()?;
    ebpf::is_architecture_independent()?;
    let mut archives = Vec::new();
    for &arch in arches {
        build_binaries(arch)?;
        for component in [AGENT, SERVER] {
            let archive = assemble(component, arch)?;
            smoke(component, arch, &archive)?;
            eprintln!(
                "image: {} ({})",
                archive.display(),
                human_size(fs::metadata(&archive)?.len())
            );
            archives.push(archive);
        }
    }
    Ok(archives)
}

fn human_size(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1024.0 / 1024.0)
}

fn build_binaries(arch: Arch) -> anyhow::Result<()> {
    let mut cmd = crate::cargo();
    cmd.args([
        "build",
        "--release",
        "--locked",
        "--package",
        "kiam-agent",
        "--package",
        "kiam-server",
    ]);
    if let Some(target) = arch.rust_target() {
        cmd.args(["--target", target]);
    }
    if arch == Arch::Arm64 {
        // Debian's cross toolchain (gcc-aarch64-linux-gnu) links, and builds ring's and
        // aws-lc's C.
        cmd.env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc",
        )
        .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
        .env("CXX_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-g++")
        .env("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar");
    }
    run(&mut cmd)
}

/// An ELF file's `DT_NEEDED` entries and program interpreter, from `readelf` (binutils reads
/// every architecture).
fn elf_deps(path: &Path) -> anyhow::Result<(Vec<String>, Option<String>)> {
    let dynamic = stdout_of(
        Command::new("readelf")
            .args(["--wide", "--dynamic"])
            .arg(path),
    )?;
    let needed = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split_once("Shared library: [")?.1.split_once(']'))
        .map(|(name, _)| name.to_owned())
        .collect();
    let headers = stdout_of(
        Command::new("readelf")
            .args(["--wide", "--program-headers"])
            .arg(path),
    )?;
    let interpreter = headers
        .lines()
        .find_map(|l| l.split_once("[Requesting program interpreter: "))
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(p, _)| p.to_owned());
    Ok((needed, interpreter))
}

/// Every file the binary needs to start: (path in the image, file on this machine).
pub fn runtime_files(binary: &Path, arch: Arch) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    let dirs = arch.library_dirs();
    let find = |name: &str| {
        dirs.iter()
            .map(|d| d.join(name))
            .find(|p| p.exists())
            .with_context(|| {
                format!(
                    "{name} ({}) not found in {dirs:?}: install the {} glibc",
                    arch.name(),
                    match arch {
                        Arch::Amd64 => "libc6 package's",
                        Arch::Arm64 => "libc6-arm64-cross package's",
                    }
                )
            })
    };
    let (needed, interpreter) = elf_deps(binary)?;
    let interpreter = interpreter.context("the binary has no program interpreter (static?)")?;
    let mut files = Vec::new();
    let interp_name = Path::new(&interpreter)
        .file_name()
        .and_then(|n| n.to_str())
        .context("interpreter path")?;
    files.push((PathBuf::from(&interpreter), find(interp_name)?));
    let mut seen = BTreeSet::new();
    let mut queue = needed;
    while let Some(name) = queue.pop() {
        if !seen.insert(name.clone()) || name == interp_name {
            continue;
        }
        let host = find(&name)?;
        let (more, _) = elf_deps(&host)?;
        queue.extend(more);
        files.push((Path::new("/lib").join(arch.triplet()).join(&name), host));
    }
    Ok(files)
}

/// Copies `from` (following symbolic links) to `rootfs` + `inside`.
pub fn install(rootfs: &Path, inside: &Path, from: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let to = rootfs.join(inside.strip_prefix("/").unwrap_or(inside));
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(from, &to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(&to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn umoci() -> Command {
    let mut cmd = Command::new("umoci");
    cmd.current_dir(workspace_root());
    cmd
}

fn image_name(component: Component) -> String {
    format!("kiam-{}", component.name)
}

fn archive_path(component: Component, arch: Arch) -> PathBuf {
    images_dir().join(format!(
        "{}-{VERSION}-{}.tar",
        image_name(component),
        arch.name()
    ))
}

fn assemble(component: Component, arch: Arch) -> anyhow::Result<PathBuf> {
    let binary = arch.release_dir().join(component.binary);
    let entrypoint = Path::new(ENTRYPOINT_DIR).join(component.binary);
    let mut config = vec![
        "--os".to_owned(),
        "linux".to_owned(),
        "--architecture".to_owned(),
        arch.name().to_owned(),
        format!("--config.entrypoint={}", entrypoint.display()),
        format!("--config.user={}", component.user),
        "--config.workingdir=/".to_owned(),
        format!("--config.env=PATH={ENTRYPOINT_DIR}"),
        format!(
            "--config.label=org.opencontainers.image.title={}",
            image_name(component)
        ),
        format!("--config.label=org.opencontainers.image.version={VERSION}"),
        format!(
            "--config.label=org.opencontainers.image.description={}",
            component.description
        ),
        "--config.label=org.opencontainers.image.licenses=Apache-2.0".to_owned(),
    ];
    if let Some(cmd) = component.cmd {
        config.push(format!("--config.cmd={cmd}"));
    }
    assemble_rootfs(
        &format!("{}-{}", component.name, arch.name()),
        &archive_path(component, arch),
        VERSION,
        &config,
        |rootfs| {
            install(rootfs, &entrypoint, &binary, 0o755)?;
            for (inside, host) in runtime_files(&binary, arch)? {
                install(rootfs, &inside, &host, 0o755)?;
            }
            if component.name == SERVER.name {
                // STS over HTTPS; the Kubernetes API's CA comes with the service account.
                install(rootfs, Path::new(CA_BUNDLE), Path::new(CA_BUNDLE), 0o644)
                    .context("the CA bundle (Debian's ca-certificates)")?;
            }
            Ok(())
        },
    )
}

/// An OCI image archive (layout tagged `tag`) of one layer: what `fill` puts into an empty
/// root file system, with `umoci config` arguments `config`.
pub fn assemble_rootfs(
    work_name: &str,
    archive: &Path,
    tag: &str,
    config: &[String],
    fill: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    let work = images_dir().join("work").join(work_name);
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let layout = work.join("layout");
    let bundle = work.join("bundle");
    let image = format!("{}:{tag}", layout.display());
    run(umoci().arg("init").arg("--layout").arg(&layout))?;
    run(umoci().args(["new", "--image", &image]))?;
    run(umoci().args(["unpack", "--image", &image]).arg(&bundle))?;
    fill(&bundle.join("rootfs"))?;
    run(umoci()
        .args(["repack", "--image", &image])
        .arg(&bundle)
        .arg("--no-history"))?;
    run(umoci()
        .args(["config", "--image", &image, "--no-history"])
        .args(config))?;
    run(umoci().arg("gc").arg("--layout").arg(&layout))?;
    if let Some(dir) = archive.parent() {
        fs::create_dir_all(dir)?;
    }
    let _ = fs::remove_file(archive);
    run(Command::new("tar")
        .arg("--create")
        .arg("--file")
        .arg(archive)
        .arg("--directory")
        .arg(&layout)
        .arg("--sort=name")
        .arg("."))?;
    let _ = fs::remove_dir_all(&work);
    Ok(archive.to_owned())
}

/// Unpacks the archive (not the work directory: what ships is what is tested) into a runtime
/// bundle; returns the bundle and its config.
fn unpack_archive(
    component: Component,
    arch: Arch,
    archive: &Path,
) -> anyhow::Result<(PathBuf, serde_json::Value)> {
    let dir = images_dir()
        .join("work")
        .join(format!("smoke-{}-{}", component.name, arch.name()));
    let _ = fs::remove_dir_all(&dir);
    let layout = dir.join("layout");
    fs::create_dir_all(&layout)?;
    run(Command::new("tar")
        .arg("--extract")
        .arg("--file")
        .arg(archive)
        .arg("--directory")
        .arg(&layout))?;
    let bundle = dir.join("bundle");
    run(umoci()
        .args(["unpack", "--image"])
        .arg(format!("{}:{VERSION}", layout.display()))
        .arg(&bundle))?;
    let config: serde_json::Value = serde_json::from_slice(&fs::read(bundle.join("config.json"))?)?;
    Ok((bundle, config))
}

/// The image's process with other arguments, run by runc in its own namespaces (no
/// network); its exit code and output.
fn runc(
    bundle: &Path,
    config: &serde_json::Value,
    args: &[&str],
) -> anyhow::Result<(Option<i32>, String)> {
    let mut config = config.clone();
    let entrypoint = config["process"]["args"][0].clone();
    let mut argv = vec![entrypoint];
    argv.extend(args.iter().map(|a| serde_json::Value::from(*a)));
    config["process"]["args"] = serde_json::Value::Array(argv);
    config["process"]["terminal"] = false.into();
    fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&config)?,
    )?;
    let state = images_dir().join("work/runc-state");
    fs::create_dir_all(&state)?;
    let id = format!("kiam-image-smoke-{}", std::process::id());
    let out = output(
        Command::new("runc")
            .arg("--root")
            .arg(&state)
            .args(["run", "--bundle"])
            .arg(bundle)
            .arg(&id),
    )?;
    let _ = Command::new("runc")
        .arg("--root")
        .arg(&state)
        .args(["delete", "--force", &id])
        .output();
    Ok((
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// The image's binary under qemu-user, with the image's root file system as its library
/// prefix (so the image's own glibc is what runs).
fn qemu(bundle: &Path, binary: &str, args: &[&str]) -> anyhow::Result<(Option<i32>, String)> {
    let rootfs = bundle.join("rootfs");
    let out = output(
        Command::new("qemu-aarch64-static")
            .arg("-L")
            .arg(&rootfs)
            .arg(
                rootfs
                    .join(ENTRYPOINT_DIR.trim_start_matches('/'))
                    .join(binary),
            )
            .args(args),
    )?;
    Ok((
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

fn expect(
    what: &str,
    (code, text): (Option<i32>, String),
    want_code: i32,
    want_text: &str,
) -> anyhow::Result<()> {
    if code != Some(want_code) || !text.contains(want_text) {
        bail!(
            "image smoke test {what}: wanted exit {want_code} and {want_text:?}, got exit {code:?}:\n{text}"
        );
    }
    eprintln!("image smoke test {what}: ok");
    Ok(())
}

fn smoke(component: Component, arch: Arch, archive: &Path) -> anyhow::Result<()> {
    let (bundle, config) = unpack_archive(component, arch, archive)?;
    let label = format!("{} {}", image_name(component), arch.name());
    let version = format!("{} {VERSION}", component.binary);
    match arch {
        Arch::Amd64 => {
            expect(
                &format!("{label}: --version"),
                runc(&bundle, &config, &["--version"])?,
                0,
                &version,
            )?;
            if component.name == AGENT.name {
                // What the image's default capabilities give: not what the agent needs.
                expect(
                    &format!("{label}: run without its capabilities"),
                    runc(&bundle, &config, &["run", "--agent-ip", "169.254.181.254"])?,
                    1,
                    "lacks BPF, NET_ADMIN, SYS_ADMIN",
                )?;
            } else {
                let uid = &config["process"]["user"]["uid"];
                if uid != 65534 {
                    bail!("{label}: runs as uid {uid}, not 65534");
                }
                expect(
                    &format!("{label}: health with no server, as 65534"),
                    runc(&bundle, &config, &["health"])?,
                    1,
                    "FAIL  server: no answer at 127.0.0.1:9620",
                )?;
            }
        }
        Arch::Arm64 => {
            expect(
                &format!("{label}: --version under qemu-aarch64"),
                qemu(&bundle, component.binary, &["--version"])?,
                0,
                &version,
            )?;
            if component.name == SERVER.name {
                // Its async runtime and sockets, on loopback.
                expect(
                    &format!("{label}: health under qemu-aarch64"),
                    qemu(
                        &bundle,
                        component.binary,
                        &["health", "--admin-listen", "127.0.0.1:9"],
                    )?,
                    1,
                    "FAIL  server: no answer at 127.0.0.1:9",
                )?;
            } else {
                expect(
                    &format!("{label}: health --help under qemu-aarch64"),
                    qemu(&bundle, component.binary, &["health", "--help"])?,
                    0,
                    "--require-all-servers",
                )?;
            }
        }
    }
    let _ = fs::remove_dir_all(bundle.parent().unwrap_or(&bundle));
    Ok(())
}
