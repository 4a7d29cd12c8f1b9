//! Table-driven tests of policy compilation and evaluation.

use std::sync::Arc;

use serde_json::{Value, json};

use super::*;
use crate::workload::model::{Labels, ObjectKey, Policy, PolicyKind};

/// The namespace of the workload under test.
const NS: &str = "app";
/// The default source principal.
const CLIENT: &str = "cluster.local/ns/client/sa/web";

fn policy(kind: PolicyKind, namespace: &str, name: &str, spec: Value) -> Arc<Policy> {
    Arc::new(Policy {
        kind,
        key: ObjectKey::new(namespace, name),
        created: None,
        dry_run: None,
        spec,
    })
}

fn authz(namespace: &str, name: &str, spec: Value) -> Arc<Policy> {
    policy(PolicyKind::AuthorizationPolicy, namespace, name, spec)
}

fn peer(namespace: &str, name: &str, spec: Value) -> Arc<Policy> {
    policy(PolicyKind::PeerAuthentication, namespace, name, spec)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A connection to authorize.
#[derive(Debug, Clone, Copy)]
struct Conn {
    /// The source principal (no `spiffe://`), `None` for plaintext.
    src: Option<&'static str>,
    src_ip: &'static str,
    dst: &'static str,
}

/// mTLS from [`CLIENT`] at 10.1.0.5 to 10.2.0.7:8080.
const MTLS: Conn = Conn {
    src: Some(CLIENT),
    src_ip: "10.1.0.5",
    dst: "10.2.0.7:8080",
};

impl Conn {
    const fn from(self, principal: &'static str) -> Self {
        Self {
            src: Some(principal),
            ..self
        }
    }

    const fn plaintext(self) -> Self {
        Self { src: None, ..self }
    }

    const fn ip(self, src_ip: &'static str) -> Self {
        Self { src_ip, ..self }
    }

    const fn to(self, dst: &'static str) -> Self {
        Self { dst, ..self }
    }
}

const PLAIN: Conn = MTLS.plaintext();

fn decide_in(index: &Index, namespace: &str, labels: &Labels, conn: Conn) -> Decision {
    let identity = conn
        .src
        .map(|p| Identity::parse(&format!("spiffe://{p}")).unwrap());
    index.authorize(&Request {
        workload: Workload { namespace, labels },
        destination: conn.dst.parse().unwrap(),
        source: identity.as_ref(),
        source_ip: conn.src_ip.parse().unwrap(),
    })
}

/// Decides `conn` to the workload `app=server` in [`NS`].
fn decide(index: &Index, conn: Conn) -> Decision {
    decide_in(index, NS, &labels(&[("app", "server")]), conn)
}

fn build(policies: &[Arc<Policy>]) -> Index {
    Index::build(policies, DEFAULT_ROOT_NAMESPACE)
}

/// The one report of a single-policy index.
fn only_report(index: &Index) -> PolicyReport {
    let mut reports = index.report();
    assert_eq!(reports.len(), 1, "{reports:#?}");
    reports.remove(0)
}

/// Every supported field: each rule is put in an ALLOW policy (allowed iff it matches) and in
/// a DENY policy (denied iff it matches).
#[test]
fn rule_fields() {
    let principals = |p: &[&str]| json!({"from": [{"source": {"principals": p}}]});
    let source = |s: Value| json!({"from": [{"source": s}]});
    let when = |key: &str, values: &[&str], not_values: &[&str]| json!({"when": [{"key": key, "values": values, "notValues": not_values}]});
    let v6 = MTLS.ip("fd00::5");
    let cases: Vec<(&str, Value, Conn, bool)> = vec![
        ("empty rule matches all", json!({}), MTLS, true),
        ("empty rule matches plaintext", json!({}), PLAIN, true),
        (
            "empty from matches any source",
            json!({"from": []}),
            PLAIN,
            true,
        ),
        (
            "null from matches any source",
            json!({"from": null}),
            MTLS,
            true,
        ),
        ("from without source", json!({"from": [{}]}), MTLS, true),
        (
            "empty to and when",
            json!({"to": [], "when": []}),
            MTLS,
            true,
        ),
        // principals
        ("principal exact", principals(&[CLIENT]), MTLS, true),
        (
            "principal exact, other sa",
            principals(&["cluster.local/ns/client/sa/api"]),
            MTLS,
            false,
        ),
        (
            "principal exact, other trust domain",
            principals(&["example.org/ns/client/sa/web"]),
            MTLS,
            false,
        ),
        (
            "principal exact is not a prefix",
            principals(&["cluster.local/ns/client/sa/we"]),
            MTLS,
            false,
        ),
        (
            "principal with spiffe:// prefix",
            principals(&["spiffe://cluster.local/ns/client/sa/web"]),
            MTLS,
            true,
        ),
        (
            "principal among several",
            principals(&["a/ns/b/sa/c", CLIENT]),
            MTLS,
            true,
        ),
        ("principal *", principals(&["*"]), MTLS, true),
        (
            "principal * refuses plaintext",
            principals(&["*"]),
            PLAIN,
            false,
        ),
        (
            "principal exact refuses plaintext",
            principals(&[CLIENT]),
            PLAIN,
            false,
        ),
        ("principal *suffix", principals(&["*/sa/web"]), MTLS, true),
        (
            "principal *suffix, no match",
            principals(&["*/sa/api"]),
            MTLS,
            false,
        ),
        (
            "principal prefix*",
            principals(&["cluster.local/ns/client/*"]),
            MTLS,
            true,
        ),
        (
            "principal prefix*, no match",
            principals(&["cluster.local/ns/other/*"]),
            MTLS,
            false,
        ),
        (
            "notPrincipals excludes",
            source(json!({"notPrincipals": [CLIENT]})),
            MTLS,
            false,
        ),
        (
            "notPrincipals of another",
            source(json!({"notPrincipals": ["cluster.local/ns/x/sa/y"]})),
            MTLS,
            true,
        ),
        (
            "notPrincipals wildcard",
            source(json!({"notPrincipals": ["*/sa/web"]})),
            MTLS,
            false,
        ),
        (
            "notPrincipals matches plaintext",
            source(json!({"notPrincipals": [CLIENT]})),
            PLAIN,
            true,
        ),
        (
            "notPrincipals * is plaintext only",
            source(json!({"notPrincipals": ["*"]})),
            PLAIN,
            true,
        ),
        (
            "notPrincipals * refuses mTLS",
            source(json!({"notPrincipals": ["*"]})),
            MTLS,
            false,
        ),
        (
            "principals and notPrincipals",
            source(json!({"principals": ["cluster.local/*"], "notPrincipals": [CLIENT]})),
            MTLS,
            false,
        ),
        // namespaces
        (
            "namespace exact",
            source(json!({"namespaces": ["client"]})),
            MTLS,
            true,
        ),
        (
            "namespace other",
            source(json!({"namespaces": ["other"]})),
            MTLS,
            false,
        ),
        (
            "namespace *",
            source(json!({"namespaces": ["*"]})),
            MTLS,
            true,
        ),
        (
            "namespace prefix*",
            source(json!({"namespaces": ["cli*"]})),
            MTLS,
            true,
        ),
        (
            "namespace *suffix",
            source(json!({"namespaces": ["*ent"]})),
            MTLS,
            true,
        ),
        (
            "namespace *suffix, no match",
            source(json!({"namespaces": ["*xyz"]})),
            MTLS,
            false,
        ),
        (
            "namespace refuses plaintext",
            source(json!({"namespaces": ["*"]})),
            PLAIN,
            false,
        ),
        (
            "notNamespaces excludes",
            source(json!({"notNamespaces": ["client"]})),
            MTLS,
            false,
        ),
        (
            "notNamespaces of another",
            source(json!({"notNamespaces": ["other"]})),
            MTLS,
            true,
        ),
        (
            "notNamespaces wildcard",
            source(json!({"notNamespaces": ["c*"]})),
            MTLS,
            false,
        ),
        (
            "notNamespaces matches plaintext",
            source(json!({"notNamespaces": ["client"]})),
            PLAIN,
            true,
        ),
        // ipBlocks
        (
            "ipBlocks CIDR",
            source(json!({"ipBlocks": ["10.1.0.0/16"]})),
            MTLS,
            true,
        ),
        (
            "ipBlocks bare IP",
            source(json!({"ipBlocks": ["10.1.0.5"]})),
            MTLS,
            true,
        ),
        (
            "ipBlocks other IP",
            source(json!({"ipBlocks": ["10.1.0.6"]})),
            MTLS,
            false,
        ),
        (
            "ipBlocks other CIDR",
            source(json!({"ipBlocks": ["10.9.0.0/16"]})),
            MTLS,
            false,
        ),
        (
            "ipBlocks CIDR with host bits",
            source(json!({"ipBlocks": ["10.1.2.3/16"]})),
            MTLS,
            true,
        ),
        (
            "ipBlocks for plaintext",
            source(json!({"ipBlocks": ["10.1.0.0/16"]})),
            PLAIN,
            true,
        ),
        (
            "notIpBlocks excludes",
            source(json!({"notIpBlocks": ["10.1.0.0/16"]})),
            MTLS,
            false,
        ),
        (
            "notIpBlocks other",
            source(json!({"notIpBlocks": ["10.9.0.0/16"]})),
            MTLS,
            true,
        ),
        (
            "ipBlocks IPv6 CIDR",
            source(json!({"ipBlocks": ["fd00::/64"]})),
            v6,
            true,
        ),
        (
            "ipBlocks IPv6 bare",
            source(json!({"ipBlocks": ["fd00::5"]})),
            v6,
            true,
        ),
        (
            "ipBlocks IPv6 other",
            source(json!({"ipBlocks": ["fd01::/64"]})),
            v6,
            false,
        ),
        (
            "ipBlocks IPv4 vs IPv6 source",
            source(json!({"ipBlocks": ["10.0.0.0/8"]})),
            v6,
            false,
        ),
        (
            "notIpBlocks IPv6",
            source(json!({"notIpBlocks": ["fd00::/64"]})),
            v6,
            false,
        ),
        (
            "ipBlocks IPv4 for an IPv4-mapped source",
            source(json!({"ipBlocks": ["10.1.0.0/16"]})),
            MTLS.ip("::ffff:10.1.0.5"),
            true,
        ),
        // combinations
        (
            "all fields of a source must match",
            source(json!({"principals": [CLIENT], "ipBlocks": ["10.9.0.0/16"]})),
            MTLS,
            false,
        ),
        (
            "any from entry",
            json!({"from": [
                {"source": {"principals": ["a/ns/b/sa/c"]}},
                {"source": {"namespaces": ["client"]}},
            ]}),
            MTLS,
            true,
        ),
        // ports
        (
            "ports",
            json!({"to": [{"operation": {"ports": ["8080"]}}]}),
            MTLS,
            true,
        ),
        (
            "ports other",
            json!({"to": [{"operation": {"ports": ["9090"]}}]}),
            MTLS,
            false,
        ),
        (
            "ports as numbers",
            json!({"to": [{"operation": {"ports": [8080]}}]}),
            MTLS,
            true,
        ),
        (
            "notPorts",
            json!({"to": [{"operation": {"notPorts": ["8080"]}}]}),
            MTLS,
            false,
        ),
        (
            "notPorts other",
            json!({"to": [{"operation": {"notPorts": ["9090"]}}]}),
            MTLS,
            true,
        ),
        ("to without operation", json!({"to": [{}]}), MTLS, true),
        (
            "any to entry",
            json!({"to": [{"operation": {"ports": ["1"]}}, {"operation": {"ports": ["8080"]}}]}),
            MTLS,
            true,
        ),
        (
            "from matches, to does not",
            json!({"from": [{"source": {"principals": [CLIENT]}}],
                   "to": [{"operation": {"ports": ["9090"]}}]}),
            MTLS,
            false,
        ),
        (
            "from and to match",
            json!({"from": [{"source": {"principals": [CLIENT]}}],
                   "to": [{"operation": {"ports": ["8080"]}}]}),
            MTLS,
            true,
        ),
        // when
        (
            "when source.ip",
            when("source.ip", &["10.1.0.0/16"], &[]),
            MTLS,
            true,
        ),
        (
            "when source.ip other",
            when("source.ip", &["10.9.0.5"], &[]),
            MTLS,
            false,
        ),
        (
            "when source.ip notValues",
            when("source.ip", &[], &["10.1.0.5"]),
            MTLS,
            false,
        ),
        (
            "when source.ip IPv6",
            when("source.ip", &["fd00::/8"], &[]),
            v6,
            true,
        ),
        (
            "when source.ip values and notValues",
            when("source.ip", &["10.1.0.0/16"], &["10.1.0.5"]),
            MTLS,
            false,
        ),
        (
            "when source.namespace",
            when("source.namespace", &["client"], &[]),
            MTLS,
            true,
        ),
        (
            "when source.namespace other",
            when("source.namespace", &["x"], &[]),
            MTLS,
            false,
        ),
        (
            "when source.namespace wildcard",
            when("source.namespace", &["cl*"], &[]),
            MTLS,
            true,
        ),
        (
            "when source.namespace notValues",
            when("source.namespace", &[], &["client"]),
            MTLS,
            false,
        ),
        (
            "when source.namespace plaintext",
            when("source.namespace", &["*"], &[]),
            PLAIN,
            false,
        ),
        (
            "when source.namespace notValues plaintext",
            when("source.namespace", &[], &["client"]),
            PLAIN,
            true,
        ),
        (
            "when source.principal",
            when("source.principal", &[CLIENT], &[]),
            MTLS,
            true,
        ),
        (
            "when source.principal *",
            when("source.principal", &["*"], &[]),
            MTLS,
            true,
        ),
        (
            "when source.principal other",
            when("source.principal", &["cluster.local/ns/client/sa/api"], &[]),
            MTLS,
            false,
        ),
        (
            "when source.principal notValues",
            when("source.principal", &[], &[CLIENT]),
            MTLS,
            false,
        ),
        (
            "when source.principal plaintext",
            when("source.principal", &["*"], &[]),
            PLAIN,
            false,
        ),
        (
            "when source.principal notValues plaintext",
            when("source.principal", &[], &["*"]),
            PLAIN,
            true,
        ),
        (
            "when destination.ip",
            when("destination.ip", &["10.2.0.7"], &[]),
            MTLS,
            true,
        ),
        (
            "when destination.ip other",
            when("destination.ip", &["10.2.0.8"], &[]),
            MTLS,
            false,
        ),
        (
            "when destination.ip notValues",
            when("destination.ip", &[], &["10.2.0.0/24"]),
            MTLS,
            false,
        ),
        (
            "when destination.ip IPv6",
            when("destination.ip", &["fd00:2::/64"], &[]),
            MTLS.to("[fd00:2::7]:8080"),
            true,
        ),
        (
            "when destination.port",
            when("destination.port", &["8080"], &[]),
            MTLS,
            true,
        ),
        (
            "when destination.port other",
            when("destination.port", &["80"], &[]),
            MTLS,
            false,
        ),
        (
            "when destination.port notValues",
            when("destination.port", &[], &["8080"]),
            MTLS,
            false,
        ),
        (
            "every condition must match",
            json!({"when": [
                {"key": "destination.port", "values": ["8080"]},
                {"key": "source.ip", "values": ["10.9.0.0/16"]},
            ]}),
            MTLS,
            false,
        ),
        (
            "from, to and when all match",
            json!({
                "from": [{"source": {"principals": [CLIENT], "ipBlocks": ["10.1.0.0/16"]}}],
                "to": [{"operation": {"ports": ["8080"]}}],
                "when": [{"key": "destination.ip", "values": ["10.2.0.7"]}],
            }),
            MTLS,
            true,
        ),
    ];
    for (name, rule, conn, matches) in cases {
        for action in ["ALLOW", "DENY"] {
            let index = build(&[authz(
                NS,
                "p",
                json!({"action": action, "rules": [rule.clone()]}),
            )]);
            let report = only_report(&index);
            assert!(report.errors.is_empty(), "{name}: {:?}", report.errors);
            assert!(
                report.unsupported.is_empty(),
                "{name}: {:?}",
                report.unsupported
            );
            let decision = decide(&index, conn);
            let (allowed, reason, by) = match (action, matches) {
                ("ALLOW", true) => (true, Reason::AllowMatched, true),
                ("ALLOW", false) => (false, Reason::NoAllowMatched, false),
                (_, true) => (false, Reason::DenyMatched, true),
                (_, false) => (true, Reason::NoAllowPolicy, false),
            };
            let want = Decision {
                allowed,
                policy: by.then(|| Arc::new(ObjectKey::new(NS, "p"))),
                reason,
            };
            assert_eq!(decision, want, "{name} ({action}): {rule}");
        }
    }
}

/// Evaluation order and scoping, over sets of policies.
#[test]
fn evaluation_order_and_scope() {
    let all = json!({"rules": [{}]});
    let deny_all = json!({"action": "DENY", "rules": [{}]});
    let port = |p: &str| json!({"rules": [{"to": [{"operation": {"ports": [p]}}]}]});
    let select = |app: &str, spec: Value| {
        let mut spec = spec;
        spec["selector"] = json!({"matchLabels": {"app": app}});
        spec
    };
    let server = labels(&[("app", "server"), ("version", "v1")]);
    type Case = (
        &'static str,
        Vec<Arc<Policy>>,
        (&'static str, Labels),
        bool,
        Reason,
        Option<&'static str>,
    );
    let here = || (NS, server.clone());
    let cases: Vec<Case> = vec![
        (
            "no policies",
            vec![],
            here(),
            true,
            Reason::NoAllowPolicy,
            None,
        ),
        (
            "ALLOW without rules denies all",
            vec![authz(NS, "a", json!({}))],
            here(),
            false,
            Reason::NoAllowMatched,
            None,
        ),
        (
            "ALLOW with empty rules denies all",
            vec![authz(NS, "a", json!({"action": "ALLOW", "rules": []}))],
            here(),
            false,
            Reason::NoAllowMatched,
            None,
        ),
        (
            "ALLOW without rules, another ALLOW matches",
            vec![authz(NS, "a", json!({})), authz(NS, "b", all.clone())],
            here(),
            true,
            Reason::AllowMatched,
            Some("app/b"),
        ),
        (
            "DENY without rules matches nothing",
            vec![authz(NS, "d", json!({"action": "DENY"}))],
            here(),
            true,
            Reason::NoAllowPolicy,
            None,
        ),
        (
            "DENY with empty rules matches nothing",
            vec![authz(NS, "d", json!({"action": "DENY", "rules": []}))],
            here(),
            true,
            Reason::NoAllowPolicy,
            None,
        ),
        (
            "DENY beats ALLOW",
            vec![
                authz(NS, "a", all.clone()),
                authz(NS, "d", deny_all.clone()),
            ],
            here(),
            false,
            Reason::DenyMatched,
            Some("app/d"),
        ),
        (
            "DENY not matching, no ALLOW",
            vec![authz(
                NS,
                "d",
                json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["1"]}}]}]}),
            )],
            here(),
            true,
            Reason::NoAllowPolicy,
            None,
        ),
        (
            "ALLOW present, not matching",
            vec![authz(NS, "a", port("9090"))],
            here(),
            false,
            Reason::NoAllowMatched,
            None,
        ),
        (
            "first ALLOW not matching, second matching",
            vec![authz(NS, "a", port("9090")), authz(NS, "b", port("8080"))],
            here(),
            true,
            Reason::AllowMatched,
            Some("app/b"),
        ),
        (
            "action defaults to ALLOW",
            vec![authz(NS, "a", port("9090"))],
            here(),
            false,
            Reason::NoAllowMatched,
            None,
        ),
        (
            "selector selects",
            vec![authz(NS, "a", select("server", port("9090")))],
            here(),
            false,
            Reason::NoAllowMatched,
            None,
        ),
        (
            "selector needs every label",
            vec![authz(
                NS,
                "a",
                json!({"selector": {"matchLabels": {"app": "server", "version": "v2"}}}),
            )],
            here(),
            true,
            Reason::NoAllowPolicy,
            None,
        ),
        (
            "selector with every label",
            vec![authz(
                NS,
                "a",
                json!({"selector": {"matchLabels": {"app": "server", "version": "v1"}}}),
            )],
            here(),
            false,
            Reason::NoAllowMatched,
            None,
        ),
        (
            "empty matchLabels selects all",
            vec![authz(NS, "a", json!({"selector": {"matchLabels": {}}}))],
            here(),
            false,
            Reason::NoAllowMatched,
            None,
        ),
        (
            "ALLOW for another workload only",
            vec![authz(NS, "a", select("other", json!({})))],
            here(),
            true,
            Reason::NoAllowPolicy,
            None,
        ),
        (
            "DENY for another workload",
            vec![authz(NS, "d", select("other", deny_all.clone()))],
            here(),
            true,
            Reason::NoAllowPolicy,
            None,
        ),
        (
            "policies of another namespace never apply",
            vec![
                authz("b", "a", json!({})),
                authz("b", "d", deny_all.clone()),
                authz("b", "s", select("server", deny_all.clone())),
            ],
            here(),
            true,
            Reason::NoAllowPolicy,
            None,
        ),
        (
            "namespace policies apply to their namespace",
            vec![authz("b", "d", deny_all.clone())],
            ("b", server.clone()),
            false,
            Reason::DenyMatched,
            Some("b/d"),
        ),
        (
            "root namespace DENY applies mesh-wide",
            vec![authz(DEFAULT_ROOT_NAMESPACE, "d", deny_all.clone())],
            here(),
            false,
            Reason::DenyMatched,
            Some("istio-system/d"),
        ),
        (
            "root namespace ALLOW applies mesh-wide",
            vec![authz(DEFAULT_ROOT_NAMESPACE, "a", port("9090"))],
            ("any", Labels::new()),
            false,
            Reason::NoAllowMatched,
            None,
        ),
        (
            "root namespace selector in every namespace",
            vec![authz(
                DEFAULT_ROOT_NAMESPACE,
                "d",
                select("server", deny_all.clone()),
            )],
            here(),
            false,
            Reason::DenyMatched,
            Some("istio-system/d"),
        ),
        (
            "root namespace selector not matching",
            vec![authz(
                DEFAULT_ROOT_NAMESPACE,
                "d",
                select("other", deny_all.clone()),
            )],
            here(),
            true,
            Reason::NoAllowPolicy,
            None,
        ),
        (
            "root namespace ALLOW and namespace ALLOW both count",
            vec![
                authz(DEFAULT_ROOT_NAMESPACE, "a", port("9090")),
                authz(NS, "b", port("8080")),
            ],
            here(),
            true,
            Reason::AllowMatched,
            Some("app/b"),
        ),
        (
            "root namespace workloads get root policies",
            vec![authz(DEFAULT_ROOT_NAMESPACE, "d", deny_all.clone())],
            (DEFAULT_ROOT_NAMESPACE, server.clone()),
            false,
            Reason::DenyMatched,
            Some("istio-system/d"),
        ),
        (
            "namespace DENY beats root ALLOW",
            vec![
                authz(DEFAULT_ROOT_NAMESPACE, "a", all.clone()),
                authz(NS, "d", deny_all.clone()),
            ],
            here(),
            false,
            Reason::DenyMatched,
            Some("app/d"),
        ),
        (
            "CUSTOM is ignored",
            vec![authz(
                NS,
                "c",
                json!({"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{}]}),
            )],
            here(),
            true,
            Reason::NoAllowPolicy,
            None,
        ),
        (
            "AUDIT is ignored",
            vec![authz(NS, "c", json!({"action": "AUDIT", "rules": [{}]}))],
            here(),
            true,
            Reason::NoAllowPolicy,
            None,
        ),
        (
            "targetRefs policies are ignored",
            vec![authz(
                NS,
                "w",
                json!({"targetRefs": [{"kind": "Service", "group": "", "name": "server"}]}),
            )],
            here(),
            true,
            Reason::NoAllowPolicy,
            None,
        ),
    ];
    for (name, policies, (namespace, workload), allowed, reason, by) in cases {
        let index = build(&policies);
        let decision = decide_in(&index, namespace, &workload, MTLS);
        assert_eq!(decision.allowed, allowed, "{name}: {decision}");
        assert_eq!(decision.reason, reason, "{name}: {decision}");
        assert_eq!(
            decision
                .policy
                .as_deref()
                .map(ToString::to_string)
                .as_deref(),
            by,
            "{name}: {decision}"
        );
    }
}

