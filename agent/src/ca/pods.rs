//! Which service accounts have pods on which node: the CA's view of pod placement, from a
//! watch on every pod of the cluster, keeping only what authorization needs.
//!
//! The watch can lag the agents' (a pod scheduled a moment ago may not be here yet), so a
//! miss is confirmed with a direct LIST of the node's pods before it becomes a refusal.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::ListParams,
    runtime::{WatchStreamExt as _, watcher},
};
use tracing::{info, warn};

/// What the CA keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// `spec.nodeName` (empty while unscheduled).
    pub node: String,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
    /// Whether the pod has finished (`Succeeded` or `Failed`).
    pub finished: bool,
}

impl Placement {
    /// What the CA keeps of `pod`; `None` without a namespace, name or UID.
    pub fn of(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        Some(Self {
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            uid: meta.uid.clone()?,
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|sa| !sa.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            finished: matches!(phase, Some("Succeeded" | "Failed")),
        })
    }
}

/// Whether a service account has a pod on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// At least one pod that has not finished.
    Running,
    /// Only pods that have finished.
    OnlyFinished,
    /// None.
    None,
}

/// Every pod, by UID, with a per-node index.
#[derive(Debug, Default)]
pub struct PodIndex {
    inner: Mutex<Index>,
    synced: AtomicBool,
}

#[derive(Debug, Default)]
struct Index {
    by_uid: HashMap<String, Placement>,
    by_node: BTreeMap<String, Vec<String>>,
}

impl Index {
    fn insert(&mut self, pod: Placement) {
        self.remove(&pod.uid);
        self.by_node
            .entry(pod.node.clone())
            .or_default()
            .push(pod.uid.clone());
        self.by_uid.insert(pod.uid.clone(), pod);
    }

    fn remove(&mut self, uid: &str) {
        if let Some(old) = self.by_uid.remove(uid)
            && let Some(uids) = self.by_node.get_mut(&old.node)
        {
            uids.retain(|u| u != uid);
            if uids.is_empty() {
                self.by_node.remove(&old.node);
            }
        }
    }
}

impl PodIndex {
    /// Whether the first full list has been loaded.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Replaces everything (a full list).
    pub fn replace(&self, pods: impl IntoIterator<Item = Placement>) {
        let mut index = Index::default();
        for pod in pods {
            index.insert(pod);
        }
        *self.lock() = index;
        self.synced.store(true, Ordering::Release);
    }

    /// Adds or updates one pod.
    pub fn upsert(&self, pod: Placement) {
        self.lock().insert(pod);
    }

    /// Forgets one pod.
    pub fn remove(&self, uid: &str) {
        self.lock().remove(uid);
    }

    /// A pod by UID.
    pub fn pod(&self, uid: &str) -> Option<Placement> {
        self.lock().by_uid.get(uid).cloned()
    }

    /// A pod by namespace and name.
    pub fn pod_named(&self, namespace: &str, name: &str) -> Option<Placement> {
        self.lock()
            .by_uid
            .values()
            .find(|p| p.namespace == namespace && p.name == name)
            .cloned()
    }

    /// Whether `namespace/service_account` has a pod on `node`.
    pub fn binding(&self, node: &str, namespace: &str, service_account: &str) -> Binding {
        let index = self.lock();
        let pods = index
            .by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|uid| index.by_uid.get(uid));
        binding(pods, node, namespace, service_account)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether `namespace/service_account` has a pod on `node` among `pods`.
pub fn binding<'a>(
    pods: impl IntoIterator<Item = &'a Placement>,
    node: &str,
    namespace: &str,
    service_account: &str,
) -> Binding {
    let mut found = Binding::None;
    for pod in pods {
        if pod.node == node && pod.namespace == namespace && pod.service_account == service_account
        {
            if !pod.finished {
                return Binding::Running;
            }
            found = Binding::OnlyFinished;
        }
    }
    found
}

