//! meshlet's end-to-end test harness: a simulated Kubernetes cluster made of network
//! namespaces, cgroups and veth pairs, on which the real agent code runs.
//!
//! ```text
//!              fabric netns: bridge br0 (172.18.0.0/16, fc00:f853:ccd:e793::/64)
//!              /                                   \
//!   node-0 netns (172.18.0.2)              node-1 netns (172.18.0.3)
//!   p0: 10.244.0.1 ── pod netns            p1: 10.244.1.1 ── pod netns
//!       eth0 10.244.0.10/32                    eth0 10.244.1.11/32
//! ```
//!
//! Every pod is a network namespace with a veth to its node, IPv4 and IPv6 addresses and routes
//! through its node, and a cgroup shaped like kubelet's under a per-test cgroup root
//! (`<root>/kubepods/besteffort/pod<uid>/<container>`), so discovery and capture code see what
//! they would see on a node. Nothing here is connected to the machine's own network namespace.
//!
//! Every namespace, cgroup and bpffs directory is named with [`TEST_PREFIX`] and removed by the
//! [`Cluster`]'s `Drop`, also when a test panics; `cargo xtask test` checks that a run leaves
//! none behind.

pub mod bpf;
pub mod cni;
pub mod kube_api;
pub mod mesh;
pub mod mesh_ca;
pub mod process;
pub mod promql;
pub mod raw_hbone;
pub mod ztunnel;

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use meshlet::{capture::mounts, sys::Netns};
pub use process::{Accepted, ConnectReport, Process};

/// What every test client sends, repeated: a capture of a link can look for it.
pub const PLAINTEXT_MARKER: &[u8] = b"meshlet-plaintext-marker.";

/// Prefix of every network namespace, cgroup and bpffs directory the harness creates.
pub const TEST_PREFIX: &str = "mlt-";

static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

/// Panics with a readable message unless the process can do what the harness needs.
pub fn require_root() {
    let uid = fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(u32::MAX);
    assert_eq!(
        uid, 0,
        "the end-to-end tests create network namespaces, cgroups and eBPF programs: run them as root \
         (`cargo xtask test`)"
    );
}

/// Runs `ip` with `args`, panicking with its stderr if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2 is installed by `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct NetnsGuard {
    name: String,
}

impl NetnsGuard {
    fn create(name: String) -> Self {
        ip(&["netns", "add", &name]);
        let guard = Self { name };
        // No duplicate address detection: addresses are usable at once, tests do not wait.
        guard.sysctl("net/ipv6/conf/all/accept_dad", "0");
        guard.sysctl("net/ipv6/conf/default/accept_dad", "0");
        guard.ip(&["link", "set", "lo", "up"]);
        guard
    }

    /// The namespace's name under `/var/run/netns`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path, for `setns` or `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// An open handle on the namespace.
    pub fn open(&self) -> Netns {
        Netns::open(self.path()).expect("open test network namespace")
    }

    /// Runs `ip -n <this> args`.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// Writes a `/proc/sys/...` value inside the namespace (from a thread that entered it, so
    /// no mount namespace is involved).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = Path::new("/proc/sys").join(key);
        self.open()
            .run(|| fs::write(&path, value))
            .expect("enter netns")
            .unwrap_or_else(|err| panic!("sysctl {key}={value} in {}: {err}", self.name));
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A cgroup v2 directory tree, emptied (`cgroup.kill`) and removed on drop.
#[derive(Debug)]
pub struct CgroupGuard {
    path: PathBuf,
}

impl CgroupGuard {
    /// A new cgroup directly under the machine's cgroup2 mount, named
    /// `mlt-<pid>-<n>-<what>`.
    pub fn new(what: &str) -> Self {
        require_root();
        Self::create(cgroup2_mount().join(format!("{}-{what}", unique_id())))
    }

    fn create(path: PathBuf) -> Self {
        fs::create_dir_all(&path)
            .unwrap_or_else(|err| panic!("create cgroup {}: {err}", path.display()));
        Self { path }
    }

