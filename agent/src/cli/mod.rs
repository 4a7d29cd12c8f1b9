//! The `meshlet` command line: `agent` runs the node agent, the other commands operate on or
//! inspect a node. Every agent flag has a `MESHLET_*` environment twin for the DaemonSet.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

pub mod inspect;
pub mod reference;

use ipnet::IpNet;

use crate::{
    agent,
    capture::{self, FailMode},
    source::SourceConfig,
    telemetry::{self, LogFormat},
};

/// meshlet: sidecarless, eBPF-based ambient service-mesh node agent.
#[derive(Debug, Parser)]
#[command(name = "meshlet", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent: capture enrolled pods and carry their traffic until stopped.
    Agent(Box<AgentArgs>),
    /// Run the mesh CA: sign workload certificates over Istio's certificate API, for the
    /// pods bound to each caller's node.
    Ca(Box<CaArgs>),
    /// The agent's state: source, sync, capture, store.
    Status(InspectArgs),
    /// The workloads the agent knows and whether they are captured.
    Workloads(InspectArgs),
    /// Workload certificates.
    Certs(InspectArgs),
    /// Policies and what meshlet makes of them (unsupported fields included); with
    /// --workload, those that bear on one workload and why.
    Policies(PoliciesArgs),
    /// Detach every meshlet eBPF program and remove its pins; remove the transparent routing
    /// left in the namespaces of the pods it captured; unchain and remove meshlet-cni.
    Uninstall(UninstallArgs),
    /// Check that this node can run the agent; each failure names its fix.
    Preflight(PreflightArgs),
    /// Install or remove the CNI plugin on this node (the agent does it with --cni-install).
    #[command(subcommand)]
    Cni(CniCommand),
    /// Print build information.
    Version,
}

