//! Live inbound connections, so a policy change can re-check them and close the ones it now
//! denies.
//!
//! Each admitted connection registers what a policy decision needs (source identity and
//! address, destination pod and address) and gets a [`Live`] handle that its copy task selects
//! on: when a re-check denies it, the handle fires and the task drops both sockets. The entry
//! is removed when the handle is dropped (the connection ended).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::watch;

use crate::{identity::Identity, workload::model::ObjectKey};

/// What a policy decision about one connection needs.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The client's identity (`None` for plaintext).
    pub source_identity: Option<Identity>,
    /// The client's address.
    pub source: SocketAddr,
    /// The destination pod.
    pub destination_pod: ObjectKey,
    /// The destination address.
    pub destination: SocketAddr,
}

#[derive(Debug)]
struct Entry {
    info: ConnectionInfo,
    close: watch::Sender<Option<String>>,
}

/// The registry of one node's live inbound connections.
#[derive(Debug, Default)]
pub struct Registry {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Entry>>,
}

/// A registered connection: fires when a re-check closes it; unregisters on drop.
#[derive(Debug)]
pub struct Live {
    id: u64,
    registry: Arc<Registry>,
    closed: watch::Receiver<Option<String>>,
}

impl Live {
    /// Resolves, with the reason, when the connection must be closed.
    pub async fn closed(&mut self) -> String {
        let reason = self
            .closed
            .wait_for(Option::is_some)
            .await
            .map(|reason| reason.clone().unwrap_or_default());
        match reason {
            Ok(reason) => reason,
            // The registry entry is gone: never closed by policy.
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.registry
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers a connection.
    pub fn register(self: &Arc<Self>, info: ConnectionInfo) -> Live {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = watch::channel(None);
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Entry { info, close });
        Live {
            id,
            registry: self.clone(),
            closed,
        }
    }

    /// How many connections are live.
    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-checks every live connection with `verdict` (`Some(reason)` closes it); returns how
    /// many were closed.
    pub fn recheck(&self, verdict: impl Fn(&ConnectionInfo) -> Option<String>) -> usize {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for entry in live.values() {
            if entry.close.borrow().is_none()
                && let Some(reason) = verdict(&entry.info)
            {
                let _ = entry.close.send(Some(reason));
                closed += 1;
            }
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(port: u16) -> ConnectionInfo {
        ConnectionInfo {
            source_identity: None,
            source: "10.0.0.1:1000".parse().unwrap(),
            destination_pod: ObjectKey::new("demo", "server"),
            destination: SocketAddr::from(([10, 0, 0, 2], port)),
        }
    }

    #[tokio::test]
    async fn recheck_closes_only_what_the_verdict_denies_and_entries_leave_on_drop() {
        let registry = Registry::new();
        let mut denied = registry.register(info(80));
        let kept = registry.register(info(443));
        assert_eq!(registry.len(), 2);
        let closed = registry
            .recheck(|c| (c.destination.port() == 80).then(|| "denied by demo/deny-80".to_owned()));
        assert_eq!(closed, 1);
        assert_eq!(denied.closed().await, "denied by demo/deny-80");
        // Already closing: not counted twice.
        assert_eq!(registry.recheck(|_| Some("again".into())), 1);
        drop(kept);
        drop(denied);
        assert!(registry.is_empty());
    }
}
