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
//!
//! Every listener runs the one [`accept_loop`], which applies the per-pod connection limit (the
//! socket options are the listener's, inherited by what it accepts), and every connection is accounted in one [`record::Record`]. Nothing that
//! comes through the proxy comes back into it: inbound admission refuses original destinations
//! on meshlet's own ports ([`Limits::reserved_ports`]), and the proxy's own sockets carry the
//! mesh mark that capture skips. Each bound in [`Limits`] is a flag and counted in
//! `meshlet_proxy_limit_total`.

pub mod connections;
pub mod copy;
pub mod h2io;
pub mod hbone;
pub mod inbound;
pub mod local;
pub mod outbound;
pub mod passthrough;
pub mod record;
pub mod shards;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use meshlet_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use tokio::{
    net::{TcpSocket, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use crate::{
    identity::{self, Identity},
    metrics::{ConnectionLabels, Peer, ServiceName},
    policy,
    sys::{Netns, socket, transparent},
    workload::{
        Store,
        enrollment::{self, Decision},
        model::{
            ISTIO_REDIRECTION_ANNOTATION, ObjectKey, Pod, REDIRECTION_ANNOTATION,
            REDIRECTION_ENABLED, Service,
        },
    },
};

/// Resource bounds, guards and transport settings of the proxy (each a `meshlet agent` flag).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// How long a connect to an upstream (the application, a passthrough destination, a peer's
    /// 15008) may take.
    pub connect_timeout: Duration,
    /// Idle time before TCP keepalive probes start on every proxied socket (then 3 probes,
    /// 1/3 of it apart): a peer that vanished is noticed and its connection freed.
    pub tcp_keepalive: Duration,
    /// Concurrent connections the proxy carries for one pod (accepted on its listeners, plus
    /// HBONE streams admitted to it): a flood at one pod cannot exhaust the node. `None`: sized
    /// from the open-files limit ([`Budgets::for_descriptors`]).
    pub max_connections_per_pod: Option<usize>,
    /// Concurrent TLS handshakes per 15008 listener; more wait (within the handshake timeout).
    pub max_tls_handshakes: usize,
    /// HTTP/2 limits per HBONE peer connection.
    pub hbone: hbone::Limits,
    /// Original destination ports the proxy never carries to (its own listeners and the
    /// node's endpoints): what comes through the proxy never comes back into it.
    pub reserved_ports: Vec<u16>,
    /// Congestion control of the tunnel's TCP connections, both ends (`None`, the default: the
    /// pod namespace's, as the pod's own connections would have: the tunnel crosses the
    /// network the operator chose it for).
    pub tunnel_congestion_control: Option<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(180),
            max_connections_per_pod: None,
            max_tls_handshakes: 64,
            hbone: hbone::Limits::default(),
            reserved_ports: vec![OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT],
            tunnel_congestion_control: None,
        }
    }
}

/// How much the proxy carries at once, per pod and for the whole node, sized so that the
/// agent never runs out of descriptors. A pod's budget counts its connections. The node's
/// counts the descriptors they hold, one slot per socket, because what a connection holds
/// depends on its path: a tunneled one holds one socket at each agent (the accepted socket at
/// the client's, the application's at the server's; its HBONE stream shares the tunnel's
/// socket, which holds a slot of its own), a plaintext or same-node one two. Counting two per
/// connection would leave half the descriptors unused where the mesh carries its traffic. The
/// tunnels a pod's connections ride count for the node, not for the pod (the pool keeps one
/// idle a while per destination); idle ones are a cache, closed when the node's budget is
/// spent ([`PodContext::socket_slot`]), so the idle tunnels a pod left to many destinations
/// do not keep another pod's connections out. Each enrolled pod holds
/// [`Budgets::POD_DESCRIPTORS`] slots for its own descriptors (listeners, namespace, sockets made ahead), so the budget shrinks
/// as pods come; [`Budgets::RESERVED_DESCRIPTORS`] stay for the agent's own (splice pipes: up
/// to [`copy::MAX_PIPES`], the API watch, the endpoints, files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Budgets {
    /// Connections per pod.
    pub per_pod: usize,
    /// Descriptors (sockets) for the whole node.
    pub per_node: usize,
}

