//! `namespaces.json`: the agent's capture decisions, written beside its CNI socket for the
//! times the agent cannot answer (a node reboot, a restart, an agent that has not synced).
//!
//! `meshlet-cni` reads it only then, to tell a pod that must not start uncaptured (its
//! namespace is ambient, or the pod was labelled ambient when the agent last saw it) from any
//! other pod, which starts at once. Pods are listed by name for this node only: after a
//! reboot, the node's pods come back with the same names.

use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::{
    source::SyncState,
    workload::{
        Store,
        enrollment::{AMBIENT, NONE, Rules},
    },
};

/// The file's name, in the directory of the agent's CNI socket.
pub const FILE_NAME: &str = "namespaces.json";

/// The decisions file beside `socket`.
pub fn path_beside(socket: &Path) -> PathBuf {
    socket
        .parent()
        .unwrap_or_else(|| Path::new("/"))
        .join(FILE_NAME)
}

/// What the plugin needs to decide without the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decisions {
    /// The node the agent serves.
    pub node: String,
    /// Namespaces labelled `meshlet.io/dataplane-mode=ambient` (or Istio's label, with
    /// `--istio-labels`).
    pub captured_namespaces: BTreeSet<String>,
    /// This node's pods labelled ambient in other namespaces (`namespace/name`).
    pub captured_pods: BTreeSet<String>,
    /// This node's pods labelled `none` in ambient namespaces (`namespace/name`).
    pub opted_out_pods: BTreeSet<String>,
}

impl Decisions {
    /// The decisions the store implies for node `node`, under the enrollment `rules`.
    pub fn from_store(store: &Store, node: &str, rules: Rules) -> Self {
        let captured_namespaces: BTreeSet<String> = store
            .namespaces()
            .iter()
            .filter(|ns| rules.mode(&ns.labels) == Some(AMBIENT))
            .map(|ns| ns.name.clone())
            .collect();
        let mut decisions = Self {
            node: node.to_owned(),
            captured_namespaces,
            ..Self::default()
        };
        for pod in store.pods() {
            if pod.node_name.as_deref() != Some(node) || pod.host_network {
                continue;
            }
            let in_ambient = decisions.captured_namespaces.contains(&pod.key.namespace);
            if rules.has_sidecar(&pod) {
                if in_ambient {
                    decisions.opted_out_pods.insert(pod.key.to_string());
                }
                continue;
            }
            match rules.mode(&pod.labels) {
                Some(AMBIENT) if !in_ambient => {
                    decisions.captured_pods.insert(pod.key.to_string());
                }
                Some(NONE) if in_ambient => {
                    decisions.opted_out_pods.insert(pod.key.to_string());
                }
                _ => {}
            }
        }
        decisions
    }

    /// Whether the pod `namespace/name` must not start uncaptured.
    pub fn must_capture(&self, namespace: &str, name: &str) -> bool {
        let pod = format!("{namespace}/{name}");
        if self.opted_out_pods.contains(&pod) {
            return false;
        }
        self.captured_namespaces.contains(namespace) || self.captured_pods.contains(&pod)
    }

