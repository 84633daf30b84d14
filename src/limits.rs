//! Rendering a consumer's limit options as command-line arguments, per preset. Pure.
//!
//! The agent calls this at every start of the consumer, after it has resolved `memory: auto`
//! and applied the time-limit jitter; the controller calls `check` to validate a spec.

use crate::api::{CustomArguments, Limits, Preset};

/// A memory limit as the agent sees it: a fixed size, or a share of the container's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemorySetting {
    Bytes(u64),
    Auto,
}

impl MemorySetting {
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.trim() == "auto" { Ok(Self::Auto) } else { parse_quantity_bytes(value).map(Self::Bytes) }
    }
}

/// The limits after everything dynamic is resolved, ready to render.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvedLimits {
    pub messages: Option<u32>,
    pub time_limit_seconds: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub failures: Option<u32>,
}

/// Why a limit cannot be rendered: the message names the spec field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct LimitError {
    pub field: &'static str,
    pub message: String,
}

/// Checks that every limit that is set can be rendered for the preset.
pub fn check(preset: Preset, limits: &Limits, custom: Option<&CustomArguments>) -> Result<(), LimitError> {
    if let Some(memory) = &limits.memory {
        MemorySetting::parse(memory).map_err(|message| LimitError { field: "spec.consumer.limits.memory", message })?;
    }
    let sample = ResolvedLimits {
        messages: limits.messages,
        time_limit_seconds: limits.time_limit_seconds,
        memory_bytes: limits.memory.as_ref().map(|_| 128 << 20),
        failures: limits.failures,
    };
    render(preset, &sample, custom).map(|_| ())
}

/// The arguments appended to the consumer's command.
pub fn render(
    preset: Preset,
    limits: &ResolvedLimits,
    custom: Option<&CustomArguments>,
) -> Result<Vec<String>, LimitError> {
    let mut args = Vec::new();
    let mib = limits.memory_bytes.map(|b| (b >> 20).max(1));
    match preset {
        Preset::Symfony => {
            push(&mut args, "--limit={}", limits.messages);
            push(&mut args, "--time-limit={}", limits.time_limit_seconds);
            push(&mut args, "--memory-limit={}M", mib);
            push(&mut args, "--failure-limit={}", limits.failures);
        }
        Preset::Laravel => {
            if limits.failures.is_some() {
                return Err(LimitError {
                    field: "spec.consumer.limits.failures",
                    message: "the laravel preset has no failure limit (queue:work has no such option); remove it or use preset custom".into(),
                });
            }
            push(&mut args, "--max-jobs={}", limits.messages);
            push(&mut args, "--max-time={}", limits.time_limit_seconds);
            push(&mut args, "--memory={}", mib);
        }
        Preset::Custom => {
            let templates = custom.cloned().unwrap_or_default();
            let pairs = [
                ("messages", limits.messages.map(u64::from), templates.messages),
                ("timeLimitSeconds", limits.time_limit_seconds.map(u64::from), templates.time_limit_seconds),
                ("memory", mib, templates.memory),
                ("failures", limits.failures.map(u64::from), templates.failures),
            ];
            for (name, value, template) in pairs {
                let Some(value) = value else { continue };
                let Some(template) = template else {
                    return Err(LimitError {
                        field: custom_field(name),
                        message: format!(
                            "the custom preset needs spec.consumer.arguments.{name} (e.g. \"--{}={{}}\") to pass limits.{name}",
                            name.to_lowercase()
                        ),
                    });
                };
                args.push(template.replace("{}", &value.to_string()));
            }
        }
    }
    Ok(args)
}

fn custom_field(name: &str) -> &'static str {
    match name {
        "messages" => "spec.consumer.arguments.messages",
        "timeLimitSeconds" => "spec.consumer.arguments.timeLimitSeconds",
        "memory" => "spec.consumer.arguments.memory",
        _ => "spec.consumer.arguments.failures",
    }
}

fn push<T: ToString>(args: &mut Vec<String>, template: &str, value: Option<T>) {
    if let Some(value) = value {
        args.push(template.replace("{}", &value.to_string()));
    }
}

/// Parses a Kubernetes memory quantity (`128Mi`, `1.5Gi`, `500M`, `1024`) into bytes.
pub fn parse_quantity_bytes(quantity: &str) -> Result<u64, String> {
    let q = quantity.trim();
    let split = q.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        _ => return Err(format!("{quantity:?} is not a memory quantity (e.g. 128Mi, 1Gi, 500M) or \"auto\"")),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{quantity:?} is not a memory quantity (e.g. 128Mi, 1Gi, 500M) or \"auto\""))?;
    if value <= 0.0 {
        return Err(format!("{quantity:?} must be greater than zero"));
    }
    Ok((value * multiplier) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> ResolvedLimits {
        ResolvedLimits {
            messages: Some(100),
            time_limit_seconds: Some(3600),
            memory_bytes: Some(128 << 20),
            failures: Some(5),
        }
    }

    #[test]
    fn symfony_renders_messenger_consume_options() {
        assert_eq!(
            render(Preset::Symfony, &all(), None).unwrap(),
            ["--limit=100", "--time-limit=3600", "--memory-limit=128M", "--failure-limit=5"]
        );
    }

    #[test]
    fn laravel_renders_queue_work_options() {
        let limits = ResolvedLimits { failures: None, ..all() };
        assert_eq!(
            render(Preset::Laravel, &limits, None).unwrap(),
            ["--max-jobs=100", "--max-time=3600", "--memory=128"]
        );
    }

    #[test]
    fn laravel_refuses_a_failure_limit_naming_the_field() {
        let err = render(Preset::Laravel, &all(), None).unwrap_err();
        assert_eq!(err.field, "spec.consumer.limits.failures");
    }

    #[test]
    fn custom_uses_the_given_templates() {
        let custom = CustomArguments {
            messages: Some("--max-messages={}".into()),
            time_limit_seconds: Some("--max-seconds={}".into()),
            memory: Some("--max-mb={}".into()),
            failures: Some("--fails={}".into()),
        };
        assert_eq!(
            render(Preset::Custom, &all(), Some(&custom)).unwrap(),
            ["--max-messages=100", "--max-seconds=3600", "--max-mb=128", "--fails=5"]
        );
    }

    #[test]
    fn custom_without_a_template_names_the_missing_argument() {
        let limits = ResolvedLimits { messages: Some(3), ..Default::default() };
        let err = render(Preset::Custom, &limits, None).unwrap_err();
        assert_eq!(err.field, "spec.consumer.arguments.messages");
    }

    #[test]
    fn unset_limits_render_nothing() {
        assert!(render(Preset::Symfony, &ResolvedLimits::default(), None).unwrap().is_empty());
    }

    #[test]
    fn quantities_parse_binary_and_decimal_suffixes() {
        assert_eq!(parse_quantity_bytes("128Mi").unwrap(), 128 << 20);
        assert_eq!(parse_quantity_bytes("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_quantity_bytes("500M").unwrap(), 500_000_000);
        assert_eq!(parse_quantity_bytes("1024").unwrap(), 1024);
        assert!(parse_quantity_bytes("lots").is_err());
        assert!(parse_quantity_bytes("12Xi").is_err());
        assert_eq!(MemorySetting::parse("auto").unwrap(), MemorySetting::Auto);
    }

    #[test]
    fn check_names_the_memory_field() {
        let limits = Limits { memory: Some("0Mi".into()), ..Default::default() };
        assert_eq!(check(Preset::Symfony, &limits, None).unwrap_err().field, "spec.consumer.limits.memory");
    }
}
