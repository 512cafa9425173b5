//! The node lab: a node on a real container runtime. containerd (its CRI plugin, runc, the
//! CNI bridge and host-local plugins, all from Debian) runs pods from images, and a stand-in
//! kubelet (`kiam-lab-kubelet`) does for each pod bound to the node what the kubelet does.
//! kiam itself runs as the shipped manifests say (`deploy/kustomize/base`, rendered by
//! `kubectl kustomize`) from the shipped images (`cargo xtask image`): the agent DaemonSet's
//! pod with its init container, the servers' Deployment on the pod network.
//!
//! What a cluster would provide and the lab substitutes, each as little as it can (also in
//! the README's Tests section): see [`SUBSTITUTIONS`].
//!
//! Everything lives in the node's network namespace and a mount namespace of its own (a
//! fresh `/run`, and `/sys/fs/bpf` an empty shared mount point that the agent's init
//! container mounts bpffs on, as it would on a node without one); the kubelet's cgroup root
//! is the node's test cgroup, so pods are in `<test cgroup>/kubepods/...`.

pub mod podspec;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_cri::v1 as cri;
use serde_json::{Value, json};

use crate::{
    node::{AGENT_IP, Node},
    stack::{Kube, Sts},
};

/// Where the lab stands in for a cluster service, and how. Listed here and in the README.
pub const SUBSTITUTIONS: [&str; 7] = [
    "kubelet: kiam-lab-kubelet (CRI calls as the kubelet makes them; refuses what it does not support)",
    "kube-apiserver: the API emulator (real list/watch, TokenRequest, TokenReview, pod status; no RBAC); its ServiceAccount admission (the kube-api-access volume) is done by the lab when it creates pods",
    "scheduler and controllers: the lab makes the DaemonSet's and the Deployment's pods from their templates, bound to the node",
    "cluster DNS (CoreDNS): the kubelet stand-in answers at the --cluster-dns address, for the kiam-server Service only (its ready pods)",
    "IRSA (the EKS pod identity webhook): the servers get moto's endpoint, a region and static credentials as environment variables (a kustomize patch)",
    "kubelet --cgroup-root: the node's test cgroup, so the agent is told --attach-cgroup <test cgroup>/kubepods (a kustomize patch)",
    "containerd restrict_oom_score_adj: on where the machine's root lacks CAP_SYS_RESOURCE (as in this VM), which a node's root has; containers then cannot lower their OOM score",
];

const IMAGE_TAG: &str = env!("CARGO_PKG_VERSION");
/// The node's address (`status.hostIP`), on the node namespace's loopback.
pub const NODE_IP: std::net::Ipv4Addr = AGENT_IP;
/// The API's HTTPS port pods reach (`KUBERNETES_SERVICE_PORT`).
pub const API_PORT: u16 = 6443;
/// The lab's workload image (real SDKs).
pub const WORKLOAD_IMAGE: &str = "kiam.rs/lab/workload";
/// The AWS CLI printing the caller's ARN, as the demo and the suites run it in a container
/// (region and STS endpoint from the container's environment).
pub const AWS_WHOAMI: [&str; 7] = [
    "aws",
    "sts",
    "get-caller-identity",
    "--query",
    "Arn",
    "--output",
    "text",
];
const PAUSE_IMAGE: &str = "kiam.rs/lab/pause";
/// The pod network (CNI bridge, host-local).
const POD_SUBNET: &str = "10.244.0.0/24";

