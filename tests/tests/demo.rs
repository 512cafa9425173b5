//! The README's demo command and `cargo xtask certs`, run as a user would.

use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Command};

use kiam_e2e::{node::privileged, workspace_bin};

#[test]
fn the_demo_shows_each_containers_role_and_leaves_nothing_behind() {
    if !privileged("demo") {
        return;
    }
    let out = Command::new(workspace_bin("kiam-dev"))
        .arg("demo")
        .output()
        .expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for role in ["app-frontend", "app-backend", "app-shop", "app-envoy"] {
        assert!(
            text.contains(&format!("arn:aws:sts::123456789012:assumed-role/{role}/")),
            "{text}"
        );
    }
    // The sidecar's line: its own role, from the container-roles annotation.
    assert!(
        text.lines().any(|l| l.starts_with("shop/envoy")
            && l.contains("container-roles: app-envoy")
            && l.contains("assumed-role/app-envoy/")),
        "{text}"
    );
    // What it inspected is gone by now: it says how to keep it instead.
    assert!(!text.contains("bpftool cgroup tree"), "{text}");
    assert!(text.contains("cargo xtask demo --keep"), "{text}");
    // The demo's unique name, from its first line: kiam-e2e-<id>.
    let id = text
        .split("kiam-e2e-")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_alphanumeric()).next())
        .expect("demo id")
        .to_owned();
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&id),
        "network namespaces left behind"
    );
    assert_no_cgroups_left(&id);
    assert!(
        !Path::new(&format!("/sys/fs/bpf/kiam-e2e-{id}")).exists(),
        "pins left behind"
    );
    let ps = Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .expect("ps");
    let running = String::from_utf8_lossy(&ps.stdout);
    assert!(!running.contains(&id), "processes left behind:\n{running}");
}

/// Neither the unified hierarchy nor any v1 controller's (where runc makes a container's
/// cgroups too on a hybrid host) keeps a cgroup of demo `id`.
fn assert_no_cgroups_left(id: &str) {
    let name = format!("kiam-e2e-{id}");
    let mut hierarchies = vec![kiam_e2e::node::cgroup_root()];
    hierarchies.extend(
        std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path()),
    );
    for hierarchy in hierarchies {
        let left = hierarchy.join(&name);
        assert!(!left.exists(), "cgroup left behind: {}", left.display());
    }
}

/// A fresh machine of this kind has no systemd: nothing mounts bpffs at `/sys/fs/bpf`, and
/// mounts are private. Here that machine is a mount namespace of its own in which
/// `/sys/fs/bpf` is unmounted; the README's command (`cargo xtask demo` = setup, build, demo)
/// must work there, so setup has to mount bpffs, shared, before the demo starts its agent.
#[test]
fn setup_and_the_demo_work_where_bpffs_was_never_mounted() {
    if !privileged("demo on a bare machine") {
        return;
    }
    let script = format!(
        "while umount /sys/fs/bpf 2>/dev/null; do :; done; \
         if grep -q ' /sys/fs/bpf ' /proc/self/mountinfo; then echo 'bpffs still mounted' >&2; exit 2; fi; \
         {xtask} setup && exec {dev} demo",
        xtask = workspace_bin("xtask").display(),
        dev = workspace_bin("kiam-dev").display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("run setup and the demo");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("setup: mounted bpffs at /sys/fs/bpf (shared"),
        "{stderr}"
    );
    for role in ["app-frontend", "app-backend"] {
        assert!(
            stdout.contains(&format!("arn:aws:sts::123456789012:assumed-role/{role}/")),
            "{stdout}"
        );
    }
}

