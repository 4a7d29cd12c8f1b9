//! `meshlet-bench` (run by `cargo xtask bench`): performance scenarios on the simulated
//! cluster, each measured side by side with its baseline in the same run, repeated and
//! interleaved so ratios hold on a noisy machine.
//!
//! Scenarios so far:
//! - `tunnel`: pod to pod across nodes, direct vs through meshlet (eBPF capture + HBONE):
//!   single-stream throughput, 1-byte ping-pong rate, new connections per second, agent RSS
//!   with 1,000 idle tunneled connections;
//! - `store`: the workload store with 100,000 pods and 10,000 services: memory per pod, IP and
//!   VIP lookups per second;
//! - `enroll`: time to enroll and unenroll one pod's network namespace as the number of
//!   enrolled namespaces grows to `--namespaces`;
//! - `cni`: what `meshlet-cni` ADD adds to a pod's start, for N new mesh pods one after
//!   another and 16 at a time (a node starting its pods), against ADD of pods outside the mesh;
//! - `lifecycle`: 100 new connections a second through a mesh pod while its agent is replaced
//!   (a successor takes the listeners over), upgraded (a variant eBPF build replaced in place),
//!   crashed (SIGKILL, then a new agent), and with `--baseline` an older build restarted the
//!   way it could be (SIGTERM, then a new agent): connections refused or reset, a long-lived
//!   connection's fate, time to serve or to be ready;
//! - `connect`: connect latency from a pod, three ways, interleaved: to the in-pod listener
//!   directly (loopback, not captured), to a remote pod redirected by eBPF to that same listener
//!   (the difference is what redirection costs), and to the remote pod directly (context).

use std::{net::SocketAddr, time::Instant};

use anyhow::{Context as _, ensure};
use clap::{Parser, Subcommand};
use meshlet::capture::{self, Capture};
use meshlet_tests::{Cluster, process};
use serde::Serialize;

#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
    /// Fewer repetitions, for a quick regression check.
    #[arg(long, global = true)]
    quick: bool,
    /// Also write the figures as JSON to this file.
    #[arg(long, global = true)]
    json: Option<std::path::PathBuf>,
    /// Measure another proxy the same way, as path `external`: a shell command run in a pod
    /// outside the mesh, with `{listen}` replaced by the address it must listen on and
    /// `{upstream}` by the server it must forward to, e.g.
    /// `socat TCP-LISTEN:{listen_port},bind=127.0.0.1,reuseaddr,fork TCP:{upstream}`
    /// (`{listen_port}` is the port alone).
    #[arg(long, global = true)]
    external_proxy: Option<String>,
    /// Istio's ztunnel binary (its directory holds its test root): `tunnel` also measures it
    /// as paths `ztunnel` and `ztunnel-samenode`, and `all` checks it interoperates (see
    /// `interop`).
    #[arg(long, global = true)]
    ztunnel: Option<std::path::PathBuf>,
    /// An older `meshlet` binary, from before the handoff (such as main before it): `lifecycle`
    /// then also measures its restart (SIGTERM, then a new agent) under the same load.
    #[arg(long, global = true)]
    baseline: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Every scenario.
    All {
        /// Namespaces to enroll in the enroll scenario.
        #[arg(long, default_value_t = 1000)]
        namespaces: usize,
    },
    /// Enroll and unenroll time against the number of enrolled namespaces.
    Enroll {
        #[arg(long, default_value_t = 1000)]
        namespaces: usize,
    },
    /// Connect latency: redirected versus not.
    Connect,
    /// The HBONE tunnel against the direct path: throughput, ping-pong, connection rate,
    /// agent memory with idle tunnels.
    Tunnel {
        #[command(flatten)]
        profile: Profile,
    },
    /// Policy decisions with 1,000 policies, 10 of them selecting the workload.
    Policy,
    /// `meshlet ca`: a node start with N pods of N service accounts asking at once, through
    /// the real CA process and a stand-in API server (TokenReview, pod placement).
    Ca {
        #[arg(long, default_value_t = 200)]
        pods: usize,
    },
    /// Restarts, upgrades and crashes under 100 new connections a second.
    Lifecycle,
    /// `meshlet-cni` ADD: the time it adds to a pod's start, sequential and 16 in flight.
    Cni {
        #[arg(long, default_value_t = 200)]
        pods: usize,
    },
    /// Interoperability with Istio's ztunnel (`--ztunnel PATH`): ztunnel, pointed at
    /// `meshlet ca` with `CA_ADDRESS`, gets its workload certificate from it; and meshlet and
    /// ztunnel tunnel each other's connections over HBONE, both directions.
    Interop,
    /// The workload store: memory per pod, lookups per second.
    Store {
        #[arg(long, default_value_t = 100_000)]
        pods: usize,
        #[arg(long, default_value_t = 10_000)]
        services: usize,
    },
}

/// `tunnel --only PATH`: one path, one measurement, repeated, for profiling the proxies.
#[derive(Debug, clap::Args)]
struct Profile {
    /// Measure only this path (`meshlet`, `meshlet-samenode`, `ztunnel`, ...), `--repeat`
    /// times, printing each figure with the CPU its proxies used; no table, no memory rounds.
    #[arg(long)]
    only: Option<String>,
    /// What `--only` measures.
    #[arg(long, default_value = "throughput", requires = "only", value_parser = ["throughput", "pingpong", "connect-rate", "latency"])]
    what: String,
    /// How many times `--only` measures.
    #[arg(long, default_value_t = 3, requires = "only", value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Runs `perf <ARGS> -p <the path's proxies>` around the repetitions, stopped with SIGINT,
    /// e.g. `--perf 'record -g -o agents.data'` or `--perf 'stat -e context-switches'`.
    #[arg(long, requires = "only", allow_hyphen_values = true)]
    perf: Option<String>,
}

/// Latency summary in microseconds.
#[derive(Debug, Serialize)]
struct Summary {
    samples: usize,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    max_us: f64,
}

