//! Building what the controller owns from a WorkerPool: worker pods, the stop flag, and the
//! per-pool RBAC that lets agents watch it. Pure: no I/O.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    ObjectFieldSelector, Pod, ResourceFieldSelector, ResourceRequirements, SeccompProfile, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::agent;
use crate::api::{Preset, WorkerPool, labels};
use crate::controller::validate::Valid;
use crate::stopflag::StopFlag;

pub const BIN_VOLUME: &str = "workerpool-bin";
pub const FLAG_VOLUME: &str = "workerpool-stop-flag";
pub const INSTALL_CONTAINER: &str = "workerpool-agent-install";
/// Where the init container sees the agent volume: not under `/workerpool`, which is the binary itself in its image.
const INSTALL_DIR: &str = "/agent-bin";

/// A stable hash of everything that shapes a worker: the pod template and the consumer settings.
/// `replicas` and `rollout` are left out: scaling or changing the strategy rolls nothing.
pub fn revision(pool: &WorkerPool) -> String {
    let shape = serde_json::json!({"template": pool.spec.template, "consumer": pool.spec.consumer});
    let digest = Sha256::digest(serde_json::to_vec(&shape).expect("spec serializes"));
    digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

/// Labels selecting every pod of the pool.
pub fn selector_labels(pool: &WorkerPool) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::MANAGED_BY.to_string(), labels::MANAGED_BY_VALUE.to_string()),
        (labels::POOL.to_string(), pool.name_any()),
    ])
}

/// The selector as a string, for status.selector (the /scale subresource).
pub fn selector_string(pool: &WorkerPool) -> String {
    selector_labels(pool).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn owned_meta(pool: &WorkerPool, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: pool.namespace(),
        labels: Some(selector_labels(pool)),
        owner_references: Some(vec![pool.controller_owner_ref(&()).expect("a WorkerPool from the API has a uid")]),
        ..Default::default()
    }
}

