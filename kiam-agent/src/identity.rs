//! Who a cgroup belongs to: the kubelet's cgroup path → pod UID, QoS class and container.
//!
//! Pure parsing, no file system access. Every layout the kubelet and the runtimes make is
//! understood (the table test below holds a real example of each, with where it comes from):
//! - systemd driver: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`
//!   (Guaranteed pods directly under `kubepods.slice`); CRI-O's `crio-<id>.scope`, its
//!   monitor's `crio-conmon-<id>.scope` (no container), crun's `container` sub-cgroup and any
//!   other cgroup below a container's (exec sessions) keep that container;
//! - cgroupfs driver: `kubepods/burstable/pod<uid>/<id>`;
//! - kind and other nested slices: `kubelet.slice/kubelet-kubepods.slice/…`;
//! - a runtime using the cgroupfs driver under a systemd kubelet (kubernetes#106514): the
//!   literal directory `kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`;
//! - static pods: the UID is the kubelet's 32-hex config hash, without dashes
//!   (`kubepods-burstable-pod36b6d6be73b1065af369b3985edafa09.slice`); the servers know the
//!   pod by that hash through its mirror pod's `kubernetes.io/config.mirror` annotation.
//!
//! A kubelet with `cgroupsPerQOS: false` gives pods no cgroup of their own, so their
//! containers cannot be told apart by pod: such paths are refused with a reason naming the
//! setting.
//!
//! The first kubepods component on the path anchors the parse and the pod must sit exactly
//! where the kubelet puts it. A container with a delegated cgroup tree can create any
//! directories *below* its own cgroup, even ones named like another pod's; those never change
//! the answer, because only the first pod component after the anchor counts.

use std::fmt;

/// Kubernetes QoS class, from the cgroup the pod sits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// Container runtime that named the container's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    /// cgroupfs driver: the directory is the bare container id.
    Unknown,
}

/// The pod (and container) a cgroup belongs to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PodCgroup {
    /// Pod UID in its canonical dashed form, or a static pod's config hash (32 hex digits):
    /// what the servers know the pod by.
    pub pod_uid: String,
    /// A static pod (the kubelet made it from a file on the node; its UID is a config hash).
    pub static_pod: bool,
    pub qos: QosClass,
    /// Container id, when the cgroup is (or is below) a container's cgroup.
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
}

impl PodCgroup {
    /// What the agent keys a caller's answers, credentials and IMDSv2 tokens by:
    /// `<pod uid>/<container id>`, or the pod UID alone for a caller in the pod's cgroup but
    /// no container's. Neither part ever holds a `/`.
    pub fn subject(&self) -> String {
        match &self.container_id {
            Some(container) => format!("{}/{container}", self.pod_uid),
            None => self.pod_uid.clone(),
        }
    }
}

/// A [`PodCgroup::subject`]'s pod UID and container ID.
pub fn split_subject(subject: &str) -> (&str, Option<&str>) {
    match subject.split_once('/') {
        Some((pod, container)) => (pod, Some(container)),
        None => (subject, None),
    }
}

/// Why a path is not a pod's cgroup.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("no kubepods cgroup on the path")]
    NotUnderKubepods,
    #[error("the cgroup is a kubepods or QoS cgroup, not a pod's")]
    NotAPod,
    #[error("malformed pod cgroup name {0:?}")]
    MalformedPod(String),
    #[error(
        "a container cgroup outside any pod cgroup: the kubelet gives each pod a cgroup only with cgroupsPerQOS: true (its default), and without one kiam cannot tell pods apart"
    )]
    NoPodCgroup,
}

impl fmt::Display for QosClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Guaranteed => "guaranteed",
            Self::Burstable => "burstable",
            Self::BestEffort => "besteffort",
        })
    }
}

/// Parses a cgroup path (relative to the cgroup2 mount, with or without a leading `/`).
pub fn parse_cgroup_path(path: &str) -> Result<PodCgroup, ParseError> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    // The first component that names the kubelet's pods decides; anything below it is
    // either the pod's own or a container's business.
    for (at, component) in components.iter().enumerate() {
        if is_kubepods_root(component) {
            let rest = &components[at + 1..];
            return match component.ends_with(".slice") {
                true => parse_systemd(component, rest),
                false => parse_cgroupfs(rest),
            };
        }
        if let Some(found) = parse_driver_mismatch(component) {
            return found;
        }
    }
    match components.iter().any(|c| is_container_cgroup(c)) {
        true => Err(ParseError::NoPodCgroup),
        false => Err(ParseError::NotUnderKubepods),
    }
}

