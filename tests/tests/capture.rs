//! Capture, loaded for real into the kernel by the agent's capture module and attached to the
//! test cluster's cgroup root, exercised with real connections between pod namespaces. Kubelet
//! is a cgroup of the test's own (`<cgroup root>/system.slice/kubelet.service`), never the
//! machine's.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener},
    path::Path,
    process::Command,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use meshlet::{
    capture::{self, Attachment, Capture, FailMode, Redirects},
    sys::socket::listen_in,
};
use meshlet_common::programs;
use meshlet_tests::{Cluster, Pod};

const QUIET: Duration = Duration::from_millis(300);

fn config(cluster: &Cluster, fail_mode: FailMode) -> capture::Config {
    let mut config = capture::Config::resolve(
        Some(cluster.cgroup_root(0).to_owned()),
        Some(cluster.bpffs_dir(0).to_owned()),
    )
    .expect("resolve capture config");
    config.fail_mode = fail_mode;
    config
}

fn install(cluster: &Cluster) -> Capture {
    Capture::install(config(cluster, FailMode::Closed)).expect("install capture")
}

fn enroll(capture: &mut Capture, pod: &Pod) -> u64 {
    capture
        .enroll(&pod.netns.open(), &[pod.ipv4.into(), pod.ipv6.into()])
        .expect("enroll")
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// What `SO_ORIGINAL_DST` reports for a connect to `to`: v4-mapped destinations as IPv4.
fn unmapped(to: SocketAddr) -> SocketAddr {
    match to.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(to, |v4| SocketAddr::new(v4.into(), to.port())),
        IpAddr::V4(_) => to,
    }
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
    let mut programs: Vec<_> = programs
        .iter()
        .map(|p| {
            (
                p["attach_type"].as_str().unwrap_or_default().to_owned(),
                p["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    programs.sort();
    programs
}

/// sk_lookup links the kernel has on the network namespace of `pod`.
fn sk_lookup_links(pod: &Pod) -> usize {
    meshlet_tests::sk_lookup_links(&pod.netns.path())
}

/// Accepts one connection on `listener` (a 15006 stand-in), echoes it, and returns the
/// accepted socket's (local, peer) addresses.
fn accept_one(listener: TcpListener) -> JoinHandle<(SocketAddr, SocketAddr)> {
    listener.set_nonblocking(false).unwrap();
    std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        let local = stream.local_addr().unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 || stream.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        (local, peer)
    })
}

#[test]
fn outbound_connects_land_on_the_in_pod_listener_with_the_original_destination() {
    let mut cluster = Cluster::new(2);
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 1);
    let mut capture = install(&cluster);
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let mut echo = server.echo_server(8080);
    let mut proxy =
        cluster.proxy_listeners("client", &[addr("127.0.0.1:15001"), addr("[::1]:15001")]);
    enroll(&mut capture, client);

    let v4_mapped_server = SocketAddr::new(server.ipv4.to_ipv6_mapped().into(), 8080);
    for (to, listener) in [
        (server.addr(false, 8080), addr("127.0.0.1:15001")),
        (server.addr(true, 8080), addr("[::1]:15001")),
        (v4_mapped_server, addr("127.0.0.1:15001")),
    ] {
        let report = client.connect(to, 1000);
        report.assert_echoed(1000);
        assert_eq!(
            report.peer,
            Some(to),
            "getpeername must show the application its original peer"
        );
        let accepted = proxy.next_accepted();
        assert_eq!(
            accepted.local, listener,
            "connect to {to} landed on the wrong listener"
        );
        assert_eq!(
            accepted.original_dst,
            Some(Ok(unmapped(to))),
            "SO_ORIGINAL_DST for a connect to {to}"
        );
    }
    assert!(
        echo.try_next_accepted(QUIET).is_none(),
        "a redirected connection reached the server directly"
    );
    assert_eq!(capture.redirects().unwrap().outbound, 3);
}

#[test]
fn unenrolled_pods_marked_sockets_and_exclusions_are_not_redirected() {
    let mut cluster = Cluster::new(2);
    cluster.add_pod("client", 0);
    cluster.add_pod("bystander", 0);
    cluster.add_pod("server", 1);
    cluster.add_pod_outside_root("outsider", 0);
    let mut config = config(&cluster, FailMode::Closed);
    config.excluded_ports = vec![9090];
    config.excluded_cidrs = vec!["10.244.1.0/24".parse().unwrap()];
    let mut capture = Capture::install(config).unwrap();
    let (client, bystander, server, outsider) = (
        cluster.pod("client"),
        cluster.pod("bystander"),
        cluster.pod("server"),
        cluster.pod("outsider"),
    );
    let mut echo = server.echo_server(8080);
    let mut echo_9090 = server.echo_server(9090);
    let mut proxy =
        cluster.proxy_listeners("client", &[addr("127.0.0.1:15001"), addr("[::1]:15001")]);
    let mut outsider_proxy = cluster.proxy_listeners("outsider", &[addr("127.0.0.1:15001")]);
    enroll(&mut capture, client);
    // Enrolled, but its processes live outside the cgroup root the programs are attached to.
    enroll(&mut capture, outsider);

    let direct =
        |report: meshlet_tests::ConnectReport, echo: &mut meshlet_tests::Process, from: &Pod| {
            report.assert_echoed(10);
            let accepted = echo.next_accepted();
            assert_eq!(
                accepted.peer.ip().to_canonical(),
                IpAddr::from(from.ipv4),
                "not a direct connection"
            );
        };
    direct(
        bystander.connect(server.addr(false, 8080), 10),
        &mut echo,
        bystander,
    );
    direct(
        client.connect_with(server.addr(false, 8080), 10, &["--mark"]),
        &mut echo,
        client,
    );
    direct(
        outsider.connect(server.addr(false, 8080), 10),
        &mut echo,
        outsider,
    );
    // The excluded CIDR covers the server's IPv4 address, but not its IPv6 one.
    direct(
        client.connect(server.addr(false, 8080), 10),
        &mut echo,
        client,
    );
    client
        .connect(server.addr(true, 9090), 10)
        .assert_echoed(10);
    assert_eq!(
        echo_9090.next_accepted().peer.ip(),
        IpAddr::from(client.ipv6),
        "excluded port was redirected"
    );
    client
        .connect(server.addr(true, 8080), 10)
        .assert_echoed(10);
    assert_eq!(
        proxy.next_accepted().original_dst,
        Some(Ok(server.addr(true, 8080)))
    );
    // Loopback and the pod's own address stay inside the pod.
    let _self_echo = client.echo_server(7000);
    client.connect(addr("127.0.0.1:7000"), 10).assert_echoed(10);
    client
        .connect(client.addr(false, 7000), 10)
        .assert_echoed(10);

    assert!(
        proxy.try_next_accepted(QUIET).is_none(),
        "an excluded connection was redirected"
    );
    assert!(
        outsider_proxy.try_next_accepted(Duration::ZERO).is_none(),
        "the pod outside the root was redirected"
    );
    assert_eq!(capture.redirects().unwrap().outbound, 1);
}

#[test]
fn inbound_connections_on_any_port_are_steered_to_15006_except_hbone() {
    let mut cluster = Cluster::new(2);
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 1);
    let mut capture = install(&cluster);
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let mut hbone = server.echo_server(15008);
    enroll(&mut capture, server);
    let server_ns = server.netns.open();

    // One listener per family for the whole test: a closed listener's port can stay taken for
    // a moment (a process another test is spawning holds a copy of every descriptor until it
    // execs), so the test never closes one and binds again.
    let v4 = listen_in(&server_ns, addr("0.0.0.0:15006")).unwrap();
    let v6 = listen_in(&server_ns, addr("[::]:15006")).unwrap();
    capture
        .set_inbound_listener(server.ipv4.into(), &v4)
        .unwrap();
    capture
        .set_inbound_listener(server.ipv6.into(), &v6)
        .unwrap();

    for (to, ipv6) in [
        (server.addr(false, 8080), false),
        (server.addr(false, 9999), false),
        (server.addr(true, 8080), true),
    ] {
        let listener = if ipv6 { &v6 } else { &v4 };
        let accepted = accept_one(listener.try_clone().unwrap());
        client.connect(to, 500).assert_echoed(500);
        let (local, peer) = accepted.join().unwrap();
        assert_eq!(
            local, to,
            "the accepted socket's local address is the original destination"
        );
        assert_eq!(
            peer.ip(),
            if ipv6 {
                IpAddr::from(client.ipv6)
            } else {
                client.ipv4.into()
            }
        );
    }

    client
        .connect(server.addr(false, 15008), 10)
        .assert_echoed(10);
    assert_eq!(
        hbone.next_accepted().local,
        server.addr(false, 15008).to_canonical_v6(),
        "15008 must not be steered"
    );
    assert_eq!(capture.redirects().unwrap().inbound, 3);
}

