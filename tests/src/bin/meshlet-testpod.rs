//! `meshlet-testpod`: the one program the test pods run (one container, no sidecar).
//!
//! - `echo --port P`: a dual-stack TCP echo server; prints `ready`, then one JSON line per
//!   accepted connection (`{"local":..,"peer":..}`).
//! - `connect --to ADDR --send N`: connects, sends N bytes, reads the echo, prints one JSON
//!   report (`{"local":..,"peer":..,"echoed":N,"error":null}`) and exits 0 even on failure, so
//!   the test decides what a failure means.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use clap::{Parser, Subcommand};
use meshlet_tests::ConnectReport;

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
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5)]
        send: usize,
    },
}

const TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Mode::Echo { port } => echo(port),
        Mode::Connect { to, send } => {
            let report = connect(to, send);
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

fn echo(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))?;
    println!("ready");
    for stream in listener.incoming() {
        let mut stream = stream?;
        let accepted =
            serde_json::json!({ "local": stream.local_addr()?, "peer": stream.peer_addr()? });
        println!("{accepted}");
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = stream.shutdown(Shutdown::Write);
        });
    }
    Ok(())
}

fn connect(to: SocketAddr, send: usize) -> ConnectReport {
    let mut report = ConnectReport {
        local: None,
        peer: None,
        echoed: 0,
        error: None,
    };
    if let Err(err) = exchange(to, send, &mut report) {
        report.error = Some(err.to_string());
    }
    report
}

fn exchange(to: SocketAddr, send: usize, report: &mut ConnectReport) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&to, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    report.local = Some(stream.local_addr()?);
    report.peer = Some(stream.peer_addr()?);
    let payload: Vec<u8> = (0..send).map(|i| (i % 251) as u8).collect();
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