/// Keeps `index` in step with the cluster's pods until the task is dropped: list, then watch;
/// kube-runtime lists again after a `410 Gone` or a broken watch, with backoff.
pub async fn follow(client: Client, index: Arc<PodIndex>) {
    let api = Api::<Pod>::all(client);
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut initial = Vec::new();
    loop {
        match stream.try_next().await {
            Ok(Some(watcher::Event::Init)) => initial.clear(),
            Ok(Some(watcher::Event::InitApply(pod))) => initial.extend(Placement::of(&pod)),
            Ok(Some(watcher::Event::InitDone)) => {
                let count = initial.len();
                index.replace(std::mem::take(&mut initial));
                info!(pods = count, "pod placement synced");
            }
            Ok(Some(watcher::Event::Apply(pod))) => {
                if let Some(pod) = Placement::of(&pod) {
                    index.upsert(pod);
                }
            }
            Ok(Some(watcher::Event::Delete(pod))) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    index.remove(uid);
                }
            }
            Ok(None) => return,
            Err(err) => warn!(%err, "watching pods failed; retrying"),
        }
    }
}

/// The pods bound to `node` in `namespace`, straight from the API server (a field-selected
/// LIST), for a decision the watch may be too late for.
pub async fn list_on_node(
    client: &Client,
    node: &str,
    namespace: &str,
) -> kube::Result<Vec<Placement>> {
    let api = Api::<Pod>::namespaced(client.clone(), namespace);
    let params = ListParams::default().fields(&format!("spec.nodeName={node}"));
    Ok(api
        .list(&params)
        .await?
        .items
        .iter()
        .filter_map(Placement::of)
        .collect())
}

/// One pod, straight from the API server; `None` if it does not exist.
pub async fn get(client: &Client, namespace: &str, name: &str) -> kube::Result<Option<Placement>> {
    let api = Api::<Pod>::namespaced(client.clone(), namespace);
    Ok(api.get_opt(name).await?.as_ref().and_then(Placement::of))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, node: &str, ns: &str, sa: &str, finished: bool) -> Placement {
        Placement {
            namespace: ns.to_owned(),
            name: format!("pod-{uid}"),
            uid: uid.to_owned(),
            node: node.to_owned(),
            service_account: sa.to_owned(),
            finished,
        }
    }

    #[test]
    fn binding_is_per_node_namespace_and_service_account() {
        let index = PodIndex::default();
        assert!(!index.synced());
        index.replace([
            pod("1", "n1", "default", "web", false),
            pod("2", "n2", "default", "db", false),
            pod("3", "n1", "batch", "job", true),
        ]);
        assert!(index.synced());
        assert_eq!(index.binding("n1", "default", "web"), Binding::Running);
        assert_eq!(index.binding("n2", "default", "web"), Binding::None);
        assert_eq!(index.binding("n1", "other", "web"), Binding::None);
        assert_eq!(index.binding("n1", "batch", "job"), Binding::OnlyFinished);

        // A running pod of the same account makes it bound again.
        index.upsert(pod("4", "n1", "batch", "job", false));
        assert_eq!(index.binding("n1", "batch", "job"), Binding::Running);
        // A pod that moves (a new UID would be usual; an update is handled too).
        index.upsert(pod("1", "n2", "default", "web", false));
        assert_eq!(index.binding("n1", "default", "web"), Binding::None);
        assert_eq!(index.binding("n2", "default", "web"), Binding::Running);
        index.remove("1");
        assert_eq!(index.binding("n2", "default", "web"), Binding::None);
        assert_eq!(index.pod("2").unwrap().service_account, "db");
        assert_eq!(index.pod_named("default", "pod-2").unwrap().uid, "2");
    }

    #[test]
    fn placement_reads_the_pod() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "default", "name": "web-0", "uid": "u1"},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Failed"},
        }))
        .unwrap();
        let placement = Placement::of(&pod).unwrap();
        assert_eq!(placement.service_account, "default");
        assert_eq!(placement.node, "n1");
        assert!(placement.finished);
    }
}
