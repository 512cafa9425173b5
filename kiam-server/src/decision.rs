//! The authorisation decision: what a pod may have, for an agent that proved its node.
//!
//! Pure over plain data (the index's projection of the pod and its namespace's rules): no
//! gRPC, no Events, no I/O, so every edge case is decided, and tested, here. The gRPC
//! service, the Events and the prefetch are thin callers.
//!
//! Order of the checks, each explained where it is decided:
//! 1. the pod must be known and scheduled on the agent's node (an agent only ever gets the
//!    pods of its own node);
//! 2. completed pods get nothing; static pods (known by their config hash through their
//!    mirror pods) get the node's metadata if the operator's pass-through rules select them,
//!    and nothing otherwise, never a role;
//! 3. the operator's pass-through rules: the node's own metadata service;
//! 4. the role annotation, resolved against the base ARN, or the operator's `--default-role`
//!    for a pod without one;
//! 5. the namespace's rule (a default role the namespace does not permit is no role at all);
//! 6. the credential cache key (role and every session parameter).

use std::sync::Arc;

pub use crate::refusal::Refusal;
use crate::{
    containers::{ANNOTATION_CONTAINER_ROLES, ContainerKind, ContainerRole},
    credentials::CacheKey,
    index::{Index, PodInfo},
    policy::{
        ANNOTATION_EXTERNAL_ID, ANNOTATION_SESSION_NAME, BaseArn, Denied, NamespaceRules,
        PassThroughRule, RoleArn, session_name,
    },
};

/// Settings the decision needs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub base: BaseArn,
    pub role_annotation: String,
    pub default_session_name: String,
    /// Tag sessions with the pod's namespace and service account. Credentials are then
    /// shared per role, namespace and service account, not per role.
    pub session_tags: bool,
    /// Pods that get the node's own metadata service (operator-controlled).
    pub passthrough: Vec<PassThroughRule>,
    /// The role (as an annotation would name it) of pods without a role annotation, in
    /// namespaces whose rule permits it (`--default-role`, kube2iam's migration aid).
    pub default_role: Option<String>,
}

/// Where a pod's role came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoleSource {
    /// The pod's role annotation.
    Annotation,
    /// `--default-role`, for a pod without an annotation.
    Default,
    /// The caller's container's entry in the pod's container-roles annotation.
    Container,
}

impl RoleSource {
    pub fn label(self) -> &'static str {
        match self {
            Self::Annotation => "annotation",
            Self::Default => "default",
            Self::Container => "container-roles",
        }
    }

    /// Whose role it is: the pod's (every container not listed) or one container's.
    pub fn scope(self) -> &'static str {
        match self {
            Self::Annotation | Self::Default => "pod",
            Self::Container => "container",
        }
    }
}

/// What a pod may have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Credentials for this role, shared by every pod with the same cache key.
    Role {
        role: RoleArn,
        key: CacheKey,
        source: RoleSource,
    },
    /// The node's own metadata service, verbatim.
    PassThrough,
}

/// A decision for a pod that may have something.
#[derive(Debug, Clone)]
pub struct Decision {
    pub pod: Arc<PodInfo>,
    pub access: Access,
    /// The caller's container's name, when the pod has per-container roles and knows it.
    pub container: Option<String>,
}

impl Decision {
    /// The role and key, or the refusal for a caller that wants credentials.
    pub fn role(&self) -> Result<(&RoleArn, &CacheKey), Refusal> {
        match &self.access {
            Access::Role { role, key, .. } => Ok((role, key)),
            Access::PassThrough => Err(Refusal::PassThrough(pod_label(&self.pod))),
        }
    }
}

/// The name the instance-metadata API lists: the last path segment of the role.
pub fn listed_name(role: &RoleArn) -> &str {
    role.name.rsplit('/').next().unwrap_or(&role.name)
}

pub fn pod_label(pod: &PodInfo) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

/// What `pod` may have, given its namespace's rules (none when the namespace is unknown),
/// for a container the pod's container-roles annotation does not list (or a pod without
/// one). Everything but the node check: prefetch and refresh use this for every pod.
pub fn decide_pod(
    settings: &Settings,
    pod: &PodInfo,
    rules: Option<&NamespaceRules>,
) -> Result<Access, Refusal> {
    if let Some(access) = prelude(settings, pod)? {
        return Ok(access);
    }
    pod_role(settings, pod, rules)
}