/// An enrolled pod whose proxy has no 15006 listener: inbound connections are dropped (fail
/// closed), and the program says why through aya-log, read from the pinned ring the agent
/// forwards to its log.
#[test]
fn a_pod_without_a_listener_drops_inbound_and_the_program_reports_it_through_aya_log() {
    let mut cluster = Cluster::new(2);
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 1);
    let mut capture = install(&cluster);
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let _app = server.echo_server(8080);
    enroll(&mut capture, server);
    let log = capture.log();

    let refused = client.connect_with(server.addr(false, 8080), 10, &["--timeout-ms", "300"]);
    assert!(
        refused.error.is_some() && refused.echoed == 0,
        "fail closed: the SYN is dropped, so the connect times out: {refused:?}"
    );
    let expected = server.dropped_without_listener(8080);
    wait_until("the refusal in the eBPF log", || {
        let mut log = log.lock().unwrap();
        log.flush();
        log.recent().contains(&expected)
    });
    assert_eq!(capture.redirects().unwrap().inbound, 0);
}

/// Polls `done` until it holds; panics with `what` after 10 s.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < meshlet_tests::process::patience(Duration::from_secs(10)),
            "{what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn only_connections_kubelet_opens_reach_the_pod_unsteered_and_only_while_open() {
    let mut cluster = Cluster::new(1);
    cluster.add_pod("server", 0);
    let kubelet = cluster.kubelet_cgroup(0);
    let mut config = config(&cluster, FailMode::Closed);
    config.kubelet_cgroup = Some(kubelet.clone());
    let mut capture = Capture::install(config.clone()).expect("install with a kubelet cgroup");
    assert_eq!(
        attached(&kubelet),
        [("cgroup_sock_ops".to_owned(), programs::PROBE_OPS.to_owned())],
        "probe_ops is attached to kubelet's cgroup, and only there"
    );
    let server = cluster.pod("server");
    let mut echo = server.echo_server(8080);
    enroll(&mut capture, server);
    let server_ns = server.netns.open();

    // 15006 listening in both families for the whole test (see the test above on why a
    // listener is never closed and bound again).
    let listeners: Vec<_> = [(false, "0.0.0.0:15006"), (true, "[::]:15006")]
        .into_iter()
        .map(|(ipv6, bind)| {
            let listener = listen_in(&server_ns, addr(bind)).unwrap();
            capture
                .set_inbound_listener(server.addr(ipv6, 0).ip(), &listener)
                .unwrap();
            listener
        })
        .collect();

    // A node process outside kubelet's cgroup (a hostNetwork pod, a daemon, anything SNATed to
    // a node address) is captured like any other client, in both families.
    for (ipv6, listener) in [false, true].into_iter().zip(&listeners) {
        let to = server.addr(ipv6, 8080);
        let accepted = accept_one(listener.try_clone().unwrap());
        cluster.connect_from_node(0, to, 10).assert_echoed(10);
        let (local, _) = accepted.join().unwrap();
        assert_eq!(
            local, to,
            "a node process's connection was not steered to 15006"
        );
    }
    assert_eq!(
        capture.redirects().unwrap(),
        Redirects {
            outbound: 0,
            inbound: 2,
            probes: 0
        }
    );

    // Kubelet's connections reach the application.
    for ipv6 in [false, true] {
        let to = server.addr(ipv6, 8080);
        std::thread::scope(|scope| {
            let probe = scope.spawn(|| {
                cluster.connect_from_node_in(0, &kubelet, to, 10, &["--delay-ms", "2000"])
            });
            let accepted = echo.next_accepted();
            assert_eq!(
                (accepted.local.ip().to_canonical(), accepted.local.port()),
                (to.ip(), to.port()),
                "kubelet's connection did not reach the application directly"
            );
            let from = SocketAddr::new(accepted.peer.ip().to_canonical(), accepted.peer.port());
            assert_eq!(
                capture.kubelet_probes().unwrap(),
                [(from, to)],
                "the open probe is recorded by its 4-tuple"
            );
            probe.join().unwrap().assert_echoed(10);
        });
        // Closed: the 4-tuple is no longer exempt (a later connection reusing it is captured).
        wait_until("kubelet's closed connection is still recorded", || {
            capture.kubelet_probes().unwrap().is_empty()
        });
    }
    assert_eq!(
        capture.redirects().unwrap(),
        Redirects {
            outbound: 0,
            inbound: 2,
            probes: 2
        }
    );
    drop(listeners);

    // A restarted agent adopts the pinned link; one without a kubelet cgroup unpins it.
    drop(capture);
    let again = Capture::install(config.clone()).unwrap();
    let probe_ops = again
        .programs()
        .iter()
        .find(|p| p.name == programs::PROBE_OPS)
        .expect("probe_ops after a restart");
    assert_eq!(probe_ops.attachment, Attachment::Adopted);
    assert_eq!(attached(&kubelet).len(), 1);
    drop(again);
    config.kubelet_cgroup = None;
    let without = Capture::install(config).unwrap();
    assert!(
        without
            .programs()
            .iter()
            .all(|p| p.name != programs::PROBE_OPS)
    );
    assert_eq!(
        attached(&kubelet),
        [],
        "a kubelet cgroup no longer configured keeps its program"
    );
}

