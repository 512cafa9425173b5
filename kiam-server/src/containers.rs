//! Per-container roles: the `iam.amazonaws.com/container-roles` annotation, and which
//! container of a pod a container ID (what an agent reads from the caller's cgroup) is.
//!
//! The annotation is one JSON object from container name to what that container gets:
//!
//! ```json
//! {"app": "s3-writer",
//!  "envoy": null,
//!  "shipper": {"role": "log-shipper", "externalId": "x-1", "sessionName": "shipper"}}
//! ```
//!
//! - a role (as `iam.amazonaws.com/role` names one), or an object with `role` and optionally
//!   `externalId` and `sessionName`, which replace the pod's for that container;
//! - `null`: the container gets nothing;
//! - a container not listed gets the pod's role as before; an ephemeral (debug) container
//!   not listed gets nothing.
//!
//! One annotation holding a map, rather than one annotation per container, because an
//! annotation key's name part is at most 63 characters and a container name may be 63 on its
//! own, so no per-container key fits every name; and because the whole assignment is then
//! read, validated and changed at once. A malformed annotation governs every container of
//! the pod: they all get nothing, and the pod's role is no fallback.
//!
//! Only pods carrying the annotation keep their container IDs in the index, so the feature
//! costs the other pods nothing.

use std::collections::BTreeMap;

use serde_json::Value;

pub const ANNOTATION_CONTAINER_ROLES: &str = "iam.amazonaws.com/container-roles";

/// What one listed container gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRole {
    /// The role, as the role annotation would name it.
    pub role: String,
    pub external_id: Option<String>,
    pub session_name: Option<String>,
}

/// The parsed annotation: container name → its role, or `None` for nothing.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ContainerRoles(pub BTreeMap<String, Option<ContainerRole>>);

/// Why an annotation is malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RolesError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error(
        "must be a JSON object from container name to a role, {{\"role\": …}} or null, not {0}"
    )]
    NotAnObject(&'static str),
    #[error("{0:?} is not a container name (a DNS label: 1-63 of a-z, 0-9 and -)")]
    BadName(String),
    #[error("container {name}: {why}")]
    BadEntry { name: String, why: String },
    #[error(
        "names {0:?} twice in one object: JSON parsers keep one or the other, so which role was meant is unclear"
    )]
    Repeated(String),
    #[error(
        "the pod shares one process namespace between its containers (shareProcessNamespace: true), so each can reach the others' processes, and their cgroups: per-container roles cannot hold there"
    )]
    SharedProcessNamespace,
    #[error(
        "the pod runs in the host's process namespace (hostPID: true), where each container can reach the others' processes: per-container roles cannot hold there"
    )]
    HostPid,
    #[error(
        "lists {0:?}, which is no container of the pod (containers, initContainers, ephemeralContainers): a misspelt name would leave that container the pod's role"
    )]
    NotInSpec(String),
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A container name as Kubernetes allows it (RFC 1123 label).
fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The first key an object of a JSON document repeats, at any depth. serde_json's `Value`
/// keeps the last of them; the annotation's author may have meant the first.
struct Repeated(Option<String>);

impl<'de> serde::Deserialize<'de> for Repeated {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RepeatedVisitor)
    }
}

struct RepeatedVisitor;

