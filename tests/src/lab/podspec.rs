//! What the kubelet makes of a pod's spec for the container runtime, as pure functions: the
//! pod's QoS class and cgroup parent, the CRI sandbox and container configurations (the
//! security context, resources, environment with the downward API and `$(VAR)` expansion,
//! mounts with propagation), and the fields the lab's kubelet does not support, which it
//! refuses by name rather than drop.
//!
//! The conversions follow the kubelet's (`pkg/kubelet/kuberuntime`): CPU shares from
//! requests (2 at least), a CFS quota from limits over a 100 ms period, the memory limit, the
//! default masked and read-only `/proc` paths for unprivileged containers, `no_new_privs`
//! when `allowPrivilegeEscalation` is false, seccomp `Unconfined` unless a profile is asked
//! for, PID namespaces per container unless shared.

use std::{collections::BTreeMap, path::PathBuf};

use k8s_cri::v1 as cri;
use serde_json::Value;

/// Fields of a pod the lab's kubelet acts on, or that only the scheduler reads. Anything
/// else is refused by name.
const POD_SPEC_FIELDS: &[&str] = &[
    "containers",
    "initContainers",
    "volumes",
    "hostNetwork",
    "hostPID",
    "hostIPC",
    "shareProcessNamespace",
    "securityContext",
    "serviceAccountName",
    "serviceAccount",
    "automountServiceAccountToken",
    "nodeName",
    "restartPolicy",
    "terminationGracePeriodSeconds",
    "dnsPolicy",
    "enableServiceLinks",
    "hostname",
    // The scheduler's, already acted on when the pod was bound to this node.
    "affinity",
    "tolerations",
    "nodeSelector",
    "priorityClassName",
    "priority",
    "preemptionPolicy",
    "schedulerName",
    "topologySpreadConstraints",
];

const CONTAINER_FIELDS: &[&str] = &[
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "workingDir",
    "env",
    "ports",
    "volumeMounts",
    "resources",
    "securityContext",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "terminationMessagePath",
    "terminationMessagePolicy",
];

const POD_SECURITY_FIELDS: &[&str] = &[
    "runAsUser",
    "runAsGroup",
    "runAsNonRoot",
    "seccompProfile",
    "supplementalGroups",
    "sysctls",
];

const CONTAINER_SECURITY_FIELDS: &[&str] = &[
    "runAsUser",
    "runAsGroup",
    "runAsNonRoot",
    "seccompProfile",
    "capabilities",
    "privileged",
    "readOnlyRootFilesystem",
    "allowPrivilegeEscalation",
];

const VOLUME_SOURCES: &[&str] = &[
    "hostPath",
    "emptyDir",
    "secret",
    "configMap",
    "projected",
    "downwardAPI",
];

const PROBE_FIELDS: &[&str] = &[
    "exec",
    "initialDelaySeconds",
    "periodSeconds",
    "timeoutSeconds",
    "failureThreshold",
    "successThreshold",
];