impl Budgets {
    /// Descriptors kept out of the connection budget.
    pub const RESERVED_DESCRIPTORS: u64 = 2048;
    /// Slots of the node's budget an enrolled pod holds for its own descriptors: its listeners
    /// (6), its namespace (1), the upstream sockets made ahead in it
    /// ([`crate::sys::netns::AHEAD`] per family, 8), and one spare.
    pub const POD_DESCRIPTORS: u32 = 16;
    /// The per-pod budget when the open-files limit allows it.
    pub const DEFAULT_PER_POD: usize = 10_000;

    /// The budgets for an agent allowed `open_files` descriptors: the node's is what the
    /// descriptors allow; a pod's is `per_pod` if given, else [`Self::DEFAULT_PER_POD`] or an
    /// eighth of the node's, whichever is smaller: at two sockets a connection at most, one
    /// pod's connections then hold at most a quarter of the node's descriptors, so a flood at
    /// one pod leaves room for the others.
    pub fn for_descriptors(open_files: u64, per_pod: Option<usize>) -> Self {
        let per_node = usize::try_from(open_files.saturating_sub(Self::RESERVED_DESCRIPTORS))
            .unwrap_or(usize::MAX)
            .max(1);
        let per_pod = per_pod
            .unwrap_or(Self::DEFAULT_PER_POD.min(per_node / 8))
            .clamp(1, per_node);
        Self { per_pod, per_node }
    }
}

impl Limits {
    /// Whether `port` is one of meshlet's own (never an original destination the proxy
    /// carries to).
    pub fn is_reserved(&self, port: u16) -> bool {
        port == 0 || self.reserved_ports.contains(&port)
    }
}