/// Flags of `meshlet agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Where workloads come from: `kube` (the Kubernetes API) or `file:<path>` (Kubernetes YAML).
    #[arg(long, env = "MESHLET_SOURCE", default_value = "kube")]
    pub source: SourceConfig,
    /// This node's name: the agent serves the pods scheduled here.
    #[arg(long, env = "MESHLET_NODE_NAME")]
    pub node_name: String,
    /// The agent's own pod (downward API: metadata.name). With the kube source, the agent
    /// watches the DaemonSet that runs this pod: when it is deleted, SIGTERM releases capture
    /// instead of keeping it for a successor. Unset: capture stays on every exit.
    #[arg(long, env = "MESHLET_POD_NAME")]
    pub pod_name: Option<String>,
    /// The namespace of --pod-name (downward API: metadata.namespace).
    #[arg(long, env = "MESHLET_POD_NAMESPACE", default_value = "meshlet-system")]
    pub pod_namespace: String,
    /// Where capture attaches and pins, and which other programs may share its hooks.
    #[command(flatten)]
    pub node: NodeArgs,
    /// What happens to captured traffic of a pod whose proxy is not there: `closed` refuses
    /// it, `open` lets it go direct.
    #[arg(long, env = "MESHLET_FAIL_MODE", value_enum, default_value_t)]
    pub fail_mode: FailMode,
    /// Destination CIDR never captured (repeat, or comma-separate in the environment).
    #[arg(
        long = "exclude-cidr",
        env = "MESHLET_EXCLUDE_CIDRS",
        value_delimiter = ','
    )]
    pub exclude_cidrs: Vec<IpNet>,
    /// Port never captured, as destination (outbound) or local port (inbound).
    #[arg(
        long = "exclude-port",
        env = "MESHLET_EXCLUDE_PORTS",
        value_delimiter = ','
    )]
    pub exclude_ports: Vec<u16>,
    /// Kubelet's cgroup v2 directory: connections its processes open to pods (health probes)
    /// reach the application without capture [default: the cgroup of the root process named
    /// `kubelet` in the host's mount namespace, found through /proc; none found: probes are
    /// captured like any other client's connection].
    #[arg(long, env = "MESHLET_KUBELET_CGROUP")]
    pub kubelet_cgroup: Option<PathBuf>,
    /// Applications see their clients' addresses (`true`), or their pod's own (`false`: for
    /// environments where transparent sockets and a policy rule in each pod's namespace are
    /// not wanted).
    #[arg(
        long,
        env = "MESHLET_PRESERVE_SOURCE_ADDRESS",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub preserve_source_address: bool,
    /// Load this eBPF object instead of the one built in (tests of program upgrades).
    #[arg(long, hide = true)]
    pub ebpf_object: Option<PathBuf>,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "MESHLET_TRUST_DOMAIN", default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// The cluster CA, Istio's certificate API: `meshlet ca`
    /// (https://meshlet-ca.meshlet-system.svc:15012) or istiod
    /// (https://istiod.istio-system.svc:15012). Workload keys stay on the node; no CA key does.
    #[arg(long, env = "MESHLET_CA_ADDRESS", conflicts_with_all = ["ca_cert", "ca_key"])]
    pub ca_address: Option<String>,
    /// The roots to trust (PEM; several during a root rotation): the CA's TLS endpoint and
    /// every peer's certificate must chain to one. Re-read when it changes.
    #[arg(
        long,
        env = "MESHLET_CA_ROOT",
        default_value = "/var/run/secrets/meshlet/ca-root/root-cert.pem"
    )]
    pub ca_root: PathBuf,
    /// The projected service-account token presented to the CA (audience `istio-ca`).
    #[arg(
        long,
        env = "MESHLET_CA_TOKEN_PATH",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    pub ca_token_path: PathBuf,
    /// How long the workload certificates asked for are valid (renewed at half life; the CA
    /// may cap it).
    #[arg(long, env = "MESHLET_CERT_LIFETIME", default_value = "24h", value_parser = parse_positive_duration)]
    pub cert_lifetime: Duration,
    /// The cluster ID: sent to the CA (istiod's `ClusterID` header), and the value of
    /// `source_cluster` / `destination_cluster` in the metrics (istiod's `CLUSTER_ID`).
    #[arg(long, env = "MESHLET_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// The cluster DNS domain: `destination_service` is `<name>.<namespace>.svc.<domain>`.
    #[arg(long, env = "MESHLET_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// How long the `istio_tcp_*` series of a workload stay after its last pod is gone (then
    /// they are removed, so that pod churn does not grow the metrics without bound).
    #[arg(long, env = "MESHLET_METRICS_GRACE_PERIOD", default_value = "5m", value_parser = parse_positive_duration)]
    pub metrics_grace_period: Duration,
    /// Read Istio's `istio.io/dataplane-mode` label (namespace or pod) as an alias of
    /// meshlet's, leave pods with an Istio sidecar alone, and write Istio's
    /// `ambient.istio.io/redirection` annotation beside meshlet's: what a cluster migrating
    /// from Istio ambient, node by node, needs.
    #[arg(
        long,
        env = "MESHLET_ISTIO_LABELS",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub istio_labels: bool,
    /// DEVELOPMENT ONLY (file source, demo): a CA certificate chain (PEM: signing CA first,
    /// root last) to sign workload certificates on this node. With --ca-key.
    #[arg(long, env = "MESHLET_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// DEVELOPMENT ONLY: the key of --ca-cert (PEM: ECDSA P-256/P-384 or RSA 2048-4096).
    #[arg(long, env = "MESHLET_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Where the agent keeps state (a development root CA when no --ca-cert is given).
    #[arg(long, env = "MESHLET_STATE_DIR", default_value = "/var/lib/meshlet")]
    pub state_dir: PathBuf,
    /// Where `GET /metrics` is served.
    #[arg(long, env = "MESHLET_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Where `GET /healthz/ready` (readiness) and `GET /healthz/live` (liveness) are served.
    #[arg(long, env = "MESHLET_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// Where the admin API is served (keep it on loopback).
    #[arg(long, env = "MESHLET_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Log line format.
    #[arg(long, env = "MESHLET_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
    /// The unix socket `meshlet-cni` hands new pods to [default: <state-dir>/cni.sock]; the
    /// capture decisions for when the agent is down are kept beside it (namespaces.json).
    #[arg(long, env = "MESHLET_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,
    /// How long a CNI ADD may wait for its pod to be known and enrolled before it fails (the
    /// runtime retries).
    #[arg(long, env = "MESHLET_CNI_TIMEOUT", default_value = "10s", value_parser = parse_cni_timeout)]
    pub cni_timeout: Duration,
    /// Install `meshlet-cni` on the node (into --cni-bin-dir, chained in the primary conf of
    /// --cni-conf-dir) and keep it chained.
    #[arg(long, env = "MESHLET_CNI_INSTALL")]
    pub cni_install: bool,
    /// The node's CNI bin directory, as mounted in the agent.
    #[arg(long, env = "MESHLET_CNI_BIN_DIR", default_value = DEFAULT_CNI_BIN_DIR)]
    pub cni_bin_dir: PathBuf,
    /// The node's CNI conf directory, as mounted in the agent.
    #[arg(long, env = "MESHLET_CNI_CONF_DIR", default_value = DEFAULT_CNI_CONF_DIR)]
    pub cni_conf_dir: PathBuf,
    /// How long the agent keeps serving after SIGTERM: until a successor takes its listeners
    /// over, then the connections it owns until they end. At the deadline HBONE connections
    /// get a GOAWAY and the rest are closed. Set it to the pod's grace period minus 5 s.
    #[arg(long, env = "MESHLET_DRAIN_DEADLINE", default_value = "25s", value_parser = parse_duration)]
    pub drain_deadline: Duration,
    /// The unix socket a new agent takes this one's listeners from [default:
    /// <state-dir>/handoff.sock]. Each agent of a node must use the same; agents of different
    /// nodes sharing a state directory (simulated nodes) each need their own.
    #[arg(long, env = "MESHLET_HANDOFF_SOCKET")]
    pub handoff_socket: Option<PathBuf>,
    /// How long a connect to an upstream (application, passthrough destination, peer's 15008)
    /// may take, e.g. `10s`, `500ms`.
    #[arg(long, env = "MESHLET_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Congestion control of the HBONE tunnel's TCP connections between nodes, both ends, e.g.
    /// `cubic` (`default`: the pod namespace's, as the pod's own connections have). The legs
    /// that stay on the node never pace, whatever this says.
    #[arg(long, env = "MESHLET_TUNNEL_CONGESTION_CONTROL", default_value = "default", value_parser = parse_congestion_control)]
    pub tunnel_congestion_control: CongestionControl,
    /// Idle time before TCP keepalive probes start on proxied sockets (`0s` disables).
    #[arg(long, env = "MESHLET_TCP_KEEPALIVE", default_value = "180s", value_parser = parse_duration)]
    pub tcp_keepalive: Duration,
    /// Threads that carry the proxied connections, each with the pods placed on it (a pod's
    /// outbound listeners on one, its inbound ones on the next); the control plane has its own.
    /// What one pod's listener carries uses one thread's core at most.
    #[arg(long, env = "MESHLET_DATA_PLANE_THREADS", default_value_t = DATA_PLANE_THREADS as u16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub data_plane_threads: u16,
    /// Concurrent connections carried for one pod (its listeners plus HBONE streams to it);
    /// more are reset and counted [default: 10000, or an eighth of the sockets the open-files
    /// limit allows the node, whichever is smaller].
    #[arg(long, env = "MESHLET_MAX_CONNECTIONS_PER_POD", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_pod: Option<u32>,
    /// Concurrent TLS handshakes per HBONE (15008) listener; more wait.
    #[arg(long, env = "MESHLET_MAX_TLS_HANDSHAKES", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tls_handshakes: u32,
    /// Concurrent CONNECT streams per HBONE peer connection.
    #[arg(long, env = "MESHLET_HBONE_MAX_STREAMS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub hbone_max_streams: u32,
    /// Largest HTTP/2 header list an HBONE request may carry, in bytes.
    #[arg(long, env = "MESHLET_HBONE_MAX_HEADER_LIST_SIZE", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(1024..))]
    pub hbone_max_header_list_size: u32,
    /// Streams an HBONE peer may open and reset before the server accepts them; past it the
    /// connection is closed (HTTP/2 rapid-reset guard).
    #[arg(long, env = "MESHLET_HBONE_MAX_PENDING_RESETS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub hbone_max_pending_resets: u32,
}

