//! The workload model: the few fields of each Kubernetes object the agent acts on. Both
//! sources (Kubernetes API and file) convert into these types, so everything downstream has
//! one code path.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, OnceLock},
};

use serde::Serialize;

use super::naming::{ServiceName, WorkloadNames};

/// Label (on a namespace or pod) that enrolls pods in the mesh: `ambient` enrolls, on a pod
/// `none` opts out.
pub const DATAPLANE_MODE_LABEL: &str = "meshlet.io/dataplane-mode";
/// Pod annotation naming the pod's network namespace directly (non-Kubernetes use).
pub const NETNS_ANNOTATION: &str = "meshlet.io/netns";
/// Pod annotation the agent sets while a pod is captured.
pub const REDIRECTION_ANNOTATION: &str = "meshlet.io/redirection";
/// Istio's annotation of the same meaning, written by Istio's CNI agent on ztunnel nodes, and
/// by meshlet too (with `--istio-labels`) so that istiod tells ztunnel nodes to reach
/// meshlet's pods through HBONE.
pub const ISTIO_REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// The value of both redirection annotations on a captured pod.
pub const REDIRECTION_ENABLED: &str = "enabled";

/// Labels or annotations.
pub type Labels = BTreeMap<String, String>;

/// Namespace and name of an object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectKey {
    /// The namespace (empty for cluster-scoped objects).
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl ObjectKey {
    /// A key from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// A namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Namespace {
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: Labels,
}

/// A pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pod {
    /// Namespace and name.
    pub key: ObjectKey,
    /// `metadata.uid`: how the kubelet names the pod's cgroup.
    pub uid: String,
    /// Its labels.
    pub labels: Labels,
    /// Its annotations.
    pub annotations: Labels,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
    /// `spec.nodeName`, once scheduled.
    pub node_name: Option<String>,
    /// `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// `spec.hostNetwork`: such pods share the node's network and are never enrolled.
    pub host_network: bool,
    /// `status.phase`.
    pub phase: String,
    /// The `Ready` condition.
    pub ready: bool,
    /// The controller among `metadata.ownerReferences` (a ReplicaSet, StatefulSet, Job, ...):
    /// what Istio's telemetry names the workload after ([`super::naming`]).
    pub owner: Option<Owner>,
    /// Its names in telemetry, computed on first use ([`Pod::names`]).
    #[serde(skip)]
    pub names: Derived<Arc<WorkloadNames>>,
}

impl Pod {
    /// Its names in Istio's telemetry, computed once and shared by every connection that
    /// names the pod.
    pub fn names(&self) -> &Arc<WorkloadNames> {
        self.names.get_or_init(|| Arc::new(WorkloadNames::of(self)))
    }
}

/// A value derived from the rest of an object on first use. It is not part of the object: equal
/// objects are equal whether or not it was computed, and a clone (which may then be changed)
/// starts without it. The object must not change once it was computed: objects are shared
/// behind an `Arc` once built.
#[derive(Debug)]
pub struct Derived<T>(OnceLock<T>);

impl<T> Default for Derived<T> {
    fn default() -> Self {
        Self(OnceLock::new())
    }
}

impl<T> Clone for Derived<T> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<T> PartialEq for Derived<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> Eq for Derived<T> {}

impl<T> Derived<T> {
    /// The value, computed by `init` on first use.
    pub fn get_or_init(&self, init: impl FnOnce() -> T) -> &T {
        self.0.get_or_init(init)
    }
}

/// The controlling owner of an object (`ownerReferences[]` with `controller: true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Owner {
    /// Its kind (`ReplicaSet`, `StatefulSet`, `DaemonSet`, `Job`, ...).
    pub kind: String,
    /// Its name, in the pod's namespace.
    pub name: String,
}

#[cfg(test)]
impl Pod {
    /// A running, ready pod of `node-0` at 10.244.0.10 with `labels`, service account
    /// `default` and no owner: the unit tests' starting point.
    pub(crate) fn fixture(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Self {
        Self {
            key: ObjectKey::new(namespace, name),
            uid: format!("uid-{name}"),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: Labels::new(),
            service_account: "default".into(),
            node_name: Some("node-0".into()),
            ips: vec!["10.244.0.10".parse().expect("an address")],
            host_network: false,
            phase: "Running".into(),
            ready: true,
            owner: None,
            names: Derived::default(),
        }
    }

    /// The pod, owned by the controller `kind` `name`.
    pub(crate) fn owned_by(self, kind: &str, name: &str) -> Self {
        Self {
            owner: Some(Owner {
                kind: kind.into(),
                name: name.into(),
            }),
            ..self
        }
    }
}

impl Pod {
    /// Whether the pod can hold connections: running (or pending with an address), not done.
    pub fn is_live(&self) -> bool {
        !matches!(self.phase.as_str(), "Succeeded" | "Failed") && !self.ips.is_empty()
    }
}

/// A port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// The port's name (matches the EndpointSlice port of the same name).
    pub name: String,
    /// The service port.
    pub port: u16,
    /// `targetPort`: a number, or the name of a container port.
    pub target_port: TargetPort,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

/// `targetPort` of a service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// The name of a container port.
    Name(String),
}