/// Copies both ways between a client-facing stream and its upstream until both directions are
/// done, passing half-closes on; returns the bytes each way. Buffers start small and grow for
/// bulk transfers ([`copy`](mod@copy)).
pub async fn copy<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: copy::ReadOwned + copy::WriteOwned + Unpin + ?Sized,
    B: copy::ReadOwned + copy::WriteOwned + Unpin + ?Sized,
{
    copy::bidirectional(a, b).await
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
    /// Resource bounds and guards.
    pub limits: Limits,
    /// Connection budgets (sized from the open-files limit).
    pub budgets: Budgets,
    /// The node's budget of sockets for carried connections, shared by every pod.
    pub node_budget: Arc<NodeBudget>,
    /// The policies in force (kept up to date by the agent; the proxy only reads them).
    pub policy_cache: Arc<policy::Cache>,
    /// Every carried connection, counted until it ends (and cut at the drain deadline).
    pub drain: crate::drain::Drain,
    /// The pods this agent serves, by address (the same-node path).
    pub local: Arc<local::LocalPods>,
    /// How connections are named in metrics and logs.
    pub telemetry: crate::metrics::Telemetry,
    /// Which labels enroll pods (here and, for routing, on other nodes).
    pub enrollment: enrollment::Rules,
    /// The threads listeners are served on ([`shards`]; none: the placing runtime).
    pub shards: shards::Shards,
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
        policy_cache: Arc<policy::Cache>,
        limits: Limits,
        budgets: Budgets,
    ) -> Self {
        Self {
            metrics,
            store,
            identities,
            policy_cache,
            limits,
            budgets,
            node_budget: Arc::new(NodeBudget::new(budgets.per_node)),
            pool: Arc::new(hbone::Pool::new()),
            connections: connections::Registry::new(),
            drain: crate::drain::Drain::new(),
            local: Arc::default(),
            telemetry: crate::metrics::Telemetry::default(),
            enrollment: enrollment::Rules::default(),
            shards: shards::Shards::inline(),
            round_robin: AtomicUsize::new(0),
        }
    }

    /// The compiled policies in force.
    pub fn policies(&self) -> Arc<policy::Index> {
        self.policy_cache.current()
    }

    /// Re-checks every live inbound connection against the policies in force (a policy or a
    /// pod's labels may have changed) and closes those now denied; returns how many.
    pub fn recheck_connections(&self) -> usize {
        let index = self.policies();
        self.connections.recheck(|connection| {
            let pod = self.store.pod_by_ip(connection.destination.ip())?;
            let request = policy::Request {
                workload: policy::Workload::from(&*pod),
                destination: connection.destination,
                source: connection.source_identity.as_ref(),
                source_ip: connection.source.ip(),
            };
            // Dry runs were counted when the connection was admitted.
            Self::decide(&index, &request)
                .err()
                .map(|refusal| refusal.reason)
        })
    }

    /// Whether a new connection to `destination` on `pod` from `source` (identity `None` for
    /// plaintext) is allowed: PeerAuthentication first (plaintext to a STRICT port is refused),
    /// then AuthorizationPolicy. Dry-run policies are evaluated alongside, logged and counted.
    /// `Ok` carries the ALLOW policy that admitted the connection, if one did.
    pub fn check(
        &self,
        index: &policy::Index,
        pod: &Pod,
        destination: SocketAddr,
        source: Option<&Identity>,
        source_ip: IpAddr,
    ) -> Result<Option<Arc<ObjectKey>>, Refusal> {
        let request = policy::Request {
            workload: policy::Workload::from(pod),
            destination,
            source,
            source_ip,
        };
        Self::peer_authentication(index, &request)?;
        index.dry_run(&request, |policy, would_allow| {
            let policy = policy.to_string();
            self.metrics.dry_run(&policy, would_allow);
            if !would_allow {
                tracing::info!(
                    %policy, workload = %pod.key, src = %source_ip, dst = %destination,
                    "dry-run policy would deny"
                );
            }
        });
        Self::authorize(index, &request)
    }

    /// [`Proxy::check`] without the dry runs.
    fn decide(
        index: &policy::Index,
        request: &policy::Request<'_>,
    ) -> Result<Option<Arc<ObjectKey>>, Refusal> {
        Self::peer_authentication(index, request)?;
        Self::authorize(index, request)
    }

    /// Refuses plaintext to a port whose PeerAuthentication is STRICT.
    fn peer_authentication(
        index: &policy::Index,
        request: &policy::Request<'_>,
    ) -> Result<(), Refusal> {
        if request.source.is_none()
            && !index
                .peer_authentication(request.workload, request.destination.port())
                .allows_plaintext()
        {
            return Err(Refusal {
                reason: "plaintext refused: PeerAuthentication STRICT".to_owned(),
                policy: None,
            });
        }
        Ok(())
    }

    fn authorize(
        index: &policy::Index,
        request: &policy::Request<'_>,
    ) -> Result<Option<Arc<ObjectKey>>, Refusal> {
        let decision = index.authorize(request);
        if decision.allowed {
            return Ok(decision.policy);
        }
        Err(Refusal {
            reason: match &decision.policy {
                Some(policy) => format!("denied by {policy} ({})", decision.reason),
                None => format!("denied ({})", decision.reason),
            },
            policy: decision.policy,
        })
    }

    /// `pod`'s names in Istio's telemetry (its principal `unknown`).
    pub fn peer(&self, pod: &Pod) -> Peer {
        Peer::of(pod, &self.telemetry.cluster_id)
    }

    /// `service`'s names in Istio's telemetry (`unknown` without one).
    fn service_name(&self, service: Option<&Service>) -> Arc<ServiceName> {
        service.map_or_else(ServiceName::unknown, |s| {
            ServiceName::of(s, &self.telemetry.cluster_domain)
        })
    }

    /// Istio connection labels, from what the caller already resolved: the source pod (when
    /// this node's pod is the client), the destination pod, its identity when it is reached
    /// through the mesh, and the Service addressed.
    pub fn labels(
        &self,
        reporter: &'static str,
        source: Option<&PodContext>,
        destination: Option<&Pod>,
        destination_principal: Option<&Identity>,
        service: Option<&Service>,
    ) -> ConnectionLabels {
        let mut destination = destination.map_or_else(Peer::default, |pod| self.peer(pod));
        if let Some(principal) = destination_principal {
            destination = destination.with_principal(principal.clone());
        }
        ConnectionLabels {
            reporter,
            source: source.map_or_else(Peer::default, |pod| pod.peer.clone()),
            destination,
            service: self.service_name(service),
            request_protocol: "tcp",
            connection_security_policy: if destination_principal.is_some() {
                "mutual_tls"
            } else {
                crate::metrics::UNKNOWN
            },
            response_flags: "-",
        }
    }

    /// Istio connection labels for an inbound connection to `to` on this node's pod
    /// `destination`, from `source_ip` with identity `source` (`None`: plaintext), reported by
    /// the destination. The source's workload names come from the pod that holds `source_ip`;
    /// its principal only from the identity the tunnel proved. The Service is the one `to`
    /// is a ready endpoint of (the client's Service is not carried in the tunnel).
    pub fn inbound_labels(
        &self,
        source: Option<&Identity>,
        source_ip: IpAddr,
        destination: &PodContext,
        to: SocketAddr,
    ) -> ConnectionLabels {
        let mut peer = self
            .store
            .pod_by_ip(source_ip)
            .map_or_else(Peer::default, |pod| self.peer(&pod));
        if let Some(identity) = source {
            peer = peer.with_principal(identity.clone());
        }
        ConnectionLabels {
            reporter: "destination",
            source: peer,
            destination: destination.peer.clone(),
            service: self.service_name(
                self.store
                    .service_by_endpoint(to, &destination.key.namespace)
                    .as_deref(),
            ),
            request_protocol: "tcp",
            connection_security_policy: if source.is_some() {
                "mutual_tls"
            } else {
                crate::metrics::UNKNOWN
            },
            response_flags: "-",
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

    /// Whether `pod` is reached through HBONE: it is a mesh workload, and the agent of its
    /// node confirmed that it captures it (`meshlet.io/redirection: enabled`, written by that
    /// agent; in a workload file, carried by the file). With Istio's labels read, Istio's
    /// `ambient.istio.io/redirection: enabled` confirms it too: the pod is on a ztunnel node,
    /// which serves HBONE on 15008 the same way. A labelled pod whose capture failed or has not
    /// happened yet serves no 15008, so it is reached in plaintext instead.
    pub fn is_mesh(&self, pod: &Pod) -> bool {
        let Some(node) = pod.node_name.as_deref() else {
            return false;
        };
        let enabled = |annotation| {
            pod.annotations.get(annotation).map(String::as_str) == Some(REDIRECTION_ENABLED)
        };
        let confirmed = enabled(REDIRECTION_ANNOTATION)
            || (self.enrollment.istio_labels && enabled(ISTIO_REDIRECTION_ANNOTATION));
        if !confirmed {
            return false;
        }
        let namespace = self.store.namespace(&pod.key.namespace);
        self.enrollment.decide(pod, namespace.as_deref(), node) == Decision::Enroll
    }

    /// Connects to `pod`'s application at `destination` on behalf of `client`: from the
    /// client's address where the pod preserves it (`PodContext::upstream_source`), from the
    /// pod's own otherwise.
    pub async fn connect_to_application(
        &self,
        pod: &PodContext,
        destination: SocketAddr,
        client: SocketAddr,
    ) -> io::Result<TcpStream> {
        let source = pod.upstream_source(client, destination);
        self.connect_in(&pod.netns, destination, source, Leg::OnNode)
            .await
    }

    /// Connects to `destination` from a marked socket made inside `netns` (the proxy's
    /// connections leave from the pod, with the pod's address, or from the address of
    /// `source`, a client's, with a transparent socket: [`crate::sys::transparent`]), within the
    /// connect timeout, with keepalive and `TCP_NODELAY`; a leg that stays on the node does not
    /// pace ([`socket::unpace`]).
    pub async fn connect_in(
        &self,
        netns: &Arc<Netns>,
        destination: SocketAddr,
        source: Option<SocketAddr>,
        leg: Leg,
    ) -> io::Result<TcpStream> {
        let Some(client) = source else {
            return self.connect_from(netns, destination, None, leg).await;
        };
        let mut tries = 1;
        loop {
            let port = transparent::source_port(client.port());
            let from = SocketAddr::new(client.ip(), port);
            match self.connect_from(netns, destination, Some(from), leg).await {
                Err(err) if transparent::port_taken(&err) && tries < transparent::PORT_TRIES => {
                    tries += 1;
                }
                connected => return connected,
            }
        }
    }

    /// One try of [`Proxy::connect_in`], from `source` when it is given.
    async fn connect_from(
        &self,
        netns: &Arc<Netns>,
        destination: SocketAddr,
        source: Option<SocketAddr>,
        leg: Leg,
    ) -> io::Result<TcpStream> {
        let socket =
            socket::marked_socket_in(netns, destination.is_ipv6(), self.limits.tcp_keepalive)
                .await?;
        if let Some(source) = source {
            transparent::make_transparent(&socket, source)?;
        }
        self.tune_leg(leg, socket2::SockRef::from(&socket));
        let connecting = TcpSocket::from_std_stream(socket.into()).connect(destination);
        let stream = match tokio::time::timeout(self.limits.connect_timeout, connecting).await {
            Ok(connected) => connected?,
            Err(_) => {
                self.metrics.limit_reached("connect_timeout");
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connect to {destination} timed out after {:?}",
                        self.limits.connect_timeout
                    ),
                ));
            }
        };
        Ok(stream)
    }

    /// Sets the congestion control of `leg` on `socket`. A failure leaves the namespace's
    /// default, which costs speed only (the tunnel's algorithm was checked at start); it is
    /// logged once.
    fn tune_leg(&self, leg: Leg, socket: socket2::SockRef<'_>) {
        let set = match (leg, &self.limits.tunnel_congestion_control) {
            (Leg::OnNode, _) => socket::unpace(socket).map(drop),
            (Leg::Tunnel, Some(name)) => socket.set_tcp_congestion(name.as_bytes()),
            (Leg::Tunnel, None) | (Leg::Network, _) => Ok(()),
        };
        static WARNED: std::sync::Once = std::sync::Once::new();
        if let Err(err) = set {
            WARNED.call_once(|| {
                tracing::warn!(?leg, %err, "a leg keeps the namespace's congestion control (logged once)");
            });
        }
    }

    /// Socket options of every proxied TCP socket ([`socket::tune`], with
    /// [`Limits::tcp_keepalive`]).
    fn tune(&self, socket: socket2::SockRef<'_>) {
        socket::tune(socket, self.limits.tcp_keepalive);
    }
}

