//! The in-pod agent: PID 1 of the worker container, doing Supervisor's job.
//!
//! It starts the consumer with its limit arguments, restarts it at once after a clean exit,
//! with back-off after a crash, forwards stop signals to its process group, reaps zombies, and
//! obeys the pool's stop flag.
//!
//! | module | what | pure? |
//! |---|---|---|
//! | [`settings`] | the command line checked at startup (bad input: exit 2) | yes |
//! | [`arguments`] | limit arguments for each start: time-limit jitter, `memory: auto` | yes |
//! | [`cgroup`] | the container's memory limit (cgroup v2, v1, `WORKERPOOL_MEMORY_LIMIT`) | reads files |
//! | [`policy`] | exit-code names, crash back-off, counters | yes |
//! | [`flag`] | the stop flag: API watch, file fallback, one action per request | the gate is |
//! | [`process`] | spawn in a process group, `waitpid(-1)` reaping, leftovers | no |
//! | [`supervisor`] | the loop tying them together on a current-thread runtime | no |
//!
//! Stops: a stop signal goes to the consumer's whole process group; the agent then waits until
//! that group is empty (a `sh -c` wrapper may die of the signal before the process doing the work
//! has finished its message) and exits with the status of the process it started.

use std::path::PathBuf;
use std::time::Duration;

use crate::api::{Preset, StopSignal};

pub mod arguments;
pub mod cgroup;
pub mod flag;
pub mod policy;
pub mod process;
pub mod settings;
pub mod supervisor;

/// Where the controller mounts things in the worker pod.
pub const BIN_DIR: &str = "/workerpool/bin";
pub const AGENT_PATH: &str = "/workerpool/bin/workerpool";
pub const FLAG_DIR: &str = "/workerpool/stop-flag";

/// `workerpool agent [options] -- <consumer command> <args>`
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// Which limit options the consumer takes: symfony, laravel or custom.
    #[arg(long, default_value = "symfony", value_parser = parse_preset)]
    pub preset: Preset,
    /// Exit after N messages.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub messages: Option<u32>,
    /// Exit after S seconds (before jitter).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub time_limit_seconds: Option<u32>,
    /// Memory limit: a quantity (128Mi) or "auto" (a share of the container's memory limit).
    #[arg(long)]
    pub memory: Option<String>,
    /// Exit after N failed messages.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub failures: Option<u32>,
    /// custom preset: argument template for messages, `{}` is the value (`--messages-arg --max={}`
    /// works: the templates may start with a hyphen).
    #[arg(long, allow_hyphen_values = true)]
    pub messages_arg: Option<String>,
    /// custom preset: argument template for the time limit.
    #[arg(long, allow_hyphen_values = true)]
    pub time_limit_arg: Option<String>,
    /// custom preset: argument template for memory (in MiB).
    #[arg(long, allow_hyphen_values = true)]
    pub memory_arg: Option<String>,
    /// custom preset: argument template for failures.
    #[arg(long, allow_hyphen_values = true)]
    pub failures_arg: Option<String>,
    /// The consumer's "finish your message, then exit" signal.
    #[arg(long, default_value = "SIGTERM")]
    pub stop_signal: StopSignal,
    /// Random spread of the time limit at each start, in percent.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=50))]
    pub jitter_percent: u32,
    /// With memory "auto": the share of the container's memory limit, in percent.
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u32).range(10..=95))]
    pub memory_auto_percent: u32,
    /// First back-off after a crash.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub backoff_initial: Duration,
    /// Longest back-off after crashes.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub backoff_max: Duration,
    /// A run at least this long resets the back-off.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub healthy_after: Duration,
    /// After this many crashes in a row the agent exits with the consumer's code (0: never).
    #[arg(long, default_value_t = 10)]
    pub max_consecutive_crashes: u32,
    /// When the agent exits: how long processes the consumer left behind get between SIGTERM and SIGKILL.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub leftover_grace: Duration,
    /// The pool this worker belongs to (its stop flag is `<pool>-stop-flag`).
    #[arg(long, env = "WORKERPOOL_POOL")]
    pub pool: Option<String>,
    /// This worker's revision.
    #[arg(long, env = "WORKERPOOL_REVISION")]
    pub revision: Option<String>,
    /// This pod's name.
    #[arg(long, env = "WORKERPOOL_POD_NAME")]
    pub pod_name: Option<String>,
    /// This pod's namespace.
    #[arg(long, env = "WORKERPOOL_NAMESPACE")]
    pub namespace: Option<String>,
    /// The stop flag mounted as files: the fallback when the API cannot be watched.
    #[arg(long, default_value = FLAG_DIR)]
    pub flag_dir: PathBuf,
    /// The consumer command and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

fn parse_preset(s: &str) -> Result<Preset, String> {
    match s {
        "symfony" => Ok(Preset::Symfony),
        "laravel" => Ok(Preset::Laravel),
        "custom" => Ok(Preset::Custom),
        other => Err(format!("unknown preset {other:?}; allowed: symfony, laravel, custom")),
    }
}

/// Parses `500ms`, `2s`, `1m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let value: f64 = number.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 2s, 1m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{s:?} is not a duration (e.g. 500ms, 2s, 1m)")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

/// Copies this executable to `destination` (mode 0755): how the init container installs the agent.
pub fn install(destination: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    let me = std::env::current_exe().context("finding this executable")?;
    if let Some(dir) = destination.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::copy(&me, destination)
        .with_context(|| format!("copying {} to {}", me.display(), destination.display()))?;
    std::fs::set_permissions(destination, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Runs the agent until the consumer is retired or the container is stopped; returns its exit code.
///
/// Bad input (what clap cannot check) is reported before anything starts, with exit code 2.
pub fn main(args: AgentArgs) -> std::process::ExitCode {
    let settings = match settings::Settings::from_args(args) {
        Ok(settings) => settings,
        Err(message) => {
            eprintln!("error: {message}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(supervisor::run(settings));
    // The flag watcher may still hold a connection: do not wait for it.
    runtime.shutdown_background();
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