#[test]
fn the_agent_exempts_the_kubelet_cgroup_it_is_given_and_finds_none_on_its_own_here() {
    struct RemoveOnDrop(std::path::PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let cluster = Cluster::new(1);
    let kubelet = cluster.kubelet_cgroup(0);
    let file = std::env::temp_dir().join(format!("{}-workloads.yaml", cluster.id()));
    let _cleanup = RemoveOnDrop(file.clone());
    meshlet_tests::write_workloads(&file, &[]);
    let source = format!("file:{}", file.display());
    let flag = kubelet.display().to_string();

    let mut agent = cluster.start_agent(0, &["--source", &source, "--kubelet-cgroup", &flag]);
    agent.wait_for_log(
        "kubelet's probes reach pods unsteered",
        1,
        Duration::from_secs(10),
    );
    assert_eq!(
        attached(&kubelet),
        [("cgroup_sock_ops".to_owned(), programs::PROBE_OPS.to_owned())]
    );
    agent.stop();
    assert_eq!(attached(&kubelet).len(), 1, "the pin keeps it attached");

    // Without the flag the agent looks for kubelet; the machine's own (if any) is outside the
    // test's cgroup root, so none is used and the one pinned before is removed.
    let agent = cluster.start_agent(0, &["--source", &source]);
    agent.wait_for_log("kubelet's cgroup not found", 1, Duration::from_secs(10));
    agent.wait_for_log("capture installed", 1, Duration::from_secs(10));
    assert_eq!(attached(&kubelet), []);
}

#[test]
fn a_kubelet_cgroup_that_holds_the_cgroup_root_is_refused_before_anything_is_attached() {
    let cluster = Cluster::new(1);
    let root = cluster.cgroup_root(0);
    for kubelet in [root.clone(), root.parent().unwrap().to_owned()] {
        let mut config = config(&cluster, FailMode::Closed);
        config.kubelet_cgroup = Some(kubelet.clone());
        let err = Capture::install(config).unwrap_err();
        assert!(
            matches!(err, capture::Error::KubeletCgroupTooBroad { .. }),
            "{}: {err}",
            kubelet.display()
        );
        assert!(err.to_string().contains("--kubelet-cgroup"), "{err}");
    }
    assert_eq!(attached(&root), []);
    assert!(
        !cluster.bpffs_dir(0).exists(),
        "a refused install left pins behind"
    );
}

trait CanonicalV6 {
    fn to_canonical_v6(self) -> SocketAddr;
}

impl CanonicalV6 for SocketAddr {
    /// How a dual-stack listener reports an IPv4 address.
    fn to_canonical_v6(self) -> SocketAddr {
        match self.ip() {
            IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), self.port()),
            IpAddr::V6(_) => self,
        }
    }
}

