//! Restarts and upgrades under load, with the real agent binary: a successor takes the
//! listeners over and the old agent drains (no connection refused or reset, a long-lived
//! connection finishes its exchange); the drain deadline ends what outlives it (GOAWAY for
//! HBONE, a clean close for plaintext); a successor built with other programs replaces them in
//! place, on the same links.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use meshlet_common::programs;
use meshlet_tests::{
    bpftool,
    mesh::FileMesh,
    pinned_link,
    raw_hbone::{RawHbone, frame_types},
    variant_ebpf_object,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
/// HTTP/2 frame type GOAWAY.
const GOAWAY: u8 = 0x7;

fn source(mesh: &FileMesh) -> String {
    format!("file:{}", mesh.file.display())
}

/// The value of `key=` in the agent's log line containing `needle`.
fn logged(log: &str, needle: &str, key: &str) -> String {
    let line = log
        .lines()
        .find(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("no {needle:?} in the log:\n{log}"));
    line.split(&format!("{key}="))
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_owned()
}

#[test]
fn a_successor_takes_the_listeners_over_under_load_and_the_old_agent_drains() {
    meshlet_tests::require_root();
    let mut mesh = FileMesh::client_server(&[], vec![]);
    let cluster = &mesh.cluster;
    let server = cluster.pod("server");
    let client = cluster.pod("client");
    let _echo = server.echo_server(8080);
    let to = server.addr(false, 8080);

    // Through both agents: HBONE from node-0 to the server's node-1, whose agent is replaced.
    let held = client.hold(to);
    let load = client.load(to, 100, 800);
    let successor = cluster.start_agent(1, &["--source", &source(&mesh)]);
    successor.wait_for_log("handoff received", 1, Duration::from_secs(30));
    successor.wait_for_log("agent serving", 1, Duration::from_secs(10));
    let old = &mut mesh.agents[1];
    old.wait_for_log("handed over to the successor", 1, Duration::from_secs(10));
    assert_eq!(
        logged(&successor.log(), "handoff received", "pods"),
        "1",
        "the server pod was handed over"
    );
    assert!(
        successor
            .log()
            .contains("pod taken over from the predecessor"),
        "{}",
        successor.log()
    );
    assert!(
        !successor.log().contains("pod enrolled"),
        "the successor opened no listeners of its own: {}",
        successor.log()
    );

    // SIGTERM: the old agent owns the long-lived connection and serves it on.
    old.signal(libc::SIGTERM);
    old.wait_for_log("draining: listeners closed", 1, Duration::from_secs(10));
    assert!(!old.exited(), "the old agent left its connection behind");
    let report = held.release();
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!(
        report.echoed, 10,
        "both exchanges of the long-lived connection"
    );
    // With its last connection gone it exits, long before its 25 s deadline.
    let status = old.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "old agent exited with {status}");
    assert_eq!(logged(&old.log(), "stopped;", "cut"), "0", "{}", old.log());

    let outcomes = load.finish();
    assert_eq!(
        outcomes.count("ok"),
        800,
        "every connection of the load was carried: {outcomes:?}"
    );
    // The successor serves on its own: new connections and the node endpoints.
    client.connect(to, 1000).assert_echoed(1000);
    assert!(
        cluster.metric(
            1,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")]
        ) >= 1.0,
        "the successor serves the metrics endpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_deadline_sends_goaway_on_hbone_and_closes_plaintext_cleanly() {
    meshlet_tests::require_root();
    let mut mesh = tokio::task::spawn_blocking(|| {
        FileMesh::layout(
            &[("client", 0), ("server", 1)],
            &[("bystander", 0)],
            vec![],
            |_, node| {
                if node == 1 {
                    vec!["--drain-deadline".into(), "6s".into()]
                } else {
                    vec![]
                }
            },
        )
    })
    .await
    .unwrap();
    let cluster = &mesh.cluster;
    let server = cluster.pod("server");
    let _echo = server.echo_server(8080);
    let to = server.addr(false, 8080);

    // A tunnel straight to node-1's 15008, and a plaintext connection steered to its 15006
    // (the bystander is outside the mesh), each echoing once and then left open.
    let raw = RawHbone::new(cluster, cluster.node(0).netns.open());
    let mut tunnel = raw
        .tunnel(
            SocketAddr::new(server.ipv4.into(), 15008),
            raw.config(CLIENT, SERVER),
            &to.to_string(),
        )
        .await;
    tunnel.io.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tunnel.io.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping");
    let mut plaintext = cluster
        .pod("bystander")
        .in_netns(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .unwrap();
    plaintext.write_all(b"ping").unwrap();
    plaintext.read_exact(&mut echoed).unwrap();

    // SIGTERM without a successor: the agent keeps serving, new connections too, for half the
    // deadline (a successor may be on its way); then it stops accepting and tells the HBONE
    // peer to go away; at the deadline it cuts what is left.
    let agent = &mut mesh.agents[1];
    agent.signal(libc::SIGTERM);
    agent.wait_for_log(
        "serving on until a successor takes the listeners over",
        1,
        Duration::from_secs(10),
    );
    cluster.pod("bystander").connect(to, 100).assert_echoed(100);
    assert!(
        !frame_types(&tunnel.received.lock().unwrap()).contains(&GOAWAY),
        "GOAWAY while still serving"
    );
    agent.wait_for_log("draining: listeners closed", 1, Duration::from_secs(10));

    // At the deadline the cut: the plaintext connection is closed with a FIN (read returns
    // 0), not reset; the tunnel's connection ends, after its GOAWAY.
    plaintext
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut byte = [0u8; 1];
    let closed = plaintext.read(&mut byte);
    assert!(
        matches!(closed, Ok(0)),
        "plaintext connection: want a clean close, got {closed:?}"
    );
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), tunnel.io.read_to_end(&mut rest))
        .await
        .expect("the tunnel ended at the deadline");
    let frames = frame_types(&tunnel.received.lock().unwrap());
    assert!(
        frames.contains(&GOAWAY),
        "no GOAWAY before the tunnel ended ({ended:?}); frames {frames:?}"
    );
    let status = agent.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "agent exited with {status}");
    let log = agent.log();
    assert_eq!(logged(&log, "stopped;", "cut"), "2", "{log}");
    assert_eq!(logged(&log, "stopped;", "handed_over"), "false", "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_successor_is_refused_and_the_running_agent_carries_on() {
    meshlet_tests::require_root();
    let mesh = tokio::task::spawn_blocking(|| FileMesh::client_server(&[], vec![]))
        .await
        .unwrap();
    let cluster = &mesh.cluster;
    let _echo = cluster.pod("server").echo_server(8080);
    let to = cluster.pod("server").addr(false, 8080);
    let socket = cluster.handoff_socket(1);

    // Garbage instead of a request.
    let garbage =
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None).unwrap();
    garbage
        .connect(&socket2::SockAddr::unix(&socket).unwrap())
        .unwrap();
    garbage.send(b"\x00\xffnot json").unwrap();
    mesh.agents[1].wait_for_log("handoff failed; still serving", 1, Duration::from_secs(10));
    drop(garbage);

    // A well-formed request from an agent of another node.
    let predecessor = meshlet::handoff::find(&socket)
        .unwrap()
        .expect("the running agent listens");
    let err = predecessor
        .take("node-0".into())
        .await
        .expect_err("another node's agent is refused");
    assert!(
        format!("{err:#}").contains("serves node node-1, not node-0"),
        "{err:#}"
    );
    mesh.agents[1].wait_for_log("handoff failed; still serving", 2, Duration::from_secs(10));

    // Nothing changed hands: node-1's agent serves as before.
    tokio::task::block_in_place(|| cluster.pod("client").connect(to, 1000)).assert_echoed(1000);
    assert!(!mesh.agents[1].log().contains("handed over"));
}

