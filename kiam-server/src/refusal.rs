//! Why a request gets nothing: the server's refusal taxonomy. Each [`Refusal`] carries a
//! typed [`Reason`] for the agent (which decides from it what to keep and what to retry),
//! a gRPC code, a message for the operator, and the label it is counted under. The decision,
//! the agents' identity checks, the session budget and the Events all speak it.

use tonic::Code;

use crate::{
    containers::{ANNOTATION_CONTAINER_ROLES, RolesError},
    credentials::StsError,
    policy::Denied,
    proto::{Reason, Refusal as ProtoRefusal},
};

/// Why a request gets nothing. Each refusal carries a typed [`Reason`] for the agent and a
/// message for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("the Kubernetes index has not synced yet")]
    IndexNotSynced,
    #[error("pod {0} is not known to this server (deleted, or not yet seen)")]
    UnknownPod(String),
    #[error("pod {pod} runs on node {actual:?}, not on {asked}")]
    WrongNode {
        pod: String,
        actual: Option<String>,
        asked: String,
    },
    #[error("pod {0} has completed")]
    Completed(String),
    #[error(
        "pod {0} is a static pod (the API holds its mirror pod): its node chose its annotations, so it never gets a role, and no --node-metadata-passthrough rule selects it"
    )]
    Mirror(String),
    #[error(
        "static pod {hash} is claimed by {count} pods in the API ({pods}); refusing all of them"
    )]
    AmbiguousStaticPod {
        hash: String,
        count: usize,
        pods: String,
    },
    #[error("pod {pod} has no {annotation} annotation")]
    NoRole { pod: String, annotation: String },
    #[error(
        "pod {pod} has no {annotation} annotation, and the default role (--default-role) is not for it: {denied}"
    )]
    DefaultRoleNotPermitted {
        pod: String,
        annotation: String,
        denied: Denied,
    },
    #[error("pod {pod}: {denied}")]
    Forbidden { pod: String, denied: Denied },
    #[error("pod {pod} asked for role {asked}, but its role is {actual}")]
    OtherRole {
        pod: String,
        asked: String,
        actual: String,
    },
    #[error(
        "pod {0} gets the node's own metadata service (--node-metadata-passthrough), not a role"
    )]
    PassThrough(String),
    #[error(
        "this agent proved no node identity (no service-account token, no spiffe://kiam/node/<name> certificate)"
    )]
    AgentIdentityMissing,
    #[error("this agent runs on node {proven}, not on {asked}")]
    AgentNodeMismatch { proven: String, asked: String },
    #[error("the agent's service-account token was refused by the API server: {0}")]
    AgentTokenInvalid(String),
    #[error(
        "the agent's service-account token has expired ({0}); the agent must re-read its token file"
    )]
    AgentTokenExpired(String),
    #[error("the agent's token is for audiences {got:?}, not {want:?} (--agent-token-audience)")]
    AgentTokenWrongAudience { want: String, got: Vec<String> },
    #[error("the agent's token belongs to {got}, not {want} (--agent-service-account)")]
    AgentTokenWrongServiceAccount { want: String, got: String },
    #[error("the agent's token could not be reviewed (TokenReview failed: {0}); retry")]
    AgentTokenReviewUnavailable(String),
    #[error("the agent's token names no node: {0}")]
    AgentTokenNoNode(String),
    #[error("assuming {role}: {error}")]
    Sts { role: String, error: StsError },
    #[error(
        "namespace {namespace} already uses {max} distinct sessions (role, external id, session name): the limit (--max-sessions-per-namespace)"
    )]
    TooManySessions { namespace: String, max: usize },
    #[error(
        "pod {pod} has per-container roles, and its status does not list container {id} yet (the kubelet reports it shortly after starting it)"
    )]
    UnknownContainer { pod: String, id: String },
    #[error("pod {pod}, container {container}: {why}")]
    ContainerNoRole {
        pod: String,
        container: String,
        why: String,
    },
    #[error(
        "pod {0} has per-container roles, and the caller is in no container of it (the pod's own cgroup): only containers can be told apart"
    )]
    NotInContainer(String),
    #[error(
        "pod {pod}: the {ANNOTATION_CONTAINER_ROLES} annotation is malformed ({error}), so none of its containers gets anything"
    )]
    ContainerRolesInvalid { pod: String, error: RolesError },
}

