//! A hostile tenant against the agent: each attack a pod creator, a pod, or a peer could make,
//! end to end with the real agents, and the specific refusal each meets.
//!
//! - a pod annotated with the node's (or another pod's) network namespace is not captured there;
//! - connections to meshlet's own ports (15001, 15006, 15008) do not loop through the proxy, and
//!   the agent's descriptors and memory stay flat;
//! - a forged `Forwarded` header does not satisfy an `ipBlocks` ALLOW: policy sees the tunnel's
//!   TCP peer;
//! - two pods of one service account each reach the server from their own address;
//! - a client on the node (hostNetwork) goes through capture and STRICT, while kubelet's probes
//!   (from kubelet's cgroup) pass;
//! - a labelled pod whose capture was never confirmed is reached in plaintext;
//! - a flood of 20,000 idle connections at one pod leaves another pod of the node served;
//! - the node's budget counts the sockets connections hold: one a tunneled connection, two a
//!   plaintext one.

use std::{net::SocketAddr, time::Duration};

use http::StatusCode;
use meshlet_tests::{
    Cluster, enrolled,
    kube_api::ApiServer,
    mesh::FileMesh,
    namespace_manifest,
    process::{Outcome, Process, testpod_binary},
    raw_hbone::RawHbone,
    wait_enrolled,
};
use serde_json::{Value, json};

const AMBIENT: (&str, &str) = ("meshlet.io/dataplane-mode", "ambient");
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";

fn annotate(mut manifest: Value, key: &str, value: &str) -> Value {
    manifest["metadata"]["annotations"][key] = value.into();
    manifest
}

/// The agent process's open descriptors and resident memory (KiB).
fn footprint(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (fds, rss)
}

/// `GET path` from this process (an agent started in this process's namespace).
fn get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).expect("agent endpoint");
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn metric_line(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_netns_annotation_never_captures_the_node_or_another_pod() {
    // Through the Kubernetes API: any pod creator can write the annotation. The agent runs in
    // this process's namespace here (to reach the stand-in API server on loopback), so the
    // annotation names the agent's own namespace — and the host's.
    let mut cluster = Cluster::new(1);
    cluster.add_pod("victim", 0);
    let api = ApiServer::start();
    let kubeconfig = std::env::temp_dir().join(format!("{}-kubeconfig", cluster.id()));
    api.write_kubeconfig(&kubeconfig);
    api.apply(namespace_manifest("demo", &[AMBIENT]));
    api.apply(annotate(
        cluster.pod("victim").manifest("demo", &[]),
        "meshlet.io/netns",
        "/proc/1/ns/net",
    ));
    let env = [("KUBECONFIG", kubeconfig.to_str().unwrap())];
    let agent = cluster.start_agent_with_env(0, &["--source", "kube"], &env);
    agent.wait_for_log(
        "honoured only with the file source",
        1,
        Duration::from_secs(10),
    );
    // The pod is captured where the node observed it: its own namespace, found through its
    // cgroup; the annotated namespace (this machine's) is not.
    wait_enrolled(
        &cluster.bpffs_dir(0),
        vec![cluster.pod("victim").netns_cookie()],
        Duration::from_secs(10),
    );
    let metrics = get(agent.endpoint("metrics"), "/metrics");
    assert_eq!(
        metric_line(
            &metrics,
            "meshlet_enrollment_refused_total{reason=\"netns_annotation\"}"
        ),
        1.0,
        "{metrics}"
    );
    drop(agent);
    std::fs::remove_file(&kubeconfig).unwrap();

    // The file source may name a namespace (non-Kubernetes use), but never the agent's own,
    // the host's, or another pod's.
    let mut cluster = Cluster::new(1);
    for pod in ["ok", "own", "host", "thief", "victim"] {
        cluster.add_pod(pod, 0);
    }
    let node = cluster.node(0).netns.path();
    let victim = cluster.pod("victim").netns.path();
    let base = vec![
        namespace_manifest("demo", &[AMBIENT]),
        namespace_manifest("legacy", &[]),
        annotate(
            cluster.pod("ok").manifest("demo", &[]),
            "meshlet.io/netns",
            cluster.pod("ok").netns.path().to_str().unwrap(),
        ),
        annotate(
            cluster.pod("own").manifest("demo", &[]),
            "meshlet.io/netns",
            node.to_str().unwrap(),
        ),
        // This machine's namespace (the test's own): where everything else runs. (PID 1's
        // is refused as the host's, see discovery's unit tests; it is not readable here.)
        annotate(
            cluster.pod("host").manifest("demo", &[]),
            "meshlet.io/netns",
            &format!("/proc/{}/ns/net", std::process::id()),
        ),
        annotate(
            cluster.pod("thief").manifest("demo", &[]),
            "meshlet.io/netns",
            victim.to_str().unwrap(),
        ),
        cluster.pod("victim").manifest("legacy", &[]),
    ];
    let mesh = FileMesh::start(cluster, base, &[&["ok"]]);
    for (reason, pods) in [("own_netns", 1.0), ("foreign_process", 2.0)] {
        mesh.cluster.wait_metric(
            0,
            "meshlet_enrollment_refused_total",
            &[("reason", reason)],
            pods,
        );
    }
    mesh.cluster.wait_applied(0);
    assert_eq!(
        enrolled(&mesh.cluster.bpffs_dir(0)),
        vec![mesh.cluster.pod("ok").netns_cookie()],
        "only the pod whose namespace is its own is captured"
    );
    let log = mesh.agents[0].log();
    for (pod, said) in [
        ("own", "it is the agent's own network namespace"),
        ("host", "is not in the pod's cgroup"),
        ("thief", "is not in the pod's cgroup"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(said) && l.contains(&format!("pod=demo/{pod} "))),
            "the log does not say {said:?} for {pod}:\n{log}"
        );
    }
}