/// What the lab needs of the machine, each missing one named with its fix.
pub fn preflight() -> Result<(), String> {
    let mut missing = Vec::new();
    for (path, fix) in [
        (
            "/usr/bin/containerd",
            "apt-get install containerd (cargo xtask setup)",
        ),
        (
            "/usr/bin/ctr",
            "apt-get install containerd (cargo xtask setup)",
        ),
        ("/usr/sbin/runc", "apt-get install runc (cargo xtask setup)"),
        (
            "/usr/lib/cni/bridge",
            "apt-get install containernetworking-plugins (cargo xtask setup)",
        ),
        (
            "/usr/lib/cni/host-local",
            "apt-get install containernetworking-plugins (cargo xtask setup)",
        ),
    ] {
        if !Path::new(path).exists() {
            missing.push(format!("{path}: {fix}"));
        }
    }
    for archive in image_archives().iter().map(|(_, a)| a) {
        if !archive.exists() {
            missing.push(format!(
                "{}: cargo xtask image --arch amd64 --lab",
                archive.display()
            ));
        }
    }
    match missing.is_empty() {
        true => Ok(()),
        false => Err(format!("the node lab cannot run: {}", missing.join("; "))),
    }
}

/// Each image the lab imports: (name it is imported under, archive).
fn image_archives() -> Vec<(String, PathBuf)> {
    let images = crate::repo("target/images");
    vec![
        (
            "ghcr.io/example/kiam-agent".into(),
            images.join(format!("kiam-agent-{IMAGE_TAG}-amd64.tar")),
        ),
        (
            "ghcr.io/example/kiam-server".into(),
            images.join(format!("kiam-server-{IMAGE_TAG}-amd64.tar")),
        ),
        (PAUSE_IMAGE.into(), images.join("kiam-lab-pause.tar")),
        (WORKLOAD_IMAGE.into(), images.join("kiam-lab-workload.tar")),
    ]
}

/// The workload image's reference (real SDKs; idle until exec'd into).
pub fn workload_image() -> String {
    format!("{WORKLOAD_IMAGE}:{IMAGE_TAG}")
}

/// A pod of the lab, as the API has it.
#[derive(Debug, Clone)]
pub struct LabPod {
    pub namespace: String,
    pub name: String,
}

