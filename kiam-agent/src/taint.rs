//! The opt-in start-up taint (`--remove-startup-taint`): nodes registered with the taint
//! [`STARTUP_TAINT`] get no pods until this agent is ready (programs attached, listener up,
//! a server answering); the agent then removes the taint from its own node, once.
//!
//! The agent may change only its own node: the shipped ValidatingAdmissionPolicy holds a
//! patch by the agent's service account to the node named in its token
//! (`authentication.kubernetes.io/node-name`), and to removing this taint.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

/// The taint nodes are registered with (`NoSchedule`; any effect is removed).
pub const STARTUP_TAINT: &str = "kiam.rs/agent-not-ready";

/// The JSON patch that removes [`STARTUP_TAINT`] from `taints`, if it is there. It tests the
/// taints it read first, so a concurrent change (another controller's taint) makes it fail
/// rather than be undone.
pub fn untaint(taints: &[Taint]) -> Option<json_patch::Patch> {
    if !taints.iter().any(|t| t.key == STARTUP_TAINT) {
        return None;
    }
    let kept: Vec<&Taint> = taints.iter().filter(|t| t.key != STARTUP_TAINT).collect();
    let read = serde_json::to_value(taints).ok()?;
    let mut ops = vec![serde_json::json!({"op": "test", "path": "/spec/taints", "value": read})];
    ops.push(match kept.is_empty() {
        true => serde_json::json!({"op": "remove", "path": "/spec/taints"}),
        false => serde_json::json!({"op": "replace", "path": "/spec/taints", "value": kept}),
    });
    serde_json::from_value(serde_json::Value::Array(ops)).ok()
}

#[derive(Debug, thiserror::Error)]
enum TaintError {
    #[error("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")]
    Client(#[source] kube::Error),
    #[error("reading node {node}")]
    Get {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("removing the start-up taint from node {node}")]
    Patch {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// Removes the taint from `node`: `true` when it was there.
async fn remove_once(node: &str) -> Result<bool, TaintError> {
    let client = Client::try_default().await.map_err(TaintError::Client)?;
    let nodes: Api<Node> = Api::all(client);
    let current = nodes.get(node).await.map_err(|source| TaintError::Get {
        node: node.to_owned(),
        source,
    })?;
    let taints = current.spec.and_then(|s| s.taints).unwrap_or_default();
    let Some(patch) = untaint(&taints) else {
        return Ok(false);
    };
    nodes
        .patch(node, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(|source| TaintError::Patch {
            node: node.to_owned(),
            source,
        })?;
    Ok(true)
}

/// Waits until `ready`, then removes the start-up taint from `node`, retrying (every 2 s,
/// growing to 60 s) until it is gone.
pub async fn remove_when_ready(node: String, ready: Arc<AtomicBool>) {
    while !ready.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut pause = Duration::from_secs(2);
    loop {
        match remove_once(&node).await {
            Ok(true) => {
                tracing::info!(
                    node,
                    taint = STARTUP_TAINT,
                    "ready: removed the start-up taint from this node"
                );
                return;
            }
            Ok(false) => {
                tracing::info!(
                    node,
                    taint = STARTUP_TAINT,
                    "ready; this node has no start-up taint"
                );
                return;
            }
            Err(error) => {
                let error = anyhow::Error::from(error);
                tracing::warn!(
                    node,
                    error = format!("{error:#}"),
                    "cannot remove the start-up taint yet; retrying"
                );
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        }
    }

    #[test]
    fn only_the_startup_taint_is_removed_and_only_from_what_was_read() {
        assert!(untaint(&[]).is_none());
        assert!(untaint(&[taint("node.kubernetes.io/not-ready")]).is_none());
        let patch = untaint(&[taint(STARTUP_TAINT)]).expect("a patch");
        assert_eq!(
            serde_json::to_value(&patch).expect("json"),
            serde_json::json!([
                {"op": "test", "path": "/spec/taints", "value": [{"key": STARTUP_TAINT, "effect": "NoSchedule"}]},
                {"op": "remove", "path": "/spec/taints"},
            ])
        );
        let other = taint("dedicated");
        let patch = untaint(&[other.clone(), taint(STARTUP_TAINT)]).expect("a patch");
        let mut node =
            serde_json::json!({"spec": {"taints": [other.clone(), taint(STARTUP_TAINT)]}});
        json_patch::patch(&mut node, &patch).expect("applies");
        assert_eq!(node["spec"]["taints"], serde_json::json!([other]));
        // Another controller changed the taints meanwhile: the patch no longer applies.
        let mut changed =
            serde_json::json!({"spec": {"taints": [taint("new"), taint(STARTUP_TAINT)]}});
        assert!(json_patch::patch(&mut changed, &patch).is_err());
    }
}