/// The first field of `pod` the lab's kubelet does not support, as a path (`spec.x.y`).
pub fn unsupported(pod: &Value) -> Option<String> {
    let spec = &pod["spec"];
    let unknown = |object: &Value, allowed: &[&str], at: &str| -> Option<String> {
        object.as_object().and_then(|o| {
            o.keys()
                .find(|k| !allowed.contains(&k.as_str()))
                .map(|k| format!("{at}.{k}"))
        })
    };
    if let Some(field) = unknown(spec, POD_SPEC_FIELDS, "spec") {
        return Some(field);
    }
    if let Some(field) = unknown(
        &spec["securityContext"],
        POD_SECURITY_FIELDS,
        "spec.securityContext",
    ) {
        return Some(field);
    }
    if let Some(policy) = spec["dnsPolicy"].as_str()
        && !matches!(
            policy,
            "ClusterFirst" | "ClusterFirstWithHostNet" | "Default"
        )
    {
        return Some(format!("spec.dnsPolicy={policy}"));
    }
    if let Some(profile) = seccomp_type(&spec["securityContext"])
        && profile == "Localhost"
    {
        return Some("spec.securityContext.seccompProfile.type=Localhost".into());
    }
    for (list, at) in [
        ("initContainers", "spec.initContainers"),
        ("containers", "spec.containers"),
    ] {
        for c in spec[list].as_array().into_iter().flatten() {
            let name = c["name"].as_str().unwrap_or("?");
            let at = format!("{at}[{name}]");
            if let Some(field) = unknown(c, CONTAINER_FIELDS, &at) {
                return Some(field);
            }
            if let Some(field) = unknown(
                &c["securityContext"],
                CONTAINER_SECURITY_FIELDS,
                &format!("{at}.securityContext"),
            ) {
                return Some(field);
            }
            if seccomp_type(&c["securityContext"]) == Some("Localhost") {
                return Some(format!(
                    "{at}.securityContext.seccompProfile.type=Localhost"
                ));
            }
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                if let Some(field) = unknown(&c[probe], PROBE_FIELDS, &format!("{at}.{probe}")) {
                    return Some(field);
                }
            }
            for (i, env) in c["env"].as_array().into_iter().flatten().enumerate() {
                let from = &env["valueFrom"];
                if !from.is_null()
                    && from.get("fieldRef").is_none()
                    && from.get("secretKeyRef").is_none()
                {
                    return Some(format!("{at}.env[{i}].valueFrom"));
                }
                if let Some(path) = from["fieldRef"]["fieldPath"].as_str()
                    && !FIELD_PATHS.contains(&path)
                {
                    return Some(format!("{at}.env[{i}].valueFrom.fieldRef.fieldPath={path}"));
                }
            }
            for (i, mount) in c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                if let Some(field) = unknown(
                    mount,
                    &[
                        "name",
                        "mountPath",
                        "readOnly",
                        "mountPropagation",
                        "subPath",
                    ],
                    &format!("{at}.volumeMounts[{i}]"),
                ) {
                    return Some(field);
                }
            }
            for (i, port) in c["ports"].as_array().into_iter().flatten().enumerate() {
                if port.get("hostPort").is_some() && spec["hostNetwork"] != true {
                    return Some(format!("{at}.ports[{i}].hostPort (no portmap plugin)"));
                }
            }
        }
    }
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        let name = volume["name"].as_str().unwrap_or("?");
        if let Some(field) = volume.as_object().and_then(|o| {
            o.keys()
                .find(|k| *k != "name" && !VOLUME_SOURCES.contains(&k.as_str()))
        }) {
            return Some(format!("spec.volumes[{name}].{field}"));
        }
        for source in volume["projected"]["sources"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(kind) = source.as_object().and_then(|o| {
                o.keys().find(|k| {
                    !["serviceAccountToken", "configMap", "secret", "downwardAPI"]
                        .contains(&k.as_str())
                })
            }) {
                return Some(format!("spec.volumes[{name}].projected.sources.{kind}"));
            }
        }
    }
    None
}

/// The downward API fields the lab's kubelet resolves.
pub const FIELD_PATHS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.hostIP",
    "status.podIP",
];

fn seccomp_type(security: &Value) -> Option<&str> {
    security["seccompProfile"]["type"].as_str()
}

/// The pod's QoS class, as the kubelet computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    pub fn name(self) -> &'static str {
        match self {
            Self::Guaranteed => "Guaranteed",
            Self::Burstable => "Burstable",
            Self::BestEffort => "BestEffort",
        }
    }
}

/// Guaranteed: every container has CPU and memory limits equal to its requests; BestEffort:
/// none has any; Burstable otherwise.
pub fn qos_class(pod: &Value) -> Qos {
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod["spec"][k].as_array().into_iter().flatten())
        .collect();
    let resources =
        |c: &Value, kind: &str, r: &str| c["resources"][kind][r].as_str().map(str::to_owned);
    let any = containers.iter().any(|c| {
        ["requests", "limits"].iter().any(|k| {
            ["cpu", "memory"]
                .iter()
                .any(|r| resources(c, k, r).is_some())
        })
    });
    if !any {
        return Qos::BestEffort;
    }
    let guaranteed = containers.iter().all(|c| {
        ["cpu", "memory"].iter().all(|r| {
            let limit = resources(c, "limits", r);
            // A request left out defaults to the limit.
            let request = resources(c, "requests", r).or_else(|| limit.clone());
            limit.is_some() && request == limit
        })
    });
    if guaranteed {
        Qos::Guaranteed
    } else {
        Qos::Burstable
    }
}

