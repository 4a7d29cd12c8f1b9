//! AuthorizationPolicy and PeerAuthentication from a workload file to decisions: the file
//! parser, the policy compiler (`policy::Index::build`) and the evaluator (`Index::authorize`,
//! `Index::peer_authentication`), the path every policy change and every inbound connection
//! takes.
//!
//! The policies are either arbitrary text or generated specs serialised to YAML: the generator
//! writes Istio's field names and values near the edges of what is valid (ports, CIDRs,
//! wildcards, unknown actions and modes, HTTP-only fields, fields of the wrong type), which
//! reaches the compiler far more often than mutated text does. Beyond never panicking, the index
//! must not depend on the order policies are listed in, every decision must be consistent with
//! its reason, the effective mTLS mode is never UNSET (nor DISABLE, which ambient ignores), and
//! `meshlet policies --workload`'s explanation gives the mode the decision used.

#![no_main]

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use meshlet::{
    identity::Identity,
    policy::{self, Decision, Index, MtlsMode, Reason, Request, Workload},
    source::file,
    workload::{
        Store,
        model::{Labels, Policy},
    },
};
use serde_json::{Map, Value, json};

const NAMESPACES: &[&str] = &["demo", "istio-system", "other", "default"];
const LABEL_KEYS: &[&str] = &["app", "version"];
const LABEL_VALUES: &[&str] = &["client", "server", "v1"];
const TRUST_DOMAINS: &[&str] = &["cluster.local", "example.org"];
const DRY_RUN_VALUES: &[&str] = &["true", "false", "True", "1", "yes", ""];
const SERVICE_ACCOUNTS: &[&str] = &["client", "server", "default"];
const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/demo/sa/client",
    "spiffe://cluster.local/ns/demo/sa/client",
    "cluster.local/ns/other/sa/server",
    "*",
    "cluster.local/*",
    "*/sa/client",
    "cluster.local/ns/demo/sa/*",
    "",
    "**",
];
const NAMESPACE_PATTERNS: &[&str] = &["demo", "istio-system", "*", "de*", "*mo", "", "other"];
const IP_BLOCKS: &[&str] = &[
    "10.0.0.0/8",
    "10.244.1.11",
    "10.244.1.11/32",
    "fd00::/64",
    "::ffff:10.0.0.1",
    "0.0.0.0/0",
    "::/0",
    "10.0.0.0/33",
    "10.1.2.3/8",
    "not-an-ip",
    "",
];
const PORTS: &[&str] = &[
    "8080", "80", "15008", "0", "65535", "65536", "-1", "08080", " 80", "+80", "",
];
const CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
    "request.headers[x-user]",
    "source.unknown",
    "remote.ip",
    "connection.sni",
    "",
];
const ACTIONS: &[&str] = &["ALLOW", "DENY", "AUDIT", "CUSTOM", "allow", ""];
const MODES: &[&str] = &["STRICT", "PERMISSIVE", "DISABLE", "UNSET", "strict", ""];
const EXTRA_FIELDS: &[&str] = &[
    "methods",
    "notMethods",
    "paths",
    "hosts",
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "targetRef",
    "targetRefs",
    "provider",
    "matchExpressions",
    "unknown",
];
const IPS: &[&str] = &[
    "10.244.1.11",
    "10.0.0.1",
    "192.168.1.1",
    "fd00::1",
    "::ffff:10.0.0.1",
];

/// A word from the field's vocabulary, or any text.
#[derive(Debug, Arbitrary)]
enum Word {
    Known(u8),
    Any(String),
}

impl Word {
    fn text(&self, vocabulary: &[&str]) -> String {
        match self {
            Word::Known(i) => vocabulary[usize::from(*i) % vocabulary.len()].to_owned(),
            Word::Any(text) => text.clone(),
        }
    }
}

