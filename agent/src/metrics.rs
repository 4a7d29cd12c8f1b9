//! Metrics, with Istio's names so existing dashboards work: `istio_tcp_*` per connection,
//! reported by the source and by the destination node, plus `meshlet_*` for the agent itself.
//! Served as Prometheus text on `--metrics-addr` (`GET /metrics`).
//!
//! Label cardinality stays bounded: workloads, namespaces, identities and services, never ports,
//! addresses or connection ids. Byte counters move while a connection is open ([`Counted`]
//! counts as bytes pass), not only when it closes.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Istio's connection labels, in order.
const CONNECTION_LABELS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "request_protocol",
    "connection_security_policy",
    "response_flags",
];

/// The labels of one connection.
#[derive(Debug, Clone, Default)]
pub struct ConnectionLabels {
    /// `source` or `destination`: which end's agent reports.
    pub reporter: &'static str,
    /// The client workload's name (`unknown` outside the mesh).
    pub source_workload: String,
    /// Its namespace.
    pub source_workload_namespace: String,
    /// Its SPIFFE identity (`unknown` for plaintext).
    pub source_principal: String,
    /// The server workload's name.
    pub destination_workload: String,
    /// Its namespace.
    pub destination_workload_namespace: String,
    /// Its SPIFFE identity.
    pub destination_principal: String,
    /// The Service addressed, `unknown` when a pod was addressed directly.
    pub destination_service: String,
    /// `tcp`.
    pub request_protocol: &'static str,
    /// `mutual_tls` or `unknown`.
    pub connection_security_policy: &'static str,
    /// `-`, `DENY` (policy), `CONNECT` (upstream connect failure), `NR` (a destination on
    /// meshlet's own ports), `UO` (the pod's connection budget is spent).
    pub response_flags: &'static str,
}

impl ConnectionLabels {
    fn values(&self) -> [&str; 11] {
        [
            self.reporter,
            &self.source_workload,
            &self.source_workload_namespace,
            &self.source_principal,
            &self.destination_workload,
            &self.destination_workload_namespace,
            &self.destination_principal,
            &self.destination_service,
            self.request_protocol,
            self.connection_security_policy,
            self.response_flags,
        ]
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
            let counter =
                IntCounterVec::new(Opts::new(name, help), CONNECTION_LABELS).expect("valid metric");
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
        }
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
    pub fn cni_add_held(&self, held: std::time::Duration) {
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
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let runtime = handle.metrics();
            set("tokio_workers", runtime.num_workers() as i64);
            set("tokio_alive_tasks", runtime.num_alive_tasks() as i64);
            set(
                "tokio_global_queue_depth",
                runtime.global_queue_depth() as i64,
            );
        }
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn counts_bytes_as_they_pass_and_renders_istio_names() {
        let metrics = Metrics::new();
        let labels = ConnectionLabels {
            reporter: "source",
            source_workload: "client".into(),
            request_protocol: "tcp",
            connection_security_policy: "mutual_tls",
            response_flags: "-",
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
}
