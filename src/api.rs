//! The `WorkerPool` custom resource (`workerpool.dev/v1alpha1`): spec, status, schema, defaults.
//!
//! Everything the API server can check is expressed in the schema here (ranges, enums,
//! patterns), so bad input is refused at `kubectl apply` with the field named. What only the
//! controller can see is checked in `controller::validate`.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "workerpool.dev";
pub const FIELD_MANAGER: &str = "workerpool-operator";

/// Labels and annotations the operator puts on what it owns.
pub mod labels {
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const MANAGED_BY_VALUE: &str = "workerpool-operator";
    pub const POOL: &str = "workerpool.dev/pool";
    pub const REVISION: &str = "workerpool.dev/revision";
    /// Set on a pod when the controller asked it to drain (RFC 3339); the drain timeout counts from here.
    pub const DRAIN_STARTED_AT: &str = "workerpool.dev/drain-started-at";
}

/// A pool of queue consumers: one pod per worker, each consumer started with its limit
/// arguments, restarted at once after a clean exit, and drained gracefully on every rollout.
// (clippy mistakes the repeated `printcolumn(type_ = ...)` for duplicated attributes)
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "workerpool.dev",
    version = "v1alpha1",
    kind = "WorkerPool",
    plural = "workerpools",
    shortname = "wp",
    namespaced,
    status = "WorkerPoolStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Up-to-date", type_ = "integer", json_path = ".status.updatedReplicas"),
    printcolumn(name = "Draining", type_ = "integer", json_path = ".status.drainingReplicas"),
    printcolumn(name = "Revision", type_ = "string", json_path = ".status.updateRevision"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPoolSpec {
    /// Number of workers (one pod each). The /scale subresource points here, so
    /// `kubectl scale`, the HorizontalPodAutoscaler and KEDA can drive it.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,

    /// How the consumer process is run: which container, its limit options, its stop signal.
    #[serde(default)]
    pub consumer: ConsumerSpec,

    /// The worker pod, as in a Deployment. The consumer container must have a `command`
    /// (the image's entrypoint cannot be known without a registry).
    #[schemars(schema_with = "pod_template_schema")]
    pub template: PodTemplateSpec,

    /// How workers are replaced when the pod template or the consumer settings change.
    #[serde(default)]
    pub rollout: RolloutSpec,
}

fn default_replicas() -> i32 {
    1
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerSpec {
    /// Name of the consumer container in the template. Default: the first container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,

    /// Which command-line options the consumer takes for its limits:
    /// `symfony` (messenger:consume), `laravel` (queue:work) or `custom` (see `arguments`).
    #[serde(default)]
    pub preset: Preset,

    /// When a consumer exits by itself so that a fresh one is started: after N messages,
    /// S seconds, above a memory use, after N failures. Each one is optional.
    #[serde(default)]
    pub limits: Limits,

    /// For the `custom` preset: the argument for each limit, `{}` standing for its value
    /// (messages and failures: a count; timeLimitSeconds: seconds; memory: mebibytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<CustomArguments>,

    /// The signal that tells this consumer "finish the current message, then exit".
    /// SIGTERM for Symfony and Laravel; SIGQUIT for some php-fpm based images.
    #[serde(default)]
    pub stop_signal: StopSignal,

    /// Random spread, in percent, applied to `timeLimitSeconds` at each start so that workers
    /// started together do not all recycle at the same moment. 0 disables it.
    #[serde(default = "default_jitter_percent")]
    #[schemars(range(min = 0, max = 50))]
    pub time_limit_jitter_percent: u32,
}

fn default_jitter_percent() -> u32 {
    5
}

impl Default for ConsumerSpec {
    fn default() -> Self {
        Self {
            container: None,
            preset: Preset::default(),
            limits: Limits::default(),
            arguments: None,
            stop_signal: StopSignal::default(),
            time_limit_jitter_percent: default_jitter_percent(),
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// `--limit=N --time-limit=S --memory-limit=128M --failure-limit=N`
    #[default]
    Symfony,
    /// `--max-jobs=N --max-time=S --memory=128` (no failure limit)
    Laravel,
    /// Arguments named in `consumer.arguments`.
    Custom,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Exit after this many messages (symfony `--limit`, laravel `--max-jobs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub messages: Option<u32>,

    /// Exit after this many seconds (symfony `--time-limit`, laravel `--max-time`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub time_limit_seconds: Option<u32>,

    /// Exit once memory use is above this quantity (e.g. `128Mi`), or `auto`: a safe share
    /// of the container's memory limit, so that the consumer exits before the OOM killer
    /// cuts a message in half (symfony `--memory-limit`, laravel `--memory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(auto|[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|K|M|G|T)?)$"))]
    pub memory: Option<String>,

    /// Exit after this many failed messages (symfony `--failure-limit`; not supported by laravel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub failures: Option<u32>,
}

/// Argument templates for the `custom` preset, e.g. `--max-messages={}`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomArguments {
    /// Argument for `limits.messages`, e.g. `--max-messages={}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"\{\}"))]
    pub messages: Option<String>,
    /// Argument for `limits.timeLimitSeconds`, e.g. `--max-seconds={}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"\{\}"))]
    pub time_limit_seconds: Option<String>,
    /// Argument for `limits.memory`, `{}` in mebibytes, e.g. `--max-memory-mb={}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"\{\}"))]
    pub memory: Option<String>,
    /// Argument for `limits.failures`, e.g. `--max-failures={}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"\{\}"))]
    pub failures: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum StopSignal {
    #[default]
    #[serde(rename = "SIGTERM")]
    Term,
    #[serde(rename = "SIGINT")]
    Int,
    #[serde(rename = "SIGQUIT")]
    Quit,
    #[serde(rename = "SIGHUP")]
    Hup,
    #[serde(rename = "SIGUSR1")]
    Usr1,
    #[serde(rename = "SIGUSR2")]
    Usr2,
}

impl StopSignal {
    pub const ALL: [StopSignal; 6] = [Self::Term, Self::Int, Self::Quit, Self::Hup, Self::Usr1, Self::Usr2];

    pub fn name(self) -> &'static str {
        match self {
            Self::Term => "SIGTERM",
            Self::Int => "SIGINT",
            Self::Quit => "SIGQUIT",
            Self::Hup => "SIGHUP",
            Self::Usr1 => "SIGUSR1",
            Self::Usr2 => "SIGUSR2",
        }
    }
}

impl std::str::FromStr for StopSignal {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let wanted = s.trim().to_ascii_uppercase();
        let wanted = if wanted.starts_with("SIG") { wanted } else { format!("SIG{wanted}") };
        Self::ALL.into_iter().find(|sig| sig.name() == wanted).ok_or_else(|| {
            let allowed: Vec<_> = Self::ALL.iter().map(|s| s.name()).collect();
            format!("unknown signal {s:?}; allowed: {}", allowed.join(", "))
        })
    }
}

impl std::fmt::Display for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// `Rolling`: each worker is replaced as soon as its old one has drained.
    /// `Surge`: up to `maxSurge` new workers first; old ones drain once new ones are Ready.
    /// `Recreate`: no new worker starts before every old one has exited.
    #[serde(default)]
    pub strategy: Strategy,

    /// With `Surge`: how many workers above `replicas` may run during a rollout.
    #[serde(default = "default_max_surge")]
    #[schemars(range(min = 1))]
    pub max_surge: i32,

    /// How long a draining worker may keep working on its message before its pod is
    /// deleted (SIGTERM, grace period, SIGKILL).
    #[serde(default = "default_drain_timeout")]
    #[schemars(range(min = 1))]
    pub drain_timeout_seconds: i64,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            strategy: Strategy::default(),
            max_surge: default_max_surge(),
            drain_timeout_seconds: default_drain_timeout(),
        }
    }
}

