//! Metrics, with Istio's names so existing dashboards work: `istio_tcp_*` per connection,
//! reported by the source and by the destination node, plus `meshlet_*` for the agent itself.
//! Served as Prometheus text on `--metrics-addr` (`GET /metrics`).
//!
//! Label cardinality stays bounded: workloads, namespaces, identities and services, never ports,
//! addresses or connection ids. Byte counters move while a connection is open ([`Counted`]
//! counts as bytes pass), not only when it closes.

use std::{
    collections::{HashMap, HashSet},
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use prometheus::{
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, core::Collector as _,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{
    identity::Identity,
    workload::{model::Pod, naming::WorkloadNames},
};

/// Istio's connection labels, in ztunnel's order.
const CONNECTION_LABELS: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// The value of every label the agent cannot know.
pub use crate::workload::naming::UNKNOWN;

/// One end of a connection, as Istio's labels (and the access log) name it.
///
/// Every open connection holds two, so a peer owns no strings: the pod's names are computed
/// once per pod ([`Pod::names`]) and shared, the principal is the connection's
/// [`Identity`] and the cluster the agent's. Cloning one is three reference counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// The pod's names; `None` outside the cluster (every name `unknown`).
    names: Option<Arc<WorkloadNames>>,
    /// The SPIFFE identity: verified for the peer of a tunnel, `None` (`unknown`) in plaintext.
    principal: Option<Identity>,
    /// The cluster (`--cluster-id`) of a pod of this cluster.
    cluster: Option<Arc<str>>,
}

impl Peer {
    /// The peer `pod` of `cluster`, with its principal `unknown` until it is proven.
    pub fn of(pod: &Pod, cluster: &Arc<str>) -> Self {
        Self {
            names: Some(pod.names().clone()),
            principal: None,
            cluster: Some(cluster.clone()),
        }
    }

    /// The peer, with `principal`.
    pub fn with_principal(self, principal: Identity) -> Self {
        Self {
            principal: Some(principal),
            ..self
        }
    }

    /// The owning workload ([`crate::workload::naming`]).
    pub fn workload(&self) -> &str {
        self.names.as_ref().map_or(UNKNOWN, |n| &n.workload)
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        self.names.as_ref().map_or(UNKNOWN, |n| &n.namespace)
    }

    /// The canonical service (also `*_app`).
    pub fn canonical_service(&self) -> &str {
        self.names
            .as_ref()
            .map_or(UNKNOWN, |n| &n.canonical_service)
    }

    /// The canonical revision (also `*_version`).
    pub fn canonical_revision(&self) -> &str {
        self.names
            .as_ref()
            .map_or(UNKNOWN, |n| &n.canonical_revision)
    }

    /// The SPIFFE identity, `unknown` when none was proven.
    pub fn principal(&self) -> &str {
        self.principal.as_ref().map_or(UNKNOWN, Identity::as_str)
    }

    /// The cluster.
    pub fn cluster(&self) -> &str {
        self.cluster.as_deref().unwrap_or(UNKNOWN)
    }

    /// `namespace/pod` for the access log, `unknown` outside the cluster.
    pub fn pod_key(&self) -> std::borrow::Cow<'_, str> {
        match &self.names {
            Some(n) => format!("{}/{}", n.namespace, n.pod).into(),
            None => UNKNOWN.into(),
        }
    }
}

pub use crate::workload::naming::ServiceName;

/// The labels of one connection: the same set on all four `istio_tcp_*` families.
#[derive(Debug, Clone)]
pub struct ConnectionLabels {
    /// `source` or `destination`: which end's agent reports.
    pub reporter: &'static str,
    /// The client.
    pub source: Peer,
    /// The server.
    pub destination: Peer,
    /// The Service addressed, `unknown` when a pod was addressed directly.
    pub service: Arc<ServiceName>,
    /// `tcp`.
    pub request_protocol: &'static str,
    /// `mutual_tls` or `unknown`.
    pub connection_security_policy: &'static str,
    /// `-`, `DENY` (policy), `CONNECT` (upstream connect failure), `NR` (a destination on
    /// meshlet's own ports), `UO` (the pod's or the node's connection budget is spent).
    pub response_flags: &'static str,
}

