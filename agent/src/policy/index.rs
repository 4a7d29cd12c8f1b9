//! [`Index`]: every policy compiled and filed by namespace, and the decisions made from it.

use std::{collections::HashMap, sync::Arc};

use super::{
    Action, Decision, MtlsMode, PolicyReport, Reason, Request, Workload,
    compile::{self, Authz, PeerAuth, selects},
    evaluate::Connection,
    explain::{self, Explanation},
};
use crate::workload::model::{Labels, ObjectKey, Policy, PolicyKind};

/// The policies of one namespace, each list oldest first (then by name), the order in which
/// Istio breaks ties.
#[derive(Debug, Default)]
pub(super) struct Namespace {
    /// Enforced DENY AuthorizationPolicies.
    pub deny: Vec<Authz>,
    /// Enforced ALLOW AuthorizationPolicies.
    pub allow: Vec<Authz>,
    /// Dry-run ALLOW and DENY AuthorizationPolicies: evaluated, never enforced.
    pub dry_run: Vec<Authz>,
    /// Namespace-wide PeerAuthentications (mesh-wide in the root namespace): the first applies.
    pub peer: Vec<PeerAuth>,
    /// Workload-specific PeerAuthentications: the first that selects a workload applies to it.
    pub peer_workloads: Vec<PeerAuth>,
    /// PeerAuthentications that take no part (DISABLE; a selector in the root namespace): their
    /// key, selector and why, for [`Index::explain`].
    pub peer_ignored: Vec<(Arc<ObjectKey>, Option<Labels>, String)>,
}

/// The PeerAuthentications that decide a workload's mTLS mode, one per level (see
/// [`Index::peer_authentication`]).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PeerLevels<'a> {
    /// The oldest namespace-wide policy of the root namespace.
    pub mesh: Option<&'a PeerAuth>,
    /// The oldest namespace-wide policy of the workload's namespace (not the root).
    pub namespace: Option<&'a PeerAuth>,
    /// The oldest policy of the workload's namespace (not the root) whose selector selects it.
    pub workload: Option<&'a PeerAuth>,
}