#[test]
fn unenrolling_stops_capture_of_new_connections_and_spares_open_ones() {
    let mut cluster = Cluster::new(2);
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 1);
    let mut capture = install(&cluster);
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let mut echo = server.echo_server(8080);
    let mut proxy = cluster.proxy_listeners("client", &[addr("127.0.0.1:15001")]);
    let cookie = enroll(&mut capture, client);
    let to = server.addr(false, 8080);

    std::thread::scope(|scope| {
        let open = scope.spawn(|| client.connect_with(to, 2000, &["--delay-ms", "1000"]));
        assert_eq!(proxy.next_accepted().original_dst, Some(Ok(to)));
        capture.unenroll(cookie).unwrap();

        client.connect(to, 10).assert_echoed(10);
        assert_eq!(
            echo.next_accepted().peer.ip().to_canonical(),
            IpAddr::from(client.ipv4)
        );
        // The connection redirected before unenrolling carries on through the proxy.
        open.join().unwrap().assert_echoed(2000);
    });
    assert!(proxy.try_next_accepted(QUIET).is_none());
    assert!(capture.enrolled().unwrap().is_empty());
}

#[test]
fn a_restarted_agent_adopts_pinned_capture_and_attaches_nothing_twice() {
    let mut cluster = Cluster::new(2);
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 1);
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let _echo = server.echo_server(8080);
    let mut proxy = cluster.proxy_listeners("client", &[addr("127.0.0.1:15001")]);

    let mut first = install(&cluster);
    assert!(
        first
            .programs()
            .iter()
            .all(|p| p.attachment == Attachment::Attached)
    );
    let links: Vec<u32> = first.programs().iter().map(|p| p.link_id).collect();
    enroll(&mut first, client);
    enroll(&mut first, server);
    drop(first); // the agent stops; the pins keep every program attached

    client
        .connect(server.addr(false, 8080), 10)
        .assert_echoed(10);
    assert_eq!(
        proxy.next_accepted().original_dst,
        Some(Ok(server.addr(false, 8080))),
        "capture stopped with the agent"
    );

    let mut second = install(&cluster);
    assert!(
        second
            .programs()
            .iter()
            .all(|p| p.attachment == Attachment::Adopted)
    );
    assert_eq!(
        second
            .programs()
            .iter()
            .map(|p| p.link_id)
            .collect::<Vec<_>>(),
        links,
        "the same links"
    );
    assert_eq!(
        second.enrolled().unwrap().len(),
        2,
        "enrollment survives the restart"
    );
    // The new agent enrolls what it finds again, as it would on start: still one sk_lookup each.
    enroll(&mut second, client);
    enroll(&mut second, server);
    let expected = [
        ("cgroup_getsockopt", "meshlet_getsockopt"),
        ("cgroup_inet4_connect", "meshlet_connect4"),
        ("cgroup_inet4_getpeername", "meshlet_getpeername4"),
        ("cgroup_inet6_connect", "meshlet_connect6"),
        ("cgroup_inet6_getpeername", "meshlet_getpeername6"),
        ("cgroup_sock_ops", "meshlet_sock_ops"),
    ]
    .map(|(t, n)| (t.to_owned(), n.to_owned()));
    assert_eq!(attached(&cluster.cgroup_root(0)), expected);
    assert_eq!(sk_lookup_links(server), 1);
    assert_eq!(
        second.redirects().unwrap().outbound,
        1,
        "counters survive the restart"
    );
}

