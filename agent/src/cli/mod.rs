//! The `meshlet` command line: `agent` runs the node agent, the other commands operate on or
//! inspect a node. Every agent flag has a `MESHLET_*` environment twin for the DaemonSet.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

pub mod inspect;

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
    /// The agent's state: source, sync, capture, store.
    Status(InspectArgs),
    /// The workloads the agent knows and whether they are captured.
    Workloads(InspectArgs),
    /// Workload certificates.
    Certs(InspectArgs),
    /// Policies and what meshlet makes of them (unsupported fields included).
    Policies(InspectArgs),
    /// Detach every meshlet eBPF program and remove its pins.
    Uninstall(UninstallArgs),
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
    /// cgroup v2 directory to attach capture to [default: the host's cgroup2 mount].
    #[arg(long, env = "MESHLET_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// bpffs directory for meshlet's pins [default: <bpffs mount>/meshlet].
    #[arg(long, env = "MESHLET_BPFFS_DIR")]
    pub bpffs_dir: Option<PathBuf>,
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
    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "MESHLET_TRUST_DOMAIN", default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Mesh CA certificate chain (PEM: signing CA first, root last). With --ca-key.
    #[arg(long, env = "MESHLET_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The CA's private key (PEM: ECDSA P-256/P-384 or RSA 2048-4096).
    #[arg(long, env = "MESHLET_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Where the agent keeps state (a development root CA when no --ca-cert is given).
    #[arg(long, env = "MESHLET_STATE_DIR", default_value = "/var/lib/meshlet")]
    pub state_dir: PathBuf,
    /// Where `GET /metrics` is served.
    #[arg(long, env = "MESHLET_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Where `GET /healthz/ready` is served.
    #[arg(long, env = "MESHLET_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// Where the admin API is served (keep it on loopback).
    #[arg(long, env = "MESHLET_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Log line format.
    #[arg(long, env = "MESHLET_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
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

/// Flags of `meshlet uninstall`.
#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// bpffs directory holding meshlet's pins [default: <bpffs mount>/meshlet].
    #[arg(long, env = "MESHLET_BPFFS_DIR")]
    pub bpffs_dir: Option<PathBuf>,
}

/// Parses the process arguments and runs the command.
pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Agent(args) => agent(*args),
        Command::Status(args) => inspect_or_exit(inspect::View::Status, args),
        Command::Workloads(args) => inspect_or_exit(inspect::View::Workloads, args),
        Command::Certs(args) => inspect_or_exit(inspect::View::Certs, args),
        Command::Policies(args) => inspect_or_exit(inspect::View::Policies, args),
        Command::Uninstall(args) => uninstall(args),
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
    let mut capture = capture::Config::resolve(args.cgroup_root, args.bpffs_dir)?;
    capture.fail_mode = args.fail_mode;
    capture.excluded_cidrs = args.exclude_cidrs;
    capture.excluded_ports = args.exclude_ports;
    let identity = agent::IdentityConfig {
        trust_domain: args.trust_domain,
        ca: args.ca_cert.zip(args.ca_key),
        state_dir: args.state_dir,
    };
    let endpoints = agent::Endpoints {
        metrics: args.metrics_addr,
        readiness: args.readiness_addr,
        admin: args.admin_addr,
    };
    let config = agent::Config {
        endpoints,
        identity,
        node_name: args.node_name,
        source: args.source,
        capture,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(agent::run(config))
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

fn uninstall(args: UninstallArgs) -> anyhow::Result<()> {
    telemetry::init(LogFormat::Text);
    let bpffs_dir = match args.bpffs_dir {
        Some(dir) => dir,
        None => capture::Config::resolve(None, None)?.bpffs_dir,
    };
    let removed = capture::uninstall(&bpffs_dir)?;
    println!(
        "meshlet uninstalled from {}: {} program link(s) detached, {} map(s) unpinned",
        bpffs_dir.display(),
        removed.links,
        removed.maps
    );
    Ok(())
}