#[test]
fn root_namespace_is_configurable() {
    let deny_all = json!({"action": "DENY", "rules": [{}]});
    let policies = [authz("mesh-root", "d", deny_all.clone())];
    let index = Index::build(&policies, "mesh-root");
    assert_eq!(index.root_namespace(), "mesh-root");
    assert!(!decide(&index, MTLS).allowed);
    let index = Index::build(&[authz(DEFAULT_ROOT_NAMESPACE, "d", deny_all)], "mesh-root");
    assert!(decide(&index, MTLS).allowed, "istio-system is not the root");
    assert!(decide(&Index::default(), MTLS).allowed);
}

/// HTTP-only and unknown fields: an ALLOW rule with one matches nothing, a DENY rule ignores
/// it; each is recorded with its path.
#[test]
fn unsupported_fields() {
    let source = |field: &str| json!({"from": [{"source": {field: ["x"]}}]});
    let operation = |field: &str| json!({"to": [{"operation": {field: ["x"]}}]});
    let when = |key: &str| json!({"when": [{"key": key, "values": ["x"]}]});
    let cases: Vec<(Value, &str)> = vec![
        (
            source("requestPrincipals"),
            "rules[0].from[0].source.requestPrincipals",
        ),
        (
            source("notRequestPrincipals"),
            "rules[0].from[0].source.notRequestPrincipals",
        ),
        (
            source("remoteIpBlocks"),
            "rules[0].from[0].source.remoteIpBlocks",
        ),
        (
            source("notRemoteIpBlocks"),
            "rules[0].from[0].source.notRemoteIpBlocks",
        ),
        (
            source("unknownField"),
            "rules[0].from[0].source.unknownField",
        ),
        (operation("hosts"), "rules[0].to[0].operation.hosts"),
        (operation("notHosts"), "rules[0].to[0].operation.notHosts"),
        (operation("methods"), "rules[0].to[0].operation.methods"),
        (
            operation("notMethods"),
            "rules[0].to[0].operation.notMethods",
        ),
        (operation("paths"), "rules[0].to[0].operation.paths"),
        (operation("notPaths"), "rules[0].to[0].operation.notPaths"),
        (when("request.headers[x-user]"), "rules[0].when[0]"),
        (when("request.auth.claims[iss]"), "rules[0].when[0]"),
        (when("remote.ip"), "rules[0].when[0]"),
        (when("connection.sni"), "rules[0].when[0]"),
        (when("source.serviceAccount"), "rules[0].when[0]"),
        (json!({"form": [{"source": {}}]}), "rules[0].form"),
        (
            json!({"from": [{"src": {"x": 1}, "source": {}}]}),
            "rules[0].from[0].src",
        ),
        (
            json!({"when": [{"key": "source.ip", "values": ["10.0.0.0/8"], "vals": ["x"]}]}),
            "rules[0].when[0].vals",
        ),
    ];
    for (rule, path) in cases {
        // ALLOW: the rule matches nothing, even for a source the rest of it would allow.
        let index = build(&[authz(NS, "a", json!({"rules": [rule.clone()]}))]);
        let report = only_report(&index);
        let paths: Vec<&str> = report.unsupported.iter().map(|u| u.path.as_str()).collect();
        assert_eq!(paths, [path], "{rule}");
        assert!(
            report.unsupported[0].reason.contains("matches nothing"),
            "{report:?}"
        );
        assert!(report.errors.is_empty(), "{rule}: {:?}", report.errors);
        assert_eq!(index.unsupported_fields(), 1);
        let decision = decide(&index, MTLS);
        assert_eq!(decision.reason, Reason::NoAllowMatched, "{rule}");

        // DENY: the field is ignored, leaving an empty (match-all) rule.
        let index = build(&[authz(
            NS,
            "d",
            json!({"action": "DENY", "rules": [rule.clone()]}),
        )]);
        let report = only_report(&index);
        assert_eq!(report.unsupported.len(), 1, "{rule}");
        assert_eq!(report.unsupported[0].path, path);
        assert!(
            report.unsupported[0].reason.contains("ignored"),
            "{report:?}"
        );
        assert_eq!(decide(&index, MTLS).reason, Reason::DenyMatched, "{rule}");
    }

    // Unset HTTP fields are not unsupported.
    let index = build(&[authz(
        NS,
        "a",
        json!({"rules": [{"to": [{"operation": {"methods": [], "paths": null, "ports": ["8080"]}}]}]}),
    )]);
    assert!(only_report(&index).unsupported.is_empty());
    assert!(decide(&index, MTLS).allowed);
}

