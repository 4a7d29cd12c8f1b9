//! The `spec` of `security.istio.io/v1` AuthorizationPolicy and PeerAuthentication, read as
//! Istio writes it.
//!
//! Only the fields meshlet enforces are named; every other field of a level lands in its
//! `other` map, so the compiler can tell an HTTP-only or unknown field from an
//! absent one and record it. A spec whose named fields have the wrong type does not deserialize
//! at all (the error carries the path, e.g. `rules[0].from`).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, de};
use serde_json::Value;

use crate::workload::model::Labels;

/// The fields of one level of a spec that its struct does not name.
pub type Other = BTreeMap<String, Value>;

/// `selector` (Istio's `WorkloadSelector`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// `matchLabels`.
    #[serde(default)]
    pub match_labels: Option<Labels>,
    /// Anything else (Istio selectors have nothing else).
    #[serde(flatten)]
    pub other: Other,
}

/// `spec` of an AuthorizationPolicy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// `selector`: absent selects every workload of the policy's namespace.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// `action`: `ALLOW` (the default), `DENY`, `AUDIT` or `CUSTOM`.
    #[serde(default)]
    pub action: Option<String>,
    /// `rules`.
    #[serde(default)]
    pub rules: Option<Vec<Rule>>,
    /// `targetRef`, `targetRefs`, `provider` and anything unknown.
    #[serde(flatten)]
    pub other: Other,
}

/// One entry of `rules`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// `from`: any entry must match; empty matches any source.
    #[serde(default)]
    pub from: Option<Vec<RuleFrom>>,
    /// `to`: any entry must match; empty matches any operation.
    #[serde(default)]
    pub to: Option<Vec<RuleTo>>,
    /// `when`: every condition must match.
    #[serde(default)]
    pub when: Option<Vec<Condition>>,
    /// Anything unknown.
    #[serde(flatten)]
    pub other: Other,
}

/// One entry of `from`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleFrom {
    /// `source`.
    #[serde(default)]
    pub source: Option<Source>,
    /// Anything unknown.
    #[serde(flatten)]
    pub other: Other,
}

/// `source`: every non-empty field must match.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// `principals`: `<trust-domain>/ns/<namespace>/sa/<service-account>`, with wildcards.
    #[serde(default)]
    pub principals: Option<Vec<String>>,
    /// `notPrincipals`.
    #[serde(default)]
    pub not_principals: Option<Vec<String>>,
    /// `namespaces`, with wildcards.
    #[serde(default)]
    pub namespaces: Option<Vec<String>>,
    /// `notNamespaces`.
    #[serde(default)]
    pub not_namespaces: Option<Vec<String>>,
    /// `ipBlocks`: IPs or CIDRs of the peer.
    #[serde(default)]
    pub ip_blocks: Option<Vec<String>>,
    /// `notIpBlocks`.
    #[serde(default)]
    pub not_ip_blocks: Option<Vec<String>>,
    /// `requestPrincipals`, `remoteIpBlocks` (and their `not` forms) and anything unknown.
    #[serde(flatten)]
    pub other: Other,
}

/// One entry of `to`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleTo {
    /// `operation`.
    #[serde(default)]
    pub operation: Option<Operation>,
    /// Anything unknown.
    #[serde(flatten)]
    pub other: Other,
}

/// `operation`: every non-empty field must match.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// `ports`: destination ports, as decimal strings (numbers are accepted too).
    #[serde(default)]
    pub ports: Option<Vec<Scalar>>,
    /// `notPorts`.
    #[serde(default)]
    pub not_ports: Option<Vec<Scalar>>,
    /// `hosts`, `methods`, `paths` (and their `not` forms) and anything unknown.
    #[serde(flatten)]
    pub other: Other,
}

/// One entry of `when`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `key`, e.g. `source.ip`.
    pub key: String,
    /// `values`: the attribute must match one.
    #[serde(default)]
    pub values: Option<Vec<Scalar>>,
    /// `notValues`: the attribute must match none.
    #[serde(default)]
    pub not_values: Option<Vec<Scalar>>,
    /// Anything unknown.
    #[serde(flatten)]
    pub other: Other,
}

/// `spec` of a PeerAuthentication.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// `selector`: absent makes the policy namespace-wide (mesh-wide in the root namespace).
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// `mtls`.
    #[serde(default)]
    pub mtls: Option<Mtls>,
    /// `portLevelMtls`: port (a decimal string) to mode.
    #[serde(default)]
    pub port_level_mtls: Option<BTreeMap<String, Mtls>>,
    /// Anything unknown.
    #[serde(flatten)]
    pub other: Other,
}

/// `mtls` (or one value of `portLevelMtls`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mtls {
    /// `mode`: `UNSET` (the default), `DISABLE`, `PERMISSIVE` or `STRICT`.
    #[serde(default)]
    pub mode: Option<String>,
    /// Anything unknown.
    #[serde(flatten)]
    pub other: Other,
}

/// A string the spec may also write as a number (`ports: [8080]`, `values: [8080]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl de::Visitor<'_> for Visitor {
            type Value = Scalar;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an integer")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }

        deserializer.deserialize_any(Visitor)
    }
}

/// Whether a value of an `other` map says something: `null`, `[]`, `{}` and `""` are unset, as
/// in Istio's protobuf semantics.
pub fn is_set(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::String(s) => !s.is_empty(),
        Value::Bool(_) | Value::Number(_) => true,
    }
}