    /// The cgroup directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

/// Kills every process in a cgroup subtree, then removes its directories bottom-up.
pub fn remove_cgroup_tree(path: &Path) {
    if !path.exists() {
        return;
    }
    // cgroup.kill (Linux >= 5.14) SIGKILLs the whole subtree at once.
    let _ = fs::write(path.join("cgroup.kill"), "1");
    for _ in 0..200 {
        let populated = fs::read_to_string(path.join("cgroup.events"))
            .map(|events| events.lines().any(|l| l == "populated 1"))
            .unwrap_or(false);
        if !populated {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    rmdir_tree(path);
}

fn rmdir_tree(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(path);
}

/// A directory on bpffs for a test's pins, removed (which unpins and detaches) on drop.
#[derive(Debug)]
pub struct BpffsGuard {
    path: PathBuf,
}

impl BpffsGuard {
    /// A directory for pins on the machine's bpffs (mounted first if none is), named
    /// `mlt-<pid>-<n>-<what>`.
    pub fn new(what: &str) -> Self {
        require_root();
        Self {
            path: bpffs_mount().join(format!("{}-{what}", unique_id())),
        }
    }

    /// The directory (not created: the agent creates it).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpffsGuard {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A simulated node: a network namespace on the fabric, routing for its pods.
#[derive(Debug)]
pub struct Node {
    /// `node-<index>`.
    pub name: String,
    /// Position in the cluster.
    pub index: usize,
    /// The node's address on the fabric.
    pub ipv4: Ipv4Addr,
    /// The node's IPv6 address on the fabric.
    pub ipv6: Ipv6Addr,
    /// The node's network namespace.
    pub netns: NetnsGuard,
}

/// A simulated pod: a network namespace behind its node, and a kubelet-shaped cgroup.
#[derive(Debug)]
pub struct Pod {
    /// The pod's name.
    pub name: String,
    /// Its UID, as the kubelet names its cgroup.
    pub uid: String,
    /// The index of its node.
    pub node: usize,
    /// Its IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Its IPv6 address.
    pub ipv6: Ipv6Addr,
    /// The container cgroup its processes run in.
    pub cgroup: PathBuf,
    /// The pod's network namespace.
    pub netns: NetnsGuard,
    /// Its first process (like the kubelet's pause container): what netns discovery finds.
    pause: Option<Process>,
}

impl Pod {
    /// The pod's manifest as the API server (or a workload file) would hold it: running and
    /// ready on its node, with its UID, addresses and service account (the pod's name).
    pub fn manifest(&self, namespace: &str, labels: &[(&str, &str)]) -> serde_json::Value {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": self.name, "namespace": namespace, "uid": self.uid, "labels": labels },
            "spec": {
                "nodeName": format!("node-{}", self.node),
                "serviceAccountName": self.name,
                "containers": [{ "name": "app", "image": "meshlet-testpod" }],
            },
            "status": {
                "phase": "Running",
                "podIP": self.ipv4.to_string(),
                "podIPs": [{ "ip": self.ipv4.to_string() }, { "ip": self.ipv6.to_string() }],
                "conditions": [{ "type": "Ready", "status": "True" }],
            },
        })
    }

    /// [`Pod::manifest`] as the API holds it while the pod's sandbox is being created: bound
    /// to its node, `Pending`, no addresses yet (the kubelet reports them after CNI ADD).
    pub fn pending_manifest(&self, namespace: &str, labels: &[(&str, &str)]) -> serde_json::Value {
        let mut manifest = self.manifest(namespace, labels);
        manifest["status"] = serde_json::json!({ "phase": "Pending" });
        manifest
    }

    /// [`Pod::manifest`] as a captured mesh pod's looks once its agent has confirmed capture
    /// (`meshlet.io/redirection: enabled`): what clients need to see to use HBONE. In a
    /// workload file the file carries it, as the API server would after the agent's patch.
    pub fn mesh_manifest(&self, namespace: &str, labels: &[(&str, &str)]) -> serde_json::Value {
        let mut manifest = self.manifest(namespace, labels);
        manifest["metadata"]["annotations"] =
            serde_json::json!({ "meshlet.io/redirection": "enabled" });
        manifest
    }

    /// Stops the pod's processes (its pause process first): the namespace stays, but discovery
    /// no longer finds the pod.
    pub fn stop_processes(&mut self) {
        self.pause = None;
    }

    /// A socket address of this pod on `port`, IPv4 or IPv6.
    pub fn addr(&self, ipv6: bool, port: u16) -> SocketAddr {
        let ip: IpAddr = if ipv6 {
            self.ipv6.into()
        } else {
            self.ipv4.into()
        };
        SocketAddr::new(ip, port)
    }

    /// What the `sk_lookup` program logs (aya-log) when it drops a connection to this pod's
    /// IPv4 `port` because the pod has no proxy listener (fail closed).
    pub fn dropped_without_listener(&self, port: u16) -> String {
        format!(
            "sk_lookup: no listener for [::ffff:{}]:{port}; dropped (fail closed)",
            self.ipv4
        )
    }

    /// The cookie the kernel (and the eBPF programs) know this pod's network namespace by.
    pub fn netns_cookie(&self) -> u64 {
        self.netns.open().cookie().expect("netns cookie")
    }

    /// Runs `f` on a thread inside the pod's network namespace (not its cgroup: cgroup v2
    /// membership is per process, so code that must run in the pod's cgroup uses
    /// [`Pod::command`]).
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.netns.open().run(f).expect("enter pod netns")
    }

    /// A command that runs inside the pod's network namespace and container cgroup.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        process::in_pod(program, &self.netns.path(), &self.cgroup)
    }

    /// Starts the test echo server on `port` (IPv4 and IPv6) in the pod; waits until it listens.
    pub fn echo_server(&self, port: u16) -> Process {
        Process::spawn_ready(self.testpod(&["echo", "--port", &port.to_string()]))
    }

    /// Connects from inside the pod to `to`, sends `payload` bytes and reads the echo.
    pub fn connect(&self, to: SocketAddr, payload: usize) -> ConnectReport {
        self.connect_with(to, payload, &[])
    }

    /// [`Pod::connect`] with more `meshlet-testpod connect` flags (`--mark`, `--timeout-ms N`,
    /// `--delay-ms N`).
    pub fn connect_with(&self, to: SocketAddr, payload: usize, flags: &[&str]) -> ConnectReport {
        process::connect_with(self.command(process::testpod_binary()), to, payload, flags)
    }