impl Default for ConnectionLabels {
    fn default() -> Self {
        Self {
            reporter: "source",
            source: Peer::default(),
            destination: Peer::default(),
            service: ServiceName::unknown(),
            request_protocol: "tcp",
            connection_security_policy: UNKNOWN,
            response_flags: "-",
        }
    }
}

impl ConnectionLabels {
    fn values(&self) -> [&str; 23] {
        let (s, d, svc) = (&self.source, &self.destination, &*self.service);
        [
            self.reporter,
            s.workload(),
            s.canonical_service(),
            s.canonical_revision(),
            s.namespace(),
            s.principal(),
            s.canonical_service(),
            s.canonical_revision(),
            s.cluster(),
            &svc.host,
            &svc.namespace,
            &svc.name,
            d.workload(),
            d.canonical_service(),
            d.canonical_revision(),
            d.namespace(),
            d.principal(),
            d.canonical_service(),
            d.canonical_revision(),
            d.cluster(),
            self.request_protocol,
            self.response_flags,
            self.connection_security_policy,
        ]
    }
}

/// How the agent names clusters and Services in its telemetry, and how long it keeps the series
/// of workloads that are gone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Telemetry {
    /// This cluster's name in `source_cluster` and `destination_cluster` (`--cluster-id`, as
    /// istiod's `CLUSTER_ID`).
    pub cluster_id: Arc<str>,
    /// The cluster DNS domain of `destination_service` (`--cluster-domain`).
    pub cluster_domain: String,
    /// How long the series of a workload stay after its last pod is gone
    /// (`--metrics-grace-period`).
    pub series_grace: Duration,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            cluster_id: "Kubernetes".into(),
            cluster_domain: "cluster.local".to_owned(),
            series_grace: Duration::from_secs(300),
        }
    }
}