impl Refusal {
    pub fn reason(&self) -> Reason {
        match self {
            Self::BadRequest(_) => Reason::BadRequest,
            Self::IndexNotSynced => Reason::IndexNotSynced,
            Self::UnknownPod(_) => Reason::PodNotKnown,
            Self::WrongNode { .. } => Reason::PodOnOtherNode,
            Self::Completed(_) => Reason::PodCompleted,
            Self::Mirror(_) | Self::AmbiguousStaticPod { .. } => Reason::MirrorPod,
            // The pod asked for nothing: to it, a default role its namespace does not permit
            // is the same as no role.
            Self::NoRole { .. } | Self::DefaultRoleNotPermitted { .. } => Reason::NoRoleAnnotation,
            Self::Forbidden { denied, .. } => match denied {
                Denied::BadRole { .. } => Reason::RoleInvalid,
                Denied::InvalidRule { .. } => Reason::NamespaceRuleInvalid,
                Denied::NoRule { .. } | Denied::NotPermitted { .. } => Reason::RoleNotPermitted,
            },
            Self::OtherRole { .. } => Reason::OtherRole,
            Self::PassThrough(_) => Reason::NodeMetadataPassthrough,
            Self::AgentIdentityMissing => Reason::AgentIdentityMissing,
            Self::AgentNodeMismatch { .. } => Reason::AgentNodeMismatch,
            Self::AgentTokenInvalid(_) => Reason::AgentTokenInvalid,
            Self::AgentTokenExpired(_) => Reason::AgentTokenExpired,
            Self::AgentTokenWrongAudience { .. } => Reason::AgentTokenWrongAudience,
            Self::AgentTokenWrongServiceAccount { .. } => Reason::AgentTokenWrongServiceAccount,
            Self::AgentTokenReviewUnavailable(_) => Reason::AgentTokenReviewUnavailable,
            Self::AgentTokenNoNode(_) => Reason::AgentTokenNoNode,
            Self::TooManySessions { .. } => Reason::TooManySessions,
            Self::UnknownContainer { .. } => Reason::ContainerNotKnown,
            Self::ContainerNoRole { .. } | Self::NotInContainer(_) => Reason::ContainerNoRole,
            Self::ContainerRolesInvalid { .. } => Reason::ContainerRolesInvalid,
            Self::Sts { error, .. } => match error {
                StsError::Denied(_) => Reason::StsDenied,
                StsError::Invalid(_) => Reason::StsInvalid,
                StsError::Throttled(_) | StsError::Unavailable(_) | StsError::TooShort(_) => {
                    Reason::StsUnavailable
                }
            },
        }
    }

    pub fn code(&self) -> Code {
        code_of(self.reason())
    }

    /// What the pod (through the agent) and its Events may read: the refusal, with an STS
    /// failure's message left out ([`StsError::public`]).
    pub fn public(&self) -> String {
        match self {
            Self::Sts { role, error } => format!("assuming {role}: {}", error.public()),
            other => other.to_string(),
        }
    }

    /// The gRPC status an agent receives.
    pub fn to_status(&self) -> tonic::Status {
        ProtoRefusal {
            reason: self.reason().into(),
            message: self.public(),
        }
        .into_status(self.code())
    }

    /// The label counted in `kiam_server_refusals_total`.
    pub fn label(&self) -> &'static str {
        self.reason().as_str_name()
    }
}

