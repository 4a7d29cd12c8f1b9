//! The HBONE tunnel end to end: two nodes, an agent per node, pods enrolled through the
//! workload file. Mesh traffic crosses the node link only as TLS on port 15008, in both
//! directions, for small and large transfers and many concurrent connections; the 15008 server
//! refuses bad clients and bad requests and keeps serving everyone else.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshlet::identity::{self, Ca, Identity};
use meshlet_tests::{
    mesh::FileMesh,
    process::testpod_binary,
    raw_hbone::{RawHbone, Refusal, connect_in},
};

/// client + neighbour... on the nodes given, all in namespace `demo` (ambient), bystander in
/// `legacy` (not), agents on both nodes, everything enrolled.
fn mesh() -> FileMesh {
    let service = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "server", "namespace": "demo"},
        "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "server"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    });
    FileMesh::client_server(&[("neighbour", 1)], vec![service])
}

#[test]
fn mesh_traffic_crosses_the_node_link_only_as_tls_for_any_size_and_many_connections() {
    let mesh = mesh();
    let cluster = &mesh.cluster;
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let _echo = server.echo_server(8080);

    let link = cluster.capture_link();
    client.connect(server.addr(false, 8080), 1).assert_echoed(1);
    client
        .connect(server.addr(false, 8080), 1024 * 1024)
        .assert_echoed(1024 * 1024);
    client
        .connect(server.addr(true, 8080), 1024 * 1024)
        .assert_echoed(1024 * 1024);
    let wire = link.finish();
    assert!(wire.hbone_packets > 100, "{wire:?}");
    assert_eq!(
        wire.hbone_packets, wire.packets,
        "mesh traffic left the tunnel: {wire:?}"
    );
    assert!(
        !wire.plaintext_seen,
        "the application's bytes crossed the link in clear: {wire:?}"
    );

    // The same detector sees plaintext when there is some: a pod outside the mesh.
    let link = cluster.capture_link();
    cluster
        .pod("bystander")
        .connect(server.addr(false, 8080), 64 * 1024)
        .assert_echoed(64 * 1024);
    let wire = link.finish();
    assert!(
        wire.plaintext_seen,
        "the capture cannot see plaintext: {wire:?}"
    );
    assert_eq!(wire.hbone_packets, 0, "{wire:?}");

    // 1,000 concurrent connections, through pooled HBONE connections.
    let mut many = client.command(testpod_binary());
    many.args([
        "connect-many",
        "--to",
        &server.addr(false, 8080).to_string(),
        "--count",
        "1000",
        "--send",
        "4096",
    ]);
    let out = many.output().unwrap();
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if result["ok"] != 1000 {
        // Say which side refused, and why, before failing.
        let refusals: Vec<String> = (0..2)
            .flat_map(|node| {
                cluster
                    .scrape(node)
                    .samples
                    .into_iter()
                    .filter(|s| {
                        s.metric == "meshlet_proxy_limit_total"
                            || (s.metric == "istio_tcp_connections_closed_total"
                                && s.labels.get("response_flags") != Some("-"))
                    })
                    .map(move |s| format!("node-{node}: {} {:?} {:?}", s.metric, s.labels, s.value))
            })
            .collect();
        let warnings: Vec<String> = mesh
            .agents
            .iter()
            .flat_map(|a| {
                a.log()
                    .lines()
                    .filter(|l| l.contains("WARN"))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .take(20)
            .collect();
        panic!("{result}\nrefusals: {refusals:#?}\nagent warnings: {warnings:#?}");
    }

    // 1 GiB one way and back.
    let start = Instant::now();
    client
        .connect(server.addr(false, 8080), 1 << 30)
        .assert_echoed(1 << 30);
    eprintln!("1 GiB echoed through HBONE in {:?}", start.elapsed());
}

/// The TCP sockets of `pod`'s namespace (`ss -tan`).
fn sockets_of(cluster: &meshlet_tests::Cluster, pod: &str) -> String {
    let out = cluster
        .pod(pod)
        .command("ss")
        .arg("-tan")
        .output()
        .expect("run ss");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn same_node_mesh_traffic_skips_the_tunnel_but_meets_policy_and_is_recorded() {
    let mesh = mesh();
    let cluster = &mesh.cluster;
    let _echo = cluster.pod("server").echo_server(8080);
    let server = cluster.pod("server").addr(false, 8080);
    let hbone_port = format!("{}:15008", server.ip());
    cluster
        .pod("neighbour")
        .connect(server, 2048)
        .assert_echoed(2048);
    // Both ends are on node-1: its agent records the connection as client (outbound) and as
    // server (inbound, with the neighbour's identity), as for a tunnel.
    mesh.agents[1].wait_for_log(
        "src_identity=spiffe://cluster.local/ns/demo/sa/neighbour",
        2,
        Duration::from_secs(20),
    );
    let log = mesh.agents[1].log();
    let records: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("src_identity=spiffe://cluster.local/ns/demo/sa/neighbour"))
        .collect();
    assert!(
        records.iter().any(|l| l.contains("direction=outbound"))
            && records.iter().any(|l| l.contains("direction=inbound")),
        "{records:#?}"
    );
    // No tunnel: nothing of the neighbour's namespace ever reached the server's 15008 (a
    // pooled HBONE connection would still be open), while the client on node-0 tunnels there.
    let sockets = sockets_of(cluster, "neighbour");
    assert!(!sockets.contains(&hbone_port), "{sockets}");
    cluster.pod("client").connect(server, 16).assert_echoed(16);
    let sockets = sockets_of(cluster, "client");
    assert!(sockets.contains(&hbone_port), "{sockets}");

    // Policy applies as on the tunnel: the neighbour's identity denied, the client's not.
    mesh.write(&[serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-neighbour", "namespace": "demo"},
        "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "DENY",
                 "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/neighbour"]}}]}]}
    })]);
    cluster
        .pod("neighbour")
        .connect(server, 16)
        .assert_failed(meshlet_tests::process::Outcome::Reset);
    cluster.pod("client").connect(server, 16).assert_echoed(16);
    mesh.agents[1].wait_for_log("response_flags=DENY", 1, Duration::from_secs(10));
}

