//! The pods this agent serves, by address: what makes the same-node path possible.
//!
//! When a mesh pod connects to another mesh pod of the same node, the agent holds both ends: the
//! client's identity (whose certificate it would present) and the server's listeners. Tunnelling
//! through TLS and HTTP/2 to itself would protect nothing (no byte leaves the node's memory) and
//! cost most of the connection's CPU. So the outbound side hands such a connection straight to
//! the destination pod's inbound admission ([`super::inbound`]), with the client's identity as
//! the peer's: PeerAuthentication, AuthorizationPolicy, the connection budgets, the policy
//! re-checks, the metrics and the access log are the same code as for a tunnelled connection.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock, Weak},
};

use super::PodContext;

/// Enrolled pods with open listeners, by each of their addresses.
#[derive(Debug, Default)]
pub struct LocalPods {
    by_ip: RwLock<HashMap<IpAddr, Weak<PodContext>>>,
}

impl LocalPods {
    /// The local pod at `ip`, if this agent serves one there.
    pub fn get(&self, ip: IpAddr) -> Option<Arc<PodContext>> {
        let by_ip = self.by_ip.read().unwrap_or_else(|p| p.into_inner());
        by_ip.get(&ip.to_canonical()).and_then(Weak::upgrade)
    }

    /// Serves `pod`'s addresses until the returned registration is dropped.
    pub fn register(self: &Arc<Self>, pod: &Arc<PodContext>) -> Registration {
        let mut by_ip = self.by_ip.write().unwrap_or_else(|p| p.into_inner());
        for ip in &pod.ips {
            by_ip.insert(ip.to_canonical(), Arc::downgrade(pod));
        }
        Registration {
            pods: Arc::downgrade(self),
            pod: Arc::downgrade(pod),
            ips: pod.ips.clone(),
        }
    }
}

/// A pod's entry in [`LocalPods`], removed on drop (unless another pod took the address since).
#[derive(Debug)]
pub struct Registration {
    pods: Weak<LocalPods>,
    pod: Weak<PodContext>,
    ips: Vec<IpAddr>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(pods) = self.pods.upgrade() else {
            return;
        };
        let mut by_ip = pods.by_ip.write().unwrap_or_else(|p| p.into_inner());
        for ip in &self.ips {
            let ip = ip.to_canonical();
            if by_ip.get(&ip).is_some_and(|held| held.ptr_eq(&self.pod)) {
                by_ip.remove(&ip);
            }
        }
    }
}
