//! The `workerpool` binary: a thin CLI over the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use workerpool::{agent, controller, telemetry};

#[derive(Parser)]
#[command(name = "workerpool", version, about = "Kubernetes operator for queue-consumer worker pools")]
struct Cli {
    #[command(flatten)]
    log: telemetry::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the WorkerPool controller.
    Controller(controller::ControllerArgs),
    /// Supervise a consumer inside a worker pod (PID 1 of the worker container).
    Agent(Box<agent::AgentArgs>),
    /// Print the WorkerPool CustomResourceDefinition as YAML.
    Crd,
    /// Ask every worker of a pool to finish its current message and restart in place
    /// (the operator's `messenger:stop-workers`).
    StopWorkers(controller::StopWorkersArgs),
    /// Copy this binary to a path (the init container uses it to put the agent into worker pods).
    InstallAgent {
        /// Destination file.
        destination: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(&cli.log);
    match cli.command {
        Command::Crd => {
            print!("{}", workerpool::api::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::InstallAgent { destination } => report(agent::install(&destination)),
        Command::Agent(args) => agent::main(*args),
        Command::Controller(args) => report(runtime().block_on(controller::run(args))),
        Command::StopWorkers(args) => report(runtime().block_on(controller::stop_workers(args))),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime starts")
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