/// `(local, peer, congestion control)` of each established TCP socket of `pod`'s namespace, as
/// `ss -tni` shows them.
fn congestion_controls(
    cluster: &meshlet_tests::Cluster,
    pod: &str,
) -> Vec<(String, String, String)> {
    let out = cluster
        .pod(pod)
        .command("ss")
        .args(["-Htni", "state", "established"])
        .output()
        .expect("run ss");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut sockets = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let info = lines.next().unwrap_or_default();
        let algorithm = info
            .split_whitespace()
            .find(|word| ["cubic", "reno", "bbr"].contains(word))
            .unwrap_or_else(|| panic!("no congestion control in {info:?}"));
        sockets.push((
            fields[fields.len() - 2].to_owned(),
            fields[fields.len() - 1].to_owned(),
            algorithm.to_owned(),
        ));
    }
    sockets
}

#[test]
fn on_node_legs_do_not_pace_and_the_tunnel_has_the_flags_congestion_control() {
    // Both pods' namespaces default to BBR (which paces; the kernel needs tcp_bbr) before the
    // agents start. node-0's agent is told to use reno on the tunnel; node-1's keeps the
    // namespace's default.
    let mut cluster = meshlet_tests::Cluster::new(2);
    for (name, node) in [("client", 0), ("server", 1)] {
        cluster.add_pod(name, node);
        cluster
            .pod(name)
            .netns
            .sysctl("net/ipv4/tcp_congestion_control", "bbr");
    }
    let mesh = FileMesh::layout_on(
        cluster,
        &[("client", 0), ("server", 1)],
        &[],
        vec![],
        |_, node| match node {
            0 => vec!["--tunnel-congestion-control".into(), "reno".into()],
            _ => vec![],
        },
    );
    let cluster = &mesh.cluster;
    let _echo = cluster.pod("server").echo_server(8080);
    let held = cluster
        .pod("client")
        .hold(cluster.pod("server").addr(false, 8080));

    let of = |pod: &str, wanted: &dyn Fn(&str, &str) -> bool| -> Vec<String> {
        let sockets = congestion_controls(cluster, pod);
        let found: Vec<String> = sockets
            .iter()
            .filter(|(local, peer, _)| wanted(local, peer))
            .map(|(.., algorithm)| algorithm.clone())
            .collect();
        assert!(!found.is_empty(), "no such socket in {pod}: {sockets:?}");
        found
    };
    let port = |addr: &str, port: &str| addr.rsplit(':').next() == Some(port);
    // node-0: the client's own socket keeps its namespace's BBR; the agent's end of that
    // loopback leg does not pace; the tunnel is reno.
    assert_eq!(of("client", &|_, peer| port(peer, "15001")), ["bbr"]);
    assert_eq!(of("client", &|local, _| port(local, "15001")), ["cubic"]);
    assert_eq!(of("client", &|_, peer| port(peer, "15008")), ["reno"]);
    // node-1: the tunnel's accepted end keeps the namespace's BBR (that agent's default); the
    // agent's connection to the application does not pace; the application's accepted socket
    // keeps BBR.
    assert_eq!(of("server", &|local, _| port(local, "15008")), ["bbr"]);
    assert_eq!(of("server", &|_, peer| port(peer, "8080")), ["cubic"]);
    assert_eq!(of("server", &|local, _| port(local, "8080")), ["bbr"]);
    held.release().assert_echoed(10);
}