/// Every metric of the agent.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    opened: IntCounterVec,
    closed: IntCounterVec,
    sent: IntCounterVec,
    received: IntCounterVec,
    /// Pods this agent captures.
    pub enrolled_workloads: IntGauge,
    /// Connections redirected by eBPF, by direction (read from the per-CPU map).
    pub redirected: IntGaugeVec,
    /// 1 when every kind of the source is in sync.
    pub source_synced: IntGauge,
    /// Seconds until each workload certificate expires.
    pub certificate_expiry: IntGaugeVec,
    /// 1 while the certificate issuer answered its last request.
    pub ca_reachable: IntGauge,
    /// Workload certificates asked for and not obtained yet.
    pub certificates_pending: IntGauge,
    /// Policy fields meshlet does not enforce as written.
    pub policy_unsupported_fields: IntGauge,
    /// What dry-run AuthorizationPolicies would have decided, by policy and result.
    policy_dry_run: IntCounterVec,
    /// Connections refused or cut by a guard or resource limit of the proxy, by reason.
    limits: IntCounterVec,
    /// Pods the agent refused to enroll, by reason.
    enrollment_refused: IntCounterVec,
    /// CNI ADDs the agent holds (waiting for their pod, the source or the enrollment).
    pub cni_adds_waiting: IntGauge,
    /// CNI plugin requests answered, by command and result.
    cni_requests: IntCounterVec,
    /// How long the agent held CNI ADDs of pods it enrolled.
    cni_add_duration: prometheus::Histogram,
    process: IntGaugeVec,
    /// The data plane's runtimes ([`crate::proxy::shards`]), counted in the tokio gauges with
    /// the runtime that scrapes.
    data_plane: std::sync::OnceLock<Vec<tokio::runtime::Handle>>,
    /// Since when each workload (namespace, name) that has series has been gone.
    gone_since: Arc<Mutex<HashMap<(String, String), Instant>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric, plus process metrics and build info.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let counter = IntCounterVec::new(Opts::new(name, help), &CONNECTION_LABELS)
                .expect("valid metric");
            registry
                .register(Box::new(counter.clone()))
                .expect("unique metric");
            counter
        };
        let opened = counter(
            "istio_tcp_connections_opened_total",
            "Total TCP connections opened",
        );
        let closed = counter(
            "istio_tcp_connections_closed_total",
            "Total TCP connections closed",
        );
        let sent = counter(
            "istio_tcp_sent_bytes_total",
            "Bytes sent during response (server to client)",
        );
        let received = counter(
            "istio_tcp_received_bytes_total",
            "Bytes received during request (client to server)",
        );
        let gauge = |name: &str, help: &str| {
            let gauge = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(gauge.clone()))
                .expect("unique metric");
            gauge
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let gauge = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(gauge.clone()))
                .expect("unique metric");
            gauge
        };
        let enrolled_workloads = gauge("meshlet_enrolled_workloads", "Pods this agent captures");
        let redirected = gauge_vec(
            "meshlet_redirected_connections_total",
            "Connections redirected by eBPF capture since it was installed, by direction \
             (outbound, inbound; kubelet_probe counts kubelet's probes let through unsteered)",
            &["direction"],
        );
        let source_synced = gauge(
            "meshlet_source_synced",
            "1 when every kind of the workload source is in sync",
        );
        let certificate_expiry = gauge_vec(
            "meshlet_certificate_expiry_seconds",
            "Seconds until the workload certificate of an identity expires",
            &["identity"],
        );
        let ca_reachable = gauge(
            "meshlet_ca_reachable",
            "1 while the certificate issuer (the cluster CA, or the local dev CA) answered its \
             last request; 0 while it fails (valid certificates keep serving)",
        );
        let certificates_pending = gauge(
            "meshlet_certificates_pending",
            "Workload certificates asked for and not obtained yet",
        );
        let policy_unsupported_fields = gauge(
            "meshlet_policy_unsupported_fields",
            "Policy fields meshlet does not enforce as written (see meshlet policies)",
        );
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let counter = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(counter.clone()))
                .expect("unique metric");
            counter
        };
        let limits = counter_vec(
            "meshlet_proxy_limit_total",
            "Connections refused or cut by a guard or resource limit of the proxy, by limit \
             (reserved_port, pod_connections, tls_handshakes, tls_handshake_timeout, \
             connect_timeout, tcp_keepalive, hbone_protocol)",
            &["limit"],
        );
        let policy_dry_run = counter_vec(
            "meshlet_policy_dry_run_total",
            "Connections a dry-run AuthorizationPolicy (istio.io/dry-run: \"true\") selected, by \
             policy (namespace/name) and what it alone would have decided (allowed, denied); \
             never enforced",
            &["policy", "result"],
        );
        let enrollment_refused = counter_vec(
            "meshlet_enrollment_refused_total",
            "Pods the agent refused to enroll because their network namespace failed a check, \
             by reason (own_netns, host_netns, host_network_pod_netns, foreign_process, \
             netns_annotation)",
            &["reason"],
        );
        let cni_adds_waiting = gauge(
            "meshlet_cni_adds_waiting",
            "CNI ADDs the agent holds: pods whose start waits for their capture",
        );
        let cni_requests = counter_vec(
            "meshlet_cni_requests_total",
            "Requests of meshlet-cni answered, by command (ADD, DEL, CHECK) and result \
             (enrolled, not_captured, released, checked, unavailable, refused)",
            &["command", "result"],
        );
        let cni_add_duration = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "meshlet_cni_add_duration_seconds",
                "Time from a meshlet-cni ADD reaching the agent to the pod being enrolled: what \
                 capture adds to a pod's start",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(cni_add_duration.clone()))
            .expect("unique metric");
        let process = gauge_vec(
            "meshlet_process",
            "The agent process: resident_memory_bytes, open_fds, threads, cpu_milliseconds; tokio: workers, alive_tasks, global_queue_depth",
            &["measure"],
        );
        let build_info = gauge_vec("meshlet_build_info", "Build information", &["version"]);
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Self {
            registry,
            opened,
            closed,
            sent,
            received,
            enrolled_workloads,
            redirected,
            source_synced,
            certificate_expiry,
            ca_reachable,
            certificates_pending,
            policy_unsupported_fields,
            policy_dry_run,
            limits,
            enrollment_refused,
            cni_adds_waiting,
            cni_requests,
            cni_add_duration,
            process,
            data_plane: std::sync::OnceLock::new(),
            gone_since: Arc::default(),
        }
    }

    fn connection_families(&self) -> [&IntCounterVec; 4] {
        [&self.opened, &self.closed, &self.sent, &self.received]
    }

    /// How many `istio_tcp_*` series there are, in all four families.
    pub fn connection_series(&self) -> usize {
        self.connection_families()
            .iter()
            .flat_map(|family| family.collect())
            .map(|family| family.get_metric().len())
            .sum()
    }

    /// Removes the `istio_tcp_*` series that name a workload gone for `grace` or longer at
    /// `now`. `live` holds every workload that still exists, as (namespace, name). A series
    /// goes when its source or its destination workload has been gone that long: nothing will
    /// count in it again, and a workload that comes back starts its counters from zero, which
    /// Prometheus reads as a counter reset. Returns how many series were removed.
    pub fn remove_gone_workloads(
        &self,
        live: &HashSet<(String, String)>,
        grace: Duration,
        now: Instant,
    ) -> usize {
        const ENDS: [(&str, &str); 2] = [
            ("source_workload_namespace", "source_workload"),
            ("destination_workload_namespace", "destination_workload"),
        ];
        let mut gone_since = self.gone_since.lock().unwrap_or_else(|p| p.into_inner());
        let mut still_gone = HashSet::new();
        let mut expired: Vec<Vec<String>> = Vec::new();
        for family in self.connection_families() {
            for metric in family.collect().iter().flat_map(|f| f.get_metric()) {
                let labels: HashMap<&str, &str> = metric
                    .get_label()
                    .iter()
                    .map(|pair| (pair.name(), pair.value()))
                    .collect();
                let label = |name: &str| labels.get(name).copied().unwrap_or(UNKNOWN);
                let mut over = false;
                for (namespace, name) in ENDS {
                    let workload = (label(namespace).to_owned(), label(name).to_owned());
                    if workload.1 == UNKNOWN || live.contains(&workload) {
                        continue;
                    }
                    let since = *gone_since.entry(workload.clone()).or_insert(now);
                    if now.saturating_duration_since(since) >= grace {
                        // Every series that names it goes now.
                        over = true;
                    } else {
                        still_gone.insert(workload);
                    }
                }
                if over {
                    expired.push(CONNECTION_LABELS.map(|l| label(l).to_owned()).to_vec());
                }
            }
        }
        gone_since.retain(|workload, _| still_gone.contains(workload));
        drop(gone_since);
        let mut removed = 0;
        for values in expired {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            for family in self.connection_families() {
                removed += usize::from(family.remove_label_values(&values).is_ok());
            }
        }
        removed
    }

    /// Counts a connection refused or cut by the proxy limit or guard `limit`.
    pub fn limit_reached(&self, limit: &'static str) {
        self.limits.with_label_values(&[limit]).inc();
    }

    /// Counts what the dry-run policy `policy` would have decided on a connection.
    pub fn dry_run(&self, policy: &str, would_allow: bool) {
        let result = if would_allow { "allowed" } else { "denied" };
        self.policy_dry_run
            .with_label_values(&[policy, result])
            .inc();
    }

    /// Counts a pod not enrolled for `reason`.
    pub fn enrollment_refused(&self, reason: &'static str) {
        self.enrollment_refused.with_label_values(&[reason]).inc();
    }

    /// Counts an answered CNI request (`command` is `unknown` when it could not be read).
    pub fn cni_answered(&self, command: &str, result: &str) {
        self.cni_requests
            .with_label_values(&[command, result])
            .inc();
    }

    /// Records how long an ADD that enrolled its pod was held.
    pub fn cni_add_held(&self, held: Duration) {
        self.cni_add_duration.observe(held.as_secs_f64());
    }

    /// Refreshes the process and tokio runtime gauges (at scrape time).
    pub fn observe_process(&self) {
        let set = |measure: &str, value: i64| self.process.with_label_values(&[measure]).set(value);
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.split_whitespace().next()?.parse::<i64>().ok())
            };
            if let Some(kib) = field("VmRSS:") {
                set("resident_memory_bytes", kib * 1024);
            }
            if let Some(threads) = field("Threads:") {
                set("threads", threads);
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            set("open_fds", fds.count() as i64);
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // utime and stime, fields 14 and 15, in clock ticks (100 Hz on Linux).
            let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let ticks: Vec<i64> = after
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse().ok())
                .collect();
            set("cpu_milliseconds", ticks.iter().sum::<i64>() * 10);
        }
        let runtimes = tokio::runtime::Handle::try_current()
            .into_iter()
            .chain(self.data_plane.get().into_iter().flatten().cloned());
        let (mut workers, mut tasks, mut queued) = (0, 0, 0);
        for runtime in runtimes.map(|handle| handle.metrics()) {
            workers += runtime.num_workers();
            tasks += runtime.num_alive_tasks();
            queued += runtime.global_queue_depth();
        }
        set("tokio_workers", workers as i64);
        set("tokio_alive_tasks", tasks as i64);
        set("tokio_global_queue_depth", queued as i64);
    }

    /// Counts the data plane's runtimes in the tokio gauges too (set once, at start).
    pub fn observe_data_plane(&self, runtimes: Vec<tokio::runtime::Handle>) {
        let _ = self.data_plane.set(runtimes);
    }

    /// Counts a connection opened; returns its byte counters (sent, received).
    pub fn open(&self, labels: &ConnectionLabels) -> ByteCounters {
        let values = labels.values();
        self.opened.with_label_values(&values).inc();
        ByteCounters {
            sent: self.sent.with_label_values(&values),
            received: self.received.with_label_values(&values),
            tally: Arc::default(),
        }
    }

    /// Counts a connection closed.
    pub fn close(&self, labels: &ConnectionLabels) {
        self.closed.with_label_values(&labels.values()).inc();
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        families.extend(prometheus::gather());
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_default()
    }
}