/// A new worker pod of `revision`, built from the validated template.
pub fn build_pod(pool: &WorkerPool, valid: &Valid, revision: &str, agent_image: &str) -> Pod {
    let name = pool.name_any();
    let template_meta = pool.spec.template.metadata.clone().unwrap_or_default();
    let mut pod_labels = template_meta.labels.unwrap_or_default();
    pod_labels.extend(selector_labels(pool));
    pod_labels.insert(labels::REVISION.to_string(), revision.to_string());

    let mut spec = valid.pod_spec.clone();
    // The agent restarts the consumer itself; the kubelet only steps in when the agent gives up.
    spec.restart_policy = Some("OnFailure".into());
    spec.volumes.get_or_insert_with(Vec::new).extend([
        Volume { name: BIN_VOLUME.into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() },
        Volume {
            name: FLAG_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: pool.stop_flag_name(),
                optional: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]);
    spec.init_containers.get_or_insert_with(Vec::new).insert(0, install_container(agent_image));
    let consumer = &mut spec.containers[valid.consumer_index];
    wrap_in_agent(consumer, pool, revision);

    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}-{revision}-")),
            namespace: pool.namespace(),
            labels: Some(pod_labels),
            annotations: template_meta.annotations,
            owner_references: Some(vec![pool.controller_owner_ref(&()).expect("a WorkerPool from the API has a uid")]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The init container that copies the static agent binary into the pod.
fn install_container(agent_image: &str) -> Container {
    Container {
        name: INSTALL_CONTAINER.into(),
        image: Some(agent_image.into()),
        command: Some(vec!["/workerpool".into(), "install-agent".into(), format!("{INSTALL_DIR}/workerpool")]),
        volume_mounts: Some(vec![VolumeMount {
            name: BIN_VOLUME.into(),
            mount_path: INSTALL_DIR.into(),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), Quantity("10m".into())),
                ("memory".into(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".into(), Quantity("64Mi".into()))])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Rewrites the consumer container so that the agent is PID 1 and starts the consumer.
fn wrap_in_agent(consumer: &mut Container, pool: &WorkerPool, revision: &str) {
    let settings = &pool.spec.consumer;
    let mut command = vec![agent::AGENT_PATH.to_string(), "agent".into()];
    let preset = match settings.preset {
        Preset::Symfony => "symfony",
        Preset::Laravel => "laravel",
        Preset::Custom => "custom",
    };
    command.extend(["--preset".into(), preset.into()]);
    let limits = &settings.limits;
    let mut option = |flag: &str, value: Option<String>| {
        if let Some(value) = value {
            command.extend([flag.to_string(), value]);
        }
    };
    option("--messages", limits.messages.map(|v| v.to_string()));
    option("--time-limit-seconds", limits.time_limit_seconds.map(|v| v.to_string()));
    option("--memory", limits.memory.clone());
    option("--failures", limits.failures.map(|v| v.to_string()));
    if let Some(templates) = &settings.arguments {
        option("--messages-arg", templates.messages.clone());
        option("--time-limit-arg", templates.time_limit_seconds.clone());
        option("--memory-arg", templates.memory.clone());
        option("--failures-arg", templates.failures.clone());
    }
    option("--stop-signal", Some(settings.stop_signal.name().into()));
    option("--jitter-percent", Some(settings.time_limit_jitter_percent.to_string()));
    command.push("--".into());
    command.extend(consumer.command.take().unwrap_or_default());
    command.extend(consumer.args.take().unwrap_or_default());
    consumer.command = Some(command);

    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
        ..Default::default()
    };
    let mut env = vec![
        EnvVar { name: "WORKERPOOL_POOL".into(), value: Some(pool.name_any()), ..Default::default() },
        EnvVar { name: "WORKERPOOL_REVISION".into(), value: Some(revision.into()), ..Default::default() },
        EnvVar { name: "WORKERPOOL_POD_NAME".into(), value_from: Some(field("metadata.name")), ..Default::default() },
        EnvVar {
            name: "WORKERPOOL_NAMESPACE".into(),
            value_from: Some(field("metadata.namespace")),
            ..Default::default()
        },
    ];
    let has_memory_limit =
        consumer.resources.as_ref().and_then(|r| r.limits.as_ref()).is_some_and(|l| l.contains_key("memory"));
    if has_memory_limit {
        env.push(EnvVar {
            name: "WORKERPOOL_MEMORY_LIMIT".into(),
            value_from: Some(EnvVarSource {
                resource_field_ref: Some(ResourceFieldSelector {
                    container_name: Some(consumer.name.clone()),
                    resource: "limits.memory".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    consumer.env.get_or_insert_with(Vec::new).extend(env);
    consumer.volume_mounts.get_or_insert_with(Vec::new).extend([
        VolumeMount {
            name: BIN_VOLUME.into(),
            mount_path: agent::BIN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: FLAG_VOLUME.into(),
            mount_path: agent::FLAG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
    ]);
}

/// The stop-flag ConfigMap with the given content.
pub fn build_stop_flag(pool: &WorkerPool, flag: &StopFlag) -> ConfigMap {
    ConfigMap { metadata: owned_meta(pool, pool.stop_flag_name()), data: Some(flag.to_data()), ..Default::default() }
}

/// Name of the Role and RoleBinding that let the pool's agents read their stop flag.
pub fn flag_reader_name(pool: &WorkerPool) -> String {
    format!("{}-stop-flag-reader", pool.name_any())
}

/// Read access to exactly one ConfigMap, the pool's stop flag.
pub fn build_flag_reader_role(pool: &WorkerPool) -> Role {
    Role {
        metadata: owned_meta(pool, flag_reader_name(pool)),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["".into()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some(vec![pool.stop_flag_name()]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..Default::default()
        }]),
    }
}

/// Binds the flag-reader Role to the service account the worker pods run as.
pub fn build_flag_reader_binding(pool: &WorkerPool) -> RoleBinding {
    let pod_spec = pool.spec.template.spec.as_ref();
    #[allow(deprecated)] // `serviceAccount` is the old name users may still set
    let account = pod_spec
        .and_then(|s| s.service_account_name.clone().or_else(|| s.service_account.clone()))
        .unwrap_or_else(|| "default".into());
    RoleBinding {
        metadata: owned_meta(pool, flag_reader_name(pool)),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: flag_reader_name(pool),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: account,
            namespace: pool.namespace(),
            ..Default::default()
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::validate::validate;

    pub fn pool(spec: serde_json::Value) -> WorkerPool {
        let mut pool: WorkerPool = serde_json::from_value(serde_json::json!({
            "apiVersion": "workerpool.dev/v1alpha1", "kind": "WorkerPool",
            "metadata": {"name": "emails", "namespace": "shop", "uid": "u-1"},
            "spec": spec,
        }))
        .unwrap();
        pool.metadata.generation = Some(1);
        pool
    }

    fn emails() -> WorkerPool {
        pool(serde_json::json!({
            "replicas": 2,
            "consumer": {"limits": {"messages": 100, "timeLimitSeconds": 3600, "memory": "128Mi"}},
            "template": {
                "metadata": {"labels": {"app": "shop"}},
                "spec": {"containers": [{
                    "name": "worker", "image": "app:1",
                    "command": ["php", "bin/console"], "args": ["messenger:consume", "async"],
                    "resources": {"limits": {"memory": "256Mi"}}
                }]}
            }
        }))
    }

    #[test]
    fn revision_is_stable_and_ignores_replicas_and_rollout() {
        let a = emails();
        let mut b = emails();
        b.spec.replicas = 9;
        b.spec.rollout.drain_timeout_seconds = 5;
        assert_eq!(revision(&a), revision(&b));
        assert_eq!(revision(&a).len(), 10);
    }

    #[test]
    fn revision_changes_with_image_and_limits() {
        let a = emails();
        let mut image = emails();
        image.spec.template.spec.as_mut().unwrap().containers[0].image = Some("app:2".into());
        let mut limit = emails();
        limit.spec.consumer.limits.messages = Some(50);
        assert_ne!(revision(&a), revision(&image));
        assert_ne!(revision(&a), revision(&limit));
    }

    #[test]
    fn pod_runs_the_consumer_under_the_agent() {
        let pool = emails();
        let valid = validate(&pool.spec).unwrap();
        let pod = build_pod(&pool, &valid, "abc", "workerpool-operator:dev");
        let spec = pod.spec.unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("OnFailure"));
        let worker = &spec.containers[0];
        let command = worker.command.clone().unwrap();
        assert_eq!(command[..4], [agent::AGENT_PATH, "agent", "--preset", "symfony"]);
        let tail = command.iter().skip_while(|a| *a != "--").cloned().collect::<Vec<_>>();
        assert_eq!(tail, ["--", "php", "bin/console", "messenger:consume", "async"]);
        assert!(command.windows(2).any(|w| w == ["--messages", "100"]));
        assert!(command.windows(2).any(|w| w == ["--memory", "128Mi"]));
        assert!(worker.args.is_none());
        let env: Vec<_> = worker.env.iter().flatten().map(|e| e.name.as_str()).collect();
        assert!(env.contains(&"WORKERPOOL_POD_NAME") && env.contains(&"WORKERPOOL_MEMORY_LIMIT"));
        let init = &spec.init_containers.unwrap()[0];
        assert_eq!(init.image.as_deref(), Some("workerpool-operator:dev"));
        let labels = pod.metadata.labels.unwrap();
        assert_eq!(labels[labels::REVISION], "abc");
        assert_eq!(labels[labels::POOL], "emails");
        assert_eq!(labels["app"], "shop");
        assert_eq!(pod.metadata.generate_name.as_deref(), Some("emails-abc-"));
        assert_eq!(pod.metadata.owner_references.unwrap()[0].controller, Some(true));
    }

    #[test]
    fn flag_reader_role_names_exactly_the_stop_flag() {
        let role = build_flag_reader_role(&emails());
        let rule = &role.rules.unwrap()[0];
        assert_eq!(rule.resource_names.as_ref().unwrap(), &["emails-stop-flag"]);
        assert_eq!(rule.verbs, ["get", "list", "watch"]);
        let binding = build_flag_reader_binding(&emails());
        assert_eq!(binding.subjects.unwrap()[0].name, "default");
    }
}