/// The CNI bin directory of a node.
const DEFAULT_CNI_BIN_DIR: &str = "/opt/cni/bin";
/// The CNI conf directory of a node.
const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";

/// A congestion control algorithm named on the command line, or `default`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CongestionControl(Option<String>);

/// Parses `--tunnel-congestion-control`: `default`, or an algorithm the kernel has.
fn parse_congestion_control(text: &str) -> Result<CongestionControl, String> {
    let text = text.trim();
    if text == "default" {
        return Ok(CongestionControl(None));
    }
    // TCP_CA_NAME_MAX is 16 with the terminating NUL.
    if text.is_empty()
        || text.len() > 15
        || !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "{text:?} is not a congestion control name (at most 15 letters, digits, `_` or `-`: \
             `cubic`, `bbr`, ... or `default`)"
        ));
    }
    crate::sys::socket::check_congestion_control(text).map_err(|err| err.to_string())?;
    Ok(CongestionControl(Some(text.to_owned())))
}

/// Parses a duration written as a number with a unit: `500ms`, `10s`, `5m`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit (write 10s, 500ms or 5m)"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(Duration::from_secs(number)),
        "m" => Ok(Duration::from_secs(number.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(number.saturating_mul(3600))),
        other => Err(format!(
            "unknown unit {other:?} in {text:?} (use ms, s, m or h)"
        )),
    }
}

