//! Logging through `tracing`: human-readable by default, JSON with `--log-format json`.

use tracing_subscriber::{EnvFilter, fmt};

#[derive(clap::Args, Debug, Clone)]
pub struct LogArgs {
    /// Log filter, e.g. `info` or `workerpool=debug,kube=info`.
    #[arg(long, global = true, env = "WORKERPOOL_LOG", default_value = "info")]
    pub log_level: String,
    /// `text` or `json`.
    #[arg(long, global = true, env = "WORKERPOOL_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

pub fn init(args: &LogArgs) {
    let filter = EnvFilter::try_new(&args.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: in a pod, the log goes to the kubelet as plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    if args.log_format == "json" { builder.json().init() } else { builder.init() }
}
