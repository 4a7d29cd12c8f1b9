//! A cluster meshed through a workload file: the fixture most end-to-end tests start from.
//!
//! [`FileMesh::start`] writes the given manifests to a workload file, starts `meshlet agent
//! --source file:...` on every node, and waits until each node has enrolled the pods it should;
//! [`FileMesh::write`] replaces the extra objects (policies, ...) and waits until the agents
//! have loaded them. Dropping it stops the agents and removes the file.

use std::{path::PathBuf, time::Duration};

use serde_json::Value;

use crate::{Cluster, process::Agent, wait_enrolled, write_workloads};

/// A cluster, its workload file and an agent per node.
#[derive(Debug)]
pub struct FileMesh {
    /// The cluster.
    pub cluster: Cluster,
    /// The workload file the agents follow.
    pub file: PathBuf,
    /// The agents, by node index.
    pub agents: Vec<Agent>,
    base: Vec<Value>,
}

impl FileMesh {
    /// Writes `base` (namespaces, pods, services), starts an agent on every node, and waits
    /// until node `i` has enrolled exactly the pods named in `enrolled[i]`.
    pub fn start(cluster: Cluster, base: Vec<Value>, enrolled: &[&[&str]]) -> Self {
        Self::start_with(cluster, base, enrolled, |_, _| Vec::new())
    }

    /// [`FileMesh::start`] with more agent flags for node `i`: `flags(&cluster, i)`.
    pub fn start_with(
        cluster: Cluster,
        base: Vec<Value>,
        enrolled: &[&[&str]],
        flags: impl Fn(&Cluster, usize) -> Vec<String>,
    ) -> Self {
        let file = std::env::temp_dir().join(format!("{}-workloads.yaml", cluster.id()));
        write_workloads(&file, &base);
        let source = format!("file:{}", file.display());
        let agents = (0..enrolled.len())
            .map(|node| {
                let extra = flags(&cluster, node);
                let mut args = vec!["--source", source.as_str()];
                args.extend(extra.iter().map(String::as_str));
                cluster.start_agent(node, &args)
            })
            .collect();
        let mesh = Self {
            cluster,
            file,
            agents,
            base,
        };
        for (node, pods) in enrolled.iter().enumerate() {
            mesh.agents[node].wait_for_log(
                "initial enrollment pass done",
                1,
                Duration::from_secs(10),
            );
            let cookies = pods
                .iter()
                .map(|pod| mesh.cluster.pod(pod).netns_cookie())
                .collect();
            wait_enrolled(
                &mesh.cluster.bpffs_dir(node),
                cookies,
                Duration::from_secs(10),
            );
        }
        mesh
    }

    /// The usual layout: namespace `demo` (ambient) with `client` on node-0 and `server` on
    /// node-1, namespace `legacy` (outside the mesh) with `bystander` on node-0; plus more `demo`
    /// pods (`extra_pods`: name and node) and objects (services, ...). Each pod is labelled
    /// `app: <name>`.
    pub fn client_server(extra_pods: &[(&str, usize)], extra_objects: Vec<Value>) -> Self {
        let demo: Vec<(&str, usize)> = [("client", 0), ("server", 1)]
            .into_iter()
            .chain(extra_pods.iter().copied())
            .collect();
        Self::layout(&demo, &[("bystander", 0)], extra_objects, |_, _| Vec::new())
    }

    /// Two nodes: the `mesh` pods (name, node) in namespace `demo` (ambient, each confirmed
    /// captured), the `legacy` pods in namespace `legacy` (outside the mesh), each labelled
    /// `app: <name>`, plus `extra_objects`; agents on both nodes with `flags(&cluster, node)`
    /// more flags, started once every mesh pod is enrolled.
    pub fn layout(
        mesh: &[(&str, usize)],
        legacy: &[(&str, usize)],
        extra_objects: Vec<Value>,
        flags: impl Fn(&Cluster, usize) -> Vec<String>,
    ) -> Self {
        let mut cluster = Cluster::new(2);
        for &(name, node) in mesh.iter().chain(legacy) {
            cluster.add_pod(name, node);
        }
        Self::layout_on(cluster, mesh, legacy, extra_objects, flags)
    }

    /// [`FileMesh::layout`] on a two-node `cluster` that has these pods already (set up as a
    /// test needs them before any agent starts).
    pub fn layout_on(
        cluster: Cluster,
        mesh: &[(&str, usize)],
        legacy: &[(&str, usize)],
        extra_objects: Vec<Value>,
        flags: impl Fn(&Cluster, usize) -> Vec<String>,
    ) -> Self {
        let mut base = vec![
            crate::namespace_manifest("demo", &[("meshlet.io/dataplane-mode", "ambient")]),
            crate::namespace_manifest("legacy", &[]),
        ];
        base.extend(
            legacy
                .iter()
                .map(|&(name, _)| cluster.pod(name).manifest("legacy", &[("app", name)])),
        );
        base.extend(
            mesh.iter()
                .map(|&(name, _)| cluster.pod(name).mesh_manifest("demo", &[("app", name)])),
        );
        base.extend(extra_objects);
        let on = |node: usize| {
            mesh.iter()
                .filter(|(_, n)| *n == node)
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
        };
        let (node0, node1) = (on(0), on(1));
        Self::start_with(cluster, base, &[&node0, &node1], flags)
    }

    /// Rewrites the file as the base objects plus `extra`, and waits until every agent has
    /// loaded it and applied it (policies compiled, an enrollment pass done: `/generation`).
    pub fn write(&self, extra: &[Value]) {
        let loads: Vec<usize> = self
            .agents
            .iter()
            .map(|a| a.log().matches("workload file loaded").count())
            .collect();
        let mut objects = self.base.clone();
        objects.extend_from_slice(extra);
        write_workloads(&self.file, &objects);
        for (agent, loads) in self.agents.iter().zip(loads) {
            agent.wait_for_log("workload file loaded", loads + 1, Duration::from_secs(5));
        }
        for node in 0..self.agents.len() {
            self.cluster.wait_applied(node);
        }
    }
}

impl Drop for FileMesh {
    fn drop(&mut self) {
        self.agents.clear();
        let _ = std::fs::remove_file(&self.file);
    }
}