/// The pod's cgroup, as the kubelet's cgroupfs driver names it under `--cgroup-root`:
/// `<root>/kubepods[/burstable|/besteffort]/pod<uid>`.
pub fn cgroup_parent(root: &str, qos: Qos, uid: &str) -> String {
    let root = root.trim_end_matches('/');
    match qos {
        Qos::Guaranteed => format!("{root}/kubepods/pod{uid}"),
        Qos::Burstable => format!("{root}/kubepods/burstable/pod{uid}"),
        Qos::BestEffort => format!("{root}/kubepods/besteffort/pod{uid}"),
    }
}

/// Millicores of a CPU quantity (`100m`, `1`, `0.5`).
pub fn cpu_millis(quantity: &str) -> Option<i64> {
    match quantity.strip_suffix('m') {
        Some(m) => m.parse().ok(),
        None => quantity
            .parse::<f64>()
            .ok()
            .map(|c| (c * 1000.0).ceil() as i64),
    }
}

/// Bytes of a memory quantity (`128Mi`, `1G`, `1000`).
pub fn bytes(quantity: &str) -> Option<i64> {
    const SUFFIXES: [(&str, i64); 12] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
    ];
    for (suffix, unit) in SUFFIXES {
        if let Some(n) = quantity.strip_suffix(suffix) {
            return n.parse::<i64>().ok().and_then(|n| n.checked_mul(unit));
        }
    }
    quantity.parse().ok()
}

/// Kubernetes' `$(VAR)` expansion: references to variables defined earlier are replaced,
/// `$$` is an escaped `$`, anything else is left as it is.
pub fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(inner) = tail.strip_prefix("$(")
            && let Some(end) = inner.find(')')
            && let Some((_, value)) = env.iter().rev().find(|(k, _)| *k == inner[..end])
        {
            out.push_str(value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// What the pod's environment and mounts are made from.
#[derive(Debug, Clone)]
pub struct PodContext {
    pub node_name: String,
    pub node_ip: String,
    pub pod_ip: String,
    /// `KUBERNETES_SERVICE_HOST` and `_PORT`.
    pub kubernetes_service: (String, u16),
    /// The pod's log directory (`/var/log/pods/<ns>_<name>_<uid>`).
    pub log_directory: PathBuf,
    /// The pod's `/etc/hosts`, kept by the kubelet.
    pub hosts_file: PathBuf,
    /// Its `--cgroup-root`.
    pub cgroup_root: String,
    /// Its `--cluster-dns`.
    pub cluster_dns: String,
}

/// Where each volume of the pod is on the node, and whether it is always read-only
/// (secrets, config maps, projections).
pub type Volumes = BTreeMap<String, (PathBuf, bool)>;

fn meta<'a>(pod: &'a Value, field: &str) -> &'a str {
    pod["metadata"][field].as_str().unwrap_or("")
}

/// A container of the pod asked for privileges.
fn any_privileged(pod: &Value) -> bool {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod["spec"][k].as_array().into_iter().flatten())
        .any(|c| c["securityContext"]["privileged"] == true)
}

fn namespace_options(pod: &Value) -> cri::NamespaceOption {
    let spec = &pod["spec"];
    let mode = |on: bool, off: cri::NamespaceMode| {
        if on {
            cri::NamespaceMode::Node as i32
        } else {
            off as i32
        }
    };
    cri::NamespaceOption {
        network: mode(spec["hostNetwork"] == true, cri::NamespaceMode::Pod),
        pid: if spec["hostPID"] == true {
            cri::NamespaceMode::Node as i32
        } else if spec["shareProcessNamespace"] == true {
            cri::NamespaceMode::Pod as i32
        } else {
            cri::NamespaceMode::Container as i32
        },
        ipc: mode(spec["hostIPC"] == true, cri::NamespaceMode::Pod),
        ..Default::default()
    }
}

