//! How Istio names a pod in its telemetry, so that Istio's dashboards and alerts group
//! meshlet's series the way they group ztunnel's and Envoy's.
//!
//! - The **workload** is the pod's controller, seen through the pod's own metadata (as istiod
//!   does, without reading the owners): a ReplicaSet named `<deployment>-<pod-template-hash>`
//!   is its Deployment; a Job named `<cronjob>-<8 to 10 digits>` is its CronJob; any other
//!   controller (StatefulSet, DaemonSet, Job, ReplicationController) is itself. A pod with no
//!   controller is its own workload.
//! - The **canonical service** is the first of the labels `service.istio.io/canonical-name`,
//!   `app.kubernetes.io/name` and `app` that the pod carries (even empty, as Istio reads it),
//!   else the workload name; the **canonical revision** the first of
//!   `service.istio.io/canonical-revision`, `app.kubernetes.io/version` and `version`, else
//!   `latest`. (OpenShift's DeploymentConfig, named through a ReplicationController, is not
//!   recognised: such a pod's workload is its ReplicationController.)
//!
//! These names are telemetry, not identity: a pod can claim any of them, so nothing but labels
//! and the access log reads them. Policy and the tunnel use the SPIFFE identity only.

use std::sync::{Arc, LazyLock};

use super::model::{ObjectKey, Pod, Service};

/// The name of whatever the agent cannot name (a peer outside the cluster, no Service).
pub const UNKNOWN: &str = "unknown";

/// Labels naming a pod's canonical service, in order of precedence.
const CANONICAL_NAME_LABELS: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];
/// Labels naming its canonical revision, in order of precedence.
const CANONICAL_REVISION_LABELS: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];
/// The revision of a pod that names none.
const DEFAULT_REVISION: &str = "latest";
/// The label the Deployment controller puts on the pods of each ReplicaSet it makes.
const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// A pod's names in Istio's telemetry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadNames {
    /// The pod's own name, for the access log (never a label: it would make a series per pod).
    pub pod: String,
    /// Its namespace.
    pub namespace: String,
    /// The owning workload: a Deployment, StatefulSet, DaemonSet, Job or CronJob by name, or
    /// the pod itself.
    pub workload: String,
    /// `source_canonical_service` / `destination_canonical_service` (also `*_app`).
    pub canonical_service: String,
    /// `source_canonical_revision` / `destination_canonical_revision` (also `*_version`).
    pub canonical_revision: String,
}

impl WorkloadNames {
    /// The names of `pod`.
    pub fn of(pod: &Pod) -> Self {
        let workload = workload_name(pod);
        // The first label present wins, even empty: Istio's lookup.
        let first = |labels: &[&str]| {
            labels
                .iter()
                .find_map(|label| pod.labels.get(*label))
                .cloned()
        };
        Self {
            pod: pod.key.name.clone(),
            namespace: pod.key.namespace.clone(),
            canonical_service: first(&CANONICAL_NAME_LABELS).unwrap_or_else(|| workload.clone()),
            canonical_revision: first(&CANONICAL_REVISION_LABELS)
                .unwrap_or_else(|| DEFAULT_REVISION.to_owned()),
            workload,
        }
    }
}

/// The Service a connection addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName {
    /// `<name>.<namespace>.svc.<cluster domain>`.
    pub host: String,
    /// The Service's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
}

impl Default for ServiceName {
    fn default() -> Self {
        Self {
            host: UNKNOWN.to_owned(),
            name: UNKNOWN.to_owned(),
            namespace: UNKNOWN.to_owned(),
        }
    }
}

impl ServiceName {
    /// No Service (a pod addressed directly): shared by every such connection.
    pub fn unknown() -> Arc<Self> {
        static UNKNOWN_SERVICE: LazyLock<Arc<ServiceName>> =
            LazyLock::new(|| Arc::new(ServiceName::default()));
        UNKNOWN_SERVICE.clone()
    }

    /// The Service `key`, in the cluster DNS domain `domain`.
    pub fn new(key: &ObjectKey, domain: &str) -> Self {
        Self {
            host: format!("{}.{}.svc.{domain}", key.name, key.namespace),
            name: key.name.clone(),
            namespace: key.namespace.clone(),
        }
    }

    /// The names of `service` in the cluster DNS domain `domain`: made once per Service and
    /// shared by its connections (a different domain, only ever in tests, makes new ones).
    pub fn of(service: &Service, domain: &str) -> Arc<Self> {
        let names = service
            .names
            .get_or_init(|| Arc::new(Self::new(&service.key, domain)));
        if names.in_domain(domain) {
            names.clone()
        } else {
            Arc::new(Self::new(&service.key, domain))
        }
    }

    /// Whether these are the names of a Service in the cluster DNS domain `domain`.
    fn in_domain(&self, domain: &str) -> bool {
        self.host.len() == self.name.len() + self.namespace.len() + ".svc.".len() + 1 + domain.len()
            && self.host.ends_with(domain)
    }
}

/// The name of the workload that owns `pod`.
pub fn workload_name(pod: &Pod) -> String {
    let Some(owner) = &pod.owner else {
        return pod.key.name.clone();
    };
    let name = owner.name.as_str();
    let workload = match owner.kind.as_str() {
        "ReplicaSet" => pod
            .labels
            .get(POD_TEMPLATE_HASH_LABEL)
            .filter(|hash| !hash.is_empty())
            .and_then(|hash| name.strip_suffix(hash.as_str())?.strip_suffix('-'))
            .unwrap_or(name),
        "Job" => cron_job_name(name).unwrap_or(name),
        _ => name,
    };
    workload.to_owned()
}

