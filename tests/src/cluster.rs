//! The whole product on one test node: moto (STS), the Kubernetes API emulator, two kiam
//! servers and the agent, all inside the node's network namespace, and pods whose processes
//! run real AWS SDKs. Used by the SDK tests and the demo.
//!
//! The agent proves its node as in a real cluster: a projected service-account token minted
//! for its pod on `node-1` (reviewed by the servers with TokenReview), with the one agent
//! certificate every agent shares, which names no node.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use serde_json::Value;

use crate::{
    node::{self, Node, Pod},
    repo,
    stack::{Certs, Kube, Server, Sts},
};

/// moto, as pods reach it: on the node's address (it listens on all of the node's).
pub const STS_URL: &str = "http://198.19.0.1:5000";
/// The node name the agent runs as and pods are scheduled on.
pub const NODE_NAME: &str = "node-1";

pub struct Cluster {
    pub node: Node,
    pub sts: Sts,
    pub kube: Kube,
    pub servers: Vec<Server>,
    /// The Kubernetes namespace pods are created in.
    pub namespace: String,
    /// The agent's flags that connect it to the servers (`--server`, TLS, token, node).
    pub connection_args: Vec<String>,
    _certs: Certs,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts everything on `node`: moto, the emulator with `namespace` (annotated with
    /// `annotations`), two servers with fresh mTLS material, and the agent with
    /// `agent_args` on top of what connects it to the servers.
    pub fn start(node: Node, namespace: &str, annotations: Value, agent_args: &[&str]) -> Cluster {
        Self::start_with(node, namespace, annotations, agent_args, &[])
    }

    /// A fresh node and namespace `team` permitting `app-.*`, the agent run with `agent_args`.
    pub fn team(agent_args: &[&str]) -> Cluster {
        Self::start(
            Node::new(),
            "team",
            serde_json::json!({"iam.amazonaws.com/permitted": "app-.*"}),
            agent_args,
        )
    }

    /// The same as [`Self::start`], with `server_args` for both servers.
    pub fn start_with(
        mut node: Node,
        namespace: &str,
        annotations: Value,
        agent_args: &[&str],
        server_args: &[&str],
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let ns = node.netns.clone();
        let sts = Sts::start_in(Some(&ns), "0.0.0.0");
        let kube = Kube::start_in(Some(&ns), dir.path());
        kube.namespace(namespace, annotations);
        let certs = Certs::new(dir.path());
        let servers = [(8443, 9620), (8444, 9621)]
            .into_iter()
            .map(|ports| {
                Server::start_in(
                    Some(&ns),
                    ports,
                    dir.path(),
                    &certs,
                    &sts,
                    &kube,
                    server_args,
                )
            })
            .collect();
        let path = |name: &str| certs.path(name).to_string_lossy().into_owned();
        let token_file = dir.path().join("agent-token");
        std::fs::write(&token_file, kube.agent_token(NODE_NAME)).expect("agent token");
        let connection_args: Vec<String> = [
            "--node-name",
            NODE_NAME,
            "--server",
            "127.0.0.1:8443,127.0.0.1:8444",
            "--tls-cert",
            &path("agent-shared.pem"),
            "--tls-key",
            &path("agent-shared-key.pem"),
            "--tls-ca",
            &path("ca.pem"),
            "--token-file",
            token_file.to_str().expect("utf-8"),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        node.agent_args = connection_args
            .iter()
            .cloned()
            .chain(agent_args.iter().map(|s| (*s).to_owned()))
            .collect();
        node.start_agent();
        Cluster {
            node,
            sts,
            kube,
            servers,
            namespace: namespace.to_owned(),
            connection_args,
            _certs: certs,
            dir,
        }
    }

    /// `kiam-agent health` for this node's agent, in the node's network namespace, with
    /// `extra` flags.
    pub fn agent_health(&self, extra: &[&str]) -> Output {
        let attach = self
            .node
            .kubepods
            .strip_prefix(&self.node.cgroup_root)
            .expect("under root")
            .to_str()
            .expect("utf-8")
            .to_owned();
        self.agent_health_attached_at(&attach, extra)
    }

    /// The same, with `--attach-cgroup attach`.
    pub fn agent_health_attached_at(&self, attach: &str, extra: &[&str]) -> Output {
        let utf8 = |p: &std::path::Path| p.to_str().expect("utf-8").to_owned();
        let mut line: Vec<String> = [
            utf8(&node::agent_bin()),
            "health".into(),
            "--cgroup-root".into(),
            utf8(&self.node.cgroup_root),
            "--attach-cgroup".into(),
            attach.to_owned(),
            "--bpffs-dir".into(),
            utf8(&self.node.pin_dir),
            "--admin-listen".into(),
            "127.0.0.1:8182".into(),
        ]
        .into_iter()
        .chain(self.connection_args.iter().cloned())
        .collect();
        line.extend(extra.iter().map(|s| (*s).to_owned()));
        let line: Vec<&str> = line.iter().map(String::as_str).collect();
        self.node
            .command_in(&self.node.agent_pod.cgroup, &self.node.netns, &line)
            .output()
            .expect("run kiam-agent health")
    }

    /// Replaces the agent's token file, as the kubelet does when it rotates the token.
    pub fn write_agent_token(&self, token: &str) {
        let path = self.dir.path().join("agent-token");
        let staged = self.dir.path().join("agent-token.new");
        std::fs::write(&staged, token).expect("token");
        std::fs::rename(&staged, &path).expect("rotate token");
    }

    /// A pod with its cgroup and network namespace, known to the API emulator.
    pub fn pod(&mut self, name: &str, annotations: Value) -> Pod {
        let pod = self.node.add_pod();
        self.kube.pod_with_uid(
            &self.namespace,
            name,
            NODE_NAME,
            Some(&pod.uid),
            annotations,
        );
        pod
    }

    /// `$HOME` of commands run in pods.
    pub fn home(&self) -> PathBuf {
        let home = self.dir.path().join("home");
        let _ = std::fs::create_dir_all(&home);
        home
    }

    /// `cmd` inside `pod` with a clean environment: no credentials but the metadata
    /// service's.
    pub fn command(&self, pod: &Pod, cmd: &[&str]) -> Command {
        let mut command = self.node.command_in(&pod.cgroup, &pod.netns, cmd);
        node::sdk_env(&mut command, &self.home());
        command
    }

    /// The AWS CLI's `sts get-caller-identity` inside `pod`; stdout is the caller's ARN.
    pub fn aws_whoami(&self, pod: &Pod) -> Output {
        let aws = repo(".venv/bin/aws");
        let aws = aws.to_string_lossy();
        self.command(
            pod,
            &[
                &aws,
                "sts",
                "get-caller-identity",
                "--endpoint-url",
                STS_URL,
                "--output",
                "text",
                "--query",
                "Arn",
            ],
        )
        .output()
        .expect("run the AWS CLI")
    }
}
