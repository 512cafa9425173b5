//! Who a cgroup belongs to: the kubelet's cgroup path → pod UID, QoS class and container.
//!
//! Pure parsing, no file system access. Both kubelet cgroup drivers are understood:
//! - systemd: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`
//! - cgroupfs: `kubepods/burstable/pod<uid>/<id>`
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
    /// Pod UID in its canonical dashed form.
    pub pod_uid: String,
    pub qos: QosClass,
    /// Container id, when the cgroup is (or is below) a container's cgroup.
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
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
    let anchor = components
        .iter()
        .position(|c| is_kubepods_root(c))
        .ok_or(ParseError::NotUnderKubepods)?;
    let root = components[anchor];
    let rest = &components[anchor + 1..];
    if root.ends_with(".slice") {
        parse_systemd(root, rest)
    } else {
        parse_cgroupfs(rest)
    }
}

fn is_kubepods_root(component: &str) -> bool {
    // `kubepods.slice`, or a nested slice such as kind's `kubelet-kubepods.slice`.
    component == "kubepods"
        || component == "kubepods.slice"
        || component.ends_with("-kubepods.slice")
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
    let pod_uid = canonical_uid(&uid.replace('_', "-")).ok_or_else(|| malformed(pod))?;
    let (container_id, runtime) = match rest.get(1) {
        Some(container) => parse_systemd_container(container),
        None => (None, None),
    };
    Ok(PodCgroup {
        pod_uid,
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
    let pod_uid = canonical_uid(uid).ok_or_else(|| malformed(pod))?;
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

/// A UID in `8-4-4-4-12` lowercase hex form, or `None`.
fn canonical_uid(uid: &str) -> Option<String> {
    let groups: Vec<&str> = uid.split('-').collect();
    let lengths = [8, 4, 4, 4, 12];
    let ok = groups.len() == lengths.len()
        && groups
            .iter()
            .zip(lengths)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| uid.to_ascii_lowercase())
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

    fn pod(qos: QosClass, container: Option<(&str, Runtime)>) -> Result<PodCgroup, ParseError> {
        Ok(PodCgroup {
            pod_uid: UID.to_owned(),
            qos,
            container_id: container.map(|(c, _)| c.to_owned()),
            runtime: container.map(|(_, r)| r),
        })
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
                format!("/kubepods/burstable/pod{}/{CID}", UID.replace('-', "")),
                Err(ParseError::MalformedPod(format!(
                    "pod{}",
                    UID.replace('-', "")
                ))),
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
