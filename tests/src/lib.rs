//! Test infrastructure shared by the end-to-end tests and the demo: test "nodes" (network
//! namespaces, kubelet-shaped cgroups, the real agent) in [`node`], the server side (moto,
//! the Kubernetes API emulator, certificates, kiam servers) in [`stack`], and both put
//! together in [`cluster`]; the benchmarks behind `cargo xtask bench` in [`bench`].

pub mod bench;
pub mod cluster;
pub mod node;
pub mod stack;

use std::{
    path::{Path, PathBuf},
    process::Child,
    sync::Mutex,
};

/// Processes started by the harness, so an interrupted demo can stop them.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Remembers `child` for [`kill_tracked`].
pub fn track(child: &Child) {
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(child.id());
}

/// SIGKILLs every tracked process that may still run.
pub fn kill_tracked() {
    for pid in CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A binary of this workspace's `target/<profile>` directory: `$KIAM_E2E_BIN_DIR/<name>`, or
/// next to the running executable (tests run from `target/<profile>/deps`).
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("KIAM_E2E_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_owned).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.join(name)
}

/// A path in the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}
