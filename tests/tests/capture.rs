//! Capture, loaded for real into the kernel by the agent's capture module and attached to the
//! test cluster's cgroup root: what the programs see, and how attachments survive restarts.

use std::{path::Path, process::Command};

use meshlet::capture::{self, Attachment, Capture};
use meshlet_tests::Cluster;

fn install(cluster: &Cluster) -> Capture {
    let config = capture::Config::resolve(
        Some(cluster.cgroup_root().to_owned()),
        Some(cluster.bpffs_dir().to_owned()),
    )
    .expect("resolve capture config");
    Capture::install(config).expect("install capture")
}

/// The kernel's own list of programs attached to `cgroup` (bpftool), as (attach type, name).
fn attached(cgroup: &Path) -> Vec<(String, String)> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let programs: Vec<serde_json::Value> = if text.trim().is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(&text).unwrap()
    };
    programs
        .iter()
        .map(|p| {
            (
                p["attach_type"].as_str().unwrap_or_default().to_owned(),
                p["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn connect4_counts_connects_from_pods_under_the_cgroup_root_only() {
    let mut cluster = Cluster::new(2);
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 1);
    cluster.add_pod_outside_root("outsider", 0);
    let capture = install(&cluster);
    let (client, server, outsider) = (
        cluster.pod("client"),
        cluster.pod("server"),
        cluster.pod("outsider"),
    );
    let _echo = server.echo_server(8080);

    for _ in 0..3 {
        client
            .connect(server.addr(false, 8080), 64)
            .assert_echoed(64);
    }
    for _ in 0..2 {
        outsider
            .connect(server.addr(false, 8080), 64)
            .assert_echoed(64);
    }

    let counts = capture.connects().unwrap();
    assert_eq!(
        counts.get(&client.netns_cookie()),
        Some(&3),
        "connects of the pod under the root: {counts:?}"
    );
    assert_eq!(
        counts.get(&outsider.netns_cookie()),
        None,
        "a pod outside the root was seen: {counts:?}"
    );
    // Accepting is not connecting: the server pod made no connect.
    assert_eq!(counts.get(&server.netns_cookie()), None, "{counts:?}");
    assert_eq!(
        counts.len(),
        1,
        "only the client's namespace was counted: {counts:?}"
    );
}

#[test]
fn a_restarted_agent_adopts_the_pinned_attachment() {
    let mut cluster = Cluster::new(1);
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 0);
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let _echo = server.echo_server(8080);

    let first = install(&cluster);
    let link = first.programs()[0].link_id;
    assert_eq!(first.programs()[0].attachment, Attachment::Attached);
    client.connect(server.addr(false, 8080), 1).assert_echoed(1);
    drop(first); // the agent stops; the pins keep the program attached

    client.connect(server.addr(false, 8080), 1).assert_echoed(1);
    let second = install(&cluster);
    assert_eq!(second.programs()[0].attachment, Attachment::Adopted);
    assert_eq!(
        second.programs()[0].link_id,
        link,
        "the same link, not a new one"
    );
    assert_eq!(
        attached(cluster.cgroup_root()),
        [(
            "cgroup_inet4_connect".to_owned(),
            "meshlet_connect4".to_owned()
        )]
    );
    // Both connects were counted, including the one made while no agent ran.
    assert_eq!(
        second.connects().unwrap().get(&client.netns_cookie()),
        Some(&2)
    );
}

#[test]
fn uninstall_detaches_and_unpins_everything() {
    let mut cluster = Cluster::new(1);
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 0);
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let _echo = server.echo_server(8080);
    let capture = install(&cluster);
    client.connect(server.addr(false, 8080), 1).assert_echoed(1);
    drop(capture); // `meshlet uninstall` runs after the agent has stopped
    assert_eq!(
        attached(cluster.cgroup_root()).len(),
        1,
        "the pin keeps capture attached"
    );

    let removed = capture::uninstall(cluster.bpffs_dir()).unwrap();
    assert_eq!(removed, capture::Uninstalled { links: 1, maps: 1 });
    assert!(!cluster.bpffs_dir().exists());
    assert_eq!(attached(cluster.cgroup_root()), []);
    client.connect(server.addr(false, 8080), 1).assert_echoed(1);
    // A fresh install starts from nothing: the old counts went with the map.
    assert_eq!(
        install(&cluster)
            .connects()
            .unwrap()
            .get(&client.netns_cookie()),
        None
    );
    capture::uninstall(cluster.bpffs_dir()).unwrap();
    // Uninstalling twice is fine.
    assert_eq!(
        capture::uninstall(cluster.bpffs_dir()).unwrap(),
        capture::Uninstalled::default()
    );
}

#[test]
fn capture_on_a_path_that_is_not_bpffs_is_refused_with_the_reason() {
    let cluster = Cluster::new(1);
    let err = capture::Config::resolve(
        Some(cluster.cgroup_root().to_owned()),
        Some("/tmp/not-bpffs".into()),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("is not on a bpf filesystem"),
        "{err}"
    );
    let err = capture::Config::resolve(Some("/tmp".into()), Some(cluster.bpffs_dir().to_owned()))
        .unwrap_err();
    assert!(
        err.to_string().contains("is not on a cgroup2 filesystem"),
        "{err}"
    );
}
