//! Why the CA refuses a request: each reason is a metric label, a gRPC status code and the
//! first words of the status message, so callers and tests can tell refusals apart.

use std::fmt;

use tonic::{Code, Status};

/// Why a certificate request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No bearer token.
    NoToken,
    /// The token did not authenticate (expired, forged, revoked, wrong audience, not a service
    /// account).
    TokenInvalid,
    /// The API server could not be asked.
    TokenReviewFailed,
    /// The caller asked for an identity other than its own and is not a node agent.
    NotNodeAgent,
    /// The caller's node could not be found.
    UnknownNode,
    /// No pod of the identity is bound to the caller's node.
    NoPodOnNode,
    /// Only finished pods of the identity are on the caller's node.
    PodFinished,
    /// The CSR is not a valid, self-signed PKCS#10 request for a usable key.
    BadCsr,
    /// The CSR's SANs are not exactly one SPIFFE URI.
    BadSans,
    /// The identity is not in the CA's trust domain.
    ForeignTrustDomain,
    /// The metadata names another identity than the CSR, or is malformed.
    IdentityMismatch,
    /// The validity asked for is above the cap (or negative).
    Validity,
    /// Signing failed.
    Internal,
}

impl Reason {
    /// The `result` label of `meshlet_ca_requests_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoToken => "no_token",
            Self::TokenInvalid => "token_invalid",
            Self::TokenReviewFailed => "token_review_failed",
            Self::NotNodeAgent => "not_node_agent",
            Self::UnknownNode => "unknown_node",
            Self::NoPodOnNode => "no_pod_on_node",
            Self::PodFinished => "pod_finished",
            Self::BadCsr => "bad_csr",
            Self::BadSans => "bad_sans",
            Self::ForeignTrustDomain => "foreign_trust_domain",
            Self::IdentityMismatch => "identity_mismatch",
            Self::Validity => "validity",
            Self::Internal => "internal",
        }
    }

    /// Every reason, for pre-registering metric series.
    pub const ALL: [Reason; 13] = [
        Self::NoToken,
        Self::TokenInvalid,
        Self::TokenReviewFailed,
        Self::NotNodeAgent,
        Self::UnknownNode,
        Self::NoPodOnNode,
        Self::PodFinished,
        Self::BadCsr,
        Self::BadSans,
        Self::ForeignTrustDomain,
        Self::IdentityMismatch,
        Self::Validity,
        Self::Internal,
    ];

    /// The gRPC status code.
    pub fn code(self) -> Code {
        match self {
            Self::NoToken | Self::TokenInvalid => Code::Unauthenticated,
            Self::TokenReviewFailed => Code::Unavailable,
            Self::NotNodeAgent | Self::UnknownNode | Self::NoPodOnNode | Self::PodFinished => {
                Code::PermissionDenied
            }
            Self::BadCsr
            | Self::BadSans
            | Self::ForeignTrustDomain
            | Self::IdentityMismatch
            | Self::Validity => Code::InvalidArgument,
            Self::Internal => Code::Internal,
        }
    }
}

/// A refused request: the reason and what exactly was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub reason: Reason,
    /// The specifics, for the caller and the log.
    pub detail: String,
}

impl Refusal {
    /// A refusal for `reason`.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason.label(), self.detail)
    }
}

impl From<Refusal> for Status {
    fn from(refusal: Refusal) -> Self {
        Status::new(refusal.reason.code(), refusal.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique_and_status_names_the_reason() {
        let labels: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Reason::ALL.len());
        let status = Status::from(Refusal::new(Reason::NoPodOnNode, "no pod"));
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(status.message(), "no_pod_on_node: no pod");
    }
}
