//! `meshlet ca` in tests: the CA process against a stand-in API server on loopback, agent
//! tokens the API server will review, and a client for crafting requests by hand.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime},
};

use meshlet::identity::{RemoteCa, RemoteConfig};
use serde_json::json;

use crate::{
    kube_api::{ApiServer, TokenSpec},
    process::{self, Agent},
};

/// The namespace of the CA and the agents, as deployed.
pub const SYSTEM: &str = "meshlet-system";
/// The audience of CA tokens.
pub const AUDIENCE: &str = "istio-ca";

/// A loopback port nothing listens on right now, so that a process can be (re)started on a
/// known address.
///
/// It comes from below the kernel's ephemeral range (`ip_local_port_range`): a port from that
/// range, bound and released, can be taken by any process's next outgoing connection before
/// the test binds it again. Each call starts from a different place (pid and a counter), and
/// a port is only returned once binding it has worked.
pub fn free_port() -> u16 {
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    // Where the ephemeral range starts low (`1024 65535`), any port can be taken; then the
    // search is as good as binding port 0.
    let (low, high) = (10_000, ephemeral_low.max(20_000));
    let span = high - low;
    let start = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(104_729));
    (0..span)
        .map(|i| (low + (start.wrapping_add(i)) % span) as u16)
        .find(|&port| TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok())
        .expect("a free loopback port below the ephemeral range")
}

/// A running `meshlet ca` on 127.0.0.1, stopped on drop.
#[derive(Debug)]
pub struct MeshCa {
    /// The process (and its log).
    pub process: Agent,
    /// Where its gRPC API listens.
    pub addr: SocketAddr,
}

impl MeshCa {
    /// Starts `meshlet ca` on `127.0.0.1:port` in this process's namespace, with the API server
    /// of `kubeconfig`, and waits until it serves. `extra` flags go last.
    pub fn start(kubeconfig: &Path, port: u16, extra: &[&str]) -> Self {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        Self::spawn(
            Command::new(process::meshlet_binary()),
            addr,
            kubeconfig,
            &[&["--metrics-addr", "127.0.0.1:0"], extra].concat(),
        )
    }

    /// Runs `command` (a `meshlet` command, e.g. placed in a node's namespace) as `meshlet ca`
    /// listening on `addr`, its serving certificate for `addr`'s IP, and waits until it serves.
    pub fn spawn(
        mut command: Command,
        addr: SocketAddr,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Self {
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let start = STARTS.fetch_add(1, Ordering::Relaxed);
        command
            .arg("ca")
            .args(["--listen", &addr.to_string()])
            .args(["--server-name", &addr.ip().to_string()])
            .args(["--cacerts-dir", "/nonexistent/meshlet-test-cacerts"])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info");
        let log = std::env::temp_dir().join(format!(
            "meshlet-ca-{}-{}-{start}.log",
            std::process::id(),
            addr.port()
        ));
        let process = Agent::spawn(command, log);
        process.wait_for_log(
            "serving Istio's certificate API",
            1,
            Duration::from_secs(20),
        );
        Self { process, addr }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Its metrics endpoint's text.
    pub fn metrics(&self) -> String {
        let (status, body) = get(self.process.endpoint("metrics"), "/metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The value of `meshlet_ca_requests_total{result}`.
    pub fn requests(&self, result: &str) -> f64 {
        let needle = format!("meshlet_ca_requests_total{{result=\"{result}\"}} ");
        self.metrics()
            .lines()
            .find_map(|line| line.strip_prefix(needle.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

/// The trust bundle the CA published (the `meshlet-ca-root` ConfigMap), written to a file as
/// the DaemonSet's ConfigMap volume would hold it.
pub fn write_trust_bundle(api: &ApiServer, path: &Path) -> String {
    let map = api
        .get("ConfigMap", SYSTEM, "meshlet-ca-root")
        .expect("the CA published its trust bundle");
    let pem = map["data"]["root-cert.pem"]
        .as_str()
        .expect("root-cert.pem")
        .to_owned();
    std::fs::write(path, &pem).expect("write the trust bundle");
    pem
}

/// Registers the agent pod of node `node` (`meshlet-<node>` in `meshlet-system`, service
/// account `meshlet`) and mints its projected token for the CA; returns the token.
pub fn agent_token(api: &ApiServer, node: &str) -> String {
    let name = format!("meshlet-{node}");
    let uid = format!("agent-uid-{node}");
    api.apply(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": SYSTEM, "uid": uid},
        "spec": {"nodeName": node, "serviceAccountName": "meshlet", "hostNetwork": true,
                 "containers": [{"name": "meshlet", "image": "meshlet"}]},
        "status": {"phase": "Running"},
    }));
    api.mint_token(TokenSpec {
        namespace: SYSTEM.to_owned(),
        service_account: "meshlet".to_owned(),
        audiences: vec![AUDIENCE.to_owned()],
        pod: Some((name, uid)),
        node: Some(node.to_owned()),
        expires: SystemTime::now() + Duration::from_secs(3600),
    })
}

/// Writes `token` to a file for `--ca-token-path`.
pub fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
    let path = dir.join(format!("{name}.token"));
    std::fs::write(&path, token).expect("write token");
    path
}

/// A client of the CA at `ca` trusting `bundle` (a file), for hand-made requests.
pub fn client(ca: &MeshCa, bundle: &Path) -> RemoteCa {
    RemoteCa::new(RemoteConfig {
        address: ca.url(),
        root: bundle.to_owned(),
        token: "/nonexistent".into(),
        cluster_id: "Kubernetes".to_owned(),
    })
    .expect("a CA client")
}

/// `GET path` over HTTP/1.0 to `addr` in this process's namespace: status and body.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    crate::try_http_get(addr, path).unwrap_or_else(|err| panic!("GET http://{addr}{path}: {err}"))
}

/// The value of the first sample of `name` (exact series text, e.g. `meshlet_ca_reachable`) in
/// Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