pub struct Lab {
    pub node: Node,
    pub dir: PathBuf,
    pub kube: Kube,
    pub sts: Sts,
    /// The process holding the node's mount namespace (containerd runs in it).
    containerd: Option<Child>,
    kubelet: Option<Child>,
    runtime: tokio::runtime::Runtime,
    cri: Option<cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>>,
    /// The rendered manifests.
    pub manifests: Vec<Value>,
    pods_made: u32,
    /// The agent DaemonSet's pod.
    pub agent: LabPod,
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Lab {
    /// Starts the node (containerd, the kubelet stand-in) and kiam from the shipped
    /// manifests, and waits until the agent and both servers are ready.
    pub fn start() -> Lab {
        Lab::start_on(Node::new())
    }

    /// [`Lab::start`] on a node made by the caller (who then knows its id, for
    /// [`cleanup`]).
    pub fn start_on(node: Node) -> Lab {
        if let Err(why) = preflight() {
            panic!("{why}");
        }
        let dir = node.dir.join("lab");
        for sub in ["pki", "api", "cni", "ipam", "root", "state", "kubelet"] {
            fs::create_dir_all(dir.join(sub)).expect("lab dirs");
        }
        // The API over HTTPS at the node's address, with a certificate pods can verify.
        let api_pki = dir.join("pki/api");
        crate::stack::write_api_server_pki(&api_pki, NODE_IP.into()).expect("API PKI");
        let kube = Kube::start_with_tls(
            Some(&node.netns),
            &dir.join("api"),
            (NODE_IP, API_PORT).into(),
            &api_pki.join("server.pem"),
            &api_pki.join("server-key.pem"),
        );
        let sts = Sts::start_in(Some(&node.netns), "0.0.0.0");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut lab = Lab {
            node,
            dir,
            kube,
            sts,
            containerd: None,
            kubelet: None,
            runtime,
            cri: None,
            manifests: Vec::new(),
            pods_made: 0,
            agent: LabPod {
                namespace: "kiam".into(),
                name: String::new(),
            },
        };
        lab.start_containerd();
        lab.import_images();
        lab.start_kubelet();
        lab.deploy_kiam();
        lab
    }

    fn cgroup_root(&self) -> String {
        format!(
            "/{}",
            self.node
                .test_cgroup
                .strip_prefix(&self.node.cgroup_root)
                .expect("under the root")
                .display()
        )
    }

    /// The node's containerd CRI socket.
    pub fn cri_socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// A command in the node's network and mount namespaces.
    fn in_node(&self, program: &str) -> Command {
        let pid = self.containerd.as_ref().expect("containerd").id();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/proc/{pid}/ns/net"))
            .arg(format!("--mount=/proc/{pid}/ns/mnt"))
            .arg("--")
            .arg(program);
        cmd
    }

    fn start_containerd(&mut self) {
        let d = &self.dir;
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}:{IMAGE_TAG}"
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  restrict_oom_score_adj = {restrict_oom}
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = self.cri_socket().display(),
            opt = d.join("opt").display(),
            cni = d.join("cni").display(),
            restrict_oom = !has_sys_resource(),
        );
        fs::write(d.join("containerd.toml"), config).expect("containerd config");
        let cni = json!({"cniVersion": "1.0.0", "name": "kiam-lab", "plugins": [{
            "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
            "ipam": {"type": "host-local", "dataDir": d.join("ipam"),
                     "ranges": [[{"subnet": POD_SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}]}}]});
        fs::write(d.join("cni/10-kiam-lab.conflist"), cni.to_string()).expect("CNI config");
        // The node's mount namespace: a fresh /run (containerd's shims and state), and
        // /sys/fs/bpf an empty mount point that is shared, as systemd leaves mounts, but with
        // no bpffs on it: the agent's init container must mount one.
        let runtime_cgroup = self.node.test_cgroup.join("lab-runtime");
        fs::create_dir_all(&runtime_cgroup).expect("runtime cgroup");
        let script = format!(
            "echo $$ > '{cgroup}/cgroup.procs' && \
             mount -t tmpfs -o mode=755 kiam-lab-run /run && \
             while mountpoint -q /sys/fs/bpf; do umount /sys/fs/bpf || exit 1; done && \
             mount -t tmpfs -o size=1m,mode=700 kiam-lab-bpf /sys/fs/bpf && \
             mount --make-shared /sys/fs/bpf && \
             exec containerd --config '{config}'",
            cgroup = runtime_cgroup.display(),
            config = d.join("containerd.toml").display(),
        );
        let log = fs::File::create(d.join("containerd.log")).expect("log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.node.netns))
            .args([
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "slave",
                "sh",
                "-c",
            ])
            .arg(script)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        crate::track(&child);
        self.containerd = Some(child);
        let socket = self.cri_socket();
        assert!(
            crate::poll(Duration::from_secs(20), || socket.exists()),
            "containerd did not start: {}",
            fs::read_to_string(d.join("containerd.log")).unwrap_or_default()
        );
        let channel = self
            .runtime
            .block_on(
                tonic::transport::Endpoint::from_shared(format!("unix://{}", socket.display()))
                    .expect("endpoint")
                    .connect(),
            )
            .expect("CRI connect");
        self.cri = Some(cri::runtime_service_client::RuntimeServiceClient::new(
            channel,
        ));
    }

    fn import_images(&self) {
        for (name, archive) in image_archives() {
            sh(Command::new("ctr")
                .arg("--address")
                .arg(self.cri_socket())
                .args(["-n", "k8s.io", "images", "import", "--base-name", &name])
                .arg(&archive));
        }
    }

    fn start_kubelet(&mut self) {
        let kubeconfig = self.kube.kubeconfig.clone();
        let log = fs::File::create(self.dir.join("kubelet.log")).expect("log");
        let node_hosts = self.dir.join("node-hosts");
        fs::write(
            &node_hosts,
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        )
        .expect("hosts");
        let mut cmd = self.in_node(
            crate::workspace_bin("kiam-lab-kubelet")
                .to_str()
                .expect("utf-8"),
        );
        cmd.args(["--node-name", crate::cluster::NODE_NAME])
            .args(["--node-ip", &NODE_IP.to_string()])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--cri-socket")
            .arg(self.cri_socket())
            .arg("--root-dir")
            .arg(self.dir.join("kubelet"))
            .args(["--cgroup-root", &self.cgroup_root()])
            .args(["--kubernetes-service", &format!("{NODE_IP}:{API_PORT}")])
            .arg("--node-hosts")
            .arg(&node_hosts)
            .args(["--cluster-dns", &NODE_IP.to_string()])
            .args(["--dns-service", "kiam/kiam-server"])
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd.spawn().expect("start kiam-lab-kubelet");
        crate::track(&child);
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("kubelet ready");
        assert_eq!(
            line.trim(),
            "ready",
            "kiam-lab-kubelet: {}",
            fs::read_to_string(self.dir.join("kubelet.log")).unwrap_or_default()
        );
        self.kubelet = Some(child);
    }

    /// The shipped kustomize base with the lab's two patches (see [`SUBSTITUTIONS`]),
    /// rendered by kubectl.
    fn render(&self) -> Vec<Value> {
        let overlay = self.dir.join("overlay");
        fs::create_dir_all(&overlay).expect("overlay");
        // kustomize takes bases by relative path only.
        let base = crate::repo("deploy/kustomize/base")
            .canonicalize()
            .expect("base");
        let overlay = overlay.canonicalize().expect("overlay");
        let up = "../".repeat(overlay.components().count() - 1);
        let base = format!(
            "{up}{}",
            base.strip_prefix("/").expect("absolute").display()
        );
        let attach = format!("{}/kubepods", self.cgroup_root().trim_start_matches('/'));
        let sts = format!("http://{NODE_IP}:{}", self.sts.moto_port);
        let kustomization = format!(
            r#"apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {base}
patches:
  - target: {{kind: DaemonSet, name: kiam-agent}}
    patch: |-
      - op: add
        path: /spec/template/spec/containers/0/env/-
        value: {{name: KIAM_ATTACH_CGROUP, value: "{attach}"}}
  - target: {{kind: Deployment, name: kiam-server}}
    patch: |-
      - op: add
        path: /spec/template/spec/containers/0/env/-
        value: {{name: KIAM_STS_ENDPOINT, value: "{sts}"}}
      - op: add
        path: /spec/template/spec/containers/0/env/-
        value: {{name: AWS_REGION, value: us-east-1}}
      - op: add
        path: /spec/template/spec/containers/0/env/-
        value: {{name: AWS_ACCESS_KEY_ID, value: moto}}
      - op: add
        path: /spec/template/spec/containers/0/env/-
        value: {{name: AWS_SECRET_ACCESS_KEY, value: moto}}
"#
        );
        fs::write(overlay.join("kustomization.yaml"), kustomization).expect("overlay");
        let yaml = sh(Command::new("kubectl").arg("kustomize").arg(&overlay));
        let python = crate::repo(".venv/bin/python");
        let mut child = Command::new(python)
            .args([
                "-c",
                "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python (cargo xtask setup makes the .venv)");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), yaml.as_bytes())
            .expect("yaml");
        let out = child.wait_with_output().expect("python");
        serde_json::from_slice(&out.stdout).expect("rendered manifests")
    }

