//! Workloads: the model of the cluster the agent acts on, the indexed [`Store`] the sources
//! fill, which pods to capture ([`enrollment`]), how Istio's telemetry names them
//! ([`naming`]), and where their network namespaces are ([`discovery`]).

pub mod discovery;
pub mod enrollment;
pub mod model;
pub mod naming;
pub mod store;

pub use store::Store;
