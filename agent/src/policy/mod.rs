//! Policy: Istio's `security.istio.io/v1` AuthorizationPolicy and PeerAuthentication, the L4
//! subset ztunnel enforces, evaluated at the destination.
//!
//! The workload store hands over every policy object as written ([`Policy`], spec kept as
//! JSON). [`Index::build`] compiles them once per change into per-namespace lists, recording
//! what it could not honour instead of failing; [`Index::authorize`] then decides each inbound
//! connection without allocating, and [`Index::peer_authentication`] says whether a workload's
//! port takes plaintext.
//!
//! # AuthorizationPolicy
//!
//! Scope: a policy applies to the workloads of its namespace its `selector.matchLabels` selects
//! (no selector: all of them). A policy in the root namespace (`istio-system` unless configured)
//! applies mesh-wide, its selector picking workloads in every namespace.
//!
//! Order, as in Istio: if any DENY policy matches, deny; else if no ALLOW policy selects the
//! workload, allow; else if any ALLOW policy matches, allow; else deny.
//!
//! Supported: `action` ALLOW/DENY,
//! `rules[].from[].source.{principals,notPrincipals,namespaces,notNamespaces,ipBlocks,notIpBlocks}`,
//! `rules[].to[].operation.{ports,notPorts}` and `when` on `source.ip`, `source.namespace`,
//! `source.principal`, `destination.ip`, `destination.port`. Principals are written
//! `<trust-domain>/ns/<namespace>/sa/<service-account>` (a `spiffe://` prefix is tolerated);
//! principals and namespaces take `*`, `prefix*` and `*suffix`. A plaintext source has no
//! principal and no namespace: positive matches on them fail, negative ones succeed.
//!
//! Everything else fails safe and is recorded in the policy's [`PolicyReport`]
//! ([`Unsupported`]): an HTTP-only or unknown field makes an ALLOW rule match nothing and is
//! ignored in a DENY rule (which therefore denies at least as much). AUDIT and CUSTOM policies,
//! and policies attached with `targetRef(s)` (to gateways and waypoints), are not enforced at
//! all, as in ztunnel.
//!
//! # Invalid policies
//!
//! A spec with the wrong shape (e.g. `rules: "x"`), an unknown action or an unparsable value (an
//! IP block, a port, a condition with no values) is reported ([`Error`]) and fails closed:
//!
//! - an invalid ALLOW policy (`action` ALLOW or absent) still selects its workloads and matches
//!   nothing: they are denied unless another ALLOW policy matches. Whatever its author meant it
//!   to allow, it now allows nothing, so it never lets in more than intended;
//! - an invalid DENY policy, or one whose action cannot be read, denies every connection to the
//!   workloads it selects. Ignoring it would let through exactly what its author meant to stop;
//!   denying everything is the only reading that never allows more than the author intended
//!   (an invalid AUDIT or CUSTOM policy stays ignored, as a valid one is);
//! - an unreadable selector selects every workload in the policy's scope (selecting more only
//!   ever restricts more).
//!
//! An empty selector (`{}`, or `matchLabels: {}`) is no selector, for both kinds, as in Istio.
//!
//! A policy annotated `istio.io/dry-run: "true"` is evaluated ([`Index::dry_run`]), logged and
//! counted, and never enforced.
//!
//! # PeerAuthentication
//!
//! As Istio's ambient mode reads it: one policy per level, the oldest (creation time, then
//! name) of each: mesh-wide (root namespace, no selector), namespace-wide (no selector) and
//! workload-specific (a selector that selects the workload, not in the root namespace). The
//! narrowest level that sets a mode wins: the workload policy's `portLevelMtls` for the port,
//! then its own mode, then the namespace's, then the mesh's; `UNSET` inherits; the default is
//! PERMISSIVE. DISABLE is not supported in ambient mode: such a policy (or port) takes no part,
//! and neither does a selector in the root namespace. An invalid PeerAuthentication counts as
//! STRICT for what it selects (fail closed). [`Index::explain`] says, for one workload, which
//! policy decides and why each other one does not.

mod cache;
mod compile;
mod evaluate;
mod explain;
mod index;
pub mod spec;

pub use cache::Cache;
#[cfg(test)]
mod tests;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::{Serialize, Serializer};

pub use explain::{Explanation, PolicyStatus, PortMode, Standing};
pub use index::Index;

use crate::{
    identity::Identity,
    workload::model::{Labels, ObjectKey, Pod, Policy, PolicyKind},
};