#[test]
fn meshlets_own_ports_never_loop_through_the_proxy() {
    let mesh = FileMesh::client_server(&[], vec![]);
    let cluster = &mesh.cluster;
    let server = cluster.pod("server");
    let _echo = server.echo_server(8080);
    // Warm up: a first real connection allocates what the agent keeps (certificates, pools).
    cluster
        .pod("client")
        .connect(server.addr(false, 8080), 10)
        .assert_echoed(10);
    let agent = mesh.agents[1].pid();
    let before = footprint(agent);

    // Plaintext from a pod outside the mesh, 2 bytes each, at 15006 and 15001 on the server's
    // address (steered to 15006 by sk_lookup): reset at once, 50 times each.
    let bystander = cluster.pod("bystander");
    for port in [15006, 15001] {
        for _ in 0..50 {
            bystander
                .connect(server.addr(false, port), 2)
                .assert_failed(Outcome::Reset);
        }
    }
    // The same through HBONE: CONNECT to the pod's own ports is a bad request.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let raw = RawHbone::new(cluster, cluster.node(0).netns.open());
        let hbone = server.addr(false, 15008);
        for port in [15001, 15006, 15008] {
            assert_eq!(
                raw.connect(
                    hbone,
                    raw.config(CLIENT, SERVER),
                    &server.addr(false, port).to_string()
                )
                .await,
                StatusCode::BAD_REQUEST,
                "CONNECT to port {port}"
            );
        }
    });
    assert_eq!(
        cluster.metric(
            1,
            "meshlet_proxy_limit_total",
            &[("limit", "reserved_port")]
        ),
        103.0
    );
    // Nothing accumulated: the loop used to take ~20,000 descriptors and 250 MiB in 3 s.
    let after = footprint(agent);
    assert!(
        after.0 <= before.0 + 16,
        "descriptors grew from {} to {}",
        before.0,
        after.0
    );
    assert!(
        after.1 <= before.1 + 16 * 1024,
        "RSS grew from {} KiB to {} KiB",
        before.1,
        after.1
    );
    // And the pod is still served.
    cluster
        .pod("client")
        .connect(server.addr(false, 8080), 10)
        .assert_echoed(10);
}

