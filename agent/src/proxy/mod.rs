//! The per-node proxy, serving each enrolled pod's in-pod listeners:
//!
//! - 15001 (outbound, [`outbound`]): a captured connection's original destination is looked
//!   up in the store; a Service VIP is resolved to a ready endpoint (round robin); a mesh
//!   workload is reached through an [`hbone`] tunnel to its 15008 with the source pod's
//!   identity; anything else is passed through in plaintext.
//! - 15008 (inbound HBONE, [`inbound`]): mTLS with the pod's identity, CONNECT admitted only to
//!   the pod's own addresses, then carried to the application.
//! - 15006 (inbound plaintext, [`passthrough`]): carried to the application.
//!
//! Every socket the proxy makes is marked and made inside the pod's network namespace, so the
//! pod's address is the source on the wire and capture never loops.

pub mod hbone;
pub mod inbound;
pub mod outbound;
pub mod passthrough;

use std::{
    net::IpAddr,
    sync::{Arc, atomic::AtomicUsize},
};

use crate::{
    identity::{self, Identity},
    sys::Netns,
    workload::{
        Store,
        enrollment::{self, Decision},
        model::{ObjectKey, Pod},
    },
};

/// Buffer size of each direction of a proxied connection: large enough that a bulk transfer
/// moves in few syscalls and TLS records.
pub const COPY_BUFFER: usize = 64 * 1024;

/// What every listener of every pod on this node shares.
pub struct Proxy {
    /// The workload store.
    pub store: Arc<Store>,
    /// Certificates of the local service accounts.
    pub identities: Arc<identity::Manager>,
    /// Pooled HBONE connections.
    pub pool: Arc<hbone::Pool>,
    round_robin: AtomicUsize,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("trust_domain", &self.identities.trust_domain())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// The proxy of one node.
    pub fn new(store: Arc<Store>, identities: Arc<identity::Manager>) -> Self {
        Self {
            store,
            identities,
            pool: Arc::new(hbone::Pool::new()),
            round_robin: AtomicUsize::new(0),
        }
    }

    /// The SPIFFE identity of `pod`.
    pub fn identity_of(&self, pod: &Pod) -> Result<Identity, identity::Error> {
        Identity::new(
            self.identities.trust_domain(),
            &pod.key.namespace,
            &pod.service_account,
        )
    }

    /// Whether `pod` is a mesh workload (captured by the agent of its own node), so that it
    /// is reached through HBONE.
    pub fn is_mesh(&self, pod: &Pod) -> bool {
        let Some(node) = pod.node_name.as_deref() else {
            return false;
        };
        let namespace = self.store.namespace(&pod.key.namespace);
        enrollment::decide(pod, namespace.as_deref(), node) == Decision::Enroll
    }
}

/// The pod a listener serves.
#[derive(Debug)]
pub struct PodContext {
    /// The pod.
    pub key: ObjectKey,
    /// Its network namespace, where the proxy's sockets are made.
    pub netns: Arc<Netns>,
    /// Its SPIFFE identity.
    pub identity: Identity,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
}

impl PodContext {
    /// The pod's address of the same family as `like`.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == like.to_canonical().is_ipv4())
    }
}
