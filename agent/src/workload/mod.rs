//! Workloads: the model of the cluster the agent acts on, the indexed [`Store`] the sources
//! fill, which pods to capture ([`enrollment`]), and where their network namespaces are
//! ([`discovery`]).

pub mod discovery;
pub mod enrollment;
pub mod model;
pub mod store;

pub use store::Store;