impl PeerLevels<'_> {
    /// The workload's mode on `port`: the workload policy's mode for the port, if it has one;
    /// else the narrowest level's that is not UNSET (UNSET inherits); else PERMISSIVE.
    pub fn mode(&self, port: u16) -> MtlsMode {
        let port_mode = self
            .workload
            .and_then(|peer| peer.ports.iter().find(|(number, _)| *number == port));
        port_mode.map_or_else(|| self.workload_mode(), |&(_, mode)| mode)
    }

    /// The mode of the ports without one of their own.
    pub fn workload_mode(&self) -> MtlsMode {
        [self.workload, self.namespace, self.mesh]
            .into_iter()
            .flatten()
            .map(|peer| peer.mode)
            .find(|&mode| mode != MtlsMode::Unset)
            .unwrap_or(MtlsMode::Permissive)
    }
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
    /// Whether any dry-run policy exists (connections skip that step otherwise).
    dry_runs: bool,
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
        // Oldest first, then by name: Istio's order wherever one policy must win.
        policies.sort_by(|a, b| {
            (a.kind, &a.key.namespace, a.created, &a.key.name).cmp(&(
                b.kind,
                &b.key.namespace,
                b.created,
                &b.key.name,
            ))
        });
        let mut namespaces: HashMap<String, Namespace> = HashMap::new();
        let mut reports = Vec::with_capacity(policies.len());
        let mut dry_runs = false;
        for policy in policies {
            let namespace = namespaces.entry(policy.key.namespace.clone()).or_default();
            match policy.kind {
                PolicyKind::AuthorizationPolicy => {
                    let (authz, mut report) = compile::authorization(policy, root_namespace);
                    match authz {
                        Some(authz) if report.dry_run => {
                            report.effect = format!("dry run, never enforced: {}", report.effect);
                            dry_runs = true;
                            namespace.dry_run.push(authz);
                        }
                        Some(authz) => match authz.action {
                            Action::Allow => namespace.allow.push(authz),
                            Action::Deny => namespace.deny.push(authz),
                            // Never compiled into an enforced policy.
                            Action::Audit | Action::Custom => {}
                        },
                        None => {}
                    }
                    reports.push(report);
                }
                PolicyKind::PeerAuthentication => {
                    let (peer, mut report) = compile::peer_authentication(policy, root_namespace);
                    match peer {
                        Some(peer) if peer.selector.is_some() => {
                            namespace.peer_workloads.push(peer);
                        }
                        Some(peer) => {
                            if let Some(first) = namespace.peer.first() {
                                report.effect = format!(
                                    "shadowed: {} is older (or as old and first by name), and \
                                     Istio applies only the oldest {} PeerAuthentication",
                                    first.key,
                                    if policy.key.namespace == root_namespace {
                                        "mesh-wide"
                                    } else {
                                        "namespace-wide"
                                    }
                                );
                            }
                            namespace.peer.push(peer);
                        }
                        None => namespace.peer_ignored.push((
                            Arc::new(policy.key.clone()),
                            compile::lenient_selector(&policy.spec),
                            report.effect.clone(),
                        )),
                    }
                    reports.push(report);
                }
            }
        }
        Self {
            root_namespace: root_namespace.to_owned(),
            namespaces,
            reports,
            dry_runs,
        }
    }

    /// The root namespace this index was built with.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// The namespaces whose policies apply to `workload`: the root namespace's, then its own.
    pub(super) fn scopes(&self, workload: &Workload<'_>) -> [Option<&Namespace>; 2] {
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
        let conn = Connection::of(request);
        let labels = request.workload.labels;
        let scopes = self.scopes(&request.workload);
        let applicable = |policies: fn(&Namespace) -> &[Authz]| {
            scopes
                .into_iter()
                .flatten()
                .flat_map(policies)
                .filter(|authz| selects(authz.selector.as_ref(), labels))
        };

        if let Some(deny) = applicable(|ns| ns.deny.as_slice()).find(|deny| deny.matches(&conn)) {
            return Decision {
                allowed: false,
                policy: Some(deny.key.clone()),
                reason: Reason::DenyMatched,
            };
        }
        let mut selected = false;
        for allow in applicable(|ns| ns.allow.as_slice()) {
            selected = true;
            if allow.matches(&conn) {
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

    /// What each dry-run AuthorizationPolicy that selects the request's workload would decide,
    /// alone (as Istio's dry run does, per policy action): a DENY denies when it matches, an
    /// ALLOW allows when it matches and denies otherwise. Calls `each(policy, would_allow)`.
    pub fn dry_run(&self, request: &Request<'_>, mut each: impl FnMut(&Arc<ObjectKey>, bool)) {
        if !self.dry_runs {
            return;
        }
        let conn = Connection::of(request);
        let dry_runs = self
            .scopes(&request.workload)
            .into_iter()
            .flatten()
            .flat_map(|ns| &ns.dry_run)
            .filter(|authz| selects(authz.selector.as_ref(), request.workload.labels));
        for authz in dry_runs {
            let matched = authz.matches(&conn);
            each(&authz.key, matched == (authz.action == Action::Allow));
        }
    }

    /// The PeerAuthentication of each level for `workload` (Istio's ambient reading: only the
    /// root namespace's namespace-wide policies are mesh-wide; a selector there is ignored, and
    /// so is DISABLE).
    pub(super) fn peer_levels(&self, workload: Workload<'_>) -> PeerLevels<'_> {
        let root = self.namespaces.get(self.root_namespace.as_str());
        let own = if workload.namespace == self.root_namespace {
            None
        } else {
            self.namespaces.get(workload.namespace)
        };
        PeerLevels {
            mesh: root.and_then(|ns| ns.peer.first()),
            namespace: own.and_then(|ns| ns.peer.first()),
            workload: own.and_then(|ns| {
                ns.peer_workloads
                    .iter()
                    .find(|peer| selects(peer.selector.as_ref(), workload.labels))
            }),
        }
    }

    /// The effective mTLS mode of `port` of `workload` (STRICT or PERMISSIVE): the workload
    /// policy's mode for the port, else the narrowest level's mode that is not UNSET (workload,
    /// namespace, mesh), else PERMISSIVE.
    pub fn peer_authentication(&self, workload: Workload<'_>, port: u16) -> MtlsMode {
        self.peer_levels(workload).mode(port)
    }

    /// Which policies apply to `workload`, in the order Istio considers them, and why each
    /// applies or does not: what `meshlet policies --workload` prints.
    pub fn explain(&self, workload: Workload<'_>) -> Explanation {
        explain::explain(self, workload)
    }

    /// The namespace `name`'s policies, if it has any.
    pub(super) fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(name)
    }

    /// What was made of each policy, in (kind, namespace, creation, name) order.
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
