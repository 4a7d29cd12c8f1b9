//! `meshlet-cni`: the chained CNI plugin that hands each new pod to the meshlet agent before
//! its containers run. Installed in the node's CNI bin directory by the agent.

fn main() -> std::process::ExitCode {
    meshlet::cni::plugin::main()
}
