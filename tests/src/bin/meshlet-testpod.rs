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
                    let accepted = Accepted {
                        local: stream.local_addr().expect("local addr"),
                        peer: stream.peer_addr().expect("peer addr"),
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
    let mut report = ConnectReport {
        local: None,
        peer: None,
        echoed: 0,
        error: None,
    };
    if let Err(err) = exchange(to, send, mark, timeout, delay, &mut report) {
        report.error = Some(err.to_string());
    }
    report
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
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    report.local = Some(stream.local_addr()?);
    report.peer = Some(stream.peer_addr()?);
    std::thread::sleep(delay);
    let payload: Vec<u8> = meshlet_tests::PLAINTEXT_MARKER
        .iter()
        .copied()
        .cycle()
        .take(send)
        .collect();
    stream.write_all(&payload)?;
    stream.shutdown(Shutdown::Write)?;
    let mut echoed = Vec::with_capacity(send);
    stream.read_to_end(&mut echoed)?;
    report.echoed = echoed
        .iter()
        .zip(&payload)
        .take_while(|(a, b)| a == b)
        .count();
    Ok(())
}