#[test]
fn unsupported_fields_only_affect_their_rule() {
    // ALLOW: the rule with methods is dropped, the other still allows.
    let index = build(&[authz(
        NS,
        "a",
        json!({"rules": [
            {"to": [{"operation": {"methods": ["GET"]}}]},
            {"from": [{"source": {"principals": [CLIENT]}}]},
        ]}),
    )]);
    let report = only_report(&index);
    assert_eq!(report.rules, 2);
    assert!(report.effect.contains("1 of 2 rules"), "{}", report.effect);
    assert!(decide(&index, MTLS).allowed);
    assert!(!decide(&index, MTLS.from("cluster.local/ns/x/sa/y")).allowed);

    // DENY: methods ignored, ports still apply.
    let index = build(&[authz(
        NS,
        "d",
        json!({"action": "DENY", "rules": [
            {"to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}]},
        ]}),
    )]);
    assert!(!decide(&index, MTLS).allowed);
    assert!(decide(&index, MTLS.to("10.2.0.7:9090")).allowed);

    // DENY: an unsupported source field alone leaves a source that matches anyone.
    let index = build(&[authz(
        NS,
        "d",
        json!({"action": "DENY", "rules": [
            {"from": [{"source": {"requestPrincipals": ["*"]}}], "to": [{"operation": {"ports": ["8080"]}}]},
        ]}),
    )]);
    assert!(!decide(&index, PLAIN).allowed);
    assert!(decide(&index, PLAIN.to("10.2.0.7:9090")).allowed);

    // Top-level unknown fields are recorded and change nothing.
    let index = build(&[authz(
        NS,
        "a",
        json!({"rules": [{}], "provider": {"name": "x"}, "extra": 1}),
    )]);
    let paths: Vec<String> = only_report(&index)
        .unsupported
        .into_iter()
        .map(|u| u.path)
        .collect();
    assert_eq!(paths, ["extra", "provider"]);
    assert!(decide(&index, MTLS).allowed);

    // AUDIT and CUSTOM are recorded.
    for action in ["AUDIT", "CUSTOM"] {
        let index = build(&[authz(NS, "c", json!({"action": action, "rules": [{}]}))]);
        let report = only_report(&index);
        assert_eq!(report.unsupported[0].path, "action");
        assert!(report.effect.starts_with("ignored"), "{}", report.effect);
    }
}

/// Invalid specs are reported with a path and fail closed.
#[test]
fn invalid_policies() {
    type Check = fn(&Error) -> bool;
    let cases: Vec<(&str, Value, Check, &str, bool)> = vec![
        (
            "rules is not a list (ALLOW)",
            json!({"rules": "x"}),
            |e| matches!(e, Error::Spec { path, .. } if path == "rules"),
            "spec.rules: invalid type",
            false,
        ),
        (
            "from of the wrong type",
            json!({"rules": [{"from": {"source": {}}}]}),
            |e| matches!(e, Error::Spec { path, .. } if path == "rules[0].from"),
            "spec.rules[0].from",
            false,
        ),
        (
            "principals of the wrong type",
            json!({"rules": [{"from": [{"source": {"principals": CLIENT}}]}]}),
            |e| matches!(e, Error::Spec { path, .. } if path == "rules[0].from[0].source.principals"),
            "expected a sequence",
            false,
        ),
        (
            "bad IP block",
            json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8", "10.0.0.300"]}}]}]}),
            |e| matches!(e, Error::IpBlock { path, value } if path == "rules[0].from[0].source.ipBlocks[1]" && value == "10.0.0.300"),
            "is not an IP address or CIDR",
            false,
        ),
        (
            "bad notIpBlocks prefix length",
            json!({"rules": [{"from": [{"source": {"notIpBlocks": ["10.0.0.0/33"]}}]}]}),
            |e| matches!(e, Error::IpBlock { .. }),
            "notIpBlocks[0]",
            false,
        ),
        (
            "port name",
            json!({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
            |e| matches!(e, Error::Port { path, .. } if path == "rules[0].to[0].operation.ports[0]"),
            "from 1 to 65535",
            false,
        ),
        (
            "port 0",
            json!({"rules": [{"to": [{"operation": {"notPorts": ["0"]}}]}]}),
            |e| matches!(e, Error::Port { .. }),
            "\"0\"",
            false,
        ),
        (
            "port too big",
            json!({"rules": [{"when": [{"key": "destination.port", "values": ["70000"]}]}]}),
            |e| matches!(e, Error::Port { path, .. } if path == "rules[0].when[0].values[0]"),
            "\"70000\"",
            false,
        ),
        (
            "condition without values",
            json!({"rules": [{"when": [{"key": "source.ip"}]}]}),
            |e| matches!(e, Error::EmptyCondition { key, .. } if key == "source.ip"),
            "neither values nor notValues",
            false,
        ),
        (
            "condition without key",
            json!({"rules": [{"when": [{"values": ["x"]}]}]}),
            |e| matches!(e, Error::Spec { .. }),
            "missing field `key`",
            false,
        ),
        (
            "bad condition IP",
            json!({"rules": [{"when": [{"key": "destination.ip", "notValues": ["x"]}]}]}),
            |e| matches!(e, Error::IpBlock { path, .. } if path == "rules[0].when[0].notValues[0]"),
            "\"x\"",
            false,
        ),
        (
            "selector of the wrong type",
            json!({"selector": "app=server", "rules": [{}]}),
            |e| matches!(e, Error::Spec { path, .. } if path == "selector"),
            "spec.selector",
            false,
        ),
        (
            "selector with matchExpressions",
            json!({"selector": {"matchExpressions": [{"key": "app"}]}, "rules": [{}]}),
            |e| matches!(e, Error::Selector { path } if path == "selector.matchExpressions"),
            "only have matchLabels",
            false,
        ),
        (
            "unknown action",
            json!({"action": "PERMIT", "rules": [{}]}),
            |e| matches!(e, Error::UnknownAction { value } if value == "PERMIT"),
            "use ALLOW or DENY",
            false,
        ),
        (
            "action of the wrong type",
            json!({"action": 1, "rules": [{}]}),
            |e| matches!(e, Error::Spec { path, .. } if path == "action"),
            "spec.action",
            false,
        ),
    ];
    for (name, spec, check, message, allowed) in cases {
        let index = build(&[authz(NS, "bad", spec.clone())]);
        let report = only_report(&index);
        assert_eq!(report.errors.len(), 1, "{name}: {:?}", report.errors);
        assert!(check(&report.errors[0]), "{name}: {:?}", report.errors[0]);
        let text = report.errors[0].to_string();
        assert!(text.contains(message), "{name}: {text}");
        assert!(
            report.effect.starts_with("invalid"),
            "{name}: {}",
            report.effect
        );
        assert_eq!(index.invalid_policies(), 1);
        let decision = decide(&index, MTLS);
        assert_eq!(decision.allowed, allowed, "{name}: {decision}");
    }
}

#[test]
fn invalid_policies_fail_closed() {
    let bad_allow = authz(NS, "bad-allow", json!({"rules": "x"}));
    let bad_deny = authz(NS, "bad-deny", json!({"action": "DENY", "rules": "x"}));
    let bad_action = authz(NS, "bad-action", json!({"action": ["x"]}));
    let allow_all = authz(NS, "allow", json!({"rules": [{}]}));
    let other = labels(&[("app", "other")]);

    // An invalid ALLOW matches nothing: alone it denies, next to a matching ALLOW it is moot.
    let index = build(std::slice::from_ref(&bad_allow));
    assert_eq!(decide(&index, MTLS).reason, Reason::NoAllowMatched);
    assert_eq!(only_report(&index).action, Some(Action::Allow));
    let index = build(&[bad_allow, allow_all.clone()]);
    assert_eq!(decide(&index, MTLS).reason, Reason::AllowMatched);

    // An invalid DENY, or an unreadable action, denies everything it selects.
    for bad in [bad_deny, bad_action] {
        let index = build(&[bad.clone(), allow_all.clone()]);
        let decision = decide(&index, MTLS);
        assert_eq!(decision.reason, Reason::DenyMatched, "{}", bad.key);
        assert_eq!(decision.policy.as_deref(), Some(&bad.key));
        assert!(!decide(&index, PLAIN).allowed);
    }

    // The selector of an invalid policy still scopes it when it can be read ...
    let index = build(&[authz(
        NS,
        "d",
        json!({"action": "DENY", "selector": {"matchLabels": {"app": "server"}}, "rules": 1}),
    )]);
    assert!(!decide(&index, MTLS).allowed);
    assert!(decide_in(&index, NS, &other, MTLS).allowed);
    assert!(decide_in(&index, "b", &labels(&[("app", "server")]), MTLS).allowed);
    // ... and an unreadable one selects everything in scope.
    let index = build(&[authz(NS, "d", json!({"action": "DENY", "selector": 1}))]);
    assert!(!decide_in(&index, NS, &other, MTLS).allowed);
    assert!(decide_in(&index, "b", &other, MTLS).allowed);
    // An invalid CUSTOM policy stays ignored.
    let index = build(&[authz(NS, "c", json!({"action": "CUSTOM", "rules": "x"}))]);
    assert!(decide(&index, MTLS).allowed);
}

/// A PeerAuthentication created `minute` minutes into the day (Istio breaks ties by age).
fn peer_at(namespace: &str, name: &str, minute: i64, spec: Value) -> Arc<Policy> {
    created_at(peer(namespace, name, spec), minute)
}

/// An AuthorizationPolicy created `minute` minutes into the day.
fn authz_at(namespace: &str, name: &str, minute: i64, spec: Value) -> Arc<Policy> {
    created_at(authz(namespace, name, spec), minute)
}

fn created_at(policy: Arc<Policy>, minute: i64) -> Arc<Policy> {
    let mut policy = Arc::unwrap_or_clone(policy);
    policy.created = Some(
        k8s_openapi::jiff::Timestamp::from_second(1_764_547_200 + minute * 60).expect("a time"),
    );
    Arc::new(policy)
}

/// A dry-run AuthorizationPolicy (`istio.io/dry-run: "true"`).
fn dry_run(namespace: &str, name: &str, spec: Value) -> Arc<Policy> {
    annotated(authz(namespace, name, spec), "true")
}

/// `policy` with the `istio.io/dry-run` annotation set to `value`.
fn annotated(policy: Arc<Policy>, value: &str) -> Arc<Policy> {
    let mut policy = Arc::unwrap_or_clone(policy);
    policy.dry_run = Some(value.to_owned());
    Arc::new(policy)
}

/// `mtls.mode`, with `selector` when it is given.
fn mode_spec(mode: &str, selector: Option<Value>) -> Value {
    let mut spec = json!({"mtls": {"mode": mode}});
    if let Some(selector) = selector {
        spec["selector"] = selector;
    }
    spec
}

fn app(name: &str) -> Option<Value> {
    Some(json!({"matchLabels": {"app": name}}))
}

/// Each case quotes the sentence of Istio's documentation it checks (security concepts,
/// <https://istio.io/latest/docs/concepts/security/#authentication-policies>, unless it names
/// another page), then the policies, the port, and the mode of `app=server` in namespace `app`.
#[test]
fn peer_authentication_follows_istio() {
    let root = DEFAULT_ROOT_NAMESPACE;
    let strict = |selector| mode_spec("STRICT", selector);
    let permissive = |selector| mode_spec("PERMISSIVE", selector);
    type Case = (&'static str, Vec<Arc<Policy>>, u16, MtlsMode);
    let cases: Vec<Case> = vec![
        (
            "Mesh-wide peer authentication policies with an unset mode use the PERMISSIVE mode \
             by default.",
            vec![peer(root, "m", json!({}))],
            8080,
            MtlsMode::Permissive,
        ),
        (
            "Mesh-wide policy: A policy specified for the root namespace without or with an \
             empty `selector` field. (without)",
            vec![peer(root, "m", strict(None))],
            8080,
            MtlsMode::Strict,
        ),
        (
            "Mesh-wide policy: A policy specified for the root namespace without or with an \
             empty `selector` field. (empty)",
            vec![peer(root, "m", strict(Some(json!({}))))],
            8080,
            MtlsMode::Strict,
        ),
        (
            "Mesh-wide policy: ... with an empty `selector` field. (empty matchLabels)",
            vec![peer(root, "m", strict(Some(json!({"matchLabels": {}}))))],
            8080,
            MtlsMode::Strict,
        ),
        (
            "Namespace-wide policy: A policy specified for a non-root namespace without or with \
             an empty `selector` field.",
            vec![peer(NS, "n", strict(Some(json!({}))))],
            8080,
            MtlsMode::Strict,
        ),
        (
            "Namespace-wide policy ... They only apply to workloads within their namespace.",
            vec![peer("other", "n", strict(None))],
            8080,
            MtlsMode::Permissive,
        ),
        (
            "Istio applies the narrowest matching policy for each workload: namespace-wide \
             before mesh-wide.",
            vec![
                peer(root, "m", strict(None)),
                peer(NS, "n", permissive(None)),
            ],
            8080,
            MtlsMode::Permissive,
        ),
        (
            "Istio applies the narrowest matching policy for each workload: workload-specific \
             before namespace-wide (the namespace's written with an empty selector).",
            vec![
                peer(NS, "n", strict(Some(json!({})))),
                peer(NS, "w", permissive(app("server"))),
            ],
            8080,
            MtlsMode::Permissive,
        ),
        (
            "Workload-specific policy: a policy defined in the regular namespace, with non-empty \
             selector field. (another workload's)",
            vec![
                peer(NS, "n", strict(None)),
                peer(NS, "w", permissive(app("other"))),
            ],
            8080,
            MtlsMode::Strict,
        ),
        (
            "Workload-specific policy: a policy defined in the regular namespace, with non-empty \
             selector field. (a selector in the root namespace is neither)",
            vec![peer(root, "w", strict(app("server")))],
            8080,
            MtlsMode::Permissive,
        ),
        (
            "When the mode is unset, the mode of the parent scope is inherited. (namespace)",
            vec![peer(root, "m", strict(None)), peer(NS, "n", json!({}))],
            8080,
            MtlsMode::Strict,
        ),
        (
            "When the mode is unset, the mode of the parent scope is inherited. (workload, \
             namespace, mesh)",
            vec![
                peer(root, "m", strict(None)),
                peer(NS, "n", mode_spec("UNSET", None)),
                peer(
                    NS,
                    "w",
                    json!({"selector": {"matchLabels": {"app": "server"}}}),
                ),
            ],
            8080,
            MtlsMode::Strict,
        ),
        (
            "When you configure multiple mesh- or namespace-wide peer authentication policies \
             for the same mesh or namespace, Istio ignores the newer policies. (namespace)",
            vec![
                peer_at(NS, "a-newer", 2, permissive(None)),
                peer_at(NS, "b-older", 1, strict(None)),
            ],
            8080,
            MtlsMode::Strict,
        ),
        (
            "... Istio ignores the newer policies. (mesh)",
            vec![
                peer_at(root, "a-newer", 2, strict(None)),
                peer_at(root, "b-older", 1, permissive(None)),
            ],
            8080,
            MtlsMode::Permissive,
        ),
        (
            "... Istio ignores the newer policies. (as old: the first by name)",
            vec![
                peer_at(NS, "b", 1, strict(None)),
                peer_at(NS, "a", 1, permissive(None)),
            ],
            8080,
            MtlsMode::Permissive,
        ),
        (
            "When more than one workload-specific peer authentication policy matches, Istio \
             picks the oldest one.",
            vec![
                peer_at(NS, "a-newer", 2, permissive(app("server"))),
                peer_at(NS, "b-older", 1, strict(app("server"))),
            ],
            8080,
            MtlsMode::Strict,
        ),
        (
            "With workload-specific peer authentication policies, you can specify different \
             mutual TLS modes for different ports.",
            vec![peer(
                NS,
                "w",
                json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "PERMISSIVE"},
                       "portLevelMtls": {"8080": {"mode": "STRICT"}}}),
            )],
            8080,
            MtlsMode::Strict,
        ),
        (
            "... different mutual TLS modes for different ports (another port keeps the \
             workload's).",
            vec![peer(
                NS,
                "w",
                json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "PERMISSIVE"},
                       "portLevelMtls": {"8080": {"mode": "STRICT"}}}),
            )],
            9090,
            MtlsMode::Permissive,
        ),
        (
            "... uses the mutual TLS settings of the namespace-wide peer authentication policy \
             for all other ports.",
            vec![
                peer(NS, "n", strict(None)),
                peer(
                    NS,
                    "w",
                    json!({"selector": {"matchLabels": {"app": "server"}},
                           "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}),
                ),
            ],
            9090,
            MtlsMode::Strict,
        ),
        (
            "portLevelMtls: a policy without a selector has none (the field is ignored).",
            vec![peer(
                NS,
                "n",
                json!({"mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"8080": {"mode": "STRICT"}}}),
            )],
            8080,
            MtlsMode::Permissive,
        ),
        (
            "In ambient mode ... `DISABLE` mode is not supported. (PeerAuthentication reference: \
             the policy takes no part; the mesh's STRICT stands)",
            vec![
                peer(root, "m", strict(None)),
                peer(NS, "n", mode_spec("DISABLE", None)),
            ],
            8080,
            MtlsMode::Strict,
        ),
        (
            "In ambient mode ... `DISABLE` mode is not supported. (a DISABLE workload policy \
             does not shadow an older... newer one)",
            vec![
                peer_at(NS, "a", 1, mode_spec("DISABLE", app("server"))),
                peer_at(NS, "b", 2, permissive(app("server"))),
                peer(NS, "n", strict(None)),
            ],
            8080,
            MtlsMode::Permissive,
        ),
        (
            "In ambient mode ... `DISABLE` mode is not supported. (a DISABLE port takes the \
             policy's mode)",
            vec![
                peer(NS, "n", strict(None)),
                peer(
                    NS,
                    "w",
                    json!({"selector": {"matchLabels": {"app": "server"}},
                           "portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
                ),
            ],
            8080,
            MtlsMode::Strict,
        ),
        (
            "meshlet: an invalid mode fails closed (STRICT).",
            vec![peer(NS, "n", mode_spec("STRONG", None))],
            8080,
            MtlsMode::Strict,
        ),
        (
            "meshlet: an unreadable spec fails closed (STRICT).",
            vec![
                peer(root, "m", permissive(None)),
                peer(NS, "n", json!({"mtls": "STRICT"})),
            ],
            8080,
            MtlsMode::Strict,
        ),
        (
            "meshlet: a bad port key fails closed (STRICT), DISABLE or not.",
            vec![peer(
                NS,
                "w",
                json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "DISABLE"},
                       "portLevelMtls": {"http": {"mode": "DISABLE"}}}),
            )],
            9090,
            MtlsMode::Strict,
        ),
    ];
    let server = labels(&[("app", "server")]);
    for (istio, policies, port, want) in cases {
        let index = build(&policies);
        let workload = Workload {
            namespace: NS,
            labels: &server,
        };
        assert_eq!(index.peer_authentication(workload, port), want, "{istio}");
    }

    // A workload of the root namespace gets the mesh-wide policy; a selector there applies to
    // nothing, not even the root namespace's own workloads.
    let index = build(&[
        peer(root, "m", permissive(None)),
        peer(root, "w", strict(app("server"))),
    ]);
    let in_root = Workload {
        namespace: root,
        labels: &server,
    };
    assert_eq!(index.peer_authentication(in_root, 1), MtlsMode::Permissive);
}

#[test]
fn peer_authentication_reports_say_which_policy_wins_and_what_is_ignored() {
    let root = DEFAULT_ROOT_NAMESPACE;
    let index = build(&[
        peer_at(NS, "a-newer", 2, mode_spec("PERMISSIVE", None)),
        peer_at(NS, "b-older", 1, mode_spec("STRICT", None)),
        peer(NS, "off", mode_spec("DISABLE", None)),
        peer(root, "w", mode_spec("STRICT", app("server"))),
        peer(
            NS,
            "ports",
            json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "STRICT"},
                   "portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
        ),
    ]);
    let effect = |name: &str| {
        let report = index
            .report()
            .into_iter()
            .find(|r| r.key.name == name)
            .expect("reported");
        (report.effect, report.unsupported)
    };
    // Oldest first: the older applies, the newer is shadowed by it.
    assert_eq!(effect("b-older").0, "enforced");
    assert!(
        effect("a-newer")
            .0
            .starts_with("shadowed: app/b-older is older"),
        "{:?}",
        effect("a-newer")
    );
    assert!(
        effect("off")
            .0
            .starts_with("ignored: DISABLE is not supported in ambient mode"),
        "{:?}",
        effect("off")
    );
    assert!(
        effect("w")
            .0
            .starts_with("ignored: a PeerAuthentication with a selector in the root namespace"),
        "{:?}",
        effect("w")
    );
    let (effect_ports, unsupported) = effect("ports");
    assert_eq!(effect_ports, "enforced");
    assert_eq!(unsupported[0].path, "portLevelMtls.8080.mode");
    let flat = build(&[peer(
        NS,
        "flat",
        json!({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}),
    )]);
    assert_eq!(only_report(&flat).unsupported[0].path, "portLevelMtls");
    // The reports come in (kind, namespace, age, name) order: no time counts as the oldest.
    let names: Vec<String> = index.report().iter().map(|r| r.key.name.clone()).collect();
    assert_eq!(names, ["off", "ports", "b-older", "a-newer", "w"]);
    let invalid = build(&[peer(NS, "n", mode_spec("STRONG", None))]);
    let report = only_report(&invalid);
    assert!(
        matches!(&report.errors[..], [Error::UnknownMode { path, value }] if path == "mtls.mode" && value == "STRONG"),
        "{report:?}"
    );
}