/// What the caller in container `container_id` of `pod` may have: its entry in the pod's
/// container-roles annotation, or the pod's role when it is not listed (or the pod has no
/// such annotation).
pub fn decide_container(
    settings: &Settings,
    pod: &PodInfo,
    rules: Option<&NamespaceRules>,
    container_id: Option<&str>,
) -> Result<Access, Refusal> {
    let Some(containers) = &pod.containers else {
        return decide_pod(settings, pod, rules);
    };
    if let Some(access) = prelude(settings, pod)? {
        return Ok(access);
    }
    let roles = containers
        .roles
        .as_ref()
        .map_err(|error| Refusal::ContainerRolesInvalid {
            pod: pod_label(pod),
            error: error.clone(),
        })?;
    let Some(id) = container_id.filter(|id| !id.is_empty()) else {
        return Err(Refusal::NotInContainer(pod_label(pod)));
    };
    let Some((name, kind)) = containers.container(id) else {
        return Err(Refusal::UnknownContainer {
            pod: pod_label(pod),
            id: id.get(..12).unwrap_or(id).to_owned(),
        });
    };
    let no_role = |why: String| Refusal::ContainerNoRole {
        pod: pod_label(pod),
        container: name.to_owned(),
        why,
    };
    match roles.0.get(name) {
        Some(Some(role)) => container_role(settings, pod, rules, name, role),
        Some(None) => Err(no_role(format!(
            "listed in {ANNOTATION_CONTAINER_ROLES} with no role"
        ))),
        None if kind == ContainerKind::Ephemeral => Err(no_role(format!(
            "an ephemeral container gets nothing unless {ANNOTATION_CONTAINER_ROLES} lists it"
        ))),
        None => pod_role(settings, pod, rules),
    }
}

/// Every access some container of `pod` may have (prefetch and refresh): the pod's own role
/// and each listed container's. For a pod with per-container roles, the pod's own is left
/// out when every container is listed, and when it has none.
pub fn decide_every(
    settings: &Settings,
    pod: &PodInfo,
    rules: Option<&NamespaceRules>,
) -> Vec<Result<Access, Refusal>> {
    let Some(containers) = &pod.containers else {
        return vec![decide_pod(settings, pod, rules)];
    };
    match prelude(settings, pod) {
        Ok(Some(access)) => return vec![Ok(access)],
        Err(refusal) => return vec![Err(refusal)],
        Ok(None) => {}
    }
    let roles = match &containers.roles {
        Ok(roles) => roles,
        Err(error) => {
            return vec![Err(Refusal::ContainerRolesInvalid {
                pod: pod_label(pod),
                error: error.clone(),
            })];
        }
    };
    let mut every: Vec<Result<Access, Refusal>> = roles
        .0
        .iter()
        .filter_map(|(name, role)| {
            role.as_ref()
                .map(|role| container_role(settings, pod, rules, name, role))
        })
        .collect();
    // The pod's own role only where some container gets it.
    if containers.unlisted {
        match pod_role(settings, pod, rules) {
            Err(Refusal::NoRole { .. } | Refusal::DefaultRoleNotPermitted { .. }) => {}
            own => every.push(own),
        }
    }
    every
}

/// The checks before any role: completed pods get nothing; the operator's pass-through
/// rules; static pods. `Some` is the whole answer.
fn prelude(settings: &Settings, pod: &PodInfo) -> Result<Option<Access>, Refusal> {
    if pod.completed() {
        return Err(Refusal::Completed(pod_label(pod)));
    }
    // System pods the operator selected get the node's own metadata service. Only server
    // flags select them; a pod's annotations or labels play no part.
    let service_account = pod.service_account.as_deref().unwrap_or("default");
    let passed_through = settings
        .passthrough
        .iter()
        .any(|r| r.selects(&pod.namespace, service_account, pod.host_network));
    if passed_through {
        // Static pods too (kube-proxy, etcd, a self-managed control plane): selected like
        // any pod, by namespace, service account and host network.
        return Ok(Some(Access::PassThrough));
    }
    // The kubelet creates a mirror pod for each static pod, in any namespace and with any
    // annotation the node's manifest says: trusting it would let a node pick roles.
    if pod.mirror.is_some() {
        return Err(Refusal::Mirror(pod_label(pod)));
    }
    Ok(None)
}