/// Flags of `meshlet ca`.
#[derive(Debug, Args)]
pub struct CaArgs {
    /// Where Istio's certificate API (gRPC over TLS) listens.
    #[arg(long, env = "MESHLET_CA_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Where `/metrics` and `/ready` are served.
    #[arg(long, env = "MESHLET_CA_METRICS_ADDR", default_value = "0.0.0.0:15014")]
    pub metrics_addr: SocketAddr,
    /// SPIFFE trust domain of the mesh: the only one signed.
    #[arg(long, env = "MESHLET_TRUST_DOMAIN", default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// The namespace of the root Secret and the trust bundle ConfigMap (the CA's own).
    #[arg(long, env = "MESHLET_CA_NAMESPACE", default_value = "meshlet-system")]
    pub namespace: String,
    /// The Secret holding the self-signed root (created once when there are no cacerts).
    #[arg(long, env = "MESHLET_CA_ROOT_SECRET", default_value = "meshlet-ca")]
    pub root_secret: String,
    /// The ConfigMap the trust bundle is published in (key root-cert.pem), for the agents.
    #[arg(
        long,
        env = "MESHLET_CA_ROOT_CONFIGMAP",
        default_value = "meshlet-ca-root"
    )]
    pub root_configmap: String,
    /// Where Istio's `cacerts` Secret is mounted (ca-cert.pem, ca-key.pem, cert-chain.pem,
    /// root-cert.pem); used when it holds ca-key.pem.
    #[arg(long, env = "MESHLET_CA_CACERTS_DIR", default_value = "/etc/cacerts")]
    pub cacerts_dir: PathBuf,
    /// The audience callers' tokens must be for.
    #[arg(long, env = "MESHLET_CA_AUDIENCE", default_value = "istio-ca")]
    pub audience: String,
    /// A node agent's service account (`namespace/name`), which may ask for the identities of
    /// the pods on its node (repeat, or comma-separate; add ztunnel's as istio-system/ztunnel).
    #[arg(
        long = "node-agent",
        env = "MESHLET_CA_NODE_AGENTS",
        value_delimiter = ',',
        default_value = "meshlet-system/meshlet"
    )]
    pub node_agents: Vec<crate::ca::Account>,
    /// The longest validity signed, e.g. `24h`.
    #[arg(long, env = "MESHLET_CA_MAX_VALIDITY", default_value = "24h", value_parser = parse_positive_duration)]
    pub max_validity: Duration,
    /// A DNS name or IP address of the serving certificate (repeat, or comma-separate).
    #[arg(
        long = "server-name",
        env = "MESHLET_CA_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "meshlet-ca.meshlet-system.svc,meshlet-ca.meshlet-system.svc.cluster.local,meshlet-ca.meshlet-system,meshlet-ca"
    )]
    pub server_names: Vec<String>,
    /// Log line format.
    #[arg(long, env = "MESHLET_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

/// [`parse_duration`], refusing zero.
fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err(format!("{text:?} must be more than zero")),
        duration => Ok(duration),
    }
}

/// `--cni-timeout`: positive, and short enough that the plugin (which waits 30 s) hears the
/// answer.
fn parse_cni_timeout(text: &str) -> Result<Duration, String> {
    match parse_positive_duration(text)? {
        timeout if timeout > Duration::from_secs(25) => Err(format!(
            "{text:?} is longer than 25s: meshlet-cni gives up on the agent after 30s"
        )),
        timeout => Ok(timeout),
    }
}

/// Flags of the inspection commands.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The agent's admin API.
    #[arg(long, env = "MESHLET_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: inspect::Output,
}

/// Flags of `meshlet policies`.
#[derive(Debug, Args)]
pub struct PoliciesArgs {
    /// Where to ask, and how to print.
    #[command(flatten)]
    pub inspect: InspectArgs,
    /// The pod `namespace/name`: print its effective mTLS mode per port and the policies that
    /// bear on it, in the order Istio considers them, with why each applies, inherits, is
    /// overridden, shadowed, a dry run or ignored.
    #[arg(long, value_parser = workload_key)]
    pub workload: Option<String>,
}

/// `namespace/name`, each a Kubernetes name (lowercase letters, digits, `-` and `.`).
fn workload_key(value: &str) -> Result<String, String> {
    let name = |part: &str| {
        !part.is_empty()
            && part.len() <= 253
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    match value.split_once('/') {
        Some((namespace, pod)) if name(namespace) && name(pod) => Ok(value.to_owned()),
        _ => Err(format!(
            "{value:?} is not a pod: write namespace/name, e.g. demo/server"
        )),
    }
}

/// Where capture attaches and pins: the agent's flags, which `meshlet preflight` shares so that
/// it looks where the agent will.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// cgroup v2 directory to attach capture to [default: the cgroup2 mount that shows the
    /// host's whole hierarchy; a container's own namespaced view is refused].
    #[arg(long, env = "MESHLET_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// bpffs directory for meshlet's pins [default: <bpffs mount>/meshlet].
    #[arg(long, env = "MESHLET_BPFFS_DIR")]
    pub bpffs_dir: Option<PathBuf>,
    /// A program of another's allowed at the cgroup hooks capture uses, by name (repeat, or
    /// comma-separate in the environment): Cilium's socket load balancer with
    /// socketLB.hostNamespaceOnly=true, for one. See `meshlet preflight`.
    #[arg(
        long = "allow-cgroup-program",
        env = "MESHLET_ALLOW_CGROUP_PROGRAMS",
        value_delimiter = ','
    )]
    pub allow_cgroup_programs: Vec<String>,
}

