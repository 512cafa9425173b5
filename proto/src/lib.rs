//! The gRPC API between kiam agents and kiam servers, generated from `kiam.proto`, the
//! typed refusals both sides share (a refusal is a gRPC status whose details hold a
//! [`Refusal`], so agents act on its [`Reason`], never on message text), and what an agent's
//! certificate says about its node ([`certificate`]).
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("kiam.v1");

pub mod certificate;

use prost::Message as _;

// Never print secrets, at any log level.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration_unix", &self.expiration_unix)
            .field("last_updated_unix", &self.last_updated_unix)
            .field("role_arn", &self.role_arn)
            .finish_non_exhaustive()
    }
}

impl Refusal {
    /// The gRPC status carrying this refusal (message and details).
    pub fn into_status(self, code: tonic::Code) -> tonic::Status {
        let message = self.message.clone();
        tonic::Status::with_details(code, message, self.encode_to_vec().into())
    }

    /// The refusal a status carries, if it carries one.
    pub fn of(status: &tonic::Status) -> Option<Self> {
        if status.details().is_empty() {
            return None;
        }
        Self::decode(status.details()).ok()
    }
}

/// The reason a status carries (`REASON_UNSPECIFIED` for errors that are not refusals, such
/// as a transport failure).
pub fn reason_of(status: &tonic::Status) -> Reason {
    Refusal::of(status)
        .and_then(|r| Reason::try_from(r.reason).ok())
        .unwrap_or(Reason::Unspecified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_round_trip_through_a_status() {
        let status = Refusal {
            reason: Reason::PodNotKnown.into(),
            message: "pod x is not known".into(),
        }
        .into_status(tonic::Code::NotFound);
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), "pod x is not known");
        assert_eq!(reason_of(&status), Reason::PodNotKnown);
        assert_eq!(
            reason_of(&tonic::Status::unavailable("no details")),
            Reason::Unspecified
        );
    }

    #[test]
    fn credentials_debug_has_no_secrets() {
        let creds = Credentials {
            access_key_id: "ASIA".into(),
            secret_access_key: "very-secret".into(),
            session_token: "token-secret".into(),
            ..Credentials::default()
        };
        let text = format!("{creds:?}");
        assert!(text.contains("ASIA"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }
}