    /// Starts `count` connections from the pod to `to`, `rate` per second, in the background.
    pub fn load(&self, to: SocketAddr, rate: u32, count: usize) -> process::Load {
        process::Load::start(self.testpod(&[
            "load",
            "--to",
            &to.to_string(),
            "--rate",
            &rate.to_string(),
            "--count",
            &count.to_string(),
        ]))
    }

    /// Opens a long-lived connection from the pod to `to` and echoes once over it; the second
    /// exchange happens on [`process::Held::release`].
    pub fn hold(&self, to: SocketAddr) -> process::Held {
        static HOLDS: AtomicU32 = AtomicU32::new(0);
        let release = std::env::temp_dir().join(format!(
            "meshlet-hold-{}-{}",
            std::process::id(),
            HOLDS.fetch_add(1, Ordering::Relaxed)
        ));
        process::Held::start(self.testpod(&["hold", "--to", &to.to_string()]), release)
    }

    fn testpod(&self, args: &[&str]) -> Command {
        let mut command = self.command(process::testpod_binary());
        command.args(args);
        command
    }
}

/// The pieces of a test cluster, torn down in the right order on drop: processes (through
/// their cgroups), pins, namespaces, cgroups.
#[derive(Debug)]
pub struct Cluster {
    id: String,
    extra_netns: Vec<NetnsGuard>,
    pods: Vec<Pod>,
    nodes: Vec<Node>,
    fabric: NetnsGuard,
    bpffs: BpffsGuard,
    cgroup: CgroupGuard,
    /// Open-files limits (soft and hard) given to the agents of some nodes.
    agent_open_files: Vec<(usize, u64)>,
}

/// `mlt-<pid>-<n>`: unique across the test processes of a run, the prefix of everything one
/// cluster (or one guard) creates.
fn unique_id() -> String {
    format!(
        "{TEST_PREFIX}{}-{}",
        std::process::id(),
        NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The machine's cgroup2 mount (not always /sys/fs/cgroup: found in mountinfo).
pub fn cgroup2_mount() -> PathBuf {
    let mounts = mounts::mounts().expect("read mountinfo");
    mounts::find(&mounts, "cgroup2").expect("no cgroup2 filesystem is mounted")
}

/// The machine's bpffs mount, mounted at /sys/fs/bpf first if there is none.
pub fn bpffs_mount() -> PathBuf {
    let mounts = mounts::mounts().expect("read mountinfo");
    match mounts::find(&mounts, "bpf") {
        Some(dir) => dir,
        None => {
            let status = Command::new("mount")
                .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
                .status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "no bpffs mounted and mounting one failed"
            );
            PathBuf::from("/sys/fs/bpf")
        }
    }
}

impl Cluster {
    /// A cluster of `nodes` nodes on one fabric, with no pods yet.
    pub fn new(nodes: usize) -> Self {
        require_root();
        let id = unique_id();
        let (cgroup2, bpffs) = (cgroup2_mount(), bpffs_mount());
        // Guards first, so that a failure below still cleans up what was made.
        let cgroup = CgroupGuard::create(cgroup2.join(&id));
        let bpffs = BpffsGuard {
            path: bpffs.join(&id),
        };
        let fabric = NetnsGuard::create(format!("{id}-fab"));
        fabric.ip(&["link", "add", "br0", "type", "bridge"]);
        fabric.ip(&["link", "set", "br0", "up"]);
        let mut cluster = Self {
            id,
            extra_netns: Vec::new(),
            pods: Vec::new(),
            nodes: Vec::new(),
            fabric,
            bpffs,
            cgroup,
            agent_open_files: Vec::new(),
        };
        for index in 0..nodes {
            cluster.add_node(index, nodes);
        }
        cluster
    }

    fn add_node(&mut self, index: usize, count: usize) {
        let name = format!("node-{index}");
        fs::create_dir_all(self.cgroup_root(index)).expect("create the node's cgroup root");
        let netns = NetnsGuard::create(format!("{}-n{index}", self.id));
        let ipv4 = node_ipv4(index);
        let ipv6 = node_ipv6(index);
        netns.sysctl("net/ipv4/ip_forward", "1");
        netns.sysctl("net/ipv6/conf/all/forwarding", "1");
        let port = format!("n{index}");
        veth_pair(&netns, &port, &self.fabric);
        self.fabric
            .ip(&["link", "set", &port, "master", "br0", "up"]);
        netns.ip(&["addr", "add", &format!("{ipv4}/16"), "dev", "eth0"]);
        netns.ip(&["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"]);
        netns.ip(&["link", "set", "eth0", "up"]);
        for peer in (0..count).filter(|&peer| peer != index) {
            netns.ip(&[
                "route",
                "add",
                &format!("10.244.{peer}.0/24"),
                "via",
                &node_ipv4(peer).to_string(),
            ]);
            netns.ip(&[
                "-6",
                "route",
                "add",
                &format!("fd00:10:244:{peer}::/64"),
                "via",
                &node_ipv6(peer).to_string(),
            ]);
        }
        self.nodes.push(Node {
            name,
            index,
            ipv4,
            ipv6,
            netns,
        });
    }

    /// Adds a pod on node `node`, with its cgroup under the cgroup root.
    pub fn add_pod(&mut self, name: &str, node: usize) -> &Pod {
        let parent = self.cgroup_root(node).join("kubepods/besteffort");
        self.add_pod_in(name, node, parent)
    }

    /// Adds a pod whose sandbox exists (network namespace, addresses, routes, cgroup) and whose
    /// containers have not started: no process, so only `meshlet-cni` can announce it.
    pub fn add_pod_sandbox(&mut self, name: &str, node: usize) -> &Pod {
        let parent = self.cgroup_root(node).join("kubepods/besteffort");
        self.add_pod_with(name, node, parent, false)
    }

    /// Adds a pod whose cgroup is outside the cgroup root: programs attached at the root never
    /// see its sockets (like a process outside Kubernetes' hierarchy).
    pub fn add_pod_outside_root(&mut self, name: &str, node: usize) -> &Pod {
        let parent = self.cgroup.path().join("outside");
        self.add_pod_in(name, node, parent)
    }

    fn add_pod_in(&mut self, name: &str, node: usize, cgroup_parent: PathBuf) -> &Pod {
        self.add_pod_with(name, node, cgroup_parent, true)
    }

    fn add_pod_with(
        &mut self,
        name: &str,
        node: usize,
        cgroup_parent: PathBuf,
        start: bool,
    ) -> &Pod {
        assert!(node < self.nodes.len(), "no node {node}");
        assert!(
            self.pods.iter().all(|p| p.name != name),
            "pod {name} exists already"
        );
        let index = self.pods.len();
        let host = 10 + index;
        // Unique across every cluster of every test process: discovery scans all of /proc.
        let (pid, seq) = self.id[TEST_PREFIX.len()..]
            .split_once('-')
            .expect("cluster id is mlt-<pid>-<seq>");
        let uid = format!(
            "{:08x}-{:04x}-4{:03x}-8000-{index:012x}",
            pid.parse::<u32>().expect("pid"),
            seq.parse::<u32>().expect("seq") & 0xffff,
            node & 0xfff
        );
        let container = format!(
            "{:064x}",
            (self.pods.len() as u128 + 1) * 0x9e37_79b9_7f4a_7c15
        );
        let cgroup = cgroup_parent.join(format!("pod{uid}")).join(container);
        fs::create_dir_all(&cgroup)
            .unwrap_or_else(|err| panic!("create {}: {err}", cgroup.display()));

        let netns = NetnsGuard::create(format!("{}-p{index}", self.id));
        let node_ns = &self.nodes[node].netns;
        let ipv4 = Ipv4Addr::new(10, 244, node as u8, host as u8);
        let ipv6: Ipv6Addr = format!("fd00:10:244:{node}::{host:x}")
            .parse()
            .expect("pod IPv6");
        let (gw4, gw6) = (pod_gateway_v4(node), pod_gateway_v6(node));
        let port = format!("p{index}");
        veth_pair(&netns, &port, node_ns);
        netns.ip(&["addr", "add", &format!("{ipv4}/32"), "dev", "eth0"]);
        netns.ip(&[
            "addr",
            "add",
            &format!("{ipv6}/128"),
            "dev",
            "eth0",
            "nodad",
        ]);
        netns.ip(&["link", "set", "eth0", "up"]);
        netns.ip(&[
            "route",
            "add",
            &gw4.to_string(),
            "dev",
            "eth0",
            "scope",
            "link",
        ]);
        netns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &gw4.to_string(),
            "dev",
            "eth0",
        ]);
        netns.ip(&["-6", "route", "add", &gw6.to_string(), "dev", "eth0"]);
        netns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &gw6.to_string(),
            "dev",
            "eth0",
        ]);
        node_ns.ip(&["addr", "add", &format!("{gw4}/32"), "dev", &port]);
        node_ns.ip(&["addr", "add", &format!("{gw6}/128"), "dev", &port, "nodad"]);
        node_ns.ip(&["link", "set", &port, "up"]);
        node_ns.ip(&["route", "add", &format!("{ipv4}/32"), "dev", &port]);
        node_ns.ip(&["-6", "route", "add", &format!("{ipv6}/128"), "dev", &port]);

        let pause = start.then(|| {
            let mut pause = process::in_pod(process::testpod_binary(), &netns.path(), &cgroup);
            pause.arg("pause");
            Process::spawn_ready(pause)
        });
        self.pods.push(Pod {
            pause,
            name: name.to_owned(),
            uid,
            node,
            ipv4,
            ipv6,
            cgroup,
            netns,
        });
        self.pods.last().expect("just pushed")
    }

    /// Adds `count` bare network namespaces (loopback only, no veth, no cgroup), for
    /// benchmarks that need many namespaces and nothing else; returns all added so far.
    pub fn add_bare_namespaces(&mut self, count: usize) -> &[NetnsGuard] {
        let start = self.extra_netns.len();
        for index in start..start + count {
            self.extra_netns
                .push(NetnsGuard::create(format!("{}-x{index}", self.id)));
        }
        &self.extra_netns
    }

    /// The pod named `name`, mutably.
    pub fn pod_mut(&mut self, name: &str) -> &mut Pod {
        self.pods
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Node `index`.
    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index]
    }

    /// The cluster's id, the prefix of everything it created.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The cgroup root of node `index`, the stand-in for that node's cgroup2 mount: its pods'
    /// cgroups are below it, and its agent attaches there.
    pub fn cgroup_root(&self, index: usize) -> PathBuf {
        self.cgroup.path().join(format!("node-{index}"))
    }

    /// The bpffs directory for the pins of node `index`'s agent.
    pub fn bpffs_dir(&self, index: usize) -> PathBuf {
        self.bpffs.path().join(format!("node-{index}"))
    }

    /// A command running `meshlet` on node `index`: in the node's network namespace and in a
    /// cgroup of its own under the cgroup root (as a DaemonSet pod would be), pointed at the
    /// cluster's cgroup root and bpffs directory.
    pub fn agent_command(&self, index: usize) -> Command {
        let node = &self.nodes[index];
        let cgroup = self.cgroup_root(index).join("meshlet");
        fs::create_dir_all(&cgroup)
            .unwrap_or_else(|err| panic!("create {}: {err}", cgroup.display()));
        match self
            .agent_open_files
            .iter()
            .find(|(node, _)| *node == index)
        {
            // prlimit(1) sets the limit and execs the agent (same process).
            Some((_, limit)) => {
                let mut command = process::in_pod("prlimit", &node.netns.path(), &cgroup);
                command
                    .arg(format!("--nofile={limit}:{limit}"))
                    .arg("--")
                    .arg(process::meshlet_binary());
                command
            }
            None => process::in_pod(process::meshlet_binary(), &node.netns.path(), &cgroup),
        }
    }

    /// Agents of node `index` started from now on in its namespace ([`Cluster::agent_command`]:
    /// [`Cluster::start_agent`], [`Cluster::start_agent_in_node`]) run with `limit` open files
    /// (soft and hard, through prlimit(1)), so the budgets they derive from it are small enough
    /// for a test to reach.
    pub fn limit_agent_open_files(&mut self, index: usize, limit: u64) {
        self.agent_open_files.retain(|(node, _)| *node != index);
        self.agent_open_files.push((index, limit));
    }

    /// Starts a stand-in for the proxy's in-pod listeners in `pod`'s network namespace: marked
    /// echo listeners on `listen` that report each connection with its `SO_ORIGINAL_DST`. Like
    /// the agent, it runs in a cgroup under the cgroup root (the `getsockopt` program only
    /// answers sockets created there).
    pub fn proxy_listeners(&self, pod: &str, listen: &[SocketAddr]) -> Process {
        let pod = self.pod(pod);
        let cgroup = self.cgroup_root(pod.node).join("meshlet");
        fs::create_dir_all(&cgroup)
            .unwrap_or_else(|err| panic!("create {}: {err}", cgroup.display()));
        let mut command = process::in_pod(process::testpod_binary(), &pod.netns.path(), &cgroup);
        command.arg("proxy");
        for addr in listen {
            command.args(["--listen", &addr.to_string()]);
        }
        Process::spawn_ready(command)
    }

    /// A command running on node `index` (its network namespace; a cgroup under the root, like
    /// the kubelet's on a host).
    pub fn node_command(&self, index: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let node = &self.nodes[index];
        let cgroup = self.cgroup_root(index).join("system.slice");
        fs::create_dir_all(&cgroup)
            .unwrap_or_else(|err| panic!("create {}: {err}", cgroup.display()));
        process::in_pod(program, &node.netns.path(), &cgroup)
    }

    /// Connects from node `index` itself to `to` (like a kubelet probe).
    pub fn connect_from_node(&self, index: usize, to: SocketAddr, payload: usize) -> ConnectReport {
        let command = self.node_command(index, process::testpod_binary());
        process::connect_with(command, to, payload, &[])
    }

    /// The cluster's state directory: the mesh CA every agent of the cluster shares (created
    /// on first use, removed with the cluster).
    pub fn state_dir(&self) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("{}-state", self.id));
        meshlet::identity::Ca::load_or_generate(&dir, meshlet::identity::DEFAULT_TRUST_DOMAIN)
            .unwrap_or_else(|err| panic!("create the test mesh CA in {}: {err}", dir.display()));
        dir
    }

    /// Node `index`'s CNI socket (`--cni-socket`: each node has its own, beside its own
    /// decisions file).
    pub fn cni_socket(&self, index: usize) -> PathBuf {
        std::env::temp_dir()
            .join(format!("{}-cni-{index}", self.id))
            .join("cni.sock")
    }

    /// Node `index`'s handoff socket (`--handoff-socket`: the nodes share a state directory,
    /// each has its own agent lineage).
    pub fn handoff_socket(&self, index: usize) -> PathBuf {
        self.cni_socket(index).with_file_name("handoff.sock")
    }

    /// The `meshlet agent` flags that point node `index`'s agent at its cgroup root, bpffs
    /// directory, CNI socket and the cluster's CA.
    pub fn agent_flags(&self, index: usize) -> Vec<String> {
        // A baseline build from before the handoff does not take the flag.
        let handoff = match process::baseline() {
            Some(_) => vec![],
            None => vec![
                "--handoff-socket".into(),
                self.handoff_socket(index).display().to_string(),
            ],
        };
        [
            "--cni-socket".into(),
            self.cni_socket(index).display().to_string(),
            "--state-dir".into(),
            self.state_dir().display().to_string(),
        ]
        .into_iter()
        .chain(handoff)
        .chain([
            "--node-name".into(),
            self.nodes[index].name.clone(),
            "--cgroup-root".into(),
            self.cgroup_root(index).display().to_string(),
            "--bpffs-dir".into(),
            self.bpffs_dir(index).display().to_string(),
        ])
        .collect()
    }

    /// Starts `meshlet agent` on node `index` with the cluster's flags plus `extra`, logging to
    /// a file; stopped (SIGINT) on drop.
    pub fn start_agent(&self, index: usize, extra: &[&str]) -> process::Agent {
        self.start_agent_in_node(index, extra, &[])
    }

    /// [`Cluster::start_agent`] with environment variables (`KUBECONFIG`, ...), in the node's
    /// network namespace: for a control plane the nodes reach over the fabric.
    pub fn start_agent_in_node(
        &self,
        index: usize,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> process::Agent {
        let mut command = self.agent_command(index);
        command
            .arg("agent")
            .args(self.agent_flags(index))
            .args(extra)
            .envs(env.iter().copied());
        self.spawn_agent(index, command)
    }

    /// [`Cluster::start_agent`] with environment variables (`KUBECONFIG`, ...), in the test
    /// process's own network namespace rather than the node's: how an agent reaches a stand-in
    /// API server listening on loopback. Capture is unaffected (it acts on the pods' namespaces);
    /// only the node addresses it exempts are the machine's.
    pub fn start_agent_with_env(
        &self,
        index: usize,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> process::Agent {
        let cgroup = self.cgroup_root(index).join("meshlet");
        fs::create_dir_all(&cgroup)
            .unwrap_or_else(|err| panic!("create {}: {err}", cgroup.display()));
        let mut command = process::in_pod(
            process::meshlet_binary(),
            Path::new("/proc/self/ns/net"),
            &cgroup,
        );
        command
            .arg("agent")
            .args(self.agent_flags(index))
            .args(extra)
            .envs(env.iter().copied());
        // Agents sharing the machine's namespace cannot share ports.
        for flag in ["--metrics-addr", "--readiness-addr", "--admin-addr"] {
            command.args([flag, "127.0.0.1:0"]);
        }
        self.spawn_agent(index, command)
    }

    fn spawn_agent(&self, index: usize, command: Command) -> process::Agent {
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let start = STARTS.fetch_add(1, Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("{}-agent-{index}-{start}.log", self.id));
        process::Agent::spawn(command, log)
    }

    /// Node `index`'s metrics (its agent serves them on 127.0.0.1:15020 in the node's
    /// namespace), parsed as Prometheus text.
    pub fn scrape(&self, index: usize) -> prometheus_parse::Scrape {
        let (status, body) = http_get(
            &self.node(index).netns,
            "127.0.0.1:15020".parse().unwrap(),
            "/metrics",
        );
        assert_eq!(status, 200, "{body}");
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
            .expect("Prometheus text format")
    }

    /// The sum of the samples of `name` on node `index` whose labels include `labels`.
    pub fn metric(&self, index: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum(&self.scrape(index), name, labels)
    }

    /// Waits until [`Cluster::metric`] reaches `at_least` (10 s at most); returns it.
    pub fn wait_metric(
        &self,
        index: usize,
        name: &str,
        labels: &[(&str, &str)],
        at_least: f64,
    ) -> f64 {
        let deadline = std::time::Instant::now() + process::patience(Duration::from_secs(10));
        loop {
            let value = self.metric(index, name, labels);
            if value >= at_least {
                return value;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node-{index}: {name}{labels:?} = {value}, want >= {at_least}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Node `index`'s agent's `/generation` (admin API): the store generation, and the store
    /// generations the policies in force and the last enrollment pass reflect.
    pub fn generation(&self, index: usize) -> Generation {
        let (status, body) = http_get(
            &self.node(index).netns,
            "127.0.0.1:15000".parse().unwrap(),
            "/generation",
        );
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap_or_else(|err| panic!("/generation {body:?}: {err}"))
    }

    /// Waits until node `index`'s agent has applied everything its store holds now: policies
    /// compiled and an enrollment pass done (10 s at most).
    pub fn wait_applied(&self, index: usize) {
        let want = self.generation(index).store;
        let deadline = std::time::Instant::now() + process::patience(Duration::from_secs(10));
        loop {
            let now = self.generation(index);
            if now.policies >= want && now.enrollment >= want.max(1) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node-{index} did not apply store generation {want}: {now:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts capturing node-0's link to the fabric (everything node-0 exchanges with the other
    /// nodes) with tcpdump.
    pub fn capture_link(&self) -> process::LinkCapture {
        self.capture_link_excluding(&[])
    }

    /// [`Cluster::capture_link`] leaving out TCP `ports` (a control plane's: the API server,
    /// the CA), so that what is left is the pods' traffic.
    pub fn capture_link_excluding(&self, ports: &[u16]) -> process::LinkCapture {
        let cgroup = self.cgroup.path().join("tools");
        fs::create_dir_all(&cgroup)
            .unwrap_or_else(|err| panic!("create {}: {err}", cgroup.display()));
        let text = std::env::temp_dir().join(format!("{}-link.txt", self.id));
        let mut command = process::in_pod("tcpdump", &self.fabric.path(), &cgroup);
        // node-0's port on the bridge: a bridge device itself does not see forwarded frames.
        // Text output (`-A`, payload as ASCII): writing a pcap with `-w` captures nothing on
        // these machines.
        command.args(["-i", "n0", "-nn", "-l", "-A", "-s", "0", "tcp"]);
        for port in ports {
            command.args(["and", "not", "port", &port.to_string()]);
        }
        process::LinkCapture::start(command, text)
    }

    /// The fabric (switch) namespace joining the nodes.
    pub fn fabric(&self) -> &NetnsGuard {
        &self.fabric
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Processes first: a namespace or cgroup with live members cannot go.
        remove_cgroup_tree(self.cgroup.path());
        let _ = fs::remove_dir_all(self.bpffs.path());
        for index in 0..self.nodes.len() {
            if let Some(dir) = self.cni_socket(index).parent() {
                let _ = fs::remove_dir_all(dir);
            }
        }
        self.pods.clear();
        self.nodes.clear();
        self.extra_netns.clear();
        let _ = fs::remove_dir_all(std::env::temp_dir().join(format!("{}-state", self.id)));
        // `fabric`, `bpffs` and `cgroup` drop after this, in field order.
    }
}

/// Removes everything a cluster whose id starts with `prefix` created: for a process that must
/// clean up without unwinding (the demo on Ctrl-C) or after a killed run.
pub fn teardown(prefix: &str) {
    assert!(
        prefix.starts_with(TEST_PREFIX),
        "refusing to tear down {prefix:?}: not a test prefix"
    );
    let Ok(mounts) = mounts::mounts() else { return };
    if let Some(cgroup2) = mounts::find(&mounts, "cgroup2") {
        for entry in fs::read_dir(cgroup2).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    if let Some(bpffs) = mounts::find(&mounts, "bpf") {
        for entry in fs::read_dir(bpffs).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    for entry in fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// A veth pair: `eth0` in `inside`, `outside_name` in `outside`, created directly in the two
/// namespaces (never in the machine's own).
fn veth_pair(inside: &NetnsGuard, outside_name: &str, outside: &NetnsGuard) {
    ip(&[
        "link",
        "add",
        "eth0",
        "netns",
        inside.name(),
        "type",
        "veth",
        "peer",
        "name",
        outside_name,
        "netns",
        outside.name(),
    ]);
}

/// What `bpftool` says of the link pinned at `pin`: its id, and the id and tag of the program
/// it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// The link's id.
    pub id: u64,
    /// The id of the program it runs.
    pub program_id: u64,
    /// That program's tag (a hash of its instructions).
    pub tag: String,
}

/// The inode of `path` (a cgroup's inode is its id: capture's pins are named by it).
pub fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(path)
        .unwrap_or_else(|err| panic!("stat {}: {err}", path.display()))
        .ino()
}

/// Panics unless no program is attached at `cgroup_root` (`bpftool cgroup show` prints
/// nothing) and no link is pinned under `bpffs_dir`.
pub fn assert_nothing_attached(cgroup_root: &Path, bpffs_dir: &Path) {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup_root)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool cgroup show {}",
        cgroup_root.display()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "", "attached");
    assert!(!bpffs_dir.join("links").exists(), "capture is pinned");
}

/// The bpf links of type `netns` (sk_lookup) the kernel has on the network namespace at
/// `netns` (`bpftool link show`).
pub fn sk_lookup_links(netns: &Path) -> usize {
    let inode = inode(netns);
    let links = bpftool(&["link", "show"]);
    links
        .as_array()
        .map(|links| {
            links
                .iter()
                .filter(|l| l["type"] == "netns" && l["netns_ino"].as_u64() == Some(inode))
                .count()
        })
        .unwrap_or(0)
}

/// Runs `bpftool --json` with `args` and parses what it prints; panics with its error.
pub fn bpftool(args: &[&str]) -> serde_json::Value {
    let out = Command::new("bpftool")
        .arg("--json")
        .args(args)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool prints JSON")
}

/// [`LinkInfo`] of the link pinned at `pin`, from `bpftool link show pinned` and `bpftool prog
/// show id`.
pub fn pinned_link(pin: &Path) -> LinkInfo {
    let link = bpftool(&[
        "link",
        "show",
        "pinned",
        pin.to_str().expect("utf-8 pin path"),
    ]);
    let program_id = link["prog_id"].as_u64().expect("prog_id");
    let program = bpftool(&["prog", "show", "id", &program_id.to_string()]);
    LinkInfo {
        id: link["id"].as_u64().expect("link id"),
        program_id,
        tag: program["tag"].as_str().expect("tag").to_owned(),
    }
}

/// The eBPF object of the variant build (`meshlet-ebpf --features variant`: the same programs
/// in other instructions), which `cargo xtask test` (and `cargo xtask vmtest`, for its guests)
/// builds and names in `MESHLET_VARIANT_EBPF_OBJECT`: an agent started on it
/// (`--ebpf-object`) and then replaced by the real build must upgrade its programs in place.
pub fn variant_ebpf_object() -> PathBuf {
    let path = std::env::var_os("MESHLET_VARIANT_EBPF_OBJECT").map(PathBuf::from);
    match path {
        Some(path) if path.is_file() => path,
        _ => panic!(
            "MESHLET_VARIANT_EBPF_OBJECT names no file ({path:?}): run the tests with `cargo \
             xtask test`, which builds the variant eBPF object"
        ),
    }
}

/// The namespaces the agent with pins in `bpffs_dir` has enrolled, sorted (none before it has
/// started).
pub fn enrolled(bpffs_dir: &Path) -> Vec<u64> {
    let Ok(pinned) = meshlet::capture::Pinned::open(bpffs_dir) else {
        return Vec::new();
    };
    let mut cookies: Vec<u64> = pinned
        .enrolled()
        .unwrap_or_default()
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    cookies.sort();
    cookies
}

/// Polls until [`enrolled`] equals `want`; returns how long it took, panics after `timeout`.
pub fn wait_enrolled(bpffs_dir: &Path, mut want: Vec<u64>, timeout: Duration) -> Duration {
    let timeout = process::patience(timeout);
    want.sort();
    let start = std::time::Instant::now();
    loop {
        let now = enrolled(bpffs_dir);
        if now == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "enrolled {now:?}, want {want:?} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What an agent has applied (`/generation` on its admin API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct Generation {
    /// The store's generation (every change bumps it).
    pub store: u64,
    /// The store generation the policies in force reflect.
    pub policies: u64,
    /// The store generation the last enrollment pass reflected (0: no pass yet).
    pub enrollment: u64,
}

/// The value of the one sample of `name` whose labels include all of `labels` (panics if
/// several match).
pub fn sample(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    let matching = samples(scrape, name, labels);
    assert!(
        matching.len() <= 1,
        "{name} {labels:?} matches {} samples",
        matching.len()
    );
    matching.first().copied()
}

/// The sum of the samples of `name` whose labels include all of `labels` (0 if none).
pub fn sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(scrape, name, labels).iter().sum()
}

fn samples(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .filter_map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
        .collect()
}

/// `GET path` over HTTP/1.0 to `addr`, from inside the network namespace `netns` (a node's,
/// where its agent serves): the status code and the body.
pub fn http_get(netns: &NetnsGuard, addr: SocketAddr, path: &str) -> (u16, String) {
    netns
        .open()
        .run(|| try_http_get(addr, path))
        .expect("enter netns")
        .unwrap_or_else(|err| panic!("GET http://{addr}{path}: {err}"))
}

/// `GET path` over HTTP/1.0 to `addr` from this process's namespace: the status code and the
/// body.
pub fn try_http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// A Namespace manifest.
pub fn namespace_manifest(name: &str, labels: &[(&str, &str)]) -> serde_json::Value {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), (*v).into()))
        .collect();
    serde_json::json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name, "labels": labels } })
}