/// Flags of `meshlet preflight`.
#[derive(Debug, Args)]
pub struct PreflightArgs {
    /// Where capture attaches and pins, and which other programs may share its hooks.
    #[command(flatten)]
    pub node: NodeArgs,
    /// Load this eBPF object instead of the one built in.
    #[arg(long, hide = true)]
    pub ebpf_object: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: inspect::Output,
}

/// Flags of `meshlet uninstall`.
#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// bpffs directory holding meshlet's pins [default: <bpffs mount>/meshlet].
    #[arg(long, env = "MESHLET_BPFFS_DIR")]
    pub bpffs_dir: Option<PathBuf>,
    /// The CNI directories meshlet-cni is removed from.
    #[command(flatten)]
    pub cni: CniDirs,
}

/// The node's CNI directories.
#[derive(Debug, Args)]
pub struct CniDirs {
    /// The node's CNI bin directory.
    #[arg(long = "cni-bin-dir", env = "MESHLET_CNI_BIN_DIR", default_value = DEFAULT_CNI_BIN_DIR)]
    pub bin_dir: PathBuf,
    /// The node's CNI conf directory.
    #[arg(long = "cni-conf-dir", env = "MESHLET_CNI_CONF_DIR", default_value = DEFAULT_CNI_CONF_DIR)]
    pub conf_dir: PathBuf,
}

/// `meshlet cni ...`.
#[derive(Debug, Subcommand)]
pub enum CniCommand {
    /// Copy meshlet-cni into the CNI bin directory and chain it in the primary conf.
    Install(CniInstallArgs),
    /// Unchain meshlet-cni from every conf, then remove the binary.
    Uninstall(CniDirs),
}

/// Flags of `meshlet cni install`.
#[derive(Debug, Args)]
pub struct CniInstallArgs {
    /// The CNI directories.
    #[command(flatten)]
    pub dirs: CniDirs,
    /// The agent's socket, as the plugin on the node sees it.
    #[arg(long, env = "MESHLET_CNI_SOCKET", default_value = crate::cni::plugin::DEFAULT_AGENT_SOCKET)]
    pub agent_socket: PathBuf,
    /// What the plugin does when the agent cannot capture a pod that must be captured.
    #[arg(long, env = "MESHLET_FAIL_MODE", value_enum, default_value_t)]
    pub fail_mode: FailMode,
    /// The plugin binary [default: meshlet-cni next to this meshlet].
    #[arg(long)]
    pub plugin_binary: Option<PathBuf>,
}

/// `meshlet-cni` as shipped: next to the running `meshlet`.
fn plugin_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.parent()
                .map(|dir| dir.join(crate::cni::plugin::PLUGIN_TYPE))
        })
        .unwrap_or_else(|| PathBuf::from(crate::cni::plugin::PLUGIN_TYPE))
}

/// Parses the process arguments and runs the command.
pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Agent(args) => agent(*args),
        Command::Ca(args) => ca(*args),
        Command::Status(args) => inspect_or_exit(inspect::View::Status, args),
        Command::Workloads(args) => inspect_or_exit(inspect::View::Workloads, args),
        Command::Certs(args) => inspect_or_exit(inspect::View::Certs, args),
        Command::Policies(args) => match args.workload {
            Some(workload) => inspect_or_exit(inspect::View::Explain(workload), args.inspect),
            None => inspect_or_exit(inspect::View::Policies, args.inspect),
        },
        Command::Uninstall(args) => uninstall(args),
        Command::Preflight(args) => preflight(args),
        Command::Cni(command) => cni(command),
        Command::Version => {
            println!(
                "meshlet {} (eBPF object {} bytes)",
                env!("CARGO_PKG_VERSION"),
                capture::object_size()
            );
            Ok(())
        }
    }
}