    /// Applies the manifests, the TLS secrets an operator (or cert-manager) would make, and
    /// the pods the controllers would; waits until the agent and servers are ready.
    fn deploy_kiam(&mut self) {
        self.manifests = self.render();
        for object in &self.manifests {
            // The emulator stores what kiam's pods read; the rest is there for the record.
            self.kube.put(object.clone());
        }
        self.kube.node(crate::cluster::NODE_NAME, json!([]));
        let pki = self.dir.join("pki/kiam");
        crate::stack::write_dev_pki(&pki, &["kiam-server"], &[]).expect("kiam PKI");
        let read = |f: &str| fs::read(pki.join(f)).expect("pki file");
        for (secret, cert, key) in [
            ("kiam-server-tls", "server.pem", "server-key.pem"),
            ("kiam-agent-tls", "agent-shared.pem", "agent-shared-key.pem"),
        ] {
            self.kube.put(secret_object(
                "kiam",
                secret,
                &[
                    ("tls.crt", read(cert)),
                    ("tls.key", read(key)),
                    ("ca.crt", read("ca.pem")),
                ],
            ));
        }
        for namespace in ["kiam", "default", "kube-system"] {
            self.ensure_namespace(namespace, json!({}));
        }
        let agent = self.object("DaemonSet", "kiam-agent");
        self.agent = self.create_from_template(&agent, "kiam-agent-lab01");
        let server = self.object("Deployment", "kiam-server");
        let replicas = server["spec"]["replicas"].as_u64().unwrap_or(1);
        for i in 0..replicas {
            self.create_from_template(&server, &format!("kiam-server-lab{i:02}"));
        }
        let ready = self.wait_ready(
            |p| p.name.starts_with("kiam-"),
            1 + replicas as usize,
            Duration::from_secs(120),
        );
        assert!(ready, "kiam never became ready:\n{}", self.diagnostics());
    }

