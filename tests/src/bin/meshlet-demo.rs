//! `meshlet-demo` (run by `cargo xtask demo`): meshlet on a simulated two-node cluster made of
//! network namespaces, step by step. Every claim it prints is checked; it exits non-zero the
//! moment one does not hold, and removes everything it made on exit, on failure and on Ctrl-C.
//!
//! The real path, as on a cluster: node-0 also plays the control-plane node, with a stand-in
//! Kubernetes API server (the embedded default workloads applied to it) and `meshlet ca`; an
//! agent per node watches the API (`--source kube`) and gets its pods' certificates from the
//! CA with a projected-style token (no CA key on any node). Labelling the namespace enrolls its
//! pods through real discovery and eBPF capture, traffic crosses between the nodes over HBONE
//! (mTLS), a new pod is held by `meshlet-cni` until it is captured, a policy denies and is
//! lifted, metrics show both, capture survives an agent restart, and `meshlet uninstall`
//! removes it.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use meshlet::capture::Pinned;
use meshlet_tests::{
    Cluster,
    cni::CniCall,
    kube_api::ApiServer,
    mesh_ca::{self, MeshCa},
    namespace_manifest,
    process::meshlet_binary,
    teardown,
};

/// Walk through meshlet on a simulated two-node cluster.
#[derive(Debug, Parser)]
struct Args {
    /// Leave the cluster and agent running at the end, and print how to poke at them.
    #[arg(long)]
    keep: bool,
}

const STEPS: usize = 9;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    meshlet_tests::require_root();
    let mut cluster = Cluster::new(2);
    cleanup_on_ctrl_c(cluster.id().to_owned());
    let result = walk_through(&mut cluster, args.keep);
    if args.keep && result.is_ok() {
        std::mem::forget(cluster);
    }
    result
}

