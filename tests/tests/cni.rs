//! Capture from pod start: `meshlet-cni` invoked exactly as a container runtime invokes it
//! (environment, conf with `prevResult` on stdin), against real agents in a network-namespace
//! cluster. A pod here can be a bare sandbox (namespace, addresses, cgroup, no process), so
//! polling discovery cannot find it: whatever captures it is the plugin's doing.

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use meshlet::cni::protocol::{self, Command, PodRef, Reply, Request};
use meshlet_tests::{
    Cluster,
    cni::{CniCall, cni_binary, prev_result},
    enrolled, http_get,
    mesh::FileMesh,
    namespace_manifest, write_workloads,
};
use serde_json::Value;

const AMBIENT: (&str, &str) = ("meshlet.io/dataplane-mode", "ambient");

/// Node `node`'s `/workloads` row for pod `name`.
fn workload(cluster: &Cluster, node: usize, name: &str) -> Value {
    let (status, body) = http_get(
        &cluster.node(node).netns,
        "127.0.0.1:15000".parse().unwrap(),
        "/workloads",
    );
    assert_eq!(status, 200, "{body}");
    let rows: Vec<Value> = serde_json::from_str(&body).unwrap();
    rows.into_iter()
        .find(|row| row["name"] == name)
        .unwrap_or_else(|| panic!("no workload {name} in {body}"))
}

fn outbound_redirects(cluster: &Cluster, node: usize) -> f64 {
    cluster.metric(
        node,
        "meshlet_redirected_connections_total",
        &[("direction", "outbound")],
    )
}

/// Waits until `path` exists (the agent writes it once its source has synced).
fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two nodes: `server` on node-1, captured; `client` on node-0, a bare sandbox the agent has
/// not heard of yet.
fn server_and_sandbox() -> FileMesh {
    let mut cluster = Cluster::new(2);
    cluster.add_pod("server", 1);
    cluster.add_pod_sandbox("client", 0);
    let base = vec![
        namespace_manifest("demo", &[AMBIENT]),
        cluster
            .pod("server")
            .mesh_manifest("demo", &[("app", "server")]),
    ];
    FileMesh::start(cluster, base, &[&[], &["server"]])
}

#[test]
fn add_holds_the_pod_until_it_is_enrolled_and_its_first_connect_is_captured() {
    let mesh = server_and_sandbox();
    let cluster = &mesh.cluster;
    let _echo = cluster.pod("server").echo_server(8080);
    let client = cluster.pod("client");

    // The runtime creates the sandbox before the agent has heard of the pod: ADD is held.
    let call = CniCall::new("ADD", client, "demo", &cluster.cni_socket(0), "closed");
    let add = std::thread::spawn(move || call.run());
    cluster.wait_metric(0, "meshlet_cni_adds_waiting", &[], 1.0);
    assert!(!add.is_finished(), "ADD returned before the pod was known");
    // The API now has the pod, bound and Pending, without addresses (the kubelet reports
    // them after ADD): the agent uses the primary plugin's.
    let before = outbound_redirects(cluster, 0);
    mesh.write(&[client.pending_manifest("demo", &[("app", "client")])]);
    let add = add.join().unwrap();
    add.assert_success();
    assert_eq!(
        add.stdout.trim_end(),
        prev_result(client),
        "prevResult passes through byte for byte"
    );

    // The instant ADD returns, the namespace is enrolled, and the pod's very first connect
    // (made by its first process) is captured and carried over HBONE.
    assert!(
        enrolled(&cluster.bpffs_dir(0)).contains(&client.netns_cookie()),
        "ADD returned before the namespace was enrolled"
    );
    client
        .connect(cluster.pod("server").addr(false, 8080), 1000)
        .assert_echoed(1000);
    assert!(
        outbound_redirects(cluster, 0) > before,
        "eBPF did not redirect the first connect"
    );
    mesh.agents[0].wait_for_log("src_workload=demo/client", 1, Duration::from_secs(10));
    let log = mesh.agents[0].log();
    let line = log
        .lines()
        .find(|l| l.contains("src_workload=demo/client"))
        .unwrap();
    assert!(line.contains("protocol=HBONE"), "{line}");
    mesh.agents[1].wait_for_log(
        "src_identity=spiffe://cluster.local/ns/demo/sa/client",
        1,
        Duration::from_secs(10),
    );

    let row = workload(cluster, 0, "client");
    assert_eq!(row["capture"]["state"], "enrolled", "{row}");
    assert_eq!(row["capture"]["via"], "cni", "{row}");
    assert_eq!(
        row["ips"],
        serde_json::json!([]),
        "the API has no addresses yet: {row}"
    );

    // The kubelet reports the pod running with the same addresses: capture carries on.
    mesh.write(&[client.manifest("demo", &[("app", "client")])]);
    assert!(enrolled(&cluster.bpffs_dir(0)).contains(&client.netns_cookie()));
    assert!(!mesh.agents[0].log().contains("pod unenrolled"));
    assert_eq!(
        cluster.metric(
            0,
            "meshlet_cni_requests_total",
            &[("command", "ADD"), ("result", "enrolled")]
        ),
        1.0
    );
    cluster.cni(0, "CHECK", "client", "demo").assert_success();
}

