//! `meshlet-demo` (run by `cargo xtask demo`): meshlet on a simulated two-node cluster made of
//! network namespaces, step by step. Every claim it prints is checked; it exits non-zero the
//! moment one does not hold, and removes everything it made on exit, on failure and on Ctrl-C.
//!
//! This is the foundation-stage demo: the real agent attaches the real connect4 program to the
//! cluster's cgroup root, the kernel counts the pods' connects, the attachment survives an agent
//! restart, and `meshlet uninstall` removes it. Redirection, mTLS and policy are not built yet,
//! and the demo does not pretend they are.

use std::{
    collections::HashMap,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
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
    cluster.add_pod_outside_root("outsider", 0);
    for name in ["client", "server", "outsider"] {
        let pod = cluster.pod(name);
        let cgroup = pod
            .cgroup
            .strip_prefix(cluster.cgroup_root())
            .map(|p| format!("<root>/{}", p.display()));
        println!(
            "      {:<9} node-{}  {:<12} {:<22} cgroup {}",
            pod.name,
            pod.node,
            pod.ipv4.to_string(),
            pod.ipv6.to_string(),
            cgroup.unwrap_or_else(|_| "outside the cgroup root".into())
        );
    }
    let _echo = cluster.pod("server").echo_server(8080);
    println!("      the server pod runs a TCP echo server on port 8080");

    step(
        2,
        "start `meshlet agent` on node-0: it loads the eBPF programs and attaches them",
    );
    let log = std::env::temp_dir().join(format!("{}-agent.log", cluster.id()));
    let _ = std::fs::remove_file(&log);
    let mut agent = start_agent(cluster, &log)?;
    let programs = wait_attached(cluster.cgroup_root(), 1)?;
    show_log(&log, "capture program attached", 0)?;
    println!("      the kernel's own list (bpftool cgroup show <root>):");
    for (id, attach_type, name) in &programs {
        println!("        prog id {id:<6} {attach_type:<22} {name}");
    }

    step(
        3,
        "traffic: client -> server 3 connections, outsider -> server 2 connections",
    );
    let server = cluster.pod("server").addr(false, 8080);
    for _ in 0..3 {
        cluster
            .pod("client")
            .connect(server, 1024)
            .assert_echoed(1024);
    }
    for _ in 0..2 {
        cluster
            .pod("outsider")
            .connect(server, 1024)
            .assert_echoed(1024);
    }
    println!("      every connection echoed its 1024 bytes");

    step(
        4,
        "what the eBPF program saw (bpftool map dump of the pinned CONNECTS map)",
    );
    let counts = pinned_counts(&cluster.bpffs_dir().join("maps/CONNECTS"))?;
    let client_cookie = cluster.pod("client").netns_cookie();
    let outsider_cookie = cluster.pod("outsider").netns_cookie();
    let client_count = counts.get(&client_cookie).copied().unwrap_or(0);
    println!("      client   netns cookie {client_cookie:<6} {client_count} connects");
    println!(
        "      outsider netns cookie {outsider_cookie:<6} {} connects",
        counts.get(&outsider_cookie).copied().unwrap_or(0)
    );
    ensure!(
        client_count == 3,
        "expected 3 connects from the client, the kernel counted {client_count}"
    );
    ensure!(
        !counts.contains_key(&outsider_cookie),
        "the pod outside the cgroup root was counted"
    );
    println!("      checked: the pod under the cgroup root is seen, the one outside is not");

    step(
        5,
        "restart the agent: capture stays attached through its pins, and is adopted",
    );
    stop(&mut agent)?;
    let after_stop = wait_attached(cluster.cgroup_root(), 1)?;
    ensure!(
        after_stop == programs,
        "the attachment changed while no agent ran"
    );
    println!(
        "      agent stopped: program {} still attached",
        programs[0].0
    );
    let mut agent = start_agent(cluster, &log)?;
    wait_for_log(&log, "attachment=Adopted")?;
    show_log(&log, "capture program attached", 1)?;
    let after_restart = wait_attached(cluster.cgroup_root(), 1)?;
    ensure!(
        after_restart == programs,
        "the restarted agent attached again instead of adopting"
    );
    println!("      agent restarted: the same single attachment, no duplicate");

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
    println!("      checked: nothing attached, no pins left; removing the cluster");
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

/// Reads a pinned `PerCpuHashMap<u64, u64>` with bpftool and sums each key over CPUs.
fn pinned_counts(pin: &Path) -> anyhow::Result<HashMap<u64, u64>> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin)
        .output()?;
    ensure!(
        out.status.success(),
        "bpftool map dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    let mut counts = HashMap::new();
    for entry in entries {
        let key = le_u64(&entry["key"])?;
        let values = entry["values"].as_array().context("per-CPU values")?;
        let total = values
            .iter()
            .map(|v| le_u64(&v["value"]))
            .sum::<anyhow::Result<u64>>()?;
        counts.insert(key, total);
    }
    Ok(counts)
}

/// bpftool prints raw keys and values as arrays of "0x.." bytes.
fn le_u64(bytes: &serde_json::Value) -> anyhow::Result<u64> {
    let bytes = bytes.as_array().context("byte array")?;
    let mut value = [0u8; 8];
    for (slot, byte) in value.iter_mut().zip(bytes) {
        let text = byte.as_str().context("byte")?;
        *slot = u8::from_str_radix(text.trim_start_matches("0x"), 16)?;
    }
    Ok(u64::from_le_bytes(value))
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