impl Summary {
    fn of(mut nanos: Vec<u64>) -> Self {
        nanos.sort_unstable();
        let at = |q: f64| nanos[((nanos.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
        Self {
            samples: nanos.len(),
            p50_us: at(0.5),
            p90_us: at(0.9),
            p99_us: at(0.99),
            max_us: at(1.0),
        }
    }

    fn row(&self, name: &str) {
        println!(
            "  {name:<44} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            self.samples, self.p50_us, self.p90_us, self.p99_us, self.max_us
        );
    }
}

fn header(title: &str) {
    println!("\n{title}");
    println!(
        "  {:<44} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "", "samples", "p50 µs", "p90 µs", "p99 µs", "max µs"
    );
}

/// Issuance at the CA: `pods` CSRs (one per service account, all with a pod on the caller's
/// node), 16 in flight as the agent sends them, each authenticated by a TokenReview.
fn ca_bench(pods: usize) -> anyhow::Result<serde_json::Value> {
    use meshlet::proto::IstioCertificateRequest;
    use meshlet_tests::{kube_api::ApiServer, mesh_ca};
    header(&format!(
        "meshlet ca: a node start with {pods} pods (16 CSRs in flight)"
    ));
    let dir = std::env::temp_dir().join(format!("meshlet-bench-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let api = ApiServer::start();
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    for i in 0..pods {
        api.apply(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("app-{i}"), "namespace": "bench", "uid": format!("uid-{i}")},
            "spec": {"nodeName": "node-1", "serviceAccountName": format!("sa-{i}"), "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running"},
        }));
    }
    let ca = mesh_ca::MeshCa::start(&kubeconfig, mesh_ca::free_port(), &["--log-format", "json"]);
    let bundle = dir.join("root-cert.pem");
    mesh_ca::write_trust_bundle(&api, &bundle);
    let token = mesh_ca::agent_token(&api, "node-1");
    let requests: Vec<IstioCertificateRequest> = (0..pods)
        .map(|i| {
            let identity =
                meshlet::identity::Identity::new("cluster.local", "bench", &format!("sa-{i}"))?;
            let csr = meshlet::identity::csr::request(&identity)?;
            Ok(IstioCertificateRequest {
                csr: csr.pem,
                validity_duration: 0,
                metadata: Some(IstioCertificateRequest::impersonating(
                    &identity.to_string(),
                )),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = mesh_ca::client(&ca, &bundle);
    let (latencies, elapsed) = runtime.block_on(async {
        use futures::StreamExt as _;
        // One warm-up request: the TLS connection and HTTP/2 handshake.
        client.call(requests[0].clone(), Some(&token)).await?;
        let started = Instant::now();
        let latencies: Vec<anyhow::Result<u64>> = futures::stream::iter(requests)
            .map(|request| {
                let (client, token) = (&client, &token);
                async move {
                    let sent = Instant::now();
                    client.call(request, Some(token)).await?;
                    Ok(sent.elapsed().as_nanos() as u64)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        anyhow::Ok((latencies, started.elapsed()))
    })?;
    let latencies = latencies.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let summary = Summary::of(latencies);
    summary.row("CreateCertificate, seen by the agent");
    let rate = pods as f64 / elapsed.as_secs_f64();
    println!(
        "  {pods} certificates in {:.0} ms: {rate:.0} CSRs/s",
        elapsed.as_secs_f64() * 1000.0
    );
    drop(ca);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(serde_json::json!({"pods": pods, "latency": summary, "csrs_per_second": rate}))
}

/// How one lifecycle event went for the traffic through it.
#[derive(Debug, Serialize)]
struct LifecycleRow {
    ok: u64,
    refused: u64,
    reset: u64,
    other: u64,
    long_lived_survived: bool,
    /// From the new agent's start to serving (handoff) or to its first enrollment pass
    /// (listeners up, after a crash or a stop).
    to_serving_ms: f64,
}

/// 100 new connections a second from `client` (node-0) to `server` (node-1) for 8 s, with a
/// long-lived connection opened before, while each event happens 2 s in: a successor takes
/// node-1's agent over (then SIGTERM to the old one); node-0's agent, on a variant eBPF build,
/// is replaced by the real one (programs updated in place); node-1's agent is killed
/// (SIGKILL) and a new one started; and, with `baseline` (a build from before the handoff),
/// the same restart of that build: SIGTERM to node-1's agent, then a new one.
fn lifecycle_bench(baseline: Option<&std::path::Path>) -> anyhow::Result<serde_json::Value> {
    use meshlet_tests::mesh::FileMesh;
    const RATE: u32 = 100;
    const COUNT: usize = 800;
    println!("\nrestarts under {RATE} new connections/s ({COUNT} connections, event 2 s in)");
    println!(
        "  {:<34} {:>6} {:>8} {:>6} {:>6} {:>10} {:>12}",
        "", "ok", "refused", "reset", "other", "long-lived", "serving ms"
    );
    let variant = meshlet_tests::variant_ebpf_object();
    let mut rows = serde_json::Map::new();
    let mut events = vec!["handoff", "upgrade", "crash"];
    if baseline.is_some() {
        events.push("baseline: SIGTERM, then start");
    }
    for event in events {
        let variant = variant.clone();
        process::use_baseline(
            baseline
                .filter(|_| event.starts_with("baseline"))
                .map(ToOwned::to_owned),
        );
        let mut mesh = FileMesh::layout(
            &[("client", 0), ("server", 1)],
            &[],
            vec![],
            move |_, node| {
                if event == "upgrade" && node == 0 {
                    vec!["--ebpf-object".into(), variant.display().to_string()]
                } else {
                    vec![]
                }
            },
        );
        let source = format!("file:{}", mesh.file.display());
        let cluster = &mesh.cluster;
        let _echo = cluster.pod("server").echo_server(8080);
        let to = cluster.pod("server").addr(false, 8080);
        let held = cluster.pod("client").hold(to);
        let load = cluster.pod("client").load(to, RATE, COUNT);
        std::thread::sleep(std::time::Duration::from_secs(2));
        let node = if event == "upgrade" { 0 } else { 1 };
        let wait = std::time::Duration::from_secs(30);
        let (successor, serving) = match event {
            "handoff" | "upgrade" => {
                let started = Instant::now();
                let successor = cluster.start_agent(node, &["--source", &source]);
                successor.wait_for_log("agent serving", 1, wait);
                let serving = started.elapsed();
                mesh.agents[node].wait_for_log("handed over to the successor", 1, wait);
                if event == "upgrade" {
                    ensure!(
                        successor.log().contains("program replaced in place"),
                        "the upgrade replaced no program"
                    );
                }
                mesh.agents[node].signal(libc::SIGTERM);
                (successor, serving)
            }
            _ => {
                mesh.agents[node].signal(if event == "crash" {
                    libc::SIGKILL
                } else {
                    libc::SIGTERM
                });
                mesh.agents[node].wait_exit(wait);
                let started = Instant::now();
                let successor = cluster.start_agent(node, &["--source", &source]);
                successor.wait_for_log("initial enrollment pass done", 1, wait);
                (successor, started.elapsed())
            }
        };
        let long_lived = held.release();
        let outcomes = load.finish();
        mesh.agents[node].wait_exit(wait);
        mesh.agents[node] = successor;
        let row = LifecycleRow {
            ok: outcomes.count("ok"),
            refused: outcomes.count("refused"),
            reset: outcomes.count("reset"),
            other: ["closed", "timeout", "error"]
                .iter()
                .map(|o| outcomes.count(o))
                .sum(),
            long_lived_survived: long_lived.error.is_none() && long_lived.echoed == 10,
            to_serving_ms: serving.as_secs_f64() * 1000.0,
        };
        println!(
            "  {event:<34} {:>6} {:>8} {:>6} {:>6} {:>10} {:>12.1}",
            row.ok,
            row.refused,
            row.reset,
            row.other,
            if row.long_lived_survived {
                "finished"
            } else {
                "died"
            },
            row.to_serving_ms
        );
        rows.insert(event.into(), serde_json::to_value(&row)?);
    }
    process::use_baseline(None);
    Ok(rows.into())
}

/// `meshlet-cni` ADD, run exactly as a runtime runs it, for `pods` new sandboxes (no process,
/// Pending in the store, each of its own service account so each needs a certificate): one
/// after another, then 16 at a time. Pods of a namespace outside the mesh are the baseline: the
/// plugin and one agent round trip, no enrollment.
fn cni_bench(pods: usize) -> anyhow::Result<serde_json::Value> {
    use futures::StreamExt as _;
    use meshlet_tests::cni::CniCall;
    let baseline = (pods / 5).clamp(1, 40);
    ensure!(
        pods + baseline <= 240,
        "at most {} pods (one node's address range)",
        240 - baseline
    );
    header(&format!(
        "meshlet-cni ADD: {pods} new mesh pods on one node"
    ));
    let mut cluster = Cluster::new(1);
    let names: Vec<String> = (0..pods).map(|i| format!("app-{i}")).collect();
    // The baseline: pods of a namespace outside the mesh, each a sandbox of its own.
    let legacy: Vec<String> = (0..baseline).map(|i| format!("web-{i}")).collect();
    for name in names.iter().chain(&legacy) {
        cluster.add_pod_sandbox(name, 0);
    }
    let file = std::env::temp_dir().join(format!("{}-workloads.yaml", cluster.id()));
    let mut objects = vec![
        meshlet_tests::namespace_manifest("bench", &[("meshlet.io/dataplane-mode", "ambient")]),
        meshlet_tests::namespace_manifest("legacy", &[]),
    ];
    objects.extend(
        names
            .iter()
            .map(|n| cluster.pod(n).pending_manifest("bench", &[])),
    );
    objects.extend(
        legacy
            .iter()
            .map(|n| cluster.pod(n).pending_manifest("legacy", &[])),
    );
    meshlet_tests::write_workloads(&file, &objects);
    let agent = cluster.start_agent(
        0,
        &[
            "--source",
            &format!("file:{}", file.display()),
            "--log-format",
            "json",
        ],
    );
    agent.wait_for_log(
        "initial enrollment pass done",
        1,
        std::time::Duration::from_secs(20),
    );
    let socket = cluster.cni_socket(0);
    let call = |command: &str, name: &str, namespace: &str| {
        CniCall::new(command, cluster.pod(name), namespace, &socket, "closed")
    };
    let run = |call: CniCall| -> anyhow::Result<u64> {
        let out = call.run();
        ensure!(out.success, "{} failed: {out:?}", call.command);
        Ok(out.took.as_nanos() as u64)
    };

    // The plugin's own cost: exec and the VERSION answer, no agent.
    let exec: Vec<u64> = (0..baseline)
        .map(|_| {
            let started = Instant::now();
            let out = std::process::Command::new(meshlet_tests::cni::cni_binary())
                .env("CNI_COMMAND", "VERSION")
                .output()?;
            ensure!(out.status.success(), "VERSION failed: {out:?}");
            Ok(started.elapsed().as_nanos() as u64)
        })
        .collect::<anyhow::Result<_>>()?;
    let exec = Summary::of(exec);
    exec.row("meshlet-cni VERSION (exec, no agent)");
    let outside: Vec<u64> = legacy
        .iter()
        .map(|n| run(call("ADD", n, "legacy")))
        .collect::<anyhow::Result<_>>()?;
    let outside = Summary::of(outside);
    outside.row("ADD, pod outside the mesh (baseline)");
    let half = pods / 2;
    let sequential: Vec<u64> = names[..half]
        .iter()
        .map(|n| run(call("ADD", n, "bench")))
        .collect::<anyhow::Result<_>>()?;
    let sequential = Summary::of(sequential);
    sequential.row("ADD, mesh pod, one at a time");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let burst: Vec<anyhow::Result<u64>> = runtime.block_on(
        futures::stream::iter(names[half..].iter().map(|n| call("ADD", n, "bench")))
            .map(|call| async move { tokio::task::spawn_blocking(move || run(call)).await? })
            .buffer_unordered(16)
            .collect(),
    );
    let burst_elapsed = started.elapsed();
    let burst = Summary::of(burst.into_iter().collect::<anyhow::Result<_>>()?);
    burst.row("ADD, mesh pod, 16 at a time");
    let enrolled = meshlet_tests::enrolled(&cluster.bpffs_dir(0)).len();
    ensure!(enrolled == pods, "{enrolled} of {pods} pods enrolled");
    println!(
        "  {} pods started 16 at a time in {:.0} ms; {enrolled} enrolled",
        pods - half,
        burst_elapsed.as_secs_f64() * 1000.0
    );
    let deleted: Vec<u64> = names
        .iter()
        .map(|n| run(call("DEL", n, "bench")))
        .collect::<anyhow::Result<_>>()?;
    let deleted = Summary::of(deleted);
    deleted.row("DEL, mesh pod");
    ensure!(meshlet_tests::enrolled(&cluster.bpffs_dir(0)).is_empty());
    drop(agent);
    let _ = std::fs::remove_file(&file);
    Ok(serde_json::json!({
        "pods": pods,
        "plugin_exec": exec,
        "add_outside_mesh": outside,
        "add_sequential": sequential,
        "add_16_in_flight": burst,
        "del": deleted,
    }))
}

/// Istio's ztunnel asks `meshlet ca` for its workload's certificate, with the token of its
/// own service account (`istio-system/ztunnel`, added as a node agent), and gets it.
fn interop(ztunnel: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    use meshlet_tests::{
        kube_api::{ApiServer, TokenSpec},
        mesh_ca::{self, MeshCa},
    };
    println!(
        "\ninterop: Istio's ztunnel ({}) against meshlet ca",
        ztunnel.display()
    );
    let mut cluster = Cluster::new(1);
    cluster.add_pod("web", 0);
    let dir = std::env::temp_dir().join(format!("{}-interop", cluster.id()));
    std::fs::create_dir_all(&dir)?;
    let node = cluster.node(0);
    let api = node
        .netns
        .open()
        .run(|| ApiServer::start_on((std::net::Ipv4Addr::LOCALHOST, 0).into()))?;
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    api.apply(cluster.pod("web").manifest("demo", &[("app", "web")]));
    api.apply(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ztunnel-node-0", "namespace": "istio-system", "uid": "ztunnel-uid"},
        "spec": {"nodeName": "node-0", "serviceAccountName": "ztunnel", "containers": [{"name": "istio-proxy", "image": "ztunnel"}]},
        "status": {"phase": "Running"},
    }));
    let ca = MeshCa::spawn(
        cluster.node_command(0, process::meshlet_binary()),
        (std::net::Ipv4Addr::LOCALHOST, 15012).into(),
        &kubeconfig,
        &[
            "--metrics-addr",
            "127.0.0.1:15014",
            "--node-agent",
            "meshlet-system/meshlet,istio-system/ztunnel",
        ],
    );
    let bundle = dir.join("root-cert.pem");
    mesh_ca::write_trust_bundle(&api, &bundle);
    let token = api.mint_token(TokenSpec {
        namespace: "istio-system".into(),
        service_account: "ztunnel".into(),
        audiences: vec![mesh_ca::AUDIENCE.into()],
        pod: Some(("ztunnel-node-0".into(), "ztunnel-uid".into())),
        node: Some("node-0".into()),
        expires: std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
    });
    let token_path = mesh_ca::token_file(&dir, "ztunnel", &token);
    let pod = cluster.pod("web");
    let xds = dir.join("ztunnel.yaml");
    std::fs::write(
        &xds,
        format!(
            "workloads:\n- uid: cluster1//v1/Pod/demo/web\n  name: web\n  namespace: demo\n  serviceAccount: web\n  trustDomain: cluster.local\n  workloadIps: [\"{}\"]\n  protocol: HBONE\n  node: node-0\n  network: \"\"\n  services: {{}}\npolicies: []\nservices: []\n",
            pod.ipv4
        ),
    )?;
    let mut command = cluster.node_command(0, ztunnel);
    command
        .current_dir(&dir)
        .env("XDS_ADDRESS", "")
        .env("CA_ADDRESS", ca.url())
        .env("CA_ROOT_CA", &bundle)
        .env("AUTH_TOKEN", &token_path)
        .env("PROXY_MODE", "dedicated")
        .env("PROXY_WORKLOAD_INFO", "demo/web/web")
        .env("LOCAL_XDS_PATH", &xds)
        .env("PACKET_MARK", "1337")
        .env("ENABLE_ORIG_SRC", "false")
        .env("ZTUNNEL_WORKER_THREADS", "1")
        .env("RUST_LOG", "info");
    let started = Instant::now();
    // ztunnel logs to standard output.
    let log = dir.join("ztunnel.log");
    let file = std::fs::File::create(&log)?;
    command.stdout(file.try_clone()?).stderr(file);
    let ztunnel_process = ZtunnelProcess(command.spawn().context("start ztunnel")?, log);
    // ztunnel asks for a certificate when it first needs one: open a TLS connection to its
    // HBONE port (without a client certificate: only the server's is wanted).
    let raw = meshlet_tests::raw_hbone::RawHbone::new(&cluster, node.netns.open());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    let presented = loop {
        let attempt = runtime.block_on(raw.tls(
            (std::net::Ipv4Addr::LOCALHOST, 15008).into(),
            raw.config_without_certificate(),
        ));
        if let Ok(stream) = attempt
            && let Some(certs) = stream.get_ref().1.peer_certificates()
        {
            break certs.to_vec();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "ztunnel presented no certificate in 30 s:\n{}",
            std::fs::read_to_string(&ztunnel_process.1).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let took = started.elapsed();
    let identity = meshlet::identity::peer_identity(&presented)?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&presented[0])?;
    let serial: String = leaf
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let signed = ca.process.log();
    let line = signed
        .lines()
        .find(|l| l.contains(&format!("serial=\"{serial}\"")))
        .unwrap_or_default()
        .to_owned();
    anyhow::ensure!(
        identity.to_string() == "spiffe://cluster.local/ns/demo/sa/web"
            && line.contains("signed a workload certificate")
            && line.contains("caller=\"istio-system/ztunnel\""),
        "ztunnel presented {identity} (serial {serial}), which meshlet ca did not sign for it:\n{signed}"
    );
    println!(
        "  meshlet ca: {}",
        line.split_once("meshlet::")
            .map_or(line.as_str(), |(_, rest)| rest)
    );
    println!(
        "  ztunnel serves {identity} with that certificate (serial {serial}), {} ms after it started",
        took.as_millis()
    );
    drop(ztunnel_process);
    drop(ca);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(
        serde_json::json!({"ztunnel_certificate_from_meshlet_ca": true, "ms": took.as_millis() as u64}),
    )
}

/// meshlet and Istio's ztunnel carry each other's traffic: a meshlet agent on node-0 (its pods
/// `client` and `server`) and a dedicated ztunnel per pod on node-1 (`zclient`, `zserver`),
/// all in one ambient namespace and one trust domain (the agent signs with ztunnel's test
/// root, which ztunnel's fake CA signs with). Each direction must echo, and each side must
/// name the other's SPIFFE identity: ztunnel in its access log, meshlet in its metrics.
fn interop_dataplane(ztunnel: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    use meshlet_tests::{mesh::FileMesh, ztunnel as zt};
    println!("\ninterop: meshlet <-> Istio's ztunnel over HBONE, both directions");
    let root = ztunnel.parent().context("--ztunnel has no directory")?;
    let (ca_cert, ca_key) = (root.join("root-cert.pem"), root.join("ca-key.pem"));
    ensure!(
        ca_cert.exists() && ca_key.exists(),
        "{} must hold ztunnel's test root (root-cert.pem, ca-key.pem)",
        root.display()
    );
    let mut cluster = Cluster::new(2);
    for (pod, node) in [("client", 0), ("server", 0), ("zclient", 1), ("zserver", 1)] {
        cluster.add_pod(pod, node);
    }
    // Every pod is a mesh workload (ambient namespace, capture confirmed); node-1 has no
    // meshlet agent: its pods are ztunnel's.
    let mut base = vec![meshlet_tests::namespace_manifest(
        "demo",
        &[("meshlet.io/dataplane-mode", "ambient")],
    )];
    for pod in ["client", "server", "zclient", "zserver"] {
        base.push(cluster.pod(pod).mesh_manifest("demo", &[("app", pod)]));
    }
    let flags = |_: &Cluster, _: usize| {
        vec![
            "--ca-cert".into(),
            ca_cert.display().to_string(),
            "--ca-key".into(),
            ca_key.display().to_string(),
        ]
    };
    let mesh = FileMesh::start_with(cluster, base, &[&["client", "server"]], flags);
    let cluster = &mesh.cluster;
    let dir = std::env::temp_dir().join(format!("{}-interop-ztunnel", cluster.id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("ztunnel.yaml");
    let workloads: Vec<zt::Workload> = ["client", "server", "zclient", "zserver"]
        .iter()
        .map(|pod| zt::Workload::of(cluster.pod(pod), "demo"))
        .collect();
    std::fs::write(&config, zt::config(&workloads))?;
    let zclient = zt::Ztunnel::start(ztunnel, cluster, "zclient", "demo", &config, 1);
    let zserver = zt::Ztunnel::start(ztunnel, cluster, "zserver", "demo", &config, 1);
    zt::redirect(cluster.pod("zclient"), cluster.pod("server").ipv4.into());
    let _echoes = [
        cluster.pod("server").echo_server(8080),
        cluster.pod("zserver").echo_server(8080),
    ];
    let wait_log = |ztunnel: &zt::Ztunnel, needle: &str| -> anyhow::Result<String> {
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let log = ztunnel.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            ensure!(
                Instant::now() < deadline,
                "ztunnel never logged {needle:?}:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };

    // meshlet -> ztunnel: the agent tunnels client's connection to zserver's 15008.
    let report = cluster
        .pod("client")
        .connect(cluster.pod("zserver").addr(false, 8080), 4096);
    ensure!(report.echoed == 4096, "meshlet -> ztunnel: {report:?}");
    let line = wait_log(&zserver, "spiffe://cluster.local/ns/demo/sa/client")?;
    println!(
        "  meshlet -> ztunnel: echoed 4096 bytes; ztunnel: {}",
        line.trim()
    );
    let outbound = mesh.cluster.wait_metric(
        0,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/demo/sa/zserver",
            ),
            ("connection_security_policy", "mutual_tls"),
        ],
        1.0,
    );

    // ztunnel -> meshlet: zclient's ztunnel tunnels to server's 15008, the agent's listener.
    let report = cluster
        .pod("zclient")
        .connect(cluster.pod("server").addr(false, 8080), 4096);
    ensure!(report.echoed == 4096, "ztunnel -> meshlet: {report:?}");
    let inbound = mesh.cluster.wait_metric(
        0,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/demo/sa/zclient",
            ),
            ("connection_security_policy", "mutual_tls"),
        ],
        1.0,
    );
    let line = wait_log(&zclient, "spiffe://cluster.local/ns/demo/sa/server")?;
    println!(
        "  ztunnel -> meshlet: echoed 4096 bytes; meshlet counted it from spiffe://cluster.local/ns/demo/sa/zclient over mutual_tls; ztunnel: {}",
        line.trim()
    );
    drop(zclient);
    drop(zserver);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(serde_json::json!({
        "meshlet_to_ztunnel": outbound >= 1.0,
        "ztunnel_to_meshlet": inbound >= 1.0,
    }))
}

/// A ztunnel process, killed on drop.
struct ZtunnelProcess(std::process::Child, std::path::PathBuf);

impl Drop for ZtunnelProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    meshlet_tests::require_root();
    let mut report = serde_json::Map::new();
    report.insert(
        "kernel".into(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")?
            .trim()
            .into(),
    );
    report.insert(
        "cores".into(),
        std::thread::available_parallelism()?.get().into(),
    );
    report.insert("wake_cost".into(), wake_cost()?);
    match args.scenario {
        Scenario::All { namespaces } => {
            report.insert("enroll".into(), enroll(namespaces, args.quick)?);
            report.insert("connect".into(), connect(args.quick)?);
            report.insert(
                "tunnel".into(),
                tunnel(
                    args.quick,
                    args.external_proxy.as_deref(),
                    args.ztunnel.as_deref(),
                    None,
                )?,
            );
            report.insert("policy".into(), policy_bench()?);
            report.insert("ca".into(), ca_bench(200)?);
            report.insert("cni".into(), cni_bench(if args.quick { 50 } else { 200 })?);
            report.insert(
                "lifecycle".into(),
                lifecycle_bench(args.baseline.as_deref())?,
            );
            if let Some(ztunnel) = &args.ztunnel {
                report.insert("interop".into(), interop(ztunnel)?);
                report.insert("interop_dataplane".into(), interop_dataplane(ztunnel)?);
            }
            let (pods, services) = if args.quick {
                (10_000, 1_000)
            } else {
                (100_000, 10_000)
            };
            report.insert("store".into(), store(pods, services)?);
        }
        Scenario::Policy => {
            report.insert("policy".into(), policy_bench()?);
        }
        Scenario::Tunnel { profile } => {
            report.insert(
                "tunnel".into(),
                tunnel(
                    args.quick,
                    args.external_proxy.as_deref(),
                    args.ztunnel.as_deref(),
                    Some(&profile),
                )?,
            );
        }
        Scenario::Ca { pods } => {
            report.insert("ca".into(), ca_bench(pods)?);
        }
        Scenario::Cni { pods } => {
            report.insert("cni".into(), cni_bench(pods)?);
        }
        Scenario::Lifecycle => {
            report.insert(
                "lifecycle".into(),
                lifecycle_bench(args.baseline.as_deref())?,
            );
        }
        Scenario::Interop => {
            let ztunnel = args
                .ztunnel
                .as_deref()
                .context("interop needs --ztunnel <path to Istio's ztunnel>")?;
            report.insert("interop".into(), interop(ztunnel)?);
            report.insert("interop_dataplane".into(), interop_dataplane(ztunnel)?);
        }
        Scenario::Store { pods, services } => {
            report.insert("store".into(), store(pods, services)?);
        }
        Scenario::Enroll { namespaces } => {
            report.insert("enroll".into(), enroll(namespaces, args.quick)?);
        }
        Scenario::Connect => {
            report.insert("connect".into(), connect(args.quick)?);
        }
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("write {}", path.display()))?;
        println!("\nfigures written to {}", path.display());
    }
    Ok(())
}

fn policy_bench() -> anyhow::Result<serde_json::Value> {
    use meshlet::{
        identity::Identity,
        policy::{self, Index, Request, Workload},
    };
    let (policies, selecting) = (1_000, 10);
    let start = Instant::now();
    let index = Index::build(
        &policy::synthetic(policies, selecting),
        policy::DEFAULT_ROOT_NAMESPACE,
    );
    let build = start.elapsed();
    let labels: meshlet::workload::model::Labels =
        [("app".to_owned(), policy::SYNTHETIC_APP.to_owned())].into();
    let allowed = Identity::parse(policy::SYNTHETIC_PRINCIPAL)?;
    let other = Identity::parse("spiffe://cluster.local/ns/bench/sa/other")?;
    fn request<'a>(
        source: &'a Identity,
        labels: &'a meshlet::workload::model::Labels,
    ) -> Request<'a> {
        Request {
            workload: Workload {
                namespace: policy::SYNTHETIC_NAMESPACE,
                labels,
            },
            destination: "10.244.1.11:8080".parse().expect("addr"),
            source: Some(source),
            source_ip: "10.244.0.10".parse().expect("ip"),
        }
    }
    let (allow, deny) = (request(&allowed, &labels), request(&other, &labels));
    ensure!(
        index.authorize(&allow).allowed && !index.authorize(&deny).allowed,
        "synthetic policies misbehave"
    );
    let decisions = 2_000_000;
    let start = Instant::now();
    let mut allowed_count = 0usize;
    for i in 0..decisions {
        let request = if i % 2 == 0 { &allow } else { &deny };
        allowed_count += usize::from(
            std::hint::black_box(index.authorize(std::hint::black_box(request))).allowed,
        );
    }
    let elapsed = start.elapsed();
    ensure!(allowed_count == decisions / 2, "decisions changed");
    let per_s = decisions as f64 / elapsed.as_secs_f64();
    let ns = elapsed.as_nanos() as f64 / decisions as f64;
    println!(
        "\npolicy decisions ({policies} AuthorizationPolicies, {selecting} selecting the workload; half allowed by the last)"
    );
    println!(
        "  compile {policies} policies            {:>10.1} ms",
        build.as_secs_f64() * 1000.0
    );
    println!(
        "  decisions per second (one thread)  {:>10.2} M/s",
        per_s / 1e6
    );
    println!("  cost of one decision               {ns:>10.0} ns");
    Ok(
        serde_json::json!({ "policies": policies, "selecting": selecting, "compile_ms": build.as_secs_f64() * 1000.0, "decisions_per_s": per_s, "ns_per_decision": ns }),
    )
}

/// Resident memory of process `pid`, in bytes.
fn rss_of(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("VmRSS")?
        .trim()
        .trim_end_matches(" kB")
        .parse()?;
    Ok(kib * 1024)
}

/// A child process killed (and reaped) on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse::<u64>().unwrap_or(0))
        .sum();
    Ok(ticks as f64 / 100.0)
}

/// What waking a thread costs on this machine: two threads pass one byte back and forth over
/// a socket pair, `ROUND_TRIPS` times, both on CPU 0, then on CPUs 0 and 1. Every message a
/// proxy carries wakes it and then the next hop, so on a virtual machine whose idle vCPUs halt,
/// waking a thread on another vCPU (an interrupt to a halted vCPU) is what the latency, ping-pong
/// and connection-rate rows are mostly made of, for every proxy alike. Reported with the
/// figures so that runs on different machines can be read.
fn wake_cost() -> anyhow::Result<serde_json::Value> {
    const ROUND_TRIPS: u32 = 20_000;
    fn pin(cpu: usize) -> std::io::Result<()> {
        use nix::sched::{CpuSet, sched_setaffinity};
        let mut set = CpuSet::new();
        set.set(cpu)?;
        // Pid 0: the calling thread only.
        sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
        Ok(())
    }
    fn bounce(
        mut socket: std::os::unix::net::UnixStream,
        cpu: usize,
        first: bool,
    ) -> std::io::Result<()> {
        use std::io::{Read as _, Write as _};
        pin(cpu)?;
        let mut byte = [0u8; 1];
        for _ in 0..ROUND_TRIPS {
            if first {
                socket.write_all(&byte)?;
                socket.read_exact(&mut byte)?;
            } else {
                socket.read_exact(&mut byte)?;
                socket.write_all(&byte)?;
            }
        }
        Ok(())
    }
    let round_trip_us = |a: usize, b: usize| -> anyhow::Result<f64> {
        let (left, right) = std::os::unix::net::UnixStream::pair()?;
        let start = Instant::now();
        let echo = std::thread::spawn(move || bounce(right, b, false));
        bounce(left, a, true).context("ping")?;
        echo.join()
            .map_err(|_| anyhow::anyhow!("the echo thread panicked"))??;
        Ok(start.elapsed().as_secs_f64() * 1e6 / f64::from(ROUND_TRIPS))
    };
    // Read before any thread is pinned (it is the calling thread's affinity).
    let cpus = std::thread::available_parallelism()?.get();
    // On a thread of its own, so that pinning leaves the bench's threads as they were.
    let measured = std::thread::spawn(move || -> anyhow::Result<(f64, Option<f64>)> {
        let same = round_trip_us(0, 0)?;
        let across = if cpus > 1 {
            Some(round_trip_us(0, 1)?)
        } else {
            None
        };
        Ok((same, across))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the wake-up probe panicked"))??;
    let (same, across) = measured;
    match across {
        Some(across) => println!(
            "machine: a thread woken on its waker's CPU {same:.1} µs per round trip, on another \
             CPU {across:.1} µs (x{:.1})",
            across / same
        ),
        None => println!("machine: a thread woken on its waker's CPU {same:.1} µs per round trip"),
    }
    Ok(serde_json::json!({ "same_cpu_round_trip_us": same, "other_cpu_round_trip_us": across }))
}

/// How long opening the idle connections of the memory measurement may take.
const HOLD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// How long after a burst of connections closed the agent's memory is measured again.
const AFTER_BURST: std::time::Duration = std::time::Duration::from_secs(30);

/// The open-files limit the bench gives itself, and so every agent, ztunnel and pod it
/// starts: room for 10,000 idle connections per agent, even at two sockets each, past the
/// agent's reserve.
const IDLE_OPEN_FILES: u64 = 32_768;

/// Raises this process's soft and hard limits of open files to at least `want`, as far as it
/// may: raising the hard limit (up to the kernel's `fs.nr_open`) takes `CAP_SYS_RESOURCE`,
/// which a container may not have; then the hard limit stays, and the bench says so. A higher
/// limit is kept as it is.
fn raise_open_files_limit(want: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")?
        .trim()
        .parse()?;
    let wanted = hard.max(want.min(nr_open));
    if wanted > hard
        && let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted)
    {
        println!(
            "open files: cannot raise the hard limit from {hard} to {wanted} ({err}); the idle \
             rounds hold what {hard} allows"
        );
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(())
}

fn tunnel(
    quick: bool,
    external_proxy: Option<&str>,
    ztunnel: Option<&std::path::Path>,
    profile: Option<&Profile>,
) -> anyhow::Result<serde_json::Value> {
    use meshlet_tests::{mesh::FileMesh, ztunnel as zt};
    let (rounds, bytes, pings, connects, latency_samples) = if quick {
        (2, 256u64 << 20, 3_000, 300, 1_000)
    } else {
        (3, 1u64 << 30, 20_000, 1_000, 5_000)
    };
    // Every process of the bench inherits this process's hard limit of open files, and an
    // agent budgets a descriptor per socket after a reserve (`Budgets`; a tunneled connection
    // holds one at each agent, and the tunnels, a hundred streams each, one per hundred): as
    // many idle connections as that allows, with room, and at most 10,000 (the issue's
    // figure, so the limit is raised for it first where the bench may, as a node's container
    // runtime gives a pod a high one).
    raise_open_files_limit(IDLE_OPEN_FILES)?;
    let open_files = meshlet_tests::ztunnel::hard_open_files_limit();
    let most_idle =
        (open_files.saturating_sub(meshlet::proxy::Budgets::RESERVED_DESCRIPTORS as usize) * 9
            / 10)
            .clamp(1_000, 10_000);
    let idle_counts: Vec<usize> = if quick {
        vec![1_000]
    } else {
        vec![1_000, most_idle]
    };
    let per_pod = (most_idle + 100).to_string();
    // ztunnel's pods sit outside meshlet's mesh (namespace `legacy`): one ztunnel each, as
    // Istio's dedicated mode runs it.
    let mut legacy = vec![("bystander", 0)];
    if ztunnel.is_some() {
        legacy.extend([("zclient", 0), ("zserver", 1), ("zneighbour", 1)]);
    }
    let mesh = FileMesh::layout(
        &[
            ("client", 0),
            ("server", 1),
            ("neighbour", 1),
            ("plain-server", 1),
        ],
        &legacy,
        vec![],
        |_, _| vec!["--max-connections-per-pod".into(), per_pod.clone()],
    );
    // plain-server is in `demo` by the fixture; move it out of the mesh with the opt-out label.
    let mut objects = vec![];
    let mut plain = mesh.cluster.pod("plain-server").manifest(
        "demo",
        &[
            ("app", "plain-server"),
            ("meshlet.io/dataplane-mode", "none"),
        ],
    );
    plain["metadata"]["name"] = "plain-server".into();
    objects.push(plain);
    mesh.write(&objects);
    let cluster = &mesh.cluster;
    // ztunnel gets as many worker threads as meshlet's data plane.
    let mut ztunnels = Vec::new();
    let zdir = std::env::temp_dir().join(format!("{}-ztunnel", cluster.id()));
    if let Some(binary) = ztunnel {
        std::fs::create_dir_all(&zdir)?;
        let config = zdir.join("ztunnel.yaml");
        let workloads: Vec<zt::Workload> = ["zclient", "zserver", "zneighbour"]
            .iter()
            .map(|pod| zt::Workload::of(cluster.pod(pod), "legacy"))
            .collect();
        std::fs::write(&config, zt::config(&workloads))?;
        for pod in ["zclient", "zserver", "zneighbour"] {
            ztunnels.push(zt::Ztunnel::start(
                binary,
                cluster,
                pod,
                "legacy",
                &config,
                meshlet::cli::DATA_PLANE_THREADS,
            ));
        }
        for client in ["zclient", "zneighbour"] {
            zt::redirect(cluster.pod(client), cluster.pod("zserver").ipv4.into());
        }
    }
    let mut servers = Vec::new();
    let server_pods: &[&str] = match ztunnel {
        Some(_) => &["server", "plain-server", "zserver"],
        None => &["server", "plain-server"],
    };
    for &name in server_pods {
        let pod = cluster.pod(name);
        servers.push(pod.echo_server(8080));
        let mut sink = pod.command(process::testpod_binary());
        sink.args(["sink", "--port", "9000"]);
        servers.push(meshlet_tests::Process::spawn_ready(sink));
    }
    let agents: Vec<u32> = mesh.agents.iter().map(|a| a.pid()).collect();
    let measure = |client: &str,
                   to: SocketAddr,
                   what: &str,
                   bytes: u64,
                   count: usize|
     -> anyhow::Result<serde_json::Value> {
        let mut command = cluster.pod(client).command(process::testpod_binary());
        command.args([
            "measure",
            "--what",
            what,
            "--to",
            &to.to_string(),
            "--bytes",
            &bytes.to_string(),
            "--count",
            &count.to_string(),
        ]);
        let out = command.output()?;
        ensure!(
            out.status.success(),
            "measure {what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    // direct: bystander (outside the mesh) -> plain-server (opted out), across nodes.
    let addr = |pod: &str, port: u16| cluster.pod(pod).addr(false, port);
    let mut paths: Vec<(&str, &str, SocketAddr, SocketAddr)> = vec![
        (
            "direct",
            "bystander",
            addr("plain-server", 8080),
            addr("plain-server", 9000),
        ),
        (
            "meshlet",
            "client",
            addr("server", 8080),
            addr("server", 9000),
        ),
        (
            "meshlet-samenode",
            "neighbour",
            addr("server", 8080),
            addr("server", 9000),
        ),
        // A mesh pod to one outside the mesh: its agent carries the connection in plaintext
        // (what leaves the mesh is not tunnelled), the same route as direct plus the capture.
        (
            "meshlet-passthrough",
            "client",
            addr("plain-server", 8080),
            addr("plain-server", 9000),
        ),
    ];
    let mut external = Vec::new();
    if let Some(command) = external_proxy {
        for (listen_port, upstream) in [
            (18080u16, addr("plain-server", 8080)),
            (19000, addr("plain-server", 9000)),
        ] {
            let listen = SocketAddr::from(([127, 0, 0, 1], listen_port));
            let line = command
                .replace("{listen_port}", &listen_port.to_string())
                .replace("{listen}", &listen.to_string())
                .replace("{upstream}", &upstream.to_string());
            let mut shell = cluster.pod("bystander").command("sh");
            shell
                .args(["-c", &line])
                .stdout(std::process::Stdio::null());
            external.push(KillOnDrop(
                shell
                    .spawn()
                    .with_context(|| format!("start the external proxy: {line}"))?,
            ));
            let deadline = Instant::now() + std::time::Duration::from_secs(10);
            while cluster
                .pod("bystander")
                .in_netns(|| std::net::TcpStream::connect(listen))
                .is_err()
            {
                ensure!(
                    Instant::now() < deadline,
                    "the external proxy never listened on {listen}: {line}"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        paths.push((
            "external",
            "bystander",
            "127.0.0.1:18080".parse()?,
            "127.0.0.1:19000".parse()?,
        ));
    }
    if ztunnel.is_some() {
        paths.push((
            "ztunnel",
            "zclient",
            addr("zserver", 8080),
            addr("zserver", 9000),
        ));
        paths.push((
            "ztunnel-samenode",
            "zneighbour",
            addr("zserver", 8080),
            addr("zserver", 9000),
        ));
    }
    let zpids: Vec<u32> = ztunnels.iter().map(zt::Ztunnel::pid).collect();
    // The proxies whose CPU a path costs: meshlet's agents, or ztunnel's processes.
    let proxies = |path: &str| -> &[u32] {
        match path.starts_with("ztunnel") {
            true => &zpids,
            false => &agents,
        }
    };
    if let Some((profile, only)) = profile.and_then(|p| Some((p, p.only.as_deref()?))) {
        let &(path, client, echo, sink) = paths
            .iter()
            .find(|(path, ..)| *path == only)
            .with_context(|| {
                format!(
                    "--only {only}: no such path (these run: {})",
                    paths.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
                )
            })?;
        let pids = proxies(path);
        let list = pids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        println!("{path}: proxies {list}");
        // perf attaches to the proxies for the repetitions only, and stops with SIGINT.
        let perf = match &profile.perf {
            Some(perf) => {
                let mut command = std::process::Command::new("perf");
                command.args(perf.split_whitespace()).args(["-p", &list]);
                let child = KillOnDrop(command.spawn().context("start perf")?);
                // perf is attached once it has opened its counters: give it that moment.
                std::thread::sleep(std::time::Duration::from_millis(500));
                Some(child)
            }
            None => None,
        };
        // perf writes its report or data file on SIGINT, also when a measurement fails.
        let stop_perf = |perf: Option<KillOnDrop>| -> anyhow::Result<()> {
            if let Some(mut perf) = perf {
                std::process::Command::new("kill")
                    .args(["-INT", &perf.0.id().to_string()])
                    .status()?;
                perf.0.wait()?;
            }
            Ok(())
        };
        let mut measured = Vec::new();
        for _ in 0..profile.repeat {
            let before: f64 = pids.iter().map(|&p| cpu_seconds(p).unwrap_or(0.0)).sum();
            let figures = match profile.what.as_str() {
                "throughput" => measure(client, sink, "throughput", bytes, 0),
                "pingpong" => measure(client, echo, "pingpong", 0, pings),
                "connect-rate" => measure(client, echo, "connect-rate", 0, connects),
                _ => measure(client, echo, "latency", 1_000, latency_samples),
            };
            let figures = match figures {
                Ok(figures) => figures,
                Err(err) => {
                    stop_perf(perf)?;
                    return Err(err);
                }
            };
            let cpu = pids
                .iter()
                .map(|&p| cpu_seconds(p).unwrap_or(0.0))
                .sum::<f64>()
                - before;
            println!("{path} {}: {figures} proxy_cpu_s={cpu:.2}", profile.what);
            measured.push(serde_json::json!({"figures": figures, "proxy_cpu_s": cpu}));
        }
        stop_perf(perf)?;
        return Ok(serde_json::json!({ "path": path, "what": profile.what, "runs": measured }));
    }
    let mut figures: std::collections::BTreeMap<(&str, &str), Vec<f64>> = Default::default();
    for _ in 0..rounds {
        for &(path, client, echo, sink) in &paths {
            let pids = proxies(path);
            let cpu_before: f64 = pids.iter().map(|&p| cpu_seconds(p).unwrap_or(0.0)).sum();
            let t = measure(client, sink, "throughput", bytes, 0)?;
            let cpu = pids
                .iter()
                .map(|&p| cpu_seconds(p).unwrap_or(0.0))
                .sum::<f64>()
                - cpu_before;
            let mut push = |metric: &'static str, value: f64| {
                figures.entry((path, metric)).or_default().push(value)
            };
            push("throughput_gbit_s", t["gbit_per_s"].as_f64().unwrap_or(0.0));
            push(
                "agent_cpu_s_per_gib",
                cpu / (bytes as f64 / (1u64 << 30) as f64),
            );
            push(
                "pingpong_per_s",
                measure(client, echo, "pingpong", 0, pings)?["per_s"]
                    .as_f64()
                    .unwrap_or(0.0),
            );
            push(
                "connections_per_s",
                measure(client, echo, "connect-rate", 0, connects)?["per_s"]
                    .as_f64()
                    .unwrap_or(0.0),
            );
            let l = measure(client, echo, "latency", 1_000, latency_samples)?;
            for q in ["p50_us", "p90_us", "p99_us", "p999_us"] {
                push(
                    match q {
                        "p50_us" => "latency_p50_us",
                        "p90_us" => "latency_p90_us",
                        "p99_us" => "latency_p99_us",
                        _ => "latency_p999_us",
                    },
                    l[q].as_f64().unwrap_or(0.0),
                );
            }
        }
    }
    let median = |values: &Vec<f64>| {
        let mut v = values.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    // The path each is compared with besides direct: ztunnel's counterpart.
    let counterpart = |path: &str| {
        match path {
            "meshlet" => Some("ztunnel"),
            "meshlet-samenode" => Some("ztunnel-samenode"),
            _ => None,
        }
        .filter(|z| figures.contains_key(&(*z, "throughput_gbit_s")))
    };
    println!(
        "\npod -> pod ({rounds} interleaved rounds; median [min..max]; xN: ratio to direct; zN: meshlet's ratio to ztunnel's)"
    );
    let header: String = paths
        .iter()
        .map(|(path, ..)| format!(" {path:>36}"))
        .collect();
    println!("  {:<22}{header}", "");
    let mut json = serde_json::Map::new();
    for metric in [
        "throughput_gbit_s",
        "pingpong_per_s",
        "connections_per_s",
        "latency_p50_us",
        "latency_p90_us",
        "latency_p99_us",
        "latency_p999_us",
        "agent_cpu_s_per_gib",
    ] {
        let cell = |path: &str| -> String {
            let v = &figures[&(path, metric)];
            let (lo, hi) = (
                v.iter().cloned().fold(f64::MAX, f64::min),
                v.iter().cloned().fold(0.0, f64::max),
            );
            let direct = median(&figures[&("direct", metric)]);
            let ratio = if path == "direct" || direct == 0.0 {
                String::new()
            } else {
                format!(" x{:.2}", median(v) / direct)
            };
            let versus = counterpart(path)
                .map(|z| median(&figures[&(z, metric)]))
                .filter(|z| *z != 0.0)
                .map(|z| format!(" z{:.2}", median(v) / z))
                .unwrap_or_default();
            format!("{:.2} [{lo:.2}..{hi:.2}]{ratio}{versus}", median(v))
        };
        let row: String = paths
            .iter()
            .map(|(path, ..)| format!(" {:>36}", cell(path)))
            .collect();
        println!("  {metric:<22}{row}");
        let per_path: serde_json::Map<String, serde_json::Value> = paths
            .iter()
            .map(|(path, ..)| {
                (
                    path.to_string(),
                    serde_json::json!(figures[&(*path, metric)]),
                )
            })
            .collect();
        json.insert(metric.into(), serde_json::Value::Object(per_path));
        for path in ["meshlet", "meshlet-samenode"] {
            if let Some(z) = counterpart(path) {
                let ratio = median(&figures[&(path, metric)]) / median(&figures[&(z, metric)]);
                json.insert(format!("{metric}_{path}_to_{z}"), ratio.into());
            }
        }
    }
    println!(
        "  (agent CPU counts both agents; on the direct path it is what they spend while idle)"
    );

    // Proxy memory with idle tunneled connections: meshlet's two agents, then the ztunnels of
    // the client and the server pod.
    let idle_rss = |proxy: &str,
                    pids: &[u32],
                    sides: [&str; 2],
                    client: &str,
                    server: &str|
     -> anyhow::Result<serde_json::Value> {
        let rss = || -> anyhow::Result<Vec<u64>> { pids.iter().map(|&pid| rss_of(pid)).collect() };
        let mib = |bytes: u64| bytes as f64 / 1048576.0;
        // Both sides' RSS, each with a note.
        let both = |rss: &[u64], note: &dyn Fn(usize) -> String| {
            format!(
                "{} {:.1} MiB ({}), {} {:.1} MiB ({})",
                sides[0],
                mib(rss[0]),
                note(0),
                sides[1],
                mib(rss[1]),
                note(1)
            )
        };
        let idle0 = rss()?;
        println!(
            "  {proxy} RSS at 0 idle connections: {} {:.1} MiB, {} {:.1} MiB",
            sides[0],
            mib(idle0[0]),
            sides[1],
            mib(idle0[1])
        );
        let mut rss_json = vec![serde_json::json!({ "connections": 0, "rss_bytes": idle0 })];
        for &idle in &idle_counts {
            let mut hold = cluster.pod(client).command(process::testpod_binary());
            hold.args([
                "measure",
                "--what",
                "hold",
                "--to",
                &cluster.pod(server).addr(false, 8080).to_string(),
                "--count",
                &idle.to_string(),
            ]);
            let opened = Instant::now();
            let holder = meshlet_tests::Process::spawn_ready_within(hold, HOLD_TIMEOUT);
            let opened = opened.elapsed();
            std::thread::sleep(std::time::Duration::from_millis(500));
            let now = rss()?;
            drop(holder);
            let each = |i: usize| (now[i] as f64 - idle0[i] as f64) / idle as f64 / 1024.0;
            println!(
                "  {proxy} RSS at {idle} idle tunneled connections (opened in {opened:.1?}): {}",
                both(&now, &|i| format!("{:.1} KiB each", each(i)))
            );
            rss_json.push(serde_json::json!({ "connections": idle, "rss_bytes": now }));
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        // The recovery figure: RSS 30 s after the largest burst closed, against the
        // idle baseline (a full run only: it is half a minute of waiting).
        if !quick {
            std::thread::sleep(AFTER_BURST);
            let after = rss()?;
            let growth = |i: usize| (after[i] as f64 / idle0[i] as f64 - 1.0) * 100.0;
            println!(
                "  {proxy} RSS {AFTER_BURST:?} after the {most_idle}-connection burst closed: {}",
                both(&after, &|i| format!("{:+.0}% of idle", growth(i)))
            );
            rss_json.push(serde_json::json!({
                "after_burst_of": most_idle,
                "after_s": AFTER_BURST.as_secs(),
                "rss_bytes": after,
            }));
        }
        Ok(serde_json::Value::Array(rss_json))
    };
    json.insert(
        "agent_rss".into(),
        idle_rss(
            "agent",
            &agents,
            ["node-0 (client side)", "node-1 (server side)"],
            "client",
            "server",
        )?,
    );
    if zpids.len() >= 2 {
        json.insert(
            "ztunnel_rss".into(),
            idle_rss(
                "ztunnel",
                &zpids[..2],
                ["zclient's", "zserver's"],
                "zclient",
                "zserver",
            )?,
        );
    }
    drop(ztunnels);
    let _ = std::fs::remove_dir_all(&zdir);
    drop(external);
    drop(servers);
    Ok(serde_json::Value::Object(json))
}

/// Resident memory of this process, in bytes.
fn rss() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm.split(' ').nth(1).context("statm")?.parse()?;
    Ok(pages * 4096)
}

fn store(pods: usize, services: usize) -> anyhow::Result<serde_json::Value> {
    use meshlet::workload::{
        Store,
        model::{
            Endpoint, EndpointPort, EndpointSlice, Labels, Object, ObjectKey, Pod, Service,
            ServicePort, TargetPort,
        },
    };
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    let pod_ip = |i: usize| IpAddr::V4(Ipv4Addr::from(0x0af4_0000u32 + i as u32)); // 10.244.0.0 + i
    let vip = |i: usize| IpAddr::V4(Ipv4Addr::from(0x0a60_0000u32 + i as u32)); // 10.96.0.0 + i
    let store = Store::new();
    let base = rss()?;
    let start = Instant::now();
    for i in 0..pods {
        let namespace = format!("ns-{}", i % 100);
        store.upsert(Object::Pod(Pod {
            key: ObjectKey::new(namespace, format!("pod-{i}")),
            uid: format!("{i:08x}-0000-4000-8000-000000000000"),
            labels: [("app".to_owned(), format!("app-{}", i % services.max(1)))].into(),
            annotations: Labels::new(),
            service_account: format!("sa-{}", i % 1000),
            node_name: Some(format!("node-{}", i % 100)),
            ips: vec![pod_ip(i)],
            host_network: false,
            phase: "Running".into(),
            ready: true,
            owner: None,
            names: Default::default(),
        }));
    }
    let load_pods = start.elapsed();
    let after_pods = rss()?;
    for s in 0..services {
        let namespace = format!("ns-{}", s % 100);
        store.upsert(Object::Service(Service {
            key: ObjectKey::new(namespace.clone(), format!("svc-{s}")),
            cluster_ips: vec![vip(s)],
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                target_port: TargetPort::Number(8080),
                protocol: "TCP".into(),
            }],
            selector: Some([("app".to_owned(), format!("app-{s}"))].into()),
            names: Default::default(),
        }));
        store.upsert(Object::EndpointSlice(EndpointSlice {
            key: ObjectKey::new(namespace, format!("svc-{s}-abcde")),
            service: format!("svc-{s}"),
            ports: vec![EndpointPort {
                name: "http".into(),
                port: 8080,
            }],
            endpoints: (0..10)
                .map(|e| Endpoint {
                    addresses: vec![pod_ip((s * 10 + e) % pods.max(1))],
                    ready: true,
                    target_pod: None,
                })
                .collect(),
        }));
    }
    let after_services = rss()?;

    // Lookups: a fixed pseudo-random sequence, so runs compare.
    let lookups = 2_000_000;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let ips: Vec<IpAddr> = (0..4096).map(|_| pod_ip(next(pods))).collect();
    let vips: Vec<SocketAddr> = (0..4096)
        .map(|_| SocketAddr::new(vip(next(services)), 80))
        .collect();
    let start = Instant::now();
    let mut found = 0usize;
    for i in 0..lookups {
        found += usize::from(store.pod_by_ip(ips[i & 4095]).is_some());
    }
    let ip_rate = lookups as f64 / start.elapsed().as_secs_f64();
    ensure!(found == lookups, "pod lookups missed");
    let start = Instant::now();
    let mut endpoints = 0usize;
    for i in 0..lookups {
        endpoints += store
            .service_by_vip(vips[i & 4095])
            .map_or(0, |(_, e)| e.len());
    }
    let vip_rate = lookups as f64 / start.elapsed().as_secs_f64();
    ensure!(endpoints == lookups * 10, "VIP lookups missed");

    let per_pod = (after_pods - base) as f64 / pods as f64;
    let per_service = (after_services - after_pods) as f64 / services.max(1) as f64;
    println!("\nworkload store ({pods} pods, {services} services with 10 endpoints each)");
    println!(
        "  load {pods} pods                  {:>10.0} ms",
        load_pods.as_secs_f64() * 1000.0
    );
    println!("  memory per pod (RSS delta)      {per_pod:>10.0} bytes");
    println!("  memory per service + slice      {per_service:>10.0} bytes");
    println!(
        "  IP -> workload lookups          {:>10.1} M/s (one thread)",
        ip_rate / 1e6
    );
    println!(
        "  VIP:port -> endpoints lookups   {:>10.1} M/s (one thread)",
        vip_rate / 1e6
    );
    Ok(serde_json::json!({
        "pods": pods, "services": services, "load_pods_ms": load_pods.as_millis() as u64,
        "bytes_per_pod": per_pod, "bytes_per_service": per_service,
        "ip_lookups_per_s": ip_rate, "vip_lookups_per_s": vip_rate,
    }))
}

fn install(cluster: &Cluster) -> anyhow::Result<Capture> {
    let config = capture::Config::resolve(
        Some(cluster.cgroup_root(0).to_owned()),
        Some(cluster.bpffs_dir(0).to_owned()),
    )?;
    Ok(Capture::install(config)?)
}

fn enroll(namespaces: usize, quick: bool) -> anyhow::Result<serde_json::Value> {
    let namespaces = if quick {
        namespaces.min(200)
    } else {
        namespaces
    };
    let mut cluster = Cluster::new(1);
    let mut capture = install(&cluster)?;
    let start = Instant::now();
    let all: Vec<_> = cluster
        .add_bare_namespaces(namespaces)
        .iter()
        .map(|ns| ns.open())
        .collect();
    println!(
        "\ncreated {namespaces} network namespaces in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // Enroll all, timing each; then time unenroll + re-enroll of a sample at full occupancy.
    let mut enroll_ns = Vec::with_capacity(namespaces);
    let mut cookies = Vec::with_capacity(namespaces);
    for (i, netns) in all.iter().enumerate() {
        let ip = std::net::Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250) as u8 + 1);
        let start = Instant::now();
        cookies.push(capture.enroll(netns, &[ip.into()])?);
        enroll_ns.push(start.elapsed().as_nanos() as u64);
    }
    ensure!(
        capture.enrolled()?.len() == namespaces,
        "not every namespace was enrolled"
    );
    let sample = (namespaces / 10).max(10).min(namespaces);
    let mut unenroll_full = Vec::new();
    let mut reenroll_full = Vec::new();
    for (i, &cookie) in cookies.iter().enumerate().take(sample) {
        let start = Instant::now();
        capture.unenroll(cookie)?;
        unenroll_full.push(start.elapsed().as_nanos() as u64);
        let ip = std::net::Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250) as u8 + 1);
        let start = Instant::now();
        capture.enroll(&all[i], &[ip.into()])?;
        reenroll_full.push(start.elapsed().as_nanos() as u64);
    }
    let mut unenroll_all = Vec::new();
    for cookie in cookies {
        let start = Instant::now();
        capture.unenroll(cookie)?;
        unenroll_all.push(start.elapsed().as_nanos() as u64);
    }

    header(&format!(
        "enroll / unenroll one pod network namespace ({namespaces} namespaces)"
    ));
    let first = Summary::of(enroll_ns[..sample].to_vec());
    let last = Summary::of(enroll_ns[namespaces - sample..].to_vec());
    let reenroll = Summary::of(reenroll_full);
    let unenroll_at_full = Summary::of(unenroll_full);
    let unenroll_last = Summary::of(unenroll_all[namespaces - sample..].to_vec());
    first.row(&format!("enroll, first {sample} (0..{sample} enrolled)"));
    last.row(&format!(
        "enroll, last {sample} ({}..{namespaces} enrolled)",
        namespaces - sample
    ));
    reenroll.row(&format!("enroll at {namespaces} enrolled"));
    unenroll_at_full.row(&format!("unenroll at {namespaces} enrolled"));
    unenroll_last.row(&format!("unenroll, last {sample} (few enrolled)"));
    Ok(serde_json::json!({
        "namespaces": namespaces,
        "enroll_first": first, "enroll_last": last, "enroll_full": reenroll,
        "unenroll_full": unenroll_at_full, "unenroll_last": unenroll_last,
    }))
}

fn connect(quick: bool) -> anyhow::Result<serde_json::Value> {
    let (rounds, per_round) = if quick { (3, 300) } else { (7, 1000) };
    let mut cluster = Cluster::new(2);
    cluster.add_pod("client", 0);
    cluster.add_pod("bystander", 0);
    cluster.add_pod("server", 1);
    let mut capture = install(&cluster)?;
    let (client, bystander, server) = (
        cluster.pod("client"),
        cluster.pod("bystander"),
        cluster.pod("server"),
    );
    let _echo = server.echo_server(8080);
    let listener: SocketAddr = "127.0.0.1:15001".parse()?;
    let _proxy = cluster.proxy_listeners("client", &[listener]);
    capture.enroll(
        &client.netns.open(),
        &[client.ipv4.into(), client.ipv6.into()],
    )?;
    let remote = server.addr(false, 8080);

    let run = |pod: &meshlet_tests::Pod, to: SocketAddr| -> anyhow::Result<Vec<u64>> {
        let mut command = pod.command(process::testpod_binary());
        command.args([
            "connect-bench",
            "--to",
            &to.to_string(),
            "--count",
            &per_round.to_string(),
        ]);
        let out = command.output()?;
        ensure!(
            out.status.success(),
            "connect-bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let (mut local, mut redirected, mut direct) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        local.extend(run(client, listener)?);
        redirected.extend(run(client, remote)?);
        direct.extend(run(bystander, remote)?);
    }
    let redirects = capture.redirects()?.outbound;
    ensure!(
        redirects == (rounds * per_round) as u64,
        "expected {} redirects, counted {redirects}",
        rounds * per_round
    );

    header(&format!(
        "connect latency from a pod ({rounds} interleaved rounds of {per_round} connects)"
    ));
    let local = Summary::of(local);
    let redirected = Summary::of(redirected);
    let direct = Summary::of(direct);
    local.row("to the in-pod listener directly (baseline)");
    redirected.row("to a remote pod, redirected to that listener");
    direct.row("to the remote pod directly, not enrolled");
    println!(
        "  added by redirection: p50 {:+.1} µs, p99 {:+.1} µs",
        redirected.p50_us - local.p50_us,
        redirected.p99_us - local.p99_us
    );
    Ok(
        serde_json::json!({ "in_pod_listener": local, "redirected": redirected, "direct_remote": direct }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiling_flags_need_a_path_and_a_known_measurement() {
        let parse = |args: &[&str]| {
            Args::try_parse_from(["meshlet-bench", "tunnel"].iter().chain(args)).map(|a| a.scenario)
        };
        let Ok(Scenario::Tunnel { profile }) =
            parse(&["--only", "meshlet", "--what", "pingpong", "--repeat", "2"])
        else {
            panic!("a well-formed profile was refused");
        };
        assert_eq!(
            (
                profile.only.as_deref(),
                profile.what.as_str(),
                profile.repeat
            ),
            (Some("meshlet"), "pingpong", 2)
        );
        for bad in [
            &["--what", "pingpong"][..],
            &["--perf", "stat"],
            &["--only", "meshlet", "--what", "everything"],
            &["--only", "meshlet", "--repeat", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