#[test]
fn a_forged_forwarded_header_does_not_satisfy_an_ip_block() {
    let mesh = FileMesh::client_server(&[], vec![]);
    let cluster = &mesh.cluster;
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let _echo = server.echo_server(8080);
    mesh.write(&[json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "only-the-client-pod", "namespace": "demo"},
        "spec": {"selector": {"matchLabels": {"app": "server"}},
                 "rules": [{"from": [{"source": {"ipBlocks": [format!("{}/32", client.ipv4)]}}]}]}
    })]);
    // The client pod itself: its tunnel leaves from its own address, allowed.
    client
        .connect(server.addr(false, 8080), 100)
        .assert_echoed(100);
    // A peer elsewhere (the node), with the client's certificate, claiming to forward for the
    // client's address: the claim is logged, and policy sees the peer's real address.
    let forged = format!("for=\"{}:4242\"", client.ipv4);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let status = runtime.block_on(async {
        let raw = RawHbone::new(cluster, cluster.node(0).netns.open());
        raw.connect_with(
            server.addr(false, 15008),
            raw.config(CLIENT, SERVER),
            &server.addr(false, 8080).to_string(),
            &[("forwarded", &forged)],
        )
        .await
    });
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    mesh.agents[1].wait_for_log("connection denied", 1, Duration::from_secs(5));
    let log = mesh.agents[1].log();
    let denied = log
        .lines()
        .find(|l| l.contains("connection denied"))
        .unwrap();
    assert!(
        denied.contains(&format!("src={}:", cluster.node(0).ipv4))
            && denied.contains(&format!("forwarded=\"for=\\\"{}:4242\\\"\"", client.ipv4)),
        "{denied}"
    );
}

#[test]
fn two_pods_of_one_service_account_each_arrive_from_their_own_address() {
    let mut cluster = Cluster::new(2);
    for (pod, node) in [("client", 0), ("twin", 0), ("server", 1)] {
        cluster.add_pod(pod, node);
    }
    let mut twin = cluster
        .pod("twin")
        .mesh_manifest("demo", &[("app", "twin")]);
    twin["spec"]["serviceAccountName"] = "client".into();
    let base = vec![
        namespace_manifest("demo", &[AMBIENT]),
        cluster
            .pod("client")
            .mesh_manifest("demo", &[("app", "client")]),
        twin,
        cluster
            .pod("server")
            .mesh_manifest("demo", &[("app", "server")]),
    ];
    let mesh = FileMesh::start(cluster, base, &[&["client", "twin"], &["server"]]);
    let cluster = &mesh.cluster;
    let server = cluster.pod("server");
    let _echo = server.echo_server(8080);
    let to = server.addr(false, 8080);
    // The client holds a tunnel open while its twin connects: with one pool per service
    // account, the twin's stream would ride the client's connection.
    std::thread::scope(|scope| {
        let held = scope.spawn(|| {
            cluster
                .pod("client")
                .connect_with(to, 10, &["--delay-ms", "1500"])
        });
        cluster.wait_metric(
            1,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")],
            1.0,
        );
        cluster.pod("twin").connect(to, 10).assert_echoed(10);
        held.join().unwrap().assert_echoed(10);
    });
    mesh.agents[1].wait_for_log("protocol=HBONE", 2, Duration::from_secs(5));
    let log = mesh.agents[1].log();
    for pod in ["client", "twin"] {
        let ip = cluster.pod(pod).ipv4;
        assert!(
            log.lines().any(|l| l.contains("protocol=HBONE")
                && l.contains(&format!("src={ip}:"))
                && l.contains(&format!("src_identity={CLIENT}"))),
            "node-1 never saw {pod} from its own address {ip}:\n{log}"
        );
    }
}

#[test]
fn clients_on_the_node_meet_policy_and_only_kubelet_probes_pass() {
    let mesh = FileMesh::layout(
        &[("client", 0), ("server", 1)],
        &[],
        vec![],
        |cluster, node| {
            vec![
                "--kubelet-cgroup".into(),
                cluster.kubelet_cgroup(node).display().to_string(),
            ]
        },
    );
    mesh.write(&[json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "demo"},
        "spec": {"mtls": {"mode": "STRICT"}}
    })]);
    let cluster = &mesh.cluster;
    let server = cluster.pod("server");
    let _echo = server.echo_server(8080);
    let to = server.addr(false, 8080);
    // A process on the server's node that is not kubelet (a hostNetwork pod, or anything
    // SNATed to the node's address) is captured and refused by STRICT.
    cluster
        .connect_from_node(1, to, 10)
        .assert_failed(Outcome::Reset);
    mesh.agents[1].wait_for_log("PeerAuthentication STRICT", 1, Duration::from_secs(5));
    // kubelet's probe reaches the application directly.
    cluster
        .connect_from_node_in(1, &cluster.kubelet_cgroup(1), to, 10, &[])
        .assert_echoed(10);
    assert_eq!(
        cluster.metric(
            1,
            "meshlet_redirected_connections_total",
            &[("direction", "kubelet_probe")]
        ),
        1.0
    );
    // The mesh client still gets in, over HBONE.
    cluster.pod("client").connect(to, 10).assert_echoed(10);
}

