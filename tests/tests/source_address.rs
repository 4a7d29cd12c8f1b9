//! The application sees its real client: the agents connect to a mesh pod's application from
//! the client's address (transparent sockets, a mark, a policy rule in the pod's namespace), for
//! tunnelled, same-node and plaintext clients, IPv4 and IPv6, with no iptables; and an
//! unenrolled pod's namespace keeps nothing of it.

use std::{net::IpAddr, time::Duration};

use meshlet_tests::{Pod, mesh::FileMesh};

/// What `args` prints, run inside `pod`'s network namespace.
fn run_in(pod: &Pod, program: &str, args: &[&str]) -> String {
    let out = pod
        .command(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("run {program}: {err}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Connects from `client` to `server`'s echo server and asserts the application saw the
/// client's own IPv4 address.
fn assert_seen_from(client: &Pod, server: &Pod, echo: &mut meshlet_tests::process::Process) {
    client
        .connect(server.addr(false, 8080), 16)
        .assert_echoed(16);
    assert_eq!(
        echo.next_accepted().peer.ip().to_canonical(),
        IpAddr::from(client.ipv4)
    );
}

/// The pieces of transparent routing in `pod`'s namespace: the rules (both families), the
/// routes of table 15006 (both families), and `tcp_fwmark_accept`.
fn transparent_routing(pod: &Pod) -> (String, String, String) {
    let rules = ["-4", "-6"]
        .map(|family| run_in(pod, "ip", &[family, "rule", "show", "fwmark", "0x53a"]))
        .concat();
    let routes = ["-4", "-6"]
        .map(|family| {
            let out = pod
                .command("ip")
                .args([family, "route", "show", "table", "15006"])
                .output()
                .expect("run ip route");
            let stderr = String::from_utf8_lossy(&out.stderr);
            // A table never filled does not exist at all.
            assert!(
                out.status.success() || stderr.contains("table does not exist"),
                "ip route: {stderr}"
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .concat();
    let sysctl = run_in(pod, "cat", &["/proc/sys/net/ipv4/tcp_fwmark_accept"]);
    (rules, routes, sysctl.trim().to_owned())
}

/// Opens a long-lived connection from `client` to `server`'s echo server and asserts the
/// application saw it from the client's own IPv4 address.
fn hold_seen_from(
    client: &Pod,
    server: &Pod,
    echo: &mut meshlet_tests::process::Process,
) -> meshlet_tests::process::Held {
    let held = client.hold(server.addr(false, 8080));
    assert_eq!(
        echo.next_accepted().peer.ip().to_canonical(),
        IpAddr::from(client.ipv4)
    );
    held
}

/// Asserts `pod`'s namespace holds the whole transparent routing: both rules, both routes, the
/// sysctl.
fn assert_prepared(pod: &Pod) {
    let (rules, routes, sysctl) = transparent_routing(pod);
    assert_eq!(rules.matches("lookup 15006").count(), 2, "{rules}");
    assert_eq!(routes.matches("local").count(), 2, "{routes}");
    assert_eq!(sysctl, "1");
}

#[test]
fn applications_see_their_clients_addresses_and_unenrolled_pods_keep_none_of_the_routing() {
    let mesh = FileMesh::client_server(&[("neighbour", 1)], Vec::new());
    let cluster = &mesh.cluster;
    let server = cluster.pod("server");
    let mut echo = server.echo_server(8080);

    // Each client's own address, as the application's accept() and getpeername() see it (the
    // echo server reports the accepted socket's peer).
    for (client, ipv6, path) in [
        ("client", false, "tunnelled from node-0"),
        ("client", true, "tunnelled from node-0, IPv6"),
        ("neighbour", false, "same node"),
        ("neighbour", true, "same node, IPv6"),
        ("bystander", false, "plaintext from outside the mesh"),
    ] {
        let pod = cluster.pod(client);
        pod.connect(server.addr(ipv6, 8080), 64).assert_echoed(64);
        let accepted = echo.next_accepted();
        let own: IpAddr = if ipv6 {
            pod.ipv6.into()
        } else {
            pod.ipv4.into()
        };
        assert_eq!(
            accepted.peer.ip().to_canonical(),
            own,
            "{path}: the application saw {} as its client, not {client}",
            accepted.peer
        );
        assert_ne!(accepted.local.ip(), accepted.peer.ip());
    }
    // The access log keeps reporting the real peer too.
    mesh.agents[1].wait_for_log(
        &format!("src={}", cluster.pod("bystander").ipv4),
        1,
        Duration::from_secs(5),
    );

    // The application's own connections go out as before (its replies to transparent
    // connections are the only ones that carry the mark).
    let _outside = cluster.pod("bystander").echo_server(9000);
    server
        .connect(cluster.pod("bystander").addr(false, 9000), 64)
        .assert_echoed(64);

    // Policy decides on the address the application sees: an ipBlocks ALLOW of the client's
    // address lets the client in and no one else.
    mesh.write(&[serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "only-client", "namespace": "demo"},
        "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "ALLOW",
                 "rules": [{"from": [{"source": {"ipBlocks": [format!("{}/32", cluster.pod("client").ipv4)]}}]}]}
    })]);
    assert_seen_from(cluster.pod("client"), server, &mut echo);
    cluster
        .pod("neighbour")
        .connect(server.addr(false, 8080), 16)
        .assert_failed(meshlet_tests::process::Outcome::Reset);
    mesh.write(&[]);

    let (rules, routes, sysctl) = transparent_routing(server);
    assert!(
        rules.contains("32000:") && rules.contains("lookup 15006"),
        "{rules}"
    );
    assert!(
        routes.contains("local default dev lo") && routes.matches("local").count() == 2,
        "{routes}"
    );
    assert_eq!(sysctl, "1");

    // Take the namespace out of the mesh: the pods are unenrolled, and once their last
    // connection is gone, nothing of the routing is left in their namespaces.
    meshlet_tests::write_workloads(
        &mesh.file,
        &demo_out_of_the_mesh(&mesh, &["client", "server", "neighbour"]),
    );
    mesh.agents[1].wait_for_log(
        "transparent connections' routing removed",
        2,
        Duration::from_secs(10),
    );
    for name in ["server", "neighbour"] {
        assert_eq!(
            transparent_routing(cluster.pod(name)),
            (String::new(), String::new(), "0".to_owned()),
            "{name}'s namespace kept some of the transparent routing"
        );
    }
    // Outside the mesh the client reaches the application directly, from its own address.
    assert_seen_from(cluster.pod("client"), server, &mut echo);
}

/// The workload objects with namespace `demo` out of the mesh (no label), its pods as they are.
fn demo_out_of_the_mesh(mesh: &FileMesh, pods: &[&str]) -> Vec<serde_json::Value> {
    let cluster = &mesh.cluster;
    let mut objects = vec![
        meshlet_tests::namespace_manifest("demo", &[]),
        meshlet_tests::namespace_manifest("legacy", &[]),
        cluster
            .pod("bystander")
            .manifest("legacy", &[("app", "bystander")]),
    ];
    for name in pods {
        objects.push(cluster.pod(name).manifest("demo", &[("app", name)]));
    }
    objects
}

#[test]
fn a_pod_enrolled_again_before_its_last_connection_ends_keeps_its_routing() {
    let mesh = FileMesh::client_server(&[], Vec::new());
    let cluster = &mesh.cluster;
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let mut echo = server.echo_server(8080);
    let held = hold_seen_from(client, server, &mut echo);

    // Out of the mesh and back while the connection is open: the first enrollment's removal
    // waits for the connection, and by then the namespace is enrolled again.
    let agent = &mesh.agents[1];
    meshlet_tests::write_workloads(
        &mesh.file,
        &demo_out_of_the_mesh(&mesh, &["client", "server"]),
    );
    agent.wait_for_log("pod unenrolled pod=demo/server", 1, Duration::from_secs(10));
    // Both agents have read that file before it changes back (else one may see no change).
    mesh.agents[0].wait_for_log("pod unenrolled pod=demo/client", 1, Duration::from_secs(10));
    mesh.write(&[]);
    agent.wait_for_log("pod enrolled pod=demo/server", 2, Duration::from_secs(10));
    held.release().assert_echoed(10);
    agent.wait_for_log(
        "transparent connections' routing kept: the namespace is enrolled again pod=demo/server",
        1,
        Duration::from_secs(10),
    );

    assert_prepared(server);
    assert_seen_from(client, server, &mut echo);
    assert!(
        !agent
            .log()
            .contains("transparent connections' routing removed"),
        "{}",
        agent.log()
    );
}

#[test]
fn the_client_address_is_kept_across_an_agent_handoff_and_a_crash() {
    let mut mesh = FileMesh::client_server(&[], Vec::new());
    let source = format!("file:{}", mesh.file.display());
    let cluster = &mesh.cluster;
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let mut echo = server.echo_server(8080);
    let held = hold_seen_from(client, server, &mut echo);

    // A successor takes the server's node over; the old agent drains the held connection.
    let successor = cluster.start_agent(1, &["--source", &source]);
    successor.wait_for_log("agent serving", 1, Duration::from_secs(30));
    let old = &mut mesh.agents[1];
    old.wait_for_log("handed over to the successor", 1, Duration::from_secs(10));
    old.signal(libc::SIGTERM);
    old.wait_for_log("draining: listeners closed", 1, Duration::from_secs(10));
    assert_seen_from(client, server, &mut echo);
    held.release().assert_echoed(10);
    assert!(old.wait_exit(Duration::from_secs(15)).success());
    assert!(
        !old.log().contains("routing removed"),
        "the old agent undid its successor's routing: {}",
        old.log()
    );
    assert_seen_from(client, server, &mut echo);

    // A crash leaves the routing in the namespace; the next agent finds the pod and carries on.
    let mut successor = successor;
    successor.signal(libc::SIGKILL);
    successor.wait_exit(Duration::from_secs(5));
    let next = cluster.start_agent(1, &["--source", &source]);
    next.wait_for_log("initial enrollment pass done", 1, Duration::from_secs(30));
    assert_seen_from(client, server, &mut echo);
    assert_prepared(server);
}

#[test]
fn meshlet_uninstall_removes_what_a_killed_agent_left_in_its_pods_namespaces_only() {
    let mut mesh = FileMesh::client_server(&[], Vec::new());
    let (client, server) = (mesh.cluster.pod("client"), mesh.cluster.pod("server"));
    let mut echo = server.echo_server(8080);
    assert_seen_from(client, server, &mut echo);

    // Killed: nothing of node-1's agent undoes anything.
    mesh.agents[1].signal(libc::SIGKILL);
    mesh.agents[1].wait_exit(Duration::from_secs(5));
    let cni = mesh.cluster.state_dir().join("cni-node-1");
    let out = std::process::Command::new(meshlet_tests::process::meshlet_binary())
        .arg("uninstall")
        .arg("--bpffs-dir")
        .arg(mesh.cluster.bpffs_dir(1))
        .arg("--cni-bin-dir")
        .arg(cni.join("bin"))
        .arg("--cni-conf-dir")
        .arg(cni.join("net.d"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("transparent routing removed from 1 pod namespace(s)"),
        "{stdout}"
    );
    assert_eq!(
        transparent_routing(server),
        (String::new(), String::new(), "0".to_owned()),
        "the server's namespace kept some of the transparent routing"
    );
    // The client's pod is node-0's, whose agent runs on: its routing stays.
    assert_prepared(client);
}

#[test]
fn the_proxy_never_reuses_the_4_tuple_of_a_connection_the_client_holds_open() {
    // Plaintext from outside the mesh: the client's own connection (the agent accepted it on
    // 15006) and the agent's to the application have the same client address, pod address and
    // port; only the client ports may tell them apart. A thousand held open at once: a port
    // drawn from the client's range would hit one of them every few dozen connections.
    let mesh = FileMesh::client_server(&[], Vec::new());
    let (bystander, server) = (mesh.cluster.pod("bystander"), mesh.cluster.pod("server"));
    let mut echo = server.echo_server(8080);
    let mut flood = bystander.command(meshlet_tests::process::testpod_binary());
    flood.args([
        "flood",
        "--to",
        &server.addr(false, 8080).to_string(),
        "--count",
        "1000",
        "--echo",
    ]);
    let mut flood = meshlet_tests::process::Process::spawn_ready(flood);
    let summary: serde_json::Value =
        serde_json::from_str(&flood.next_line().expect("flood summary")).unwrap();
    assert_eq!(
        (summary["connected"].as_u64(), summary["echoed"].as_u64()),
        (Some(1000), Some(1000)),
        "every connection reached the application and echoed: {summary}"
    );
    // The application saw each from the client's address and a port of the agent's range.
    for _ in 0..1000 {
        let peer = echo.next_accepted().peer;
        assert_eq!(peer.ip().to_canonical(), IpAddr::from(bystander.ipv4));
        assert!(
            (16384..=32767).contains(&peer.port()),
            "the agent's connection left from port {}, in the range clients draw from",
            peer.port()
        );
    }
}

#[test]
fn with_the_opt_out_applications_see_their_pods_own_address_and_nothing_is_prepared() {
    let mesh = FileMesh::layout(&[("client", 0), ("server", 1)], &[], Vec::new(), |_, _| {
        vec!["--preserve-source-address=false".to_owned()]
    });
    let cluster = &mesh.cluster;
    let server = cluster.pod("server");
    let mut echo = server.echo_server(8080);
    cluster
        .pod("client")
        .connect(server.addr(false, 8080), 64)
        .assert_echoed(64);
    assert_eq!(
        echo.next_accepted().peer.ip().to_canonical(),
        IpAddr::from(server.ipv4),
        "with the opt-out the application sees its pod's own address"
    );
    assert_eq!(
        transparent_routing(server),
        (String::new(), String::new(), "0".to_owned())
    );
}
