//! Who is calling: the bearer token of a request, checked by the Kubernetes API server with a
//! `TokenReview` (authentication.k8s.io/v1) for the CA's audience.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client, api::PostParams};

use super::refusal::{Reason, Refusal};

/// The token extra naming the node of the pod a token is bound to (Kubernetes 1.32+).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The token extra naming the pod a token is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The token extra carrying the UID of the pod a token is bound to.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// An authenticated caller: a Kubernetes service account, and the pod and node its token is
/// bound to when it is a projected token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
    /// The node named by the token, if any.
    pub node: Option<String>,
    /// The pod the token is bound to (name, UID), if any.
    pub pod: Option<(String, Option<String>)>,
}

impl Caller {
    /// The caller as `namespace/service-account`.
    pub fn account(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }
}

/// The bearer token of a request's `authorization` metadata.
pub fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Result<&str, Refusal> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| Refusal::new(Reason::NoToken, "the request has no authorization header"))?;
    let value = value
        .to_str()
        .map_err(|_| Refusal::new(Reason::NoToken, "the authorization header is not ASCII"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| {
            Refusal::new(
                Reason::NoToken,
                "the authorization header is not `Bearer <token>`",
            )
        })?;
    Ok(token)
}

/// Reviews `token` for `audience` with the API server.
pub async fn review(client: &Client, token: &str, audience: &str) -> Result<Caller, Refusal> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_owned(),
            audiences: Some(vec![audience.to_owned()]),
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|err| {
            Refusal::new(
                Reason::TokenReviewFailed,
                format!("the token review failed: {err}"),
            )
        })?;
    caller(reviewed.status.unwrap_or_default(), audience)
}

/// The caller a review's status names, if it authenticated a service account for `audience`.
pub fn caller(status: TokenReviewStatus, audience: &str) -> Result<Caller, Refusal> {
    let invalid = |detail: String| Refusal::new(Reason::TokenInvalid, detail);
    if status.authenticated != Some(true) {
        return Err(invalid(format!(
            "the token is not valid: {}",
            status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "not authenticated".to_owned())
        )));
    }
    // An API server that ignores the requested audiences answers without them.
    match &status.audiences {
        Some(audiences) if audiences.iter().any(|a| a == audience) => {}
        _ => {
            return Err(invalid(format!(
                "the token is not for audience {audience:?}"
            )));
        }
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some((namespace, service_account)) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    else {
        return Err(invalid(format!("{username:?} is not a service account")));
    };
    let extras = user.extra.unwrap_or_default();
    let one = |key: &str| {
        extras
            .get(key)
            .and_then(|values| values.first())
            .filter(|value| !value.is_empty())
            .cloned()
    };
    Ok(Caller {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        node: one(NODE_NAME_EXTRA),
        pod: one(POD_NAME_EXTRA).map(|name| (name, one(POD_UID_EXTRA))),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn status(username: &str, audiences: &[&str], extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            user: Some(UserInfo {
                username: Some(username.to_owned()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), vec![(*v).to_owned()]))
                        .collect(),
                ),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn a_bound_service_account_token() {
        let caller = caller(
            status(
                "system:serviceaccount:meshlet-system:meshlet",
                &["istio-ca"],
                &[
                    (NODE_NAME_EXTRA, "node-1"),
                    (POD_NAME_EXTRA, "meshlet-abc"),
                    (POD_UID_EXTRA, "uid-1"),
                ],
            ),
            "istio-ca",
        )
        .unwrap();
        assert_eq!(caller.account(), "meshlet-system/meshlet");
        assert_eq!(caller.node.as_deref(), Some("node-1"));
        assert_eq!(
            caller.pod,
            Some(("meshlet-abc".to_owned(), Some("uid-1".to_owned())))
        );
    }

    #[test]
    fn refusals() {
        let unauthenticated = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token has expired".to_owned()),
            ..Default::default()
        };
        let err = caller(unauthenticated, "istio-ca").unwrap_err();
        assert_eq!(err.reason, Reason::TokenInvalid);
        assert!(err.detail.contains("expired"), "{err}");

        let err = caller(
            status("system:serviceaccount:a:b", &["kubernetes"], &[]),
            "istio-ca",
        )
        .unwrap_err();
        assert!(err.detail.contains("audience"), "{err}");

        let err = caller(status("alice", &["istio-ca"], &[]), "istio-ca").unwrap_err();
        assert!(err.detail.contains("not a service account"), "{err}");
    }

    #[test]
    fn bearer_token_parsing() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(bearer_token(&metadata).unwrap_err().reason, Reason::NoToken);
        metadata.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&metadata).unwrap_err().reason, Reason::NoToken);
        metadata.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(bearer_token(&metadata).unwrap_err().reason, Reason::NoToken);
        metadata.insert("authorization", "Bearer abc.def".parse().unwrap());
        assert_eq!(bearer_token(&metadata).unwrap(), "abc.def");
    }
}