#[test]
fn a_labelled_pod_whose_capture_is_not_confirmed_is_reached_in_plaintext() {
    // No agent on node-1: the server is labelled for the mesh, but nothing captures it, and
    // the file says so (no `meshlet.io/redirection: enabled`).
    let mut cluster = Cluster::new(2);
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 1);
    let base = vec![
        namespace_manifest("demo", &[AMBIENT]),
        cluster
            .pod("client")
            .mesh_manifest("demo", &[("app", "client")]),
        cluster.pod("server").manifest("demo", &[("app", "server")]),
    ];
    let mesh = FileMesh::start(cluster, base, &[&["client"]]);
    let cluster = &mesh.cluster;
    let _echo = cluster.pod("server").echo_server(8080);
    let to = cluster.pod("server").addr(false, 8080);
    cluster.pod("client").connect(to, 1000).assert_echoed(1000);
    mesh.agents[0].wait_for_log(&format!("dst={to}"), 1, Duration::from_secs(5));
    let log = mesh.agents[0].log();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("dst={to}")))
        .unwrap();
    assert!(line.contains("protocol=TCP"), "{line}");
}

#[test]
fn a_flood_at_one_pod_leaves_the_other_pods_of_the_node_served() {
    // Default budgets: sized from the agent's open-files limit.
    let mesh = FileMesh::layout(
        &[("client", 0), ("server", 1), ("other", 1)],
        &[("attacker", 0)],
        vec![],
        |_, _| Vec::new(),
    );
    let limit: usize = {
        let log = mesh.agents[1].log();
        let line = log
            .lines()
            .find(|l| l.contains("connection budgets"))
            .expect("the agent logs its connection budgets");
        line.split("per_pod=")
            .nth(1)
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no per_pod in {line}"))
    };
    assert!(limit < 20_000, "a budget of {limit} would not be reached");
    let cluster = &mesh.cluster;
    let _server = cluster.pod("server").echo_server(8080);
    let _other = cluster.pod("other").echo_server(8080);
    let agent = mesh.agents[1].pid();
    let before = footprint(agent);

    // 20,000 idle connections at the server, from a pod outside the mesh.
    let mut flood = cluster.pod("attacker").command(testpod_binary());
    flood.args([
        "flood",
        "--to",
        &cluster.pod("server").addr(false, 8080).to_string(),
        "--count",
        "20000",
    ]);
    let mut flood = Process::spawn_ready(flood);
    let summary: Value = serde_json::from_str(&flood.next_line().unwrap()).unwrap();
    assert_eq!(
        summary["connected"].as_u64().unwrap() + summary["failed"].as_u64().unwrap(),
        20_000
    );
    // The server's budget is spent; the rest were reset and counted.
    let over = cluster.wait_metric(
        1,
        "meshlet_proxy_limit_total",
        &[("limit", "pod_connections")],
        (20_000 - limit) as f64 - summary["failed"].as_f64().unwrap(),
    );
    assert_eq!(
        cluster.metric(
            1,
            "meshlet_proxy_limit_total",
            &[("limit", "node_connections")]
        ),
        0.0,
        "one pod's flood spent the node's budget"
    );
    // Another pod of the same node is served all the while.
    cluster
        .pod("client")
        .connect(cluster.pod("other").addr(false, 8080), 1000)
        .assert_echoed(1000);
    let during = footprint(agent);
    drop(flood);
    assert!(
        during.0 <= before.0 + 2 * limit + 64,
        "descriptors grew from {} to {} with a budget of {limit} per pod",
        before.0,
        during.0
    );
    eprintln!(
        "flood: {summary}; budget {limit} per pod; {over} reset over it; agent descriptors {} -> {}, RSS {} -> {} KiB",
        before.0, during.0, before.1, during.1
    );
}

