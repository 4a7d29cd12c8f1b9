//! Service-account tokens and `TokenReview` (authentication.k8s.io/v1), as the real API
//! server answers it for projected tokens: the token must be one it issued, unexpired, for one
//! of the audiences asked, and bound to a pod that still exists with the same UID. The review
//! names the service account and, as Kubernetes 1.32+ does, the pod and node in `extra`.
//!
//! Tokens here are opaque random strings, not JWTs: nothing in meshlet reads a token, it only
//! passes them on for review.

use std::{collections::HashMap, time::SystemTime};

use serde_json::{Value, json};

use super::{resource::Resource, store::Store};

/// What a minted token stands for.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
    /// The audiences it is for (projected tokens name theirs; `istio-ca` for the CA).
    pub audiences: Vec<String>,
    /// The pod it is bound to: (name, UID). The review fails once that pod is gone.
    pub pod: Option<(String, String)>,
    /// The node named in the review's extra (the bound pod's node).
    pub node: Option<String>,
    /// When it expires.
    pub expires: SystemTime,
}

/// The tokens minted so far.
#[derive(Debug, Default)]
pub(crate) struct Tokens {
    issued: HashMap<String, TokenSpec>,
    reviews: u64,
}

impl Tokens {
    pub(crate) fn mint(&mut self, spec: TokenSpec) -> String {
        let token = format!("stand-in.{}.{:032x}", self.issued.len(), random());
        self.issued.insert(token.clone(), spec);
        token
    }

    pub(crate) fn reviews(&self) -> u64 {
        self.reviews
    }

    /// Answers a TokenReview request body.
    pub(crate) fn review(&mut self, store: &Store, request: &Value) -> Value {
        self.reviews += 1;
        let spec = &request["spec"];
        let token = spec["token"].as_str().unwrap_or_default();
        let wanted: Vec<String> = match spec["audiences"].as_array() {
            Some(list) if !list.is_empty() => list
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect(),
            _ => vec!["https://kubernetes.default.svc.cluster.local".to_owned()],
        };
        let status = match self.check(store, token, &wanted) {
            Ok((spec, audiences)) => {
                let mut extra = serde_json::Map::new();
                if let Some((name, uid)) = &spec.pod {
                    extra.insert(
                        "authentication.kubernetes.io/pod-name".into(),
                        json!([name]),
                    );
                    extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
                }
                if let Some(node) = &spec.node {
                    extra.insert(
                        "authentication.kubernetes.io/node-name".into(),
                        json!([node]),
                    );
                }
                json!({
                    "authenticated": true,
                    "audiences": audiences,
                    "user": {
                        "username": format!("system:serviceaccount:{}:{}", spec.namespace, spec.service_account),
                        "groups": [
                            "system:serviceaccounts",
                            format!("system:serviceaccounts:{}", spec.namespace),
                            "system:authenticated",
                        ],
                        "extra": extra,
                    },
                })
            }
            Err(error) => json!({"authenticated": false, "error": error, "user": {}}),
        };
        json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "metadata": {},
            "spec": spec,
            "status": status,
        })
    }

    fn check(
        &self,
        store: &Store,
        token: &str,
        wanted: &[String],
    ) -> Result<(&TokenSpec, Vec<String>), String> {
        let spec = self
            .issued
            .get(token)
            .ok_or("[invalid bearer token, square/go-jose: error in cryptographic primitive]")?;
        if SystemTime::now() >= spec.expires {
            return Err("[invalid bearer token, service account token has expired]".to_owned());
        }
        let audiences: Vec<String> = wanted
            .iter()
            .filter(|a| spec.audiences.contains(a))
            .cloned()
            .collect();
        if audiences.is_empty() {
            return Err(format!(
                "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                spec.audiences, wanted
            ));
        }
        if let Some((name, uid)) = &spec.pod {
            let pods = Resource::by_kind("Pod").expect("pods are served");
            let live = store.get(pods, &spec.namespace, name);
            if live.and_then(|pod| pod["metadata"]["uid"].as_str()) != Some(uid.as_str()) {
                return Err(format!(
                    "[invalid bearer token, pod {name:?} (UID {uid}) is no longer bound to the token]"
                ));
            }
        }
        Ok((spec, audiences))
    }
}

/// 128 random bits from the OS.
fn random() -> u128 {
    let mut bytes = [0u8; 16];
    if let Ok(mut urandom) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut urandom, &mut bytes);
    }
    u128::from_le_bytes(bytes)
}
