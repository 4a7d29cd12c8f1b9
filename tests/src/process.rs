//! Processes inside pods: the `meshlet-testpod` helper (echo server, client), started in a
//! pod's network namespace and container cgroup, and killed on drop.
//!
//! cgroup v2 membership belongs to a process, not a thread, so anything the eBPF programs must
//! attribute to a pod runs as a child process that joins the pod's cgroup and network namespace
//! between `fork` and `exec`.
#![allow(
    unsafe_code,
    reason = "Command::pre_exec is unsafe; the hook only makes two syscalls"
)]

use std::{
    ffi::OsStr,
    fs::{File, OpenOptions},
    io::{self, BufRead as _, BufReader},
    net::SocketAddr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// How long to wait for a helper to say it is ready, or to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// `timeout` times `MESHLET_TEST_PATIENCE` (a whole factor, 1 unless set). The tests wait for
/// events, and their deadlines only bound a hang; where everything runs slower, as in
/// `cargo xtask vmtest`'s emulated guests, the same events come later.
pub fn patience(timeout: Duration) -> Duration {
    static FACTOR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let factor = *FACTOR.get_or_init(|| {
        patience_factor(std::env::var("MESHLET_TEST_PATIENCE").ok().as_deref())
            .unwrap_or_else(|err| panic!("{err}"))
    });
    timeout.saturating_mul(factor)
}

/// The factor `MESHLET_TEST_PATIENCE` (`value`) sets: 1 when unset, else a whole number >= 1.
fn patience_factor(value: Option<&str>) -> Result<u32, String> {
    match value {
        None => Ok(1),
        Some(text) => text.trim().parse().ok().filter(|&f| f >= 1).ok_or_else(|| {
            format!("MESHLET_TEST_PATIENCE={text:?}: want a whole factor >= 1, such as 6")
        }),
    }
}

/// A command whose process joins the cgroup `cgroup` and the network namespace at `netns`
/// before it executes: every socket it creates belongs to the pod.
pub fn in_pod(program: impl AsRef<OsStr>, netns: &Path, cgroup: &Path) -> Command {
    let netns = File::open(netns).unwrap_or_else(|err| panic!("open {}: {err}", netns.display()));
    let procs_path = cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .unwrap_or_else(|err| panic!("open {}: {err}", procs_path.display()));
    let mut command = Command::new(program);
    // SAFETY: the hook runs in the forked child before exec and only calls write(2) and
    // setns(2) on descriptors it owns (closed with the Command); both are async-signal-safe and
    // the hook allocates nothing.
    unsafe {
        command.pre_exec(move || {
            // Writing "0" to cgroup.procs moves the writing process.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// The `meshlet-testpod` helper, built next to the test binaries.
pub fn testpod_binary() -> PathBuf {
    workspace_binary("meshlet-testpod")
}

/// The `meshlet` agent binary, built next to the test binaries (`cargo xtask test` builds it),
/// or the one `MESHLET_BINARY` names (to run the suites against another build, e.g. to measure
/// an older release).
pub fn meshlet_binary() -> PathBuf {
    if let Some(path) = baseline() {
        return path;
    }
    match std::env::var_os("MESHLET_BINARY") {
        Some(path) => PathBuf::from(path),
        None => workspace_binary("meshlet"),
    }
}

static BASELINE: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Runs the agents started from now on from `path`, a build from before the handoff (it takes
/// no `--handoff-socket`), to measure it the same way; `None` goes back to this build.
pub fn use_baseline(path: Option<PathBuf>) {
    *BASELINE.lock().unwrap_or_else(|p| p.into_inner()) = path;
}

/// The baseline build in use, if any.
pub fn baseline() -> Option<PathBuf> {
    BASELINE.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.exists())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found near {}: build the workspace's binaries",
                exe.display()
            )
        })
}

/// One connection the echo server accepted, as it reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The local address of the accepted socket.
    pub local: SocketAddr,
    /// The peer's address.
    pub peer: SocketAddr,
    /// What `SO_ORIGINAL_DST` said (proxy listeners only): the address, or the error.
    pub original_dst: Option<Result<SocketAddr, String>>,
}

/// What the `connect` helper reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectReport {
    /// The client's local address, when it connected.
    pub local: Option<SocketAddr>,
    /// What `getpeername` returned, when it connected.
    pub peer: Option<SocketAddr>,
    /// Bytes echoed back and matching what was sent.
    pub echoed: usize,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// How it failed, when it did.
    #[serde(default)]
    pub outcome: Option<Outcome>,
}

/// How a test connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The connect was refused (RST to the SYN).
    Refused,
    /// The connection was reset after it was established.
    Reset,
    /// The peer closed cleanly before the whole echo came back.
    Closed,
    /// Connecting or reading timed out.
    Timeout,
    /// Anything else (see `error`).
    Error,
}