/// The node's budget (in sockets) the agent of `node` logged at start.
fn node_budget(mesh: &FileMesh, node: usize) -> u64 {
    let log = mesh.agents[node].log();
    let line = log
        .lines()
        .find(|l| l.contains("connection budgets"))
        .expect("the agent logs its connection budgets");
    line.split("per_node=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no per_node budget in {line}"))
}

/// The node's budget counts sockets, not connections, and each enrolled pod holds 16 of it
/// for its own descriptors: with room for 6 past its pod's, the client's agent carries 5
/// tunneled connections (a socket each, and one for the tunnel they share) and resets the
/// rest; with room for 11 past its pod's, the server's agent carries those 5 (a socket each to
/// the application, one for the tunnel) and 2 plaintext connections (two sockets each), and
/// resets a third. Counted as two sockets a connection, as before, the client's agent would
/// have stopped at 3 tunneled connections; without the pods' share, at 21. The counts rely on
/// `meshlet-testpod flood` opening its connections one after another (each echoed before the
/// next), so the tunneled ones share the one pooled connection the first opened.
#[test]
fn the_nodes_budget_counts_sockets_one_per_tunneled_connection_two_per_plaintext_one() {
    use meshlet::proxy::Budgets;
    // One enrolled pod on each node (`outsider` is outside the mesh).
    let reserved = Budgets::RESERVED_DESCRIPTORS + u64::from(Budgets::POD_DESCRIPTORS);
    let mut cluster = Cluster::new(2);
    for (name, node) in [("client", 0), ("outsider", 0), ("server", 1)] {
        cluster.add_pod(name, node);
    }
    cluster.limit_agent_open_files(0, reserved + 6);
    cluster.limit_agent_open_files(1, reserved + 11);
    let mesh = FileMesh::layout_on(
        cluster,
        &[("client", 0), ("server", 1)],
        &[("outsider", 0)],
        vec![],
        // Per pod: as much as the node's budget allows.
        |_, _| vec!["--max-connections-per-pod".into(), "100".into()],
    );
    let pod = u64::from(Budgets::POD_DESCRIPTORS);
    for (node, slots) in [(0, 6 + pod), (1, 11 + pod)] {
        assert_eq!(node_budget(&mesh, node), slots, "node-{node}");
    }
    let cluster = &mesh.cluster;
    let _server = cluster.pod("server").echo_server(8080);
    let server = cluster.pod("server").addr(false, 8080).to_string();
    let node_spent = |node| {
        cluster.metric(
            node,
            "meshlet_proxy_limit_total",
            &[("limit", "node_connections")],
        )
    };
    let flood = |from: &str, count: usize| {
        let mut flood = cluster.pod(from).command(testpod_binary());
        flood.args(["flood", "--echo", "--to", &server, "--count"]);
        flood.arg(count.to_string());
        let mut flood = Process::spawn_ready(flood);
        let summary: Value = serde_json::from_str(&flood.next_line().unwrap()).unwrap();
        (flood, summary)
    };

    let (_tunneled, summary) = flood("client", 7);
    assert_eq!(summary["echoed"], 5, "tunneled: {summary}");
    assert_eq!(
        node_spent(0),
        2.0,
        "the client's agent reset the 6th and 7th"
    );
    assert_eq!(node_spent(1), 0.0, "the server's agent had room for all 5");

    let (_plaintext, summary) = flood("outsider", 3);
    assert_eq!(summary["echoed"], 2, "plaintext: {summary}");
    assert_eq!(
        node_spent(1),
        1.0,
        "the server's agent reset the third plaintext connection"
    );
}

