//! Live inbound connections, so a policy change can re-check them and close the ones it now
//! denies.
//!
//! Each admitted connection registers what a policy decision needs (source identity and
//! address, destination pod and address) and gets a [`Live`] handle that its copy task selects
//! on: when a re-check denies it, the handle fires and the task drops both sockets. The entry
//! is removed when the handle is dropped (the connection ended).
//!
//! The handle is held for as long as the connection is idle, so it is small: one [`Notify`]
//! and the reason, about 100 bytes (a `watch` channel's state is four times that).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::Notify;

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
    close: Arc<Close>,
}

/// The close signal of one connection: the reason, set once, then the wake-up.
#[derive(Debug, Default)]
struct Close {
    reason: OnceLock<String>,
    notify: Notify,
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
    close: Arc<Close>,
}

impl Live {
    /// Resolves, with the reason, when the connection must be closed. Cancel-safe: the reason
    /// stays set, and a wake-up that came before the wait is kept as `Notify`'s permit.
    pub async fn closed(&mut self) -> String {
        loop {
            if let Some(reason) = self.close.reason.get() {
                return reason.clone();
            }
            self.close.notify.notified().await;
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
        let close = Arc::new(Close::default());
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Entry {
                info,
                close: close.clone(),
            },
        );
        Live {
            id,
            registry: self.clone(),
            close,
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
            if entry.close.reason.get().is_none()
                && let Some(reason) = verdict(&entry.info)
                && entry.close.reason.set(reason).is_ok()
            {
                entry.close.notify.notify_one();
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

    #[tokio::test]
    async fn a_connection_waiting_for_its_close_is_woken_with_the_reason() {
        let registry = Registry::new();
        let mut live = registry.register(info(80));
        let waiting = tokio::spawn(async move { live.closed().await });
        // The waiter has registered with the Notify or not yet: either way it sees the reason.
        tokio::task::yield_now().await;
        assert_eq!(
            registry.recheck(|_| Some("denied by demo/deny-all".into())),
            1
        );
        assert_eq!(waiting.await.unwrap(), "denied by demo/deny-all");
        assert!(
            registry.is_empty(),
            "the handle unregistered when its task ended"
        );
    }
}
