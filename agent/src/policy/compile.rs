//! From a policy's spec (JSON) to compiled matchers and a [`PolicyReport`].
//!
//! Compiling never fails: unsupported fields become [`Unsupported`] entries (and fail safe for
//! the policy's action), invalid specs become [`Error`]s and a fail-closed policy (see the
//! module documentation of [`policy`](super)).

use std::{net::IpAddr, sync::Arc};

use ipnet::IpNet;
use serde_json::Value;

use super::{
    Action, Error, MtlsMode, PolicyReport, Unsupported,
    evaluate::{Condition, Connection, Operation, Rule, Set, Source, StringMatch},
    spec::{
        self, AuthorizationPolicySpec, Other, PeerAuthenticationSpec, Scalar, WorkloadSelector,
    },
};
use crate::workload::model::{DRY_RUN_ANNOTATION, Labels, ObjectKey, Policy, PolicyKind};

/// A compiled AuthorizationPolicy that is enforced (ALLOW or DENY).
#[derive(Debug, Clone)]
pub(crate) struct Authz {
    /// Namespace and name, shared with every decision it makes.
    pub key: Arc<ObjectKey>,
    /// `selector.matchLabels`; `None` selects every workload in scope.
    pub selector: Option<Labels>,
    /// ALLOW or DENY.
    pub action: Action,
    /// Its rules (an ALLOW rule with unsupported fields is left out: it matches nothing).
    pub rules: Vec<Rule>,
}

impl Authz {
    /// Whether any of its rules matches `conn`.
    pub fn matches(&self, conn: &Connection<'_>) -> bool {
        self.rules.iter().any(|rule| rule.matches(conn))
    }
}

/// A compiled PeerAuthentication that takes part (not DISABLE, not a selector in the root
/// namespace: Istio's ambient mode skips those).
#[derive(Debug, Clone)]
pub(crate) struct PeerAuth {
    /// Namespace and name.
    pub key: Arc<ObjectKey>,
    /// `selector.matchLabels`; `None` (absent or empty) makes it namespace-wide (mesh-wide in
    /// the root namespace).
    pub selector: Option<Labels>,
    /// `mtls.mode`: STRICT, PERMISSIVE or UNSET (inherit).
    pub mode: MtlsMode,
    /// `portLevelMtls` that count: STRICT or PERMISSIVE (UNSET and DISABLE leave the port to
    /// the policy's mode, as in ambient).
    pub ports: Vec<(u16, MtlsMode)>,
}

/// Whether a selector (absent: everything in scope) selects `labels`.
pub(crate) fn selects(selector: Option<&Labels>, labels: &Labels) -> bool {
    selector.is_none_or(|selector| crate::workload::model::selects(selector, labels))
}

/// A report with nothing found yet but whether the policy is a dry run.
fn report(policy: &Policy) -> PolicyReport {
    let mut report = PolicyReport {
        kind: policy.kind,
        key: policy.key.clone(),
        action: None,
        mode: None,
        dry_run: false,
        rules: 0,
        selects: String::new(),
        effect: String::new(),
        unsupported: Vec::new(),
        errors: Vec::new(),
    };
    if let Some(value) = &policy.dry_run {
        let path = format!("metadata.annotations[{DRY_RUN_ANNOTATION}]");
        match (policy.kind, parse_bool(value)) {
            (PolicyKind::AuthorizationPolicy, Some(dry_run)) => report.dry_run = dry_run,
            (PolicyKind::AuthorizationPolicy, None) => report.unsupported.push(Unsupported {
                path,
                reason: format!(
                    "{value:?} is not a boolean (write \"true\" or \"false\"); the policy is \
                     enforced, as Istio does"
                ),
            }),
            (PolicyKind::PeerAuthentication, _) => report.unsupported.push(Unsupported {
                path,
                reason: "only an AuthorizationPolicy can be a dry run; ignored".to_owned(),
            }),
        }
    }
    report
}