fn seccomp(profile: Option<&str>) -> Option<cri::SecurityProfile> {
    use cri::security_profile::ProfileType;
    Some(cri::SecurityProfile {
        profile_type: match profile {
            Some("RuntimeDefault") => ProfileType::RuntimeDefault as i32,
            _ => ProfileType::Unconfined as i32,
        },
        localhost_ref: String::new(),
    })
}

/// The pod's `securityContext.supplementalGroups`, for its sandbox and each container.
fn supplemental_groups(pod_security: &Value) -> Vec<i64> {
    pod_security["supplementalGroups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_i64)
        .collect()
}

fn int64(value: &Value) -> Option<cri::Int64Value> {
    value.as_i64().map(|value| cri::Int64Value { value })
}

/// The sandbox (pause container, network namespace, pod cgroup) the kubelet asks for.
pub fn sandbox_config(pod: &Value, ctx: &PodContext, attempt: u32) -> cri::PodSandboxConfig {
    let spec = &pod["spec"];
    let pod_security = &spec["securityContext"];
    let host_network = spec["hostNetwork"] == true;
    let mut labels = BTreeMap::new();
    for (key, field) in [
        ("io.kubernetes.pod.name", "name"),
        ("io.kubernetes.pod.namespace", "namespace"),
        ("io.kubernetes.pod.uid", "uid"),
    ] {
        labels.insert(key.to_owned(), meta(pod, field).to_owned());
    }
    let annotations = pod["metadata"]["annotations"]
        .as_object()
        .map(|a| {
            a.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let sysctls = pod_security["sysctls"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or("").to_owned(),
                s["value"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: meta(pod, "name").to_owned(),
            uid: meta(pod, "uid").to_owned(),
            namespace: meta(pod, "namespace").to_owned(),
            attempt,
        }),
        hostname: if host_network {
            String::new()
        } else {
            spec["hostname"]
                .as_str()
                .unwrap_or(meta(pod, "name"))
                .to_owned()
        },
        log_directory: ctx.log_directory.to_string_lossy().into_owned(),
        dns_config: Some(dns_config(pod, &ctx.cluster_dns)),
        labels: labels.into_iter().collect(),
        annotations,
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent(&ctx.cgroup_root, qos_class(pod), meta(pod, "uid")),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options(pod)),
                run_as_user: int64(&pod_security["runAsUser"]),
                run_as_group: int64(&pod_security["runAsGroup"]),
                supplemental_groups: supplemental_groups(pod_security),
                privileged: any_privileged(pod),
                seccomp: seccomp(seccomp_type(pod_security)),
                ..Default::default()
            }),
            sysctls,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod's DNS settings as the kubelet makes them: for `ClusterFirst` (and host-network
/// pods with `ClusterFirstWithHostNet`) the cluster DNS and search path; otherwise the node's
/// (`resolv.conf` as the runtime finds it).
fn dns_config(pod: &Value, cluster_dns: &str) -> cri::DnsConfig {
    let policy = pod["spec"]["dnsPolicy"].as_str().unwrap_or("ClusterFirst");
    let host_network = pod["spec"]["hostNetwork"] == true;
    let cluster = match policy {
        "ClusterFirstWithHostNet" => true,
        "ClusterFirst" => !host_network,
        _ => false,
    };
    if !cluster {
        return cri::DnsConfig::default();
    }
    let ns = meta(pod, "namespace");
    cri::DnsConfig {
        servers: vec![cluster_dns.to_owned()],
        searches: vec![
            format!("{ns}.svc.cluster.local"),
            "svc.cluster.local".into(),
            "cluster.local".into(),
        ],
        options: vec!["ndots:5".into()],
    }
}

/// The default `/proc` paths the kubelet masks and makes read-only in unprivileged
/// containers (`securitycontext.DefaultProcMount`).
const MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The container's environment: the `kubernetes` Service's variables, then its own `env`
/// in order, each value with `$(VAR)` expanded against those before it. `secret` looks up
/// a `secretKeyRef`.
pub fn environment(
    pod: &Value,
    container: &Value,
    ctx: &PodContext,
    secret: &dyn Fn(&str, &str) -> Result<String, String>,
) -> Result<Vec<(String, String)>, String> {
    let (host, port) = &ctx.kubernetes_service;
    let mut env: Vec<(String, String)> = vec![
        ("KUBERNETES_SERVICE_HOST".into(), host.clone()),
        ("KUBERNETES_SERVICE_PORT".into(), port.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.to_string()),
        ("KUBERNETES_PORT".into(), format!("tcp://{host}:{port}")),
    ];
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or("").to_owned();
        let value = if let Some(value) = var["value"].as_str() {
            expand(value, &env)
        } else if let Some(path) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            field(pod, path, ctx)?
        } else if let Some(r) = var["valueFrom"]["secretKeyRef"].as_object() {
            let key = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("");
            secret(key("name"), key("key"))?
        } else {
            String::new()
        };
        env.retain(|(k, _)| *k != name);
        env.push((name, value));
    }
    Ok(env)
}