/// Idle pooled HBONE connections hold slots of the node's budget (one per source pod and
/// destination, kept 5 minutes), but they are a cache: a connection that finds the budget
/// spent has them closed and takes a slot one frees, rather than being reset. With room for 4
/// sockets past its pods' share, the client's node is left holding 3 idle tunnels by three
/// connections, one after another; a fourth needs 2 slots (its accepted socket, a tunnel of its
/// own) and would be reset without the closing.
#[test]
fn idle_tunnels_give_their_slots_to_a_connection_the_nodes_budget_would_refuse() {
    use meshlet::proxy::Budgets;
    let pods = 2;
    let reserved = Budgets::RESERVED_DESCRIPTORS + pods * u64::from(Budgets::POD_DESCRIPTORS);
    let mut cluster = Cluster::new(2);
    for (name, node) in [
        ("client", 0),
        ("second", 0),
        ("server-a", 1),
        ("server-b", 1),
    ] {
        cluster.add_pod(name, node);
    }
    cluster.limit_agent_open_files(0, reserved + 4);
    let mesh = FileMesh::layout_on(
        cluster,
        &[
            ("client", 0),
            ("second", 0),
            ("server-a", 1),
            ("server-b", 1),
        ],
        &[],
        vec![],
        |_, _| vec!["--max-connections-per-pod".into(), "100".into()],
    );
    assert_eq!(
        node_budget(&mesh, 0),
        4 + pods * u64::from(Budgets::POD_DESCRIPTORS)
    );
    let cluster = &mesh.cluster;
    let _servers = ["server-a", "server-b"].map(|name| cluster.pod(name).echo_server(8080));
    let to = |name: &str| cluster.pod(name).addr(false, 8080);
    let node_spent = || {
        cluster.metric(
            0,
            "meshlet_proxy_limit_total",
            &[("limit", "node_connections")],
        )
    };
    // Each leaves one idle tunnel: (client, a), (client, b), (second, a).
    for (from, server) in [
        ("client", "server-a"),
        ("client", "server-b"),
        ("second", "server-a"),
    ] {
        cluster
            .pod(from)
            .connect(to(server), 1000)
            .assert_echoed(1000);
    }
    assert_eq!(node_spent(), 0.0, "room for the three and their tunnels");
    // The fourth takes the last slot for its socket; its tunnel's slot comes from the idle ones.
    cluster
        .pod("second")
        .connect(to("server-b"), 1000)
        .assert_echoed(1000);
    assert_eq!(
        node_spent(),
        0.0,
        "no connection was refused while idle tunnels held the budget"
    );
}

#[test]
fn stalled_handshakes_oversized_headers_and_dead_upstreams_are_bounded() {
    let mesh = FileMesh::layout(
        &[("client", 0), ("server", 1), ("other", 1)],
        &[],
        vec![],
        |_, _| {
            ["--max-tls-handshakes", "2", "--connect-timeout", "300ms"]
                .map(String::from)
                .to_vec()
        },
    );
    let cluster = &mesh.cluster;
    let (server, other) = (cluster.pod("server"), cluster.pod("other"));
    let _echo = [server.echo_server(8080), other.echo_server(8080)];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let raw = RawHbone::new(cluster, cluster.node(0).netns.open());
    let hbone = server.addr(false, 15008);

    let _stalled = runtime.block_on(async {
        // A header list over the limit (16 KiB by default): the stream is refused with 431 and
        // the connection keeps serving.
        let huge = "x".repeat(20 * 1024);
        let status = raw
            .connect_with(
                hbone,
                raw.config(CLIENT, SERVER),
                &server.addr(false, 8080).to_string(),
                &[("x-padding", &huge)],
            )
            .await;
        assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

        // Three peers that open TCP to the server's 15008 and say nothing: two hold its
        // handshake slots, the third waits, and the limit is counted...
        let mut stalled = Vec::new();
        for _ in 0..3 {
            stalled.push(
                meshlet_tests::raw_hbone::connect_in(&raw.netns, hbone)
                    .await
                    .unwrap(),
            );
        }
        stalled
    });
    cluster.wait_metric(
        1,
        "meshlet_proxy_limit_total",
        &[("limit", "tls_handshakes")],
        1.0,
    );
    // ...while another pod of the node, with listeners of its own, is served.
    cluster
        .pod("client")
        .connect(other.addr(false, 8080), 100)
        .assert_echoed(100);

    // An upstream that never answers (an address on the fabric nobody holds: no ARP reply)
    // is given up after --connect-timeout, and the application's connection is reset.
    cluster
        .pod("client")
        .connect("172.18.0.250:80".parse().unwrap(), 10)
        .assert_failed(Outcome::Reset);
    assert_eq!(
        cluster.metric(
            0,
            "meshlet_proxy_limit_total",
            &[("limit", "connect_timeout")]
        ),
        1.0
    );
}