/// The gRPC code of each reason: exhaustive, so a new reason must be given one.
pub fn code_of(reason: Reason) -> Code {
    match reason {
        Reason::BadRequest | Reason::RoleInvalid | Reason::ContainerRolesInvalid => {
            Code::InvalidArgument
        }
        Reason::IndexNotSynced | Reason::StsUnavailable | Reason::AgentTokenReviewUnavailable => {
            Code::Unavailable
        }
        Reason::PodNotKnown
        | Reason::PodCompleted
        | Reason::NoRoleAnnotation
        | Reason::OtherRole
        | Reason::ContainerNotKnown
        | Reason::ContainerNoRole => Code::NotFound,
        Reason::NodeMetadataPassthrough | Reason::StsInvalid => Code::FailedPrecondition,
        Reason::TooManySessions => Code::ResourceExhausted,
        Reason::AgentIdentityMissing
        | Reason::AgentTokenInvalid
        | Reason::AgentTokenExpired
        | Reason::AgentTokenWrongAudience => Code::Unauthenticated,
        Reason::Unspecified
        | Reason::PodOnOtherNode
        | Reason::MirrorPod
        | Reason::RoleNotPermitted
        | Reason::NamespaceRuleInvalid
        | Reason::AgentNodeMismatch
        | Reason::AgentTokenWrongServiceAccount
        | Reason::AgentTokenNoNode
        | Reason::StsDenied => Code::PermissionDenied,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason the proto defines, in order (a new one extends the list, which the
    /// table below must then cover).
    fn every_reason() -> Vec<Reason> {
        (0..).map_while(|n| Reason::try_from(n).ok()).collect()
    }

    #[test]
    fn every_reason_has_its_code() {
        use Code::*;
        let table = [
            (Reason::Unspecified, PermissionDenied),
            (Reason::BadRequest, InvalidArgument),
            (Reason::IndexNotSynced, Unavailable),
            (Reason::PodNotKnown, NotFound),
            (Reason::PodOnOtherNode, PermissionDenied),
            (Reason::PodCompleted, NotFound),
            (Reason::MirrorPod, PermissionDenied),
            (Reason::NoRoleAnnotation, NotFound),
            (Reason::RoleInvalid, InvalidArgument),
            (Reason::RoleNotPermitted, PermissionDenied),
            (Reason::NamespaceRuleInvalid, PermissionDenied),
            (Reason::OtherRole, NotFound),
            (Reason::NodeMetadataPassthrough, FailedPrecondition),
            (Reason::AgentIdentityMissing, Unauthenticated),
            (Reason::AgentNodeMismatch, PermissionDenied),
            (Reason::AgentTokenInvalid, Unauthenticated),
            (Reason::AgentTokenWrongAudience, Unauthenticated),
            (Reason::AgentTokenWrongServiceAccount, PermissionDenied),
            (Reason::AgentTokenReviewUnavailable, Unavailable),
            (Reason::AgentTokenNoNode, PermissionDenied),
            (Reason::StsDenied, PermissionDenied),
            (Reason::StsUnavailable, Unavailable),
            (Reason::StsInvalid, FailedPrecondition),
            (Reason::TooManySessions, ResourceExhausted),
            (Reason::AgentTokenExpired, Unauthenticated),
            (Reason::ContainerNotKnown, NotFound),
            (Reason::ContainerNoRole, NotFound),
            (Reason::ContainerRolesInvalid, InvalidArgument),
        ];
        assert_eq!(
            table.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            every_reason(),
            "one row per reason, in the proto's order"
        );
        for (reason, code) in table {
            assert_eq!(code_of(reason), code, "{reason:?}");
        }
    }

    #[test]
    fn a_refusal_becomes_a_status_with_its_reason_code_and_public_message() {
        let refusals = [
            Refusal::UnknownPod("u".into()),
            Refusal::AgentNodeMismatch {
                proven: "a".into(),
                asked: "b".into(),
            },
            Refusal::UnknownContainer {
                pod: "team/p".into(),
                id: "abc".into(),
            },
            Refusal::ContainerRolesInvalid {
                pod: "team/p".into(),
                error: RolesError::SharedProcessNamespace,
            },
            // STS's message may name accounts and policies: only its code is public.
            Refusal::Sts {
                role: "arn:aws:iam::1:role/r".into(),
                error: StsError::Denied(crate::credentials::Failure {
                    code: Some("AccessDenied".into()),
                    message: "secret detail from STS".into(),
                }),
            },
        ];
        for refusal in refusals {
            let status = refusal.to_status();
            assert_eq!(status.code(), code_of(refusal.reason()), "{refusal}");
            assert_eq!(crate::proto::reason_of(&status), refusal.reason());
            assert_eq!(status.message(), refusal.public());
            assert_eq!(refusal.label(), refusal.reason().as_str_name());
            assert!(!status.message().contains("secret detail"), "{status:?}");
        }
    }
}