impl ConnectReport {
    /// Panics unless the connection failed with `outcome`.
    pub fn assert_failed(&self, outcome: Outcome) -> &Self {
        assert_eq!(
            self.outcome,
            Some(outcome),
            "want {outcome:?}, got {self:?}"
        );
        self
    }

    /// Panics unless the connection worked and `payload` bytes came back.
    pub fn assert_echoed(&self, payload: usize) -> &Self {
        assert!(self.error.is_none(), "connect failed: {:?}", self.error);
        assert_eq!(
            self.echoed, payload,
            "echo returned {} of {payload} bytes",
            self.echoed
        );
        self
    }
}

/// Runs `meshlet-testpod connect` as `command` (a testpod command placed in its namespace and
/// cgroup): to `to`, sending `payload` bytes, with more `flags`; returns its report.
pub fn connect_with(
    mut command: Command,
    to: SocketAddr,
    payload: usize,
    flags: &[&str],
) -> ConnectReport {
    command.args([
        "connect",
        "--to",
        &to.to_string(),
        "--send",
        &payload.to_string(),
    ]);
    command.args(flags);
    connect(command)
}

/// Runs the `connect` helper to completion and returns its report.
pub fn connect(mut command: Command) -> ConnectReport {
    let out = command
        .stderr(Stdio::inherit())
        .output()
        .expect("run meshlet-testpod connect");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|err| panic!("testpod connect printed {stdout:?}: {err}"))
}

/// A running `meshlet agent`, its log in a file; stopped with SIGINT on drop. If the test is
/// failing, the log's tail goes to stderr so the failure can be read.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// Starts `command` (a `meshlet agent ...`), logging to `log`.
    pub fn spawn(mut command: Command, log: PathBuf) -> Self {
        let file =
            File::create(&log).unwrap_or_else(|err| panic!("create {}: {err}", log.display()));
        let child = command
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {command:?}: {err}"));
        Self { child, log }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where the log is.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Waits until the log has `needle` `count` times; panics with the log after `timeout`.
    pub fn wait_for_log(&self, needle: &str, count: usize, timeout: Duration) {
        let timeout = patience(timeout);
        let deadline = std::time::Instant::now() + timeout;
        while self.log().matches(needle).count() < count {
            if let Ok(Some(status)) = self.child_status() {
                panic!(
                    "meshlet agent exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "agent did not log {needle:?} {count}x in {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn child_status(&self) -> io::Result<Option<std::process::ExitStatus>> {
        // try_wait needs &mut; peek through /proc instead.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        Ok(stat
            .split(' ')
            .nth(2)
            .filter(|s| *s == "Z")
            .map(|_| std::process::ExitStatus::default()))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where the agent serves `endpoint` (`metrics`, `readiness`, `admin`), from its log.
    pub fn endpoint(&self, endpoint: &str) -> SocketAddr {
        let needle = format!("endpoint=\"{endpoint}\"");
        self.wait_for_log(&needle, 1, Duration::from_secs(10));
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains(&needle))
            .expect("endpoint line");
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("addr");
        addr.parse()
            .unwrap_or_else(|err| panic!("endpoint address {addr:?}: {err}"))
    }

    /// Stops the agent with SIGINT (which, unlike Kubernetes' SIGTERM, does not wait for a
    /// successor; SIGKILL after 5 s) and returns how it exited.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGINT);
        self.wait_exit(Duration::from_secs(5))
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// Waits for the agent to exit, killing it after `timeout`; returns how it exited.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + patience(timeout);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait for killed agent");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the agent has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- meshlet agent log ({}) ---", self.log.display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// tcpdump on a link, until [`LinkCapture::finish`].
#[derive(Debug)]
pub struct LinkCapture {
    child: Child,
    output: PathBuf,
}

/// What a link carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSummary {
    /// TCP packets captured.
    pub packets: usize,
    /// Of them, packets to or from port 15008 (HBONE).
    pub hbone_packets: usize,
    /// Whether [`crate::PLAINTEXT_MARKER`] appeared anywhere in a packet.
    pub plaintext_seen: bool,
}

impl LinkCapture {
    /// Starts `command` (a `tcpdump -l -A ...` printing packets to stdout) and waits until it
    /// listens.
    pub fn start(mut command: Command, output: PathBuf) -> Self {
        let file = File::create(&output)
            .unwrap_or_else(|err| panic!("create {}: {err}", output.display()));
        let mut child = command
            .stdout(file)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("spawn tcpdump (cargo xtask setup installs it): {err}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let started = lines
            .by_ref()
            .map_while(Result::ok)
            .find(|l| l.contains("listening on"));
        assert!(started.is_some(), "tcpdump did not start");
        std::thread::spawn(move || for _ in lines {});
        Self { child, output }
    }

    /// Stops the capture and summarises it.
    pub fn finish(mut self) -> LinkSummary {
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.output).unwrap_or_default();
        let headers: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(" IP ") || l.contains(" IP6 "))
            .collect();
        let marker = String::from_utf8_lossy(crate::PLAINTEXT_MARKER).into_owned();
        LinkSummary {
            packets: headers.len(),
            hbone_packets: headers
                .iter()
                .filter(|l| l.contains(".15008 ") || l.contains(".15008:"))
                .count(),
            plaintext_seen: text.contains(&marker),
        }
    }
}

impl Drop for LinkCapture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.output);
    }
}