/// A runtime with the cgroupfs driver under a systemd kubelet takes the kubelet's
/// `slice:prefix:id` cgroup parent literally, as one directory (kubernetes#106514):
/// `kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`.
fn parse_driver_mismatch(component: &str) -> Option<Result<PodCgroup, ParseError>> {
    let mut parts = component.split(':');
    let (slice, prefix, id) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !slice.starts_with("kubepods") || !slice.ends_with(".slice") {
        return None;
    }
    let (qos, uid) = [
        (QosClass::Burstable, "kubepods-burstable-pod"),
        (QosClass::BestEffort, "kubepods-besteffort-pod"),
        (QosClass::Guaranteed, "kubepods-pod"),
    ]
    .into_iter()
    .find_map(|(qos, head)| Some((qos, slice.strip_prefix(head)?.strip_suffix(".slice")?)))?;
    let Some((pod_uid, static_pod)) = pod_id(&uid.replace('_', "-")) else {
        return Some(Err(malformed(component)));
    };
    let runtime = match prefix {
        "cri-containerd" => Runtime::Containerd,
        "crio" => Runtime::CriO,
        "docker" => Runtime::Docker,
        _ => return Some(Err(malformed(component))),
    };
    let (container_id, runtime) = match is_container_id(id) {
        true => (Some(id.to_owned()), Some(runtime)),
        false => (None, None),
    };
    Some(Ok(PodCgroup {
        pod_uid,
        static_pod,
        qos,
        container_id,
        runtime,
    }))
}

fn is_kubepods_root(component: &str) -> bool {
    // `kubepods.slice`, or a nested slice such as kind's `kubelet-kubepods.slice`.
    component == "kubepods"
        || component == "kubepods.slice"
        || component.ends_with("-kubepods.slice")
}

/// A cgroup a runtime made for a container (so a pod's, were the pod's cgroup above it).
fn is_container_cgroup(component: &str) -> bool {
    parse_systemd_container(component).0.is_some()
        || (component.len() == 64 && is_container_id(component))
}

fn parse_systemd(root: &str, rest: &[&str]) -> Result<PodCgroup, ParseError> {
    let mut parent = root.trim_end_matches(".slice");
    let mut rest = rest;
    let mut qos = QosClass::Guaranteed;
    if let Some(first) = rest.first() {
        for (class, name) in [
            (QosClass::Burstable, "burstable"),
            (QosClass::BestEffort, "besteffort"),
        ] {
            if first.strip_suffix(".slice") == Some(&format!("{parent}-{name}")) {
                qos = class;
                parent = first.trim_end_matches(".slice");
                rest = &rest[1..];
                break;
            }
        }
    }
    let pod = rest.first().ok_or(ParseError::NotAPod)?;
    let uid = pod
        .strip_prefix(parent)
        .and_then(|s| s.strip_prefix("-pod"))
        .and_then(|s| s.strip_suffix(".slice"))
        .ok_or_else(|| malformed_or_not_pod(pod))?;
    let (pod_uid, static_pod) = pod_id(&uid.replace('_', "-")).ok_or_else(|| malformed(pod))?;
    let (container_id, runtime) = match rest.get(1) {
        Some(container) => parse_systemd_container(container),
        None => (None, None),
    };
    Ok(PodCgroup {
        pod_uid,
        static_pod,
        qos,
        container_id,
        runtime,
    })
}

fn parse_systemd_container(component: &str) -> (Option<String>, Option<Runtime>) {
    let Some(unit) = component.strip_suffix(".scope") else {
        return (None, None);
    };
    // CRI-O's per-container monitor process is not the container.
    if unit.starts_with("crio-conmon-") {
        return (None, Some(Runtime::CriO));
    }
    for (prefix, runtime) in [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("docker-", Runtime::Docker),
    ] {
        if let Some(id) = unit.strip_prefix(prefix) {
            return match is_container_id(id) {
                true => (Some(id.to_owned()), Some(runtime)),
                false => (None, None),
            };
        }
    }
    (None, None)
}

