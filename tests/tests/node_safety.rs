//! What makes kiam safe to roll onto an existing node (issue: EKS node safety), on the real
//! kernel with the real agent, servers, moto and the API emulator:
//! - host-network system pods the operator selects get the node's metadata verbatim, and
//!   nothing a pod controls selects it;
//! - credential and identity paths never reach the node's metadata service, whatever the
//!   allow-list says;
//! - pins must live on a bpffs the host sees;
//! - static pods are known by their config hash, passed through when selected, never given a
//!   role;
//! - a link-local agent address cannot be captured by a DNAT rule for the node's address.
//!
//! Run as root by `cargo xtask test`; without root each test prints a loud SKIP.

use std::{process::Command, time::Duration};

use kiam_e2e::{
    cluster::{Cluster, NODE_NAME},
    metric,
    node::{AGENT_IP, AGENT_PORT, HELPER, LINK_LOCAL_AGENT_IP, Node, Pod, privileged},
    poll,
    stack::PodObject,
};
use serde_json::json;

const META: &str = "http://169.254.169.254";
const TOKEN_URL: &str = "http://169.254.169.254/latest/api/token";

fn helper(node: &Node, pod: &Pod, args: &[&str]) -> String {
    let mut cmd = vec![HELPER.as_str()];
    cmd.extend_from_slice(args);
    node.run_in(&pod.cgroup, &pod.netns, &cmd).trim().to_owned()
}