#[test]
fn uninstall_detaches_and_unpins_everything() {
    let mut cluster = Cluster::new(1);
    cluster.add_pod("app", 0);
    let app = cluster.pod("app");
    let mut capture = install(&cluster);
    enroll(&mut capture, app);
    drop(capture); // `meshlet uninstall` runs after the agent has stopped
    assert_eq!(
        attached(&cluster.cgroup_root(0)).len(),
        6,
        "the pins keep capture attached"
    );
    assert_eq!(sk_lookup_links(app), 1);

    let removed = capture::uninstall(&cluster.bpffs_dir(0)).unwrap();
    assert_eq!(removed.links, 7);
    assert_eq!(removed.maps, meshlet_common::maps::ALL.len());
    assert!(!cluster.bpffs_dir(0).exists());
    assert_eq!(attached(&cluster.cgroup_root(0)), []);
    assert_eq!(sk_lookup_links(app), 0);
    assert_eq!(
        capture::uninstall(&cluster.bpffs_dir(0)).unwrap(),
        capture::Uninstalled::default(),
        "twice is fine"
    );
}

#[test]
fn fail_closed_refuses_captured_connections_with_no_proxy() {
    let mut cluster = Cluster::new(2);
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 1);
    let mut capture = Capture::install(config(&cluster, FailMode::Closed)).unwrap();
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let mut echo = server.echo_server(8080);
    enroll(&mut capture, client);
    enroll(&mut capture, server);

    let report = client.connect(server.addr(false, 8080), 10);
    assert!(
        report
            .error
            .as_deref()
            .is_some_and(|e| e.contains("refused")),
        "outbound without proxy: {report:?}"
    );
    capture
        .unenroll(
            capture
                .enrolled()
                .unwrap()
                .iter()
                .map(|(c, _)| *c)
                .find(|&c| c == client.netns_cookie())
                .unwrap(),
        )
        .unwrap();
    let report = client.connect_with(server.addr(false, 8080), 10, &["--timeout-ms", "500"]);
    assert!(
        report.error.is_some(),
        "inbound to an enrolled pod with no 15006 listener got through: {report:?}"
    );
    assert!(echo.try_next_accepted(QUIET).is_none());
}

