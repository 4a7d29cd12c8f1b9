//! Why a workload is treated as it is: its effective mTLS mode and every policy that bears on
//! it, with why each applies, inherits, is overridden, shadowed, a dry run or ignored. What
//! `meshlet policies --workload ns/name` prints: the first question an operator asks when a
//! connection is refused.

use serde::Serialize;

use super::{
    Action, MtlsMode, Workload,
    compile::{Authz, PeerAuth, selects},
    index::{Index, Namespace},
};
use crate::workload::model::{Labels, ObjectKey, PolicyKind};

/// One of a namespace's lists of AuthorizationPolicies.
type Listed = fn(&Namespace) -> &[Authz];

/// A workload's effective mTLS and the policies that bear on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The mode of every port that has none of its own.
    pub mtls: MtlsMode,
    /// The ports with a mode of their own (the workload policy's `portLevelMtls`).
    pub ports: Vec<PortMode>,
    /// The policies, in the order Istio considers them: PeerAuthentications from the narrowest
    /// level to the broadest, then the ignored ones; then AuthorizationPolicies in the order
    /// they are evaluated (DENY, ALLOW, then dry runs), the root namespace's first.
    pub policies: Vec<Standing>,
}

/// One port's own mTLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortMode {
    /// The port.
    pub port: u16,
    /// Its mode.
    pub mode: MtlsMode,
}

/// One policy and what it does to the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Standing {
    /// AuthorizationPolicy or PeerAuthentication.
    pub kind: PolicyKind,
    /// Namespace and name.
    pub key: ObjectKey,
    /// An AuthorizationPolicy's action.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// A PeerAuthentication's mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsMode>,
    /// What it does.
    pub status: PolicyStatus,
    /// Why, in words.
    pub why: String,
}

/// What a policy does to a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyStatus {
    /// It decides (a PeerAuthentication's mode; an AuthorizationPolicy is evaluated).
    Applies,
    /// A PeerAuthentication whose mode is UNSET: the next broader level's applies.
    Inherits,
    /// A PeerAuthentication whose mode a narrower level replaces.
    Overridden,
    /// A PeerAuthentication of the same level as an older one, which wins.
    Shadowed,
    /// A dry-run AuthorizationPolicy: evaluated, logged and counted, never enforced.
    DryRun,
    /// A PeerAuthentication that takes no part (DISABLE, or a selector in the root namespace).
    Ignored,
}

impl PolicyStatus {
    /// The status as `meshlet policies` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyStatus::Applies => "applies",
            PolicyStatus::Inherits => "inherits",
            PolicyStatus::Overridden => "overridden",
            PolicyStatus::Shadowed => "shadowed",
            PolicyStatus::DryRun => "dry run",
            PolicyStatus::Ignored => "ignored",
        }
    }
}

/// `peer`, if it sets a mode (not UNSET).
fn sets_mode(peer: Option<&PeerAuth>) -> Option<&PeerAuth> {
    peer.filter(|peer| peer.mode != MtlsMode::Unset)
}