/// Each case quotes Istio's authorization documentation
/// (<https://istio.io/latest/docs/concepts/security/#policy-target>).
#[test]
fn authorization_policy_scope_follows_istio() {
    let root = DEFAULT_ROOT_NAMESPACE;
    let deny_all = |selector: Option<Value>| {
        let mut spec = json!({"action": "DENY", "rules": [{}]});
        if let Some(selector) = selector {
            spec["selector"] = selector;
        }
        spec
    };
    type Case = (&'static str, Vec<Arc<Policy>>, &'static str, bool);
    let cases: Vec<Case> = vec![
        (
            "If not set, the authorization policy applies to all workloads in the same namespace \
             as the authorization policy.",
            vec![authz(NS, "p", deny_all(None))],
            NS,
            false,
        ),
        (
            "If not set ... (an empty selector is not set either)",
            vec![authz(NS, "p", deny_all(Some(json!({}))))],
            NS,
            false,
        ),
        (
            "If not set ... (nor is an empty matchLabels)",
            vec![authz(NS, "p", deny_all(Some(json!({"matchLabels": {}}))))],
            NS,
            false,
        ),
        (
            "If set to any other namespace, the policy only applies to the specified namespace.",
            vec![authz(NS, "p", deny_all(Some(json!({}))))],
            "other",
            true,
        ),
        (
            "If set its value to the root namespace, the policy applies to all namespaces in a \
             mesh. (empty selector)",
            vec![authz(root, "p", deny_all(Some(json!({}))))],
            "other",
            false,
        ),
        (
            "If set its value to the root namespace ... (its selector picks workloads in every \
             namespace)",
            vec![authz(root, "p", deny_all(app("server")))],
            "other",
            false,
        ),
        (
            "The selector ... uses labels to select the target workload.",
            vec![authz(root, "p", deny_all(app("client")))],
            "other",
            true,
        ),
    ];
    let server = labels(&[("app", "server")]);
    let source_ip = "10.0.0.1".parse().unwrap();
    for (istio, policies, namespace, allowed) in cases {
        let index = build(&policies);
        let request = Request {
            workload: Workload {
                namespace,
                labels: &server,
            },
            destination: "10.0.0.2:8080".parse().unwrap(),
            source: None,
            source_ip,
        };
        assert_eq!(index.authorize(&request).allowed, allowed, "{istio}");
    }
    // The policy named by a decision is the oldest that matches.
    let index = build(&[
        authz_at(NS, "a-newer", 2, deny_all(None)),
        authz_at(NS, "b-older", 1, deny_all(None)),
    ]);
    let request = Request {
        workload: Workload {
            namespace: NS,
            labels: &server,
        },
        destination: "10.0.0.2:8080".parse().unwrap(),
        source: None,
        source_ip,
    };
    assert_eq!(
        index
            .authorize(&request)
            .policy
            .as_deref()
            .map(|k| k.name.as_str()),
        Some("b-older")
    );
}