    /// Reads the file; `Ok(None)` when there is none (the agent never ran here).
    pub fn read(path: &Path) -> io::Result<Option<Self>> {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))
    }

    /// Replaces the file atomically and durably: a reader sees the old file or the new one,
    /// never half, and the file survives a power cut right after (it exists for reboots).
    pub fn write(&self, path: &Path) -> io::Result<()> {
        use std::io::Write as _;
        let tmp = path.with_extension(format!("{}.json.tmp", std::process::id()));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(self)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Keeps the file at `path` equal to what the store implies, once the source has synced
/// (before that the store is incomplete, and the last agent's file is the better guess).
pub async fn follow(
    store: Arc<Store>,
    sync: Arc<SyncState>,
    node: String,
    rules: Rules,
    path: PathBuf,
) {
    let mut synced = sync.subscribe();
    if synced.wait_for(|s| *s).await.is_err() {
        return;
    }
    let mut changes = store.subscribe();
    let mut written: Option<Decisions> = Decisions::read(&path).ok().flatten();
    loop {
        let decisions = Decisions::from_store(&store, &node, rules);
        if written.as_ref() != Some(&decisions) {
            match decisions.write(&path) {
                Ok(()) => written = Some(decisions),
                Err(err) => {
                    warn!(path = %path.display(), %err, "cannot write the CNI decisions file")
                }
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
        // Let a burst of changes (a resync) settle.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::model::{DATAPLANE_MODE_LABEL, Namespace, Object, ObjectKey, Pod};

    fn pod(ns: &str, name: &str, node: &str, mode: Option<&str>) -> Object {
        Object::Pod(Pod {
            key: ObjectKey::new(ns, name),
            uid: format!("uid-{name}"),
            labels: mode
                .map(|m| (DATAPLANE_MODE_LABEL.to_owned(), m.to_owned()))
                .into_iter()
                .collect(),
            annotations: Default::default(),
            service_account: "default".into(),
            node_name: Some(node.into()),
            ips: vec![],
            host_network: false,
            phase: "Pending".into(),
            ready: false,
            owner: None,
            names: Default::default(),
        })
    }

    #[test]
    fn the_file_says_which_pods_must_not_start_uncaptured() {
        let store = Store::new();
        for (name, mode) in [("demo", Some(AMBIENT)), ("legacy", None)] {
            store.upsert(Object::Namespace(Namespace {
                name: name.into(),
                labels: mode
                    .map(|m| (DATAPLANE_MODE_LABEL.to_owned(), m.to_owned()))
                    .into_iter()
                    .collect(),
            }));
        }
        store.upsert(pod("demo", "out", "node-0", Some(NONE)));
        store.upsert(pod("legacy", "in", "node-0", Some(AMBIENT)));
        store.upsert(pod("legacy", "elsewhere", "node-1", Some(AMBIENT)));
        let decisions = Decisions::from_store(&store, "node-0", Rules::default());
        assert!(decisions.must_capture("demo", "new-pod"));
        assert!(!decisions.must_capture("demo", "out"));
        assert!(decisions.must_capture("legacy", "in"));
        assert!(!decisions.must_capture("legacy", "other"));
        assert!(
            !decisions.must_capture("legacy", "elsewhere"),
            "another node's pod"
        );

        let dir = std::env::temp_dir().join(format!("meshlet-decisions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE_NAME);
        assert_eq!(Decisions::read(&path).unwrap(), None);
        decisions.write(&path).unwrap();
        assert_eq!(Decisions::read(&path).unwrap(), Some(decisions));
        std::fs::write(&path, "{not json").unwrap();
        assert_eq!(
            Decisions::read(&path).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn istios_labels_decide_too_unless_turned_off() {
        use crate::workload::enrollment::{
            ISTIO_DATAPLANE_MODE_LABEL, ISTIO_SIDECAR_STATUS_ANNOTATION,
        };
        let store = Store::new();
        store.upsert(Object::Namespace(Namespace {
            name: "bookinfo".into(),
            labels: [(ISTIO_DATAPLANE_MODE_LABEL.to_owned(), AMBIENT.to_owned())].into(),
        }));
        let Object::Pod(mut sidecar) = pod("bookinfo", "sidecar", "node-0", None) else {
            unreachable!()
        };
        sidecar.annotations =
            [(ISTIO_SIDECAR_STATUS_ANNOTATION.to_owned(), "{}".to_owned())].into();
        store.upsert(Object::Pod(sidecar));
        let istio = Decisions::from_store(&store, "node-0", Rules { istio_labels: true });
        assert!(istio.must_capture("bookinfo", "new-pod"));
        assert!(!istio.must_capture("bookinfo", "sidecar"), "{istio:?}");
        assert!(
            istio.opted_out_pods.contains("bookinfo/sidecar"),
            "{istio:?}"
        );
        let meshlet_only = Decisions::from_store(
            &store,
            "node-0",
            Rules {
                istio_labels: false,
            },
        );
        assert!(!meshlet_only.must_capture("bookinfo", "new-pod"));
    }
}