fn parse_cgroupfs(rest: &[&str]) -> Result<PodCgroup, ParseError> {
    let (qos, rest) = match rest.first() {
        Some(&"burstable") => (QosClass::Burstable, &rest[1..]),
        Some(&"besteffort") => (QosClass::BestEffort, &rest[1..]),
        _ => (QosClass::Guaranteed, rest),
    };
    let pod = rest.first().ok_or(ParseError::NotAPod)?;
    let uid = pod
        .strip_prefix("pod")
        .ok_or_else(|| malformed_or_not_pod(pod))?;
    let (pod_uid, static_pod) = pod_id(uid).ok_or_else(|| malformed(pod))?;
    let (container_id, runtime) = match rest.get(1) {
        Some(c) => match c.strip_prefix("crio-") {
            Some(id) if is_container_id(id) => (Some(id.to_owned()), Some(Runtime::CriO)),
            Some(_) => (None, None),
            None if is_container_id(c) => (Some((*c).to_owned()), Some(Runtime::Unknown)),
            None => (None, None),
        },
        None => (None, None),
    };
    Ok(PodCgroup {
        pod_uid,
        static_pod,
        qos,
        container_id,
        runtime,
    })
}

fn malformed(component: &str) -> ParseError {
    ParseError::MalformedPod(component.to_owned())
}

fn malformed_or_not_pod(component: &str) -> ParseError {
    if component.contains("pod") {
        malformed(component)
    } else {
        ParseError::NotAPod
    }
}

/// The id the servers know a pod by: its UID in `8-4-4-4-12` lowercase hex form, or a static
/// pod's config hash (32 hex digits, no dashes; kubelet `pkg/kubelet/config/common.go`), with
/// whether it is the latter.
fn pod_id(uid: &str) -> Option<(String, bool)> {
    let hex = |g: &str| g.bytes().all(|b| b.is_ascii_hexdigit());
    if uid.len() == 32 && hex(uid) {
        return Some((uid.to_ascii_lowercase(), true));
    }
    let groups: Vec<&str> = uid.split('-').collect();
    let lengths = [8, 4, 4, 4, 12];
    let ok = groups.len() == lengths.len()
        && groups
            .iter()
            .zip(lengths)
            .all(|(g, n)| g.len() == n && hex(g));
    ok.then(|| (uid.to_ascii_lowercase(), false))
}