#[test]
fn an_upgrade_replaces_the_programs_in_place_on_the_same_links_under_load() {
    meshlet_tests::require_root();
    let variant = variant_ebpf_object();
    // Node-0, the client's, runs the variant build: its connect4 and sk_lookup differ from the
    // real build's, the other programs are the same.
    let mut mesh = FileMesh::layout(&[("client", 0), ("server", 1)], &[], vec![], |_, node| {
        if node == 0 {
            vec!["--ebpf-object".into(), variant.display().to_string()]
        } else {
            vec![]
        }
    });
    let cluster = &mesh.cluster;
    let _echo = cluster.pod("server").echo_server(8080);
    let to = cluster.pod("server").addr(false, 8080);
    let client = cluster.pod("client");
    let links = cluster.bpffs_dir(0).join("links").join(format!(
        "cgroup-{}",
        meshlet_tests::inode(&cluster.cgroup_root(0))
    ));
    let sk_lookup = cluster
        .bpffs_dir(0)
        .join("links")
        .join(format!("netns-{}", client.netns_cookie()))
        .join(programs::SK_LOOKUP);
    let pins = [
        links.join(programs::CONNECT4),
        links.join(programs::CONNECT6),
        links.join(programs::SOCK_OPS),
        sk_lookup.clone(),
    ];
    let before: Vec<_> = pins.iter().map(|pin| pinned_link(pin)).collect();

    // Every connect of the load goes through node-0's connect4 while it is replaced.
    let load = client.load(to, 100, 600);
    let successor = cluster.start_agent(0, &["--source", &source(&mesh)]);
    successor.wait_for_log("agent serving", 1, Duration::from_secs(30));
    assert_eq!(
        successor.log().matches("program replaced in place").count(),
        2,
        "connect4 and sk_lookup: {}",
        successor.log()
    );
    let after: Vec<_> = pins.iter().map(|pin| pinned_link(pin)).collect();
    for ((pin, before), after) in pins.iter().zip(&before).zip(&after) {
        assert_eq!(before.id, after.id, "{}: the same link", pin.display());
    }
    for changed in [0, 3] {
        assert_ne!(before[changed].program_id, after[changed].program_id);
        assert_ne!(
            before[changed].tag,
            after[changed].tag,
            "{}",
            pins[changed].display()
        );
    }
    for same in [1, 2] {
        assert_eq!(before[same], after[same], "{} kept", pins[same].display());
    }

    mesh.agents[0].signal(libc::SIGTERM);
    let status = mesh.agents[0].wait_exit(Duration::from_secs(15));
    assert!(status.success(), "old agent exited with {status}");
    let outcomes = load.finish();
    assert_eq!(outcomes.count("ok"), 600, "{outcomes:?}");
    // The new program captures: a new connect is redirected (its counter moves) and carried.
    let redirected = || {
        cluster.metric(
            0,
            "meshlet_redirected_connections_total",
            &[("direction", "outbound")],
        )
    };
    let earlier = redirected();
    client.connect(to, 100).assert_echoed(100);
    assert_eq!(redirected(), earlier + 1.0);
}