/// The namespace whose policies apply mesh-wide, unless configured otherwise (as in Istio).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The workload a connection is for: what selectors look at.
#[derive(Debug, Clone, Copy)]
pub struct Workload<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// Its labels.
    pub labels: &'a Labels,
}

impl<'a> From<&'a Pod> for Workload<'a> {
    fn from(pod: &'a Pod) -> Self {
        Self {
            namespace: &pod.key.namespace,
            labels: &pod.labels,
        }
    }
}

/// An inbound connection to authorize.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The destination workload.
    pub workload: Workload<'a>,
    /// The destination address (the workload's IP and the port asked for).
    pub destination: SocketAddr,
    /// The source's identity when it came over mTLS (HBONE); `None` for plaintext.
    pub source: Option<&'a Identity>,
    /// The source IP.
    pub source_ip: IpAddr,
}

/// Why a connection was allowed or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A DENY policy matched.
    DenyMatched,
    /// No ALLOW policy selects the workload (and no DENY matched).
    NoAllowPolicy,
    /// An ALLOW policy matched.
    AllowMatched,
    /// ALLOW policies select the workload and none matched.
    NoAllowMatched,
}

impl Reason {
    /// A short description for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::DenyMatched => "a DENY policy matched",
            Reason::NoAllowPolicy => "no ALLOW policy selects the workload",
            Reason::AllowMatched => "an ALLOW policy matched",
            Reason::NoAllowMatched => "no ALLOW policy matched",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of [`Index::authorize`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Whether the connection may proceed.
    pub allowed: bool,
    /// The policy that decided, for [`Reason::DenyMatched`] and [`Reason::AllowMatched`]
    /// (shared with the index: cloning a decision does not allocate).
    #[serde(serialize_with = "serialize_key")]
    pub policy: Option<Arc<ObjectKey>>,
    /// Why.
    pub reason: Reason,
}

fn serialize_key<S: Serializer>(key: &Option<Arc<ObjectKey>>, s: S) -> Result<S::Ok, S::Error> {
    key.as_deref().serialize(s)
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.allowed { "allowed" } else { "denied" })?;
        match &self.policy {
            Some(policy) => write!(f, " by {policy}: {}", self.reason),
            None => write!(f, ": {}", self.reason),
        }
    }
}

/// `spec.action` of an AuthorizationPolicy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Allow what matches (the default).
    Allow,
    /// Deny what matches.
    Deny,
    /// Log what matches: not supported, the policy is ignored.
    Audit,
    /// Ask an external authorizer: not supported, the policy is ignored.
    Custom,
}

/// `mtls.mode` of a PeerAuthentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the next broader level.
    Unset,
    /// No mTLS: plaintext accepted (in ambient, HBONE is still accepted).
    Disable,
    /// mTLS and plaintext both accepted (the default).
    Permissive,
    /// mTLS only: plaintext refused.
    Strict,
}

impl MtlsMode {
    /// Whether a plaintext connection is accepted in this mode ([`MtlsMode::Unset`] counts as
    /// the default, PERMISSIVE).
    pub fn allows_plaintext(self) -> bool {
        self != MtlsMode::Strict
    }

    /// The name Istio gives the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A field of a policy meshlet does not enforce, and what it did instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unsupported {
    /// Where it is, relative to `spec`: e.g. `rules[0].to[0].operation.methods`.
    pub path: String,
    /// Why it is not enforced and what that means for the policy.
    pub reason: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// What [`Index::build`] made of one policy, for logs, metrics and `meshlet policies`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyReport {
    /// AuthorizationPolicy or PeerAuthentication.
    pub kind: PolicyKind,
    /// Namespace and name.
    pub key: ObjectKey,
    /// The action of an AuthorizationPolicy, if it could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// The mode (`mtls.mode`) of a PeerAuthentication, if it could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsMode>,
    /// An AuthorizationPolicy annotated `istio.io/dry-run: "true"`: evaluated, logged and
    /// counted, never enforced.
    pub dry_run: bool,
    /// How many rules an AuthorizationPolicy has, as written.
    pub rules: usize,
    /// Which workloads it applies to, in words.
    pub selects: String,
    /// What meshlet does with it: enforced, ignored, or how an invalid policy fails closed.
    pub effect: String,
    /// The fields it has that meshlet does not enforce.
    pub unsupported: Vec<Unsupported>,
    /// Why it is invalid, if it is.
    #[serde(serialize_with = "serialize_errors")]
    pub errors: Vec<Error>,
}

fn serialize_errors<S: Serializer>(errors: &[Error], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(errors.iter().map(ToString::to_string))
}