#[test]
fn service_vips_resolve_to_an_endpoint_and_non_mesh_destinations_pass_through() {
    let mesh = mesh();
    let cluster = &mesh.cluster;
    let _server = cluster.pod("server").echo_server(8080);
    let _bystander = cluster.pod("bystander").echo_server(8080);
    let client = cluster.pod("client");

    // The Service's cluster IP exists nowhere on the network: only the proxy can resolve it.
    client
        .connect("10.96.0.10:80".parse().unwrap(), 4096)
        .assert_echoed(4096);
    mesh.agents[0].wait_for_log("dst=10.96.0.10:80", 1, Duration::from_secs(10));
    let log = mesh.agents[0].log();
    let line = log
        .lines()
        .find(|l| l.contains("dst=10.96.0.10:80"))
        .unwrap();
    assert!(
        line.contains("protocol=HBONE")
            && line.contains("dst_identity=spiffe://cluster.local/ns/demo/sa/server"),
        "{line}"
    );

    // A pod outside the mesh is reached directly, in plaintext.
    client
        .connect(cluster.pod("bystander").addr(false, 8080), 4096)
        .assert_echoed(4096);
    let bystander = cluster.pod("bystander").addr(false, 8080).to_string();
    mesh.agents[0].wait_for_log(&format!("dst={bystander}"), 1, Duration::from_secs(10));
    let log = mesh.agents[0].log();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("dst={bystander}")))
        .unwrap();
    assert!(line.contains("protocol=TCP"), "{line}");
}