/// Removes the series of workloads gone for `grace` ([`Metrics::remove_gone_workloads`]),
/// looking every quarter of it (between 1 s and 30 s), for as long as it runs.
pub async fn sweep_gone_workloads(
    metrics: Arc<Metrics>,
    store: Arc<crate::workload::Store>,
    grace: Duration,
) {
    let every = (grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let live = live_workloads(&store.pods());
        let removed = metrics.remove_gone_workloads(&live, grace, Instant::now());
        if removed > 0 {
            tracing::debug!(removed, "removed the series of gone workloads");
        }
    }
}

/// The workloads the live pods of `pods` make up, as (namespace, name): a workload whose pods
/// have all finished (a Job's) is gone.
pub fn live_workloads(pods: &[Arc<Pod>]) -> HashSet<(String, String)> {
    pods.iter()
        .filter(|pod| pod.is_live())
        .map(|pod| {
            let workload = crate::workload::naming::workload_name(pod);
            (pod.key.namespace.clone(), workload)
        })
        .collect()
}

/// One connection's byte counters: the Istio counters of its label set (shared with every
/// connection of the same labels) and its own tally (for its access log line).
#[derive(Debug, Clone)]
pub struct ByteCounters {
    sent: IntCounter,
    received: IntCounter,
    tally: Arc<[AtomicU64; 2]>,
}