fn agent(args: AgentArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format);
    // The node's checks before anything touches the kernel (the programs load right after,
    // which is that check).
    let preflight = match crate::preflight::gate(&crate::preflight::Config {
        cgroup_root: args.node.cgroup_root.clone(),
        bpffs_dir: args.node.bpffs_dir.clone(),
        allowed_programs: args.node.allow_cgroup_programs.clone(),
        load_programs: false,
        object: args.ebpf_object.clone(),
    }) {
        Ok(report) => report,
        // Capture an earlier agent pinned is in place: without an agent it refuses (fail
        // closed) every enrolled pod's connections, so serving it beats stopping here.
        Err(failed) if capture_is_pinned(args.node.bpffs_dir.clone()) => {
            tracing::warn!(
                "{failed}; capture is already installed on this node: serving it rather than \
                 leave it without an agent"
            );
            failed.report
        }
        Err(failed) => return Err(failed.into()),
    };
    for check in preflight.warnings() {
        if let crate::preflight::Outcome::Warn { detail, fix } = &check.outcome {
            tracing::warn!(check = check.name, fix = %fix, "preflight: {detail}");
        }
    }
    let mut capture = capture::Config::resolve(args.node.cgroup_root, args.node.bpffs_dir)?;
    capture.fail_mode = args.fail_mode;
    capture.excluded_cidrs = args.exclude_cidrs;
    capture.excluded_ports = args.exclude_ports;
    capture.object = args.ebpf_object;
    capture.preserve_source = args.preserve_source_address;
    capture.kubelet_cgroup = args.kubelet_cgroup.or_else(|| {
        capture::kubelet::detect(&capture.cgroup_root)
            .inspect_err(|err| {
                tracing::warn!(
                    "kubelet's cgroup not found: {err}; kubelet's probes go through capture and \
                     policy like any other client's connections (a STRICT pod refuses them)"
                );
            })
            .ok()
    });
    let identity = agent::IdentityConfig {
        trust_domain: args.trust_domain,
        remote: args
            .ca_address
            .map(|address| crate::identity::RemoteConfig {
                address,
                root: args.ca_root,
                token: args.ca_token_path,
                cluster_id: args.cluster_id.clone(),
            }),
        ca: args.ca_cert.zip(args.ca_key),
        state_dir: args.state_dir,
        cert_lifetime: args.cert_lifetime,
    };
    let endpoints = agent::Endpoints {
        metrics: args.metrics_addr,
        readiness: args.readiness_addr,
        admin: args.admin_addr,
    };
    let mut reserved_ports = crate::proxy::Limits::default().reserved_ports;
    reserved_ports.extend(
        [&endpoints.metrics, &endpoints.readiness, &endpoints.admin]
            .iter()
            .map(|addr| addr.port())
            .filter(|&port| port != 0),
    );
    let limits = crate::proxy::Limits {
        connect_timeout: args.connect_timeout,
        tcp_keepalive: args.tcp_keepalive,
        max_connections_per_pod: args.max_connections_per_pod.map(|n| n as usize),
        max_tls_handshakes: args.max_tls_handshakes as usize,
        hbone: crate::proxy::hbone::Limits {
            max_streams: args.hbone_max_streams,
            max_header_list_size: args.hbone_max_header_list_size,
            max_pending_accept_reset_streams: args.hbone_max_pending_resets as usize,
        },
        reserved_ports,
        tunnel_congestion_control: args.tunnel_congestion_control.0,
    };
    let socket = args
        .cni_socket
        .unwrap_or_else(|| identity.state_dir.join("cni.sock"));
    let handoff_socket = args
        .handoff_socket
        .unwrap_or_else(|| crate::handoff::default_path(&identity.state_dir));
    let cni = agent::CniConfig {
        install: args
            .cni_install
            .then(|| crate::cni::install::InstallConfig {
                bin_dir: args.cni_bin_dir,
                conf_dir: args.cni_conf_dir,
                plugin_binary: plugin_binary(),
                agent_socket: socket.clone(),
                fail_mode: capture.fail_mode,
            }),
        socket,
        timeout: args.cni_timeout,
    };
    let config = agent::Config {
        endpoints,
        identity,
        node_name: args.node_name,
        source: args.source,
        capture,
        limits,
        cni,
        drain_deadline: args.drain_deadline,
        data_plane_threads: usize::from(args.data_plane_threads),
        handoff_socket,
        telemetry: crate::metrics::Telemetry {
            cluster_id: args.cluster_id.into(),
            cluster_domain: args.cluster_domain,
            series_grace: args.metrics_grace_period,
        },
        enrollment: crate::workload::enrollment::Rules {
            istio_labels: args.istio_labels,
        },
        pod: args.pod_name.map(|name| (args.pod_namespace.clone(), name)),
    };
    runtime()?.block_on(agent::run(config))
}

/// Whether an earlier agent left capture pinned under the bpffs directory (`given`, or the
/// default one).
fn capture_is_pinned(given: Option<PathBuf>) -> bool {
    capture::mounts::mounts()
        .ok()
        .and_then(|mounts| capture::resolve_bpffs_dir(&mounts, given).ok())
        .is_some_and(|dir| dir.join("links").is_dir())
}