fn default_max_surge() -> i32 {
    1
}
fn default_drain_timeout() -> i64 {
    600
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Strategy {
    #[default]
    Rolling,
    Surge,
    Recreate,
}

/// Written by the controller only.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPoolStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Worker pods that exist and have not ended.
    #[serde(default)]
    pub replicas: i32,
    /// Worker pods that are Ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Worker pods of `updateRevision` that have not ended.
    #[serde(default)]
    pub updated_replicas: i32,
    /// Worker pods finishing their current message before they exit.
    #[serde(default)]
    pub draining_replicas: i32,
    /// The revision all workers ran before the rollout in progress (equals `updateRevision` when done).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<String>,
    /// The revision of the current spec: what new workers run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_revision: Option<String>,
    /// Label selector of the pool's pods, for the /scale subresource (HPA, KEDA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// `Ready`, `Available`, `Progressing` and `RolloutComplete`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// Condition types, in one place.
pub mod condition {
    /// The spec is valid and every desired worker runs the current revision and is Ready.
    pub const READY: &str = "Ready";
    /// At least `replicas` workers are Ready (whatever their revision).
    pub const AVAILABLE: &str = "Available";
    /// A rollout or a scale change is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// Every worker runs `updateRevision` and none is draining: `kubectl wait --for=condition=RolloutComplete`.
    pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
}

/// The embedded PodTemplateSpec without the descriptions of Kubernetes' own types: with them the
/// CRD is ~480 KB, over the 256 KiB annotation that client-side `kubectl apply` writes.
fn pod_template_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    without_descriptions(generator.subschema_for::<PodTemplateSpec>())
}

fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    without_descriptions(generator.subschema_for::<Vec<Condition>>())
}

fn without_descriptions(schema: schemars::Schema) -> schemars::Schema {
    let mut value = schema.to_value();
    strip_descriptions(&mut value);
    schemars::Schema::try_from(value).expect("a schema stays a schema without descriptions")
}

fn strip_descriptions(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if map.get("description").is_some_and(|d| d.is_string()) {
                map.remove("description");
            }
            // "properties" maps field names to schemas: a field may itself be called "description".
            map.values_mut().for_each(strip_descriptions);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_descriptions),
        _ => {}
    }
}

impl WorkerPool {
    /// The name of the pool's stop-flag ConfigMap.
    pub fn stop_flag_name(&self) -> String {
        stop_flag_name(&kube::ResourceExt::name_any(self))
    }
}

pub fn stop_flag_name(pool: &str) -> String {
    format!("{pool}-stop-flag")
}

/// The CRD as YAML, as `workerpool crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let header = "# Generated by `workerpool crd` from src/api.rs. Do not edit.\n";
    format!("{header}{}", serde_yaml::to_string(&WorkerPool::crd()).expect("CRD serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_is_small_enough_for_client_side_apply() {
        // kubectl's last-applied annotation is limited to 256 KiB.
        let yaml = crd_yaml();
        assert!(yaml.len() < 200 * 1024, "CRD is {} bytes", yaml.len());
    }

    #[test]
    fn crd_in_repository_is_fresh() {
        let checked_in = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/workerpool.yaml"))
            .expect("crds/workerpool.yaml exists (run `make crds`)");
        assert!(checked_in == crd_yaml(), "crds/workerpool.yaml is stale: run `make crds` and commit it");
    }

    #[test]
    fn our_fields_keep_their_descriptions() {
        let yaml = crd_yaml();
        assert!(yaml.contains("Exit after this many messages"));
        assert!(yaml.contains("How long a draining worker may keep working"));
    }

    #[test]
    fn defaults_apply_to_a_minimal_spec() {
        let spec: WorkerPoolSpec = serde_json::from_value(serde_json::json!({
            "template": {"spec": {"containers": [{"name": "w", "image": "i", "command": ["x"]}]}}
        }))
        .unwrap();
        assert_eq!(spec.replicas, 1);
        assert_eq!(spec.consumer.preset, Preset::Symfony);
        assert_eq!(spec.consumer.stop_signal, StopSignal::Term);
        assert_eq!(spec.rollout.strategy, Strategy::Rolling);
        assert_eq!(spec.rollout.drain_timeout_seconds, 600);
    }

    #[test]
    fn stop_signal_parses_with_or_without_prefix() {
        assert_eq!("SIGQUIT".parse::<StopSignal>().unwrap(), StopSignal::Quit);
        assert_eq!("term".parse::<StopSignal>().unwrap(), StopSignal::Term);
        let err = "SIGKILL".parse::<StopSignal>().unwrap_err();
        assert!(err.contains("SIGTERM"), "{err}");
    }
}