/// Where a leg of a proxied connection runs, which decides its congestion control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leg {
    /// Between two sockets of this node (a pod and its outbound listener, the proxy and a
    /// pod's application): it does not pace ([`socket::unpace`]).
    OnNode,
    /// The HBONE tunnel between two nodes' agents, both ends
    /// ([`Limits::tunnel_congestion_control`], by default the namespace's).
    Tunnel,
    /// Out of the mesh over the pod's interface (a plaintext destination, a plaintext client):
    /// the namespace's default, as the pod's own connections have.
    Network,
}

/// Closes `stream` with a reset (`SO_LINGER` 0): how the proxy refuses a plaintext connection
/// it accepted, so the client sees "connection reset" rather than an empty answer.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// The one accept loop of every listener of every pod: accepts until the task is dropped and
/// hands each connection, with its slot in the pod's connection budget, to `carry` in a task of
/// its own, which outlives the listener (dropping the listener stops new connections only) and
/// is tracked by the agent's [`crate::drain::Drain`] until it ends. A connection over the pod's
/// budget is reset at once and counted.
pub async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    proxy: Arc<Proxy>,
    pod: Arc<PodContext>,
    carry: F,
) where
    F: Fn(TcpStream, SocketAddr, Permit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let permit = match pod.admit_connection(&proxy).await {
                    Ok(permit) => permit,
                    Err(spent) => {
                        tracing::debug!(pod = %pod.key, port, %peer, "connection reset: {spent}");
                        reset(stream);
                        continue;
                    }
                };
                tokio::spawn(proxy.drain.track(carry(stream, peer, permit)));
            }
            Err(err) => {
                // Out of descriptors and the like: back off rather than spin.
                tracing::warn!(pod = %pod.key, port, %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What an in-pod listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// 15001: the pod's outbound connections ([`outbound`]).
    Outbound,
    /// 15006: inbound plaintext ([`passthrough`]).
    InboundPlaintext,
    /// 15008: inbound HBONE ([`inbound`]).
    InboundHbone,
}

impl Role {
    /// Every in-pod listener: where it listens, and what it serves (the IPv6 twins are skipped
    /// in a pod without IPv6).
    pub fn listeners() -> [(SocketAddr, Role); 6] {
        use std::net::{Ipv4Addr, Ipv6Addr};
        [
            ((Ipv4Addr::LOCALHOST, OUTBOUND_PORT).into(), Self::Outbound),
            ((Ipv6Addr::LOCALHOST, OUTBOUND_PORT).into(), Self::Outbound),
            (
                (Ipv4Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT).into(),
                Self::InboundPlaintext,
            ),
            (
                (Ipv6Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT).into(),
                Self::InboundPlaintext,
            ),
            (
                (Ipv4Addr::UNSPECIFIED, INBOUND_HBONE_PORT).into(),
                Self::InboundHbone,
            ),
            (
                (Ipv6Addr::UNSPECIFIED, INBOUND_HBONE_PORT).into(),
                Self::InboundHbone,
            ),
        ]
    }

    /// Where the connections this listener accepts run: a pod's outbound ones come from the
    /// pod itself, over loopback; HBONE ones from another node's agent.
    pub fn leg(self) -> Leg {
        match self {
            Self::Outbound => Leg::OnNode,
            Self::InboundHbone => Leg::Tunnel,
            Self::InboundPlaintext => Leg::Network,
        }
    }

    /// Serves `listener` of `pod` in a task of its own, until the task is aborted; the
    /// sockets it accepts inherit the congestion control of its [`Role::leg`].
    pub fn serve(
        self,
        listener: tokio::net::TcpListener,
        proxy: Arc<Proxy>,
        pod: Arc<PodContext>,
    ) -> tokio::task::JoinHandle<()> {
        // On the listener, not each accepted socket: set once, inherited by every connection
        // (and a listener handed over by a predecessor gets them here too).
        proxy.tune_leg(self.leg(), socket2::SockRef::from(&listener));
        proxy.tune(socket2::SockRef::from(&listener));
        match self {
            Self::Outbound => tokio::spawn(outbound::serve(listener, proxy, pod)),
            Self::InboundPlaintext => {
                tokio::spawn(passthrough::serve_inbound(listener, proxy, pod))
            }
            Self::InboundHbone => tokio::spawn(async move {
                if let Err(err) = inbound::serve(listener, proxy, pod).await {
                    tracing::warn!(%err, "cannot serve HBONE");
                }
            }),
        }
    }
}

/// The node's connection budget ([`Budgets::per_node`], in sockets), shared by every pod,
/// and the most sockets held at once lately (what [`crate::memory`] watches to see a burst
/// end).
#[derive(Debug)]
pub struct NodeBudget {
    slots: Arc<Semaphore>,
    size: usize,
    peak: AtomicUsize,
}

impl NodeBudget {
    /// A budget of `size` sockets, none in use.
    pub fn new(size: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(size)),
            size,
            peak: AtomicUsize::new(0),
        }
    }

    /// A slot, if one is free.
    fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.try_acquire_many(1)
    }

    /// A slot freed by the `closing` connections being closed to make room: waits up to
    /// [`FREED_WAIT`] for one, as long as any is closing.
    async fn acquire_freed(&self, closing: usize) -> Option<OwnedSemaphorePermit> {
        if closing == 0 {
            return None;
        }
        let held = tokio::time::timeout(FREED_WAIT, self.slots.clone().acquire_owned())
            .await
            .ok()?
            .ok()?;
        self.peak.fetch_max(self.in_use(), Ordering::AcqRel);
        Some(held)
    }

    /// `slots` slots at once, if that many are free.
    fn try_acquire_many(&self, slots: u32) -> Option<OwnedSemaphorePermit> {
        let held = self.slots.clone().try_acquire_many_owned(slots).ok()?;
        self.peak.fetch_max(self.in_use(), Ordering::AcqRel);
        Some(held)
    }

    /// Sockets held by carried connections now.
    pub fn in_use(&self) -> usize {
        self.size.saturating_sub(self.slots.available_permits())
    }

    /// The most sockets held at once since the last call (or since the start); the next
    /// period starts from the number held now.
    pub fn take_peak(&self) -> usize {
        self.peak.swap(self.in_use(), Ordering::AcqRel)
    }
}

