//! Workloads end to end: the real `meshlet agent` on each node learns pods from a workload file
//! (the same Kubernetes objects a cluster holds), enrolls the labelled ones through real
//! discovery (the pod's cgroup -> a process -> its network namespace) and real capture, and
//! carries their traffic through its in-pod listeners.

use std::{path::PathBuf, time::Duration};

use meshlet::capture::Pinned;
use meshlet_tests::{Cluster, enrolled, namespace_manifest, wait_enrolled, write_workloads};

const AMBIENT: (&str, &str) = ("meshlet.io/dataplane-mode", "ambient");
const OPT_OUT: (&str, &str) = ("meshlet.io/dataplane-mode", "none");

fn workload_file(cluster: &Cluster) -> PathBuf {
    std::env::temp_dir().join(format!("{}-workloads.yaml", cluster.id()))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn labelling_a_namespace_enrolls_its_pods_and_unlabelling_releases_them() {
    let mut cluster = Cluster::new(2);
    cluster.add_pod("client", 0);
    cluster.add_pod("loner", 0);
    cluster.add_pod("server", 1);
    let file = workload_file(&cluster);
    let _cleanup = RemoveOnDrop(file.clone());
    fn objects(
        cluster: &Cluster,
        ns_labels: &[(&str, &str)],
        extra: Vec<serde_json::Value>,
    ) -> Vec<serde_json::Value> {
        let mut objects = vec![
            namespace_manifest("demo", ns_labels),
            cluster
                .pod("client")
                .mesh_manifest("demo", &[("app", "client")]),
            cluster
                .pod("loner")
                .manifest("demo", &[("app", "loner"), OPT_OUT]),
            cluster
                .pod("server")
                .mesh_manifest("demo", &[("app", "server")]),
        ];
        // A hostNetwork pod on node-0, labelled: never enrolled.
        let mut host = cluster.pod("client").manifest("demo", &[AMBIENT]);
        host["metadata"]["name"] = "host-agent".into();
        host["metadata"]["uid"] = "host-agent-uid".into();
        host["spec"]["hostNetwork"] = true.into();
        host["status"]["podIPs"] = serde_json::json!([{ "ip": cluster.node(0).ipv4.to_string() }]);
        objects.push(host);
        objects.extend(extra);
        objects
    }
    write_workloads(&file, &objects(&cluster, &[], vec![]));
    let source = format!("file:{}", file.display());
    let node0 = cluster.start_agent(0, &["--source", &source]);
    let node1 = cluster.start_agent(1, &["--source", &source]);
    // "Nothing enrolled" means something only once the first enrollment pass has run.
    node0.wait_for_log("initial enrollment pass done", 1, Duration::from_secs(10));
    node1.wait_for_log("initial enrollment pass done", 1, Duration::from_secs(10));
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let _echo = server.echo_server(8080);
    assert!(
        enrolled(&cluster.bpffs_dir(0)).is_empty(),
        "nothing is labelled yet"
    );

    // Label the namespace: client (node-0) and server (node-1) are enrolled, the opted-out pod
    // and the hostNetwork pod are not.
    write_workloads(&file, &objects(&cluster, &[AMBIENT], vec![]));
    let took = wait_enrolled(
        &cluster.bpffs_dir(0),
        vec![client.netns_cookie()],
        Duration::from_secs(5),
    );
    wait_enrolled(
        &cluster.bpffs_dir(1),
        vec![server.netns_cookie()],
        Duration::from_secs(5),
    );
    eprintln!("labelled namespace -> pod enrolled in {took:?}");
    assert!(took < Duration::from_secs(1), "enrollment took {took:?}");

    // Traffic goes through both agents' in-pod listeners, and still arrives.
    let before = (
        Pinned::open(&cluster.bpffs_dir(0))
            .unwrap()
            .redirects()
            .unwrap(),
        Pinned::open(&cluster.bpffs_dir(1))
            .unwrap()
            .redirects()
            .unwrap(),
    );
    client
        .connect(server.addr(false, 8080), 64 * 1024)
        .assert_echoed(64 * 1024);
    client
        .connect(server.addr(true, 8080), 1000)
        .assert_echoed(1000);
    let after = (
        Pinned::open(&cluster.bpffs_dir(0))
            .unwrap()
            .redirects()
            .unwrap(),
        Pinned::open(&cluster.bpffs_dir(1))
            .unwrap()
            .redirects()
            .unwrap(),
    );
    assert_eq!(
        after.0.outbound - before.0.outbound,
        2,
        "client connects captured on node-0"
    );
    // Mesh to mesh: the client's agent tunnels to the server pod's 15008 (never steered).
    assert_eq!(
        after.1.inbound, before.1.inbound,
        "HBONE arrives on 15008, never steered"
    );
    node0.wait_for_log("protocol=HBONE", 2, Duration::from_secs(5));
    node1.wait_for_log("protocol=HBONE", 2, Duration::from_secs(5));
    let admitted = node1.log();
    assert!(
        admitted.contains("src_identity=spiffe://cluster.local/ns/demo/sa/client"),
        "node-1 did not see the client's identity:\n{admitted}"
    );

    // A pod that starts later is enrolled as soon as its namespace (a process) appears.
    cluster.add_pod("late", 0);
    let late = cluster.pod("late");
    let late_manifest = late.manifest("demo", &[("app", "late")]);
    write_workloads(&file, &objects(&cluster, &[AMBIENT], vec![late_manifest]));
    let took = wait_enrolled(
        &cluster.bpffs_dir(0),
        vec![cluster.pod("client").netns_cookie(), late.netns_cookie()],
        Duration::from_secs(5),
    );
    assert!(
        took < Duration::from_secs(1),
        "late pod enrollment took {took:?}"
    );

    // Remove the label: every pod is released, traffic goes direct.
    write_workloads(&file, &objects(&cluster, &[], vec![]));
    wait_enrolled(&cluster.bpffs_dir(0), vec![], Duration::from_secs(5));
    wait_enrolled(&cluster.bpffs_dir(1), vec![], Duration::from_secs(5));
    let client = cluster.pod("client");
    let server = cluster.pod("server");
    let before = Pinned::open(&cluster.bpffs_dir(0))
        .unwrap()
        .redirects()
        .unwrap();
    client
        .connect(server.addr(false, 8080), 10)
        .assert_echoed(10);
    assert_eq!(
        Pinned::open(&cluster.bpffs_dir(0))
            .unwrap()
            .redirects()
            .unwrap(),
        before
    );
    node0.wait_for_log("pod unenrolled", 2, Duration::from_secs(5));
    assert!(
        !node0.log().contains("loner"),
        "the opted-out pod was acted on:\n{}",
        node0.log()
    );
    assert!(
        !node0.log().contains("host-agent"),
        "the hostNetwork pod was acted on:\n{}",
        node0.log()
    );
}

#[test]
fn a_bad_workload_file_keeps_the_last_good_state_and_says_what_is_wrong() {
    let mut cluster = Cluster::new(1);
    cluster.add_pod("app", 0);
    let file = workload_file(&cluster);
    let _cleanup = RemoveOnDrop(file.clone());
    let good = vec![
        namespace_manifest("demo", &[AMBIENT]),
        cluster.pod("app").manifest("demo", &[]),
    ];
    write_workloads(&file, &good);
    let agent = cluster.start_agent(0, &["--source", &format!("file:{}", file.display())]);
    let cookie = cluster.pod("app").netns_cookie();
    wait_enrolled(&cluster.bpffs_dir(0), vec![cookie], Duration::from_secs(5));

    let before = cluster.generation(0);
    let mut bad = good.clone();
    bad[1]["spec"]["nodeName"] = serde_json::json!(["node-0"]);
    write_workloads(&file, &bad);
    agent.wait_for_log("workload file rejected", 1, Duration::from_secs(5));
    assert!(
        agent
            .log()
            .contains("document 2 (Pod demo/app): spec.nodeName: invalid type"),
        "{}",
        agent.log()
    );
    std::fs::write(&file, "kind: [unclosed\n").unwrap();
    agent.wait_for_log("workload file rejected", 2, Duration::from_secs(5));
    assert_eq!(
        cluster.generation(0).store,
        before.store,
        "a rejected file must not touch the store"
    );
    cluster.wait_applied(0);
    assert_eq!(
        enrolled(&cluster.bpffs_dir(0)),
        vec![cookie],
        "a bad file must not unenroll anything"
    );

    // Fixed again: the agent carries on from the new content.
    write_workloads(
        &file,
        &[
            namespace_manifest("demo", &[]),
            cluster.pod("app").manifest("demo", &[]),
        ],
    );
    wait_enrolled(&cluster.bpffs_dir(0), vec![], Duration::from_secs(5));
}

#[test]
fn a_pod_whose_processes_are_gone_is_released() {
    let mut cluster = Cluster::new(1);
    cluster.add_pod("app", 0);
    let file = workload_file(&cluster);
    let _cleanup = RemoveOnDrop(file.clone());
    write_workloads(
        &file,
        &[
            namespace_manifest("demo", &[AMBIENT]),
            cluster.pod("app").manifest("demo", &[]),
        ],
    );
    let agent = cluster.start_agent(0, &["--source", &format!("file:{}", file.display())]);
    wait_enrolled(
        &cluster.bpffs_dir(0),
        vec![cluster.pod("app").netns_cookie()],
        Duration::from_secs(5),
    );
    cluster.pod_mut("app").stop_processes();
    wait_enrolled(&cluster.bpffs_dir(0), vec![], Duration::from_secs(5));
    agent.wait_for_log("pod unenrolled", 1, Duration::from_secs(1));
}
