//! Capture from the first instruction: `meshlet-cni`, the chained CNI plugin, and the agent's
//! side of it.
//!
//! The runtime runs the plugin while it creates a pod's sandbox, before any container (init
//! containers included). The plugin hands the pod's network namespace to the agent over a unix
//! socket ([`protocol`], [`server`]), and returns only once the agent says the pod is enrolled
//! (or not for the mesh), so no container of a captured pod runs uncaptured. When the agent
//! cannot answer, the plugin decides from the agent's last decisions ([`decisions`]): a pod
//! that must be captured waits in the runtime's retries, any other starts at once.
//! [`install`] puts the plugin on the node and chains it after the primary CNI.
//!
//! Polling discovery (`workload::discovery`) remains for pods that predate the plugin and for
//! the file source; for a pod the plugin announced, the plugin's namespace comes first.

pub mod decisions;
pub mod install;
pub mod plugin;
pub mod protocol;
pub mod server;
