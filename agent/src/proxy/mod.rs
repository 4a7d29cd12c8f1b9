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

pub mod connections;
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
    policy,
    sys::Netns,
    workload::{
        Store,
        enrollment::{self, Decision},
        model::{ObjectKey, Pod, Service},
    },
};

/// Buffer size of each direction of a proxied connection: large enough that a bulk transfer
/// moves in few syscalls and TLS records.
pub const COPY_BUFFER: usize = 64 * 1024;

/// Copies both ways between a client-facing stream and its upstream until both directions are
/// done, passing half-closes on; returns the bytes each way.
pub async fn copy<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await
}

/// What every listener of every pod on this node shares.
pub struct Proxy {
    /// The workload store.
    pub store: Arc<Store>,
    /// Certificates of the local service accounts.
    pub identities: Arc<identity::Manager>,
    /// Pooled HBONE connections.
    pub pool: Arc<hbone::Pool>,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Live inbound connections, re-checked when policies change.
    pub connections: Arc<connections::Registry>,
    /// The policies in force, and the store's policy objects they were compiled from.
    policies: std::sync::RwLock<(Vec<Arc<crate::workload::model::Policy>>, Arc<policy::Index>)>,
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
    pub fn new(
        store: Arc<Store>,
        identities: Arc<identity::Manager>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            metrics,
            store,
            identities,
            pool: Arc::new(hbone::Pool::new()),
            connections: connections::Registry::new(),
            policies: std::sync::RwLock::new((Vec::new(), Arc::new(policy::Index::default()))),
            round_robin: AtomicUsize::new(0),
        }
    }

    /// The compiled policies in force.
    pub fn policies(&self) -> Arc<policy::Index> {
        self.policies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Recompiles the policies if the store's policy objects changed, then re-checks every live
    /// inbound connection (a pod's labels may have changed too) and closes those now denied.
    /// Returns how many were closed, and whether the policies were recompiled.
    pub fn refresh_policies(&self) -> (usize, bool) {
        let objects = self.store.policies();
        let (index, recompiled) = {
            let mut current = self.policies.write().unwrap_or_else(|p| p.into_inner());
            let unchanged = current.0.len() == objects.len()
                && current.0.iter().zip(&objects).all(|(a, b)| a == b);
            if !unchanged {
                let index = Arc::new(policy::Index::build(
                    &objects,
                    policy::DEFAULT_ROOT_NAMESPACE,
                ));
                *current = (objects, index);
            }
            (current.1.clone(), !unchanged)
        };
        let closed = self.connections.recheck(|connection| {
            let pod = self.store.pod_by_ip(connection.destination.ip())?;
            self.check(
                &index,
                &pod,
                connection.destination,
                connection.source_identity.as_ref(),
                connection.source.ip(),
            )
            .err()
        });
        (closed, recompiled)
    }

    /// Whether a connection to `destination` on `pod` from `source` (identity `None` for
    /// plaintext) is allowed: PeerAuthentication first (plaintext to a STRICT port is refused),
    /// then AuthorizationPolicy. `Err` carries the reason, for logs.
    pub fn check(
        &self,
        index: &policy::Index,
        pod: &Pod,
        destination: std::net::SocketAddr,
        source: Option<&Identity>,
        source_ip: IpAddr,
    ) -> Result<(), String> {
        let workload = policy::Workload::from(pod);
        if source.is_none()
            && !index
                .peer_authentication(workload, destination.port())
                .allows_plaintext()
        {
            return Err("plaintext refused: PeerAuthentication STRICT".to_owned());
        }
        let request = policy::Request {
            workload,
            destination,
            source,
            source_ip,
        };
        let decision = index.authorize(&request);
        if decision.allowed {
            Ok(())
        } else {
            Err(match decision.policy {
                Some(policy) => format!("denied by {policy} ({})", decision.reason),
                None => format!("denied ({})", decision.reason),
            })
        }
    }

    /// Istio connection labels, from what the caller already resolved: the source pod (when
    /// this node's pod is the client), the destination pod, its identity when it is reached
    /// through the mesh, and the Service addressed.
    pub fn labels(
        &self,
        reporter: &'static str,
        source: Option<&PodContext>,
        destination: Option<&ObjectKey>,
        destination_principal: Option<&Identity>,
        service: Option<&Service>,
    ) -> crate::metrics::ConnectionLabels {
        let unknown = || "unknown".to_owned();
        crate::metrics::ConnectionLabels {
            reporter,
            source_workload: source.map_or_else(unknown, |p| p.key.name.clone()),
            source_workload_namespace: source.map_or_else(unknown, |p| p.key.namespace.clone()),
            source_principal: source.map_or_else(unknown, |p| p.identity.to_string()),
            destination_workload: destination.map_or_else(unknown, |k| k.name.clone()),
            destination_workload_namespace: destination
                .map_or_else(unknown, |k| k.namespace.clone()),
            destination_principal: destination_principal.map_or_else(unknown, ToString::to_string),
            destination_service: service.map_or_else(unknown, |s| {
                format!(
                    "{}.{}.svc.{}",
                    s.key.name,
                    s.key.namespace,
                    self.identities.trust_domain()
                )
            }),
            request_protocol: "tcp",
            connection_security_policy: if destination_principal.is_some() {
                "mutual_tls"
            } else {
                "unknown"
            },
            response_flags: "-",
        }
    }

    /// Istio connection labels for an inbound connection to this node's pod `destination`,
    /// from `source_ip` with identity `source` (`None`: plaintext), reported by the destination.
    pub fn inbound_labels(
        &self,
        source: Option<&Identity>,
        source_ip: IpAddr,
        destination: &PodContext,
    ) -> crate::metrics::ConnectionLabels {
        let mut labels = self.labels(
            "destination",
            None,
            Some(&destination.key),
            Some(&destination.identity),
            None,
        );
        if let Some(pod) = self.store.pod_by_ip(source_ip) {
            labels.source_workload = pod.key.name.clone();
            labels.source_workload_namespace = pod.key.namespace.clone();
        }
        match source {
            Some(identity) => labels.source_principal = identity.to_string(),
            None => labels.connection_security_policy = "unknown",
        }
        labels
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

/// Accepts on one of a pod's listeners until the task is dropped, handing each connection
/// (with TCP_NODELAY: the proxy forwards small writes as they come) to `carry` in a task of its
/// own, which outlives the listener: dropping the listener stops new connections only.
pub async fn accept_loop<F, Fut>(listener: tokio::net::TcpListener, pod: Arc<PodContext>, carry: F)
where
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(carry(stream, peer));
            }
            Err(err) => {
                // Out of descriptors and the like: back off rather than spin.
                let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
                tracing::warn!(pod = %pod.key, port, %err, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
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
