//! The WorkerPool controller: observe → validate → plan (pure) → apply → status.

#[derive(clap::Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Image that holds the `workerpool` binary, copied into worker pods as their agent.
    #[arg(long, env = "WORKERPOOL_AGENT_IMAGE", default_value = "workerpool-operator:dev")]
    pub agent_image: String,
}

#[derive(clap::Args, Debug, Clone)]
pub struct StopWorkersArgs {
    /// The WorkerPool's name.
    pub pool: String,
    /// Its namespace (default: the kubeconfig's).
    #[arg(short, long)]
    pub namespace: Option<String>,
}

pub async fn run(_args: ControllerArgs) -> anyhow::Result<()> {
    todo!()
}

pub async fn stop_workers(_args: StopWorkersArgs) -> anyhow::Result<()> {
    todo!()
}
