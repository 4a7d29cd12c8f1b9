//! `meshlet-testpod`: the one program the test pods run (one container, no sidecar), and the
//! stand-in for the proxy's in-pod listeners in capture tests.
//!
//! - `pause`: says `ready` and sleeps (a pod's first process, like the pause container).
//! - `echo --port P`: a dual-stack TCP echo server; prints `ready`, then one JSON line per
//!   accepted connection (`{"local":..,"peer":..,"original_dst":null}`).
//! - `proxy --listen ADDR...`: marked listeners (like the proxy's), echoing; one JSON line per
//!   accepted connection, with the `SO_ORIGINAL_DST` the capture programs answered.
//! - `connect --to ADDR --send N`: connects, sends N bytes, reads the echo, prints one JSON
//!   report and exits 0 even on failure, so the test decides what a failure means.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use clap::{Parser, Subcommand};
use meshlet::sys::socket;
use meshlet_tests::{Accepted, ConnectReport};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    Echo {
        #[arg(long)]
        port: u16,
    },
    /// Says `ready` and sleeps: a pod's first process, like the pause container.
    Pause,
    /// A server that reads each connection to its end and answers with the byte count (8 bytes,
    /// big endian): the far end of a throughput measurement.
    Sink {
        #[arg(long)]
        port: u16,
    },
    /// Measures: `throughput` (send `--bytes` to a sink), `pingpong` (`--count` 1-byte round
    /// trips on one connection to an echo server), `connect-rate` (`--count` connections, each
    /// one byte echoed, one after the other), or `hold` (open `--count` connections, echo one
    /// byte on each, say `ready`, keep them open), or `latency` (`--count` 1-byte round trips at
    /// `--bytes` per second: p50/p90/p99/p99.9). Prints one JSON object.
    Measure {
        #[arg(long)]
        what: String,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 0)]
        bytes: u64,
        #[arg(long, default_value_t = 0)]
        count: usize,
    },
    Proxy {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
    },
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5)]
        send: usize,
        /// Carry the mesh mark, like a socket of the proxy.
        #[arg(long)]
        mark: bool,
        /// Give up connecting after this long.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Wait this long between connecting and sending.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Opens `count` connections at once to `to`, each sending `send` bytes and reading the
    /// echo; prints `{"ok":N,"failed":M,"first_error":..}`.
    ConnectMany {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 1024)]
        send: usize,
    },
    /// Opens `count` connections to `to` as fast as it can and sends nothing (an idle-connection
    /// flood); once all were tried prints `ready`, then `{"connected":N,"failed":M,"echoed":E}`,
    /// and holds them until killed. With `--echo`, each echoes one byte right after it connects
    /// (and stays open): `echoed` counts those that did.
    Flood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        echo: bool,
    },
    /// Opens `count` connections to `to`, `rate` per second, each in a thread of its own
    /// (connect, echo 16 bytes, close); prints how each ended, counted by outcome:
    /// `{"ok":N,"refused":..,"reset":..,"closed":..,"timeout":..,"error":..,"first_error":..}`.
    Load {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        rate: u32,
        #[arg(long)]
        count: usize,
    },
    /// A long-lived connection: connects to `to`, echoes `send` bytes, says `ready`, waits
    /// until the file `until` exists, echoes `send` bytes again and prints its report
    /// (`echoed` counts both exchanges).
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5)]
        send: usize,
        #[arg(long)]
        until: std::path::PathBuf,
    },
    /// Times `count` connects (connect, then close) to `to`; prints the latencies in
    /// nanoseconds as one JSON array.
    ConnectBench {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Mode::Sink { port } => {
            let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))?;
            println!("ready");
            for stream in listener.incoming() {
                let mut stream = stream?;
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut total = 0u64;
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                    let _ = stream.write_all(&total.to_be_bytes());
                });
            }
            Ok(())
        }
        Mode::Measure {
            what,
            to,
            bytes,
            count,
        } => {
            let result = measure(&what, to, bytes, count)?;
            println!("{result}");
            Ok(())
        }
        Mode::Pause => {
            println!("ready");
            loop {
                std::thread::park();
            }
        }
        Mode::Echo { port } => serve(
            vec![TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))?],
            false,
        ),
        Mode::Proxy { listen } => {
            let listeners = listen
                .into_iter()
                .map(socket::listen)
                .collect::<Result<Vec<_>, _>>()?;
            for listener in &listeners {
                listener.set_nonblocking(false)?;
            }
            serve(listeners, true)
        }
        Mode::ConnectMany { to, count, send } => {
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(count));
            let threads: Vec<_> = (0..count)
                .map(|_| {
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        barrier.wait();
                        connect(to, send, false, Duration::from_secs(10), Duration::ZERO)
                    })
                })
                .collect();
            let reports: Vec<ConnectReport> = threads
                .into_iter()
                .map(|t| t.join().expect("client thread"))
                .collect();
            let ok = reports
                .iter()
                .filter(|r| r.error.is_none() && r.echoed == send)
                .count();
            let first_error = reports.iter().find_map(|r| r.error.clone());
            println!(
                "{}",
                serde_json::json!({ "ok": ok, "failed": count - ok, "first_error": first_error })
            );
            Ok(())
        }
        Mode::Flood { to, count, echo } => {
            meshlet::sys::raise_open_files_limit()?;
            let mut held = Vec::with_capacity(count);
            let (mut failed, mut echoed) = (0usize, 0usize);
            for _ in 0..count {
                match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
                    Ok(mut stream) => {
                        if echo && echo_one_byte(&mut stream) {
                            echoed += 1;
                        }
                        held.push(stream);
                    }
                    Err(_) => failed += 1,
                }
            }
            println!("ready");
            println!(
                "{}",
                serde_json::json!({ "connected": held.len(), "failed": failed, "echoed": echoed })
            );
            loop {
                std::thread::park();
            }
        }
        Mode::ConnectBench { to, count } => {
            let mut latencies = Vec::with_capacity(count);
            for _ in 0..count {
                let start = std::time::Instant::now();
                let stream = TcpStream::connect(to)?;
                latencies.push(start.elapsed().as_nanos() as u64);
                drop(stream);
            }
            println!("{}", serde_json::to_string(&latencies)?);
            Ok(())
        }
        Mode::Load { to, rate, count } => {
            let interval = Duration::from_secs(1) / rate.max(1);
            let start = std::time::Instant::now();
            let mut threads = Vec::with_capacity(count);
            for n in 0..count {
                let at = start + interval * u32::try_from(n).unwrap_or(u32::MAX);
                std::thread::sleep(at.saturating_duration_since(std::time::Instant::now()));
                threads.push(std::thread::spawn(move || {
                    connect(to, 16, false, Duration::from_secs(5), Duration::ZERO)
                }));
            }
            let mut counts = std::collections::BTreeMap::<String, usize>::new();
            let mut first_error = None;
            for thread in threads {
                let report = thread.join().expect("connection thread");
                let outcome = match report.outcome {
                    None => "ok".to_owned(),
                    Some(outcome) => serde_json::to_value(outcome)?
                        .as_str()
                        .unwrap_or("error")
                        .to_owned(),
                };
                if first_error.is_none() {
                    first_error = report.error;
                }
                *counts.entry(outcome).or_default() += 1;
            }
            let mut report = serde_json::to_value(&counts)?;
            report["first_error"] = serde_json::json!(first_error);
            println!("{report}");
            Ok(())
        }
        Mode::Hold { to, send, until } => {
            let mut report = ConnectReport::default();
            let held = (|| {
                let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
                report.local = stream.local_addr().ok();
                report.peer = stream.peer_addr().ok();
                let payload = vec![b'h'; send];
                let mut back = vec![0u8; send];
                stream.write_all(&payload)?;
                stream.read_exact(&mut back)?;
                report.echoed += send;
                println!("ready");
                while !until.exists() {
                    std::thread::sleep(Duration::from_millis(10));
                }
                stream.write_all(&payload)?;
                stream.read_exact(&mut back)?;
                report.echoed += send;
                stream.shutdown(Shutdown::Write)?;
                std::io::Result::Ok(())
            })();
            if let Err(err) = held {
                if report.echoed == 0 {
                    println!("ready");
                }
                report.outcome = Some(outcome_of(&err));
                report.error = Some(err.to_string());
            }
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Mode::Connect {
            to,
            send,
            mark,
            timeout_ms,
            delay_ms,
        } => {
            let report = connect(
                to,
                send,
                mark,
                Duration::from_millis(timeout_ms),
                Duration::from_millis(delay_ms),
            );
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

/// Sends one byte on `stream` and reads it back (within 5 s); whether it came back.
fn echo_one_byte(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8];
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .is_ok()
        && stream.write_all(b"x").is_ok()
        && stream.read_exact(&mut byte).is_ok()
        && byte == *b"x"
}

/// Accepts on every listener, reporting each connection and echoing what it sends.
fn serve(listeners: Vec<TcpListener>, report_original: bool) -> anyhow::Result<()> {
    println!("ready");
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let original_dst = report_original
                        .then(|| socket::original_dst(&stream).map_err(|e| e.to_string()));
                    // Reset while it waited in the accept queue: nothing to report.
                    let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) else {
                        continue;
                    };
                    let accepted = Accepted {
                        local,
                        peer,
                        original_dst,
                    };
                    println!("{}", serde_json::to_string(&accepted).expect("json"));
                    std::thread::spawn(move || echo(stream));
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

fn measure(
    what: &str,
    to: SocketAddr,
    bytes: u64,
    count: usize,
) -> anyhow::Result<serde_json::Value> {
    let start = std::time::Instant::now();
    match what {
        "throughput" => {
            let mut stream = TcpStream::connect(to)?;
            let chunk = vec![0x5au8; 256 * 1024];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                stream.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            stream.shutdown(Shutdown::Write)?;
            let mut total = [0u8; 8];
            stream.read_exact(&mut total)?;
            anyhow::ensure!(
                u64::from_be_bytes(total) == bytes,
                "the sink got {} of {bytes} bytes",
                u64::from_be_bytes(total)
            );
            let seconds = start.elapsed().as_secs_f64();
            Ok(
                serde_json::json!({ "seconds": seconds, "gbit_per_s": bytes as f64 * 8.0 / seconds / 1e9 }),
            )
        }
        "pingpong" => {
            let mut stream = TcpStream::connect(to)?;
            stream.set_nodelay(true)?;
            let mut byte = [0u8; 1];
            for _ in 0..count {
                stream.write_all(b"x")?;
                stream.read_exact(&mut byte)?;
            }
            let seconds = start.elapsed().as_secs_f64();
            Ok(serde_json::json!({ "seconds": seconds, "per_s": count as f64 / seconds }))
        }
        "connect-rate" => {
            let mut byte = [0u8; 1];
            for _ in 0..count {
                let mut stream = TcpStream::connect(to)?;
                stream.write_all(b"x")?;
                stream.read_exact(&mut byte)?;
            }
            let seconds = start.elapsed().as_secs_f64();
            Ok(serde_json::json!({ "seconds": seconds, "per_s": count as f64 / seconds }))
        }
        "latency" => {
            // One byte every 1/rate seconds on one connection: the round-trip time of each,
            // at a fixed offered load rather than as fast as possible.
            let mut stream = TcpStream::connect(to)?;
            stream.set_nodelay(true)?;
            let rate = bytes.max(1);
            let interval = Duration::from_secs_f64(1.0 / rate as f64);
            let mut byte = [0u8; 1];
            let mut rtts = Vec::with_capacity(count);
            let mut next = std::time::Instant::now();
            for _ in 0..count {
                next += interval;
                let sent = std::time::Instant::now();
                stream.write_all(b"x")?;
                stream.read_exact(&mut byte)?;
                rtts.push(sent.elapsed().as_nanos() as u64);
                if let Some(wait) = next.checked_duration_since(std::time::Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            rtts.sort_unstable();
            let at = |q: f64| rtts[((rtts.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
            Ok(
                serde_json::json!({ "p50_us": at(0.5), "p90_us": at(0.9), "p99_us": at(0.99), "p999_us": at(0.999) }),
            )
        }
        "hold" => {
            let mut held = Vec::with_capacity(count);
            let mut byte = [0u8; 1];
            for _ in 0..count {
                let mut stream = TcpStream::connect(to)?;
                stream.write_all(b"x")?;
                stream.read_exact(&mut byte)?;
                held.push(stream);
            }
            println!("ready");
            loop {
                std::thread::park();
            }
        }
        other => anyhow::bail!("unknown measurement {other}"),
    }
}

fn echo(mut stream: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

fn connect(
    to: SocketAddr,
    send: usize,
    mark: bool,
    timeout: Duration,
    delay: Duration,
) -> ConnectReport {
    let mut report = ConnectReport::default();
    use meshlet_tests::process::Outcome;
    match exchange(to, send, mark, timeout, delay, &mut report) {
        Err(err) => {
            report.outcome = Some(outcome_of(&err));
            report.error = Some(err.to_string());
        }
        Ok(()) if report.echoed < send => report.outcome = Some(Outcome::Closed),
        Ok(()) => {}
    }
    report
}

/// How a connection failed, from its error. A reset that arrives while the client shuts its
/// side down shows as "not connected".
fn outcome_of(err: &std::io::Error) -> meshlet_tests::process::Outcome {
    use meshlet_tests::process::Outcome;
    match err.kind() {
        std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::NotConnected
        | std::io::ErrorKind::BrokenPipe => Outcome::Reset,
        std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
        std::io::ErrorKind::UnexpectedEof => Outcome::Closed,
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Outcome::Timeout,
        _ => Outcome::Error,
    }
}

fn exchange(
    to: SocketAddr,
    send: usize,
    mark: bool,
    timeout: Duration,
    delay: Duration,
    report: &mut ConnectReport,
) -> std::io::Result<()> {
    let domain = socket2::Domain::for_address(to);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if mark {
        socket.set_mark(meshlet_common::MESH_MARK)?;
    }
    socket.connect_timeout(&to.into(), timeout)?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    report.local = Some(stream.local_addr()?);
    report.peer = Some(stream.peer_addr()?);
    std::thread::sleep(delay);
    // Write and read at once: an echo of a large payload would otherwise fill every buffer on
    // the way and deadlock.
    let mut writer = stream.try_clone()?;
    let sending = std::thread::spawn(move || -> std::io::Result<()> {
        let chunk: Vec<u8> = meshlet_tests::PLAINTEXT_MARKER
            .iter()
            .copied()
            .cycle()
            .take((64 * 1024).min(send + 1) * meshlet_tests::PLAINTEXT_MARKER.len())
            .collect();
        let mut left = send;
        let mut offset = 0;
        while left > 0 {
            let n = left.min(chunk.len() - offset);
            writer.write_all(&chunk[offset..offset + n])?;
            left -= n;
            offset = (offset + n) % meshlet_tests::PLAINTEXT_MARKER.len();
        }
        writer.shutdown(Shutdown::Write)
    });
    let marker = meshlet_tests::PLAINTEXT_MARKER;
    let mut buf = vec![0u8; 256 * 1024];
    let mut matched = 0usize;
    let mut diverged = false;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        for &byte in &buf[..n] {
            if !diverged && byte == marker[matched % marker.len()] {
                matched += 1;
            } else {
                diverged = true;
            }
        }
    }
    sending
        .join()
        .map_err(|_| std::io::Error::other("sender panicked"))??;
    report.echoed = matched.min(send);
    Ok(())
}
