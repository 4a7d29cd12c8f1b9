//! Whether this agent is being removed from the node, or only restarted.
//!
//! Both end in SIGTERM. A restart (a rolling update, a node drain, a crash-looping pod) must
//! leave capture pinned, so the next agent takes over without a moment of plaintext. A removal
//! (the DaemonSet deleted, or its namespace) must release capture, or in the default fail-closed
//! mode every enrolled pod's connections would be refused by programs no agent serves any more.
//!
//! The difference is in the API: the agent's pod names its DaemonSet as its controller (an
//! owner reference with the DaemonSet's UID). [`follow`] keeps a watch on that DaemonSet and on
//! the namespace, and decides [`Removal`] when:
//! - the DaemonSet is gone (deleted, or not there when the watch lists),
//! - it carries a `deletionTimestamp` (foreground or background deletion; not an orphaning one,
//!   `--cascade=orphan`, which leaves the pods running for a DaemonSet created again),
//! - a DaemonSet of that name has another UID (deleted and created again), or
//! - the namespace carries a `deletionTimestamp` (`kubectl delete -k` deletes the namespace first).
//!
//! The watches are established while the agent's RBAC still stands and keep delivering events
//! after an uninstall has deleted the ClusterRoleBinding (the API server authorizes a watch when
//! it starts), so the decision is made in time even when everything goes in one `kubectl delete`.
//! What the watches report is a suspicion; [`confirm`] reads the pod and the DaemonSet again
//! when the agent is told to stop, so that a DaemonSet deleted with `--cascade=orphan` and
//! created again (which adopts the running pods under a new UID) does not count. Only when those
//! reads fail (the uninstall has already removed the agent's RBAC) does the suspicion decide.
//! No evidence, no release: an API server that cannot be reached or refuses from the start
//! leaves capture in place.

use std::{
    fmt,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
};

use futures::{StreamExt as _, stream};
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1 as core};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use tokio::{
    sync::{Mutex, mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::capture;

/// Why the agent's DaemonSet counts as removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// The DaemonSet is gone.
    Deleted,
    /// The DaemonSet is being deleted (foreground deletion: it waits for its pods).
    Deleting,
    /// The DaemonSet of that name is another object (deleted and created again).
    Replaced,
    /// The agent's namespace is being deleted, and everything in it.
    NamespaceDeleting,
}

impl fmt::Display for Removal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Deleted => "the agent's DaemonSet was deleted",
            Self::Deleting => "the agent's DaemonSet is being deleted",
            Self::Replaced => "the agent's DaemonSet was replaced by another of the same name",
            Self::NamespaceDeleting => "the agent's namespace is being deleted",
        })
    }
}

/// Asks the in-pod reconciler, which owns capture, to release it between two passes (so that no
/// pass attaches anything after it): it stops enrolling and answers with what was removed.
#[derive(Debug)]
pub struct ReleaseRequest {
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<capture::Uninstalled, capture::Error>>,
}

/// Releases capture on this node for good, once the agent's removal is suspected by [`follow`]
/// and confirmed by [`confirm`]: meshlet-cni unchained and removed, then every pinned program
/// detached and unpinned. Pods' new connections go direct from then on; the in-pod listeners
/// still serve what reaches them (HBONE from peers whose agents still capture) until the drain.
pub struct Releaser {
    /// The API and the agent's pod (namespace, name), to confirm with.
    pub api: Option<(Client, String, String)>,
    /// What [`follow`] suspects.
    pub suspicion: watch::Receiver<Option<Removal>>,
    /// The in-pod reconciler, while it runs.
    pub inpod: mpsc::Sender<ReleaseRequest>,
    /// meshlet-cni's installation, if the agent installed it.
    pub cni: Option<crate::cni::install::InstallConfig>,
    /// The task that keeps meshlet-cni chained: stopped (and waited for) before unchaining.
    pub cni_keeper: Mutex<Option<JoinHandle<()>>>,
    /// Where capture is pinned.
    pub bpffs_dir: PathBuf,
    /// Set once released.
    pub released: AtomicBool,
    /// One release at a time.
    pub releasing: Mutex<()>,
}