#[test]
fn fail_open_lets_traffic_go_direct_while_the_proxy_is_not_ready() {
    let mut cluster = Cluster::new(2);
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 1);
    let mut capture = Capture::install(config(&cluster, FailMode::Open)).unwrap();
    let (client, server) = (cluster.pod("client"), cluster.pod("server"));
    let mut echo = server.echo_server(8080);
    let client_cookie = enroll(&mut capture, client);
    enroll(&mut capture, server);

    // Neither proxy is up: outbound goes direct, and so does inbound.
    client
        .connect(server.addr(false, 8080), 10)
        .assert_echoed(10);
    assert_eq!(
        echo.next_accepted().peer.ip().to_canonical(),
        IpAddr::from(client.ipv4)
    );

    // The client's proxy comes up and says so: captured again.
    let mut proxy = cluster.proxy_listeners("client", &[addr("127.0.0.1:15001")]);
    capture.set_ready(client_cookie, true).unwrap();
    client
        .connect(server.addr(false, 8080), 10)
        .assert_echoed(10);
    assert_eq!(
        proxy.next_accepted().original_dst,
        Some(Ok(server.addr(false, 8080)))
    );
    assert!(echo.try_next_accepted(QUIET).is_none());

    capture.set_ready(client_cookie, false).unwrap();
    client
        .connect(server.addr(false, 8080), 10)
        .assert_echoed(10);
    assert_eq!(
        echo.next_accepted().peer.ip().to_canonical(),
        IpAddr::from(client.ipv4)
    );
}