/// Objects as a multi-document YAML file.
pub fn to_yaml(objects: &[serde_json::Value]) -> String {
    objects
        .iter()
        .map(|o| format!("---\n{}", serde_yaml::to_string(o).expect("yaml")))
        .collect()
}

/// Writes a workload file atomically (write, then rename), as a config manager would.
pub fn write_workloads(path: &Path, objects: &[serde_json::Value]) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, to_yaml(objects)).expect("write workloads");
    fs::rename(&tmp, path).expect("rename workloads");
}

fn node_ipv4(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 18, 0, 2 + index as u8)
}

fn node_ipv6(index: usize) -> Ipv6Addr {
    format!("fc00:f853:ccd:e793::{:x}", 2 + index)
        .parse()
        .expect("node IPv6")
}

fn pod_gateway_v4(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node as u8, 1)
}

fn pod_gateway_v6(node: usize) -> Ipv6Addr {
    format!("fd00:10:244:{node}::1")
        .parse()
        .expect("gateway IPv6")
}

impl Cluster {
    /// The cgroup of node `index`'s kubelet, `<cgroup root>/system.slice/kubelet.service`
    /// (created on first use, removed with the cluster): what `--kubelet-cgroup` names.
    pub fn kubelet_cgroup(&self, index: usize) -> PathBuf {
        let cgroup = self
            .cgroup_root(index)
            .join("system.slice")
            .join("kubelet.service");
        fs::create_dir_all(&cgroup)
            .unwrap_or_else(|err| panic!("create {}: {err}", cgroup.display()));
        cgroup
    }

    /// Connects to `to` from a process in node `index`'s network namespace and in `cgroup`
    /// (with [`Cluster::kubelet_cgroup`]: a kubelet probe), sends `payload` bytes and reads the
    /// echo; `flags` as for [`Pod::connect_with`].
    pub fn connect_from_node_in(
        &self,
        index: usize,
        cgroup: &Path,
        to: SocketAddr,
        payload: usize,
        flags: &[&str],
    ) -> ConnectReport {
        let command = process::in_pod(
            process::testpod_binary(),
            &self.nodes[index].netns.path(),
            cgroup,
        );
        process::connect_with(command, to, payload, flags)
    }
}