/// A running helper process, killed on drop. Its stdout lines are collected as they come.
#[derive(Debug)]
pub struct Process {
    child: Child,
    lines: std::sync::Mutex<mpsc::Receiver<String>>,
}

impl Process {
    /// Starts `command` and waits for it to print `ready`.
    pub fn spawn_ready(command: Command) -> Self {
        Self::spawn_ready_within(command, patience(TIMEOUT))
    }

    /// [`Process::spawn_ready`], waiting up to `timeout` (a helper that opens thousands of
    /// connections first).
    pub fn spawn_ready_within(mut command: Command, timeout: Duration) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {command:?}: {err}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let process = Self {
            child,
            lines: std::sync::Mutex::new(lines),
        };
        let first = process
            .lines
            .lock()
            .expect("lines")
            .recv_timeout(timeout)
            .ok();
        assert_eq!(
            first.as_deref(),
            Some("ready"),
            "{command:?} did not get ready in {timeout:?}"
        );
        process
    }

    /// The next line the process printed, waiting up to the harness timeout.
    pub fn next_line(&mut self) -> Option<String> {
        self.lines
            .lock()
            .expect("lines")
            .recv_timeout(patience(TIMEOUT))
            .ok()
    }

    /// The next connection an echo server reports having accepted.
    pub fn next_accepted(&mut self) -> Accepted {
        let line = self
            .next_line()
            .expect("echo server reported no accepted connection");
        serde_json::from_str(&line)
            .unwrap_or_else(|err| panic!("echo server printed {line:?}: {err}"))
    }

    /// The next connection reported within `wait`, if any.
    pub fn try_next_accepted(&mut self, wait: Duration) -> Option<Accepted> {
        let line = self.lines.lock().expect("lines").recv_timeout(wait).ok()?;
        Some(
            serde_json::from_str(&line)
                .unwrap_or_else(|err| panic!("listener printed {line:?}: {err}")),
        )
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `meshlet-testpod load` running in a pod: connections at a steady rate.
#[derive(Debug)]
pub struct Load {
    child: Child,
}

/// How the connections of a [`Load`] ended, by outcome (`ok`, `refused`, `reset`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LoadReport {
    /// Connections by outcome.
    #[serde(flatten)]
    pub outcomes: std::collections::BTreeMap<String, serde_json::Value>,
}

impl LoadReport {
    /// Connections that ended with `outcome`.
    pub fn count(&self, outcome: &str) -> u64 {
        self.outcomes
            .get(outcome)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    }
}

impl Load {
    /// Starts `command` (a `meshlet-testpod load ...` placed in its pod).
    pub fn start(mut command: Command) -> Self {
        let child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {command:?}: {err}"));
        Self { child }
    }

    /// Waits for the load to end and returns its report.
    pub fn finish(mut self) -> LoadReport {
        let mut out = String::new();
        io::Read::read_to_string(self.child.stdout.as_mut().expect("piped stdout"), &mut out)
            .expect("read the load report");
        let _ = self.child.wait();
        serde_json::from_str(out.trim())
            .unwrap_or_else(|err| panic!("testpod load printed {out:?}: {err}"))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `meshlet-testpod hold` running in a pod: one connection, open and echoed once.
#[derive(Debug)]
pub struct Held {
    process: Process,
    release: PathBuf,
}

impl Held {
    /// Starts `command` (a `meshlet-testpod hold --to ...` placed in its pod, without
    /// `--until`), released by creating `release`; returns once the first exchange is done.
    pub fn start(mut command: Command, release: PathBuf) -> Self {
        let _ = std::fs::remove_file(&release);
        command.arg("--until").arg(&release);
        Self {
            process: Process::spawn_ready(command),
            release,
        }
    }

    /// Lets the connection make its second exchange; returns its report.
    pub fn release(mut self) -> ConnectReport {
        File::create(&self.release).expect("create the release file");
        let line = self.process.next_line().expect("hold printed no report");
        serde_json::from_str(&line).unwrap_or_else(|err| panic!("hold printed {line:?}: {err}"))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patience_factor_is_a_whole_number_of_at_least_one() {
        assert_eq!(patience_factor(None), Ok(1));
        assert_eq!(patience_factor(Some("6")), Ok(6));
        for bad in ["0", "-2", "1.5", "six", ""] {
            let err = patience_factor(Some(bad)).expect_err(bad);
            assert!(err.contains("want a whole factor >= 1"), "{err}");
        }
    }
}