/// A downward API field of the pod.
pub fn field(pod: &Value, path: &str, ctx: &PodContext) -> Result<String, String> {
    Ok(match path {
        "metadata.name" => meta(pod, "name").to_owned(),
        "metadata.namespace" => meta(pod, "namespace").to_owned(),
        "metadata.uid" => meta(pod, "uid").to_owned(),
        "spec.nodeName" => ctx.node_name.clone(),
        "spec.serviceAccountName" => pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_owned(),
        "status.hostIP" => ctx.node_ip.clone(),
        "status.podIP" => ctx.pod_ip.clone(),
        other => {
            return Err(format!(
                "the lab's kubelet does not resolve fieldPath {other}"
            ));
        }
    })
}

/// The CRI container configuration for `container` of `pod` (its `attempt`-th start).
pub fn container_config(
    pod: &Value,
    container: &Value,
    attempt: u32,
    ctx: &PodContext,
    volumes: &Volumes,
    env: Vec<(String, String)>,
) -> Result<cri::ContainerConfig, String> {
    use cri::MountPropagation;
    let name = container["name"].as_str().unwrap_or("").to_owned();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|s| expand(s, &env))
            .collect()
    };
    let mut mounts = Vec::new();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let volume = mount["name"].as_str().unwrap_or("");
        let (host, always_readonly) = volumes.get(volume).ok_or_else(|| {
            format!("container {name} mounts {volume}, which the pod does not have")
        })?;
        let host = match mount["subPath"].as_str() {
            Some(sub) if !sub.is_empty() => host.join(sub),
            _ => host.clone(),
        };
        let propagation = match mount["mountPropagation"].as_str() {
            Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
            Some("Bidirectional") => MountPropagation::PropagationBidirectional,
            Some("None") | None => MountPropagation::PropagationPrivate,
            Some(other) => return Err(format!("mountPropagation {other}")),
        };
        mounts.push(cri::Mount {
            container_path: mount["mountPath"].as_str().unwrap_or("").to_owned(),
            host_path: host.to_string_lossy().into_owned(),
            readonly: *always_readonly || mount["readOnly"] == true,
            propagation: propagation as i32,
            ..Default::default()
        });
    }
    if !mounts.iter().any(|m| m.container_path == "/etc/hosts") {
        mounts.push(cri::Mount {
            container_path: "/etc/hosts".into(),
            host_path: ctx.hosts_file.to_string_lossy().into_owned(),
            ..Default::default()
        });
    }
    let security = &container["securityContext"];
    let pod_security = &pod["spec"]["securityContext"];
    let privileged = security["privileged"] == true;
    let capabilities = |kind: &str| -> Vec<String> {
        security["capabilities"][kind]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|c| c.trim_start_matches("CAP_").to_owned())
            .collect()
    };
    let resources = &container["resources"];
    let request_cpu = resources["requests"]["cpu"]
        .as_str()
        .or(resources["limits"]["cpu"].as_str())
        .and_then(cpu_millis);
    let limit_cpu = resources["limits"]["cpu"].as_str().and_then(cpu_millis);
    let limit_memory = resources["limits"]["memory"].as_str().and_then(bytes);
    let qos = qos_class(pod);
    let or_pod = |k: &str| match &security[k] {
        Value::Null => &pod_security[k],
        v => v,
    };
    let profile = match seccomp_type(security) {
        Some(t) => Some(t),
        None => seccomp_type(pod_security),
    };
    let (masked_paths, readonly_paths) = match privileged {
        true => (Vec::new(), Vec::new()),
        false => (
            MASKED_PATHS.iter().map(|p| (*p).to_owned()).collect(),
            READONLY_PATHS.iter().map(|p| (*p).to_owned()).collect(),
        ),
    };
    Ok(cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.clone(),
            attempt,
        }),
        image: Some(cri::ImageSpec {
            image: normalized_image(container["image"].as_str().unwrap_or("")),
            ..Default::default()
        }),
        command: strings(&container["command"]),
        args: strings(&container["args"]),
        working_dir: container["workingDir"].as_str().unwrap_or("").to_owned(),
        envs: env
            .iter()
            .map(|(key, value)| cri::KeyValue {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        mounts,
        labels: [
            ("io.kubernetes.container.name".to_owned(), name.clone()),
            (
                "io.kubernetes.pod.uid".to_owned(),
                meta(pod, "uid").to_owned(),
            ),
            (
                "io.kubernetes.pod.name".to_owned(),
                meta(pod, "name").to_owned(),
            ),
            (
                "io.kubernetes.pod.namespace".to_owned(),
                meta(pod, "namespace").to_owned(),
            ),
        ]
        .into_iter()
        .collect(),
        log_path: format!("{name}/{attempt}.log"),
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                cpu_period: if limit_cpu.is_some() { 100_000 } else { 0 },
                cpu_quota: limit_cpu.map_or(0, |m| m * 100),
                cpu_shares: request_cpu.map_or(2, |m| (m * 1024 / 1000).max(2)),
                memory_limit_in_bytes: limit_memory.unwrap_or(0),
                oom_score_adj: match qos {
                    Qos::Guaranteed => -997,
                    Qos::BestEffort => 1000,
                    Qos::Burstable => 500,
                },
                ..Default::default()
            }),
            security_context: Some(cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    add_capabilities: capabilities("add"),
                    drop_capabilities: capabilities("drop"),
                    ..Default::default()
                }),
                privileged,
                namespace_options: Some(namespace_options(pod)),
                run_as_user: int64(or_pod("runAsUser")),
                run_as_group: int64(or_pod("runAsGroup")),
                readonly_rootfs: security["readOnlyRootFilesystem"] == true,
                supplemental_groups: supplemental_groups(pod_security),
                no_new_privs: security["allowPrivilegeEscalation"] == false,
                masked_paths,
                readonly_paths,
                seccomp: if privileged { None } else { seccomp(profile) },
                ..Default::default()
            }),
        }),
        ..Default::default()
    })
}