impl ByteCounters {
    fn add_sent(&self, bytes: u64) {
        self.sent.inc_by(bytes);
        self.tally[0].fetch_add(bytes, Ordering::Relaxed);
    }

    fn add_received(&self, bytes: u64) {
        self.received.inc_by(bytes);
        self.tally[1].fetch_add(bytes, Ordering::Relaxed);
    }

    /// This connection's bytes so far: (sent, received).
    pub fn tally(&self) -> (u64, u64) {
        (
            self.tally[0].load(Ordering::Relaxed),
            self.tally[1].load(Ordering::Relaxed),
        )
    }
}

/// A stream whose traffic is counted as it passes: bytes read from it are received, bytes
/// written to it are sent (the client-facing end of a connection).
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    counters: ByteCounters,
}

impl<S> Counted<S> {
    /// Counts `inner`'s traffic.
    pub fn new(inner: S, counters: ByteCounters) -> Self {
        Self { inner, counters }
    }
}

impl<S> Counted<S> {
    /// The stream itself.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.counters.add_received(read as u64);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(written)) = &poll {
            self.counters.add_sent(*written as u64);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A spliced socket's bytes are counted as they are moved, as read and written ones are.
impl<S: crate::proxy::copy::Splice + Unpin> crate::proxy::copy::Splice for Counted<S> {
    fn socket(&self) -> Option<&tokio::net::TcpStream> {
        self.inner.socket()
    }

