//! `meshlet-demo` (run by `cargo xtask demo`): meshlet on a simulated two-node cluster made of
//! network namespaces, step by step. Every claim it prints is checked; it exits non-zero the
//! moment one does not hold, and removes everything it made on exit, on failure and on Ctrl-C.
//!
//! This is the capture-stage demo: the real agent attaches the real eBPF programs to the
//! cluster's cgroup root; an enrolled pod's connections land on its in-pod listener with their
//! original destination; capture survives an agent restart; `meshlet uninstall` removes it.
//! The tunnel (mTLS), workload discovery and policy are not built yet, and the demo does not
//! pretend they are: a stand-in listens where the proxy will.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use meshlet::capture::{self, Capture, FailMode};
use meshlet_tests::{Cluster, process::meshlet_binary, teardown};

/// Walk through meshlet on a simulated two-node cluster.
#[derive(Debug, Parser)]
struct Args {
    /// Leave the cluster and agent running at the end, and print how to poke at them.
    #[arg(long)]
    keep: bool,
}

const STEPS: usize = 6;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    meshlet_tests::require_root();
    let mut cluster = Cluster::new(2);
    cleanup_on_ctrl_c(cluster.id().to_owned());
    let result = walk_through(&mut cluster, args.keep);
    if args.keep && result.is_ok() {
        std::mem::forget(cluster);
    }
    result
}

fn walk_through(cluster: &mut Cluster, keep: bool) -> anyhow::Result<()> {
    println!(
        "meshlet demo: capture on a simulated two-node cluster ({})\n",
        cluster.id()
    );

    step(
        1,
        "create the cluster: two nodes, three one-container pods (no sidecars)",
    );
    cluster.add_pod("client", 0);
    cluster.add_pod("server", 1);
    cluster.add_pod("bystander", 0);
    for name in ["client", "server", "bystander"] {
        let pod = cluster.pod(name);
        println!(
            "      {:<10} node-{}  {:<12} {}",
            pod.name,
            pod.node,
            pod.ipv4.to_string(),
            pod.ipv6
        );
    }
    let mut echo = cluster.pod("server").echo_server(8080);
    println!("      the server pod runs a TCP echo server on port 8080");

    step(
        2,
        "start `meshlet agent` on node-0: it loads the eBPF programs and attaches them",
    );
    let log = std::env::temp_dir().join(format!("{}-agent.log", cluster.id()));
    let _ = std::fs::remove_file(&log);
    let mut agent = start_agent(cluster, &log)?;
    let programs = wait_attached(cluster.cgroup_root(), 6)?;
    show_log(&log, "capture installed", 0)?;
    println!("      the kernel's own list (bpftool cgroup show <root>):");
    for (id, attach_type, name) in &programs {
        println!("        prog id {id:<6} {attach_type:<26} {name}");
    }

    step(
        3,
        "enroll the client pod (the capture API the agent's enrollment will drive)",
    );
    // The agent learns which pods to enroll from the Kubernetes API once the workloads work
    // lands; until then the demo drives the same capture module the agent uses.
    let mut config = capture::Config::resolve(
        Some(cluster.cgroup_root().to_owned()),
        Some(cluster.bpffs_dir().to_owned()),
    )?;
    config.fail_mode = FailMode::Closed;
    let mut capture = Capture::install(config)?;
    let client = cluster.pod("client");
    let mut proxy = cluster.proxy_listeners(
        "client",
        &["127.0.0.1:15001".parse()?, "[::1]:15001".parse()?],
    );
    let cookie = capture.enroll(
        &client.netns.open(),
        &[client.ipv4.into(), client.ipv6.into()],
    )?;
    println!(
        "      client netns cookie {cookie} enrolled; a stand-in for the proxy listens on its 127.0.0.1:15001"
    );

    step(
        4,
        "traffic: client -> server:8080 is captured; bystander -> server:8080 is not",
    );
    let server = cluster.pod("server").addr(false, 8080);
    let report = client.connect(server, 1024);
    ensure!(
        report.error.is_none() && report.echoed == 1024,
        "client connection failed: {report:?}"
    );
    let accepted = proxy.next_accepted();
    println!(
        "      client connect({server}) was accepted by {} in the client pod",
        accepted.local
    );
    let shown = |addr: Option<Result<std::net::SocketAddr, String>>| match addr {
        Some(Ok(addr)) => addr.to_string(),
        other => format!("{other:?}"),
    };
    println!(
        "      SO_ORIGINAL_DST on the accepted socket: {}",
        shown(accepted.original_dst.clone())
    );
    println!(
        "      the client's getpeername(): {}",
        shown(report.peer.map(Ok))
    );
    ensure!(
        accepted.original_dst == Some(Ok(server)),
        "SO_ORIGINAL_DST did not give the original destination"
    );
    ensure!(
        report.peer == Some(server),
        "getpeername did not give the original destination"
    );
    cluster
        .pod("bystander")
        .connect(server, 1024)
        .assert_echoed(1024);
    let direct = echo.next_accepted();
    println!(
        "      the server saw the bystander directly, from {}",
        direct.peer
    );
    ensure!(
        echo.try_next_accepted(Duration::from_millis(200)).is_none(),
        "a captured connection reached the server"
    );
    let redirects = capture.redirects()?;
    println!(
        "      eBPF counters: {} outbound, {} inbound redirects",
        redirects.outbound, redirects.inbound
    );
    ensure!(
        redirects.outbound == 1,
        "expected 1 outbound redirect, the kernel counted {}",
        redirects.outbound
    );
    drop(capture);

    step(
        5,
        "restart the agent: capture stays attached through its pins, and is adopted",
    );
    stop(&mut agent)?;
    client.connect(server, 10).assert_echoed(10);
    ensure!(
        proxy.next_accepted().original_dst == Some(Ok(server)),
        "capture stopped with the agent"
    );
    println!("      agent stopped: a new client connection is still captured");
    let mut agent = start_agent(cluster, &log)?;
    wait_for_log(&log, "adopted=6")?;
    show_log(&log, "capture installed", 1)?;
    let after_restart = wait_attached(cluster.cgroup_root(), 6)?;
    ensure!(
        after_restart == programs,
        "the restarted agent attached again instead of adopting"
    );
    println!("      agent restarted: the same six attachments, no duplicates");

    if keep {
        println!("\nleft running (--keep):");
        println!(
            "  agent pid {} on node-0, log {}; pins in {}",
            agent.id(),
            log.display(),
            cluster.bpffs_dir().display()
        );
        println!("  bpftool cgroup show {}", cluster.cgroup_root().display());
        println!(
            "  nsenter --net=/var/run/netns/{}-p0 bash   # a shell in the client pod's network",
            cluster.id()
        );
        println!(
            "  clean up: {} uninstall --bpffs-dir {}, then delete the namespaces `ip netns | grep {}`",
            meshlet_binary().display(),
            cluster.bpffs_dir().display(),
            cluster.id()
        );
        std::mem::forget(agent);
        std::mem::forget(proxy);
        std::mem::forget(echo);
        return Ok(());
    }

    step(
        6,
        "uninstall: `meshlet uninstall` detaches and unpins everything",
    );
    stop(&mut agent)?;
    let out = Command::new(meshlet_binary())
        .args(["uninstall", "--bpffs-dir"])
        .arg(cluster.bpffs_dir())
        .output()
        .context("run meshlet uninstall")?;
    ensure!(
        out.status.success(),
        "meshlet uninstall failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    print!("      {}", String::from_utf8_lossy(&out.stdout));
    ensure!(
        wait_attached(cluster.cgroup_root(), 0)?.is_empty(),
        "programs still attached after uninstall"
    );
    client.connect(server, 10).assert_echoed(10);
    ensure!(
        echo.next_accepted().peer.ip().to_canonical() == std::net::IpAddr::from(client.ipv4),
        "still captured"
    );
    println!(
        "      checked: nothing attached, the client reaches the server directly again; removing the cluster"
    );
    let _ = std::fs::remove_file(&log);
    Ok(())
}

fn step(n: usize, what: &str) {
    println!("\n[{n}/{STEPS}] {what}");
}

/// Starts the agent on node-0, its log going to `log`.
fn start_agent(cluster: &Cluster, log: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut command = cluster.agent_command(0);
    command
        .arg("agent")
        .args(cluster.agent_flags())
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log);
    command.spawn().context("start meshlet agent")
}