/// `runAsNonRoot` asked for, and the user the container would run as is root: the kubelet
/// refuses to start it. `image_user` is the image's configured user.
pub fn runs_as_root_against_policy(
    pod: &Value,
    container: &Value,
    image_user: Option<i64>,
) -> bool {
    let security = &container["securityContext"];
    let pod_security = &pod["spec"]["securityContext"];
    let non_root = match &security["runAsNonRoot"] {
        Value::Bool(b) => *b,
        _ => pod_security["runAsNonRoot"] == true,
    };
    let user = security["runAsUser"]
        .as_i64()
        .or(pod_security["runAsUser"].as_i64())
        .or(image_user)
        .unwrap_or(0);
    non_root && user == 0
}

/// An image reference as the runtime stores it (`docker.io/library/` added where the
/// reference has no registry), as the kubelet and containerd normalise them.
pub fn normalized_image(image: &str) -> String {
    let (name, tag) = match image.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
        Some((n, t)) => (n, Some(t)),
        None => (image, None),
    };
    let name = match name.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            name.to_owned()
        }
        Some(_) => format!("docker.io/{name}"),
        None => format!("docker.io/library/{name}"),
    };
    format!("{name}:{}", tag.unwrap_or("latest"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ctx() -> PodContext {
        PodContext {
            node_name: "node-1".into(),
            node_ip: "198.19.0.1".into(),
            pod_ip: "10.244.0.7".into(),
            kubernetes_service: ("198.19.0.1".into(), 6443),
            log_directory: "/logs".into(),
            hosts_file: "/pods/x/etc-hosts".into(),
            cgroup_root: "/lab".into(),
            cluster_dns: "198.19.0.10".into(),
        }
    }

    fn pod(containers: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "uid": "u-1"},
               "spec": {"containers": containers}})
    }

    #[test]
    fn qos_classes_and_cgroup_parents_are_the_kubelets() {
        let best = pod(json!([{"name": "a"}]));
        let guaranteed =
            pod(json!([{"name": "a", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]));
        let burstable = pod(json!([{"name": "a", "resources": {"requests": {"cpu": "50m"}}}]));
        assert_eq!(qos_class(&best), Qos::BestEffort);
        assert_eq!(qos_class(&guaranteed), Qos::Guaranteed);
        assert_eq!(qos_class(&burstable), Qos::Burstable);
        assert_eq!(
            cgroup_parent("/lab", Qos::Burstable, "u"),
            "/lab/kubepods/burstable/podu"
        );
        assert_eq!(
            cgroup_parent("/lab/", Qos::Guaranteed, "u"),
            "/lab/kubepods/podu"
        );
        assert_eq!(
            cgroup_parent("", Qos::BestEffort, "u"),
            "/kubepods/besteffort/podu"
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(cpu_millis("50m"), Some(50));
        assert_eq!(cpu_millis("1"), Some(1000));
        assert_eq!(cpu_millis("0.5"), Some(500));
        assert_eq!(bytes("32Mi"), Some(32 << 20));
        assert_eq!(bytes("1G"), Some(1_000_000_000));
        assert_eq!(bytes("1000"), Some(1000));
        assert_eq!(bytes("lots"), None);
    }

    #[test]
    fn variables_expand_as_kubernetes_does() {
        let env = vec![("HOST_IP".to_owned(), "10.0.0.1".to_owned())];
        assert_eq!(expand("$(HOST_IP):8182", &env), "10.0.0.1:8182");
        assert_eq!(expand("$$(HOST_IP)", &env), "$(HOST_IP)");
        assert_eq!(expand("$(MISSING) $", &env), "$(MISSING) $");
    }

    #[test]
    fn unsupported_fields_are_named_never_dropped() {
        let ok = pod(
            json!([{"name": "a", "image": "i", "env": [{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]}]),
        );
        assert_eq!(unsupported(&ok), None);
        let cases = [
            (
                json!({"runtimeClassName": "gvisor"}),
                "spec.runtimeClassName",
            ),
            (
                json!({"securityContext": {"fsGroup": 2}}),
                "spec.securityContext.fsGroup",
            ),
            (
                json!({"containers": [{"name": "a", "lifecycle": {}}]}),
                "spec.containers[a].lifecycle",
            ),
            (
                json!({"containers": [{"name": "a", "livenessProbe": {"httpGet": {}}}]}),
                "spec.containers[a].livenessProbe.httpGet",
            ),
            (
                json!({"containers": [{"name": "a", "env": [{"name": "R", "valueFrom": {"resourceFieldRef": {}}}]}]}),
                "spec.containers[a].env[0].valueFrom",
            ),
            (
                json!({"containers": [{"name": "a", "env": [{"name": "F", "valueFrom": {"fieldRef": {"fieldPath": "status.podIPs"}}}]}]}),
                "spec.containers[a].env[0].valueFrom.fieldRef.fieldPath=status.podIPs",
            ),
            (
                json!({"volumes": [{"name": "v", "persistentVolumeClaim": {}}]}),
                "spec.volumes[v].persistentVolumeClaim",
            ),
            (
                json!({"containers": [{"name": "a", "ports": [{"containerPort": 80, "hostPort": 80}]}]}),
                "spec.containers[a].ports[0].hostPort (no portmap plugin)",
            ),
        ];
        for (spec, field) in cases {
            let mut p = pod(json!([{"name": "a"}]));
            for (k, v) in spec.as_object().expect("object") {
                p["spec"][k] = v.clone();
            }
            assert_eq!(unsupported(&p).as_deref(), Some(field), "{spec}");
        }
    }

    #[test]
    fn the_agent_container_gets_what_its_manifest_asks() {
        let p = json!({"metadata": {"name": "agent", "namespace": "kiam", "uid": "u-2"},
            "spec": {"hostNetwork": true, "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "agent", "image": "ghcr.io/example/kiam-agent:0.1.0",
                "args": ["run"],
                "env": [{"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                        {"name": "ADMIN", "value": "$(HOST_IP):8182"}],
                "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN"]}},
                "volumeMounts": [{"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"}]}],
            "volumes": [{"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf"}}]}});
        assert_eq!(unsupported(&p), None);
        let c = &p["spec"]["containers"][0];
        let env = environment(&p, c, &ctx(), &|_, _| Err("no secrets".into())).expect("env");
        assert!(
            env.contains(&("ADMIN".into(), "198.19.0.1:8182".into())),
            "{env:?}"
        );
        let volumes: Volumes = [("bpffs".to_owned(), (PathBuf::from("/sys/fs/bpf"), false))].into();
        let config = container_config(&p, c, 0, &ctx(), &volumes, env).expect("config");
        let linux = config.linux.expect("linux");
        let security = linux.security_context.expect("security");
        assert!(security.no_new_privs && security.readonly_rootfs && !security.privileged);
        assert_eq!(
            security.capabilities.expect("caps").add_capabilities,
            ["BPF", "NET_ADMIN"]
        );
        assert_eq!(
            security.seccomp.expect("seccomp").profile_type,
            cri::security_profile::ProfileType::RuntimeDefault as i32
        );
        assert_eq!(
            security.namespace_options.expect("ns").network,
            cri::NamespaceMode::Node as i32
        );
        let resources = linux.resources.expect("resources");
        assert_eq!(
            (resources.cpu_shares, resources.memory_limit_in_bytes),
            (51, 128 << 20)
        );
        let bpffs = config
            .mounts
            .iter()
            .find(|m| m.container_path == "/sys/fs/bpf")
            .expect("mount");
        assert_eq!(
            bpffs.propagation,
            cri::MountPropagation::PropagationHostToContainer as i32
        );
        assert!(
            config
                .mounts
                .iter()
                .any(|m| m.container_path == "/etc/hosts")
        );
        let sandbox = sandbox_config(&p, &ctx(), 0);
        assert_eq!(
            sandbox.linux.expect("linux").cgroup_parent,
            "/lab/kubepods/burstable/podu-2"
        );
    }

    #[test]
    fn non_root_policy_uses_the_image_user_when_the_pod_names_none() {
        let p = json!({"spec": {"securityContext": {"runAsNonRoot": true}}});
        let c = json!({"name": "a"});
        assert!(runs_as_root_against_policy(&p, &c, Some(0)));
        assert!(!runs_as_root_against_policy(&p, &c, Some(65534)));
        assert!(!runs_as_root_against_policy(&json!({}), &c, Some(0)));
    }

    #[test]
    fn images_are_normalised_like_the_runtime_does() {
        assert_eq!(
            normalized_image("ghcr.io/example/kiam-agent:0.1.0"),
            "ghcr.io/example/kiam-agent:0.1.0"
        );
        assert_eq!(normalized_image("pause:1"), "docker.io/library/pause:1");
        assert_eq!(normalized_image("kiam/lab"), "docker.io/kiam/lab:latest");
        assert_eq!(normalized_image("localhost:5000/x:2"), "localhost:5000/x:2");
    }
}