fn ca(args: CaArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format);
    let config = crate::ca::Config {
        listen: args.listen,
        metrics_addr: args.metrics_addr,
        trust_domain: args.trust_domain,
        namespace: args.namespace,
        root_secret: args.root_secret,
        root_configmap: args.root_configmap,
        cacerts_dir: args.cacerts_dir,
        audience: args.audience,
        node_agents: args.node_agents,
        max_validity: args.max_validity,
        server_names: args.server_names,
    };
    runtime()?.block_on(crate::ca::run(config))
}

/// Worker threads of the long-running commands' runtime: two, as the node has few cores to
/// spare.
pub const RUNTIME_WORKERS: usize = 2;

/// The agent's data-plane threads by default ([`crate::proxy::shards`], `--data-plane-threads`),
/// beside that runtime: as many as its workers, and as ztunnel's default worker threads.
pub const DATA_PLANE_THREADS: usize = RUNTIME_WORKERS;

/// The runtime of the long-running commands ([`RUNTIME_WORKERS`] workers).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKERS)
        .enable_all()
        .build()
}

/// Inspection commands fail in one line (`error: cannot reach ...: Connection refused`) with
/// exit status 1, like kubectl.
fn inspect_or_exit(view: inspect::View, args: InspectArgs) -> anyhow::Result<()> {
    if let Err(err) = inspect::run(view, args.admin_addr, args.output) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
    Ok(())
}