pub(super) fn explain(index: &Index, workload: Workload<'_>) -> Explanation {
    let levels = index.peer_levels(workload);
    let root_namespace = index.root_namespace();
    let root = index.namespace(root_namespace);
    let own = if workload.namespace == root_namespace {
        None
    } else {
        index.namespace(workload.namespace)
    };
    let mut policies = Vec::new();

    // Workload-specific, the narrowest level: the oldest that selects the workload.
    let selecting = own
        .into_iter()
        .flat_map(|ns| &ns.peer_workloads)
        .filter(|peer| selects(peer.selector.as_ref(), workload.labels));
    for peer in selecting {
        let chosen = levels.workload.expect("a selecting policy was found");
        let (status, why) = if !std::ptr::eq(peer, chosen) {
            (
                PolicyStatus::Shadowed,
                format!(
                    "{} is older (or as old and first by name) and selects this workload too; \
                     Istio applies only the oldest workload-specific policy",
                    chosen.key
                ),
            )
        } else {
            let ports = if peer.ports.is_empty() {
                String::new()
            } else {
                format!("; ports {} have their own mode", port_list(peer))
            };
            let selector = labels_text(peer.selector.as_ref());
            if peer.mode == MtlsMode::Unset && peer.ports.is_empty() {
                (
                    PolicyStatus::Inherits,
                    format!(
                        "workload-specific (selects {selector}) but UNSET: the mode comes from \
                         the namespace-wide or mesh-wide policy"
                    ),
                )
            } else {
                (
                    PolicyStatus::Applies,
                    format!(
                        "workload-specific (selects {selector}): the narrowest level wins{ports}"
                    ),
                )
            }
        };
        policies.push(peer_standing(peer, status, why));
    }
    // Namespace-wide, then mesh-wide: the oldest of each level.
    let narrower = [sets_mode(levels.workload), None];
    let broader = [
        (own, "namespace-wide", narrower),
        (
            root,
            "mesh-wide",
            [sets_mode(levels.workload), sets_mode(levels.namespace)],
        ),
    ];
    for (namespace, level, narrower) in broader {
        let namespace_wide = namespace.into_iter().flat_map(|ns| &ns.peer);
        for (i, peer) in namespace_wide.enumerate() {
            let (status, why) = if i > 0 {
                (
                    PolicyStatus::Shadowed,
                    format!(
                        "{} is older (or as old and first by name); Istio applies only the \
                         oldest {level} PeerAuthentication",
                        namespace.and_then(|ns| ns.peer.first()).expect("i > 0").key
                    ),
                )
            } else if let Some(over) = narrower.into_iter().flatten().next() {
                (
                    PolicyStatus::Overridden,
                    format!(
                        "{level}, but {} sets the mode: the narrowest level wins",
                        over.key
                    ),
                )
            } else if peer.mode == MtlsMode::Unset {
                (
                    PolicyStatus::Inherits,
                    format!("{level} but UNSET: the mode comes from the next broader level"),
                )
            } else {
                (
                    PolicyStatus::Applies,
                    format!("{level}: no narrower policy sets a mode"),
                )
            };
            policies.push(peer_standing(peer, status, why));
        }
    }
    // Those that take no part but look as if they would.
    for (key, selector, why) in [own, root]
        .into_iter()
        .flatten()
        .flat_map(|ns| &ns.peer_ignored)
        .filter(|(_, selector, _)| selects(selector.as_ref(), workload.labels))
    {
        let why = why.strip_prefix("ignored: ").unwrap_or(why);
        policies.push(Standing {
            kind: PolicyKind::PeerAuthentication,
            key: ObjectKey::clone(key),
            action: None,
            mode: None,
            status: PolicyStatus::Ignored,
            why: match selector {
                Some(_) => format!("selects {}, but {why}", labels_text(selector.as_ref())),
                None => why.to_owned(),
            },
        });
    }

    // AuthorizationPolicies, in evaluation order.
    let scopes = index.scopes(&workload);
    let lists: [(Listed, PolicyStatus, &str); 3] = [
        (
            |ns| &ns.deny,
            PolicyStatus::Applies,
            "DENY policies are evaluated first: one that matches denies",
        ),
        (
            |ns| &ns.allow,
            PolicyStatus::Applies,
            "with an ALLOW policy selecting the workload, only what an ALLOW policy matches gets \
             in",
        ),
        (
            |ns| &ns.dry_run,
            PolicyStatus::DryRun,
            "evaluated, logged and counted (meshlet_policy_dry_run_total), never enforced",
        ),
    ];
    for (list, status, what) in lists {
        for (i, namespace) in scopes.iter().enumerate() {
            let in_root = i == 0;
            for authz in namespace.iter().flat_map(|ns| list(ns)) {
                if !selects(authz.selector.as_ref(), workload.labels) {
                    continue;
                }
                let scope = match (&authz.selector, in_root) {
                    (Some(selector), true) => format!(
                        "root namespace {root_namespace}, selects {} in every namespace",
                        labels_text(Some(selector))
                    ),
                    (None, true) => format!("mesh-wide (root namespace {root_namespace})"),
                    (Some(selector), false) => format!("selects {}", labels_text(Some(selector))),
                    (None, false) => "every workload of its namespace".to_owned(),
                };
                policies.push(Standing {
                    kind: PolicyKind::AuthorizationPolicy,
                    key: ObjectKey::clone(&authz.key),
                    action: Some(authz.action),
                    mode: None,
                    status,
                    why: format!("{scope}; {what}"),
                });
            }
        }
    }

    Explanation {
        mtls: levels.workload_mode(),
        ports: levels
            .workload
            .into_iter()
            .flat_map(|peer| &peer.ports)
            .map(|&(port, mode)| PortMode { port, mode })
            .collect(),
        policies,
    }
}

fn peer_standing(peer: &PeerAuth, status: PolicyStatus, why: String) -> Standing {
    Standing {
        kind: PolicyKind::PeerAuthentication,
        key: ObjectKey::clone(&peer.key),
        action: None,
        mode: Some(peer.mode),
        status,
        why,
    }
}

fn port_list(peer: &PeerAuth) -> String {
    peer.ports
        .iter()
        .map(|(port, mode)| format!("{port}={mode}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn labels_text(labels: Option<&Labels>) -> String {
    labels
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