    fn spliced(mut self: Pin<&mut Self>, moved: crate::proxy::copy::Moved) {
        match moved {
            crate::proxy::copy::Moved::Received(n) => self.counters.add_received(n),
            crate::proxy::copy::Moved::Sent(n) => self.counters.add_sent(n),
        }
        Pin::new(&mut self.inner).spliced(moved);
    }
}

impl<S: crate::proxy::copy::ReadOwned + Unpin> crate::proxy::copy::ReadOwned for Counted<S> {
    fn poll_read_owned(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut bytes::BytesMut,
        limit: usize,
        held: &mut bytes::Bytes,
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_read_owned(cx, buf, limit, held);
        if let Poll::Ready(Ok(read)) = &poll {
            self.counters.add_received(*read as u64);
        }
        poll
    }
}

impl<S: crate::proxy::copy::WriteOwned + Unpin> crate::proxy::copy::WriteOwned for Counted<S> {
    fn poll_write_owned(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut bytes::BytesMut,
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_owned(cx, buf);
        if let Poll::Ready(Ok(written)) = &poll {
            self.counters.add_sent(*written as u64);
        }
        poll
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::workload::model::ObjectKey;

    #[tokio::test]
    async fn counts_bytes_as_they_pass_and_renders_istio_names() {
        let metrics = Metrics::new();
        let labels = ConnectionLabels {
            source: Peer::of(&Pod::fixture("shop", "client", &[]), &"east".into()),
            connection_security_policy: "mutual_tls",
            ..Default::default()
        };
        let (a, mut b) = tokio::io::duplex(64);
        let mut counted = Counted::new(a, metrics.open(&labels));
        counted.write_all(b"hello").await.unwrap();
        b.write_all(b"world!").await.unwrap();
        let mut buf = [0u8; 6];
        counted.read_exact(&mut buf).await.unwrap();
        // A second connection of the same labels: the Istio counters add up, each connection's
        // own tally (its access log line) does not.
        let (c, _d) = tokio::io::duplex(64);
        let second = metrics.open(&labels);
        let mut other = Counted::new(c, second.clone());
        other.write_all(b"hi").await.unwrap();
        assert_eq!(counted.counters.tally(), (5, 6));
        assert_eq!(second.tally(), (2, 0));
        let text = metrics.render();
        assert!(
            text.contains("istio_tcp_connections_opened_total{"),
            "{text}"
        );
        let sent = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_sent_bytes_total{"))
            .unwrap();
        assert!(
            sent.ends_with(" 7") && sent.contains("source_workload=\"client\""),
            "{sent}"
        );
        let received = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_received_bytes_total{"))
            .unwrap();
        assert!(received.ends_with(" 6"), "{received}");
        assert!(text.contains("meshlet_build_info{version="), "{text}");
    }

    #[tokio::test]
    async fn counts_spliced_bytes_as_read_and_written_ones() {
        async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let (connected, accepted) = tokio::join!(
                tokio::net::TcpStream::connect(listener.local_addr().unwrap()),
                listener.accept()
            );
            (connected.unwrap(), accepted.unwrap().0)
        }
        let metrics = Metrics::new();
        let counters = metrics.open(&ConnectionLabels::default());
        let ((mut client, near), (mut upstream, mut server)) = tokio::join!(pair(), pair());
        let tally = counters.clone();
        // A bulk transfer each way between two sockets: spliced once the buffer has grown.
        let relay = tokio::spawn(async move {
            let mut near = Counted::new(near, counters);
            crate::proxy::copy::bidirectional(&mut near, &mut upstream).await
        });
        let up = vec![3u8; 2_000_000];
        let down = vec![5u8; 1_500_000];
        let (sent, answered) = tokio::join!(
            async {
                client.write_all(&up).await.unwrap();
                client.shutdown().await.unwrap();
                let mut got = Vec::new();
                client.read_to_end(&mut got).await.unwrap();
                got
            },
            async {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                server.write_all(&down).await.unwrap();
                server.shutdown().await.unwrap();
                got
            }
        );
        assert_eq!((answered.len(), sent.len()), (2_000_000, 1_500_000));
        assert_eq!(relay.await.unwrap().unwrap(), (2_000_000, 1_500_000));
        // Sent to the client, received from it: every byte, spliced or copied.
        assert_eq!(tally.tally(), (1_500_000, 2_000_000));
    }

    fn pod(name: &str, owner: Option<(&str, &str)>, labels: &[(&str, &str)]) -> Pod {
        let pod = Pod::fixture("shop", name, labels);
        match owner {
            Some((kind, owner)) => pod.owned_by(kind, owner),
            None => pod,
        }
    }

    fn connection(metrics: &Metrics, from: &Pod, to: &Pod, closed_as: &'static str) {
        let mut labels = ConnectionLabels {
            reporter: "destination",
            source: Peer::of(from, &"Kubernetes".into()),
            destination: Peer::of(to, &"Kubernetes".into()),
            ..Default::default()
        };
        metrics.open(&labels).add_sent(10);
        labels.response_flags = closed_as;
        metrics.close(&labels);
    }

    #[test]
    fn labels_name_the_owning_workload_and_the_service_in_the_cluster_domain() {
        let metrics = Metrics::new();
        let client = pod(
            "client-7d4b9c8f6-x2kq9",
            Some(("ReplicaSet", "client-7d4b9c8f6")),
            &[
                ("pod-template-hash", "7d4b9c8f6"),
                ("app", "client"),
                ("version", "v2"),
            ],
        );
        let server = pod("db-0", Some(("StatefulSet", "db")), &[]);
        let labels = ConnectionLabels {
            source: Peer::of(&client, &"east".into())
                .with_principal(Identity::parse("spiffe://td/ns/shop/sa/c").unwrap()),
            destination: Peer::of(&server, &"east".into()),
            service: Arc::new(ServiceName::new(
                &ObjectKey::new("shop", "db"),
                "corp.internal",
            )),
            ..Default::default()
        };
        metrics.open(&labels);
        metrics.close(&labels);
        let text = metrics.render();
        for family in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
            "istio_tcp_sent_bytes_total",
            "istio_tcp_received_bytes_total",
        ] {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{family}{{")))
                .unwrap_or_else(|| panic!("no {family} in {text}"));
            for label in [
                "source_workload=\"client\"",
                "source_canonical_service=\"client\"",
                "source_canonical_revision=\"v2\"",
                "source_app=\"client\"",
                "source_version=\"v2\"",
                "source_cluster=\"east\"",
                "source_principal=\"spiffe://td/ns/shop/sa/c\"",
                "destination_workload=\"db\"",
                "destination_canonical_service=\"db\"",
                "destination_canonical_revision=\"latest\"",
                "destination_workload_namespace=\"shop\"",
                "destination_service=\"db.shop.svc.corp.internal\"",
                "destination_service_name=\"db\"",
                "destination_service_namespace=\"shop\"",
                "destination_principal=\"unknown\"",
            ] {
                assert!(line.contains(label), "{label} missing from {line}");
            }
            assert!(!line.contains("x2kq9"), "a pod name in a label: {line}");
            let labels = line.matches("=\"").count();
            assert_eq!(labels, CONNECTION_LABELS.len(), "{line}");
        }
    }

    #[test]
    fn the_series_of_churned_pods_go_after_the_grace_period() {
        let metrics = Metrics::new();
        let grace = Duration::from_secs(300);
        let server = pod(
            "server-5f6d8c7b9-q9x2k",
            Some(("ReplicaSet", "server-5f6d8c7b9")),
            &[("pod-template-hash", "5f6d8c7b9")],
        );
        let steady = pod("steady", None, &[]);
        connection(&metrics, &steady, &server, "-");
        let baseline = metrics.connection_series();
        assert_eq!(baseline, 4, "one series in each family");

        // 1,000 bare pods come, connect (one in ten fails to: closed as CONNECT) and go.
        let churned: Vec<Pod> = (0..1000)
            .map(|i| pod(&format!("job-{i}"), None, &[]))
            .collect();
        for (i, client) in churned.iter().enumerate() {
            connection(
                &metrics,
                client,
                &server,
                if i % 10 == 0 { "CONNECT" } else { "-" },
            );
        }
        let peak = metrics.connection_series();
        assert_eq!(peak, baseline + 4 * 1000);

        // The server is replaced by a new pod of its Deployment (same workload); job-0 comes
        // back; the others are gone.
        let new_server = pod(
            "server-5f6d8c7b9-z7m4p",
            Some(("ReplicaSet", "server-5f6d8c7b9")),
            &[("pod-template-hash", "5f6d8c7b9")],
        );
        let gone_at = Instant::now();
        // job-1's pod is still listed, finished: a Job's completed pod makes no live workload.
        let finished = Pod {
            phase: "Succeeded".into(),
            ..churned[1].clone()
        };
        let live = |with_job0: bool| {
            let mut pods = vec![
                Arc::new(new_server.clone()),
                Arc::new(steady.clone()),
                Arc::new(finished.clone()),
            ];
            if with_job0 {
                pods.push(Arc::new(churned[0].clone()));
            }
            live_workloads(&pods)
        };
        assert_eq!(
            metrics.remove_gone_workloads(&live(false), grace, gone_at),
            0
        );
        let almost = gone_at + grace - Duration::from_secs(1);
        assert_eq!(metrics.remove_gone_workloads(&live(true), grace, almost), 0);
        assert_eq!(
            metrics.connection_series(),
            peak,
            "nothing goes within the grace period"
        );

        let removed = metrics.remove_gone_workloads(&live(true), grace, gone_at + grace);
        assert_eq!(removed, 4 * 999);
        assert_eq!(
            metrics.connection_series(),
            baseline + 4,
            "the baseline, and job-0 (which came back: its series stay, with its CONNECT)"
        );
        let text = metrics.render();
        assert!(text.contains("source_workload=\"job-0\""));
        assert!(!text.contains("source_workload=\"job-1\""));
        // The server's Deployment outlived each of its pods: its series never went.
        assert!(text.contains("destination_workload=\"server\""));
        assert_eq!(
            metrics.gone_since.lock().unwrap().len(),
            0,
            "nothing gone is tracked once its series are removed"
        );
    }
}
