//! `kiam-lab-kubelet`: the node lab's stand-in for the kubelet. For each pod bound to its
//! node in the API (the emulator), it does what the kubelet does, through containerd's CRI:
//! prepares the pod's volumes (hostPath, emptyDir, secrets, config maps, projected
//! service-account tokens from the TokenRequest API, the downward API), runs the sandbox with
//! the pod's cgroup parent and namespaces, runs the init containers in order and then the
//! containers, runs their exec probes, restarts what exits as the restart policy says (with
//! the kubelet's back-off), writes the pod's status back (`podIP`, `phase`, conditions,
//! `containerStatuses[].containerID`), and when the pod is deleted stops and removes its
//! sandbox. A field it does not support gets the pod refused (phase `Failed`), naming the
//! field (`kiam_e2e::lab::podspec::unsupported`).
//!
//! Like the kubelet it relists its pods every second (the PLEG's period). Pods' DNS is the
//! kubelet's (`--cluster-dns`, the cluster search path, `ndots:5`); the lab has no CoreDNS,
//! so this process also answers at that address, for the Services named with
//! `--dns-service` only (A records of their ready pods, as for a headless Service);
//! every other name is NXDOMAIN.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use clap::Parser;
use k8s_cri::v1 as cri;
use kiam_e2e::lab::podspec::{self, PodContext, Volumes};
use serde_json::{Value, json};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "kiam-lab-kubelet")]
struct Cli {
    /// This node's name: the pods with this `spec.nodeName` are run here.
    #[arg(long)]
    node_name: String,
    /// The node's address (`status.hostIP`).
    #[arg(long)]
    node_ip: String,
    /// Kubeconfig for the API server.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// containerd's socket.
    #[arg(long)]
    cri_socket: PathBuf,
    /// Where pods' volumes, hosts files and logs are kept (the kubelet's `--root-dir`).
    #[arg(long)]
    root_dir: PathBuf,
    /// The kubelet's `--cgroup-root`: pods go under `<root>/kubepods`.
    #[arg(long, default_value = "/")]
    cgroup_root: String,
    /// `KUBERNETES_SERVICE_HOST:PORT` given to every container.
    #[arg(long)]
    kubernetes_service: String,
    /// The node's own `/etc/hosts`, which host-network pods get.
    #[arg(long, default_value = "/etc/hosts")]
    node_hosts: PathBuf,
    /// The cluster DNS address pods are given (the kubelet's `--cluster-dns`); answered
    /// here on UDP port 53.
    #[arg(long)]
    cluster_dns: std::net::Ipv4Addr,
    /// `<namespace>/<service>`: a headless Service the cluster DNS answers for, with its
    /// ready pods' addresses.
    #[arg(long)]
    dns_service: Vec<String>,
}

/// Names the cluster DNS answers, and their addresses.
type Zone = std::sync::Arc<std::sync::RwLock<HashMap<String, Vec<std::net::Ipv4Addr>>>>;

/// The cluster DNS stand-in: A records from `zone`, an empty answer to other types of a
/// known name, NXDOMAIN for everything else.
async fn serve_dns(socket: tokio::net::UdpSocket, zone: Zone) {
    use simple_dns::{
        CLASS, Packet, PacketFlag, QTYPE, RCODE, ResourceRecord, TYPE,
        rdata::{A, RData},
    };
    let mut buf = [0u8; 1500];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(query) = Packet::parse(&buf[..n]) else {
            continue;
        };
        let mut reply = Packet::new_reply(query.id());
        reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
        if query.has_flags(PacketFlag::RECURSION_DESIRED) {
            reply.set_flags(PacketFlag::RECURSION_DESIRED);
        }
        if let Some(question) = query.questions.first() {
            let name = question
                .qname
                .to_string()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            let found = zone
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&name)
                .cloned();
            match found {
                None => *reply.rcode_mut() = RCODE::NameError,
                Some(addresses) => {
                    if question.qtype == QTYPE::TYPE(TYPE::A) {
                        for address in addresses {
                            reply.answers.push(ResourceRecord::new(
                                question.qname.clone(),
                                CLASS::IN,
                                5,
                                RData::A(A::from(address)),
                            ));
                        }
                    }
                }
            }
            reply.questions.push(question.clone());
        }
        if let Ok(bytes) = reply.build_bytes_vec() {
            let _ = socket.send_to(&bytes, peer).await;
        }
    }
}