/// "The dry-run annotation allows you to better understand the effect of an authorization
/// policy before applying it to the production traffic."
/// (<https://istio.io/latest/docs/tasks/security/authorization/authz-dry-run/>)
#[test]
fn dry_run_policies_are_evaluated_and_never_enforced() {
    let server = labels(&[("app", "server")]);
    let request = |port: u16| Request {
        workload: Workload {
            namespace: NS,
            labels: &server,
        },
        destination: format!("10.0.0.2:{port}").parse().unwrap(),
        source: None,
        source_ip: "10.0.0.1".parse().unwrap(),
    };
    let index = build(&[
        dry_run(
            NS,
            "deny-8080",
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}),
        ),
        dry_run(
            NS,
            "allow-9090",
            json!({"rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]}),
        ),
        dry_run(
            NS,
            "for-another",
            json!({"selector": {"matchLabels": {"app": "other"}}, "action": "DENY", "rules": [{}]}),
        ),
    ]);
    let would = |port: u16| {
        let mut seen = Vec::new();
        index.dry_run(&request(port), |policy, allow| {
            seen.push((policy.name.clone(), allow));
        });
        seen.sort();
        seen
    };
    // Never enforced: no ALLOW policy is in force, so everything is allowed...
    for port in [8080, 9090] {
        let decision = index.authorize(&request(port));
        assert_eq!(
            (decision.allowed, decision.reason),
            (true, Reason::NoAllowPolicy)
        );
    }
    // ...and each dry run says what it alone would have decided.
    assert_eq!(
        would(8080),
        [
            ("allow-9090".to_owned(), false),
            ("deny-8080".to_owned(), false)
        ]
    );
    assert_eq!(
        would(9090),
        [
            ("allow-9090".to_owned(), true),
            ("deny-8080".to_owned(), true)
        ]
    );
    let report = index
        .report()
        .into_iter()
        .find(|r| r.key.name == "deny-8080")
        .unwrap();
    assert!(report.dry_run);
    assert!(
        report.effect.starts_with("dry run, never enforced"),
        "{report:?}"
    );
    // No dry run at all: nothing is called.
    let plain = build(&[authz(NS, "p", json!({"action": "DENY", "rules": [{}]}))]);
    plain.dry_run(&request(8080), |_, _| panic!("no dry-run policy exists"));

    // The annotation is read as Istio reads it (Go's strconv.ParseBool); a value it cannot read
    // leaves the policy enforced, and says so; a PeerAuthentication cannot be a dry run.
    let deny_all = json!({"action": "DENY", "rules": [{}]});
    for (value, dry) in [
        ("TRUE", true),
        ("1", true),
        ("false", false),
        ("yes", false),
    ] {
        let index = build(&[annotated(authz(NS, "p", deny_all.clone()), value)]);
        assert_eq!(index.authorize(&request(8080)).allowed, dry, "{value:?}");
        let report = only_report(&index);
        assert_eq!(report.dry_run, dry, "{value:?}");
        assert_eq!(
            report
                .unsupported
                .iter()
                .map(|u| u.path.as_str())
                .collect::<Vec<_>>(),
            if value == "yes" {
                vec!["metadata.annotations[istio.io/dry-run]"]
            } else {
                vec![]
            },
            "{value:?}"
        );
    }
    let index = build(&[annotated(
        peer(NS, "n", json!({"mtls": {"mode": "STRICT"}})),
        "true",
    )]);
    let report = only_report(&index);
    assert!(!report.dry_run);
    assert!(
        report.unsupported[0]
            .reason
            .contains("only an AuthorizationPolicy can be a dry run"),
        "{report:?}"
    );
    let strict = Workload {
        namespace: NS,
        labels: &server,
    };
    assert_eq!(index.peer_authentication(strict, 8080), MtlsMode::Strict);
}