impl fmt::Debug for Releaser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Releaser")
            .field("pod", &self.api.as_ref().map(|(_, ns, pod)| (ns, pod)))
            .field("suspicion", &*self.suspicion.borrow())
            .field("bpffs_dir", &self.bpffs_dir)
            .field("released", &self.released())
            .finish_non_exhaustive()
    }
}

impl Releaser {
    /// Whether capture was released.
    pub fn released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Releases capture if the agent's removal is suspected and confirmed; true once it is
    /// released (now or before).
    pub async fn release_if_removed(&self) -> bool {
        let _one = self.releasing.lock().await;
        if self.released() {
            return true;
        }
        let Some(suspected) = self.suspicion.borrow().clone() else {
            return false;
        };
        let confirmed = match &self.api {
            Some((client, namespace, pod)) => confirm(client, namespace, pod, suspected).await,
            None => Some(suspected),
        };
        let Some(reason) = confirmed else {
            return false;
        };
        if let Some(keeper) = self.cni_keeper.lock().await.take() {
            keeper.abort();
            let _ = keeper.await;
        }
        if let Some(install) = &self.cni
            && let Err(err) = crate::cni::install::uninstall(&install.conf_dir, &install.bin_dir)
        {
            warn!(%err, "cannot unchain meshlet-cni; `meshlet cni uninstall` on the node removes it");
        }
        let (reply, outcome) = oneshot::channel();
        let removed = match self.inpod.send(ReleaseRequest { reply }).await {
            Ok(()) => match outcome.await {
                Ok(removed) => removed,
                Err(_) => {
                    info!(%reason, "the in-pod reconciler stopped first (handed over): capture is the successor's");
                    return false;
                }
            },
            // The reconciler has stopped (shut down): nothing else touches capture now.
            Err(_) => capture::uninstall(&self.bpffs_dir),
        };
        match removed {
            Ok(removed) => warn!(
                %reason,
                links = removed.links,
                maps = removed.maps,
                "capture released: programs detached, pins removed, meshlet-cni unchained; pods' \
                 new connections go direct"
            ),
            Err(err) => warn!(
                %reason,
                %err,
                "cannot release all of capture; `meshlet uninstall` on the node removes the rest"
            ),
        }
        self.released.store(true, Ordering::Release);
        true
    }

    /// Releases capture as soon as a removal is suspected and confirmed; never returns (run
    /// it beside the wait after SIGTERM).
    pub async fn release_when_removed(&self) -> std::convert::Infallible {
        let mut suspicion = self.suspicion.clone();
        loop {
            if suspicion.borrow_and_update().is_some() && self.release_if_removed().await {
                break;
            }
            if suspicion.changed().await.is_err() {
                break;
            }
        }
        std::future::pending().await
    }
}

/// The DaemonSet that runs this agent: its pod's controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The namespace of the pod and the DaemonSet.
    pub namespace: String,
    /// The DaemonSet's name.
    pub name: String,
    /// The DaemonSet's UID, as the pod's owner reference records it.
    pub uid: String,
}

impl Owner {
    /// The DaemonSet controlling `pod`, if a DaemonSet does.
    pub fn of(pod: &core::Pod) -> Option<Self> {
        let owner = pod
            .owner_references()
            .iter()
            .find(|r| r.controller == Some(true))?;
        (owner.kind == "DaemonSet" && owner.api_version.starts_with("apps/")).then(|| Self {
            namespace: pod.namespace().unwrap_or_default(),
            name: owner.name.clone(),
            uid: owner.uid.clone(),
        })
    }
}

