//! The Kubernetes source end to end: the real agent, configured by an ordinary kubeconfig,
//! watches a stand-in API server that speaks the real wire protocol, and enrolls what the
//! cluster says, through lost watches, `410 Gone` and an API server restart.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use meshlet::{
    source::{self, SyncState},
    workload::Store,
};
use meshlet_tests::{Cluster, enrolled, kube_api::ApiServer, namespace_manifest, wait_enrolled};

const AMBIENT: (&str, &str) = ("meshlet.io/dataplane-mode", "ambient");

fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The status of `GET /healthz/ready` at `addr` (an agent in this process's namespace).
fn ready(addr: std::net::SocketAddr) -> u16 {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    let _ = write!(stream, "GET /healthz/ready HTTP/1.0\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The pod's redirection annotation, when meshlet's and Istio's agree (`Some("mixed")` when
/// they do not).
fn redirection_annotation(api: &ApiServer, pod: &str) -> Option<String> {
    let pod = api.get("Pod", "demo", pod)?;
    let annotations = &pod["metadata"]["annotations"];
    let meshlet = annotations["meshlet.io/redirection"].as_str();
    let istio = annotations["ambient.istio.io/redirection"].as_str();
    if meshlet == istio {
        meshlet.map(str::to_owned)
    } else {
        Some("mixed".to_owned())
    }
}

#[test]
fn the_kube_source_enrolls_labelled_pods_and_recovers_from_a_lost_watch() {
    let mut cluster = Cluster::new(2);
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 1);
    cluster.add_pod("late", 0);
    let api = ApiServer::start();
    let kubeconfig = std::env::temp_dir().join(format!("{}-kubeconfig", cluster.id()));
    api.write_kubeconfig(&kubeconfig);
    let env = [("KUBECONFIG", kubeconfig.to_str().unwrap())];
    api.apply(namespace_manifest("demo", &[]));
    api.apply(cluster.pod("client").manifest("demo", &[("app", "client")]));
    api.apply(cluster.pod("server").manifest("demo", &[("app", "server")]));

    let node0 = cluster.start_agent_with_env(0, &["--source", "kube"], &env);
    let node1 = cluster.start_agent_with_env(1, &["--source", "kube"], &env);
    // "Nothing enrolled" means something only once the first enrollment pass has run.
    node0.wait_for_log("initial enrollment pass done", 1, Duration::from_secs(10));
    node1.wait_for_log("initial enrollment pass done", 1, Duration::from_secs(10));
    assert!(enrolled(&cluster.bpffs_dir(0)).is_empty());

    // kubectl label namespace demo meshlet.io/dataplane-mode=ambient
    api.apply(namespace_manifest("demo", &[AMBIENT]));
    let took = wait_enrolled(
        &cluster.bpffs_dir(0),
        vec![cluster.pod("client").netns_cookie()],
        Duration::from_secs(5),
    );
    wait_enrolled(
        &cluster.bpffs_dir(1),
        vec![cluster.pod("server").netns_cookie()],
        Duration::from_secs(5),
    );
    eprintln!("labelled namespace -> pod enrolled in {took:?}");
    assert!(took < Duration::from_secs(1), "enrollment took {took:?}");
    wait_for(
        "redirection annotation on the client",
        Duration::from_secs(5),
        || redirection_annotation(&api, "client").as_deref() == Some("enabled"),
    );
    let patches = api.patches();
    assert!(
        patches
            .iter()
            .any(|(path, _)| path == "/api/v1/namespaces/demo/pods/client"),
        "{patches:?}"
    );
    let _echo = cluster.pod("server").echo_server(8080);
    cluster
        .pod("client")
        .connect(cluster.pod("server").addr(false, 8080), 4096)
        .assert_echoed(4096);

    // The API server goes away; while it is gone the client pod is deleted and a new pod is
    // created; the history is compacted, so resuming the watch gets 410 Gone and the agent
    // must list again.
    let readiness = node0.endpoint("readiness");
    assert_eq!(ready(readiness), 200, "ready once synced");
    api.stop();
    wait_for(
        "readiness 503 while the API server is gone",
        Duration::from_secs(15),
        || ready(readiness) == 503,
    );
    api.delete("Pod", "demo", "client");
    api.apply(cluster.pod("late").manifest("demo", &[("app", "late")]));
    api.compact();
    api.restart();
    wait_enrolled(
        &cluster.bpffs_dir(0),
        vec![cluster.pod("late").netns_cookie()],
        Duration::from_secs(20),
    );
    assert_eq!(
        enrolled(&cluster.bpffs_dir(1)),
        vec![cluster.pod("server").netns_cookie()],
        "node-1 lost its pod"
    );
    wait_for(
        "readiness back to 200 after the relist",
        Duration::from_secs(15),
        || ready(readiness) == 200,
    );
    wait_for(
        "redirection annotation on the pod enrolled after the relist",
        Duration::from_secs(5),
        || redirection_annotation(&api, "late").as_deref() == Some("enabled"),
    );

    // The watch drops again, with no compaction: the agent resumes and follows changes.
    api.drop_watches();
    api.apply(namespace_manifest("demo", &[]));
    wait_enrolled(&cluster.bpffs_dir(0), vec![], Duration::from_secs(10));
    wait_enrolled(&cluster.bpffs_dir(1), vec![], Duration::from_secs(10));
    wait_for(
        "redirection annotation removed",
        Duration::from_secs(5),
        || redirection_annotation(&api, "late").is_none(),
    );

    // A namespace labelled for Istio ambient is captured as well (migration, node by node).
    api.apply(namespace_manifest(
        "demo",
        &[("istio.io/dataplane-mode", "ambient")],
    ));
    wait_enrolled(
        &cluster.bpffs_dir(0),
        vec![cluster.pod("late").netns_cookie()],
        Duration::from_secs(10),
    );
    wait_for(
        "both redirection annotations on the pod Istio's label enrolled",
        Duration::from_secs(5),
        || redirection_annotation(&api, "late").as_deref() == Some("enabled"),
    );

    // Istio's opt-out on the pod itself wins over its namespace's label. The pod is changed as
    // kubectl label would, so the annotations written go only if the agent removes them.
    let mut late = api.get("Pod", "demo", "late").expect("pod late");
    late["metadata"]["labels"]["istio.io/dataplane-mode"] = "none".into();
    api.apply(late);
    wait_enrolled(&cluster.bpffs_dir(0), vec![], Duration::from_secs(10));
    wait_for(
        "redirection annotations removed from the pod that opted out",
        Duration::from_secs(5),
        || redirection_annotation(&api, "late").is_none(),
    );
    let _ = std::fs::remove_file(&kubeconfig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_source_and_the_kube_source_build_the_same_store() {
    let objects = vec![
        namespace_manifest("demo", &[AMBIENT]),
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "demo", "uid": "u-web-1", "labels": {"app": "web"}},
            "spec": {"nodeName": "node-0", "serviceAccountName": "web", "containers": [{"name": "app", "image": "web"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.244.0.10"}, {"ip": "fd00:10:244::a"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }),
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "agent", "namespace": "kube-system", "uid": "u-agent"},
            "spec": {"nodeName": "node-1", "hostNetwork": true, "containers": [{"name": "a", "image": "a"}]},
            "status": {"phase": "Running", "podIP": "172.18.0.3"}
        }),
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "demo"},
            "spec": {"clusterIPs": ["10.96.0.10"], "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }),
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abcde", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.244.0.10"], "conditions": {"ready": true},
                           "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "demo"}}]
        }),
        serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "allow-client", "namespace": "demo"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
                     "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}]}
        }),
        serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": "istio-system"},
            "spec": {"mtls": {"mode": "STRICT"}}
        }),
    ];

    let from_file = Store::new();
    source::file::apply(
        &from_file,
        source::file::parse(&meshlet_tests::to_yaml(&objects)).unwrap(),
    );

    let api = ApiServer::start();
    for object in &objects {
        api.apply(object.clone());
    }
    let from_kube = Arc::new(Store::new());
    let sync = Arc::new(SyncState::default());
    let task = tokio::spawn(source::kube::run(
        api.client().await,
        from_kube.clone(),
        sync.clone(),
    ));
    tokio::time::timeout(
        Duration::from_secs(10),
        sync.subscribe().wait_for(|synced| *synced),
    )
    .await
    .expect("the kube source did not sync")
    .unwrap();
    task.abort();

    assert_eq!(from_kube.dump(), from_file.dump());
    assert_eq!(from_kube.counts().values().sum::<usize>(), objects.len());
    assert_eq!(
        from_kube
            .service_by_vip("10.96.0.10:80".parse().unwrap())
            .unwrap()
            .1
            .to_vec(),
        vec!["10.244.0.10:8080".parse().unwrap()]
    );
}
