//! Test infrastructure shared by the end-to-end tests and the demo: test "nodes" (network
//! namespaces, kubelet-shaped cgroups, the real agent) in [`node`], the server side (moto,
//! the Kubernetes API emulator, certificates, kiam servers) in [`stack`], and both put
//! together in [`cluster`]; the benchmarks behind `cargo xtask bench` in [`bench`].

pub mod bench;
pub mod cluster;
pub mod lab;
pub mod node;
pub mod stack;

use std::{
    path::{Path, PathBuf},
    process::Child,
    sync::Mutex,
};

/// The value of the series `series` (name and labels, as exposed) in a metrics text; the sum
/// when it is repeated, `None` when it is absent.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|v| v.strip_prefix(' '))
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Calls `check` every 100 ms until it holds or `timeout` has passed (then once more).
pub fn poll(timeout: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    check()
}

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