/// What the watches report, reduced to what the decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A DaemonSet of the owner's name, as it now is.
    DaemonSet { uid: String, deleting: bool },
    /// The DaemonSet was deleted.
    DaemonSetDeleted { uid: String },
    /// A full list of DaemonSets of the owner's name ended; `found` says whether it held one.
    DaemonSetListed { found: bool },
    /// The namespace, as it now is.
    Namespace { deleting: bool },
}

/// The decision for one observation: `Some` once removal is certain.
pub fn judge(owner: &Owner, seen: &Seen) -> Option<Removal> {
    match seen {
        Seen::DaemonSet { uid, .. } if *uid != owner.uid => Some(Removal::Replaced),
        Seen::DaemonSet { deleting: true, .. } => Some(Removal::Deleting),
        Seen::DaemonSetDeleted { uid } if *uid == owner.uid => Some(Removal::Deleted),
        Seen::DaemonSetListed { found: false } => Some(Removal::Deleted),
        Seen::Namespace { deleting: true } => Some(Removal::NamespaceDeleting),
        _ => None,
    }
}

/// Finds the agent's DaemonSet from its pod (`namespace`/`pod`), then watches it and the
/// namespace until removal is certain, which it sends on `removal`. Returns at once, with
/// nothing sent, when the pod is not run by a DaemonSet (started by hand); runs until dropped
/// otherwise.
pub async fn follow(
    client: Client,
    namespace: String,
    pod: String,
    removal: watch::Sender<Option<Removal>>,
) {
    let Some(owner) = find_owner(&client, &namespace, &pod).await else {
        return;
    };
    info!(
        daemonset = %owner.name,
        namespace = %owner.namespace,
        "watching the agent's DaemonSet: deleting it releases capture, a restart keeps it"
    );
    let by_name = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    let daemonsets = watcher::watcher(
        Api::<DaemonSet>::namespaced(client.clone(), &owner.namespace),
        by_name(&owner.name),
    )
    .default_backoff()
    .map(|event| event.map(Observed::DaemonSet));
    let namespaces = watcher::watcher(Api::<core::Namespace>::all(client), by_name(&namespace))
        .default_backoff()
        .map(|event| event.map(Observed::Namespace));
    let mut events = std::pin::pin!(stream::select(daemonsets, namespaces));
    // Between a list's start and end: whether it held the DaemonSet.
    let mut listing = None;
    while let Some(event) = events.next().await {
        let seen = match event {
            Ok(event) => observe(event, &mut listing),
            Err(err) => {
                debug!(%err, "watching the agent's DaemonSet; retrying");
                Vec::new()
            }
        };
        if let Some(decided) = seen.iter().find_map(|seen| judge(&owner, seen)) {
            warn!(
                reason = %decided,
                "this agent is being removed from the node: on SIGTERM it releases capture \
                 instead of keeping it for a successor (once the API confirms)"
            );
            removal.send_replace(Some(decided));
            return;
        }
    }
}

/// A watch event of either kind.
#[allow(clippy::large_enum_variant)] // one at a time, straight from the stream: never stored
enum Observed {
    DaemonSet(Event<DaemonSet>),
    Namespace(Event<core::Namespace>),
}

fn observe(event: Observed, listing: &mut Option<bool>) -> Vec<Seen> {
    let daemonset = |ds: &DaemonSet| Seen::DaemonSet {
        uid: ds.uid().unwrap_or_default(),
        deleting: is_deleting(ds),
    };
    let namespace = |ns: &core::Namespace| Seen::Namespace {
        deleting: ns.metadata.deletion_timestamp.is_some(),
    };
    match event {
        Observed::DaemonSet(Event::Init) => {
            *listing = Some(false);
            Vec::new()
        }
        Observed::DaemonSet(Event::InitApply(ds)) => {
            *listing = Some(true);
            vec![daemonset(&ds)]
        }
        Observed::DaemonSet(Event::InitDone) => listing
            .take()
            .map(|found| vec![Seen::DaemonSetListed { found }])
            .unwrap_or_default(),
        Observed::DaemonSet(Event::Apply(ds)) => vec![daemonset(&ds)],
        Observed::DaemonSet(Event::Delete(ds)) => vec![Seen::DaemonSetDeleted {
            uid: ds.uid().unwrap_or_default(),
        }],
        Observed::Namespace(Event::InitApply(ns) | Event::Apply(ns)) => vec![namespace(&ns)],
        Observed::Namespace(_) => Vec::new(),
    }
}