#[test]
fn del_releases_the_pod_and_polling_does_not_take_it_back() {
    let mesh = server_and_sandbox();
    let cluster = &mesh.cluster;
    let _echo = cluster.pod("server").echo_server(8080);
    let client = cluster.pod("client");
    let cookie = client.netns_cookie();

    // The pod starts as it does in a cluster: bound and Pending, ADD, then running.
    mesh.write(&[client.pending_manifest("demo", &[("app", "client")])]);
    cluster.cni(0, "ADD", "client", "demo").assert_success();
    assert!(enrolled(&cluster.bpffs_dir(0)).contains(&cookie));
    let running = [client.manifest("demo", &[("app", "client")])];
    mesh.write(&running);
    let del = cluster.cni(0, "DEL", "client", "demo");
    del.assert_success();
    assert_eq!(del.stdout, "", "DEL prints nothing");
    assert!(
        !enrolled(&cluster.bpffs_dir(0)).contains(&cookie),
        "DEL returned with the namespace still enrolled"
    );
    mesh.agents[0].wait_for_log("CNI DEL: releasing the pod", 1, Duration::from_secs(5));

    // The sandbox's processes may outlive DEL (containerd kills the pause container after
    // it): they must not bring capture back. A process runs in the pod, the store changes,
    // a pass runs: still released.
    let before = outbound_redirects(cluster, 0);
    let _process = client.echo_server(9090);
    mesh.write(&[running[0].clone(), namespace_manifest("other", &[])]);
    assert!(!enrolled(&cluster.bpffs_dir(0)).contains(&cookie));
    client
        .connect(cluster.pod("server").addr(false, 8080), 100)
        .assert_echoed(100);
    assert_eq!(
        outbound_redirects(cluster, 0),
        before,
        "a released pod's connect was redirected"
    );
    let row = workload(cluster, 0, "client");
    assert_eq!(row["capture"]["state"], "pending", "{row}");
    assert!(
        row["capture"]["reason"]
            .as_str()
            .unwrap()
            .contains("released by CNI DEL"),
        "{row}"
    );

    // CHECK now says the pod is not as ADD left it; a second DEL is harmless.
    let check = cluster.cni(0, "CHECK", "client", "demo");
    let err = check.error();
    assert_eq!(err["code"], 100, "{check:?}");
    assert!(
        err["details"]
            .as_str()
            .unwrap()
            .contains("must be captured and is not"),
        "{check:?}"
    );
    cluster.cni(0, "DEL", "client", "demo").assert_success();
    assert!(!enrolled(&cluster.bpffs_dir(0)).contains(&cookie));

    // A new ADD (the sandbox recreated) captures it again.
    cluster.cni(0, "ADD", "client", "demo").assert_success();
    assert!(enrolled(&cluster.bpffs_dir(0)).contains(&cookie));
}