/// How long a connection that found the node's budget spent waits for a slot of the idle
/// pooled connections closed for it ([`hbone::Pool::close_idle`]). Each frees its slot as soon
/// as its task runs, so the wait is short unless that data-plane thread is busy, or the slots
/// went to other connections first (a closed tunnel's task on another thread can free its slot
/// before this one waits, and another thread's connection take it): then the connection is
/// refused after this long, its listener's accept loop having waited as long.
const FREED_WAIT: Duration = Duration::from_millis(250);

/// A carried connection's slots in the node's and its pod's budgets, released on drop.
#[derive(Debug)]
pub struct Permit {
    _node: SocketSlot,
    _pod: OwnedSemaphorePermit,
}

/// Which budget refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spent {
    /// The node's (its sockets: [`Budgets::per_node`]).
    Node,
    /// The pod's (its connections: [`Budgets::per_pod`]).
    Pod,
}

impl std::fmt::Display for Spent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Node => "the node's connection budget is spent",
            Self::Pod => "the pod's concurrent connection limit is reached",
        })
    }
}

/// One socket's slot in the node's budget ([`Budgets::per_node`]), released on drop: held as
/// long as the socket it was taken for.
#[derive(Debug)]
pub struct SocketSlot {
    _permit: OwnedSemaphorePermit,
}