#[test]
fn capture_on_a_path_that_is_not_bpffs_is_refused_with_the_reason() {
    let cluster = Cluster::new(1);
    let err = capture::Config::resolve(
        Some(cluster.cgroup_root(0).to_owned()),
        Some("/tmp/not-bpffs".into()),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("is not on a bpf filesystem"),
        "{err}"
    );
    let err = capture::Config::resolve(Some("/tmp".into()), Some(cluster.bpffs_dir(0).to_owned()))
        .unwrap_err();
    assert!(
        err.to_string().contains("is not on a cgroup2 filesystem"),
        "{err}"
    );
}

#[test]
fn an_ebpf_object_that_is_missing_or_not_an_object_is_refused_before_anything_is_attached() {
    let cluster = Cluster::new(1);
    let garbage = std::env::temp_dir().join(format!("{}-garbage.o", cluster.id()));
    std::fs::write(&garbage, b"not an ELF object").unwrap();
    for (object, want) in [
        (
            cluster.bpffs_dir(0).join("missing.o"),
            "read the eBPF object",
        ),
        (garbage.clone(), "the eBPF object:"),
    ] {
        let mut config = config(&cluster, FailMode::Closed);
        config.object = Some(object);
        let err = Capture::install(config).expect_err("a bad object is refused");
        assert!(err.to_string().contains(want), "want {want:?}: {err}");
        assert!(
            attached(&cluster.cgroup_root(0)).is_empty(),
            "nothing attached"
        );
    }
    std::fs::remove_file(&garbage).unwrap();
}

#[test]
fn this_kernel_has_every_feature_capture_needs_and_one_it_lacks_is_named() {
    use aya::{maps::MapType, programs::ProgramType, sys::BpfHelper};
    use meshlet::capture::{
        self,
        features::{self, Feature, Probe},
    };

    meshlet_tests::require_root();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let version = capture::kernel_version(&release);
    let missing = features::missing(version);
    assert!(missing.is_empty(), "{}", features::describe(&missing));

    // The probes answer for real: a helper the kernel refuses to a program type (sk_assign is
    // for sk_lookup and tc, never sock_ops) and a map type, program type and helper it has.
    let probe = |name, probe| Feature {
        name,
        probe,
        since: (4, 0),
        used_for: "a test",
    };
    let asked = [
        probe(
            "bpf_sk_assign in sock_ops programs",
            Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sk_assign),
        ),
        probe("sk_lookup programs", Probe::Program(ProgramType::SkLookup)),
        probe("ring buffer maps", Probe::Map(MapType::RingBuf)),
        probe(
            "bpf_sk_assign in sk_lookup programs",
            Probe::Helper(ProgramType::SkLookup, BpfHelper::BPF_FUNC_sk_assign),
        ),
    ];
    let lacking: Vec<&str> = features::missing_of(&asked, version)
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(lacking, ["bpf_sk_assign in sock_ops programs"]);
}