#[test]
fn a_recreated_sandbox_replaces_the_old_one_and_a_late_del_of_the_old_one_changes_nothing() {
    let mut cluster = Cluster::new(1);
    cluster.add_pod_sandbox("client", 0);
    // The namespace and addresses the runtime gives the pod's next sandbox.
    cluster.add_pod_sandbox("next", 0);
    let client = cluster.pod("client");
    let base = vec![
        namespace_manifest("demo", &[AMBIENT]),
        client.manifest("demo", &[("app", "client")]),
    ];
    let mesh = FileMesh::start(cluster, base, &[&[]]);
    let cluster = &mesh.cluster;
    let (client, next) = (cluster.pod("client"), cluster.pod("next"));
    let first = CniCall::new("ADD", client, "demo", &cluster.cni_socket(0), "closed");
    first.run().assert_success();
    assert_eq!(enrolled(&cluster.bpffs_dir(0)), vec![client.netns_cookie()]);

    // The sandbox is recreated: same pod (name, UID), new container, namespace and addresses.
    // The API still lists the old addresses; only the new sandbox's are steered to the pod.
    let second = CniCall {
        args: first.args.clone(),
        container_id: "recreated".into(),
        ..CniCall::new("ADD", next, "demo", &cluster.cni_socket(0), "closed")
    };
    second.run().assert_success();
    assert_eq!(
        enrolled(&cluster.bpffs_dir(0)),
        vec![next.netns_cookie()],
        "the old sandbox's capture is replaced, not added to"
    );
    let pinned = meshlet::capture::Pinned::open(&cluster.bpffs_dir(0)).unwrap();
    let (_, enrollment) = pinned.enrolled().unwrap().remove(0);
    assert_eq!(
        (
            meshlet::capture::ip_of_key(&enrollment.ipv4),
            meshlet::capture::ip_of_key(&enrollment.ipv6)
        ),
        (next.ipv4.into(), next.ipv6.into()),
        "the pod is steered its new sandbox's addresses, not the API's stale ones"
    );

    // A late DEL of the old sandbox, whose namespace is gone (empty CNI_NETNS): the pod's
    // current capture is not that sandbox's.
    let late = CniCall {
        command: "DEL".into(),
        netns: PathBuf::new(),
        ..first.clone()
    };
    late.run().assert_success();
    mesh.write(&[namespace_manifest("other", &[])]);
    assert_eq!(enrolled(&cluster.bpffs_dir(0)), vec![next.netns_cookie()]);
    let row = workload(cluster, 0, "client");
    assert_eq!(row["capture"]["state"], "enrolled", "{row}");

    // The current sandbox's DEL releases it.
    CniCall {
        command: "DEL".into(),
        ..second
    }
    .run()
    .assert_success();
    assert!(enrolled(&cluster.bpffs_dir(0)).is_empty());
}