/// A service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    /// Namespace and name.
    pub key: ObjectKey,
    /// `spec.clusterIPs` (empty for headless services).
    pub cluster_ips: Vec<IpAddr>,
    /// Its ports.
    pub ports: Vec<ServicePort>,
    /// `spec.selector`, if any.
    pub selector: Option<Labels>,
    /// Its names in telemetry, made on first use ([`ServiceName::of`]).
    #[serde(skip)]
    pub names: Derived<Arc<ServiceName>>,
}

/// An endpoint of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// Its addresses.
    pub addresses: Vec<IpAddr>,
    /// The `ready` condition (unset means ready).
    pub ready: bool,
    /// The pod behind it, if named.
    pub target_pod: Option<ObjectKey>,
}

/// A port of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointPort {
    /// The port's name (the service port's name).
    pub name: String,
    /// The port on the endpoints.
    pub port: u16,
}

/// An EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointSlice {
    /// Namespace and name.
    pub key: ObjectKey,
    /// The service it belongs to (label `kubernetes.io/service-name`).
    pub service: String,
    /// Its ports.
    pub ports: Vec<EndpointPort>,
    /// Its endpoints.
    pub endpoints: Vec<Endpoint>,
}

/// The kind of a policy object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum PolicyKind {
    /// `security.istio.io/v1` `AuthorizationPolicy`.
    AuthorizationPolicy,
    /// `security.istio.io/v1` `PeerAuthentication`.
    PeerAuthentication,
}

/// The annotation that makes an AuthorizationPolicy a dry run: evaluated, logged and counted,
/// never enforced (`"true"`; the policy module reads it).
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// An AuthorizationPolicy or PeerAuthentication, spec kept as written (the policy module
/// compiles it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Which kind.
    pub kind: PolicyKind,
    /// Namespace and name.
    pub key: ObjectKey,
    /// `metadata.creationTimestamp`: Istio breaks ties between policies by age, oldest first.
    /// `None` (a workload file that leaves it out) counts as older than any time.
    pub created: Option<k8s_openapi::jiff::Timestamp>,
    /// The [`DRY_RUN_ANNOTATION`] as written, if the object has it.
    pub dry_run: Option<String>,
    /// `spec`.
    pub spec: serde_json::Value,
}

/// Any object the store holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind")]
pub enum Object {
    /// A namespace.
    Namespace(Namespace),
    /// A pod.
    Pod(Pod),
    /// A service.
    Service(Service),
    /// An EndpointSlice.
    EndpointSlice(EndpointSlice),
    /// An AuthorizationPolicy or PeerAuthentication.
    Policy(Policy),
}

/// The kinds of objects, for per-kind resyncs and sync tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    /// Namespaces.
    Namespace,
    /// Pods.
    Pod,
    /// Services.
    Service,
    /// EndpointSlices.
    EndpointSlice,
    /// AuthorizationPolicies.
    AuthorizationPolicy,
    /// PeerAuthentications.
    PeerAuthentication,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 6] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
    ];
}

impl Object {
    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Policy(p) => match p.kind {
                PolicyKind::AuthorizationPolicy => Kind::AuthorizationPolicy,
                PolicyKind::PeerAuthentication => Kind::PeerAuthentication,
            },
        }
    }

    /// The object's namespace and name.
    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Namespace(n) => ObjectKey::new("", n.name.clone()),
            Object::Pod(p) => p.key.clone(),
            Object::Service(s) => s.key.clone(),
            Object::EndpointSlice(s) => s.key.clone(),
            Object::Policy(p) => p.key.clone(),
        }
    }
}

/// Whether a label selector (`matchLabels` form) selects `labels`. An empty selector selects
/// everything.
pub fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_names_are_computed_once_and_a_changed_clone_computes_its_own() {
        let pod = Pod::fixture("shop", "db-0", &[("app", "db")]);
        let names = pod.names().clone();
        assert_eq!(names.canonical_service, "db");
        assert!(
            Arc::ptr_eq(&names, pod.names()),
            "computed once, then shared"
        );
        // Equal pods are equal whether or not their names were computed.
        assert_eq!(pod, Pod::fixture("shop", "db-0", &[("app", "db")]));
        // A clone starts without them: changed, it names itself anew.
        let mut relabelled = pod.clone();
        relabelled.labels.insert("app".into(), "orders".into());
        assert_eq!(relabelled.names().canonical_service, "orders");
        assert_eq!(pod.names().canonical_service, "db");
    }
}