/// The kubelet's back-off before restarting a container: 10 s, doubling to 5 minutes.
fn back_off(restarts: u32) -> Duration {
    Duration::from_secs(10u64.saturating_mul(1 << restarts.min(5)).min(300))
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn rfc3339_of_nanos(nanos: i64) -> Value {
    match nanos {
        0 => Value::Null,
        n => jiff::Timestamp::from_nanosecond(i128::from(n))
            .ok()
            .and_then(|t| t.round(jiff::Unit::Second).ok())
            .map_or(Value::Null, |t| json!(t.to_string())),
    }
}

#[derive(Clone)]
struct Cri {
    runtime: cri::runtime_service_client::RuntimeServiceClient<Channel>,
    images: cri::image_service_client::ImageServiceClient<Channel>,
}

impl Cri {
    async fn connect(socket: &Path) -> anyhow::Result<Self> {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("unix://{}", socket.display()))?
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .with_context(|| format!("connecting to {}", socket.display()))?;
        Ok(Self {
            runtime: cri::runtime_service_client::RuntimeServiceClient::new(channel.clone()),
            images: cri::image_service_client::ImageServiceClient::new(channel),
        })
    }
}

/// One probe's schedule and count.
#[derive(Default)]
struct ProbeState {
    next: Option<Instant>,
    failures: u32,
    passed: bool,
}

/// One container of a pod, across its restarts.
struct Run {
    name: String,
    init: bool,
    id: Option<String>,
    attempt: u32,
    restarts: u32,
    not_before: Option<Instant>,
    /// Why it is not running (`waiting.reason`), when it is not.
    waiting: Option<(String, String)>,
    running_since: Option<Instant>,
    /// `state` as the last ContainerStatus said.
    status: Option<cri::ContainerStatus>,
    last_terminated: Option<Value>,
    startup: ProbeState,
    liveness: ProbeState,
    readiness: ProbeState,
}

impl Run {
    fn new(name: &str, init: bool) -> Self {
        Self {
            name: name.to_owned(),
            init,
            id: None,
            attempt: 0,
            restarts: 0,
            not_before: None,
            waiting: Some(("ContainerCreating".into(), String::new())),
            running_since: None,
            status: None,
            last_terminated: None,
            startup: ProbeState::default(),
            liveness: ProbeState::default(),
            readiness: ProbeState::default(),
        }
    }

    fn state(&self) -> i32 {
        self.status.as_ref().map_or(-1, |s| s.state)
    }

    fn running(&self) -> bool {
        self.state() == cri::ContainerState::ContainerRunning as i32
    }

    fn exited(&self) -> Option<i32> {
        (self.state() == cri::ContainerState::ContainerExited as i32)
            .then(|| self.status.as_ref().map_or(0, |s| s.exit_code))
    }
}

/// A projected token the kubelet keeps fresh.
struct Token {
    path: PathBuf,
    account: String,
    audiences: Vec<String>,
    seconds: i64,
    written: Instant,
}

struct PodRun {
    pod: Value,
    dir: PathBuf,
    ctx: PodContext,
    sandbox: Option<String>,
    refused: Option<String>,
    runs: Vec<Run>,
    volumes: Volumes,
    tokens: Vec<Token>,
    tmpfs: Vec<PathBuf>,
    started: String,
    last_status: Value,
    next_try: Option<Instant>,
}

impl PodRun {
    fn uid(&self) -> &str {
        self.pod["metadata"]["uid"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.pod["metadata"]["name"].as_str().unwrap_or("")
    }
    fn namespace(&self) -> &str {
        self.pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
    }
    fn container(&self, name: &str) -> &Value {
        ["initContainers", "containers"]
            .iter()
            .flat_map(|k| self.pod["spec"][k].as_array().into_iter().flatten())
            .find(|c| c["name"] == name)
            .unwrap_or(&Value::Null)
    }
}

struct Kubelet {
    cli: Cli,
    api: kube::Client,
    cri: Cri,
    pods: HashMap<String, PodRun>,
    zone: Zone,
}

async fn api<T: serde::de::DeserializeOwned>(
    client: &kube::Client,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<&Value>,
) -> anyhow::Result<T> {
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .body(body.map(|b| b.to_string().into_bytes()).unwrap_or_default())?;
    client
        .request::<T>(request)
        .await
        .with_context(|| format!("{method} {path}"))
}

impl Kubelet {
    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        api(&self.api, "GET", path, "application/json", None).await
    }