impl<'de> serde::de::Visitor<'de> for RepeatedVisitor {
    type Value = Repeated;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Repeated, E> {
        Ok(Repeated(None))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Repeated, E> {
        Ok(Repeated(None))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Repeated, E> {
        Ok(Repeated(None))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Repeated, E> {
        Ok(Repeated(None))
    }
    fn visit_str<E>(self, _: &str) -> Result<Repeated, E> {
        Ok(Repeated(None))
    }
    fn visit_unit<E>(self) -> Result<Repeated, E> {
        Ok(Repeated(None))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Repeated, A::Error> {
        let mut first = None;
        while let Some(Repeated(inner)) = seq.next_element()? {
            first = first.or(inner);
        }
        Ok(Repeated(first))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Repeated, A::Error> {
        let mut seen = std::collections::HashSet::new();
        let mut first = None;
        while let Some(key) = map.next_key::<String>()? {
            let Repeated(inner) = map.next_value()?;
            if !seen.insert(key.clone()) {
                first = first.or(Some(key));
            }
            first = first.or(inner);
        }
        Ok(Repeated(first))
    }
}

impl ContainerRoles {
    pub fn parse(raw: &str) -> Result<Self, RolesError> {
        let Repeated(repeated) =
            serde_json::from_str(raw).map_err(|e| RolesError::NotJson(e.to_string()))?;
        if let Some(key) = repeated {
            return Err(RolesError::Repeated(key));
        }
        let value: Value =
            serde_json::from_str(raw).map_err(|e| RolesError::NotJson(e.to_string()))?;
        let Value::Object(entries) = value else {
            return Err(RolesError::NotAnObject(kind_of(&value)));
        };
        let mut roles = BTreeMap::new();
        for (name, entry) in entries {
            if !valid_name(&name) {
                return Err(RolesError::BadName(name));
            }
            let bad = |why: String| RolesError::BadEntry {
                name: name.clone(),
                why,
            };
            let role = match entry {
                Value::Null => None,
                Value::String(role) => Some(ContainerRole {
                    role: non_empty(role).map_err(bad)?,
                    external_id: None,
                    session_name: None,
                }),
                Value::Object(fields) => {
                    let mut role = None;
                    let (mut external_id, mut session_name) = (None, None);
                    for (field, value) in fields {
                        let Value::String(text) = value else {
                            return Err(bad(format!("{field} must be a string")));
                        };
                        let slot = match field.as_str() {
                            "role" => &mut role,
                            "externalId" => &mut external_id,
                            "sessionName" => &mut session_name,
                            other => {
                                return Err(bad(format!(
                                    "unknown field {other:?} (role, externalId, sessionName)"
                                )));
                            }
                        };
                        *slot =
                            Some(non_empty(text).map_err(|why| bad(format!("{field}: {why}")))?);
                    }
                    Some(ContainerRole {
                        role: role.ok_or_else(|| bad("has no role".into()))?,
                        external_id,
                        session_name,
                    })
                }
                other => {
                    return Err(bad(format!(
                        "must be a role, {{\"role\": …}} or null, not {}",
                        kind_of(&other)
                    )));
                }
            };
            roles.insert(name, role);
        }
        Ok(Self(roles))
    }
}

fn non_empty(text: String) -> Result<String, String> {
    match text.trim().is_empty() {
        true => Err("is empty".into()),
        false => Ok(text),
    }
}

/// Which list of the pod spec a container is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerKind {
    Init,
    App,
    Ephemeral,
}

/// What the index keeps of a pod with per-container roles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodContainers {
    pub roles: Result<ContainerRoles, RolesError>,
    /// (container ID without its scheme, name, kind), from the pod's status: every
    /// container the kubelet has reported, the last ID of each (a restarted container's
    /// previous ID is gone from the status, and with it from here).
    pub ids: Vec<(String, String, ContainerKind)>,
    /// Whether some container or init container of the spec is not listed, and so gets the
    /// pod's role (which is then worth prefetching).
    pub unlisted: bool,
}

impl PodContainers {
    /// From the annotation's value and the pod object's `spec` and `status`.
    pub fn new(annotation: &str, spec: &Value, status: &Value) -> Self {
        let mut ids = Vec::new();
        for (list, kind) in [
            ("initContainerStatuses", ContainerKind::Init),
            ("containerStatuses", ContainerKind::App),
            ("ephemeralContainerStatuses", ContainerKind::Ephemeral),
        ] {
            for status in status[list].as_array().into_iter().flatten() {
                let (Some(name), Some(id)) =
                    (status["name"].as_str(), status["containerID"].as_str())
                else {
                    continue;
                };
                // `containerd://<id>`, `cri-o://<id>`, `docker://<id>`.
                let id = id.split_once("://").map_or(id, |(_, id)| id);
                if !id.is_empty() {
                    ids.push((id.to_owned(), name.to_owned(), kind));
                }
            }
        }
        let names = |list: &str| -> Vec<String> {
            spec[list]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect()
        };
        let (app, init, ephemeral) = (
            names("containers"),
            names("initContainers"),
            names("ephemeralContainers"),
        );
        let roles = if spec["shareProcessNamespace"].as_bool() == Some(true) {
            Err(RolesError::SharedProcessNamespace)
        } else if spec["hostPID"].as_bool() == Some(true) {
            Err(RolesError::HostPid)
        } else {
            ContainerRoles::parse(annotation).and_then(|roles| {
                match roles.0.keys().find(|name| {
                    ![&app, &init, &ephemeral]
                        .iter()
                        .any(|list| list.contains(name))
                }) {
                    Some(unknown) => Err(RolesError::NotInSpec(unknown.clone())),
                    None => Ok(roles),
                }
            })
        };
        let unlisted = match &roles {
            Ok(roles) => app.iter().chain(&init).any(|n| !roles.0.contains_key(n)),
            Err(_) => false,
        };
        Self {
            roles,
            ids,
            unlisted,
        }
    }

    /// The container whose ID is `id`: its name and kind.
    pub fn container(&self, id: &str) -> Option<(&str, ContainerKind)> {
        self.ids
            .iter()
            .find(|(known, _, _)| known == id)
            .map(|(_, name, kind)| (name.as_str(), *kind))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn role(role: &str, external_id: Option<&str>, session_name: Option<&str>) -> ContainerRole {
        ContainerRole {
            role: role.into(),
            external_id: external_id.map(str::to_owned),
            session_name: session_name.map(str::to_owned),
        }
    }

    #[test]
    fn annotations_parse_or_say_what_is_wrong() {
        let ok = ContainerRoles::parse(
            r#"{"app": "s3-writer", "envoy": null,
                "shipper": {"role": "team/logs", "externalId": "x-1", "sessionName": "ship"},
                "c": {"role": "arn:aws:iam::123456789012:role/r"}}"#,
        )
        .expect("valid");
        assert_eq!(ok.0["app"], Some(role("s3-writer", None, None)));
        assert_eq!(ok.0["envoy"], None);
        assert_eq!(
            ok.0["shipper"],
            Some(role("team/logs", Some("x-1"), Some("ship")))
        );
        assert_eq!(
            ok.0["c"],
            Some(role("arn:aws:iam::123456789012:role/r", None, None))
        );
        assert_eq!(ContainerRoles::parse("{}"), Ok(ContainerRoles::default()));
        let long = "a".repeat(63);
        assert!(ContainerRoles::parse(&format!(r#"{{"{long}": "r"}}"#)).is_ok());

        for (raw, error) in [
            ("app=s3-writer", "not JSON"),
            ("", "not JSON"),
            (r#"["app"]"#, "not an array"),
            (r#""s3-writer""#, "not a string"),
            (r#"{"App": "r"}"#, r#""App" is not a container name"#),
            (r#"{"": "r"}"#, r#""" is not a container name"#),
            (r#"{"-a": "r"}"#, "is not a container name"),
            (
                &format!(r#"{{"{}": "r"}}"#, "a".repeat(64)),
                "is not a container name",
            ),
            (r#"{"app": ""}"#, "container app: is empty"),
            (r#"{"app": "  "}"#, "container app: is empty"),
            (r#"{"app": 3}"#, "container app: must be a role"),
            (r#"{"app": ["r"]}"#, "not an array"),
            (r#"{"app": {}}"#, "container app: has no role"),
            (
                r#"{"app": {"externalId": "x"}}"#,
                "container app: has no role",
            ),
            (
                r#"{"app": {"role": "r", "external-id": "x"}}"#,
                r#"unknown field "external-id""#,
            ),
            (
                r#"{"app": {"role": "r", "sessionName": 5}}"#,
                "sessionName must be a string",
            ),
            (
                r#"{"app": {"role": "r", "externalId": ""}}"#,
                "externalId: is empty",
            ),
            (r#"{"app": "a", "app": "b"}"#, r#"names "app" twice"#),
            (
                r#"{"app": {"role": "a", "role": "b"}}"#,
                r#"names "role" twice"#,
            ),
        ] {
            let got = ContainerRoles::parse(raw).expect_err(raw).to_string();
            assert!(got.contains(error), "{raw}: {got}");
        }
    }

    #[test]
    fn container_ids_come_from_every_status_list_without_their_scheme() {
        let status = json!({
            "initContainerStatuses": [{"name": "setup", "containerID": "containerd://aaa"}],
            "containerStatuses": [
                {"name": "app", "containerID": "containerd://bbb"},
                {"name": "envoy", "containerID": "cri-o://ccc"},
                // Waiting: no ID reported yet.
                {"name": "late"},
                {"name": "empty", "containerID": ""}
            ],
            "ephemeralContainerStatuses": [{"name": "debugger", "containerID": "ddd"}]
        });
        let spec = json!({"initContainers": [{"name": "setup"}],
            "containers": [{"name": "app"}, {"name": "envoy"}, {"name": "late"}, {"name": "empty"}],
            "ephemeralContainers": [{"name": "debugger"}]});
        let pod = PodContainers::new(r#"{"app": "r"}"#, &spec, &status);
        assert_eq!(pod.container("aaa"), Some(("setup", ContainerKind::Init)));
        assert_eq!(pod.container("bbb"), Some(("app", ContainerKind::App)));
        assert_eq!(pod.container("ccc"), Some(("envoy", ContainerKind::App)));
        assert_eq!(
            pod.container("ddd"),
            Some(("debugger", ContainerKind::Ephemeral))
        );
        assert_eq!(pod.container("late"), None);
        assert_eq!(pod.container(""), None);
        assert_eq!(pod.ids.len(), 4);
        assert!(pod.roles.is_ok());
        let bad = PodContainers::new("nope", &spec, &json!({}));
        assert!(bad.roles.is_err());
        assert!(bad.ids.is_empty());
        // Containers that see each other's processes can enter each other's cgroups.
        let mut shared = spec.clone();
        shared["shareProcessNamespace"] = json!(true);
        let shared = PodContainers::new(r#"{"app": "r"}"#, &shared, &status);
        assert_eq!(shared.roles, Err(RolesError::SharedProcessNamespace));
        let mut host = spec.clone();
        host["hostPID"] = json!(true);
        let host = PodContainers::new(r#"{"app": "r"}"#, &host, &status);
        assert_eq!(host.roles, Err(RolesError::HostPid));
        // A name the spec does not have: a typo would leave that container the pod's role.
        let typo = PodContainers::new(r#"{"evnoy": null}"#, &spec, &status);
        assert_eq!(typo.roles, Err(RolesError::NotInSpec("evnoy".into())));
        // Ephemeral containers may be listed; whether every other container is listed
        // decides whether the pod's own role is used at all.
        assert!(
            PodContainers::new(r#"{"debugger": "r"}"#, &spec, &status)
                .roles
                .is_ok()
        );
        assert!(pod.unlisted);
        let all = PodContainers::new(
            r#"{"setup": null, "app": "r", "envoy": null, "late": null, "empty": null}"#,
            &spec,
            &status,
        );
        assert!(!all.unlisted);
    }
}