/// Why a policy is invalid. Paths are relative to the policy's `spec`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The spec does not have the shape Istio defines (a field of the wrong type).
    #[error(
        "spec.{path}: {reason}; see https://istio.io/latest/docs/reference/config/security/ for \
         the shape of the field"
    )]
    Spec {
        /// Where.
        path: String,
        /// The parser's complaint.
        reason: String,
    },
    /// `action` is none of ALLOW, DENY, AUDIT, CUSTOM.
    #[error("spec.action: unknown action {value:?}; use ALLOW or DENY")]
    UnknownAction {
        /// The action written.
        value: String,
    },
    /// A `mode` is none of STRICT, PERMISSIVE, DISABLE, UNSET.
    #[error("spec.{path}: unknown mTLS mode {value:?}; use STRICT, PERMISSIVE, DISABLE or UNSET")]
    UnknownMode {
        /// Where.
        path: String,
        /// The mode written.
        value: String,
    },
    /// A selector has fields besides `matchLabels`.
    #[error(
        "spec.{path}: Istio workload selectors only have matchLabels; meshlet selects by \
         matchLabels alone"
    )]
    Selector {
        /// Where.
        path: String,
    },
    /// An IP block is neither an IP address nor a CIDR.
    #[error(
        "spec.{path}: {value:?} is not an IP address or CIDR; write e.g. 10.1.2.3, 10.0.0.0/8 or \
         fd00::/64"
    )]
    IpBlock {
        /// Where.
        path: String,
        /// The value written.
        value: String,
    },
    /// A port is not a decimal number from 1 to 65535.
    #[error("spec.{path}: {value:?} is not a port; write a decimal number from 1 to 65535")]
    Port {
        /// Where.
        path: String,
        /// The value written.
        value: String,
    },
    /// A `when` condition has neither `values` nor `notValues`.
    #[error("spec.{path}: condition on {key} has neither values nor notValues; give at least one")]
    EmptyCondition {
        /// Where.
        path: String,
        /// The condition's key.
        key: String,
    },
}

/// Namespace of the workload [`synthetic`] policies are about.
pub const SYNTHETIC_NAMESPACE: &str = "bench";
/// Value of the `app` label of that workload.
pub const SYNTHETIC_APP: &str = "bench";
/// The source [`synthetic`] policies allow (from an IP in 10.0.0.0/8, to port 8080).
pub const SYNTHETIC_PRINCIPAL: &str = "spiffe://cluster.local/ns/bench/sa/client";

/// `n` AuthorizationPolicies for benchmarks, all in [`SYNTHETIC_NAMESPACE`].
///
/// The first `selecting` (at most `n`) select the workload labelled `app=`[`SYNTHETIC_APP`];
/// the others select other workloads. Each is an ALLOW policy of two rules using principals,
/// namespaces, ports, a `source.ip` condition and IP blocks. Only the last selecting policy (in
/// the index's name order) lets [`SYNTHETIC_PRINCIPAL`] in, from an IP in 10.0.0.0/8 to port
/// 8080: that request is allowed after every selecting policy was tried, and any other source
/// is denied after the same work, the worst case for [`Index::authorize`].
pub fn synthetic(n: usize, selecting: usize) -> Vec<Arc<Policy>> {
    let selecting = selecting.min(n);
    (0..n)
        .map(|i| {
            let app = if i < selecting {
                SYNTHETIC_APP.to_owned()
            } else {
                format!("other-{i}")
            };
            let client = if i + 1 == selecting {
                "client".to_owned()
            } else {
                format!("client-{i}")
            };
            let spec = serde_json::json!({
                "selector": {"matchLabels": {"app": app}},
                "action": "ALLOW",
                "rules": [
                    {
                        "from": [{"source": {
                            "principals": [format!("cluster.local/ns/{SYNTHETIC_NAMESPACE}/sa/{client}")],
                            "namespaces": [SYNTHETIC_NAMESPACE],
                        }}],
                        "to": [{"operation": {"ports": ["8080"]}}],
                        "when": [{"key": "source.ip", "values": ["10.0.0.0/8"]}],
                    },
                    {
                        "from": [{"source": {"ipBlocks": [format!("192.168.{}.0/24", i % 256)]}}],
                        "to": [{"operation": {"notPorts": ["15008"]}}],
                    },
                ],
            });
            Arc::new(Policy {
                kind: PolicyKind::AuthorizationPolicy,
                key: ObjectKey::new(SYNTHETIC_NAMESPACE, format!("synthetic-{i:010}")),
                created: None,
                dry_run: None,
                spec,
            })
        })
        .collect()
}