/// A boolean as Istio reads annotations (Go's `strconv.ParseBool`).
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// `serde_path_to_error`'s path as this module writes paths (`.` is the spec itself).
fn spec_error(err: serde_path_to_error::Error<serde_json::Error>) -> Error {
    let path = err.path().to_string();
    Error::Spec {
        path: if path == "." { String::new() } else { path },
        reason: err.inner().to_string(),
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

/// A selector's `matchLabels` as Istio reads them: absent, `{}` and `matchLabels: {}` all mean
/// no selector (every workload in scope).
fn match_labels(labels: Option<Labels>) -> Option<Labels> {
    labels.filter(|labels| !labels.is_empty())
}

/// The selector an invalid policy is taken to have: its `matchLabels` if they can be read,
/// else none (every workload in scope).
pub(crate) fn lenient_selector(spec: &Value) -> Option<Labels> {
    let selector = spec.get("selector")?.clone();
    match_labels(
        serde_json::from_value::<WorkloadSelector>(selector)
            .ok()
            .and_then(|s| s.match_labels),
    )
}

/// Reads `selector`: unknown fields are errors, the `matchLabels` are kept either way.
fn selector(selector: Option<WorkloadSelector>, errors: &mut Vec<Error>) -> Option<Labels> {
    let selector = selector?;
    for (field, value) in &selector.other {
        if spec::is_set(value) {
            errors.push(Error::Selector {
                path: format!("selector.{field}"),
            });
        }
    }
    match_labels(selector.match_labels)
}

fn labels_text(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `selects` of a report: which workloads a policy applies to, in words.
fn selects_text(
    namespace: &str,
    root_namespace: &str,
    selector: Option<&Labels>,
    mesh_wide_selector: bool,
) -> String {
    let root = namespace == root_namespace;
    match selector {
        Some(labels) => {
            let scope = if root && mesh_wide_selector {
                "in every namespace".to_owned()
            } else {
                format!("in namespace {namespace}")
            };
            format!("workloads with {} {scope}", labels_text(labels))
        }
        None if !root => format!("every workload in namespace {namespace}"),
        None => "every workload in the mesh".to_owned(),
    }
}

/// The action `action` names, if any.
fn action(action: Option<&str>) -> Option<Action> {
    match action {
        None | Some("" | "ALLOW") => Some(Action::Allow),
        Some("DENY") => Some(Action::Deny),
        Some("AUDIT") => Some(Action::Audit),
        Some("CUSTOM") => Some(Action::Custom),
        Some(_) => None,
    }
}

/// Compiles an AuthorizationPolicy: `None` when it is not enforced (AUDIT, CUSTOM,
/// `targetRef`).
pub(crate) fn authorization(
    policy: &Policy,
    root_namespace: &str,
) -> (Option<Authz>, PolicyReport) {
    let mut report = report(policy);
    let parsed = serde_path_to_error::deserialize::<_, AuthorizationPolicySpec>(&policy.spec);
    let spec = match parsed {
        Ok(spec) => spec,
        Err(err) => {
            report.errors.push(spec_error(err));
            return invalid_authorization(policy, root_namespace, report);
        }
    };
    report.rules = spec.rules.as_ref().map_or(0, Vec::len);
    let Some(action) = action(spec.action.as_deref()) else {
        report.errors.push(Error::UnknownAction {
            value: spec.action.unwrap_or_default(),
        });
        return invalid_authorization(policy, root_namespace, report);
    };
    report.action = Some(action);
    let selector = selector(spec.selector, &mut report.errors);
    report.selects = selects_text(
        &policy.key.namespace,
        root_namespace,
        selector.as_ref(),
        true,
    );

    let mut ignored_because = None;
    if let Action::Audit | Action::Custom = action {
        report.unsupported.push(Unsupported {
            path: "action".to_owned(),
            reason: format!(
                "{} policies are not supported; meshlet ignores this policy",
                if action == Action::Audit {
                    "AUDIT"
                } else {
                    "CUSTOM"
                }
            ),
        });
        ignored_because = Some("ignored: its action is not supported");
    }
    for (field, value) in &spec.other {
        if !spec::is_set(value) {
            continue;
        }
        let reason = match field.as_str() {
            "targetRef" | "targetRefs" => {
                ignored_because = Some("ignored: it is attached to a gateway or waypoint");
                "attaches the policy to a gateway or waypoint, not to workloads; meshlet ignores \
                 this policy"
            }
            "provider" => "only CUSTOM policies use a provider; ignored",
            _ => "unknown field; ignored",
        };
        report.unsupported.push(Unsupported {
            path: field.clone(),
            reason: reason.to_owned(),
        });
    }
    if let Some(why) = ignored_because {
        report.effect = why.to_owned();
        return (None, report);
    }

    let mut compiler = Compiler {
        action,
        unsupported: Vec::new(),
        errors: Vec::new(),
    };
    let written = spec.rules.unwrap_or_default();
    let rules: Vec<Rule> = written
        .iter()
        .enumerate()
        .filter_map(|(i, rule)| compiler.rule(rule, &format!("rules[{i}]")))
        .collect();
    report.unsupported.append(&mut compiler.unsupported);
    report.errors.append(&mut compiler.errors);
    if !report.errors.is_empty() {
        return invalid_authorization(policy, root_namespace, report);
    }

    report.effect = match action {
        Action::Allow if written.is_empty() => {
            "enforced; an ALLOW policy without rules matches nothing: the workloads it selects are \
             denied unless another ALLOW policy matches"
                .to_owned()
        }
        Action::Deny if written.is_empty() => {
            "enforced; a DENY policy without rules matches nothing".to_owned()
        }
        _ if rules.len() < written.len() => format!(
            "enforced; {} of {} rules match nothing (unsupported fields)",
            written.len() - rules.len(),
            written.len()
        ),
        _ => "enforced".to_owned(),
    };
    let authz = Authz {
        key: Arc::new(policy.key.clone()),
        selector,
        action,
        rules,
    };
    (Some(authz), report)
}

/// The fail-closed reading of an AuthorizationPolicy with errors (see the module documentation
/// of [`policy`](super)).
fn invalid_authorization(
    policy: &Policy,
    root_namespace: &str,
    mut report: PolicyReport,
) -> (Option<Authz>, PolicyReport) {
    let selector = lenient_selector(&policy.spec);
    report.selects = selects_text(
        &policy.key.namespace,
        root_namespace,
        selector.as_ref(),
        true,
    );
    let written = match policy.spec.get("action") {
        None | Some(Value::Null) => Some(Action::Allow),
        Some(Value::String(s)) => action(Some(s)),
        Some(_) => None,
    };
    report.action = written;
    let (action, rules, effect) = match written {
        Some(Action::Allow) => (
            Action::Allow,
            Vec::new(),
            "invalid ALLOW policy: it matches nothing, so the workloads it selects are denied \
             unless another ALLOW policy matches (fail closed)",
        ),
        Some(Action::Audit | Action::Custom) => {
            report.effect = "invalid and ignored: its action is not supported".to_owned();
            return (None, report);
        }
        Some(Action::Deny) => (
            Action::Deny,
            vec![Rule::default()],
            "invalid DENY policy: it denies every connection to the workloads it selects \
             (fail closed)",
        ),
        None => (
            Action::Deny,
            vec![Rule::default()],
            "invalid policy with an unknown action: it denies every connection to the workloads \
             it selects (fail closed)",
        ),
    };
    report.effect = effect.to_owned();
    let authz = Authz {
        key: Arc::new(policy.key.clone()),
        selector,
        action,
        rules,
    };
    (Some(authz), report)
}

/// Compiles the rules of one AuthorizationPolicy, collecting what it cannot honour.
struct Compiler {
    action: Action,
    unsupported: Vec<Unsupported>,
    errors: Vec<Error>,
}

impl Compiler {
    /// Records an unsupported field of a rule, saying what that does to the rule.
    fn unsupported(&mut self, path: String, what: &str) {
        let consequence = match self.action {
            Action::Allow => "this ALLOW rule matches nothing",
            _ => "ignored, so this DENY rule matches more",
        };
        self.unsupported.push(Unsupported {
            path,
            reason: format!("{what}; {consequence}"),
        });
    }

    /// Records the set fields of an `other` map, `describe` naming the known ones.
    fn other(&mut self, other: &Other, path: &str, describe: fn(&str) -> Option<&'static str>) {
        for (field, value) in other {
            if spec::is_set(value) {
                let what = describe(field).unwrap_or("unknown field");
                self.unsupported(join(path, field), what);
            }
        }
    }

    /// A rule, or `None` when it matches nothing (an ALLOW rule with unsupported fields).
    fn rule(&mut self, rule: &spec::Rule, path: &str) -> Option<Rule> {
        let before = self.unsupported.len();
        self.other(&rule.other, path, |_| None);
        let mut compiled = Rule::default();
        for (i, from) in rule.from.iter().flatten().enumerate() {
            let path = format!("{path}.from[{i}]");
            self.other(&from.other, &path, |_| None);
            compiled.from.push(match &from.source {
                Some(source) => self.source(source, &join(&path, "source")),
                None => Source::default(),
            });
        }
        for (i, to) in rule.to.iter().flatten().enumerate() {
            let path = format!("{path}.to[{i}]");
            self.other(&to.other, &path, |_| None);
            compiled.to.push(match &to.operation {
                Some(operation) => self.operation(operation, &join(&path, "operation")),
                None => Operation::default(),
            });
        }
        for (i, condition) in rule.when.iter().flatten().enumerate() {
            if let Some(condition) = self.condition(condition, &format!("{path}.when[{i}]")) {
                compiled.when.push(condition);
            }
        }
        match self.action {
            Action::Allow if self.unsupported.len() > before => None,
            _ => Some(compiled),
        }
    }

    fn source(&mut self, source: &spec::Source, path: &str) -> Source {
        self.other(&source.other, path, |field| match field {
            "requestPrincipals" | "notRequestPrincipals" => {
                Some("request principals come from JWTs, which only HTTP carries")
            }
            "remoteIpBlocks" | "notRemoteIpBlocks" => {
                Some("remote IPs come from X-Forwarded-For, which only HTTP carries")
            }
            _ => None,
        });
        Source {
            principals: Set {
                values: principals(&source.principals),
                not_values: principals(&source.not_principals),
            },
            namespaces: Set {
                values: patterns(&source.namespaces),
                not_values: patterns(&source.not_namespaces),
            },
            ip_blocks: Set {
                values: self.ip_blocks(
                    source.ip_blocks.iter().flatten().map(String::as_str),
                    &join(path, "ipBlocks"),
                ),
                not_values: self.ip_blocks(
                    source.not_ip_blocks.iter().flatten().map(String::as_str),
                    &join(path, "notIpBlocks"),
                ),
            },
        }
    }

    fn operation(&mut self, operation: &spec::Operation, path: &str) -> Operation {
        self.other(&operation.other, path, |field| match field {
            "hosts" | "notHosts" | "methods" | "notMethods" | "paths" | "notPaths" => {
                Some("HTTP-only")
            }
            _ => None,
        });
        Operation {
            ports: Set {
                values: self.ports(&operation.ports, &join(path, "ports")),
                not_values: self.ports(&operation.not_ports, &join(path, "notPorts")),
            },
        }
    }

    /// A `when` condition; `None` for an unsupported key (recorded) or an error.
    fn condition(&mut self, condition: &spec::Condition, path: &str) -> Option<Condition> {
        self.other(&condition.other, path, |_| None);
        let key = condition.key.as_str();
        let what = match key {
            "source.ip" | "destination.ip" | "source.namespace" | "source.principal"
            | "destination.port" => None,
            "remote.ip" => Some("remote.ip comes from X-Forwarded-For, which only HTTP carries"),
            "connection.sni" => Some("connection.sni needs TLS termination by the proxy"),
            _ if key.starts_with("request.") => Some("request attributes are HTTP-only"),
            _ if key.starts_with("experimental.") => Some("experimental keys are Envoy's"),
            _ => Some("meshlet does not know this key"),
        };
        if let Some(what) = what {
            self.unsupported(path.to_owned(), &format!("condition on {key}: {what}"));
            return None;
        }
        let values = condition.values.as_deref().unwrap_or_default();
        let not_values = condition.not_values.as_deref().unwrap_or_default();
        if values.is_empty() && not_values.is_empty() {
            self.errors.push(Error::EmptyCondition {
                path: path.to_owned(),
                key: key.to_owned(),
            });
            return None;
        }
        let values_path = join(path, "values");
        let not_values_path = join(path, "notValues");
        Some(match key {
            "source.ip" | "destination.ip" => {
                let set = Set {
                    values: self.ip_blocks(text(values), &values_path),
                    not_values: self.ip_blocks(text(not_values), &not_values_path),
                };
                if key == "source.ip" {
                    Condition::SourceIp(set)
                } else {
                    Condition::DestinationIp(set)
                }
            }
            "source.namespace" => Condition::SourceNamespace(Set {
                values: text(values).map(StringMatch::new).collect(),
                not_values: text(not_values).map(StringMatch::new).collect(),
            }),
            "source.principal" => Condition::SourcePrincipal(Set {
                values: text(values).map(principal).collect(),
                not_values: text(not_values).map(principal).collect(),
            }),
            _ => Condition::DestinationPort(Set {
                values: self.ports(&condition.values, &values_path),
                not_values: self.ports(&condition.not_values, &not_values_path),
            }),
        })
    }

    fn ip_blocks<'a>(&mut self, values: impl Iterator<Item = &'a str>, path: &str) -> Vec<IpNet> {
        let mut blocks = Vec::new();
        for (i, value) in values.enumerate() {
            match ip_block(value) {
                Some(block) => blocks.push(block),
                None => self.errors.push(Error::IpBlock {
                    path: format!("{path}[{i}]"),
                    value: value.to_owned(),
                }),
            }
        }
        blocks
    }

    fn ports(&mut self, values: &Option<Vec<Scalar>>, path: &str) -> Vec<u16> {
        let mut ports = Vec::new();
        for (i, Scalar(value)) in values.iter().flatten().enumerate() {
            match port(value) {
                Some(port) => ports.push(port),
                None => self.errors.push(Error::Port {
                    path: format!("{path}[{i}]"),
                    value: value.clone(),
                }),
            }
        }
        ports
    }
}

/// The strings of a list of values.
fn text(values: &[Scalar]) -> impl Iterator<Item = &str> {
    values.iter().map(|Scalar(value)| value.as_str())
}

/// An IP block: a CIDR, or a bare IP as a /32 or /128.
fn ip_block(value: &str) -> Option<IpNet> {
    value
        .parse::<IpNet>()
        .ok()
        .or_else(|| value.parse::<IpAddr>().ok().map(IpNet::from))
}

/// A port from 1 to 65535, in decimal.
fn port(value: &str) -> Option<u16> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse::<u16>().ok().filter(|&port| port != 0)
}

/// A principal pattern (a `spiffe://` prefix, which Istio does not write, is tolerated).
fn principal(value: &str) -> StringMatch {
    StringMatch::new(value.strip_prefix("spiffe://").unwrap_or(value))
}

fn principals(values: &Option<Vec<String>>) -> Vec<StringMatch> {
    values.iter().flatten().map(|v| principal(v)).collect()
}

fn patterns(values: &Option<Vec<String>>) -> Vec<StringMatch> {
    values
        .iter()
        .flatten()
        .map(|v| StringMatch::new(v))
        .collect()
}

/// The mode `mode` names, if any.
fn mode(mode: Option<&str>) -> Option<MtlsMode> {
    match mode {
        None | Some("" | "UNSET") => Some(MtlsMode::Unset),
        Some("DISABLE") => Some(MtlsMode::Disable),
        Some("PERMISSIVE") => Some(MtlsMode::Permissive),
        Some("STRICT") => Some(MtlsMode::Strict),
        Some(_) => None,
    }
}

/// Compiles a PeerAuthentication; an invalid one is STRICT for what it selects. `None`: it takes
/// no part, as in Istio's ambient mode (its report says why).
pub(crate) fn peer_authentication(
    policy: &Policy,
    root_namespace: &str,
) -> (Option<PeerAuth>, PolicyReport) {
    let mut report = report(policy);
    let parsed = serde_path_to_error::deserialize::<_, PeerAuthenticationSpec>(&policy.spec);
    let spec = match parsed {
        Ok(spec) => spec,
        Err(err) => {
            report.errors.push(spec_error(err));
            return invalid_peer_authentication(policy, root_namespace, report);
        }
    };
    let selector = selector(spec.selector, &mut report.errors);
    report.selects = selects_text(
        &policy.key.namespace,
        root_namespace,
        selector.as_ref(),
        false,
    );
    let read_mode = |mtls: &spec::Mtls, path: &str, report: &mut PolicyReport| {
        for (field, value) in &mtls.other {
            if spec::is_set(value) {
                report.unsupported.push(Unsupported {
                    path: join(path, field),
                    reason: "unknown field; ignored".to_owned(),
                });
            }
        }
        mode(mtls.mode.as_deref()).unwrap_or_else(|| {
            report.errors.push(Error::UnknownMode {
                path: join(path, "mode"),
                value: mtls.mode.clone().unwrap_or_default(),
            });
            MtlsMode::Strict
        })
    };
    let own = match &spec.mtls {
        Some(mtls) => read_mode(mtls, "mtls", &mut report),
        None => MtlsMode::Unset,
    };
    report.mode = Some(own);
    let mut ports = Vec::new();
    let port_level = spec.port_level_mtls.unwrap_or_default();
    if selector.is_none() && !port_level.is_empty() {
        report.unsupported.push(Unsupported {
            path: "portLevelMtls".to_owned(),
            reason: "applies only to a policy with a selector (as in Istio); ignored".to_owned(),
        });
    } else {
        for (number, mtls) in &port_level {
            let path = format!("portLevelMtls.{number}");
            let mode = read_mode(mtls, &path, &mut report);
            let Some(number) = port(number) else {
                report.errors.push(Error::Port {
                    path,
                    value: number.clone(),
                });
                continue;
            };
            match mode {
                MtlsMode::Strict | MtlsMode::Permissive => ports.push((number, mode)),
                MtlsMode::Disable => report.unsupported.push(Unsupported {
                    path: join(&path, "mode"),
                    reason: "DISABLE is not supported in ambient mode (Istio skips it); the port \
                             takes the policy's mode"
                        .to_owned(),
                }),
                MtlsMode::Unset => {}
            }
        }
    }
    for (field, value) in &spec.other {
        if spec::is_set(value) {
            report.unsupported.push(Unsupported {
                path: field.clone(),
                reason: "unknown field; ignored".to_owned(),
            });
        }
    }
    if !report.errors.is_empty() {
        return invalid_peer_authentication(policy, root_namespace, report);
    }
    if own == MtlsMode::Disable {
        report.effect = "ignored: DISABLE is not supported in ambient mode (Istio skips the \
                         policy, and so does meshlet)"
            .to_owned();
        return (None, report);
    }
    if let Some(ignored) = root_selector(&policy.key.namespace, root_namespace, &selector) {
        report.effect = ignored;
        return (None, report);
    }
    report.effect = "enforced".to_owned();
    let peer = PeerAuth {
        key: Arc::new(policy.key.clone()),
        selector,
        mode: own,
        ports,
    };
    (Some(peer), report)
}

/// Why a PeerAuthentication is ignored for having a selector in the root namespace, if it is.
fn root_selector(
    namespace: &str,
    root_namespace: &str,
    selector: &Option<Labels>,
) -> Option<String> {
    (namespace == root_namespace && selector.is_some()).then(|| {
        "ignored: a PeerAuthentication with a selector in the root namespace is neither \
         mesh-wide nor workload-specific (Istio ignores it)"
            .to_owned()
    })
}

fn invalid_peer_authentication(
    policy: &Policy,
    root_namespace: &str,
    mut report: PolicyReport,
) -> (Option<PeerAuth>, PolicyReport) {
    let selector = lenient_selector(&policy.spec);
    report.selects = selects_text(
        &policy.key.namespace,
        root_namespace,
        selector.as_ref(),
        false,
    );
    if let Some(ignored) = root_selector(&policy.key.namespace, root_namespace, &selector) {
        report.effect = format!("invalid and {ignored}");
        return (None, report);
    }
    report.effect =
        "invalid: taken as STRICT (plaintext refused) for the workloads it selects (fail closed)"
            .to_owned();
    let peer = PeerAuth {
        key: Arc::new(policy.key.clone()),
        selector,
        mode: MtlsMode::Strict,
        ports: Vec::new(),
    };
    (Some(peer), report)
}
