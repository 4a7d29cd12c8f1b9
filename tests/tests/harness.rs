//! The harness itself: pods reach each other across nodes over IPv4 and IPv6, processes land in
//! the pod's cgroup and namespace, and a cluster leaves nothing behind, even when a test panics.

use std::{fs, path::Path};

use meshlet_tests::Cluster;

#[test]
fn pods_on_different_nodes_reach_each_other_over_ipv4_and_ipv6() {
    let mut cluster = Cluster::new(2);
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 1);
    cluster.add_pod("neighbour", 1);
    let (client, server, neighbour) = (
        cluster.pod("client"),
        cluster.pod("server"),
        cluster.pod("neighbour"),
    );
    let mut echo = server.echo_server(8080);

    for ipv6 in [false, true] {
        let report = client.connect(server.addr(ipv6, 8080), 4096);
        report.assert_echoed(4096);
        let accepted = echo.next_accepted();
        assert_eq!(accepted.local.port(), 8080);
        // No NAT between pods: the server sees the client's own pod address.
        let client_ip = if ipv6 {
            client.ipv6.to_string()
        } else {
            format!("::ffff:{}", client.ipv4)
        };
        assert_eq!(accepted.peer.ip().to_string(), client_ip);
    }
    // Same node, through the node's routing.
    neighbour
        .connect(server.addr(false, 8080), 10)
        .assert_echoed(10);
}

#[test]
fn pod_processes_run_in_the_pods_cgroup_and_netns() {
    let mut cluster = Cluster::new(1);
    cluster.add_pod("app", 0);
    let pod = cluster.pod("app");
    let echo = pod.echo_server(9000);

    // kubelet's shape: <root>/kubepods/besteffort/pod<uid>/<container>
    let relative = pod
        .cgroup
        .strip_prefix(cluster.cgroup_root(0))
        .expect("pod cgroup under the root");
    let parts: Vec<_> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    assert_eq!(parts[..2], ["kubepods", "besteffort"]);
    assert_eq!(parts[2], format!("pod{}", pod.uid));
    assert_eq!(parts[3].len(), 64);

    let procs = fs::read_to_string(pod.cgroup.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|pid| pid == echo.pid().to_string()),
        "echo server not in the pod cgroup: {procs:?}"
    );
    let process_netns = fs::read_link(format!("/proc/{}/ns/net", echo.pid())).unwrap();
    let pod_netns = pod.in_netns(|| fs::read_link("/proc/thread-self/ns/net").unwrap());
    assert_eq!(process_netns, pod_netns);
    assert_ne!(
        pod_netns,
        fs::read_link("/proc/self/ns/net").unwrap(),
        "pod shares the host netns"
    );
}

#[test]
fn a_panicking_test_still_leaves_nothing_behind() {
    let mut names = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut cluster = Cluster::new(2);
        cluster.add_pod("doomed", 1);
        let pod = cluster.pod("doomed");
        let echo = pod.echo_server(7000);
        names = Some((
            cluster.id().to_owned(),
            cluster.cgroup_root(0).to_owned(),
            cluster.bpffs_dir(0).to_owned(),
            echo.pid(),
        ));
        fs::create_dir_all(cluster.bpffs_dir(0)).unwrap();
        std::mem::forget(echo); // even a leaked process must not keep the cluster alive
        panic!("test failure inside a cluster");
    }));
    assert!(result.is_err());
    let (id, cgroup_root, bpffs_dir, pid) = names.expect("cluster was built");
    let netns = fs::read_dir("/var/run/netns")
        .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        .unwrap_or_default();
    assert!(
        !netns.iter().any(|n| n.to_string_lossy().starts_with(&id)),
        "network namespaces left: {netns:?}"
    );
    assert!(
        !cgroup_root.parent().unwrap().exists(),
        "cgroup left: {}",
        cgroup_root.display()
    );
    assert!(
        !bpffs_dir.exists(),
        "bpffs dir left: {}",
        bpffs_dir.display()
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid),
        "pod process {pid} still running"
    );
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.split(' ').nth(2) == Some("Z"))
}

#[test]
fn teardown_removes_a_cluster_that_was_never_dropped() {
    let mut cluster = Cluster::new(1);
    cluster.add_pod("orphan", 0);
    let _echo = cluster.pod("orphan").echo_server(7001);
    let (id, base) = (
        cluster.id().to_owned(),
        cluster.cgroup_root(0).parent().unwrap().to_owned(),
    );
    std::mem::forget(cluster);
    assert!(base.exists());

    meshlet_tests::teardown(&id);
    assert!(!base.exists(), "cgroup left: {}", base.display());
    let netns: Vec<_> = fs::read_dir("/var/run/netns")
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        !netns.iter().any(|n| n.to_string_lossy().starts_with(&id)),
        "network namespaces left: {netns:?}"
    );
}
