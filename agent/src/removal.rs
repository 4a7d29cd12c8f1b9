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
//! - it carries a `deletionTimestamp` (foreground deletion),
//! - a DaemonSet of that name has another UID (deleted and created again), or
//! - the namespace carries a `deletionTimestamp` (`kubectl delete -k` deletes the namespace first).
//!
//! The watches are established while the agent's RBAC still stands and keep delivering events
//! after an uninstall has deleted the ClusterRoleBinding (the API server authorizes a watch when
//! it starts), so the decision is made in time even when everything goes in one `kubectl delete`.
//! Only positive evidence counts: an API server that cannot be reached, or refuses, leaves the
//! answer "not removed", and capture stays.

use std::fmt;

use futures::{StreamExt as _, stream};
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1 as core};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::watcher::{self, Event},
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

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
    .map(|event| event.map(Observed::DaemonSet));
    let namespaces = watcher::watcher(Api::<core::Namespace>::all(client), by_name(&namespace))
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
                 instead of keeping it for a successor"
            );
            removal.send_replace(Some(decided));
            return;
        }
    }
}

/// A watch event of either kind.
enum Observed {
    DaemonSet(Event<DaemonSet>),
    Namespace(Event<core::Namespace>),
}

fn observe(event: Observed, listing: &mut Option<bool>) -> Vec<Seen> {
    let daemonset = |ds: &DaemonSet| Seen::DaemonSet {
        uid: ds.uid().unwrap_or_default(),
        deleting: ds.metadata.deletion_timestamp.is_some(),
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