#[test]
fn host_network_system_pods_get_the_nodes_metadata_verbatim_and_nobody_else_does() {
    if !privileged("node metadata pass-through") {
        return;
    }
    let mut c = Cluster::team(&["--role-ttl", "1s"]);
    // aws-node: a host-network pod in kube-system, selected by the default policy.
    let system = c.node.add_host_network_pod();
    // Before the servers know it, it waits as any unknown pod does: never the node's.
    let creds_url = format!("{META}/latest/meta-data/iam/security-credentials/");
    let early = helper(&c.node, &system, &["get", &creds_url]);
    assert!(
        early.starts_with("404") && early.contains("not known"),
        "an unknown host-network pod: {early}"
    );
    assert!(
        !c.node
            .fake_imds_requests()
            .iter()
            .any(|r| r.contains("security-credentials")),
        "{:#?}",
        c.node.fake_imds_requests()
    );
    let mut object = PodObject::new("kube-system", "aws-node-x", NODE_NAME);
    object.uid = Some(&system.uid);
    object.host_network = true;
    object.service_account = "aws-node";
    c.kube.put_pod(&object);
    let instance_id = format!("{META}/latest/meta-data/instance-id");
    assert!(
        poll(Duration::from_secs(10), || helper(
            &c.node,
            &system,
            &["get", &instance_id]
        ) == "200 real-imds"),
        "the system pod never reached the node's metadata:\n{}",
        c.node.agent_log()
    );
    // IMDSv2 as an SDK does it: the token is the node's, and the node checks it.
    let put = helper(
        &c.node,
        &system,
        &[
            "request",
            TOKEN_URL,
            "--method",
            "PUT",
            "--header",
            "X-aws-ec2-metadata-token-ttl-seconds: 21600",
        ],
    );
    let token = put
        .strip_prefix("200 node-token-")
        .map(|n| format!("node-token-{n}"))
        .unwrap_or_else(|| panic!("the node's metadata service did not issue the token: {put}"));
    let header = format!("X-aws-ec2-metadata-token: {token}");
    let listing = helper(
        &c.node,
        &system,
        &["request", &creds_url, "--header", &header],
    );
    assert_eq!(
        listing, "200 node-role",
        "the node's own role, with its token"
    );
    let forged = helper(
        &c.node,
        &system,
        &[
            "request",
            &creds_url,
            "--header",
            "X-aws-ec2-metadata-token: forged",
        ],
    );
    assert!(
        forged.starts_with("401"),
        "the node checks tokens: {forged}"
    );
    let seen = c.node.fake_imds_requests();
    for want in [
        "PUT /latest/api/token token=-".to_owned(),
        format!("GET /latest/meta-data/iam/security-credentials/ token={token}"),
        "GET /latest/meta-data/instance-id token=-".to_owned(),
    ] {
        assert!(seen.contains(&want), "{want} not seen verbatim: {seen:#?}");
    }

    // The same pod moved to another namespace is intercepted again.
    c.kube.delete_pod("kube-system", "aws-node-x");
    let mut moved = PodObject::new("team", "aws-node-x", NODE_NAME);
    moved.uid = Some(&system.uid);
    moved.host_network = true;
    c.kube.put_pod(&moved);
    assert!(
        poll(Duration::from_secs(10), || helper(
            &c.node,
            &system,
            &["get", &instance_id]
        )
        .starts_with("404")),
        "the moved pod still passes through"
    );
    let line = helper(&c.node, &system, &["get", &creds_url]);
    assert!(
        line.starts_with("404") && line.contains("no iam.amazonaws.com/role annotation"),
        "{line}"
    );

    // A kube-system pod in its own network namespace is intercepted, and so is a
    // host-network pod that tries to opt in with its own annotations and labels.
    let own_netns = c.node.add_pod();
    let mut object = PodObject::new("kube-system", "coredns-x", NODE_NAME);
    object.uid = Some(&own_netns.uid);
    c.kube.put_pod(&object);
    let sneaky = c.node.add_host_network_pod();
    let mut object = PodObject::new("team", "sneaky", NODE_NAME);
    object.uid = Some(&sneaky.uid);
    object.host_network = true;
    object.service_account = "aws-node";
    object.annotations = json!({
        "iam.amazonaws.com/role": "app-sneaky",
        "kiam.amazonaws.com/node-metadata": "passthrough",
        "iam.amazonaws.com/passthrough": "true",
    });
    object.labels = json!({"kiam.amazonaws.com/node-metadata": "passthrough"});
    c.kube.put_pod(&object);
    let before = c.node.fake_imds_requests().len();
    assert!(poll(Duration::from_secs(10), || helper(
        &c.node,
        &sneaky,
        &["get", &creds_url]
    ) == "200 app-sneaky"));
    for pod in [&own_netns, &sneaky] {
        let line = helper(&c.node, pod, &["get", &instance_id]);
        assert!(line.starts_with("404"), "{line}");
        let put = helper(
            &c.node,
            pod,
            &[
                "request",
                TOKEN_URL,
                "--method",
                "PUT",
                "--header",
                "X-aws-ec2-metadata-token-ttl-seconds: 60",
            ],
        );
        assert!(
            put.starts_with("200 ") && !put.contains("node-token"),
            "kiam's own token, not the node's: {put}"
        );
    }
    assert_eq!(
        c.node.fake_imds_requests().len(),
        before,
        "an intercepted pod reached the node's metadata service"
    );
    let metrics = c.node.agent_metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kiam_agent_imds_requests_total{route=\"passthrough\"")),
        "{metrics}"
    );
    // `kiam-agent status` counts them too.
    let status = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", c.node.netns))
        .arg("--")
        .arg(kiam_e2e::node::agent_bin())
        .args(["status", "--admin-listen", "127.0.0.1:8182", "--bpffs-dir"])
        .arg(&c.node.pin_dir)
        .output()
        .expect("kiam-agent status");
    let text = String::from_utf8_lossy(&status.stdout);
    let passed: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("requests passthrough"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pass-through count in:\n{text}"));
    assert!(passed >= 4, "{text}");
}