/// Prints the preflight report; exits with status 1 when a check failed (like the inspection
/// commands), so an init container stops the pod.
fn preflight(args: PreflightArgs) -> anyhow::Result<()> {
    let config = crate::preflight::Config {
        cgroup_root: args.node.cgroup_root,
        bpffs_dir: args.node.bpffs_dir,
        allowed_programs: args.node.allow_cgroup_programs,
        load_programs: true,
        object: args.ebpf_object,
    };
    let report = crate::preflight::run(&config);
    match args.output {
        inspect::Output::Table => println!("{report}"),
        inspect::Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    if !report.passed() {
        std::process::exit(1);
    }
    Ok(())
}

fn uninstall(args: UninstallArgs) -> anyhow::Result<()> {
    telemetry::init(LogFormat::Text);
    let bpffs_dir = match args.bpffs_dir {
        Some(dir) => dir,
        None => capture::Config::resolve(None, None)?.bpffs_dir,
    };
    // The plugin first: once capture is gone, no pod must wait for it.
    cni_uninstall(&args.cni)?;
    // The pods capture held, while their pins say which they are.
    let captured = capture::pins::Layout::new(&bpffs_dir)
        .netns_cookies()?
        .into_iter()
        .collect();
    let removed = capture::uninstall(&bpffs_dir)?;
    println!(
        "meshlet uninstalled from {}: {} program link(s) detached, {} map(s) unpinned",
        bpffs_dir.display(),
        removed.links,
        removed.maps
    );
    let cleaned =
        crate::sys::transparent::remove_left_behind(std::path::Path::new("/proc"), &captured)?;
    println!("transparent routing removed from {cleaned} pod namespace(s)");
    Ok(())
}

fn cni(command: CniCommand) -> anyhow::Result<()> {
    match command {
        CniCommand::Install(args) => {
            let config = crate::cni::install::InstallConfig {
                bin_dir: args.dirs.bin_dir,
                conf_dir: args.dirs.conf_dir,
                plugin_binary: args.plugin_binary.unwrap_or_else(plugin_binary),
                agent_socket: args.agent_socket,
                fail_mode: args.fail_mode,
            };
            let installed = crate::cni::install::install(&config)?;
            let binary = config.bin_dir.join(crate::cni::plugin::PLUGIN_TYPE);
            match installed.conf {
                Some(conf) => println!(
                    "meshlet-cni installed: {} ({}), chained in {} ({})",
                    binary.display(),
                    if installed.binary_changed {
                        "written"
                    } else {
                        "unchanged"
                    },
                    conf.display(),
                    if installed.conf_changed {
                        "written"
                    } else {
                        "unchanged"
                    },
                ),
                None => println!(
                    "meshlet-cni installed: {}; no CNI conf in {} yet to chain it in",
                    binary.display(),
                    config.conf_dir.display()
                ),
            }
            Ok(())
        }
        CniCommand::Uninstall(dirs) => cni_uninstall(&dirs),
    }
}

fn cni_uninstall(dirs: &CniDirs) -> anyhow::Result<()> {
    let removed = crate::cni::install::uninstall(&dirs.conf_dir, &dirs.bin_dir)?;
    for conf in &removed.confs {
        println!("meshlet-cni unchained from {}", conf.display());
    }
    if removed.binary {
        println!("meshlet-cni removed from {}", dirs.bin_dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_congestion_control_is_default_or_one_the_kernel_has() {
        assert_eq!(
            parse_congestion_control("default"),
            Ok(CongestionControl(None))
        );
        // reno is built into every kernel.
        assert_eq!(
            parse_congestion_control("reno"),
            Ok(CongestionControl(Some("reno".into())))
        );
        let unknown = parse_congestion_control("nonesuch").unwrap_err();
        assert!(
            unknown.contains("\"nonesuch\"")
                && unknown.contains("this kernel has: ")
                && unknown.contains("reno"),
            "{unknown}"
        );
        for bad in ["", "cu bic", "../cubic", "a_name_far_too_long"] {
            let err = parse_congestion_control(bad).unwrap_err();
            assert!(
                err.contains("is not a congestion control name"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn durations_parse_with_units_and_bad_ones_say_why() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        for bad in ["10", "s", "", "10d", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        let err = Cli::try_parse_from([
            "meshlet",
            "agent",
            "--node-name",
            "n",
            "--max-connections-per-pod",
            "0",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("max-connections-per-pod"), "{err}");
    }

    #[test]
    fn data_plane_threads_default_to_ztunnels_count_and_take_one_to_256() {
        let parsed = |extra: &[&str]| {
            let args = ["meshlet", "agent", "--node-name", "n"].iter().chain(extra);
            Cli::try_parse_from(args).map(|cli| match cli.command {
                Command::Agent(args) => usize::from(args.data_plane_threads),
                _ => unreachable!("an agent command"),
            })
        };
        assert_eq!(parsed(&[]).unwrap(), DATA_PLANE_THREADS);
        assert_eq!(parsed(&["--data-plane-threads", "8"]).unwrap(), 8);
        for bad in ["0", "257", "1.5", "two"] {
            let err = parsed(&["--data-plane-threads", bad])
                .unwrap_err()
                .to_string();
            assert!(err.contains("data-plane-threads"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn preserve_source_address_takes_true_or_false_and_nothing_else() {
        let parsed = |value: &str| {
            Cli::try_parse_from([
                "meshlet",
                "agent",
                "--node-name",
                "n",
                "--preserve-source-address",
                value,
            ])
            .map(|cli| match cli.command {
                Command::Agent(args) => args.preserve_source_address,
                _ => unreachable!("an agent command"),
            })
        };
        assert!(!parsed("false").unwrap());
        assert!(parsed("true").unwrap());
        for bad in ["maybe", "", "yes please"] {
            let err = parsed(bad).unwrap_err().to_string();
            assert!(err.contains("preserve-source-address"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn bad_ca_flags_are_refused_by_name() {
        let refused = |args: &[&str], flag: &str| {
            let err = Cli::try_parse_from(args).unwrap_err().to_string();
            assert!(err.contains(flag), "{args:?}: {err}");
        };
        refused(&["meshlet", "ca", "--max-validity", "0s"], "max-validity");
        refused(&["meshlet", "ca", "--node-agent", "meshlet"], "node-agent");
        refused(&["meshlet", "ca", "--node-agent", "a/b/c"], "node-agent");
        refused(
            &[
                "meshlet",
                "agent",
                "--node-name",
                "n",
                "--cert-lifetime",
                "0s",
            ],
            "cert-lifetime",
        );
        refused(
            &[
                "meshlet",
                "agent",
                "--node-name",
                "n",
                "--ca-address",
                "https://ca:15012",
                "--ca-cert",
                "c",
                "--ca-key",
                "k",
            ],
            "ca-address",
        );
        refused(
            &[
                "meshlet",
                "agent",
                "--node-name",
                "n",
                "--cni-timeout",
                "60s",
            ],
            "longer than 25s",
        );
        refused(
            &[
                "meshlet",
                "agent",
                "--node-name",
                "n",
                "--drain-deadline",
                "25",
            ],
            "has no unit",
        );
        assert!(
            Cli::try_parse_from(["meshlet", "ca"]).is_ok(),
            "the defaults parse"
        );
    }

    #[test]
    fn preflight_flags_parse_repeated_and_comma_separated() {
        let cli = Cli::try_parse_from([
            "meshlet",
            "preflight",
            "--allow-cgroup-program",
            "cil_sock4_connect,cil_sock6_connect",
            "--allow-cgroup-program",
            "other",
            "-o",
            "text",
        ])
        .unwrap();
        let Command::Preflight(args) = cli.command else {
            panic!("not preflight: {cli:?}");
        };
        assert_eq!(
            args.node.allow_cgroup_programs,
            ["cil_sock4_connect", "cil_sock6_connect", "other"]
        );
        assert_eq!(args.output, inspect::Output::Table);
        let cli = Cli::try_parse_from([
            "meshlet",
            "agent",
            "--node-name",
            "n",
            "--allow-cgroup-program",
            "a,b",
        ])
        .unwrap();
        let Command::Agent(args) = cli.command else {
            panic!("not agent: {cli:?}");
        };
        assert_eq!(args.node.allow_cgroup_programs, ["a", "b"]);
    }
}