/// Why admission refused a connection, and the policy that refused it, if one did.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// For the access log and the HBONE reply.
    pub reason: String,
    /// The DENY policy that matched; `None` for PeerAuthentication and when no ALLOW policy
    /// matched.
    pub policy: Option<Arc<ObjectKey>>,
}

/// The pod a listener serves.
#[derive(Debug)]
pub struct PodContext {
    /// The pod.
    pub key: ObjectKey,
    /// Its UID: HBONE connections are pooled per source pod.
    pub uid: String,
    /// Its network namespace, where the proxy's sockets are made.
    pub netns: Arc<Netns>,
    /// Its SPIFFE identity.
    pub identity: Identity,
    /// Its names in metrics and logs (as it was when it was enrolled).
    pub peer: Peer,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Its connection budget ([`Budgets::per_pod`]).
    pub budget: Arc<Semaphore>,
    /// When the pod last hit its budget (seconds since the epoch), to warn once a minute.
    last_limit_warning: AtomicU64,
    /// Its namespace is prepared for transparent connections ([`crate::sys::transparent`]):
    /// the application sees its client's address, not the pod's own.
    pub preserves_source: bool,
    /// Its own descriptors' slots in the node's budget ([`Budgets::POD_DESCRIPTORS`]); `None`
    /// when the budget had no room for them (enrollment does not wait on traffic).
    _descriptors: Option<OwnedSemaphorePermit>,
}