#[test]
fn credential_and_identity_paths_never_reach_the_node_whatever_the_allow_list() {
    if !privileged("credential paths") {
        return;
    }
    let mut c = Cluster::team(&["--allow-route-regexp", ".*"]);
    let a = c.pod("a", json!({"iam.amazonaws.com/role": "app-a"}));
    let listing = format!("{META}/latest/meta-data/iam/security-credentials/");
    assert!(poll(Duration::from_secs(10), || helper(
        &c.node,
        &a,
        &["get", &listing]
    ) == "200 app-a"));
    // Each of these reached the node's metadata service (its credentials included) with
    // `.*` before.
    for (path, want) in [
        (
            "/2016-09-02/meta-data/iam/security-credentials/",
            "200 app-a",
        ),
        ("/latest//meta-data/iam/security-credentials/", "400 "),
        ("/latest/./meta-data/iam/security-credentials/", "400 "),
        (
            "/latest/meta-data/iam/%2E%2E/iam/security-credentials/",
            "400 ",
        ),
        (
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "404 ",
        ),
        ("/2021-01-03/meta-data/iam/info", "200 {"),
        ("/latest/dynamic/instance-identity/pkcs7", "404 "),
        ("/latest/dynamic/instance-identity/signature", "404 "),
        ("/latest/dynamic/instance-identity/rsa2048", "404 "),
        ("/latest/meta-data/IAM/security-credentials/", "404 "),
    ] {
        let line = helper(&c.node, &a, &["request", &format!("{META}{path}")]);
        assert!(line.starts_with(want), "{path}: {line}");
    }
    let info = helper(
        &c.node,
        &a,
        &["request", &format!("{META}/2021-01-03/meta-data/iam/info")],
    );
    assert!(
        info.contains("instance-profile/app-a"),
        "kiam's answer: {info}"
    );
    assert!(
        c.node.fake_imds_requests().is_empty(),
        "{:#?}",
        c.node.fake_imds_requests()
    );
    // Control: `.*` does forward everything else, so the recorder sees what reaches it.
    let id = helper(
        &c.node,
        &a,
        &["request", &format!("{META}/latest/meta-data/instance-id")],
    );
    assert_eq!(id, "200 real-imds");
    let document = helper(
        &c.node,
        &a,
        &[
            "request",
            &format!("{META}/latest/dynamic/instance-identity/document"),
        ],
    );
    assert_eq!(document, "200 real-imds");
    let seen: Vec<String> = c
        .node
        .fake_imds_requests()
        .into_iter()
        .filter(|r| r.starts_with("GET"))
        .collect();
    assert_eq!(
        seen.iter()
            .map(|r| r.split_whitespace().nth(1).unwrap_or(""))
            .collect::<Vec<_>>(),
        [
            "/latest/meta-data/instance-id",
            "/latest/dynamic/instance-identity/document"
        ],
        "{seen:#?}"
    );
}

