//! What only the controller can check in a spec (the schema checks the rest). Pure.

use k8s_openapi::api::core::v1::{Container, PodSpec};

use crate::api::{WorkerPoolSpec, labels};
use crate::controller::pods::{BIN_VOLUME, FLAG_VOLUME};
use crate::limits;

/// A spec the controller cannot run: the message names the field and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

fn error(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError { field: field.into(), message: message.into() }
}

/// A validated spec: the pod spec and the index of the consumer container in it.
#[derive(Debug)]
pub struct Valid<'a> {
    pub pod_spec: &'a PodSpec,
    pub consumer_index: usize,
}

impl Valid<'_> {
    pub fn consumer(&self) -> &Container {
        &self.pod_spec.containers[self.consumer_index]
    }
}

pub fn validate(spec: &WorkerPoolSpec) -> Result<Valid<'_>, SpecError> {
    let pod_spec = spec
        .template
        .spec
        .as_ref()
        .ok_or_else(|| error("spec.template.spec", "required: the worker pod's spec, as in a Deployment"))?;
    if pod_spec.containers.is_empty() {
        return Err(error("spec.template.spec.containers", "at least one container is required"));
    }
    let consumer_index = match &spec.consumer.container {
        None => 0,
        Some(name) => pod_spec.containers.iter().position(|c| &c.name == name).ok_or_else(|| {
            let have: Vec<_> = pod_spec.containers.iter().map(|c| c.name.as_str()).collect();
            error(
                "spec.consumer.container",
                format!(
                    "no container named {name:?} in spec.template.spec.containers (containers: {})",
                    have.join(", ")
                ),
            )
        })?,
    };
    let consumer = &pod_spec.containers[consumer_index];
    if consumer.command.as_ref().is_none_or(|c| c.is_empty()) {
        return Err(error(
            format!("spec.template.spec.containers[{}].command", consumer.name),
            "required on the consumer container: the agent starts the consumer itself, and the image's \
             entrypoint cannot be known without a registry (e.g. [\"php\", \"bin/console\", \"messenger:consume\", \"async\"])",
        ));
    }
    limits::check(spec.consumer.preset, &spec.consumer.limits, spec.consumer.arguments.as_ref())
        .map_err(|e| error(e.field, e.message))?;
    if spec.consumer.limits.memory.as_deref() == Some("auto") && memory_limit(consumer).is_none() {
        return Err(error(
            "spec.consumer.limits.memory",
            format!(
                "\"auto\" is a share of the container's memory limit, so it needs \
                 spec.template.spec.containers[{}].resources.limits.memory; set one or give a quantity such as 128Mi",
                consumer.name
            ),
        ));
    }
    for volume in pod_spec.volumes.iter().flatten() {
        if volume.name == BIN_VOLUME || volume.name == FLAG_VOLUME {
            return Err(error(
                "spec.template.spec.volumes",
                format!("the volume name {:?} is reserved for the workerpool agent", volume.name),
            ));
        }
    }
    let template_labels = spec.template.metadata.as_ref().and_then(|m| m.labels.as_ref());
    if let Some(key) = template_labels
        .into_iter()
        .flat_map(|l| l.keys())
        .find(|k| [labels::POOL, labels::REVISION].contains(&k.as_str()))
    {
        return Err(error("spec.template.metadata.labels", format!("{key:?} is set by the operator; remove it")));
    }
    Ok(Valid { pod_spec, consumer_index })
}

fn memory_limit(container: &Container) -> Option<&str> {
    container.resources.as_ref()?.limits.as_ref()?.get("memory").map(|q| q.0.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Preset;

    fn spec(container: serde_json::Value) -> WorkerPoolSpec {
        serde_json::from_value(serde_json::json!({"template": {"spec": {"containers": [container]}}})).unwrap()
    }

    fn worker() -> serde_json::Value {
        serde_json::json!({"name": "worker", "image": "app:1", "command": ["php", "bin/console", "messenger:consume"]})
    }

    #[test]
    fn a_minimal_spec_is_valid() {
        assert_eq!(validate(&spec(worker())).unwrap().consumer().name, "worker");
    }

    #[test]
    fn missing_command_names_the_container_field() {
        let err = validate(&spec(serde_json::json!({"name": "worker", "image": "app:1"}))).unwrap_err();
        assert_eq!(err.field, "spec.template.spec.containers[worker].command");
    }

    #[test]
    fn unknown_container_lists_the_ones_that_exist() {
        let mut s = spec(worker());
        s.consumer.container = Some("consumer".into());
        let err = validate(&s).unwrap_err();
        assert_eq!(err.field, "spec.consumer.container");
        assert!(err.message.contains("worker"), "{}", err.message);
    }

    #[test]
    fn unsupported_limit_for_the_preset_is_refused() {
        let mut s = spec(worker());
        s.consumer.preset = Preset::Laravel;
        s.consumer.limits.failures = Some(3);
        assert_eq!(validate(&s).unwrap_err().field, "spec.consumer.limits.failures");
    }

    #[test]
    fn auto_memory_needs_a_container_memory_limit() {
        let mut s = spec(worker());
        s.consumer.limits.memory = Some("auto".into());
        assert_eq!(validate(&s).unwrap_err().field, "spec.consumer.limits.memory");
        let mut with_limit = worker();
        with_limit["resources"] = serde_json::json!({"limits": {"memory": "256Mi"}});
        let mut s = spec(with_limit);
        s.consumer.limits.memory = Some("auto".into());
        assert!(validate(&s).is_ok());
    }

    #[test]
    fn reserved_volume_names_are_refused() {
        let mut s = spec(worker());
        s.template.spec.as_mut().unwrap().volumes =
            Some(vec![serde_json::from_value(serde_json::json!({"name": BIN_VOLUME, "emptyDir": {}})).unwrap()]);
        assert_eq!(validate(&s).unwrap_err().field, "spec.template.spec.volumes");
    }
}
