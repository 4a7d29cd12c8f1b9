//! Istio's ztunnel beside meshlet, for side-by-side benchmarks and interop checks: one ztunnel
//! per pod in dedicated mode, configured from a local file instead of istiod, signing its own
//! workload certificates with its test root (`FAKE_CA`), and its outbound capture by an
//! iptables `REDIRECT` in the client pod (ztunnel does not capture by itself).
//!
//! The binary is never part of the project: callers take its path as an argument
//! (`--ztunnel <path>`). Its directory holds `root-cert.pem` and `ca-key.pem`, the root it signs
//! with, which a meshlet agent given as `--ca-cert`/`--ca-key` shares, so each trusts the other.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{Cluster, Pod};

/// The mark ztunnel puts on its own sockets, which the redirect rule lets through.
pub const PACKET_MARK: u32 = 1337;

/// One workload of ztunnel's local configuration.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Pod name (and service account: the harness names both alike).
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Pod IPv4 address.
    pub ip: IpAddr,
    /// Node name.
    pub node: String,
}

impl Workload {
    /// `pod` in `namespace`.
    pub fn of(pod: &Pod, namespace: &str) -> Self {
        Self {
            name: pod.name.clone(),
            namespace: namespace.into(),
            ip: pod.ipv4.into(),
            node: format!("node-{}", pod.node),
        }
    }
}

/// ztunnel's local configuration (`LOCAL_XDS_PATH`): every workload speaks HBONE.
pub fn config(workloads: &[Workload]) -> String {
    let mut yaml = String::from("workloads:\n");
    for w in workloads {
        yaml.push_str(&format!(
            "- uid: cluster1//v1/Pod/{ns}/{name}\n  name: {name}\n  namespace: {ns}\n  \
             serviceAccount: {name}\n  trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  \
             protocol: HBONE\n  node: {node}\n  network: \"\"\n  services: {{}}\n",
            ns = w.namespace,
            name = w.name,
            ip = w.ip,
            node = w.node,
        ));
    }
    yaml.push_str("policies: []\nservices: []\n");
    yaml
}

/// A ztunnel serving one pod, killed on drop.
#[derive(Debug)]
pub struct Ztunnel {
    child: Child,
    log: PathBuf,
}

impl Ztunnel {
    /// Starts `binary` in `pod`'s network namespace and cgroup as the dedicated ztunnel of
    /// workload `namespace/<pod>`, with `workers` worker threads, reading `config`; returns
    /// once it is ready (`/healthz/ready` on 15021 in the pod).
    ///
    /// # Panics
    /// If it does not start or get ready within 30 s (with its log).
    pub fn start(
        binary: &Path,
        cluster: &Cluster,
        pod: &str,
        namespace: &str,
        config: &Path,
        workers: usize,
    ) -> Self {
        let log = config.with_file_name(format!("ztunnel-{pod}.log"));
        let file = fs::File::create(&log).expect("create the ztunnel log");
        // ztunnel keeps the open-files limit it is given (a pod's is high; a shell's is 1,024):
        // raise it as the container runtime would, through prlimit(1), which then execs it.
        let hard = hard_open_files_limit();
        let mut command: Command = cluster.pod(pod).command("prlimit");
        command
            .arg(format!("--nofile={hard}:{hard}"))
            .arg("--")
            .arg(binary)
            .current_dir(config.parent().expect("the config is in a directory"))
            .env("XDS_ADDRESS", "")
            .env("CA_ADDRESS", "")
            .env("FAKE_CA", "true")
            .env("PROXY_MODE", "dedicated")
            .env("PROXY_WORKLOAD_INFO", format!("{namespace}/{pod}/{pod}"))
            .env("LOCAL_XDS_PATH", config)
            .env("PACKET_MARK", PACKET_MARK.to_string())
            .env("ENABLE_ORIG_SRC", "false")
            .env("ZTUNNEL_WORKER_THREADS", workers.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("start {}: {err}", binary.display()));
        let ztunnel = Self { child, log };
        let ready: SocketAddr = ([127, 0, 0, 1], 15021).into();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = cluster
                .pod(pod)
                .in_netns(|| crate::try_http_get(ready, "/healthz/ready"));
            if matches!(status, Ok((200, _))) {
                return ztunnel;
            }
            assert!(
                Instant::now() < deadline,
                "ztunnel in {pod} not ready in 30 s ({status:?}):\n{}",
                ztunnel.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.log);
    }
}

/// This process's hard limit of open files (`/proc/self/limits`), which a child may raise its
/// soft limit to.
pub fn hard_open_files_limit() -> usize {
    fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(4)?.parse().ok()
        })
        .unwrap_or(4096)
}

/// Redirects `pod`'s outbound TCP to `to` into its ztunnel (15001), as istio-cni's rules do:
/// `iptables -t nat -A OUTPUT -p tcp -d <to> -m mark ! --mark 1337 -j REDIRECT --to-ports
/// 15001`, in the pod's namespace (which goes with it).
///
/// # Panics
/// If iptables fails (`cargo xtask setup` installs it).
pub fn redirect(pod: &Pod, to: IpAddr) {
    let status = pod
        .command("iptables")
        .args(["-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d"])
        .arg(to.to_string())
        .args(["-m", "mark", "!", "--mark", &PACKET_MARK.to_string()])
        .args(["-j", "REDIRECT", "--to-ports", "15001"])
        .status()
        .expect("run iptables (cargo xtask setup installs it)");
    assert!(status.success(), "iptables in {}: {status}", pod.name);
}