/// The bytes of `value` (bpftool's `["0x01", ...]`) as bpftool arguments: `01 ...`.
fn hex_args(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .expect("bytes")
        .iter()
        .map(|b| {
            b.as_str()
                .expect("hex byte")
                .trim_start_matches("0x")
                .to_owned()
        })
        .collect()
}

#[test]
fn a_map_layout_change_is_migrated() {
    meshlet_tests::require_root();
    let mut mesh = FileMesh::client_server(&[], vec![]);
    let _echo = mesh.cluster.pod("server").echo_server(8080);
    let to = mesh.cluster.pod("server").addr(false, 8080);
    let cookie = mesh.cluster.pod("server").netns_cookie();
    let maps = mesh.cluster.bpffs_dir(1).join("maps");
    let pin = |dir: &std::path::Path, name: &str| dir.join(name).display().to_string();
    let id_of = |path: String| bpftool(&["map", "show", "pinned", &path])["id"].clone();
    let kept_before = id_of(pin(&maps.join("v1"), "ORIG_BY_PEER"));
    let enrolled_before = bpftool(&["map", "show", "pinned", &pin(&maps.join("v1"), "ENROLLED")]);

    // What an agent before versioned layouts left: every map directly in maps/, and there
    // ENROLLED with another capacity (the server's namespace in it).
    mesh.agents[1].stop();
    let mut pinned = 0;
    for entry in std::fs::read_dir(maps.join("v1")).unwrap() {
        let entry = entry.unwrap();
        std::fs::rename(entry.path(), maps.join(entry.file_name())).unwrap();
        pinned += 1;
    }
    assert_eq!(
        pinned,
        meshlet_common::maps::ALL.len(),
        "every map pinned in v1/"
    );
    std::fs::remove_dir(maps.join("v1")).unwrap();
    let key: Vec<String> = cookie
        .to_ne_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut lookup = vec!["map", "lookup", "pinned"];
    let old_enrolled = pin(&maps, "ENROLLED");
    lookup.push(&old_enrolled);
    lookup.push("key");
    lookup.push("hex");
    lookup.extend(key.iter().map(String::as_str));
    let entry = bpftool(&lookup);
    let resized = pin(&maps, "ENROLLED_resized");
    let value_size = enrolled_before["bytes_value"].as_u64().unwrap().to_string();
    bpftool(&[
        "map",
        "create",
        &resized,
        "type",
        "hash",
        "key",
        "8",
        "value",
        &value_size,
        "entries",
        "64",
        "name",
        "ENROLLED",
    ]);
    let mut update = vec!["map", "update", "pinned", resized.as_str(), "key", "hex"];
    update.extend(key.iter().map(String::as_str));
    let value = hex_args(&entry["value"]);
    update.push("value");
    update.push("hex");
    update.extend(value.iter().map(String::as_str));
    bpftool(&update);
    std::fs::remove_file(&old_enrolled).unwrap();
    std::fs::rename(&resized, &old_enrolled).unwrap();

    let source = source(&mesh);
    let agent = mesh.cluster.start_agent(1, &["--source", &source]);
    // Serving, and the server's listeners open again (the first enrollment pass).
    agent.wait_for_log("initial enrollment pass done", 1, Duration::from_secs(30));
    let log = agent.log();
    assert_eq!(
        log.matches("map moved to this layout as it is").count(),
        pinned - 1,
        "every map but ENROLLED kept: {log}"
    );
    assert!(
        log.contains("map definition changed; entries carried over map=ENROLLED entries=1"),
        "{log}"
    );
    assert!(
        log.contains("maps_changed=true"),
        "the programs now use the new maps: {log}"
    );
    assert_eq!(
        id_of(pin(&maps.join("v1"), "ORIG_BY_PEER")),
        kept_before,
        "the same map"
    );
    let enrolled = bpftool(&["map", "show", "pinned", &pin(&maps.join("v1"), "ENROLLED")]);
    assert_eq!(enrolled["max_entries"], enrolled_before["max_entries"]);
    let leftovers: Vec<_> = std::fs::read_dir(&maps)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["v1"], "the old layout is gone");
    // Capture works on the new maps: the server's namespace is steered (its HBONE listener is
    // reached through the mesh), and a new connect from the client carried.
    mesh.cluster
        .pod("client")
        .connect(to, 1000)
        .assert_echoed(1000);
    mesh.agents[1] = agent;
}