/// The CronJob a Job was made by, from the Job's name: the CronJob controller names its Jobs
/// `<cronjob>-<scheduled time in minutes>`, 8 to 10 digits.
fn cron_job_name(job: &str) -> Option<&str> {
    let (cron_job, time) = job.rsplit_once('-')?;
    let digits = (8..=10).contains(&time.len()) && time.bytes().all(|b| b.is_ascii_digit());
    (digits && !cron_job.is_empty()).then_some(cron_job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, owner: Option<(&str, &str)>, labels: &[(&str, &str)]) -> Pod {
        let pod = Pod::fixture("shop", name, labels);
        match owner {
            Some((kind, owner)) => pod.owned_by(kind, owner),
            None => pod,
        }
    }

    #[test]
    fn the_workload_is_the_owner_istio_would_name() {
        let hash = [("pod-template-hash", "7d4b9c8f6")];
        let cases = [
            (
                "Deployment, through its ReplicaSet",
                pod(
                    "cart-7d4b9c8f6-x2kq9",
                    Some(("ReplicaSet", "cart-7d4b9c8f6")),
                    &hash,
                ),
                "cart",
            ),
            (
                "a bare ReplicaSet (no template hash) is itself",
                pod("cart-x2kq9", Some(("ReplicaSet", "cart")), &[]),
                "cart",
            ),
            (
                "a template hash that is not the ReplicaSet's suffix changes nothing",
                pod("rs-x2kq9", Some(("ReplicaSet", "rs-other")), &hash),
                "rs-other",
            ),
            (
                "StatefulSet",
                pod("db-0", Some(("StatefulSet", "db")), &[]),
                "db",
            ),
            (
                "DaemonSet",
                pod("agent-9xk2p", Some(("DaemonSet", "agent")), &[]),
                "agent",
            ),
            (
                "Job",
                pod("migrate-4kq2x", Some(("Job", "migrate")), &[]),
                "migrate",
            ),
            (
                "CronJob, through its Job",
                pod(
                    "report-29413860-4kq2x",
                    Some(("Job", "report-29413860")),
                    &[],
                ),
                "report",
            ),
            (
                "a Job whose suffix is too short for a schedule is itself",
                pod("batch-1234-x", Some(("Job", "batch-1234")), &[]),
                "batch-1234",
            ),
            (
                "a Job whose suffix is not all digits is itself",
                pod("batch-1234567a-x", Some(("Job", "batch-1234567a")), &[]),
                "batch-1234567a",
            ),
            (
                "ReplicationController",
                pod("web-k2x9q", Some(("ReplicationController", "web")), &[]),
                "web",
            ),
            (
                "a bare pod keeps its name",
                pod("debug", None, &[]),
                "debug",
            ),
        ];
        for (case, pod, want) in cases {
            assert_eq!(workload_name(&pod), want, "{case}");
        }
    }

    #[test]
    fn canonical_names_follow_istios_precedence() {
        let owner = Some(("StatefulSet", "db"));
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], (&'a str, &'a str));
        let cases: [Case<'_>; 6] = [
            (
                "Istio's own labels first",
                &[
                    ("service.istio.io/canonical-name", "orders"),
                    ("service.istio.io/canonical-revision", "v3"),
                    ("app.kubernetes.io/name", "ignored"),
                    ("app.kubernetes.io/version", "ignored"),
                    ("app", "ignored"),
                    ("version", "ignored"),
                ],
                ("orders", "v3"),
            ),
            (
                "then the recommended Kubernetes labels",
                &[
                    ("app.kubernetes.io/name", "orders"),
                    ("app.kubernetes.io/version", "2.1"),
                    ("app", "ignored"),
                    ("version", "ignored"),
                ],
                ("orders", "2.1"),
            ),
            (
                "then app and version",
                &[("app", "orders"), ("version", "v1")],
                ("orders", "v1"),
            ),
            (
                "each name is looked up on its own",
                &[
                    ("service.istio.io/canonical-name", "orders"),
                    ("version", "v1"),
                ],
                ("orders", "v1"),
            ),
            (
                "an empty label present still wins, as in Istio",
                &[("app.kubernetes.io/name", ""), ("app", "orders")],
                ("", "latest"),
            ),
            ("else the workload name and latest", &[], ("db", "latest")),
        ];
        for (case, labels, (service, revision)) in cases {
            let names = WorkloadNames::of(&pod("db-0", owner, labels));
            assert_eq!(names.workload, "db", "{case}");
            assert_eq!(names.canonical_service, service, "{case}");
            assert_eq!(names.canonical_revision, revision, "{case}");
        }
    }

    #[test]
    fn a_services_names_are_made_once_per_domain() {
        let service = Service {
            key: ObjectKey::new("shop", "db"),
            cluster_ips: vec![],
            ports: vec![],
            selector: None,
            names: Default::default(),
        };
        let names = ServiceName::of(&service, "cluster.local");
        assert_eq!(names.host, "db.shop.svc.cluster.local");
        assert_eq!(
            (names.name.as_str(), names.namespace.as_str()),
            ("db", "shop")
        );
        assert!(Arc::ptr_eq(
            &names,
            &ServiceName::of(&service, "cluster.local")
        ));
        // Another domain is never answered with the first one's names.
        let other = ServiceName::of(&service, "corp.internal");
        assert_eq!(other.host, "db.shop.svc.corp.internal");
        let suffix = ServiceName::of(&service, "local");
        assert_eq!(suffix.host, "db.shop.svc.local");
    }
}
