//! [`Index`]: every policy compiled and filed by namespace, and the decisions made from it.

use std::{collections::HashMap, sync::Arc};

use super::{
    Action, Decision, MtlsMode, PolicyReport, Reason, Request, Workload,
    compile::{self, Authz, PeerAuth, selects},
    evaluate::Connection,
};
use crate::workload::model::{Policy, PolicyKind};

/// The policies of one namespace.
#[derive(Debug, Default)]
struct Namespace {
    /// Enforced DENY AuthorizationPolicies, by name.
    deny: Vec<Authz>,
    /// Enforced ALLOW AuthorizationPolicies, by name.
    allow: Vec<Authz>,
    /// The namespace-wide PeerAuthentication (mesh-wide in the root namespace): the first by
    /// name of those without a selector.
    peer: Option<PeerAuth>,
    /// PeerAuthentications with a selector, by name.
    peer_workloads: Vec<PeerAuth>,
}

/// Every AuthorizationPolicy and PeerAuthentication, compiled: build one per change of the
/// policies and share it (it is immutable).
///
/// Deciding looks only at the policies of the workload's namespace and of the root namespace,
/// and allocates nothing.
#[derive(Debug)]
pub struct Index {
    root_namespace: String,
    namespaces: HashMap<String, Namespace>,
    reports: Vec<PolicyReport>,
}

impl Default for Index {
    /// An index of no policies: everything is allowed, plaintext is accepted.
    fn default() -> Self {
        Self::build(&[], super::DEFAULT_ROOT_NAMESPACE)
    }
}

impl Index {
    /// Compiles `policies`, those of `root_namespace` applying mesh-wide. Never fails: what a
    /// policy gets wrong or uses beyond the L4 subset is recorded in its [`PolicyReport`] and
    /// handled as the module documentation says.
    pub fn build(policies: &[Arc<Policy>], root_namespace: &str) -> Self {
        let mut policies: Vec<&Policy> = policies.iter().map(AsRef::as_ref).collect();
        policies.sort_by(|a, b| (a.kind, &a.key).cmp(&(b.kind, &b.key)));
        let mut namespaces: HashMap<String, Namespace> = HashMap::new();
        let mut reports = Vec::with_capacity(policies.len());
        for policy in policies {
            match policy.kind {
                PolicyKind::AuthorizationPolicy => {
                    let (authz, report) = compile::authorization(policy, root_namespace);
                    reports.push(report);
                    if let Some(authz) = authz {
                        let namespace = namespaces.entry(policy.key.namespace.clone()).or_default();
                        match authz.action {
                            Action::Allow => namespace.allow.push(authz),
                            Action::Deny => namespace.deny.push(authz),
                            // Never compiled into an enforced policy.
                            Action::Audit | Action::Custom => {}
                        }
                    }
                }
                PolicyKind::PeerAuthentication => {
                    let (peer, mut report) = compile::peer_authentication(policy, root_namespace);
                    let namespace = namespaces.entry(policy.key.namespace.clone()).or_default();
                    if peer.selector.is_some() {
                        namespace.peer_workloads.push(peer);
                    } else if namespace.peer.is_none() {
                        namespace.peer = Some(peer);
                    } else {
                        report.effect = format!(
                            "shadowed: another PeerAuthentication without a selector in namespace \
                             {} comes first by name, and only one applies",
                            policy.key.namespace
                        );
                    }
                    reports.push(report);
                }
            }
        }
        Self {
            root_namespace: root_namespace.to_owned(),
            namespaces,
            reports,
        }
    }

    /// The root namespace this index was built with.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// The namespaces whose policies apply to `workload`: the root namespace's, then its own.
    fn scopes(&self, workload: &Workload<'_>) -> [Option<&Namespace>; 2] {
        let root = self.namespaces.get(self.root_namespace.as_str());
        let own = if workload.namespace == self.root_namespace {
            None
        } else {
            self.namespaces.get(workload.namespace)
        };
        [root, own]
    }

    /// Decides an inbound connection: any matching DENY policy denies; else with no ALLOW
    /// policy selecting the workload it is allowed; else any matching ALLOW policy allows; else
    /// it is denied.
    pub fn authorize(&self, request: &Request<'_>) -> Decision {
        let conn = Connection {
            source: request.source,
            source_ip: request.source_ip.to_canonical(),
            destination_ip: request.destination.ip().to_canonical(),
            destination_port: request.destination.port(),
        };
        let labels = request.workload.labels;
        let scopes = self.scopes(&request.workload);
        let applicable = |policies: fn(&Namespace) -> &[Authz]| {
            scopes
                .into_iter()
                .flatten()
                .flat_map(policies)
                .filter(|authz| selects(authz.selector.as_ref(), labels))
        };

        let matches = |authz: &&Authz| authz.rules.iter().any(|rule| rule.matches(&conn));
        if let Some(deny) = applicable(|ns| ns.deny.as_slice()).find(matches) {
            return Decision {
                allowed: false,
                policy: Some(deny.key.clone()),
                reason: Reason::DenyMatched,
            };
        }
        let mut selected = false;
        for allow in applicable(|ns| ns.allow.as_slice()) {
            selected = true;
            if matches(&allow) {
                return Decision {
                    allowed: true,
                    policy: Some(allow.key.clone()),
                    reason: Reason::AllowMatched,
                };
            }
        }
        Decision {
            allowed: !selected,
            policy: None,
            reason: if selected {
                Reason::NoAllowMatched
            } else {
                Reason::NoAllowPolicy
            },
        }
    }

    /// The effective mTLS mode of `port` of `workload` (never [`MtlsMode::Unset`]): the
    /// workload's policy (its port-level mode first), else its namespace's, else the mesh's,
    /// else PERMISSIVE; UNSET at one level defers to the next.
    pub fn peer_authentication(&self, workload: Workload<'_>, port: u16) -> MtlsMode {
        let own = self.namespaces.get(workload.namespace);
        let root = self.namespaces.get(self.root_namespace.as_str());
        let workload_policy = own.and_then(|ns| {
            ns.peer_workloads
                .iter()
                .find(|peer| selects(peer.selector.as_ref(), workload.labels))
        });
        if let Some(peer) = workload_policy {
            let port_mode = peer
                .ports
                .iter()
                .find(|(number, _)| *number == port)
                .map(|&(_, mode)| mode);
            if let Some(mode) = port_mode.filter(|&mode| mode != MtlsMode::Unset) {
                return mode;
            }
        }
        let levels = [
            workload_policy,
            own.and_then(|ns| ns.peer.as_ref()),
            root.and_then(|ns| ns.peer.as_ref()),
        ];
        levels
            .into_iter()
            .flatten()
            .map(|peer| peer.mode)
            .find(|&mode| mode != MtlsMode::Unset)
            .unwrap_or(MtlsMode::Permissive)
    }

    /// What was made of each policy, in (kind, namespace, name) order.
    pub fn report(&self) -> Vec<PolicyReport> {
        self.reports.clone()
    }

    /// How many unsupported fields the policies have in all (for
    /// `meshlet_policy_unsupported_fields`).
    pub fn unsupported_fields(&self) -> usize {
        self.reports.iter().map(|r| r.unsupported.len()).sum()
    }

    /// How many policies are invalid (and fail closed).
    pub fn invalid_policies(&self) -> usize {
        self.reports.iter().filter(|r| !r.errors.is_empty()).count()
    }
}