    /// This node's pods, as the API has them.
    async fn desired(&self) -> anyhow::Result<Vec<Value>> {
        let list = self
            .get(&format!(
                "/api/v1/pods?fieldSelector=spec.nodeName%3D{}",
                self.cli.node_name
            ))
            .await?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    async fn tick(&mut self) -> anyhow::Result<()> {
        let desired = self.desired().await?;
        let wanted: BTreeMap<String, Value> = desired
            .into_iter()
            .map(|p| (p["metadata"]["uid"].as_str().unwrap_or("").to_owned(), p))
            .collect();
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|uid| !wanted.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(run) = self.pods.remove(&uid) {
                self.stop_pod(run).await;
            }
        }
        for (uid, pod) in wanted {
            if !self.pods.contains_key(&uid) {
                let run = self.admit(pod).await;
                self.pods.insert(uid.clone(), run);
            }
        }
        self.update_zone().await;
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            let Some(mut run) = self.pods.remove(&uid) else {
                continue;
            };
            if let Err(e) = self.drive(&mut run).await {
                eprintln!(
                    "kiam-lab-kubelet: pod {}/{}: {e:#}",
                    run.namespace(),
                    run.name()
                );
            }
            self.write_hosts(&run);
            self.refresh_tokens(&mut run).await;
            self.report(&mut run).await;
            self.pods.insert(uid, run);
        }
        Ok(())
    }

    /// The pod as the kubelet first sees it: refused if it asks for what this kubelet does
    /// not do, else its directories made.
    async fn admit(&self, pod: Value) -> PodRun {
        let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_owned();
        let dir = self.cli.root_dir.join("pods").join(&uid);
        let ctx = PodContext {
            node_name: self.cli.node_name.clone(),
            node_ip: self.cli.node_ip.clone(),
            pod_ip: String::new(),
            kubernetes_service: self
                .cli
                .kubernetes_service
                .rsplit_once(':')
                .map(|(h, p)| (h.to_owned(), p.parse().unwrap_or(443)))
                .unwrap_or_default(),
            log_directory: dir.join("logs"),
            hosts_file: dir.join("etc-hosts"),
            cgroup_root: self.cli.cgroup_root.clone(),
            cluster_dns: self.cli.cluster_dns.to_string(),
        };
        let runs = ["initContainers", "containers"]
            .iter()
            .flat_map(|k| {
                pod["spec"][k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(move |c| {
                        Run::new(c["name"].as_str().unwrap_or(""), *k == "initContainers")
                    })
            })
            .collect();
        let refused = podspec::unsupported(&pod)
            .map(|field| format!("the node lab's kubelet does not support {field}"));
        PodRun {
            pod,
            dir,
            ctx,
            sandbox: None,
            refused,
            runs,
            volumes: Volumes::new(),
            tokens: Vec::new(),
            tmpfs: Vec::new(),
            started: now_rfc3339(),
            last_status: Value::Null,
            next_try: None,
        }
    }

    /// Brings the pod one step closer to what its spec says.
    async fn drive(&self, run: &mut PodRun) -> anyhow::Result<()> {
        if run.refused.is_some() || run.next_try.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        if run.sandbox.is_none()
            && let Err(e) = self.start_sandbox(run).await
        {
            run.next_try = Some(Instant::now() + Duration::from_secs(2));
            return Err(e);
        }
        let sandbox = run.sandbox.clone().unwrap_or_default();
        for i in 0..run.runs.len() {
            if let Some(id) = run.runs[i].id.clone() {
                let status = self
                    .cri
                    .runtime
                    .clone()
                    .container_status(cri::ContainerStatusRequest {
                        container_id: id,
                        verbose: false,
                    })
                    .await
                    .ok()
                    .and_then(|r| r.into_inner().status);
                run.runs[i].status = status;
            }
        }
        let restart_policy = run.pod["spec"]["restartPolicy"]
            .as_str()
            .unwrap_or("Always")
            .to_owned();
        // Init containers one after the other, each to success; then every container.
        let mut init_done = true;
        for i in 0..run.runs.len() {
            let is_init = run.runs[i].init;
            if is_init && !init_done {
                break;
            }
            if !is_init && !init_done {
                break;
            }
            let exited = run.runs[i].exited();
            let must_start = match (&run.runs[i].id, exited) {
                (None, _) => true,
                (Some(_), Some(code)) => {
                    let done = is_init && code == 0;
                    if done {
                        false
                    } else {
                        let restart = match restart_policy.as_str() {
                            "Never" => false,
                            "OnFailure" => code != 0,
                            _ => true,
                        } || (is_init && code != 0 && restart_policy != "Never");
                        if restart && run.runs[i].not_before.is_none() {
                            let r = &mut run.runs[i];
                            r.last_terminated = r.status.as_ref().map(terminated);
                            r.not_before = Some(Instant::now() + back_off(r.restarts));
                            r.waiting = Some((
                                "CrashLoopBackOff".into(),
                                format!("back-off restarting failed container {}", r.name),
                            ));
                            r.running_since = None;
                        }
                        restart && run.runs[i].not_before.is_some_and(|t| Instant::now() >= t)
                    }
                }
                (Some(_), None) => false,
            };
            if must_start && let Err(e) = self.start_container(run, i, &sandbox).await {
                let r = &mut run.runs[i];
                // The kubelet's own reasons (no image, a root user against runAsNonRoot)
                // stand; anything else the runtime refused is CreateContainerError.
                let specific = matches!(
                    r.waiting.as_ref().map(|(reason, _)| reason.as_str()),
                    Some("ErrImageNeverPull" | "CreateContainerConfigError")
                );
                if !specific {
                    r.waiting = Some(("CreateContainerError".into(), format!("{e:#}")));
                }
                r.not_before = Some(Instant::now() + Duration::from_secs(2));
                if is_init {
                    init_done = false;
                }
                continue;
            }
            if is_init {
                init_done = run.runs[i].exited() == Some(0);
            } else if run.runs[i].running() {
                self.probe(run, i).await;
            }
        }
        Ok(())
    }

    async fn start_sandbox(&self, run: &mut PodRun) -> anyhow::Result<()> {
        std::fs::create_dir_all(&run.ctx.log_directory)?;
        self.prepare_volumes(run).await?;
        let config = podspec::sandbox_config(&run.pod, &run.ctx, 0);
        let mut runtime = self.cri.runtime.clone();
        let id = runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .context("RunPodSandbox")?
            .into_inner()
            .pod_sandbox_id;
        let ip = runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: false,
            })
            .await
            .context("PodSandboxStatus")?
            .into_inner()
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        run.ctx.pod_ip = match run.pod["spec"]["hostNetwork"] == true {
            true => self.cli.node_ip.clone(),
            false => ip,
        };
        run.sandbox = Some(id);
        Ok(())
    }

    async fn start_container(
        &self,
        run: &mut PodRun,
        i: usize,
        sandbox: &str,
    ) -> anyhow::Result<()> {
        let name = run.runs[i].name.clone();
        let container = run.container(&name).clone();
        let image = podspec::normalized_image(container["image"].as_str().unwrap_or(""));
        let found = self
            .cri
            .images
            .clone()
            .image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: image.clone(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .context("ImageStatus")?
            .into_inner()
            .image;
        let Some(found) = found else {
            run.runs[i].waiting = Some((
                "ErrImageNeverPull".into(),
                format!("{image} is not on the node: the lab imports images, it never pulls"),
            ));
            bail!("image {image} not present");
        };
        if podspec::runs_as_root_against_policy(&run.pod, &container, found.uid.map(|u| u.value)) {
            run.runs[i].waiting = Some((
                "CreateContainerConfigError".into(),
                "container has runAsNonRoot and image will run as root".into(),
            ));
            bail!("runAsNonRoot with a root image");
        }
        // Secrets named by the environment, fetched before the pure conversion.
        let mut secrets = HashMap::new();
        for var in container["env"].as_array().into_iter().flatten() {
            if let Some(r) = var["valueFrom"]["secretKeyRef"].as_object() {
                let secret = r.get("name").and_then(Value::as_str).unwrap_or("");
                if !secrets.contains_key(secret) {
                    let found = self
                        .get(&format!(
                            "/api/v1/namespaces/{}/secrets/{secret}",
                            run.namespace()
                        ))
                        .await?;
                    secrets.insert(secret.to_owned(), found);
                }
            }
        }
        let lookup = |secret: &str, key: &str| -> Result<String, String> {
            let data = secrets
                .get(secret)
                .and_then(|s| s["data"][key].as_str())
                .ok_or_else(|| format!("secret {secret} has no key {key}"))?;
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(data)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .map_err(|e| e.to_string())
        };
        let env = podspec::environment(&run.pod, &container, &run.ctx, &lookup)
            .map_err(|e| anyhow!(e))?;
        let attempt = run.runs[i].attempt;
        let config =
            podspec::container_config(&run.pod, &container, attempt, &run.ctx, &run.volumes, env)
                .map_err(|e| anyhow!(e))?;
        let sandbox_config = podspec::sandbox_config(&run.pod, &run.ctx, 0);
        let mut runtime = self.cri.runtime.clone();
        if let Some(old) = run.runs[i].id.take() {
            let _ = runtime
                .remove_container(cri::RemoveContainerRequest { container_id: old })
                .await;
        }
        let id = runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox.to_owned(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            })
            .await
            .context("CreateContainer")?
            .into_inner()
            .container_id;
        runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .context("StartContainer")?;
        let r = &mut run.runs[i];
        if r.attempt > 0 {
            r.restarts += 1;
        }
        r.attempt += 1;
        r.id = Some(id);
        r.not_before = None;
        r.waiting = None;
        r.running_since = Some(Instant::now());
        r.startup = ProbeState::default();
        r.liveness = ProbeState::default();
        r.readiness = ProbeState::default();
        r.status = None;
        Ok(())
    }

    /// The container's exec probes, each on its period: startup first; then liveness (a
    /// failed container is stopped, and restarted by the policy) and readiness.
    async fn probe(&self, run: &mut PodRun, i: usize) {
        let container = run.container(&run.runs[i].name).clone();
        let Some(id) = run.runs[i].id.clone() else {
            return;
        };
        let since = run.runs[i].running_since.unwrap_or_else(Instant::now);
        for kind in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let spec = &container[kind];
            let r = &mut run.runs[i];
            if kind != "startupProbe" && !container["startupProbe"].is_null() && !r.startup.passed {
                continue;
            }
            let state = match kind {
                "startupProbe" => &mut r.startup,
                "livenessProbe" => &mut r.liveness,
                _ => &mut r.readiness,
            };
            if spec.is_null() {
                state.passed = true;
                continue;
            }
            if kind == "startupProbe" && state.passed {
                continue;
            }
            let period = Duration::from_secs(spec["periodSeconds"].as_u64().unwrap_or(10));
            let first =
                since + Duration::from_secs(spec["initialDelaySeconds"].as_u64().unwrap_or(0));
            let due = state.next.unwrap_or(first);
            if Instant::now() < due {
                continue;
            }
            state.next = Some(Instant::now() + period);
            let command: Vec<String> = spec["exec"]["command"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect();
            let timeout = spec["timeoutSeconds"].as_i64().unwrap_or(1);
            let ok = self
                .cri
                .runtime
                .clone()
                .exec_sync(cri::ExecSyncRequest {
                    container_id: id.clone(),
                    cmd: command,
                    timeout,
                })
                .await
                .is_ok_and(|r| r.into_inner().exit_code == 0);
            let threshold = spec["failureThreshold"].as_u64().unwrap_or(3) as u32;
            if ok {
                state.failures = 0;
                state.passed = true;
            } else {
                state.failures += 1;
                if kind == "readinessProbe" {
                    state.passed = false;
                }
                if kind != "readinessProbe" && state.failures >= threshold {
                    let grace = run.pod["spec"]["terminationGracePeriodSeconds"]
                        .as_i64()
                        .unwrap_or(30);
                    let _ = self
                        .cri
                        .runtime
                        .clone()
                        .stop_container(cri::StopContainerRequest {
                            container_id: id.clone(),
                            timeout: grace,
                        })
                        .await;
                    return;
                }
            }
        }
    }

    async fn prepare_volumes(&self, run: &mut PodRun) -> anyhow::Result<()> {
        let volumes_dir = run.dir.join("volumes");
        std::fs::create_dir_all(&volumes_dir)?;
        let namespace = run.namespace().to_owned();
        let spec_volumes = run.pod["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for volume in spec_volumes {
            let name = volume["name"].as_str().unwrap_or("").to_owned();
            if let Some(host) = volume.get("hostPath") {
                let path = PathBuf::from(host["path"].as_str().unwrap_or(""));
                check_host_path(&path, host["type"].as_str().unwrap_or(""))?;
                run.volumes.insert(name, (path, false));
            } else if let Some(empty) = volume.get("emptyDir") {
                let path = volumes_dir.join("kubernetes.io~empty-dir").join(&name);
                std::fs::create_dir_all(&path)?;
                if empty["medium"] == "Memory" {
                    let size = empty["sizeLimit"].as_str().and_then(podspec::bytes);
                    let options = size.map(|s| format!("size={s},mode=1777"));
                    nix::mount::mount(
                        Some("tmpfs"),
                        &path,
                        Some("tmpfs"),
                        nix::mount::MsFlags::empty(),
                        Some(options.as_deref().unwrap_or("mode=1777")),
                    )
                    .with_context(|| format!("tmpfs for emptyDir {name}"))?;
                    run.tmpfs.push(path.clone());
                }
                set_mode(&path, 0o777)?;
                run.volumes.insert(name, (path, false));
            } else {
                let path = volumes_dir.join("kubernetes.io~projected").join(&name);
                std::fs::create_dir_all(&path)?;
                let sources: Vec<Value> = if let Some(secret) = volume.get("secret") {
                    vec![
                        json!({"secret": {"name": secret["secretName"], "items": secret["items"], "defaultMode": secret["defaultMode"]}}),
                    ]
                } else if let Some(map) = volume.get("configMap") {
                    vec![json!({"configMap": map})]
                } else if let Some(downward) = volume.get("downwardAPI") {
                    vec![json!({"downwardAPI": downward})]
                } else {
                    volume["projected"]["sources"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                };
                let mode = volume["projected"]["defaultMode"]
                    .as_u64()
                    .or(volume["secret"]["defaultMode"].as_u64())
                    .or(volume["configMap"]["defaultMode"].as_u64())
                    .unwrap_or(0o644) as u32;
                for source in sources {
                    self.project(run, &namespace, &path, &source, mode).await?;
                }
                run.volumes.insert(name, (path, true));
            }
        }
        Ok(())
    }

    /// One source of a projected (or secret, config map, downward API) volume.
    async fn project(
        &self,
        run: &mut PodRun,
        namespace: &str,
        dir: &Path,
        source: &Value,
        mode: u32,
    ) -> anyhow::Result<()> {
        let write = |file: &str, bytes: &[u8]| -> anyhow::Result<()> {
            let path = dir.join(file);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, bytes)?;
            set_mode(&path, mode)
        };
        let items = |source: &Value, keys: Vec<String>| -> Vec<(String, String)> {
            match source["items"].as_array() {
                Some(items) => items
                    .iter()
                    .map(|i| {
                        (
                            i["key"].as_str().unwrap_or("").to_owned(),
                            i["path"].as_str().unwrap_or("").to_owned(),
                        )
                    })
                    .collect(),
                None => keys.into_iter().map(|k| (k.clone(), k)).collect(),
            }
        };
        if let Some(token) = source.get("serviceAccountToken") {
            let account = run.pod["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default")
                .to_owned();
            let audiences = match token["audience"].as_str() {
                Some(a) => vec![a.to_owned()],
                None => Vec::new(),
            };
            let seconds = token["expirationSeconds"].as_i64().unwrap_or(3600);
            let path = dir.join(token["path"].as_str().unwrap_or("token"));
            let mut entry = Token {
                path,
                account,
                audiences,
                seconds,
                written: Instant::now(),
            };
            self.write_token(run, &mut entry).await?;
            set_mode(&entry.path, mode)?;
            run.tokens.push(entry);
        } else if let Some(secret) = source.get("secret") {
            let name = secret["name"].as_str().unwrap_or("");
            let found = self
                .get(&format!("/api/v1/namespaces/{namespace}/secrets/{name}"))
                .await?;
            let data = found["data"].as_object().cloned().unwrap_or_default();
            for (key, path) in items(secret, data.keys().cloned().collect()) {
                use base64::Engine as _;
                let value = data.get(&key).and_then(Value::as_str).unwrap_or("");
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(value)
                    .with_context(|| format!("secret {name} key {key}"))?;
                write(&path, &bytes)?;
            }
        } else if let Some(map) = source.get("configMap") {
            let name = map["name"].as_str().unwrap_or("");
            let found = self
                .get(&format!("/api/v1/namespaces/{namespace}/configmaps/{name}"))
                .await?;
            let data = found["data"].as_object().cloned().unwrap_or_default();
            for (key, path) in items(map, data.keys().cloned().collect()) {
                write(
                    &path,
                    data.get(&key)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .as_bytes(),
                )?;
            }
        } else if let Some(downward) = source.get("downwardAPI") {
            for item in downward["items"].as_array().into_iter().flatten() {
                let field = item["fieldRef"]["fieldPath"].as_str().unwrap_or("");
                let value = podspec::field(&run.pod, field, &run.ctx).map_err(|e| anyhow!(e))?;
                write(item["path"].as_str().unwrap_or(""), value.as_bytes())?;
            }
        }
        Ok(())
    }

    /// A projected token from the TokenRequest API, bound to the pod.
    async fn write_token(&self, run: &PodRun, token: &mut Token) -> anyhow::Result<()> {
        let request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": token.audiences, "expirationSeconds": token.seconds,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": run.name(), "uid": run.uid()}}});
        let answer: Value = api(
            &self.api,
            "POST",
            &format!(
                "/api/v1/namespaces/{}/serviceaccounts/{}/token",
                run.namespace(),
                token.account
            ),
            "application/json",
            Some(&request),
        )
        .await?;
        let jwt = answer["status"]["token"]
            .as_str()
            .ok_or_else(|| anyhow!("TokenRequest answered no token"))?;
        // Replaced whole, as the kubelet's atomic writer does.
        let tmp = token.path.with_extension("new");
        std::fs::write(&tmp, jwt)?;
        std::fs::rename(&tmp, &token.path)?;
        token.written = Instant::now();
        Ok(())
    }

    /// Tokens past 80 % of their life are requested again, as the kubelet does.
    async fn refresh_tokens(&self, run: &mut PodRun) {
        let mut tokens = std::mem::take(&mut run.tokens);
        for token in &mut tokens {
            let life = Duration::from_secs(u64::try_from(token.seconds).unwrap_or(3600));
            if token.written.elapsed() > life.mul_f64(0.8)
                && let Err(e) = self.write_token(run, token).await
            {
                eprintln!(
                    "kiam-lab-kubelet: refreshing {}: {e:#}",
                    token.path.display()
                );
            }
        }
        run.tokens = tokens;
    }

    /// Every `--dns-service` Service's name, with the addresses of its ready pods.
    async fn update_zone(&self) {
        let mut zone = HashMap::new();
        for service in &self.cli.dns_service {
            let Some((ns, name)) = service.split_once('/') else {
                continue;
            };
            let Ok(found) = self
                .get(&format!("/api/v1/namespaces/{ns}/services/{name}"))
                .await
            else {
                continue;
            };
            let selector = found["spec"]["selector"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            let Ok(pods) = self.get(&format!("/api/v1/namespaces/{ns}/pods")).await else {
                continue;
            };
            let ready: Vec<std::net::Ipv4Addr> = pods["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| {
                    selector
                        .iter()
                        .all(|(k, v)| p["metadata"]["labels"][k] == *v)
                })
                .filter(|p| {
                    p["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
                .filter_map(|p| p["status"]["podIP"].as_str().and_then(|ip| ip.parse().ok()))
                .collect();
            zone.insert(format!("{name}.{ns}.svc.cluster.local"), ready);
        }
        *self.zone.write().unwrap_or_else(|e| e.into_inner()) = zone;
    }

    /// The pod's `/etc/hosts` as the kubelet keeps it: the node's for host-network pods,
    /// else localhost and the pod's own name.
    fn write_hosts(&self, run: &PodRun) {
        let text = if run.pod["spec"]["hostNetwork"] == true {
            std::fs::read_to_string(&self.cli.node_hosts).unwrap_or_default()
        } else {
            format!(
                "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{}\n",
                run.ctx.pod_ip,
                run.name()
            )
        };
        if std::fs::read_to_string(&run.ctx.hosts_file).ok().as_deref() != Some(text.as_str()) {
            let _ = std::fs::create_dir_all(&run.dir);
            let _ = std::fs::write(&run.ctx.hosts_file, text);
        }
    }

    /// Writes the pod's status when it changed.
    async fn report(&self, run: &mut PodRun) {
        let status = pod_status(run);
        if status == run.last_status {
            return;
        }
        let patch = json!({"status": status});
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}/status",
            run.namespace(),
            run.name()
        );
        match api::<Value>(
            &self.api,
            "PATCH",
            &path,
            "application/merge-patch+json",
            Some(&patch),
        )
        .await
        {
            Ok(_) => run.last_status = status,
            Err(e) => eprintln!("kiam-lab-kubelet: {e:#}"),
        }
    }

    /// The pod is gone from the API: its containers get their grace period, then the sandbox
    /// is stopped and removed, and its volumes with it.
    async fn stop_pod(&self, run: PodRun) {
        let mut runtime = self.cri.runtime.clone();
        let grace = run.pod["spec"]["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap_or(30);
        let stops = run.runs.iter().filter_map(|r| r.id.clone()).map(|id| {
            let mut runtime = runtime.clone();
            async move {
                let _ = runtime
                    .stop_container(cri::StopContainerRequest {
                        container_id: id,
                        timeout: grace,
                    })
                    .await;
            }
        });
        futures::future::join_all(stops).await;
        if let Some(id) = &run.sandbox {
            let _ = runtime
                .stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await;
            let _ = runtime
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await;
        }
        for path in &run.tmpfs {
            let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir_all(&run.dir);
        // The pod's own cgroup, which the runtime does not remove (the kubelet's pod cgroup
        // manager does), in every hierarchy.
        let parent = podspec::cgroup_parent(
            &self.cli.cgroup_root,
            podspec::qos_class(&run.pod),
            run.uid(),
        );
        kiam_e2e::lab::remove_cgroup_everywhere(Path::new(parent.trim_start_matches('/')));
    }
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// The kubelet's checks of a hostPath volume's `type`.
fn check_host_path(path: &Path, kind: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let meta = std::fs::metadata(path);
    let ok = match kind {
        "" => true,
        "DirectoryOrCreate" => {
            if meta.is_err() {
                std::fs::create_dir_all(path)?;
                set_mode(path, 0o755)?;
            }
            std::fs::metadata(path)?.is_dir()
        }
        "Directory" => meta.as_ref().is_ok_and(|m| m.is_dir()),
        "FileOrCreate" => {
            if meta.is_err() {
                std::fs::write(path, b"")?;
            }
            std::fs::metadata(path)?.is_file()
        }
        "File" => meta.as_ref().is_ok_and(|m| m.is_file()),
        "Socket" => meta.as_ref().is_ok_and(|m| m.file_type().is_socket()),
        "CharDevice" => meta.as_ref().is_ok_and(|m| m.file_type().is_char_device()),
        "BlockDevice" => meta.as_ref().is_ok_and(|m| m.file_type().is_block_device()),
        other => bail!("hostPath type {other}"),
    };
    if !ok {
        bail!("hostPath {} is not a {kind}", path.display());
    }
    Ok(())
}

fn terminated(status: &cri::ContainerStatus) -> Value {
    json!({"terminated": {
        "exitCode": status.exit_code,
        "reason": if status.reason.is_empty() { if status.exit_code == 0 { "Completed" } else { "Error" } } else { status.reason.as_str() },
        "startedAt": rfc3339_of_nanos(status.started_at),
        "finishedAt": rfc3339_of_nanos(status.finished_at),
        "containerID": format!("containerd://{}", status.id),
    }})
}

fn container_status(run: &PodRun, r: &Run) -> Value {
    let container = run.container(&r.name);
    let state = match (&r.status, &r.waiting) {
        (Some(s), None) if s.state == cri::ContainerState::ContainerRunning as i32 => {
            json!({"running": {"startedAt": rfc3339_of_nanos(s.started_at)}})
        }
        (Some(s), None) if s.state == cri::ContainerState::ContainerExited as i32 => terminated(s),
        (_, Some((reason, message))) => json!({"waiting": {"reason": reason, "message": message}}),
        _ => json!({"waiting": {"reason": "ContainerCreating"}}),
    };
    let running = r.running() && r.waiting.is_none();
    let ready = running && r.startup.passed && r.readiness.passed;
    let mut status = json!({
        "name": r.name,
        "image": container["image"],
        "imageID": r.status.as_ref().map(|s| s.image_ref.clone()).unwrap_or_default(),
        "ready": ready,
        "started": running && r.startup.passed,
        "restartCount": r.restarts,
        "state": state,
    });
    if let Some(id) = &r.id {
        status["containerID"] = json!(format!("containerd://{id}"));
    }
    if let Some(last) = &r.last_terminated {
        status["lastState"] = last.clone();
    }
    status
}

fn pod_status(run: &PodRun) -> Value {
    let condition =
        |kind: &str, ok: bool| json!({"type": kind, "status": if ok { "True" } else { "False" }});
    if let Some(why) = &run.refused {
        return json!({"phase": "Failed", "reason": "NodeLabUnsupported", "message": why,
            "hostIP": run.ctx.node_ip, "startTime": run.started});
    }
    let inits: Vec<&Run> = run.runs.iter().filter(|r| r.init).collect();
    let apps: Vec<&Run> = run.runs.iter().filter(|r| !r.init).collect();
    let initialized = inits.iter().all(|r| r.exited() == Some(0));
    let statuses: Vec<Value> = apps.iter().map(|r| container_status(run, r)).collect();
    let ready = initialized && statuses.iter().all(|s| s["ready"] == true);
    let running = apps.iter().any(|r| r.running());
    let restart_policy = run.pod["spec"]["restartPolicy"]
        .as_str()
        .unwrap_or("Always");
    let all_exited = !apps.is_empty() && apps.iter().all(|r| r.exited().is_some());
    let phase = if running || (initialized && !all_exited && apps.iter().any(|r| r.id.is_some())) {
        "Running"
    } else if all_exited && restart_policy != "Always" {
        if apps.iter().all(|r| r.exited() == Some(0)) {
            "Succeeded"
        } else {
            "Failed"
        }
    } else {
        "Pending"
    };
    let mut status = json!({
        "phase": phase,
        "hostIP": run.ctx.node_ip,
        "hostIPs": [{"ip": run.ctx.node_ip}],
        "startTime": run.started,
        "qosClass": podspec::qos_class(&run.pod).name(),
        "conditions": [
            condition("PodScheduled", true),
            condition("Initialized", initialized),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ],
        "containerStatuses": statuses,
    });
    if !run.ctx.pod_ip.is_empty() {
        status["podIP"] = json!(run.ctx.pod_ip);
        status["podIPs"] = json!([{"ip": run.ctx.pod_ip}]);
    }
    if !inits.is_empty() {
        status["initContainerStatuses"] = json!(
            inits
                .iter()
                .map(|r| container_status(run, r))
                .collect::<Vec<_>>()
        );
    }
    status
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = kube::config::Kubeconfig::read_from(&cli.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let api = kube::Client::try_from(config)?;
    let cri = Cri::connect(&cli.cri_socket).await?;
    std::fs::create_dir_all(cli.root_dir.join("pods"))?;
    let zone = Zone::default();
    let dns = tokio::net::UdpSocket::bind((cli.cluster_dns, 53))
        .await
        .with_context(|| format!("binding the cluster DNS at {}:53", cli.cluster_dns))?;
    tokio::spawn(serve_dns(dns, zone.clone()));
    let mut kubelet = Kubelet {
        cli,
        api,
        cri,
        pods: HashMap::new(),
        zone,
    };
    println!("ready");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        if let Err(e) = kubelet.tick().await {
            eprintln!("kiam-lab-kubelet: {e:#}");
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = terminate.recv() => return Ok(()),
        }
    }
}
