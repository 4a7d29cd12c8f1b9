//! meshlet: a sidecarless, eBPF-based ambient service-mesh node agent.
//!
//! The crate is the agent's library; `main.rs` only parses the command line and hands over to
//! [`cli`]. Data flows one way: sources -> workload store -> (capture, proxy, policy) -> metrics.

pub mod admin;
pub mod agent;
pub mod ca;
pub mod capture;
pub mod cli;
pub mod cni;
pub mod drain;
pub mod handoff;
pub mod identity;
pub mod inpod;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod preflight;
pub mod proto;
pub mod proxy;
pub mod removal;
pub mod source;
pub mod sys;
pub mod telemetry;
pub mod workload;
