//! Sources of workloads: the Kubernetes API (`--source kube`) and a file of Kubernetes YAML
//! (`--source file:<path>`). Both convert objects with [`convert`] and feed the same
//! [`Store`](crate::workload::Store), and both report when they have synced.

pub mod convert;
pub mod file;
pub mod kube;

use std::{collections::BTreeMap, path::PathBuf, str::FromStr, sync::Mutex};

use tokio::sync::watch;

use crate::workload::model::Kind;

/// Where workloads come from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase", tag = "type", content = "path")]
pub enum SourceConfig {
    /// The Kubernetes API (in-cluster config, or `KUBECONFIG`).
    Kube,
    /// A multi-document Kubernetes YAML file, reloaded when it changes.
    File(PathBuf),
}

impl FromStr for SourceConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kube" => Ok(Self::Kube),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(path.into())),
                _ => Err(format!(
                    "unknown source {s:?}: expected `kube` or `file:<path>`"
                )),
            },
        }
    }
}

/// Which kinds a source has synced (delivered its full initial list, and not lost since).
#[derive(Debug)]
pub struct SyncState {
    kinds: Mutex<BTreeMap<Kind, bool>>,
    all: watch::Sender<bool>,
}

impl Default for SyncState {
    fn default() -> Self {
        Self {
            kinds: Mutex::new(Kind::ALL.iter().map(|&k| (k, false)).collect()),
            all: watch::Sender::new(false),
        }
    }
}

impl SyncState {
    /// Records whether `kind` is in sync.
    pub fn set(&self, kind: Kind, synced: bool) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        kinds.insert(kind, synced);
        let all = kinds.values().all(|&s| s);
        self.all
            .send_if_modified(|current| std::mem::replace(current, all) != all);
    }

    /// Records every kind at once (a file reload).
    pub fn set_all(&self, synced: bool) {
        for kind in Kind::ALL {
            self.set(kind, synced);
        }
    }

    /// Whether every kind is in sync.
    pub fn synced(&self) -> bool {
        *self.all.borrow()
    }

    /// The kinds not in sync.
    pub fn unsynced(&self) -> Vec<Kind> {
        let kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        kinds
            .iter()
            .filter(|(_, s)| !**s)
            .map(|(k, _)| *k)
            .collect()
    }

    /// A receiver that follows "every kind in sync".
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.all.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_source_flags() {
        assert_eq!("kube".parse::<SourceConfig>(), Ok(SourceConfig::Kube));
        assert_eq!(
            "file:/etc/m.yaml".parse::<SourceConfig>(),
            Ok(SourceConfig::File("/etc/m.yaml".into()))
        );
        assert!("file:".parse::<SourceConfig>().is_err());
        assert!(
            "etcd"
                .parse::<SourceConfig>()
                .unwrap_err()
                .contains("expected `kube` or `file:<path>`")
        );
    }

    #[test]
    fn synced_only_when_every_kind_is() {
        let state = SyncState::default();
        assert!(!state.synced());
        for kind in Kind::ALL {
            state.set(kind, true);
        }
        assert!(state.synced());
        state.set(Kind::Pod, false);
        assert!(!state.synced());
        assert_eq!(state.unsynced(), [Kind::Pod]);
    }
}