fn is_container_id(id: &str) -> bool {
    (12..=128).contains(&id.len()) && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f6a8c2e-3b1d-4e5f-9a7b-1c2d3e4f5a6b";
    const UID_: &str = "0f6a8c2e_3b1d_4e5f_9a7b_1c2d3e4f5a6b";
    const CID: &str = "5e1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
    /// A static pod's UID: the config hash from the kubelet path in kubernetes#106514.
    const HASH: &str = "36b6d6be73b1065af369b3985edafa09";
    /// The container id from the same path.
    const CID_106514: &str = "79fedb3bd23ca77c9d9ccb41909038316f713df22b54b7d942b71d3812e7c74e";

    fn static_pod(
        qos: QosClass,
        container: Option<(&str, Runtime)>,
    ) -> Result<PodCgroup, ParseError> {
        Ok(PodCgroup {
            pod_uid: HASH.to_owned(),
            static_pod: true,
            qos,
            container_id: container.map(|(c, _)| c.to_owned()),
            runtime: container.map(|(_, r)| r),
        })
    }

    fn pod(qos: QosClass, container: Option<(&str, Runtime)>) -> Result<PodCgroup, ParseError> {
        Ok(PodCgroup {
            pod_uid: UID.to_owned(),
            static_pod: false,
            qos,
            container_id: container.map(|(c, _)| c.to_owned()),
            runtime: container.map(|(_, r)| r),
        })
    }

    #[test]
    fn a_subject_is_the_pod_and_its_container_and_splits_back() {
        let uid = "0f6a8c2e-3b1d-4e5f-9a7b-1c2d3e4f5a6b";
        let cid = "c".repeat(64);
        let mut pod = PodCgroup {
            pod_uid: uid.into(),
            static_pod: false,
            qos: QosClass::Burstable,
            container_id: Some(cid.clone()),
            runtime: Some(Runtime::Containerd),
        };
        assert_eq!(pod.subject(), format!("{uid}/{cid}"));
        assert_eq!(split_subject(&pod.subject()), (uid, Some(cid.as_str())));
        pod.container_id = None;
        assert_eq!(pod.subject(), uid);
        assert_eq!(split_subject(uid), (uid, None));
    }

    #[test]
    fn real_world_paths() {
        use QosClass::*;
        use Runtime::*;
        let cases: Vec<(String, Result<PodCgroup, ParseError>)> = vec![
            // systemd driver, containerd, each QoS class.
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
                ),
                pod(Burstable, Some((CID, Containerd))),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
                ),
                pod(BestEffort, Some((CID, Containerd))),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"),
                pod(Guaranteed, Some((CID, Containerd))),
            ),
            // systemd driver, CRI-O (and its conmon, which is no container), Docker.
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope"
                ),
                pod(Burstable, Some((CID, CriO))),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope/container"
                ),
                pod(Burstable, Some((CID, CriO))),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope"
                ),
                Ok(PodCgroup {
                    pod_uid: UID.into(),
                    static_pod: false,
                    qos: Burstable,
                    container_id: None,
                    runtime: Some(CriO),
                }),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{CID}.scope"
                ),
                pod(BestEffort, Some((CID, Docker))),
            ),
            // The pod's own cgroup (e.g. the sandbox's processes), no container.
            (
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
                ),
                pod(Burstable, None),
            ),
            // kind / nested slices, and a prefix above the kubepods root.
            (
                format!(
                    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
                ),
                pod(BestEffort, Some((CID, Containerd))),
            ),
            (
                format!(
                    "/kiam-e2e-1/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"
                ),
                pod(Guaranteed, Some((CID, Containerd))),
            ),
            // cgroupfs driver: containerd/Docker (bare id) and CRI-O.
            (
                format!("/kubepods/burstable/pod{UID}/{CID}"),
                pod(Burstable, Some((CID, Unknown))),
            ),
            (
                format!("/kubepods/besteffort/pod{UID}/{CID}"),
                pod(BestEffort, Some((CID, Unknown))),
            ),
            (
                format!("/kubepods/pod{UID}/{CID}"),
                pod(Guaranteed, Some((CID, Unknown))),
            ),
            (
                format!("/kubepods/pod{UID}/crio-{CID}"),
                pod(Guaranteed, Some((CID, CriO))),
            ),
            (
                format!("/kubepods/burstable/pod{UID}"),
                pod(Burstable, None),
            ),
            // Upper-case hex in a UID is normalised.
            (
                format!("/kubepods/pod{}/{CID}", UID.to_ascii_uppercase()),
                pod(Guaranteed, Some((CID, Unknown))),
            ),
            // A container cannot claim another pod by nesting cgroups below its own.
            (
                format!(
                    "/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope/kubepods.slice/kubepods-pod11111111_2222_3333_4444_555555555555.slice"
                ),
                pod(Guaranteed, Some((CID, Containerd))),
            ),
            // Static pods: the UID is the kubelet's config hash (kubernetes#106514,
            // kubernetes#94104), under either driver.
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{HASH}.slice/cri-containerd-{CID}.scope"
                ),
                static_pod(Burstable, Some((CID, Containerd))),
            ),
            (
                format!("/kubepods/burstable/pod{HASH}/{CID}"),
                static_pod(Burstable, Some((CID, Unknown))),
            ),
            (
                format!("/kubepods/pod{}/{CID}", HASH.to_ascii_uppercase()),
                static_pod(Guaranteed, Some((CID, Unknown))),
            ),
            // A cgroupfs runtime under a systemd kubelet: the kubelet's `slice:prefix:id`
            // taken literally, below containerd's own cgroup (kubernetes#106514, verbatim).
            (
                format!(
                    "/system.slice/containerd.service/kubepods-burstable-pod{HASH}.slice:cri-containerd:{CID_106514}"
                ),
                Ok(PodCgroup {
                    pod_uid: HASH.into(),
                    static_pod: true,
                    qos: Burstable,
                    container_id: Some(CID_106514.into()),
                    runtime: Some(Containerd),
                }),
            ),
            (
                format!(
                    "/system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}"
                ),
                pod(BestEffort, Some((CID, Containerd))),
            ),
            (
                format!("/system.slice/containerd.service/kubepods-pod{UID_}.slice:crio:{CID}"),
                pod(Guaranteed, Some((CID, CriO))),
            ),
            (
                format!(
                    "/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:other:{CID}"
                ),
                Err(ParseError::MalformedPod(format!(
                    "kubepods-burstable-pod{UID_}.slice:other:{CID}"
                ))),
            ),
            // Below a container's cgroup (crun's `container` sub-cgroup, exec sessions'
            // cgroups, anything a delegated container makes): still that container.
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope/container/exec-1"
                ),
                pod(BestEffort, Some((CID, CriO))),
            ),
            (
                format!("/kubepods/burstable/pod{UID}/{CID}/nested/deeper"),
                pod(Burstable, Some((CID, Unknown))),
            ),
            // Docker's systemd scope and cgroupfs directory (cri-o/cri-o#842, verbatim).
            (
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod90d81341_92de_11e7_8cf2_507b9d4141fa.slice/docker-2227daf62df6694645fee5df53c1f91271546a9560e8600a525690ae252b7f63.scope".into(),
                Ok(PodCgroup {
                    pod_uid: "90d81341-92de-11e7-8cf2-507b9d4141fa".into(),
                    static_pod: false,
                    qos: Burstable,
                    container_id: Some(
                        "2227daf62df6694645fee5df53c1f91271546a9560e8600a525690ae252b7f63".into(),
                    ),
                    runtime: Some(Docker),
                }),
            ),
            (
                "/kubepods/burstable/pod941dc160-92df-11e7-b27e-507b9d4141fa/2b4d747eae5ed34775c069d913c81833b67a0148e731a36535c9f3b97ebfb87f".into(),
                Ok(PodCgroup {
                    pod_uid: "941dc160-92df-11e7-b27e-507b9d4141fa".into(),
                    static_pod: false,
                    qos: Burstable,
                    container_id: Some(
                        "2b4d747eae5ed34775c069d913c81833b67a0148e731a36535c9f3b97ebfb87f".into(),
                    ),
                    runtime: Some(Unknown),
                }),
            ),
            // cgroupsPerQOS: false: containers without a pod cgroup (containerd's default
            // `k8s.io` parent under cgroupfs, its systemd scope otherwise).
            (
                format!("/k8s.io/{CID}"),
                Err(ParseError::NoPodCgroup),
            ),
            (
                format!("/system.slice/cri-containerd-{CID}.scope"),
                Err(ParseError::NoPodCgroup),
            ),
            // A nested copy of a kubepods name inside a mismatched pod's container is not
            // another pod: the first pod component decides.
            (
                format!(
                    "/system.slice/containerd.service/kubepods-pod{UID_}.slice:cri-containerd:{CID}/kubepods.slice/kubepods-pod11111111_2222_3333_4444_555555555555.slice"
                ),
                pod(Guaranteed, Some((CID, Containerd))),
            ),
            // Not pods.
            ("/".into(), Err(ParseError::NotUnderKubepods)),
            (
                "/system.slice/containerd.service".into(),
                Err(ParseError::NotUnderKubepods),
            ),
            (
                "/user.slice/user-0.slice/session-1.scope".into(),
                Err(ParseError::NotUnderKubepods),
            ),
            ("/kubepods.slice".into(), Err(ParseError::NotAPod)),
            (
                "/kubepods.slice/kubepods-burstable.slice".into(),
                Err(ParseError::NotAPod),
            ),
            ("/kubepods/besteffort".into(), Err(ParseError::NotAPod)),
            (
                "/notkubepods.slice/kubepods-podx.slice".into(),
                Err(ParseError::NotUnderKubepods),
            ),
            // Malformed pod components.
            (
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice".into(),
                Err(ParseError::MalformedPod(
                    "kubepods-burstable-pod1234.slice".into(),
                )),
            ),
            (
                format!("/kubepods/burstable/pod{UID}x/{CID}"),
                Err(ParseError::MalformedPod(format!("pod{UID}x"))),
            ),
            (
                format!("/kubepods/burstable/pod{}/{CID}", &UID[..35]),
                Err(ParseError::MalformedPod(format!("pod{}", &UID[..35]))),
            ),
            // A config hash one digit short, or with a non-hex digit, is no static pod.
            (
                format!("/kubepods/burstable/pod{}/{CID}", &HASH[..31]),
                Err(ParseError::MalformedPod(format!("pod{}", &HASH[..31]))),
            ),
            (
                format!("/kubepods/burstable/pod{}g/{CID}", &HASH[..31]),
                Err(ParseError::MalformedPod(format!("pod{}g", &HASH[..31]))),
            ),
            (
                // Pod slice whose prefix does not match its parent slice.
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{UID_}.slice"
                ),
                Err(ParseError::MalformedPod(format!(
                    "kubepods-besteffort-pod{UID_}.slice"
                ))),
            ),
            (
                "/kubepods/burstable/somethingelse".into(),
                Err(ParseError::NotAPod),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(parse_cgroup_path(&path), want, "path {path}");
        }
    }

    #[test]
    fn malformed_container_components_keep_the_pod_but_no_container() {
        for container in [
            "cri-containerd-XYZ.scope".to_owned(),
            "cri-containerd-.scope".to_owned(),
            format!("cri-containerd-{CID}"),
            "init.scope".to_owned(),
            format!("crio-{}.scope", &CID[..8]),
        ] {
            let path = format!("/kubepods.slice/kubepods-pod{UID_}.slice/{container}");
            assert_eq!(
                parse_cgroup_path(&path),
                pod(QosClass::Guaranteed, None),
                "{path}"
            );
        }
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/pod{UID}/not-hex")),
            pod(QosClass::Guaranteed, None)
        );
    }
}