fn walk_through(cluster: &mut Cluster, keep: bool) -> anyhow::Result<()> {
    println!(
        "meshlet demo: a simulated two-node cluster ({})\n",
        cluster.id()
    );

    step(
        1,
        "create the cluster: two nodes, three one-container pods (no sidecars)",
    );
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 1);
    cluster.add_pod("bystander", 0);
    // A pod that starts later (step 6): its sandbox exists, its containers have not run.
    cluster.add_pod_sandbox("newcomer", 0);
    for name in ["client", "server", "bystander"] {
        let pod = cluster.pod(name);
        println!(
            "      {:<10} node-{}  {:<12} {}",
            pod.name,
            pod.node,
            pod.ipv4.to_string(),
            pod.ipv6
        );
    }
    let mut echo = cluster.pod("server").echo_server(8080);
    println!("      the server pod runs a TCP echo server on port 8080");
    let dir = std::env::temp_dir().join(format!("{}-control-plane", cluster.id()));
    std::fs::create_dir_all(&dir)?;
    // The control plane lives on node-0, reachable from every node over the fabric.
    let control_ip = cluster.node(0).ipv4;
    let api = cluster
        .node(0)
        .netns
        .open()
        .run(|| ApiServer::start_on((control_ip, 0).into()))?;
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let objects = |labels: &[(&str, &str)]| {
        vec![
            namespace_manifest("demo", labels),
            namespace_manifest("legacy", &[]),
            cluster.pod("client").manifest("demo", &[("app", "client")]),
            cluster.pod("server").manifest("demo", &[("app", "server")]),
            cluster
                .pod("bystander")
                .manifest("legacy", &[("app", "bystander")]),
        ]
    };
    for object in objects(&[]) {
        api.apply(object);
    }
    println!(
        "      a stand-in Kubernetes API server on node-0 ({}) holds the Namespaces and Pods",
        api.url()
    );

    step(
        2,
        "start `meshlet ca` on node-0: the only holder of the CA key, Istio's certificate API on 15012",
    );
    let ca_addr = std::net::SocketAddr::from((control_ip, 15012));
    let ca = MeshCa::spawn(
        cluster.node_command(0, meshlet_binary()),
        ca_addr,
        &kubeconfig,
        &["--metrics-addr", "127.0.0.1:15014"],
    );
    println!("      {}", last_line(&ca.process, "stored it in a Secret"));
    println!(
        "      {}",
        last_line(&ca.process, "published the trust bundle")
    );
    let bundle = dir.join("root-cert.pem");
    mesh_ca::write_trust_bundle(&api, &bundle);
    let tokens: Vec<_> = (0..2)
        .map(|i| {
            let node = format!("node-{i}");
            mesh_ca::token_file(&dir, &node, &mesh_ca::agent_token(&api, &node))
        })
        .collect();
    println!(
        "      each agent gets the trust bundle (ConfigMap meshlet-ca-root) and a token bound to its pod and node"
    );

    step(
        3,
        "start `meshlet agent --source kube --ca-address ...` on both nodes: eBPF attached, source synced",
    );
    let ca_url = ca.url();
    let kube_env = [("KUBECONFIG", kubeconfig.to_str().context("utf-8 path")?)];
    let start_agent = |node: usize| {
        cluster.start_agent_in_node(
            node,
            &[
                "--source",
                "kube",
                "--ca-address",
                &ca_url,
                "--ca-root",
                bundle.to_str().unwrap_or_default(),
                "--ca-token-path",
                tokens[node].to_str().unwrap_or_default(),
            ],
            &kube_env,
        )
    };
    let mut agents = vec![start_agent(0), start_agent(1)];
    for (i, agent) in agents.iter().enumerate() {
        agent.wait_for_log("source synced", 1, Duration::from_secs(10));
        println!("      node-{i}: {}", last_line(agent, "capture installed"));
    }
    let programs = wait_attached(&cluster.cgroup_root(0), 6)?;
    println!("      the kernel's own list on node-0 (bpftool cgroup show <root>):");
    for (id, attach_type, name) in &programs {
        println!("        prog id {id:<6} {attach_type:<26} {name}");
    }

    step(
        4,
        "label the namespace: kubectl label namespace demo meshlet.io/dataplane-mode=ambient",
    );
    let start = Instant::now();
    let ambient = [("meshlet.io/dataplane-mode", "ambient")];
    api.apply(namespace_manifest("demo", &ambient));
    agents[0].wait_for_log("pod enrolled", 1, Duration::from_secs(10));
    agents[1].wait_for_log("pod enrolled", 1, Duration::from_secs(10));
    println!(
        "      both pods enrolled in {} ms, each once its certificate came from the CA:",
        start.elapsed().as_millis()
    );
    for (i, agent) in agents.iter().enumerate() {
        println!(
            "      node-{i}: {}",
            last_line(agent, "obtained a workload certificate")
        );
        println!("      node-{i}: {}", last_line(agent, "pod enrolled"));
    }
    ca.process
        .wait_for_log("signed a workload certificate", 2, Duration::from_secs(5));
    println!(
        "      meshlet ca: {}",
        last_line(&ca.process, "signed a workload certificate")
    );
    // A node may ask only for the identities of its own pods.
    let server_id = "spiffe://cluster.local/ns/demo/sa/server";
    let refused = ask_for_identity(cluster, &ca, &bundle, &tokens[0], server_id)?;
    ensure!(
        refused.starts_with("no_pod_on_node"),
        "node-0 was not refused the server's identity: {refused}"
    );
    println!("      node-0 asking for {server_id} (its pod runs on node-1) is refused: {refused}");
    for (node, pod) in [(0, "client"), (1, "server")] {
        let cookie = cluster.pod(pod).netns_cookie();
        let enrolled: Vec<u64> = Pinned::open(&cluster.bpffs_dir(node))?
            .enrolled()?
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        ensure!(
            enrolled == [cookie],
            "node-{node} enrolled {enrolled:?}, expected {pod}'s namespace {cookie}"
        );
    }
    println!(
        "      checked: each node's ENROLLED map holds exactly its pod's namespace; bystander (namespace legacy) is not"
    );
    println!("      $ meshlet workloads        (on node-0)");
    indent(&meshlet_on(cluster, 0, &["workloads"])?);
    println!(
        "      $ meshlet certs            (on node-1: one certificate per local service account)"
    );
    indent(&meshlet_on(cluster, 1, &["certs"])?);

    step(
        5,
        "traffic: client -> server:8080, captured and carried over HBONE (mTLS)",
    );
    // The client's agent tunnels to pods whose agent confirmed capture: wait until node-0 has
    // seen node-1's `meshlet.io/redirection` annotation on the server pod.
    let annotated = Instant::now();
    while api
        .get("Pod", "demo", "server")
        .map(|pod| pod["metadata"]["annotations"]["meshlet.io/redirection"].clone())
        != Some(serde_json::json!("enabled"))
    {
        ensure!(
            annotated.elapsed() < Duration::from_secs(10),
            "node-1 did not annotate the server pod"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.wait_applied(0);
    let server = cluster.pod("server").addr(false, 8080);
    let out_before = Pinned::open(&cluster.bpffs_dir(0))?.redirects()?.outbound;
    // The control plane's own traffic (API server, CA) crosses this link too: leave it out.
    let link = cluster.capture_link_excluding(&[api.addr().port(), ca_addr.port()]);
    let report = cluster.pod("client").connect(server, 64 * 1024);
    ensure!(
        report.error.is_none() && report.echoed == 64 * 1024,
        "client connection failed: {report:?}"
    );
    let wire = link.finish();
    let accepted = echo.next_accepted();
    let client_ip = std::net::IpAddr::from(cluster.pod("client").ipv4);
    ensure!(
        accepted.peer.ip().to_canonical() == client_ip,
        "the server saw {} as its client, not the client pod's {client_ip}",
        accepted.peer
    );
    println!(
        "      the server echoed 64 KiB (connection from {}: the client pod's own address)",
        accepted.peer.ip().to_canonical()
    );
    let outbound = Pinned::open(&cluster.bpffs_dir(0))?.redirects()?.outbound - out_before;
    println!(
        "      eBPF: node-0 redirected {outbound} outbound connection to the client's in-pod listener"
    );
    ensure!(
        outbound == 1,
        "expected one outbound redirect, counted {outbound}"
    );
    println!(
        "      the node-to-node link (tcpdump on the fabric): {} TCP packets, {} of them to/from port 15008; application plaintext seen: {}",
        wire.packets, wire.hbone_packets, wire.plaintext_seen
    );
    ensure!(
        !wire.plaintext_seen,
        "the link carried the application's plaintext"
    );
    ensure!(
        wire.hbone_packets > 0 && wire.hbone_packets == wire.packets,
        "traffic crossed the link outside HBONE: {wire:?}"
    );
    agents[0].wait_for_log("connection closed", 1, Duration::from_secs(5));
    agents[1].wait_for_log("connection closed", 1, Duration::from_secs(5));
    println!(
        "      node-0 access log: {}",
        last_line(&agents[0], "connection closed")
    );
    println!(
        "      node-1 access log: {}",
        last_line(&agents[1], "connection closed")
    );
    ensure!(
        agents[1]
            .log()
            .contains("src_identity=spiffe://cluster.local/ns/demo/sa/client"),
        "node-1 did not see the client's SPIFFE identity"
    );

    step(
        6,
        "a new pod starts: the runtime runs meshlet-cni, which holds the pod until it is captured",
    );
    let newcomer = cluster.pod("newcomer");
    api.apply(newcomer.pending_manifest("demo", &[("app", "newcomer")]));
    let add = CniCall::new("ADD", newcomer, "demo", &cluster.cni_socket(0), "closed").run();
    ensure!(add.success, "meshlet-cni ADD failed: {add:?}");
    println!(
        "      meshlet-cni ADD returned after {} ms; node-0: {}",
        add.took.as_millis(),
        last_line(&agents[0], "CNI ADD answered")
    );
    // The pod's first process connects the instant its sandbox is ready.
    newcomer.connect(server, 1024).assert_echoed(1024);
    agents[0].wait_for_log("src_workload=demo/newcomer", 1, Duration::from_secs(5));
    println!("      its very first connection, made the instant ADD returned, went through HBONE:");
    println!(
        "      node-0 access log: {}",
        last_line(&agents[0], "src_workload=demo/newcomer")
    );
    ensure!(
        last_line(&agents[0], "src_workload=demo/newcomer").contains("protocol=HBONE"),
        "the newcomer's first connection was not carried over HBONE"
    );
    // The kubelet then reports the pod running.
    api.apply(newcomer.manifest("demo", &[("app", "newcomer")]));

    step(
        7,
        "an AuthorizationPolicy denies the client: refused at the destination; removed: allowed again",
    );
    let deny = serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-client", "namespace": "demo"},
        "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "DENY",
                 "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}]}
    });
    // Applied once the destination's agent has compiled what its store holds.
    let applied = |store_before: u64| {
        while cluster.generation(1).store == store_before {
            std::thread::sleep(Duration::from_millis(10));
        }
        cluster.wait_applied(1);
    };
    let before = cluster.generation(1).store;
    api.apply(deny);
    applied(before);
    let report = cluster.pod("client").connect(server, 1000);
    ensure!(
        report.error.is_some() || report.echoed == 0,
        "the denied client got through: {report:?}"
    );
    agents[1].wait_for_log("denied by demo/deny-client", 1, Duration::from_secs(5));
    agents[0].wait_for_log("401 Unauthorized", 1, Duration::from_secs(5));
    println!(
        "      the client's connection was closed; node-1: {}",
        last_line(&agents[1], "connection denied")
    );
    println!(
        "      node-0: {}",
        last_line(&agents[0], "401 Unauthorized")
    );
    let before = cluster.generation(1).store;
    api.delete("AuthorizationPolicy", "demo", "deny-client");
    applied(before);
    let report = cluster.pod("client").connect(server, 1000);
    ensure!(
        report.error.is_none() && report.echoed == 1000,
        "still refused after the policy was removed: {report:?}"
    );
    println!("      policy removed: the client reaches the server again");
    println!(
        "      $ curl node-1:15020/metrics | grep istio_tcp_connections_opened_total   (destination view)"
    );
    let (status, body) = meshlet_tests::http_get(
        &cluster.node(1).netns,
        "127.0.0.1:15020".parse()?,
        "/metrics",
    );
    ensure!(status == 200, "metrics endpoint answered {status}");
    let lines: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .collect();
    ensure!(
        lines.iter().any(|l| l.contains("response_flags=\"DENY\"")),
        "no DENY in the metrics:\n{body}"
    );
    ensure!(
        lines
            .iter()
            .any(|l| l.contains("connection_security_policy=\"mutual_tls\"")),
        "no mTLS connection in the metrics"
    );
    for line in lines {
        println!("        {}", shorten(line));
    }

    step(
        8,
        "replace the agent on node-0 under traffic: the new one takes the listeners over, the old one drains",
    );
    let load = cluster.pod("client").load(server, 50, 200);
    let successor = start_agent(0);
    successor.wait_for_log("agent serving", 1, Duration::from_secs(30));
    println!(
        "      new agent: {}",
        last_line(&successor, "handoff received")
    );
    println!(
        "      new agent: {}",
        last_line(&successor, "capture installed")
    );
    agents[0].wait_for_log("handed over to the successor", 1, Duration::from_secs(10));
    agents[0].signal(libc::SIGTERM);
    let status = agents[0].wait_exit(Duration::from_secs(30));
    ensure!(status.success(), "the old agent exited with {status}");
    println!("      old agent: {}", last_line(&agents[0], "stopped;"));
    agents[0] = successor;
    let outcomes = load.finish();
    ensure!(
        outcomes.count("ok") == 200,
        "connections failed during the replacement: {outcomes:?}"
    );
    ensure!(
        wait_attached(&cluster.cgroup_root(0), 6)? == programs,
        "the new agent attached again instead of adopting"
    );
    println!(
        "      checked: 200 connections at 50/s through the replacement, none refused or reset; \
         the same six attachments"
    );

    if keep {
        println!("\nleft running (--keep):");
        for (i, agent) in agents.iter().enumerate() {
            println!(
                "  node-{i} agent pid {}, log {}",
                agent.pid(),
                agent.log_path().display()
            );
        }
        println!(
            "  meshlet ca pid {}, log {}",
            ca.process.pid(),
            ca.process.log_path().display()
        );
        println!(
            "  KUBECONFIG={} kubectl ...   # the stand-in API server: the agents follow it",
            kubeconfig.display()
        );
        println!(
            "  nsenter --net=/var/run/netns/{}-p0 bash   # a shell in the client pod's network",
            cluster.id()
        );
        println!(
            "  clean up: kill the agents, `meshlet uninstall --bpffs-dir <dir>` for each node, delete the namespaces `ip netns | grep {}`",
            cluster.id()
        );
        println!("  the API server lives in this process: Ctrl-C ends it and removes the cluster");
        std::mem::forget(agents);
        std::mem::forget(echo);
        std::mem::forget(ca);
        loop {
            std::thread::park();
        }
    }

    step(
        9,
        "remove the label, stop the agents, `meshlet uninstall`: nothing left",
    );
    api.apply(namespace_manifest("demo", &[]));
    agents[0].wait_for_log("pod unenrolled", 1, Duration::from_secs(5));
    agents[1].wait_for_log("pod unenrolled", 1, Duration::from_secs(5));
    println!("      both pods released");
    for (node, agent) in agents.iter_mut().enumerate() {
        agent.stop();
        // The simulated node's CNI directories, never the machine's.
        let cni = dir.join(format!("cni-node-{node}"));
        let out = Command::new(meshlet_binary())
            .args(["uninstall", "--bpffs-dir"])
            .arg(cluster.bpffs_dir(node))
            .arg("--cni-bin-dir")
            .arg(cni.join("bin"))
            .arg("--cni-conf-dir")
            .arg(cni.join("net.d"))
            .output()
            .context("run meshlet uninstall")?;
        ensure!(
            out.status.success(),
            "meshlet uninstall failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        print!(
            "      node-{node}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        ensure!(
            wait_attached(&cluster.cgroup_root(node), 0)?.is_empty(),
            "programs still attached after uninstall"
        );
    }
    cluster.pod("client").connect(server, 10).assert_echoed(10);
    println!(
        "      checked: nothing attached, the client reaches the server directly; removing the cluster"
    );
    drop(ca);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Asks the CA, from node-0 with `token`, for `identity`'s certificate, as a compromised node