#[test]
fn after_a_crash_the_next_agent_reports_what_died_and_how_fast_it_is_ready() {
    meshlet_tests::require_root();
    let mut mesh = FileMesh::client_server(&[], vec![]);
    let cluster = &mesh.cluster;
    let _echo = cluster.pod("server").echo_server(8080);
    let to = cluster.pod("server").addr(false, 8080);
    let client = cluster.pod("client");
    let held = client.hold(to);
    // The agent records what it carries (every second): wait until the held connection is in.
    let ledger = cluster.handoff_socket(1).with_file_name("connections.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let entry: serde_json::Value = std::fs::read(&ledger)
            .ok()
            .and_then(|body| serde_json::from_slice(&body).ok())
            .unwrap_or_default();
        if entry["live"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "ledger {entry}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let load = client.load(to, 100, 400);
    mesh.agents[1].signal(libc::SIGKILL);
    mesh.agents[1].wait_exit(Duration::from_secs(5));
    // While no agent runs, a plaintext client outside the mesh finds no listener in the pod:
    // the pinned sk_lookup program drops its SYN (fail closed) and says so through aya-log, in
    // the pinned ring the next agent reads.
    let unserved = cluster
        .pod("bystander")
        .connect_with(to, 10, &["--timeout-ms", "300"]);
    assert!(
        unserved.error.is_some() && unserved.echoed == 0,
        "nothing serves the pod: {unserved:?}"
    );
    let agent = cluster.start_agent(1, &["--source", &source(&mesh)]);
    agent.wait_for_log("initial enrollment pass done", 1, Duration::from_secs(30));
    let dropped = cluster.pod("server").dropped_without_listener(8080);
    agent.wait_for_log(&dropped, 1, Duration::from_secs(5));
    let log = agent.log();
    assert!(
        log.lines()
            .any(|line| line.contains(&dropped) && line.contains("WARN meshlet::ebpf")),
        "logged at its level under meshlet::ebpf: {log}"
    );
    assert_eq!(
        logged(&log, "initial enrollment pass done", "predecessor_crashed"),
        "true"
    );
    let lost: u64 = logged(&log, "initial enrollment pass done", "lost_connections")
        .parse()
        .unwrap();
    assert!(lost >= 1, "the held connection died with the agent: {log}");
    let ready_in = logged(&log, "initial enrollment pass done", "ready_in");
    let report = held.release();
    assert!(
        report.error.is_some(),
        "the held connection died: {report:?}"
    );
    let outcomes = load.finish();
    eprintln!("crash: ready in {ready_in}, lost {lost}, load {outcomes:?}");
    let failed: u64 = ["refused", "reset", "closed", "timeout", "error"]
        .iter()
        .map(|o| outcomes.count(o))
        .sum();
    assert_eq!(outcomes.count("ok") + failed, 400, "{outcomes:?}");
    // The new agent serves: a new connection is carried.
    client.connect(to, 1000).assert_echoed(1000);
    mesh.agents[1] = agent;
}

#[test]
fn a_port_held_by_another_process_stops_the_agent_before_it_attaches_anything() {
    meshlet_tests::require_root();
    let cluster = meshlet_tests::Cluster::new(1);
    // Something else on the node holds the metrics port (without SO_REUSEPORT).
    let holder = cluster
        .node(0)
        .netns
        .open()
        .run(|| TcpListener::bind("0.0.0.0:15020"))
        .unwrap()
        .expect("bind 15020 in the node");
    let file = std::env::temp_dir().join(format!("{}-workloads.yaml", cluster.id()));
    meshlet_tests::write_workloads(&file, &[meshlet_tests::namespace_manifest("demo", &[])]);
    let mut agent = cluster.start_agent(0, &["--source", &format!("file:{}", file.display())]);
    let status = agent.wait_exit(Duration::from_secs(20));
    let log = agent.log();
    let _ = std::fs::remove_file(&file);
    assert!(!status.success(), "the agent ran beside the holder: {log}");
    assert!(
        log.contains("bind the metrics endpoint on 0.0.0.0:15020")
            && log.contains(&format!("held by pid {}", std::process::id())),
        "the error names the port and its holder: {log}"
    );
    // It exited before touching the kernel: no program at the cgroup root, no pins.
    meshlet_tests::assert_nothing_attached(&cluster.cgroup_root(0), &cluster.bpffs_dir(0));
    drop(holder);
}

#[test]
fn deleting_the_daemonset_releases_capture_and_a_restart_keeps_it() {
    use meshlet_tests::{kube_api::ApiServer, namespace_manifest, process::Outcome};
    const AMBIENT: (&str, &str) = ("meshlet.io/dataplane-mode", "ambient");
    meshlet_tests::require_root();
    let mut cluster = meshlet_tests::Cluster::new(1);
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 0);
    let api = ApiServer::start();
    let kubeconfig = std::env::temp_dir().join(format!("{}-kubeconfig", cluster.id()));
    api.write_kubeconfig(&kubeconfig);
    api.apply(namespace_manifest("meshlet-system", &[]));
    // The DaemonSet, and the agent's pod as its controller creates (or adopts) it.
    let run_by_a_daemonset = || {
        let daemonset = api.apply(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "meshlet", "namespace": "meshlet-system"},
        }));
        api.apply(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "meshlet-x7k2p", "namespace": "meshlet-system",
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "meshlet",
                    "uid": daemonset["metadata"]["uid"], "controller": true,
                }],
            },
            "spec": {"nodeName": cluster.node(0).name, "hostNetwork": true},
        }));
    };
    run_by_a_daemonset();
    api.apply(namespace_manifest("demo", &[AMBIENT]));
    api.apply(cluster.pod("client").manifest("demo", &[("app", "client")]));
    api.apply(cluster.pod("server").manifest("demo", &[("app", "server")]));
    let cni_dir = cluster.cni_socket(0).with_file_name("node");
    let (bin, conf) = (cni_dir.join("bin"), cni_dir.join("net.d"));
    std::fs::create_dir_all(&conf).unwrap();
    let conflist = conf.join("10-bridge.conflist");
    std::fs::write(
        &conflist,
        include_str!("../../agent/src/cni/fixtures/10-bridge.conflist"),
    )
    .unwrap();
    let env = [
        ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ("MESHLET_POD_NAME", "meshlet-x7k2p"),
        ("MESHLET_POD_NAMESPACE", "meshlet-system"),
    ];
    let flags = [
        "--source",
        "kube",
        "--drain-deadline",
        "2s",
        "--cni-install",
        "--cni-bin-dir",
        bin.to_str().unwrap(),
        "--cni-conf-dir",
        conf.to_str().unwrap(),
    ];
    let pods = vec![
        cluster.pod("client").netns_cookie(),
        cluster.pod("server").netns_cookie(),
    ];
    let mut want = pods.clone();
    want.sort();
    let _echo = cluster.pod("server").echo_server(8080);
    let to_server = cluster.pod("server").addr(false, 8080);
    // The agent exits cleanly, saying capture stays, and both pods stay enrolled.
    let kept_capture = |mut agent: meshlet_tests::process::Agent| {
        assert!(agent.wait_exit(Duration::from_secs(20)).success());
        assert!(
            agent.log().contains("capture stays attached"),
            "{}",
            agent.log()
        );
        assert_eq!(meshlet_tests::enrolled(&cluster.bpffs_dir(0)), want);
    };

    // A restart (SIGTERM with the DaemonSet in place) keeps capture: fail closed, the pods'
    // connections are refused until the next agent serves them.
    let agent = cluster.start_agent_with_env(0, &flags, &env);
    agent.wait_for_log("watching the agent's DaemonSet", 1, Duration::from_secs(10));
    meshlet_tests::wait_enrolled(&cluster.bpffs_dir(0), want.clone(), Duration::from_secs(10));
    agent.wait_for_log("meshlet-cni chained", 1, Duration::from_secs(10));
    cluster
        .pod("client")
        .connect(to_server, 1024)
        .assert_echoed(1024);
    agent.signal(libc::SIGTERM);
    kept_capture(agent);
    cluster
        .pod("client")
        .connect(to_server, 1024)
        .assert_failed(Outcome::Refused);

    // Deleted and created again (`--cascade=orphan`, to change an immutable field): the new
    // DaemonSet adopts the pod under its UID, and SIGTERM, reading again, keeps capture.
    let agent = cluster.start_agent_with_env(0, &flags, &env);
    agent.wait_for_log("initial enrollment pass done", 1, Duration::from_secs(10));
    api.delete("DaemonSet", "meshlet-system", "meshlet");
    agent.wait_for_log(
        "this agent is being removed from the node",
        1,
        Duration::from_secs(10),
    );
    run_by_a_daemonset();
    agent.signal(libc::SIGTERM);
    agent.wait_for_log("runs it after all", 1, Duration::from_secs(10));
    kept_capture(agent);

    // The DaemonSet deleted: SIGTERM releases capture, and the pods talk directly.
    let mut agent = cluster.start_agent_with_env(0, &flags, &env);
    agent.wait_for_log("initial enrollment pass done", 1, Duration::from_secs(10));
    cluster
        .pod("client")
        .connect(to_server, 1024)
        .assert_echoed(1024);
    api.delete("DaemonSet", "meshlet-system", "meshlet");
    agent.wait_for_log(
        "this agent is being removed from the node",
        1,
        Duration::from_secs(10),
    );
    // Removal alone changes nothing while the agent runs (orphaned pods keep serving).
    assert!(cluster.bpffs_dir(0).join("links").exists());
    agent.signal(libc::SIGTERM);
    agent.wait_for_log("capture released", 1, Duration::from_secs(10));
    // Released while the agent still serves: new connections go direct at once.
    cluster
        .pod("client")
        .connect(to_server, 1024)
        .assert_echoed(1024);
    assert!(agent.wait_exit(Duration::from_secs(20)).success());
    let log = agent.log();
    assert!(
        log.contains("the agent's DaemonSet was deleted") && log.contains("capture released"),
        "{log}"
    );
    cluster
        .pod("client")
        .connect(to_server, 1024)
        .assert_echoed(1024);
    // Nothing left: no program at the cgroup root, no pins, meshlet-cni unchained and removed.
    meshlet_tests::assert_nothing_attached(&cluster.cgroup_root(0), &cluster.bpffs_dir(0));
    assert!(!cluster.bpffs_dir(0).exists(), "pins left");
    for pod in ["client", "server"] {
        let links = meshlet_tests::sk_lookup_links(&cluster.pod(pod).netns.path());
        assert_eq!(links, 0, "{pod}: sk_lookup still attached");
    }
    let chained = std::fs::read_to_string(&conflist).unwrap();
    assert!(!chained.contains("meshlet-cni"), "{chained}");
    assert!(!bin.join("meshlet-cni").exists());
    let _ = std::fs::remove_dir_all(&cni_dir);
    let _ = std::fs::remove_file(&kubeconfig);
}