/// A value where the spec wants a string, or a number, or something of the wrong type.
#[derive(Debug, Arbitrary)]
enum Scalar {
    Word(Word),
    Number(i64),
    Junk(u8),
}

impl Scalar {
    fn json(&self, vocabulary: &[&str]) -> Value {
        match self {
            Scalar::Word(word) => Value::String(word.text(vocabulary)),
            Scalar::Number(n) => json!(n),
            Scalar::Junk(i) => junk(*i),
        }
    }
}

fn junk(i: u8) -> Value {
    match i % 7 {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(1.5),
        3 => json!([]),
        4 => json!({}),
        5 => json!(""),
        _ => json!([["nested"]]),
    }
}

/// A list of scalars, or something that is not a list.
#[derive(Debug, Arbitrary)]
enum List {
    Values(Vec<Scalar>),
    Junk(u8),
}

impl List {
    fn json(&self, vocabulary: &[&str]) -> Value {
        match self {
            List::Values(values) => values.iter().map(|v| v.json(vocabulary)).collect(),
            List::Junk(i) => junk(*i),
        }
    }
}

/// Fields a level may have beyond the ones meshlet enforces.
#[derive(Debug, Arbitrary)]
struct Extra(Vec<(Word, List)>);

impl Extra {
    fn add_to(&self, object: &mut Map<String, Value>) {
        for (name, value) in &self.0 {
            object.insert(name.text(EXTRA_FIELDS), value.json(PORTS));
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Meta {
    namespace: Word,
    name: u8,
    beta: bool,
    /// `creationTimestamp`, a few minutes apart (ties between policies are broken by age).
    created: Option<u8>,
    /// The `istio.io/dry-run` annotation.
    dry_run: Option<Word>,
}

#[derive(Debug, Arbitrary)]
struct Selector {
    labels: Vec<(Word, Word)>,
    extra: Extra,
}

impl Selector {
    fn json(&self) -> Value {
        let labels: Map<String, Value> = self
            .labels
            .iter()
            .map(|(k, v)| (k.text(LABEL_KEYS), Value::String(v.text(LABEL_VALUES))))
            .collect();
        let mut selector = Map::new();
        selector.insert("matchLabels".into(), Value::Object(labels));
        self.extra.add_to(&mut selector);
        Value::Object(selector)
    }
}

#[derive(Debug, Arbitrary)]
struct SourceInput {
    principals: Option<List>,
    not_principals: Option<List>,
    namespaces: Option<List>,
    not_namespaces: Option<List>,
    ip_blocks: Option<List>,
    not_ip_blocks: Option<List>,
    extra: Extra,
}

#[derive(Debug, Arbitrary)]
struct OperationInput {
    ports: Option<List>,
    not_ports: Option<List>,
    extra: Extra,
}

#[derive(Debug, Arbitrary)]
struct ConditionInput {
    key: Option<Word>,
    values: Option<List>,
    not_values: Option<List>,
}

#[derive(Debug, Arbitrary)]
struct RuleInput {
    from: Option<Vec<Option<SourceInput>>>,
    to: Option<Vec<Option<OperationInput>>>,
    when: Option<Vec<ConditionInput>>,
    extra: Extra,
}

#[derive(Debug, Arbitrary)]
enum PolicyInput {
    Authorization {
        meta: Meta,
        selector: Option<Selector>,
        action: Option<Word>,
        rules: Option<Vec<RuleInput>>,
        extra: Extra,
    },
    Peer {
        meta: Meta,
        selector: Option<Selector>,
        mode: Option<Word>,
        ports: Vec<(Scalar, Option<Word>)>,
        extra: Extra,
    },
}

fn insert(object: &mut Map<String, Value>, field: &str, value: Option<Value>) {
    if let Some(value) = value {
        object.insert(field.to_owned(), value);
    }
}

fn mtls(mode: &Option<Word>) -> Value {
    let mut mtls = Map::new();
    insert(
        &mut mtls,
        "mode",
        mode.as_ref().map(|m| m.text(MODES).into()),
    );
    Value::Object(mtls)
}

impl RuleInput {
    fn json(&self) -> Value {
        let mut rule = Map::new();
        insert(
            &mut rule,
            "from",
            self.from.as_ref().map(|from| {
                from.iter()
                    .map(|source| match source {
                        None => json!({}),
                        Some(source) => {
                            let mut s = Map::new();
                            let lists = [
                                ("principals", &source.principals, PRINCIPALS),
                                ("notPrincipals", &source.not_principals, PRINCIPALS),
                                ("namespaces", &source.namespaces, NAMESPACE_PATTERNS),
                                ("notNamespaces", &source.not_namespaces, NAMESPACE_PATTERNS),
                                ("ipBlocks", &source.ip_blocks, IP_BLOCKS),
                                ("notIpBlocks", &source.not_ip_blocks, IP_BLOCKS),
                            ];
                            for (field, list, vocabulary) in lists {
                                insert(&mut s, field, list.as_ref().map(|l| l.json(vocabulary)));
                            }
                            source.extra.add_to(&mut s);
                            json!({ "source": s })
                        }
                    })
                    .collect()
            }),
        );
        insert(
            &mut rule,
            "to",
            self.to.as_ref().map(|to| {
                to.iter()
                    .map(|operation| match operation {
                        None => json!({}),
                        Some(operation) => {
                            let mut o = Map::new();
                            insert(
                                &mut o,
                                "ports",
                                operation.ports.as_ref().map(|l| l.json(PORTS)),
                            );
                            insert(
                                &mut o,
                                "notPorts",
                                operation.not_ports.as_ref().map(|l| l.json(PORTS)),
                            );
                            operation.extra.add_to(&mut o);
                            json!({ "operation": o })
                        }
                    })
                    .collect()
            }),
        );
        insert(
            &mut rule,
            "when",
            self.when.as_ref().map(|when| {
                when.iter()
                    .map(|condition| {
                        let mut c = Map::new();
                        insert(
                            &mut c,
                            "key",
                            condition
                                .key
                                .as_ref()
                                .map(|k| k.text(CONDITION_KEYS).into()),
                        );
                        // Values for any key: IPs, ports, principals and namespaces alike.
                        let values = [IP_BLOCKS, PORTS, PRINCIPALS, NAMESPACE_PATTERNS].concat();
                        insert(
                            &mut c,
                            "values",
                            condition.values.as_ref().map(|l| l.json(&values)),
                        );
                        insert(
                            &mut c,
                            "notValues",
                            condition.not_values.as_ref().map(|l| l.json(&values)),
                        );
                        Value::Object(c)
                    })
                    .collect()
            }),
        );
        self.extra.add_to(&mut rule);
        Value::Object(rule)
    }
}

impl PolicyInput {
    /// The policy as one YAML document.
    fn yaml(&self) -> String {
        let (kind, meta, spec) = match self {
            PolicyInput::Authorization {
                meta,
                selector,
                action,
                rules,
                extra,
            } => {
                let mut spec = Map::new();
                insert(&mut spec, "selector", selector.as_ref().map(Selector::json));
                insert(
                    &mut spec,
                    "action",
                    action.as_ref().map(|a| a.text(ACTIONS).into()),
                );
                insert(
                    &mut spec,
                    "rules",
                    rules
                        .as_ref()
                        .map(|rules| rules.iter().map(RuleInput::json).collect()),
                );
                extra.add_to(&mut spec);
                ("AuthorizationPolicy", meta, spec)
            }
            PolicyInput::Peer {
                meta,
                selector,
                mode,
                ports,
                extra,
            } => {
                let mut spec = Map::new();
                insert(&mut spec, "selector", selector.as_ref().map(Selector::json));
                spec.insert("mtls".into(), mtls(mode));
                if !ports.is_empty() {
                    let ports: Map<String, Value> = ports
                        .iter()
                        .map(|(port, mode)| {
                            let port = match port.json(PORTS) {
                                Value::String(s) => s,
                                other => other.to_string(),
                            };
                            (port, mtls(mode))
                        })
                        .collect();
                    spec.insert("portLevelMtls".into(), Value::Object(ports));
                }
                extra.add_to(&mut spec);
                ("PeerAuthentication", meta, spec)
            }
        };
        let mut metadata = json!({
            "name": format!("p{}", meta.name % 8),
            "namespace": meta.namespace.text(NAMESPACES),
        });
        if let Some(minute) = meta.created {
            metadata["creationTimestamp"] = format!("2026-12-01T10:{:02}:00Z", minute % 4).into();
        }
        if let Some(value) = &meta.dry_run {
            metadata["annotations"] = json!({"istio.io/dry-run": value.text(DRY_RUN_VALUES)});
        }
        let document = json!({
            "apiVersion": if meta.beta { "security.istio.io/v1beta1" } else { "security.istio.io/v1" },
            "kind": kind,
            "metadata": metadata,
            "spec": spec,
        });
        serde_yaml::to_string(&document).expect("JSON values serialise to YAML")
    }
}

#[derive(Debug, Arbitrary)]
enum IpInput {
    Known(u8),
    Any(IpAddr),
}

impl IpInput {
    fn ip(&self) -> IpAddr {
        match self {
            IpInput::Known(i) => IPS[usize::from(*i) % IPS.len()].parse().expect("valid"),
            IpInput::Any(ip) => *ip,
        }
    }
}

#[derive(Debug, Arbitrary)]
struct RequestInput {
    namespace: Word,
    labels: Vec<(Word, Word)>,
    destination: IpInput,
    port: Scalar,
    source: Option<(Word, Word, Word)>,
    source_ip: IpInput,
}

fuzz_target!(|data: &[u8]| {
    // A first byte 0: generated policies and requests. Otherwise the policies as text, up to a
    // NUL, then requests: the seeds are plain workload files.
    let (text, requests) = match data.split_first() {
        Some((0, rest)) => {
            let mut u = Unstructured::new(rest);
            let Ok(policies) = Vec::<PolicyInput>::arbitrary(&mut u) else {
                return;
            };
            let text = policies
                .iter()
                .map(PolicyInput::yaml)
                .collect::<Vec<_>>()
                .join("---\n");
            (
                text,
                Vec::<RequestInput>::arbitrary_take_rest(u).unwrap_or_default(),
            )
        }
        _ => {
            let (text, rest) = match data.iter().position(|&b| b == 0) {
                Some(nul) => (&data[..nul], &data[nul + 1..]),
                None => (data, &[][..]),
            };
            let requests = Vec::<RequestInput>::arbitrary_take_rest(Unstructured::new(rest))
                .unwrap_or_default();
            (String::from_utf8_lossy(text).into_owned(), requests)
        }
    };
    let Ok(objects) = file::parse(&text) else {
        return;
    };
    // As the agent does: the store keeps one object per kind and key, the index is built from
    // what the store holds.
    let store = Store::new();
    file::apply(&store, objects);
    let policies = store.policies();
    let index = Index::build(&policies, policy::DEFAULT_ROOT_NAMESPACE);
    assert_eq!(index.report().len(), policies.len());
    serde_json::to_string(&index.report()).expect("reports serialise");
    let _ = (index.unsupported_fields(), index.invalid_policies());

    let reversed: Vec<Arc<Policy>> = policies.iter().rev().cloned().collect();
    let reversed = Index::build(&reversed, policy::DEFAULT_ROOT_NAMESPACE);
    assert_eq!(
        index.report(),
        reversed.report(),
        "the order policies come in matters"
    );

    let requests: Vec<RequestInput> = canonical_requests()
        .into_iter()
        .chain(requests)
        .take(24)
        .collect();
    for request in &requests {
        let labels: Labels = request
            .labels
            .iter()
            .map(|(k, v)| (k.text(LABEL_KEYS), v.text(LABEL_VALUES)))
            .collect::<BTreeMap<_, _>>();
        let namespace = request.namespace.text(NAMESPACES);
        let workload = Workload {
            namespace: &namespace,
            labels: &labels,
        };
        let port = match request.port.json(PORTS) {
            Value::String(s) => s.parse().unwrap_or(8080),
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()).unwrap_or(80),
            _ => 15008,
        };
        let identity = request.source.as_ref().and_then(|(td, ns, sa)| {
            Identity::new(
                &td.text(TRUST_DOMAINS),
                &ns.text(NAMESPACES),
                &sa.text(SERVICE_ACCOUNTS),
            )
            .ok()
        });
        let request = Request {
            workload,
            destination: SocketAddr::new(request.destination.ip(), port),
            source: identity.as_ref(),
            source_ip: request.source_ip.ip(),
        };
        let decision = index.authorize(&request);
        check(&decision);
        assert_eq!(decision, reversed.authorize(&request), "{request:?}");
        let _ = decision.to_string();

        let mut dry_runs = Vec::new();
        index.dry_run(&request, |policy, allow| {
            dry_runs.push((policy.clone(), allow))
        });
        let mut reversed_dry_runs = Vec::new();
        reversed.dry_run(&request, |policy, allow| {
            reversed_dry_runs.push((policy.clone(), allow))
        });
        assert_eq!(dry_runs, reversed_dry_runs, "{request:?}");

        let mode = index.peer_authentication(workload, port);
        assert_ne!(mode, MtlsMode::Unset, "the effective mode is never UNSET");
        assert_ne!(
            mode,
            MtlsMode::Disable,
            "DISABLE takes no part in ambient mode"
        );
        assert_eq!(mode, reversed.peer_authentication(workload, port));
        // The explanation agrees with the decision it explains.
        let explanation = index.explain(workload);
        let own = explanation.ports.iter().find(|p| p.port == port);
        assert_eq!(own.map_or(explanation.mtls, |p| p.mode), mode);
        serde_json::to_string(&explanation).expect("explanations serialise");
    }
});

/// The connections the demo makes: client to server over HBONE, a plaintext bystander, and
/// the same to another port and from another namespace.
fn canonical_requests() -> Vec<RequestInput> {
    let word = |s: &str| Word::Any(s.to_owned());
    let ip = |s: &str| IpInput::Any(s.parse().expect("valid"));
    let request =
        |namespace: &str, app: &str, port: i64, source: Option<(&str, &str)>, from: &str| {
            RequestInput {
                namespace: word(namespace),
                labels: vec![(word("app"), word(app))],
                destination: ip("10.244.1.11"),
                port: Scalar::Number(port),
                source: source.map(|(ns, sa)| (word("cluster.local"), word(ns), word(sa))),
                source_ip: ip(from),
            }
        };
    vec![
        request(
            "demo",
            "server",
            8080,
            Some(("demo", "client")),
            "10.244.0.10",
        ),
        request("demo", "server", 8080, None, "10.244.0.12"),
        request(
            "demo",
            "server",
            9090,
            Some(("other", "client")),
            "10.0.0.1",
        ),
        request(
            "istio-system",
            "server",
            15008,
            Some(("demo", "server")),
            "fd00::1",
        ),
    ]
}

/// A decision agrees with its reason.
fn check(decision: &Decision) {
    let (allowed, names_policy) = match decision.reason {
        Reason::DenyMatched => (false, true),
        Reason::NoAllowPolicy => (true, false),
        Reason::AllowMatched => (true, true),
        Reason::NoAllowMatched => (false, false),
    };
    assert_eq!(decision.allowed, allowed, "{decision:?}");
    assert_eq!(decision.policy.is_some(), names_policy, "{decision:?}");
}