/// Static pods (kube-proxy, etcd, a self-managed control plane) run in cgroups named by the
/// kubelet's config hash; the API knows them as mirror pods with other UIDs.
#[test]
fn static_pods_are_known_by_their_config_hash_and_only_ever_passed_through() {
    if !privileged("static pods") {
        return;
    }
    let mut c = Cluster::team(&[]);
    let mirror_of = |pod: &Pod, namespace: &'static str, name: &'static str| {
        let mut object = PodObject::new(namespace, name, NODE_NAME);
        object.host_network = true;
        // The node wrote the manifest: it may name any role, and it never gets one.
        object.annotations = json!({
            "iam.amazonaws.com/role": "app-static",
            "kubernetes.io/config.mirror": pod.uid,
            "kubernetes.io/config.hash": pod.uid,
            "kubernetes.io/config.source": "file",
        });
        object
    };
    // kube-proxy: host network in kube-system, selected by the default pass-through rule.
    let proxy = c.node.add_static_host_network_pod();
    assert_eq!(proxy.uid.len(), 32, "a config hash: {}", proxy.uid);
    let mirror_uid = c
        .kube
        .put_pod(&mirror_of(&proxy, "kube-system", "kube-proxy-node-1"));
    assert_ne!(mirror_uid, proxy.uid, "the mirror pod has a UID of its own");
    let instance_id = format!("{META}/latest/meta-data/instance-id");
    assert!(
        poll(Duration::from_secs(10), || helper(
            &c.node,
            &proxy,
            &["get", &instance_id]
        ) == "200 real-imds"),
        "the static system pod never reached the node's metadata:\n{}",
        c.node.agent_log()
    );
    let listing = format!("{META}/latest/meta-data/iam/security-credentials/");
    assert_eq!(
        helper(&c.node, &proxy, &["get", &listing]),
        "200 node-role",
        "the node's own metadata, not the role its manifest names"
    );

    // A static pod no rule selects: a clear 403 that says why, counted, and no STS call.
    let web = c.node.add_static_host_network_pod();
    c.kube
        .put_pod(&mirror_of(&web, "team", "static-web-node-1"));
    let mut line = String::new();
    assert!(
        poll(Duration::from_secs(10), || {
            line = helper(&c.node, &web, &["get", &listing]);
            line.starts_with("403")
        }),
        "{line}"
    );
    assert!(line.contains("static pod"), "{line}");
    let refused: f64 = c
        .servers
        .iter()
        .map(|s| {
            metric(
                &s.metrics(),
                "kiam_server_refusals_total{reason=\"MIRROR_POD\"}",
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert!(refused >= 1.0, "static pod refusals counted: {refused}");
    assert_eq!(c.sts.calls(), 0);
}

#[test]
fn pins_must_live_on_a_bpffs_the_host_sees() {
    if !privileged("bpffs") {
        return;
    }
    let node = Node::new();
    let agent = node.agent_pod.clone();
    let scratch = node.dir.join("scratch");
    std::fs::create_dir_all(&scratch).expect("dir");
    let scratch = scratch.to_str().expect("utf-8").to_owned();
    let mut line = node.agent_command_line();
    let dir_at = line
        .iter()
        .position(|a| a == "--bpffs-dir")
        .expect("--bpffs-dir")
        + 1;
    let run = |line: &[String], prelude: &str| {
        let script = format!("{prelude} exec \"$@\"");
        let mut cmd: Vec<&str> = vec![
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ];
        cmd.extend(line.iter().map(String::as_str));
        let mut command = node.command_in(&agent.cgroup, &agent.netns, &cmd);
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        // A refused agent exits at once; one that starts is stopped after a while.
        for _ in 0..100 {
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let out = child.wait_with_output().expect("agent output");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };

    // Not a bpffs at all.
    line[dir_at] = format!("{scratch}/plain/kiam");
    let (_, text) = run(&line, &format!("mkdir -p {scratch}/plain &&"));
    assert!(text.contains("is not on a bpf file system"), "{text}");

    // A bpffs only the agent's own mount namespace sees: pins there die with it.
    line[dir_at] = format!("{scratch}/private/kiam");
    let mount = format!("mkdir -p {scratch}/private && mount -t bpf bpf {scratch}/private &&");
    let (_, text) = run(&line, &mount);
    assert!(
        text.contains("only this agent's mount namespace sees"),
        "{text}"
    );
    // The development flag accepts it.
    let mut dev = line.clone();
    dev.push("--allow-private-bpffs".into());
    let (_, text) = run(&dev, &mount);
    assert!(text.contains("kiam-agent ready"), "{text}");

    // `/sys/fs/bpf` missing in the agent's mount namespace: the agent no longer mounts one
    // of its own (it did, and only warned).
    line[dir_at] = "/sys/fs/bpf/kiam-e2e-unmounted".into();
    let (_, text) = run(&line, "umount /sys/fs/bpf &&");
    assert!(text.contains("is not on a bpf file system"), "{text}");

    // `kiam-agent mount-bpffs` (the init container) mounts one, once, and shared (as systemd
    // mounts it): mounts on this machine are private by default.
    let bin = line[0].clone();
    let mount_twice = vec![
        bin.clone(),
        "mount-bpffs".into(),
        "--path".into(),
        format!("{scratch}/init"),
    ];
    let (ok, text) = run(
        &mount_twice,
        &format!(
            "{bin} mount-bpffs --path {scratch}/init && grep -q ' {scratch}/init [^-]*shared:[0-9]* - bpf ' /proc/self/mountinfo &&"
        ),
    );
    assert!(ok, "{text}");
    assert!(text.contains("mounted bpffs"), "{text}");
    assert!(text.contains("bpffs already mounted"), "{text}");
    // A private bpffs left by someone else is made shared.
    let (ok, text) = run(
        &mount_twice,
        &format!(
            "mkdir -p {scratch}/init && mount -t bpf bpf {scratch}/init && mount --make-private {scratch}/init &&"
        ),
    );
    assert!(ok && text.contains("made it shared"), "{text}");
    // What it leaves is what an agent in a container sees through HostToContainer (a slave
    // of the host's mount): accepted. Without the shared mount it would be a private copy.
    // The "host" namespace must outlive the container's, or its peer group goes with it.
    line[dir_at] = format!("{scratch}/init/kiam");
    let mut in_container: Vec<String> = [
        "sh",
        "-c",
        "timeout 4 unshare --mount --propagation slave \"$@\"; exit 0",
        "sh",
    ]
    .map(str::to_owned)
    .to_vec();
    in_container.extend(line.iter().cloned());
    let (_, text) = run(
        &in_container,
        &format!("{bin} mount-bpffs --path {scratch}/init >/dev/null &&"),
    );
    assert!(text.contains("kiam-agent ready"), "{text}");
}

#[test]
fn a_link_local_agent_address_cannot_be_captured_by_a_dnat_for_the_node() {
    if !privileged("link-local agent address") {
        return;
    }
    let mut node = Node::new();
    let victim = node.add_pod();
    let attacker = node.add_pod();
    // The attacker's pod listens on the agent's port (its own namespace: allowed).
    let listen = format!("{}:{AGENT_PORT}", attacker.ip);
    let log = node.dir.join("attacker.log");
    let mut listener = node.spawn_in(
        &attacker.cgroup,
        &attacker.netns,
        &[
            HELPER.as_str(),
            "fake-imds",
            "--listen",
            &listen,
            "--log",
            log.to_str().expect("utf-8"),
            "--answer",
            "attacker",
        ],
    );
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(listener.stdout.take().expect("stdout")),
        &mut ready,
    )
    .expect("ready");
    assert_eq!(ready.trim(), "ready");
    // What kube-proxy installs for a Service with `externalIPs: [<node IP>]` and the agent's
    // port, pointing at the attacker's pod.
    let nsenter = |args: &[&str]| {
        let out = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", node.netns))
            .arg("--")
            .args(args)
            .output()
            .expect("nsenter");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    nsenter(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let port = AGENT_PORT.to_string();
    let to = format!("{}:{AGENT_PORT}", attacker.ip);
    let node_ip = AGENT_IP.to_string();
    nsenter(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        &node_ip,
        "-p",
        "tcp",
        "--dport",
        &port,
        "-j",
        "DNAT",
        "--to-destination",
        &to,
    ]);
    let url = format!("{META}/kiam/v1/identity");

    // Control: with the agent on the node's address, the rule captures the victim's
    // metadata traffic.
    node.start_agent();
    assert_eq!(
        helper(&node, &victim, &["get", &url]),
        "200 attacker",
        "the DNAT rule works"
    );
    node.kill_agent();

    // On a link-local address (added to the node's loopback by the agent) it cannot.
    node.agent_ip = LINK_LOCAL_AGENT_IP;
    node.start_agent();
    let line = helper(&node, &victim, &["get", &url]);
    assert!(
        line.starts_with("200 {") && line.contains(&victim.uid),
        "the agent answered: {line}"
    );
    let addrs = Command::new("ip")
        .args(["-n", &node.netns, "-4", "addr", "show", "dev", "lo"])
        .output()
        .expect("ip addr");
    assert!(
        String::from_utf8_lossy(&addrs.stdout).contains(&format!("{LINK_LOCAL_AGENT_IP}/32")),
        "{}",
        String::from_utf8_lossy(&addrs.stdout)
    );
    // `uninstall` removes the address again.
    node.kill_agent();
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", node.netns))
        .arg("--")
        .arg(kiam_e2e::node::agent_bin())
        .args([
            "uninstall",
            "--bpffs-dir",
            node.pin_dir.to_str().expect("utf-8"),
        ])
        .output()
        .expect("uninstall");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("removed {LINK_LOCAL_AGENT_IP}/32 from lo")),
        "{text}"
    );
    let _ = listener.kill();
    let _ = listener.wait();
}