#[test]
fn with_the_agent_down_a_mesh_pod_waits_and_other_pods_start() {
    let mut cluster = Cluster::new(1);
    cluster.add_pod_sandbox("client", 0);
    cluster.add_pod_sandbox("web", 0);
    let file = std::env::temp_dir().join(format!("{}-workloads.yaml", cluster.id()));
    let _remove = RemoveOnDrop(file.clone());
    write_workloads(
        &file,
        &[
            namespace_manifest("demo", &[AMBIENT]),
            namespace_manifest("legacy", &[]),
            cluster.pod("client").pending_manifest("demo", &[]),
            cluster.pod("web").pending_manifest("legacy", &[]),
        ],
    );
    let source = format!("file:{}", file.display());
    let decisions = cluster.cni_socket(0).with_file_name("namespaces.json");

    // An agent ran on this node before (the node rebooted since): it installed the plugin
    // and left its decisions.
    let cni_dir = cluster.cni_socket(0).with_file_name("node");
    let (bin, conf) = (cni_dir.join("bin"), cni_dir.join("net.d"));
    std::fs::create_dir_all(&conf).unwrap();
    let bridge = include_str!("../../agent/src/cni/fixtures/10-bridge.conflist");
    let mut agent = cluster.start_agent(
        0,
        &[
            "--source",
            &source,
            "--cni-install",
            "--cni-bin-dir",
            bin.to_str().unwrap(),
            "--cni-conf-dir",
            conf.to_str().unwrap(),
        ],
    );
    // No primary conf yet (the primary CNI starts after meshlet on a new node): not ready.
    agent.wait_for_log("no CNI conf yet", 1, Duration::from_secs(10));
    let (status, body) = http_get(
        &cluster.node(0).netns,
        "127.0.0.1:15021".parse().unwrap(),
        "/healthz/ready",
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("meshlet-cni is not chained"), "{body}");
    std::fs::write(conf.join("10-bridge.conflist"), bridge).unwrap();
    agent.wait_for_log(
        "meshlet-cni chained in the primary CNI conf",
        1,
        Duration::from_secs(10),
    );
    let ready = Instant::now();
    loop {
        let (status, body) = http_get(
            &cluster.node(0).netns,
            "127.0.0.1:15021".parse().unwrap(),
            "/healthz/ready",
        );
        if status == 200 {
            break;
        }
        assert!(ready.elapsed() < Duration::from_secs(10), "{status} {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let chained: Value =
        serde_json::from_slice(&std::fs::read(conf.join("10-bridge.conflist")).unwrap()).unwrap();
    let entry = chained["plugins"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(entry["type"], "meshlet-cni");
    assert_eq!(
        entry["agent_socket"],
        cluster.cni_socket(0).to_str().unwrap()
    );
    assert_eq!(entry["fail_mode"], "closed");
    assert_eq!(
        std::fs::read(bin.join("meshlet-cni")).unwrap(),
        std::fs::read(cni_binary()).unwrap()
    );
    wait_for_file(&decisions);
    agent.stop();
    drop(agent);

    let down = cluster.cni(0, "ADD", "client", "demo");
    let err = down.error();
    assert_eq!(err["code"], 11, "try again later: {down:?}");
    assert!(
        err["msg"].as_str().unwrap().contains("agent is not ready"),
        "{down:?}"
    );
    let details = err["details"].as_str().unwrap();
    assert!(
        details.contains("cannot reach the meshlet agent") && details.contains("namespaces.json"),
        "{down:?}"
    );
    assert!(enrolled(&cluster.bpffs_dir(0)).is_empty());
    // A pod outside the mesh starts without the agent.
    let web = cluster.cni(0, "ADD", "web", "legacy");
    web.assert_success();
    assert_eq!(web.stdout.trim_end(), prev_result(cluster.pod("web")));
    // Fail-open lets the mesh pod start uncaptured, and says so.
    let open = CniCall::new(
        "ADD",
        cluster.pod("client"),
        "demo",
        &cluster.cni_socket(0),
        "open",
    )
    .run();
    open.assert_success();
    assert!(open.stderr.contains("starts uncaptured"), "{open:?}");

    // The runtime retries once the agent is back: the pod is captured before it starts.
    let agent = cluster.start_agent(0, &["--source", &source]);
    agent.wait_for_log("initial enrollment pass done", 1, Duration::from_secs(10));
    let retry = cluster.cni(0, "ADD", "client", "demo");
    retry.assert_success();
    assert_eq!(
        enrolled(&cluster.bpffs_dir(0)),
        vec![cluster.pod("client").netns_cookie()]
    );
    // With the agent up, the pod outside the mesh is answered by the agent itself.
    cluster.cni(0, "ADD", "web", "legacy").assert_success();
    assert_eq!(
        cluster.metric(
            0,
            "meshlet_cni_requests_total",
            &[("command", "ADD"), ("result", "not_captured")]
        ),
        1.0
    );
    drop(agent);
}

#[test]
fn the_socket_refuses_bad_requests_and_keeps_serving() {
    let mut cluster = Cluster::new(1);
    cluster.add_pod_sandbox("client", 0);
    let file = std::env::temp_dir().join(format!("{}-workloads.yaml", cluster.id()));
    let _remove = RemoveOnDrop(file.clone());
    write_workloads(
        &file,
        &[
            namespace_manifest("demo", &[AMBIENT]),
            cluster.pod("client").pending_manifest("demo", &[]),
        ],
    );
    let source = format!("file:{}", file.display());
    let agent = cluster.start_agent(0, &["--source", &source, "--cni-timeout", "2s"]);
    let socket = cluster.cni_socket(0);
    agent.wait_for_log("initial enrollment pass done", 1, Duration::from_secs(10));
    let client = cluster.pod("client");
    let request = Request {
        command: Command::Add,
        container_id: "sandbox1".into(),
        netns: client.netns.path().display().to_string(),
        pod: PodRef {
            namespace: "demo".into(),
            name: "client".into(),
            uid: Some(client.uid.clone()),
        },
        ips: vec![client.ipv4.into()],
    };
    let refusal = |reply: Reply| match reply {
        Reply::Refused { message } => message,
        other => panic!("not refused: {other:?}"),
    };
    let timeout = Duration::from_secs(10);

    // A client that connects and sends nothing holds one slot, not the socket.
    let _idle = std::os::unix::net::UnixStream::connect(&socket).unwrap();

    // Garbage.
    {
        use std::io::{Read as _, Write as _};
        let mut raw = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        raw.write_all(b"\x00\xffGET / HTTP/1.1\r\n\r\n").unwrap();
        raw.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = String::new();
        raw.read_to_string(&mut reply).unwrap();
        let reply: Reply = serde_json::from_str(&reply).unwrap();
        assert!(refusal(reply).starts_with("bad request"));
    }
    // Valid JSON, hostile fields.
    let mut bad = request.clone();
    bad.pod.name = "../../etc/passwd".into();
    let message = refusal(protocol::call(&socket, &bad, None, timeout).unwrap());
    assert!(message.contains("is not a Kubernetes name"), "{message}");
    // ADD without the namespace descriptor.
    let message = refusal(protocol::call(&socket, &request, None, timeout).unwrap());
    assert!(
        message.contains("needs the pod's network namespace"),
        "{message}"
    );
    // A descriptor that is not a network namespace.
    let not_netns = std::fs::File::open(&file).unwrap();
    let message =
        refusal(protocol::call(&socket, &request, Some(not_netns.as_fd()), timeout).unwrap());
    assert!(message.contains("is not a network namespace"), "{message}");
    // The node's own namespace named as the pod's: refused at once, never captured.
    let node_netns = cluster.node(0).netns.open();
    let message =
        refusal(protocol::call(&socket, &request, Some(node_netns.as_fd()), timeout).unwrap());
    assert!(
        message.contains("agent's own network namespace"),
        "{message}"
    );
    assert!(enrolled(&cluster.bpffs_dir(0)).is_empty());
    // A pod the agent never hears of: a clear error once --cni-timeout has passed.
    let ghost = CniCall {
        args: "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=ghost".into(),
        ..CniCall::new("ADD", client, "demo", &socket, "closed")
    }
    .run();
    let err = ghost.error();
    assert_eq!(err["code"], 11, "{ghost:?}");
    assert!(
        err["details"]
            .as_str()
            .unwrap()
            .contains("has not seen pod demo/ghost"),
        "{ghost:?}"
    );

    // Still serving: the real pod is captured.
    cluster.cni(0, "ADD", "client", "demo").assert_success();
    assert_eq!(enrolled(&cluster.bpffs_dir(0)), vec![client.netns_cookie()]);
    assert!(
        cluster.metric(
            0,
            "meshlet_cni_requests_total",
            &[("command", "ADD"), ("result", "refused")]
        ) >= 5.0
    );
}

#[test]
fn meshlet_cni_install_chains_the_plugin_and_uninstall_restores_the_conf() {
    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Dir(std::env::temp_dir().join(format!("mlt-cni-install-{}", std::process::id())));
    let (bin, conf) = (dir.0.join("bin"), dir.0.join("net.d"));
    std::fs::create_dir_all(&conf).unwrap();
    let calico = include_str!("../../agent/src/cni/fixtures/10-calico.conflist");
    std::fs::write(conf.join("10-calico.conflist"), calico).unwrap();
    let meshlet = |args: &[&str]| {
        let output = std::process::Command::new(meshlet_tests::process::meshlet_binary())
            .args(args)
            .args(["--cni-bin-dir", bin.to_str().unwrap()])
            .args(["--cni-conf-dir", conf.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let out = meshlet(&[
        "cni",
        "install",
        "--plugin-binary",
        cni_binary().to_str().unwrap(),
    ]);
    assert!(out.contains("chained in"), "{out}");
    let chained: Value =
        serde_json::from_slice(&std::fs::read(conf.join("10-calico.conflist")).unwrap()).unwrap();
    let plugins = chained["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 4);
    assert_eq!(plugins[3]["type"], "meshlet-cni");
    assert_eq!(plugins[3]["agent_socket"], "/var/lib/meshlet/cni.sock");
    // The installed binary is the plugin, and answers the runtime's VERSION.
    let version = std::process::Command::new(bin.join("meshlet-cni"))
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    let version: Value = serde_json::from_slice(&version.stdout).unwrap();
    assert!(
        version["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&Value::from("1.0.0"))
    );
    let out = meshlet(&["cni", "uninstall"]);
    assert!(out.contains("unchained from"), "{out}");
    let restored: Value =
        serde_json::from_slice(&std::fs::read(conf.join("10-calico.conflist")).unwrap()).unwrap();
    assert_eq!(restored, serde_json::from_str::<Value>(calico).unwrap());
    assert!(!bin.join("meshlet-cni").exists());
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