/// Prints the agent's log lines that contain `needle`, indented; fails if there are none.
fn show_log(log: &Path, needle: &str, skip: usize) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(log)?;
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(needle))
        .skip(skip)
        .collect();
    ensure!(
        !lines.is_empty(),
        "the agent never logged {needle:?}; its log is {}",
        log.display()
    );
    for line in lines {
        println!(
            "      agent log: {}",
            line.split_once("meshlet::").map_or(line, |(_, rest)| rest)
        );
    }
    Ok(())
}

fn stop(agent: &mut Child) -> anyhow::Result<()> {
    Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status()?;
    let status = agent.wait()?;
    ensure!(status.success(), "meshlet agent exited with {status}");
    Ok(())
}

fn wait_for_log(log: &Path, needle: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(log)?.contains(needle) {
        ensure!(
            Instant::now() < deadline,
            "the agent never logged {needle:?}; its log is {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Waits until exactly `want` programs are attached to `cgroup` and returns them.
fn wait_attached(cgroup: &Path, want: usize) -> anyhow::Result<Vec<(u64, String, String)>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(cgroup)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let programs: Vec<serde_json::Value> = if text.trim().is_empty() {
            Vec::new()
        } else {
            serde_json::from_str(&text)?
        };
        let programs: Vec<_> = programs
            .iter()
            .map(|p| {
                (
                    p["id"].as_u64().unwrap_or(0),
                    p["attach_type"].as_str().unwrap_or("").to_owned(),
                    p["name"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        if programs.len() == want {
            return Ok(programs);
        }
        if Instant::now() > deadline {
            bail!(
                "expected {want} program(s) attached to {}, found {programs:?}",
                cgroup.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// On Ctrl-C, remove everything the cluster made (its agent dies with its cgroup) and exit.
fn cleanup_on_ctrl_c(id: String) {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("signal runtime");
        runtime.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ninterrupted: removing the demo cluster {id}");
                teardown(&id);
                std::process::exit(130);
            }
        });
    });
}