impl PodContext {
    /// The context of `pod` in `netns`, with `identity` and the proxy's per-pod budget.
    pub fn new(proxy: &Proxy, pod: &Pod, netns: Arc<Netns>, identity: Identity) -> Self {
        Self {
            key: pod.key.clone(),
            uid: pod.uid.clone(),
            netns,
            peer: proxy.peer(pod).with_principal(identity.clone()),
            identity,
            ips: pod.ips.clone(),
            budget: Arc::new(Semaphore::new(proxy.budgets.per_pod)),
            last_limit_warning: AtomicU64::new(0),
            preserves_source: false,
            _descriptors: proxy.node_budget.try_acquire_many(Budgets::POD_DESCRIPTORS),
        }
    }

    /// The address of the pod's application that made the captured connection from `peer` to
    /// `target`: capture hands it to the listener over loopback, so the application's address
    /// is the pod's own (of the target's family), with `peer`'s port.
    pub fn client_address(&self, peer: SocketAddr, target: IpAddr) -> SocketAddr {
        SocketAddr::new(self.ip_like(target).unwrap_or(peer.ip()), peer.port())
    }

    /// The context, with the application reached from its clients' addresses (the namespace
    /// is prepared for it) or not.
    pub fn preserving_source(self, preserves_source: bool) -> Self {
        Self {
            preserves_source,
            ..self
        }
    }

    /// The address the proxy's connection to `destination`, on behalf of `client`, leaves from
    /// (with the client's port, which it must not reuse): the client's, when this pod preserves
    /// it and it can be (same family, not the pod's own nor loopback); `None`: the pod's own.
    fn upstream_source(&self, client: SocketAddr, destination: SocketAddr) -> Option<SocketAddr> {
        let ip = client.ip().to_canonical();
        let destination = destination.ip().to_canonical();
        (self.preserves_source
            && ip.is_ipv6() == destination.is_ipv6()
            && ip != destination
            && !ip.is_loopback()
            && !ip.is_unspecified())
        .then_some(SocketAddr::new(ip, client.port()))
    }