#[test]
fn demo_keep_runs_commands_in_a_pod_and_ends_quietly_on_ctrl_c() {
    if !privileged("demo --keep") {
        return;
    }
    use std::io::{BufRead as _, BufReader};
    let mut demo = Command::new(workspace_bin("kiam-dev"))
        .args(["demo", "--keep"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the demo");
    let mut seen = String::new();
    let mut lines = BufReader::new(demo.stdout.take().expect("stdout")).lines();
    for line in lines.by_ref() {
        let line = line.expect("demo output");
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("Running until Ctrl-C") {
            break;
        }
    }
    assert!(seen.contains("bpftool cgroup tree"), "{seen}");
    assert!(seen.contains("cargo xtask demo exec frontend --"), "{seen}");
    let id = seen
        .split("kiam-e2e-")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_alphanumeric()).next())
        .expect("demo id")
        .to_owned();

    // The exact command the demo prints, minus `cargo xtask`: the AWS CLI in the pod gets
    // the pod's role; a pod the demo does not have is a clear error.
    let exec = |pod: &str, cmd: &[&str]| {
        Command::new(workspace_bin("kiam-dev"))
            .args(["demo-exec", pod, "--"])
            .args(cmd)
            .output()
            .expect("demo-exec")
    };
    let whoami = exec("frontend", &kiam_e2e::lab::AWS_WHOAMI);
    let arn = String::from_utf8_lossy(&whoami.stdout);
    assert!(
        arn.contains("assumed-role/app-frontend/"),
        "{arn}{}",
        String::from_utf8_lossy(&whoami.stderr)
    );
    let missing = exec("nope", &["true"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("frontend"));
    // The command's exit code is the exec's.
    assert_eq!(
        exec("backend", &["sh", "-c", "exit 3"]).status.code(),
        Some(3)
    );
    // kiam's own pods too: the agent's status, from inside its container.
    let agent = seen
        .lines()
        .find_map(|l| l.trim().strip_prefix("cargo xtask demo exec "))
        .and_then(|l| l.strip_suffix(" -- kiam-agent status"))
        .expect("the agent status line")
        .to_owned();
    let status = exec(&agent, &["kiam-agent", "status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && text.contains("config: agent") && text.contains("ready=true"),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );

    // Ctrl-C: everything removed, exit 130, no error.
    let _ = Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status();
    let status = demo.wait().expect("demo exit");
    assert_eq!(status.code(), Some(130));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut demo.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(!stderr.contains("Error"), "{stderr}");
    assert_no_cgroups_left(&id);
    assert!(
        !kiam_e2e::repo("target/demo/pods.json").exists(),
        "demo state left behind"
    );
}

#[test]
fn certs_writes_a_usable_development_pki() {
    let dir = tempfile::tempdir().expect("dir");
    let out = Command::new(workspace_bin("kiam-dev"))
        .args(["certs", "--out"])
        .arg(dir.path())
        .args(["--nodes", "node-a,node-b"])
        .output()
        .expect("run certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in [
        "ca.pem",
        "server.pem",
        "server-key.pem",
        "agent-shared.pem",
        "agent-node-a.pem",
        "agent-node-b-key.pem",
    ] {
        assert!(dir.path().join(file).is_file(), "{file} missing");
    }
    let mode = std::fs::metadata(dir.path().join("server-key.pem"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "private keys must not be world-readable"
    );
    let agent = std::fs::read(dir.path().join("agent-node-a.pem")).expect("cert");
    let der = rustls_pemfile_cert(&agent);
    assert_eq!(
        kiam_proto::certificate::node_identities(der.as_ref()),
        vec!["node-a".to_owned()]
    );
}

fn rustls_pemfile_cert(pem: &[u8]) -> rustls::pki_types::CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::from_pem_slice(pem).expect("PEM certificate")
}

#[test]
fn every_flag_is_documented_as_the_binaries_describe_it() {
    let out = Command::new(workspace_bin("kiam-dev"))
        .arg("flags-doc")
        .output()
        .expect("kiam-dev flags-doc");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8_lossy(&out.stdout);
    let committed = std::fs::read_to_string(kiam_e2e::repo("docs/flags.md")).unwrap_or_default();
    assert!(
        generated == committed,
        "docs/flags.md is out of date with the binaries' --help: run `cargo xtask docs`"
    );
}