    /// A rendered manifest object.
    pub fn object(&self, kind: &str, name: &str) -> Value {
        self.manifests
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
    }

    /// A namespace, with the `kube-root-ca.crt` config map the controller manager puts in
    /// every namespace.
    pub fn ensure_namespace(&self, name: &str, annotations: Value) {
        self.kube
            .put(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "annotations": annotations,
                         "labels": {"kubernetes.io/metadata.name": name}}}));
        let ca = fs::read_to_string(self.dir.join("pki/api/ca.pem")).expect("API CA");
        self.kube
            .put(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "kube-root-ca.crt", "namespace": name},
            "data": {"ca.crt": ca}}));
    }

    /// A pod as a controller makes it from `owner`'s template, bound to the node and passed
    /// through the ServiceAccount admission plugin.
    pub fn create_from_template(&mut self, owner: &Value, name: &str) -> LabPod {
        let template = &owner["spec"]["template"];
        let namespace = owner["metadata"]["namespace"].as_str().unwrap_or("default");
        let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace,
                "labels": template["metadata"]["labels"], "annotations": template["metadata"]["annotations"],
                "ownerReferences": [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                    "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"], "controller": true}]},
            "spec": template["spec"]});
        if pod["metadata"]["annotations"].is_null() {
            pod["metadata"]
                .as_object_mut()
                .expect("metadata")
                .remove("annotations");
        }
        self.create_pod(pod)
    }

    /// Creates `pod` as the API server would admit it: bound to the node (the scheduler's
    /// part) and with the service account's API token volume unless automounting is off.
    pub fn create_pod(&mut self, mut pod: Value) -> LabPod {
        self.pods_made += 1;
        let namespace = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let name = pod["metadata"]["name"].as_str().expect("name").to_owned();
        let spec = &mut pod["spec"];
        spec["nodeName"] = json!(crate::cluster::NODE_NAME);
        if spec["serviceAccountName"].is_null() {
            spec["serviceAccountName"] = json!("default");
        }
        let account = spec["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let account_automount = self
            .manifests
            .iter()
            .find(|o| {
                o["kind"] == "ServiceAccount"
                    && o["metadata"]["name"] == account.as_str()
                    && o["metadata"]["namespace"] == namespace.as_str()
            })
            .map(|sa| sa["automountServiceAccountToken"].clone())
            .unwrap_or(Value::Null);
        let automount = match &spec["automountServiceAccountToken"] {
            Value::Bool(b) => *b,
            _ => account_automount != false,
        };
        if automount {
            let volume = format!("kube-api-access-{:05x}", self.pods_made);
            let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
            let mut volumes = volumes;
            volumes.push(json!({"name": volume, "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace",
                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}));
            spec["volumes"] = json!(volumes);
            for list in ["initContainers", "containers"] {
                for c in spec[list].as_array_mut().into_iter().flatten() {
                    let mut mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
                    mounts.push(json!({"name": volume, "readOnly": true,
                        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}));
                    c["volumeMounts"] = json!(mounts);
                }
            }
        }
        self.kube.put(pod);
        LabPod { namespace, name }
    }

    /// A workload pod from the lab's image (real SDKs), idle until exec'd into.
    pub fn workload(&mut self, namespace: &str, name: &str, annotations: Value) -> LabPod {
        self.create_pod(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "app",
                "image": workload_image()}]}}))
    }

    /// The pod as the API has it now.
    pub fn pod(&self, pod: &LabPod) -> Value {
        let (_, body) = self.api(
            "GET",
            &format!("/_emulator/objects/pods/{}/{}", pod.namespace, pod.name),
        );
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    /// A request to the emulator (in the node's network namespace).
    fn api(&self, method: &str, path: &str) -> (u16, String) {
        crate::stack::in_netns(Some(&self.node.netns), || {
            crate::stack::http(self.kube.port, method, path, None)
        })
    }

    /// Every pod the API has.
    pub fn pods(&self) -> Vec<Value> {
        let (_, body) = self.api("GET", "/api/v1/pods");
        serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|l| l["items"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Waits until `count` pods that `which` selects are Ready.
    pub fn wait_ready(
        &self,
        which: impl Fn(&LabPod) -> bool,
        count: usize,
        timeout: Duration,
    ) -> bool {
        crate::poll(timeout, || {
            self.pods()
                .iter()
                .filter(|p| {
                    which(&LabPod {
                        namespace: p["metadata"]["namespace"].as_str().unwrap_or("").into(),
                        name: p["metadata"]["name"].as_str().unwrap_or("").into(),
                    })
                })
                .filter(|p| ready(p))
                .count()
                >= count
        })
    }

    /// Waits until `pod` is Ready.
    pub fn wait_pod_ready(&self, pod: &LabPod, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.pod(pod);
            if ready(&found) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "{}/{} never became ready: {}\n{}",
                pod.namespace,
                pod.name,
                found["status"],
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The container ID (`containerd://…` stripped) of `container` in `pod`.
    pub fn container_id(&self, pod: &LabPod, container: &str) -> Option<String> {
        self.pod(pod)["status"]["containerStatuses"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == container)?["containerID"]
            .as_str()
            .and_then(|id| id.strip_prefix("containerd://"))
            .map(str::to_owned)
    }

    /// Runs `cmd` in `container` of `pod` through CRI ExecSync (as `kubectl exec` reaches the
    /// runtime): exit code, stdout, stderr.
    pub fn exec(
        &self,
        pod: &LabPod,
        container: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> (i32, String, String) {
        let id = self
            .container_id(pod, container)
            .unwrap_or_else(|| panic!("{}/{} has no running {container}", pod.namespace, pod.name));
        let mut cri = self.cri.clone().expect("CRI");
        let answer = self
            .runtime
            .block_on(cri.exec_sync(cri::ExecSyncRequest {
                container_id: id,
                cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
                timeout: i64::try_from(timeout.as_secs()).unwrap_or(60),
            }))
            .expect("ExecSync")
            .into_inner();
        (
            answer.exit_code,
            String::from_utf8_lossy(&answer.stdout).into_owned(),
            String::from_utf8_lossy(&answer.stderr).into_owned(),
        )
    }

    /// Deletes `pod` from the API (the kubelet then stops it).
    pub fn delete_pod(&self, pod: &LabPod) {
        self.api(
            "DELETE",
            &format!("/_emulator/objects/pods/{}/{}", pod.namespace, pod.name),
        );
    }

    /// `kiam-e2e-helper get <url>` in the pod's `app` container: `<status> <body>`.
    pub fn get(&self, pod: &LabPod, url: &str) -> String {
        let (_, out, err) = self.exec(
            pod,
            "app",
            &["kiam-e2e-helper", "get", url],
            Duration::from_secs(30),
        );
        format!("{}{}", out.trim(), err.trim())
    }

    /// `kiam-e2e-helper request` in `container` of the pod: `<status> <body>`.
    pub fn request_in(
        &self,
        pod: &LabPod,
        container: &str,
        url: &str,
        method: &str,
        headers: &[&str],
    ) -> String {
        let mut cmd = vec!["kiam-e2e-helper", "request", url, "--method", method];
        for header in headers {
            cmd.extend(["--header", header]);
        }
        let (_, out, err) = self.exec(pod, container, &cmd, Duration::from_secs(30));
        format!("{}{}", out.trim(), err.trim())
    }

    /// The runtime stops `container` of `pod` (SIGTERM, then SIGKILL after `grace`; zero:
    /// SIGKILL at once), as when it is killed under the kubelet.
    pub fn stop_container(&self, pod: &LabPod, container: &str, grace: Duration) {
        let id = self
            .container_id(pod, container)
            .expect("running container");
        let mut cri = self.cri.clone().expect("CRI");
        self.runtime
            .block_on(cri.stop_container(cri::StopContainerRequest {
                container_id: id,
                timeout: i64::try_from(grace.as_secs()).unwrap_or(0),
            }))
            .expect("StopContainer");
    }

    /// Tags an imported image under another name (a new release of the same content).
    pub fn tag_image(&self, from: &str, to: &str) {
        sh(Command::new("ctr")
            .arg("--address")
            .arg(self.cri_socket())
            .args(["-n", "k8s.io", "images", "tag", from, to]));
    }

    /// A rolling update of the agent DaemonSet to `image`, as its controller makes it with
    /// `maxUnavailable`: the old pod deleted (the kubelet stops it), then the new one made.
    pub fn roll_agent(&mut self, image: &str) -> LabPod {
        let index = self
            .manifests
            .iter()
            .position(|o| o["kind"] == "DaemonSet" && o["metadata"]["name"] == "kiam-agent")
            .expect("the agent DaemonSet");
        let daemonset = &mut self.manifests[index];
        for list in ["initContainers", "containers"] {
            for c in daemonset["spec"]["template"]["spec"][list]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                c["image"] = json!(image);
            }
        }
        let daemonset = self.kube.put(daemonset.clone());
        self.manifests[index] = daemonset.clone();
        let old = self.agent.clone();
        self.delete_pod(&old);
        let name = format!("kiam-agent-lab{:02}", self.pods_made + 1);
        self.agent = self.create_from_template(&daemonset, &name);
        self.agent.clone()
    }

    /// A container's log as the runtime wrote it (CRI log format).
    pub fn container_log(&self, pod: &LabPod, container: &str) -> String {
        let found = self.pod(pod);
        let uid = found["metadata"]["uid"].as_str().unwrap_or("");
        let dir = self
            .dir
            .join("kubelet/pods")
            .join(uid)
            .join("logs")
            .join(container);
        let mut logs: Vec<PathBuf> = fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.sort();
        logs.iter()
            .map(|p| fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("")
    }

    /// What went wrong, for a failed assertion: pods' statuses, and the kubelet's,
    /// containerd's and every container's logs (their tails).
    pub fn diagnostics(&self) -> String {
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        let mut out = String::new();
        for pod in self.pods() {
            let lab_pod = LabPod {
                namespace: pod["metadata"]["namespace"].as_str().unwrap_or("").into(),
                name: pod["metadata"]["name"].as_str().unwrap_or("").into(),
            };
            out.push_str(&format!(
                "--- pod {}/{}: {}\n",
                lab_pod.namespace, lab_pod.name, pod["status"]
            ));
            for c in ["initContainers", "containers"]
                .iter()
                .flat_map(|k| pod["spec"][k].as_array().cloned().unwrap_or_default())
            {
                let name = c["name"].as_str().unwrap_or("");
                out.push_str(&format!(
                    "--- log {name}:\n{}\n",
                    tail(self.container_log(&lab_pod, name))
                ));
            }
        }
        for log in ["kubelet.log", "containerd.log"] {
            out.push_str(&format!(
                "--- {log}:\n{}\n",
                tail(fs::read_to_string(self.dir.join(log)).unwrap_or_default())
            ));
        }
        out
    }
}

/// Whether this process holds CAP_SYS_RESOURCE, which lowering an `oom_score_adj` below
/// one's own needs. Some machines' root lacks it (this project's CI VM does); there
/// containerd is told to keep pods' scores at or above its own (`restrict_oom_score_adj`,
/// made for rootless runs), or runc cannot start a pod (the kubelet asks -998 for sandboxes).
fn has_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// Whether the pod's `Ready` condition is true.
pub fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn secret_object(namespace: &str, name: &str, data: &[(&str, Vec<u8>)]) -> Value {
    use base64::Engine as _;
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| {
            (
                (*k).to_owned(),
                json!(base64::engine::general_purpose::STANDARD.encode(v)),
            )
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": namespace}, "data": data})
}

/// Removes `relative` (and what is below it) from every cgroup hierarchy: the unified one
/// and, on a hybrid or v1 host, each controller's, where runc makes a container's cgroups
/// too. A directory still busy (its processes dying) is retried for a second.
pub fn remove_cgroup_everywhere(relative: &Path) {
    let root = Path::new("/sys/fs/cgroup");
    let mut trees = vec![root.join(relative)];
    if let Ok(mounts) = fs::read_dir(root) {
        trees.extend(mounts.flatten().map(|m| m.path().join(relative)));
    }
    for tree in trees.into_iter().filter(|t| t.is_dir()) {
        for (dir, e) in crate::node::remove_dirs_deepest_first(&tree) {
            eprintln!("removing cgroup {}: {e}", dir.display());
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in [self.kubelet.take(), self.containerd.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        teardown(&self.node.test_cgroup, &self.node.cgroup_root, &self.dir);
    }
}

/// What a lab leaves behind once its own processes are gone: every process in the node's
/// test cgroup (the shims, the pods) killed, its cgroups in every hierarchy, containerd's
/// mounts and files.
fn teardown(test_cgroup: &Path, cgroup_root: &Path, dir: &Path) {
    let _ = fs::write(test_cgroup.join("cgroup.kill"), "1");
    std::thread::sleep(Duration::from_millis(300));
    let relative = test_cgroup
        .strip_prefix(cgroup_root)
        .map(Path::to_owned)
        .unwrap_or_default();
    remove_cgroup_everywhere(&relative);
    // The node's mount namespace died with its processes; containerd's files remain.
    let _ = Command::new("umount")
        .args(["--recursive", "--lazy"])
        .arg(dir.join("root"))
        .output();
    let _ = fs::remove_dir_all(dir);
}

/// Removes the lab of node `id` from a process that cannot drop its [`Lab`] (Ctrl-C in the
/// demo): every tracked process, then what [`Drop`] removes, then the node.
pub fn cleanup(id: &str) {
    crate::kill_tracked();
    let test_cgroup = crate::node::cgroup_root().join(format!("kiam-e2e-{id}"));
    let dir = std::env::temp_dir().join(format!("kiam-e2e-{id}/lab"));
    teardown(&test_cgroup, &crate::node::cgroup_root(), &dir);
    crate::node::cleanup(id);
}

#[cfg(test)]
mod tests {
    /// Each substitution is a row of the README's table, by the name before its colon.
    #[test]
    fn every_substitution_is_in_the_readmes_table() {
        let readme = std::fs::read_to_string(crate::repo("README.md")).expect("README");
        for substitution in super::SUBSTITUTIONS {
            let (part, _) = substitution.split_once(':').expect("`part: how`");
            assert!(
                readme.contains(&format!("\n| {part} | ")),
                "README's node lab table lacks {part:?}"
            );
        }
    }
}