/// The pod's own role: its role annotation, or `--default-role`.
fn pod_role(
    settings: &Settings,
    pod: &PodInfo,
    rules: Option<&NamespaceRules>,
) -> Result<Access, Refusal> {
    let (value, source) = match (
        pod.annotations.get(&settings.role_annotation),
        &settings.default_role,
    ) {
        (Some(value), _) => (value, RoleSource::Annotation),
        (None, Some(default)) => (default, RoleSource::Default),
        (None, None) => {
            return Err(Refusal::NoRole {
                pod: pod_label(pod),
                annotation: settings.role_annotation.clone(),
            });
        }
    };
    let forbidden = |denied| match source {
        RoleSource::Default => Refusal::DefaultRoleNotPermitted {
            pod: pod_label(pod),
            annotation: settings.role_annotation.clone(),
            denied,
        },
        _ => Refusal::Forbidden {
            pod: pod_label(pod),
            denied,
        },
    };
    role_access(
        settings,
        pod,
        rules,
        Asked {
            value,
            source,
            external_id: pod.annotations.get(ANNOTATION_EXTERNAL_ID),
            session_name: pod.annotations.get(ANNOTATION_SESSION_NAME),
        },
        forbidden,
    )
}

/// A listed container's role: checked against the namespace's rule exactly like a pod's.
fn container_role(
    settings: &Settings,
    pod: &PodInfo,
    rules: Option<&NamespaceRules>,
    name: &str,
    role: &ContainerRole,
) -> Result<Access, Refusal> {
    let forbidden = |denied| Refusal::Forbidden {
        pod: format!("{} container {name}", pod_label(pod)),
        denied,
    };
    role_access(
        settings,
        pod,
        rules,
        Asked {
            value: &role.role,
            source: RoleSource::Container,
            external_id: role.external_id.as_ref(),
            session_name: role.session_name.as_ref(),
        },
        forbidden,
    )
}

/// A role as a pod or container asks for it.
struct Asked<'a> {
    value: &'a String,
    source: RoleSource,
    external_id: Option<&'a String>,
    session_name: Option<&'a String>,
}

/// `asked`, resolved against the base ARN and checked against the namespace's rule, with
/// its credential cache key.
fn role_access(
    settings: &Settings,
    pod: &PodInfo,
    rules: Option<&NamespaceRules>,
    asked: Asked<'_>,
    forbidden: impl Fn(Denied) -> Refusal,
) -> Result<Access, Refusal> {
    let value = asked.value;
    let role = settings.base.resolve(value).map_err(|e| {
        forbidden(Denied::BadRole {
            value: value.clone(),
            reason: e.to_string(),
        })
    })?;
    let rules = rules.ok_or_else(|| {
        forbidden(Denied::NoRule {
            namespace: pod.namespace.clone(),
        })
    })?;
    rules
        .check(&pod.namespace, &role, &settings.base)
        .map_err(&forbidden)?;
    let session = asked
        .session_name
        .map(|s| session_name(s))
        .unwrap_or_else(|| session_name(&settings.default_session_name));
    let service_account = pod.service_account.as_deref().unwrap_or("default");
    let tags = match settings.session_tags {
        true => vec![
            ("kiam-namespace".to_owned(), pod.namespace.clone()),
            (
                "kiam-service-account".to_owned(),
                service_account.to_owned(),
            ),
        ],
        false => Vec::new(),
    };
    let key = CacheKey {
        role_arn: role.arn.clone(),
        external_id: asked.external_id.cloned(),
        session_name: session,
        tags,
    };
    Ok(Access::Role {
        role,
        key,
        source: asked.source,
    })
}

/// Every access some container of a pod of the index may have (prefetch and refresh).
pub fn decide_every_indexed(
    index: &Index,
    settings: &Settings,
    pod: &PodInfo,
) -> Vec<Result<Access, Refusal>> {
    decide_every(settings, pod, index.namespace(&pod.namespace).as_deref())
}