#[test]
fn explain_says_why_each_policy_applies_or_not() {
    let root = DEFAULT_ROOT_NAMESPACE;
    let server = labels(&[("app", "server")]);
    let workload = Workload {
        namespace: NS,
        labels: &server,
    };
    let status = |explanation: &Explanation, name: &str| {
        explanation
            .policies
            .iter()
            .find(|p| p.key.name == name)
            .map(|p| (p.status, p.why.clone()))
            .unwrap_or_else(|| panic!("{name} not listed: {explanation:?}"))
    };
    // Case 1: the mesh-wide STRICT written with `selector: {}`.
    let explanation =
        build(&[peer(root, "mesh", mode_spec("STRICT", Some(json!({}))))]).explain(workload);
    assert_eq!(explanation.mtls, MtlsMode::Strict);
    assert_eq!(status(&explanation, "mesh").0, PolicyStatus::Applies);

    // Case 2: a namespace STRICT written with `selector: {}`, a PERMISSIVE for app=server.
    let explanation = build(&[
        peer(NS, "ns", mode_spec("STRICT", Some(json!({})))),
        peer(NS, "server", mode_spec("PERMISSIVE", app("server"))),
        peer(root, "mesh", mode_spec("STRICT", None)),
    ])
    .explain(workload);
    assert_eq!(explanation.mtls, MtlsMode::Permissive);
    let names: Vec<&str> = explanation
        .policies
        .iter()
        .map(|p| p.key.name.as_str())
        .collect();
    assert_eq!(names, ["server", "ns", "mesh"], "narrowest first");
    assert_eq!(status(&explanation, "server").0, PolicyStatus::Applies);
    let (ns, why) = status(&explanation, "ns");
    assert_eq!(ns, PolicyStatus::Overridden);
    assert!(why.contains("app/server sets the mode"), "{why}");
    assert_eq!(status(&explanation, "mesh").0, PolicyStatus::Overridden);

    // Case 3: two namespace-wide policies: the older applies, the newer is shadowed.
    let explanation = build(&[
        peer_at(NS, "a-newer", 2, mode_spec("PERMISSIVE", None)),
        peer_at(NS, "b-older", 1, mode_spec("STRICT", None)),
    ])
    .explain(workload);
    assert_eq!(explanation.mtls, MtlsMode::Strict);
    assert_eq!(status(&explanation, "b-older").0, PolicyStatus::Applies);
    let (shadowed, why) = status(&explanation, "a-newer");
    assert_eq!(shadowed, PolicyStatus::Shadowed);
    assert!(why.starts_with("app/b-older is older"), "{why}");

    // Ports, inheritance, ignored policies and authorization policies in evaluation order.
    let explanation = build(&[
        peer(root, "mesh", mode_spec("STRICT", None)),
        peer(NS, "unset", json!({})),
        peer(
            NS,
            "ports",
            json!({"selector": {"matchLabels": {"app": "server"}},
                   "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}),
        ),
        peer(NS, "off", mode_spec("DISABLE", app("server"))),
        authz(NS, "allow", json!({"rules": [{}]})),
        authz(
            root,
            "deny",
            json!({"action": "DENY", "selector": {"matchLabels": {"app": "server"}}}),
        ),
        dry_run(NS, "try", json!({"action": "DENY", "rules": [{}]})),
        authz(
            NS,
            "elsewhere",
            json!({"selector": {"matchLabels": {"app": "other"}}}),
        ),
    ])
    .explain(workload);
    assert_eq!(explanation.mtls, MtlsMode::Strict);
    assert_eq!(
        explanation.ports,
        [PortMode {
            port: 8080,
            mode: MtlsMode::Permissive
        }]
    );
    let listed: Vec<(&str, PolicyStatus)> = explanation
        .policies
        .iter()
        .map(|p| (p.key.name.as_str(), p.status))
        .collect();
    assert_eq!(
        listed,
        [
            ("ports", PolicyStatus::Applies),
            ("unset", PolicyStatus::Inherits),
            ("mesh", PolicyStatus::Applies),
            ("off", PolicyStatus::Ignored),
            ("deny", PolicyStatus::Applies),
            ("allow", PolicyStatus::Applies),
            ("try", PolicyStatus::DryRun),
        ]
    );
}

#[test]
fn mtls_modes_and_plaintext() {
    for (mode, plaintext) in [
        (MtlsMode::Strict, false),
        (MtlsMode::Permissive, true),
        (MtlsMode::Disable, true),
        (MtlsMode::Unset, true),
    ] {
        assert_eq!(mode.allows_plaintext(), plaintext, "{mode}");
    }
}

#[test]
fn report_describes_policies() {
    let index = build(&[
        authz(
            NS,
            "with-http",
            json!({"selector": {"matchLabels": {"app": "server", "tier": "web"}}, "action": "DENY",
                   "rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}]}, {}]}),
        ),
        authz(DEFAULT_ROOT_NAMESPACE, "mesh", json!({"rules": [{}]})),
        authz(
            DEFAULT_ROOT_NAMESPACE,
            "mesh-selected",
            json!({"selector": {"matchLabels": {"app": "x"}}}),
        ),
        authz(NS, "bad", json!({"rules": "x"})),
        peer(NS, "strict", json!({"mtls": {"mode": "STRICT"}})),
    ]);
    let reports = index.report();
    let keys: Vec<String> = reports.iter().map(|r| r.key.to_string()).collect();
    assert_eq!(
        keys,
        [
            "app/bad",
            "app/with-http",
            "istio-system/mesh",
            "istio-system/mesh-selected",
            "app/strict"
        ]
    );
    let with_http = &reports[1];
    assert_eq!(with_http.kind, PolicyKind::AuthorizationPolicy);
    assert_eq!(with_http.action, Some(Action::Deny));
    assert_eq!(with_http.rules, 2);
    assert_eq!(
        with_http.selects,
        "workloads with app=server,tier=web in namespace app"
    );
    assert_eq!(
        with_http.unsupported[0].path,
        "rules[0].to[0].operation.methods"
    );
    assert_eq!(with_http.effect, "enforced");
    assert_eq!(reports[2].selects, "every workload in the mesh");
    assert_eq!(
        reports[3].selects,
        "workloads with app=x in every namespace"
    );
    assert_eq!(reports[0].selects, "every workload in namespace app");
    assert_eq!(reports[4].kind, PolicyKind::PeerAuthentication);
    assert_eq!(reports[4].mode, Some(MtlsMode::Strict));
    assert_eq!(index.unsupported_fields(), 1);
    assert_eq!(index.invalid_policies(), 1);

    let json = serde_json::to_value(&reports).unwrap();
    assert_eq!(
        json[0]["errors"][0],
        json!(reports[0].errors[0].to_string())
    );
    assert_eq!(json[1]["action"], "DENY");
    assert_eq!(
        json[1]["unsupported"][0]["path"],
        "rules[0].to[0].operation.methods"
    );
    assert_eq!(json[4]["mode"], "STRICT");
    assert!(json[4].get("action").is_none());
}

#[test]
fn decisions_display_and_serialize() {
    let index = build(&[authz(NS, "d", json!({"action": "DENY", "rules": [{}]}))]);
    let decision = decide(&index, MTLS);
    assert_eq!(
        decision.to_string(),
        "denied by app/d: a DENY policy matched"
    );
    assert_eq!(
        serde_json::to_value(&decision).unwrap(),
        json!({"allowed": false, "policy": {"namespace": "app", "name": "d"}, "reason": "deny_matched"})
    );
    let decision = decide(&build(&[]), MTLS);
    assert_eq!(
        decision.to_string(),
        "allowed: no ALLOW policy selects the workload"
    );
}

#[test]
fn workload_from_pod() {
    let pod = Pod {
        key: ObjectKey::new(NS, "server-0"),
        uid: "u".into(),
        labels: labels(&[("app", "server")]),
        annotations: Labels::new(),
        service_account: "default".into(),
        node_name: None,
        ips: vec![],
        host_network: false,
        phase: "Running".into(),
        ready: true,
        owner: None,
        names: Default::default(),
    };
    let index = build(&[authz(
        NS,
        "d",
        json!({"action": "DENY", "selector": {"matchLabels": {"app": "server"}}, "rules": [{}]}),
    )]);
    let identity = Identity::parse(&format!("spiffe://{CLIENT}")).unwrap();
    let decision = index.authorize(&Request {
        workload: Workload::from(&pod),
        destination: "10.2.0.7:80".parse().unwrap(),
        source: Some(&identity),
        source_ip: "10.1.0.5".parse().unwrap(),
    });
    assert_eq!(decision.reason, Reason::DenyMatched);
}

#[test]
fn synthetic_policies_behave_as_documented() {
    let policies = synthetic(50, 10);
    assert_eq!(policies.len(), 50);
    let index = build(&policies);
    assert_eq!(index.invalid_policies(), 0);
    assert_eq!(index.unsupported_fields(), 0);
    let target = labels(&[("app", SYNTHETIC_APP)]);
    let allowed = SYNTHETIC_PRINCIPAL.strip_prefix("spiffe://").unwrap();
    let conn = MTLS.from(allowed).to("10.2.0.7:8080");
    let decision = decide_in(&index, SYNTHETIC_NAMESPACE, &target, conn);
    assert_eq!(decision.reason, Reason::AllowMatched);
    assert_eq!(decision.policy.unwrap().name, "synthetic-0000000009");
    let denied = decide_in(
        &index,
        SYNTHETIC_NAMESPACE,
        &target,
        MTLS.from("cluster.local/ns/bench/sa/x"),
    );
    assert_eq!(denied.reason, Reason::NoAllowMatched);
    let untouched = decide_in(
        &index,
        SYNTHETIC_NAMESPACE,
        &labels(&[("app", "none")]),
        MTLS,
    );
    assert_eq!(untouched.reason, Reason::NoAllowPolicy);
    assert!(synthetic(3, 10).len() == 3);
}

/// Checks a schema is structural: every node has a type.
fn assert_structural(
    schema: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps,
    path: &str,
) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    };
    assert!(schema.type_.is_some(), "{path} has no type");
    for (name, property) in schema.properties.iter().flatten() {
        assert_structural(property, &format!("{path}.{name}"));
    }
    match &schema.items {
        Some(JSONSchemaPropsOrArray::Schema(items)) => {
            assert_structural(items, &format!("{path}[]"))
        }
        Some(JSONSchemaPropsOrArray::Schemas(_)) => panic!("{path}: items must be one schema"),
        None => assert_ne!(schema.type_.as_deref(), Some("array"), "{path}: no items"),
    }
    if let Some(JSONSchemaPropsOrBool::Schema(additional)) = &schema.additional_properties {
        assert!(
            schema.properties.is_none(),
            "{path}: properties and additionalProperties"
        );
        assert_structural(additional, &format!("{path}.*"));
    }
}

/// The CRD manifests meshlet ships parse and declare what the sources watch.
#[test]
fn crd_manifests() {
    let crds = [
        (
            include_str!("../../../deploy/crds/security.istio.io_authorizationpolicies.yaml"),
            "AuthorizationPolicy",
            "authorizationpolicies",
            "authorizationpolicy",
            &["selector", "action", "rules"][..],
        ),
        (
            include_str!("../../../deploy/crds/security.istio.io_peerauthentications.yaml"),
            "PeerAuthentication",
            "peerauthentications",
            "peerauthentication",
            &["selector", "mtls", "portLevelMtls"][..],
        ),
    ];
    for (text, kind, plural, singular, fields) in crds {
        let crd: Value = serde_yaml::from_str(text).expect(kind);
        // Every field is one apiextensions.k8s.io/v1 knows (a typo would be dropped here).
        let typed: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
            serde_yaml::from_str(text).expect(kind);
        assert_eq!(serde_json::to_value(&typed).unwrap(), crd, "{kind}");
        for version in &typed.spec.versions {
            let schema = version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref());
            assert_structural(schema.expect("a schema"), kind);
        }
        assert_eq!(crd["apiVersion"], "apiextensions.k8s.io/v1", "{kind}");
        assert_eq!(crd["kind"], "CustomResourceDefinition", "{kind}");
        assert_eq!(
            crd["metadata"]["name"],
            format!("{plural}.security.istio.io")
        );
        let spec = &crd["spec"];
        assert_eq!(spec["group"], "security.istio.io", "{kind}");
        assert_eq!(spec["scope"], "Namespaced", "{kind}");
        assert_eq!(spec["names"]["kind"], kind);
        assert_eq!(spec["names"]["plural"], plural);
        assert_eq!(spec["names"]["singular"], singular);
        assert_eq!(spec["names"]["listKind"], format!("{kind}List"));
        let versions = spec["versions"].as_array().expect("versions");
        let v1: Vec<&Value> = versions.iter().filter(|v| v["name"] == "v1").collect();
        assert_eq!(v1.len(), 1, "{kind}");
        let v1 = v1[0];
        assert_eq!(v1["served"], true, "{kind}");
        assert_eq!(v1["storage"], true, "{kind}");
        assert_eq!(v1["subresources"]["status"], json!({}), "{kind}");
        let schema = &v1["schema"]["openAPIV3Schema"];
        assert_eq!(schema["type"], "object");
        assert_eq!(schema["properties"]["spec"]["type"], "object");
        for field in fields {
            assert!(
                schema["properties"]["spec"]["properties"]
                    .get(field)
                    .is_some(),
                "{kind}: spec.{field}"
            );
        }
        assert_eq!(
            schema["properties"]["status"]["x-kubernetes-preserve-unknown-fields"],
            true
        );
    }
}