#[test]
fn another_program_at_captures_hooks_stops_the_agent_before_it_attaches_anything() {
    use meshlet_tests::bpf::{Attach, ForeignProgram};
    meshlet_tests::require_root();
    let cluster = meshlet_tests::Cluster::new(1);
    // Another mesh's connect4 program on the node's cgroup root.
    let foreign = ForeignProgram::connect4(&cluster.cgroup_root(0), "other_mesh4", Attach::Link);
    let file = std::env::temp_dir().join(format!("{}-workloads.yaml", cluster.id()));
    meshlet_tests::write_workloads(&file, &[meshlet_tests::namespace_manifest("demo", &[])]);
    let source = format!("file:{}", file.display());
    let mut agent = cluster.start_agent(0, &["--source", &source]);
    let status = agent.wait_exit(Duration::from_secs(20));
    let log = agent.log();
    assert!(
        !status.success(),
        "the agent ran beside another mesh: {log}"
    );
    assert!(
        log.contains("this node cannot run the agent")
            && log.contains(&format!(
                "program \"other_mesh4\" (id {}) is not meshlet's",
                foreign.id()
            )),
        "the error names the program: {log}"
    );
    let attached = bpftool(&["cgroup", "show", cluster.cgroup_root(0).to_str().unwrap()]);
    let names: Vec<&str> = attached
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["other_mesh4"], "meshlet attached beside it");
    assert!(
        !cluster.bpffs_dir(0).join("links").exists(),
        "capture was pinned"
    );

    // Allowed by name (Cilium's socket LB in host-namespace-only mode, say), the agent runs.
    drop(agent);
    let mut agent = cluster.start_agent(
        0,
        &["--source", &source, "--allow-cgroup-program", "other_mesh4"],
    );
    agent.wait_for_log("initial enrollment pass done", 1, Duration::from_secs(20));
    assert!(agent.log().contains("agent serving"), "{}", agent.log());
    agent.stop();
    let _ = std::fs::remove_file(&file);
}