/// would; returns the refusal (or `signed`).
fn ask_for_identity(
    cluster: &Cluster,
    ca: &MeshCa,
    bundle: &Path,
    token: &Path,
    identity: &str,
) -> anyhow::Result<String> {
    use meshlet::{identity::Identity, proto::IstioCertificateRequest};
    let csr = meshlet::identity::csr::request(&Identity::parse(identity)?)?;
    let token = std::fs::read_to_string(token)?;
    let client = mesh_ca::client(ca, bundle);
    let request = IstioCertificateRequest {
        csr: csr.pem,
        validity_duration: 0,
        metadata: Some(IstioCertificateRequest::impersonating(identity)),
    };
    let answer = cluster.node(0).netns.open().run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        anyhow::Ok(runtime.block_on(client.call(request, Some(&token))))
    })??;
    Ok(match answer {
        Ok(_) => "signed".to_owned(),
        Err(status) => status.message().to_owned(),
    })
}

/// The agent's last log line containing `needle`, without the timestamp and level.
fn last_line(agent: &meshlet_tests::process::Agent, needle: &str) -> String {
    let log = agent.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(needle))
        .unwrap_or_default();
    line.split_once("meshlet::")
        .map_or(line, |(_, rest)| rest)
        .to_owned()
}

/// Runs `meshlet <args>` on node `node` (in its network namespace, like `kubectl exec` into the
/// agent) and returns its output.
fn meshlet_on(cluster: &Cluster, node: usize, args: &[&str]) -> anyhow::Result<String> {
    let mut command = cluster.node_command(node, meshlet_binary());
    let out = command.args(args).output()?;
    ensure!(
        out.status.success(),
        "meshlet {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn indent(text: &str) {
    for line in text.lines() {
        println!("        {line}");
    }
}

/// A metric line with the labels a person reads first.
fn shorten(line: &str) -> String {
    let keep = [
        "reporter",
        "source_workload",
        "destination_workload",
        "connection_security_policy",
        "response_flags",
    ];
    let (labels, value) = line.rsplit_once(' ').unwrap_or((line, ""));
    let inner = labels
        .split_once('{')
        .map_or("", |(_, rest)| rest.trim_end_matches('}'));
    let kept: Vec<&str> = inner
        .split(',')
        .filter(|kv| keep.iter().any(|k| kv.starts_with(&format!("{k}="))))
        .collect();
    format!(
        "istio_tcp_connections_opened_total{{{}}} {value}",
        kept.join(",")
    )
}

fn step(n: usize, what: &str) {
    println!("\n[{n}/{STEPS}] {what}");
}

/// Waits until exactly `want` programs are attached to `cgroup` and returns them.
fn wait_attached(cgroup: &Path, want: usize) -> anyhow::Result<Vec<(u64, String, String)>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(cgroup)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let programs: Vec<serde_json::Value> = if text.trim().is_empty() {
            Vec::new()
        } else {
            serde_json::from_str(&text)?
        };
        let programs: Vec<_> = programs
            .iter()
            .map(|p| {
                (
                    p["id"].as_u64().unwrap_or(0),
                    p["attach_type"].as_str().unwrap_or("").to_owned(),
                    p["name"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        if programs.len() == want {
            return Ok(programs);
        }
        if Instant::now() > deadline {
            bail!(
                "expected {want} program(s) attached to {}, found {programs:?}",
                cgroup.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// On Ctrl-C, remove everything the cluster made (its agent dies with its cgroup) and exit.
fn cleanup_on_ctrl_c(id: String) {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("signal runtime");
        runtime.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ninterrupted: removing the demo cluster {id}");
                teardown(&id);
                std::process::exit(130);
            }
        });
    });
}