/// Whether `ds` is being deleted together with its pods: a `deletionTimestamp`, and not the
/// `orphan` finalizer (`--cascade=orphan` keeps the pods for a DaemonSet created again).
fn is_deleting(ds: &DaemonSet) -> bool {
    ds.metadata.deletion_timestamp.is_some() && !ds.finalizers().iter().any(|f| f == "orphan")
}

/// How long each confirming read may take.
const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Checks a suspected removal against the API as it is now: the agent's pod's controller (it
/// may have been adopted by a DaemonSet created again) and that DaemonSet. `None`: not removed
/// after all. When a read fails or times out (an uninstall deletes the agent's RBAC and service
/// account, and the namespace with them), `suspected` stands.
pub async fn confirm(
    client: &Client,
    namespace: &str,
    pod: &str,
    suspected: Removal,
) -> Option<Removal> {
    if suspected == Removal::NamespaceDeleting {
        return Some(suspected); // a namespace's deletion cannot be undone
    }
    let read = async {
        let pod = Api::<core::Pod>::namespaced(client.clone(), namespace)
            .get_opt(pod)
            .await?;
        let Some(owner) = pod.as_ref().and_then(Owner::of) else {
            // Gone, or orphaned: no DaemonSet runs this pod any more.
            return Ok(Some(suspected.clone()));
        };
        let daemonset = Api::<DaemonSet>::namespaced(client.clone(), &owner.namespace)
            .get_opt(&owner.name)
            .await?;
        Ok::<_, kube::Error>(match daemonset {
            None => Some(Removal::Deleted),
            Some(ds) if ds.uid().as_deref() != Some(owner.uid.as_str()) => Some(Removal::Replaced),
            Some(ds) if is_deleting(&ds) => Some(Removal::Deleting),
            Some(_) => None,
        })
    };
    match tokio::time::timeout(CONFIRM_TIMEOUT * 2, read).await {
        Ok(Ok(confirmed)) => {
            if confirmed.is_none() {
                info!(suspected = %suspected, "the agent's DaemonSet runs it after all (created again and adopted it): capture stays");
            }
            confirmed
        }
        Ok(Err(err)) => {
            warn!(%err, reason = %suspected, "cannot read the agent's pod and DaemonSet again (an uninstall removes the agent's access): going by the watch");
            Some(suspected)
        }
        Err(_) => {
            warn!(reason = %suspected, "the API did not answer in time: going by the watch");
            Some(suspected)
        }
    }
}

/// The agent's DaemonSet, from its pod. Retries while the API cannot answer; gives up (the
/// agent then keeps capture on every exit) when the pod does not exist or no DaemonSet runs it.
async fn find_owner(client: &Client, namespace: &str, pod: &str) -> Option<Owner> {
    let pods = Api::<core::Pod>::namespaced(client.clone(), namespace);
    let mut backoff = std::time::Duration::from_millis(500);
    loop {
        match pods.get_opt(pod).await {
            Ok(Some(found)) => {
                let owner = Owner::of(&found);
                if owner.is_none() {
                    info!(%namespace, %pod, "the agent's pod is not run by a DaemonSet: capture stays on every exit");
                }
                return owner;
            }
            Ok(None) => {
                warn!(%namespace, %pod, "the agent's pod (--pod-name) does not exist: capture stays on every exit");
                return None;
            }
            Err(err) => {
                debug!(%err, "reading the agent's pod; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner {
            namespace: "meshlet-system".into(),
            name: "meshlet".into(),
            uid: "uid-1".into(),
        }
    }

    #[test]
    fn only_positive_evidence_removes() {
        let owner = owner();
        let ds = |uid: &str, deleting| Seen::DaemonSet {
            uid: uid.into(),
            deleting,
        };
        assert_eq!(judge(&owner, &ds("uid-1", false)), None, "a restart");
        let mut orphaning: DaemonSet = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "meshlet", "deletionTimestamp": "2026-12-01T00:00:00Z"}
        }))
        .unwrap();
        orphaning.metadata.finalizers = Some(vec!["orphan".into()]);
        assert!(!is_deleting(&orphaning), "--cascade=orphan keeps the pods");
        orphaning.metadata.finalizers = Some(vec!["foregroundDeletion".into()]);
        assert!(is_deleting(&orphaning));
        assert_eq!(judge(&owner, &ds("uid-1", true)), Some(Removal::Deleting));
        assert_eq!(judge(&owner, &ds("uid-2", false)), Some(Removal::Replaced));
        assert_eq!(
            judge(
                &owner,
                &Seen::DaemonSetDeleted {
                    uid: "uid-1".into()
                }
            ),
            Some(Removal::Deleted)
        );
        // The deletion of an object we never owned (a replacement's) says nothing of ours.
        assert_eq!(
            judge(
                &owner,
                &Seen::DaemonSetDeleted {
                    uid: "uid-9".into()
                }
            ),
            None
        );
        assert_eq!(
            judge(&owner, &Seen::DaemonSetListed { found: false }),
            Some(Removal::Deleted)
        );
        assert_eq!(judge(&owner, &Seen::DaemonSetListed { found: true }), None);
        assert_eq!(judge(&owner, &Seen::Namespace { deleting: false }), None);
        assert_eq!(
            judge(&owner, &Seen::Namespace { deleting: true }),
            Some(Removal::NamespaceDeleting)
        );
    }

    #[test]
    fn a_list_without_the_daemonset_is_its_deletion() {
        let mut listing = None;
        assert!(observe(Observed::DaemonSet(Event::Init), &mut listing).is_empty());
        assert_eq!(
            observe(Observed::DaemonSet(Event::InitDone), &mut listing),
            vec![Seen::DaemonSetListed { found: false }]
        );
        let mut ds = DaemonSet::default();
        ds.metadata.uid = Some("uid-1".into());
        observe(Observed::DaemonSet(Event::Init), &mut listing);
        observe(Observed::DaemonSet(Event::InitApply(ds)), &mut listing);
        assert_eq!(
            observe(Observed::DaemonSet(Event::InitDone), &mut listing),
            vec![Seen::DaemonSetListed { found: true }]
        );
    }

    #[test]
    fn the_owner_is_the_controlling_daemonset_only() {
        let pod = |refs: serde_json::Value| -> core::Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "meshlet-x", "namespace": "meshlet-system", "ownerReferences": refs}
            }))
            .unwrap()
        };
        let ds = serde_json::json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "meshlet", "uid": "u", "controller": true});
        assert_eq!(
            Owner::of(&pod(serde_json::json!([ds]))),
            Some(Owner {
                namespace: "meshlet-system".into(),
                name: "meshlet".into(),
                uid: "u".into(),
            })
        );
        let mut not_controller = ds.clone();
        not_controller["controller"] = false.into();
        assert_eq!(Owner::of(&pod(serde_json::json!([not_controller]))), None);
        let mut replica_set = ds.clone();
        replica_set["kind"] = "ReplicaSet".into();
        assert_eq!(Owner::of(&pod(serde_json::json!([replica_set]))), None);
        assert_eq!(Owner::of(&pod(serde_json::json!([]))), None);
    }
}