const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hbone_server_refuses_bad_clients_and_requests_and_keeps_serving() {
    let mesh = tokio::task::spawn_blocking(mesh).await.unwrap();
    let cluster = &mesh.cluster;
    let server = cluster.pod("server");
    let _echo = server.echo_server(8080);
    let raw = RawHbone::new(cluster, cluster.node(0).netns.open());
    let hbone = SocketAddr::new(server.ipv4.into(), 15008);
    let good = raw.config(CLIENT, SERVER);

    // The good case first, so the refusals below are refusals.
    assert_eq!(
        raw.connect(hbone, good.clone(), &server.addr(false, 8080).to_string())
            .await,
        StatusCode::OK
    );
    // Malformed or forbidden CONNECTs: 400, and the connection stays usable.
    for authority in [
        "not-an-ip:8080",
        "10.244.1.11",
        &server.addr(false, 15008).to_string(),
        &cluster.pod("client").addr(false, 8080).to_string(),
    ] {
        assert_eq!(
            raw.connect(hbone, good.clone(), authority).await,
            StatusCode::BAD_REQUEST,
            "CONNECT {authority}"
        );
    }
    // Nothing listens on 9: the application refused, 503.
    assert_eq!(
        raw.connect(hbone, good.clone(), &server.addr(false, 9).to_string())
            .await,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // The server must present the destination's identity: a client expecting another refuses.
    let err = raw
        .tls(
            hbone,
            raw.config(CLIENT, "spiffe://cluster.local/ns/demo/sa/impostor"),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("spiffe://cluster.local/ns/demo/sa/server"),
        "{err}"
    );

    // A client with no certificate, or one from another root: refused by the server.
    assert_eq!(
        raw.try_handshake(hbone, good.clone()).await,
        Ok(()),
        "the good client"
    );
    assert_eq!(
        raw.try_handshake(hbone, raw.config_without_certificate())
            .await,
        Err(Refusal::Alert("CertificateRequired".into())),
        "a client without a certificate"
    );
    let other_root = Ca::generate_dev(identity::DEFAULT_TRUST_DOMAIN).unwrap();
    let foreign = other_root
        .issue(
            &Identity::parse(CLIENT).unwrap(),
            std::time::SystemTime::now(),
            Duration::from_secs(3600),
        )
        .unwrap();
    let foreign = identity::client_config(
        &foreign,
        Identity::parse(SERVER).unwrap(),
        raw.roots.clone(),
    )
    .unwrap();
    assert_eq!(
        raw.try_handshake(hbone, foreign).await,
        // Both development roots carry the same subject, so the chain is built and its
        // signature check fails: rustls answers `decrypt_error`.
        Err(Refusal::Alert("DecryptError".into())),
        "a client of another root"
    );

    // A peer that connects and says nothing is dropped after the handshake timeout, and
    // holds nothing meanwhile that stops others.
    let stalled = connect_in(&raw.netns, hbone).await.unwrap();
    assert_eq!(
        raw.connect(hbone, good.clone(), &server.addr(false, 8080).to_string())
            .await,
        StatusCode::OK
    );
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        stalled.readable().await.unwrap();
        stalled.try_read(&mut buf)
    })
    .await
    .expect("a stalled handshake was never closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");

    // A peer opening 10,000 streams on one connection gets at most 100 at a time; the agent
    // answers all without falling over, and others are still served.
    let tls = raw.tls(hbone, good.clone()).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let streams: Vec<_> = (0..10_000)
        .map(|_| {
            let mut sender = sender.clone();
            let request = Request::builder()
                .method(Method::CONNECT)
                .uri("garbage")
                .body(Empty::<Bytes>::new())
                .unwrap();
            tokio::spawn(async move { sender.send_request(request).await.map(|r| r.status()) })
        })
        .collect();
    // Every stream gets an answer: 400 (the authority is garbage), or, at worst, a stream-level
    // refusal from the HTTP/2 layer; none hangs.
    let (mut answered, mut refused) = (0, Vec::new());
    for stream in streams {
        match tokio::time::timeout(Duration::from_secs(30), stream).await {
            Ok(Ok(Ok(StatusCode::BAD_REQUEST))) => answered += 1,
            Ok(Ok(Err(err))) => refused.push(err.to_string()),
            outcome => panic!("a stream hung or got an unexpected answer: {outcome:?}"),
        }
    }
    assert!(
        answered >= 9_900,
        "{answered} of 10,000 answered; refused: {refused:?}"
    );
    assert_eq!(
        raw.connect(hbone, good, &server.addr(false, 8080).to_string())
            .await,
        StatusCode::OK
    );
}
