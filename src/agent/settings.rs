//! The agent's command line, checked once at startup: everything that can be wrong is reported
//! before anything starts.

use std::time::Duration;

use crate::api::{CustomArguments, Preset, StopSignal};
use crate::limits::MemorySetting;
use crate::stopflag::Worker;

use super::AgentArgs;
use super::arguments::LimitPlan;
use super::flag::FlagTarget;

#[derive(Clone, Debug)]
pub struct Settings {
    pub command: Vec<String>,
    pub limits: LimitPlan,
    pub stop_signal: StopSignal,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub healthy_after: Duration,
    pub max_consecutive_crashes: u32,
    pub leftover_grace: Duration,
    /// `None` outside Kubernetes (no pool, revision or pod name): no stop flag.
    pub flag: Option<FlagTarget>,
    /// Why there is no flag, for the log.
    pub no_flag_reason: Option<String>,
}

impl Settings {
    pub fn from_args(args: AgentArgs) -> Result<Self, String> {
        let command = args.command;
        if command.first().is_none_or(|c| c.trim().is_empty()) {
            return Err("no consumer command: give it after `--`, e.g. `workerpool agent -- bin/console messenger:consume async`".into());
        }
        let memory =
            args.memory.as_deref().map(MemorySetting::parse).transpose().map_err(|e| format!("--memory: {e}"))?;

        let templates = [
            ("--messages-arg", &args.messages_arg),
            ("--time-limit-arg", &args.time_limit_arg),
            ("--memory-arg", &args.memory_arg),
            ("--failures-arg", &args.failures_arg),
        ];
        for (flag, template) in &templates {
            if let Some(t) = template
                && !t.contains("{}")
            {
                return Err(format!("{flag} {t:?} must contain {{}} where the value goes (e.g. \"--max={{}}\")"));
            }
        }
        let any_template = templates.iter().any(|(_, t)| t.is_some());
        if any_template && args.preset != Preset::Custom {
            return Err("--messages-arg, --time-limit-arg, --memory-arg and --failures-arg need --preset custom".into());
        }
        let custom = any_template.then(|| CustomArguments {
            messages: args.messages_arg.clone(),
            time_limit_seconds: args.time_limit_arg.clone(),
            memory: args.memory_arg.clone(),
            failures: args.failures_arg.clone(),
        });
        let limits = LimitPlan {
            preset: args.preset,
            messages: args.messages,
            time_limit_seconds: args.time_limit_seconds,
            memory,
            failures: args.failures,
            custom,
            jitter_percent: args.jitter_percent,
            memory_auto_percent: args.memory_auto_percent,
        };
        limits.check().map_err(|e| format!("{}: {}", cli_name(e.field), e.message))?;

        if args.backoff_initial.is_zero() {
            return Err("--backoff-initial must be greater than 0".into());
        }
        if args.backoff_initial > args.backoff_max {
            return Err(format!(
                "--backoff-initial ({:?}) is longer than --backoff-max ({:?})",
                args.backoff_initial, args.backoff_max
            ));
        }

        let present = |v: &Option<String>| v.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_string);
        let (flag, no_flag_reason) = match (present(&args.pool), present(&args.revision), present(&args.pod_name)) {
            (Some(pool), Some(revision), Some(pod)) => (
                Some(FlagTarget {
                    worker: Worker { pod, revision },
                    pool,
                    namespace: present(&args.namespace),
                    dir: args.flag_dir,
                }),
                None,
            ),
            (pool, revision, pod) => {
                let missing: Vec<&str> = [
                    pool.is_none().then_some("--pool/WORKERPOOL_POOL"),
                    revision.is_none().then_some("--revision/WORKERPOOL_REVISION"),
                    pod.is_none().then_some("--pod-name/WORKERPOOL_POD_NAME"),
                ]
                .into_iter()
                .flatten()
                .collect();
                (None, Some(format!("{} not set", missing.join(", "))))
            }
        };

        Ok(Self {
            command,
            limits,
            stop_signal: args.stop_signal,
            backoff_initial: args.backoff_initial,
            backoff_max: args.backoff_max,
            healthy_after: args.healthy_after,
            max_consecutive_crashes: args.max_consecutive_crashes,
            leftover_grace: args.leftover_grace,
            flag,
            no_flag_reason,
        })
    }
}

/// The agent's flag for a field named in a `LimitError`.
fn cli_name(field: &str) -> &str {
    match field {
        "spec.consumer.arguments.messages" => "--messages-arg",
        "spec.consumer.arguments.timeLimitSeconds" => "--time-limit-arg",
        "spec.consumer.arguments.memory" => "--memory-arg",
        "spec.consumer.arguments.failures" => "--failures-arg",
        "spec.consumer.limits.failures" => "--failures",
        "spec.consumer.limits.memory" => "--memory",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let cli =
            Cli::try_parse_from(std::iter::once("agent").chain(args.iter().copied())).map_err(|e| e.to_string())?;
        Settings::from_args(cli.agent)
    }

    #[test]
    fn minimal_command_line_works_without_a_flag() {
        let s = parse(&["--", "sleep", "1"]).unwrap();
        assert_eq!(s.command, ["sleep", "1"]);
        if std::env::var_os("WORKERPOOL_POOL").is_none() {
            assert!(s.flag.is_none());
            assert!(s.no_flag_reason.unwrap().contains("--pool"));
        }
    }

    #[test]
    fn identity_gives_a_flag_target() {
        let s =
            parse(&["--pool", "p", "--revision", "r1", "--pod-name", "pod-a", "--flag-dir", "/x", "--", "c"]).unwrap();
        let flag = s.flag.unwrap();
        assert_eq!(flag.configmap(), "p-stop-flag");
        assert_eq!(flag.worker, Worker { pod: "pod-a".into(), revision: "r1".into() });
    }

    #[test]
    fn bad_input_is_refused_with_the_reason() {
        assert!(parse(&["--memory", "lots", "--", "c"]).unwrap_err().contains("--memory"));
        assert!(parse(&["--preset", "rails", "--", "c"]).unwrap_err().contains("unknown preset"));
        assert!(parse(&["--stop-signal", "SIGFOO", "--", "c"]).unwrap_err().contains("unknown signal"));
        assert!(parse(&[]).is_err(), "the command is required");
        let err = parse(&["--preset", "custom", "--messages", "5", "--", "c"]).unwrap_err();
        assert!(err.contains("--messages-arg"), "{err}");
        let err = parse(&["--preset", "laravel", "--failures", "5", "--", "c"]).unwrap_err();
        assert!(err.contains("--failures"), "{err}");
        let err = parse(&["--preset", "custom", "--messages", "5", "--messages-arg=--max", "--", "c"]).unwrap_err();
        assert!(err.contains("must contain {}"), "{err}");
        assert!(parse(&["--messages-arg=--max={}", "--", "c"]).unwrap_err().contains("--preset custom"));
        assert!(parse(&["--backoff-initial", "10s", "--backoff-max", "1s", "--", "c"]).unwrap_err().contains("longer"));
        assert!(parse(&["--", ""]).unwrap_err().contains("no consumer command"));
    }

    #[test]
    fn custom_templates_are_used() {
        // as the controller writes it: the template, starting with "--", as the next argument
        let s = parse(&["--preset", "custom", "--messages", "5", "--messages-arg", "--max={}", "--", "c"]).unwrap();
        assert!(s.limits.check().is_ok());
        assert_eq!(s.limits.custom.unwrap().messages.as_deref(), Some("--max={}"));
    }
}