/// The full decision for an agent whose node is `node` (proven, not claimed) asking about
/// the pod with this UID, for a caller in container `container_id` (as its cgroup names it).
pub fn decide(
    index: &Index,
    settings: &Settings,
    uid: &str,
    node: &str,
    container_id: Option<&str>,
) -> Result<Decision, Refusal> {
    if !index.synced() {
        return Err(Refusal::IndexNotSynced);
    }
    let pod = match index.pod(uid) {
        Some(pod) => pod,
        None => static_pod(index, uid)?,
    };
    if pod.node.as_deref() != Some(node) {
        return Err(Refusal::WrongNode {
            pod: pod_label(&pod),
            actual: pod.node.clone(),
            asked: node.to_owned(),
        });
    }
    let access = decide_container(
        settings,
        &pod,
        index.namespace(&pod.namespace).as_deref(),
        container_id,
    )?;
    let container = pod
        .containers
        .as_ref()
        .zip(container_id)
        .and_then(|(containers, id)| containers.container(id))
        .map(|(name, _)| name.to_owned());
    Ok(Decision {
        pod,
        access,
        container,
    })
}

/// The static pod an agent knows by `hash` (its cgroup's UID, the kubelet's config hash),
/// through its mirror pod. Two pods claiming one hash (a second one made by hand in the API)
/// is a conflict nobody may win.
fn static_pod(index: &Index, hash: &str) -> Result<Arc<PodInfo>, Refusal> {
    let mut found = index.static_pods(hash);
    match found.len() {
        0 => Err(Refusal::UnknownPod(hash.to_owned())),
        1 => Ok(found.remove(0)),
        count => Err(Refusal::AmbiguousStaticPod {
            hash: hash.to_owned(),
            count,
            pods: found
                .iter()
                .map(|p| pod_label(p))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use tonic::Code;

    use super::*;
    use crate::policy::ANNOTATION_ROLE;
    use crate::proto::Reason;

    /// Settings as the tests of other modules want them too: account 123456789012, the role
    /// annotation, kube-system host-network pods passed through.
    pub(crate) fn settings() -> Settings {
        Settings {
            base: BaseArn::parse("123456789012").expect("base"),
            role_annotation: ANNOTATION_ROLE.into(),
            default_session_name: "kiam".into(),
            session_tags: false,
            passthrough: vec![
                PassThroughRule::parse("namespace=kube-system,host-network=true").expect("rule"),
            ],
            default_role: None,
        }
    }

    fn pod(uid: &str, namespace: &str, annotations: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            name: uid.into(),
            namespace: namespace.into(),
            node: Some("node-1".into()),
            phase: Some("Running".into()),
            service_account: None,
            host_network: false,
            mirror: None,
            containers: None,
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn rules() -> NamespaceRules {
        NamespaceRules::parse(Some("app|team/.*"), None)
    }

    /// A pod with per-container roles `annotation` whose status reports these
    /// (name, ID, kind) containers.
    fn pod_with_containers(
        annotation: &str,
        annotations: &[(&str, &str)],
        containers: &[(&str, &str, &str)],
    ) -> PodInfo {
        let mut status = serde_json::json!({});
        for (name, id, list) in containers {
            let entries = status[*list]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .chain([
                    serde_json::json!({"name": name, "containerID": format!("containerd://{id}")}),
                ])
                .collect::<Vec<_>>();
            status[*list] = serde_json::json!(entries);
        }
        // The spec has each reported container, and each listed one (not started yet).
        let mut spec = serde_json::json!({});
        let listed: Vec<String> = serde_json::from_str::<serde_json::Value>(annotation)
            .ok()
            .and_then(|v| v.as_object().map(|o| o.keys().cloned().collect()))
            .unwrap_or_default();
        let in_spec = containers
            .iter()
            .map(|(name, _, list)| ((*name).to_owned(), *list))
            .chain(listed.into_iter().map(|name| (name, "containerStatuses")));
        for (name, list) in in_spec {
            let list = match list {
                "initContainerStatuses" => "initContainers",
                "ephemeralContainerStatuses" => "ephemeralContainers",
                _ => "containers",
            };
            let mut entries = spec[list].as_array().cloned().unwrap_or_default();
            if !entries.iter().any(|e| e["name"] == name.as_str()) {
                entries.push(serde_json::json!({"name": name}));
            }
            spec[list] = serde_json::json!(entries);
        }
        let mut p = pod("uid-c", "team", annotations);
        p.containers = Some(Box::new(crate::containers::PodContainers::new(
            annotation, &spec, &status,
        )));
        p
    }

    #[test]
    fn decisions_for_containers() {
        let s = settings();
        let rules = rules();
        let app = "containerStatuses";
        let annotated = pod_with_containers(
            r#"{"app": "team/app", "envoy": null, "bad": "other",
                "shipper": {"role": "team/logs", "externalId": "x-1", "sessionName": "ship"}}"#,
            &[(ANNOTATION_ROLE, "app"), (ANNOTATION_EXTERNAL_ID, "pod-x")],
            &[
                ("app", "aaa", app),
                ("envoy", "bbb", app),
                ("shipper", "ccc", app),
                ("plain", "ddd", app),
                ("debugger", "eee", "ephemeralContainerStatuses"),
                ("bad", "fff", app),
                ("setup", "ggg", "initContainerStatuses"),
            ],
        );
        let decide = |p: &PodInfo, id: Option<&str>| decide_container(&s, p, Some(&rules), id);
        let role_of = |p: &PodInfo, id: Option<&str>| match decide(p, id) {
            Ok(Access::Role { role, key, source }) => (listed_name(&role).to_owned(), key, source),
            other => panic!("{id:?}: a role, not {other:?}"),
        };
        let reason = |p: &PodInfo, id: Option<&str>| decide(p, id).expect_err("refused").reason();

        // Listed: its own role, external ID and session name; the pod's are not inherited.
        let (name, key, source) = role_of(&annotated, Some("aaa"));
        assert_eq!((name.as_str(), source), ("app", RoleSource::Container));
        assert_eq!(key.role_arn, "arn:aws:iam::123456789012:role/team/app");
        assert_eq!(key.external_id, None);
        assert_eq!(source.scope(), "container");
        let (name, key, _) = role_of(&annotated, Some("ccc"));
        assert_eq!(name, "logs");
        assert_eq!(key.external_id.as_deref(), Some("x-1"));
        assert_eq!(key.session_name, "ship");
        // Not listed: the pod's role, as before, init containers too.
        for id in ["ddd", "ggg"] {
            let (name, key, source) = role_of(&annotated, Some(id));
            assert_eq!((name.as_str(), source), ("app", RoleSource::Annotation));
            assert_eq!(key.external_id.as_deref(), Some("pod-x"));
            assert_eq!(source.scope(), "pod");
        }
        // Listed with no role; an ephemeral container not listed; a caller in no container.
        assert_eq!(reason(&annotated, Some("bbb")), Reason::ContainerNoRole);
        assert_eq!(reason(&annotated, Some("eee")), Reason::ContainerNoRole);
        assert_eq!(reason(&annotated, None), Reason::ContainerNoRole);
        assert_eq!(reason(&annotated, Some("")), Reason::ContainerNoRole);
        // A container's role passes the namespace's rule like a pod's, and says which.
        let refused = decide(&annotated, Some("fff")).expect_err("not permitted");
        assert_eq!(refused.reason(), Reason::RoleNotPermitted);
        assert!(
            refused.to_string().contains("team/uid-c container bad"),
            "{refused}"
        );
        // Not (yet) in the status: like an unknown pod, retried by the agent.
        let unknown = decide(&annotated, Some("zzz")).expect_err("not known");
        assert_eq!(unknown.reason(), Reason::ContainerNotKnown);
        assert_eq!(unknown.code(), Code::NotFound);

        // A container not listed in a pod without a role of its own gets nothing.
        let only_listed = pod_with_containers(
            r#"{"app": "team/app"}"#,
            &[],
            &[("app", "aaa", app), ("side", "bbb", app)],
        );
        assert_eq!(role_of(&only_listed, Some("aaa")).0, "app");
        assert_eq!(reason(&only_listed, Some("bbb")), Reason::NoRoleAnnotation);

        // A malformed annotation: nothing for any container, the pod's role no fallback.
        let malformed = pod_with_containers(
            r#"{"app": "team/app","#,
            &[(ANNOTATION_ROLE, "app")],
            &[("app", "aaa", app), ("plain", "ddd", app)],
        );
        for id in [Some("aaa"), Some("ddd"), None] {
            let refused = decide(&malformed, id).expect_err("malformed");
            assert_eq!(refused.reason(), Reason::ContainerRolesInvalid);
            assert!(
                refused.to_string().contains(ANNOTATION_CONTAINER_ROLES),
                "{refused}"
            );
        }

        // Without the annotation the container plays no part.
        let plain = pod("p", "team", &[(ANNOTATION_ROLE, "app")]);
        assert_eq!(role_of(&plain, Some("anything")).0, "app");
        assert_eq!(role_of(&plain, None).0, "app");

        // The operator's pass-through rule comes first, as for any pod.
        let mut system = pod_with_containers(r#"{"app": "team/app"}"#, &[], &[("app", "aaa", app)]);
        system.namespace = "kube-system".into();
        system.host_network = true;
        assert_eq!(decide(&system, Some("aaa")), Ok(Access::PassThrough));
    }

    #[test]
    fn every_role_a_pods_containers_may_have_is_prefetched_once() {
        let s = settings();
        let rules = rules();
        let keys = |p: &PodInfo| -> Vec<String> {
            decide_every(&s, p, Some(&rules))
                .into_iter()
                .map(|d| match d {
                    Ok(Access::Role { role, .. }) => listed_name(&role).to_owned(),
                    Ok(Access::PassThrough) => "passthrough".into(),
                    Err(refusal) => refusal.label().to_owned(),
                })
                .collect()
        };
        let app = "containerStatuses";
        // Listed roles (whether or not their containers have started); the pod's own only
        // where a container is not listed.
        let roles = r#"{"app": "team/app", "envoy": null, "bad": "other", "shipper": "team/logs"}"#;
        let annotated =
            pod_with_containers(roles, &[(ANNOTATION_ROLE, "app")], &[("app", "aaa", app)]);
        assert_eq!(keys(&annotated), ["app", "ROLE_NOT_PERMITTED", "logs"]);
        let with_plain = pod_with_containers(
            roles,
            &[(ANNOTATION_ROLE, "app")],
            &[("app", "aaa", app), ("plain", "ppp", app)],
        );
        assert_eq!(
            keys(&with_plain),
            ["app", "ROLE_NOT_PERMITTED", "logs", "app"]
        );
        // No role of its own: only the listed ones, and no refusal for the missing one.
        let only = pod_with_containers(r#"{"app": "team/app"}"#, &[], &[]);
        assert_eq!(keys(&only), ["app"]);
        let malformed = pod_with_containers("[]", &[(ANNOTATION_ROLE, "app")], &[]);
        assert_eq!(keys(&malformed), ["CONTAINER_ROLES_INVALID"]);
        let plain = pod("p", "team", &[(ANNOTATION_ROLE, "app")]);
        assert_eq!(keys(&plain), ["app"]);
    }

    #[test]
    fn decisions_for_pods() {
        let s = settings();
        let decide = |p: &PodInfo| decide_pod(&s, p, Some(&rules()));
        let reason = |p: &PodInfo| decide(p).expect_err("refused").reason();

        let Access::Role { role, key, source } =
            decide(&pod("ok", "team", &[(ANNOTATION_ROLE, "app")])).expect("permitted")
        else {
            panic!("a role")
        };
        assert_eq!(role.arn, "arn:aws:iam::123456789012:role/app");
        assert_eq!(listed_name(&role), "app");
        assert_eq!(key.session_name, "kiam");
        assert_eq!(source, RoleSource::Annotation);
        let Access::Role { role, key, .. } = decide(&pod(
            "path",
            "team",
            &[
                (ANNOTATION_ROLE, "team/db"),
                (ANNOTATION_EXTERNAL_ID, "x1"),
                (ANNOTATION_SESSION_NAME, "db job"),
            ],
        ))
        .expect("permitted") else {
            panic!("a role")
        };
        assert_eq!(listed_name(&role), "db");
        assert_eq!(key.external_id.as_deref(), Some("x1"));
        assert_eq!(key.session_name, "db-job");

        let mut done = pod("done", "team", &[(ANNOTATION_ROLE, "app")]);
        done.phase = Some("Succeeded".into());
        assert_eq!(reason(&done), Reason::PodCompleted);
        assert_eq!(reason(&pod("none", "team", &[])), Reason::NoRoleAnnotation);
        assert_eq!(
            reason(&pod("admin", "team", &[(ANNOTATION_ROLE, "admin")])),
            Reason::RoleNotPermitted
        );
        assert_eq!(
            reason(&pod("bad", "team", &[(ANNOTATION_ROLE, "no spaces")])),
            Reason::RoleInvalid
        );
        let no_rules = decide_pod(&s, &pod("x", "team", &[(ANNOTATION_ROLE, "app")]), None);
        assert_eq!(
            no_rules.expect_err("no rule").reason(),
            Reason::RoleNotPermitted
        );
        let broken = NamespaceRules::parse(Some("("), None);
        let bad_rule = decide_pod(
            &s,
            &pod("x", "team", &[(ANNOTATION_ROLE, "app")]),
            Some(&broken),
        );
        assert_eq!(
            bad_rule.expect_err("invalid").reason(),
            Reason::NamespaceRuleInvalid
        );
    }

    #[test]
    fn static_pods_are_passed_through_when_selected_and_never_get_a_role() {
        let s = settings();
        let mut mirror = pod("m", "team", &[(ANNOTATION_ROLE, "app")]);
        mirror.mirror = Some("36b6d6be73b1065af369b3985edafa09".into());
        let refusal = decide_pod(&s, &mirror, Some(&rules())).expect_err("static");
        assert_eq!(refusal.reason(), Reason::MirrorPod);
        assert_eq!(refusal.code(), Code::PermissionDenied);
        assert!(refusal.to_string().contains("static pod"), "{refusal}");
        // A kube-system host-network static pod (kube-proxy, etcd) gets the node's metadata
        // through the operator's rule, whatever role it names.
        let mut system = pod("s", "kube-system", &[(ANNOTATION_ROLE, "app")]);
        system.host_network = true;
        system.mirror = Some("0123456789abcdef0123456789abcdef".into());
        assert_eq!(decide_pod(&s, &system, None), Ok(Access::PassThrough));
        // Not selected without host networking: no role instead.
        system.host_network = false;
        assert_eq!(
            decide_pod(&s, &system, Some(&rules()))
                .expect_err("static")
                .reason(),
            Reason::MirrorPod
        );
    }

    #[test]
    fn static_pods_are_asked_about_by_their_config_hash() {
        let index = Index::new(vec![ANNOTATION_ROLE.into()]);
        let mirror = |uid: &str, namespace: &str| {
            let mut p = pod(uid, namespace, &[]);
            p.mirror = Some("36b6d6be73b1065af369b3985edafa09".into());
            p.host_network = true;
            p
        };
        index.replace_pods(vec![mirror("mirror-uid", "kube-system")]);
        index.replace_namespaces(Vec::new());
        let s = settings();
        let hash = "36b6d6be73b1065af369b3985edafa09";
        let decision = decide(&index, &s, hash, "node-1", None).expect("known by its hash");
        assert_eq!(decision.access, Access::PassThrough);
        assert_eq!(decision.pod.uid, "mirror-uid");
        // Only on its own node.
        assert_eq!(
            decide(&index, &s, hash, "node-2", None)
                .expect_err("other node")
                .reason(),
            Reason::PodOnOtherNode
        );
        // A second pod claiming the same hash makes neither the answer.
        index.replace_pods(vec![
            mirror("mirror-uid", "kube-system"),
            mirror("forged", "team"),
        ]);
        let refusal = decide(&index, &s, hash, "node-1", None).expect_err("ambiguous");
        assert_eq!(refusal.reason(), Reason::MirrorPod);
        assert!(
            refusal.to_string().contains("claimed by 2 pods"),
            "{refusal}"
        );
        // An unknown hash is an unknown pod.
        assert_eq!(
            decide(&index, &s, &hash.replace('3', "4"), "node-1", None)
                .expect_err("unknown")
                .reason(),
            Reason::PodNotKnown
        );
    }

    #[test]
    fn pass_through_is_the_operators_choice_never_the_pods() {
        let s = settings();
        let mut system = pod("aws-node", "kube-system", &[]);
        system.host_network = true;
        assert_eq!(decide_pod(&s, &system, None), Ok(Access::PassThrough));
        // The same pod without host networking, or in another namespace, is intercepted.
        let mut own_netns = system.clone();
        own_netns.host_network = false;
        assert_eq!(
            decide_pod(&s, &own_netns, None)
                .expect_err("no role")
                .reason(),
            Reason::NoRoleAnnotation
        );
        let mut elsewhere = system.clone();
        elsewhere.namespace = "team".into();
        assert!(decide_pod(&s, &elsewhere, Some(&rules())).is_err());
        // Annotations and labels a pod could set itself change nothing.
        let mut sneaky = pod(
            "sneaky",
            "team",
            &[
                ("kiam.amazonaws.com/node-metadata", "passthrough"),
                ("iam.amazonaws.com/passthrough", "true"),
            ],
        );
        sneaky.host_network = true;
        assert!(decide_pod(&s, &sneaky, Some(&rules())).is_err());
        // A pass-through pod asking for credentials gets a clear refusal.
        let decision = Decision {
            pod: Arc::new(system),
            access: Access::PassThrough,
            container: None,
        };
        assert_eq!(
            decision.role().expect_err("no role").reason(),
            Reason::NodeMetadataPassthrough
        );
        // `none`: everything is intercepted.
        let strict = Settings {
            passthrough: Vec::new(),
            ..settings()
        };
        let mut system = pod("aws-node", "kube-system", &[]);
        system.host_network = true;
        assert!(decide_pod(&strict, &system, None).is_err());
    }

    #[test]
    fn the_default_role_is_for_unannotated_pods_where_the_namespace_permits_it() {
        let s = Settings {
            default_role: Some("app".into()),
            ..settings()
        };
        let role = |p: &PodInfo, rules: Option<&NamespaceRules>| match decide_pod(&s, p, rules) {
            Ok(Access::Role { role, source, .. }) => Ok((listed_name(&role).to_owned(), source)),
            Ok(Access::PassThrough) => panic!("not a pass-through pod"),
            Err(refusal) => Err(refusal),
        };
        // Unannotated, and the namespace permits it: the default role.
        assert_eq!(
            role(&pod("plain", "team", &[]), Some(&rules())),
            Ok(("app".into(), RoleSource::Default))
        );
        // An annotation always wins.
        assert_eq!(
            role(
                &pod("own", "team", &[(ANNOTATION_ROLE, "team/db")]),
                Some(&rules())
            ),
            Ok(("db".into(), RoleSource::Annotation))
        );
        // A namespace that does not permit it, has no rule, or a broken one: no role, and
        // the message says why.
        let other = NamespaceRules::parse(Some("other"), None);
        let broken = NamespaceRules::parse(Some("("), None);
        for rules in [Some(&other), None, Some(&broken)] {
            let refusal = role(&pod("plain", "team", &[]), rules).expect_err("not permitted");
            assert_eq!(refusal.reason(), Reason::NoRoleAnnotation, "{refusal}");
            assert!(refusal.to_string().contains("--default-role"), "{refusal}");
        }
        // Pass-through and mirror pods are decided before it.
        let mut system = pod("aws-node", "kube-system", &[]);
        system.host_network = true;
        assert_eq!(decide_pod(&s, &system, None), Ok(Access::PassThrough));
        let mut mirror = pod("m", "team", &[]);
        mirror.mirror = Some("0123456789abcdef0123456789abcdef".into());
        assert_eq!(
            decide_pod(&s, &mirror, Some(&rules()))
                .expect_err("mirror")
                .reason(),
            Reason::MirrorPod
        );
        // Without the flag, nothing changes for unannotated pods.
        assert_eq!(
            decide_pod(&settings(), &pod("plain", "team", &[]), Some(&rules()))
                .expect_err("no role")
                .reason(),
            Reason::NoRoleAnnotation
        );
    }

    #[test]
    fn session_tags_are_part_of_the_key() {
        let tagged = Settings {
            session_tags: true,
            ..settings()
        };
        let Ok(Access::Role { key, .. }) = decide_pod(
            &tagged,
            &pod("ok", "team", &[(ANNOTATION_ROLE, "app")]),
            Some(&rules()),
        ) else {
            panic!("a role")
        };
        assert_eq!(
            key.tags,
            vec![
                ("kiam-namespace".to_owned(), "team".to_owned()),
                ("kiam-service-account".to_owned(), "default".to_owned())
            ]
        );
    }
}