    /// Takes a slot of the node's and of the pod's connection budget (for the connection's
    /// first socket), or counts (and now and then logs) which is spent.
    /// The pod's is taken first: a pod over its own budget must not close the node's idle
    /// tunnels for a connection it will refuse anyway.
    pub async fn admit_connection(&self, proxy: &Proxy) -> Result<Permit, Spent> {
        let Ok(pod) = self.budget.clone().try_acquire_owned() else {
            proxy.metrics.limit_reached("pod_connections");
            self.warn_now_and_then(
                "pod has reached its concurrent connection limit; new connections are reset \
                 (--max-connections-per-pod)",
                proxy.budgets.per_pod,
            );
            return Err(Spent::Pod);
        };
        let node = self.socket_slot(proxy).await.ok_or(Spent::Node)?;
        Ok(Permit {
            _node: node,
            _pod: pod,
        })
    }

    /// A slot of the node's budget for one more socket a connection of this pod opens (its
    /// plaintext upstream, a new HBONE connection), or `None`, counted (and now and then
    /// logged), when the node's budget is spent. A spent budget first closes the idle pooled
    /// HBONE connections, every pod's, and waits for a slot one of them frees.
    pub async fn socket_slot(&self, proxy: &Proxy) -> Option<SocketSlot> {
        let mut slot = proxy.node_budget.try_acquire();
        if slot.is_none() {
            let closing = proxy.pool.close_idle(std::time::Instant::now());
            if closing > 0 {
                tracing::debug!(
                    pod = %self.key,
                    closing,
                    "the node's connection budget is spent: closing idle HBONE connections"
                );
            }
            slot = proxy.node_budget.acquire_freed(closing).await;
        }
        if slot.is_none() {
            proxy.metrics.limit_reached("node_connections");
            self.warn_now_and_then(
                "the node's connection budget (sized from the open-files limit) is spent; new \
                 connections are reset (raise the agent's open-files limit)",
                proxy.budgets.per_node,
            );
        }
        slot.map(|permit| SocketSlot { _permit: permit })
    }

    fn warn_now_and_then(&self, message: &str, limit: usize) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_limit_warning.load(Ordering::Relaxed);
        if now >= last + 60
            && self
                .last_limit_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(pod = %self.key, limit, "{message}");
        }
    }

    /// The pod's address of the same family as `like`.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == like.to_canonical().is_ipv4())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meshlets_own_ports_and_port_zero_are_reserved() {
        let limits = Limits {
            reserved_ports: vec![15001, 15006, 15008, 15020],
            ..Limits::default()
        };
        for port in [0, 15001, 15006, 15008, 15020] {
            assert!(limits.is_reserved(port), "{port}");
        }
        for port in [80, 8080, 15009, 15021] {
            assert!(!limits.is_reserved(port), "{port}");
        }
        assert!(Limits::default().is_reserved(INBOUND_PLAINTEXT_PORT));
    }

    #[test]
    fn budgets_fit_the_descriptors_the_agent_may_open() {
        // This machine's hard limit: a slot per descriptor past the reserve, and one pod's
        // connections (two sockets each at most) may hold a quarter of them.
        let budgets = Budgets::for_descriptors(20_000, None);
        assert_eq!(budgets.per_node, 17_952);
        assert_eq!(budgets.per_pod, 2_244);
        // A DaemonSet's usual limit: the default per pod.
        let budgets = Budgets::for_descriptors(1 << 20, None);
        assert_eq!(budgets.per_pod, Budgets::DEFAULT_PER_POD);
        // Explicit, within the node's; and never zero.
        assert_eq!(Budgets::for_descriptors(20_000, Some(1_000)).per_pod, 1_000);
        assert_eq!(
            Budgets::for_descriptors(20_000, Some(1 << 30)).per_pod,
            17_952
        );
        assert_eq!(
            Budgets::for_descriptors(100, None),
            Budgets {
                per_pod: 1,
                per_node: 1
            }
        );
    }

    #[test]
    fn the_peak_is_the_most_carried_at_once_and_restarts_from_the_count_carried() {
        let budget = NodeBudget::new(10);
        let mut carried: Vec<_> = (0..5).map(|_| budget.try_acquire().unwrap()).collect();
        assert_eq!(budget.in_use(), 5);
        carried.truncate(2);
        assert_eq!(budget.in_use(), 2);
        assert_eq!(budget.take_peak(), 5, "the most at once");
        assert_eq!(
            budget.take_peak(),
            2,
            "a new period starts from the count carried"
        );
        drop(carried);
        assert_eq!(budget.take_peak(), 2);
        assert_eq!(budget.take_peak(), 0);
    }
}
