//! Helpers for tests that run the operator: install the CRD, run a controller scoped to the
//! test's namespace, make pools of the test-worker image, read what the pool's pods did.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use workerpool::api::{WorkerPool, labels};

pub const AGENT_IMAGE: &str = "workerpool-operator:dev";
pub const WORKER_V1: &str = "workerpool-test-worker:v1";
pub const WORKER_V2: &str = "workerpool-test-worker:v2";

/// Installs (or updates) the CRD and waits until the API serves it.
pub async fn install_crd(client: &Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = WorkerPool::crd();
    crds.patch(&crd.name_any(), &PatchParams::apply("workerpool-tests").force(), &Patch::Apply(&crd))
        .await
        .expect("apply the WorkerPool CRD");
    for _ in 0..100 {
        let established = crds
            .get(&crd.name_any())
            .await
            .ok()
            .and_then(|c| c.status)
            .and_then(|s| s.conditions)
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True"));
        if established {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the WorkerPool CRD was not Established within 10 s");
}

/// What a pool test starts with: a client, the CRD, a namespace of its own, and a controller
/// watching only that namespace (stopped when dropped).
pub async fn start_pool_test(name: &str) -> (Client, crate::common::TestNamespace, ControllerProcess) {
    let client = crate::common::client().await;
    install_crd(&client).await;
    let ns = crate::common::TestNamespace::create(&client, name).await;
    let controller = ControllerProcess::start(ns.name());
    (client, ns, controller)
}

/// The controller binary, run as a process scoped to one namespace; killed (by its pid) on drop.
pub struct ControllerProcess {
    child: Child,
    log: std::path::PathBuf,
}

impl ControllerProcess {
    pub fn start(namespace: &str) -> Self {
        let log_path = std::env::temp_dir().join(format!("controller-{namespace}.log"));
        let log = std::fs::File::create(&log_path).expect("controller log file");
        let child = Command::new(env!("CARGO_BIN_EXE_workerpool"))
            .args(["controller", "--namespace", namespace, "--agent-image", AGENT_IMAGE])
            .env("WORKERPOOL_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the controller");
        Self { child, log: log_path }
    }

    /// Kills the controller at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControllerProcess {
    /// Stops the controller; its log is kept only when the test failed.
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("controller log: {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A pool of the test worker. `extra` is merged into the spec (e.g. rollout settings).
pub fn test_pool(name: &str, replicas: i32, image: &str, message_seconds: f64, extra: serde_json::Value) -> WorkerPool {
    let mut spec = serde_json::json!({
        "replicas": replicas,
        "consumer": {"limits": {"messages": 1000}, "timeLimitJitterPercent": 0},
        "template": {"spec": {
            "terminationGracePeriodSeconds": 30,
            "containers": [{
                "name": "worker",
                "image": image,
                "imagePullPolicy": "Never",
                "command": ["/test-worker"],
                "env": [{"name": "MESSAGE_SECONDS", "value": message_seconds.to_string()}],
            }]
        }},
    });
    merge(&mut spec, extra);
    serde_json::from_value(serde_json::json!({
        "apiVersion": "workerpool.dev/v1alpha1", "kind": "WorkerPool",
        "metadata": {"name": name}, "spec": spec,
    }))
    .expect("a WorkerPool")
}

fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
    match (base, extra) {
        (serde_json::Value::Object(b), serde_json::Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

pub async fn create_pool(client: &Client, namespace: &str, pool: &WorkerPool) -> WorkerPool {
    Api::<WorkerPool>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), pool)
        .await
        .unwrap_or_else(|e| panic!("create WorkerPool {}: {e}", pool.name_any()))
}

/// Merge-patches the pool's spec.
pub async fn patch_spec(client: &Client, namespace: &str, name: &str, spec: serde_json::Value) {
    Api::<WorkerPool>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": spec})))
        .await
        .unwrap_or_else(|e| panic!("patch WorkerPool {name}: {e}"));
}

pub async fn get_pool(client: &Client, namespace: &str, name: &str) -> WorkerPool {
    Api::<WorkerPool>::namespaced(client.clone(), namespace).get(name).await.expect("get WorkerPool")
}

/// The pool's pods, whatever their phase.
pub async fn pool_pods(client: &Client, namespace: &str, pool: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("{}={pool}", labels::POOL)))
        .await
        .expect("list pods")
        .items
}

pub fn is_running_and_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    pod.metadata.deletion_timestamp.is_none()
        && status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Exactly `n` live pods in the pool, all running and ready.
pub async fn running_pods(client: &Client, namespace: &str, pool: &str, n: usize) -> Option<Vec<Pod>> {
    let live: Vec<Pod> = pool_pods(client, namespace, pool)
        .await
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    (live.len() == n && live.iter().all(is_running_and_ready)).then_some(live)
}

/// Waits for `n` running, ready pods (and no other live ones); returns them.
pub async fn wait_running(client: &Client, namespace: &str, pool: &str, n: usize) -> Vec<Pod> {
    let what = format!("{n} running workers of {pool}");
    crate::common::wait_for(std::time::Duration::from_secs(180), &what, || running_pods(client, namespace, pool, n))
        .await
}

/// Waits for `n` running workers that have each started a message; returns their names.
pub async fn wait_busy(client: &Client, namespace: &str, pool: &str, n: usize) -> Vec<String> {
    let what = format!("{n} busy workers of {pool}");
    crate::common::wait_for(std::time::Duration::from_secs(180), &what, || async {
        let pods = running_pods(client, namespace, pool, n).await?;
        for pod in &pods {
            if !logs(client, namespace, &pod.name_any()).await.contains("message 1 start") {
                return None;
            }
        }
        Some(pods.iter().map(|p| p.name_any()).collect())
    })
    .await
}

pub fn revision_of(pod: &Pod) -> String {
    pod.labels().get(labels::REVISION).cloned().unwrap_or_default()
}

/// The worker container's log so far (empty while it cannot be read yet).
pub async fn logs(client: &Client, namespace: &str, pod: &str) -> String {
    crate::common::try_pod_logs(client, namespace, pod, Some("worker")).await.unwrap_or_default()
}

pub fn condition_status(pool: &WorkerPool, type_: &str) -> Option<(String, String, String)> {
    pool.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// True when the pool's status describes its current generation and its rollout is complete.
pub fn rollout_complete(pool: &WorkerPool) -> bool {
    pool.status.as_ref().is_some_and(|s| s.observed_generation == pool.metadata.generation)
        && condition_status(pool, "RolloutComplete").is_some_and(|(s, _, _)| s == "True")
}

/// Everything the tests want to know about the pods of a namespace over time, from a watch.
#[derive(Default, Debug, Clone)]
pub struct PodRecord {
    pub revision: String,
    pub image: String,
    pub phases: Vec<String>,
    /// A deletionTimestamp appeared while the pod was still Running (not drained).
    pub deleted_while_running: bool,
}

#[derive(Clone, Default)]
pub struct PodHistory(std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, PodRecord>>>);

impl PodHistory {
    /// Starts recording every pod of the namespace; the task ends with the test's runtime.
    pub fn start(client: &Client, namespace: &str) -> Self {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, watcher};
        let history = Self::default();
        let record = history.clone();
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        tokio::spawn(async move {
            let mut events = watcher(pods, watcher::Config::default()).applied_objects().boxed();
            while let Some(Ok(pod)) = events.next().await {
                let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
                let mut map = record.0.lock().unwrap();
                let entry = map.entry(pod.name_any()).or_default();
                entry.revision = revision_of(&pod);
                entry.image = pod.spec.as_ref().and_then(|s| s.containers[0].image.clone()).unwrap_or_default();
                if entry.phases.last() != Some(&phase) {
                    entry.phases.push(phase.clone());
                }
                if pod.metadata.deletion_timestamp.is_some() && phase == "Running" {
                    entry.deleted_while_running = true;
                }
            }
        });
        history
    }

    pub fn snapshot(&self) -> std::collections::BTreeMap<String, PodRecord> {
        self.0.lock().unwrap().clone()
    }
}

/// Follows a pod's worker log, with the kubelet's timestamps, until the container ends.
pub fn follow_logs(client: &Client, namespace: &str, pod: &str) -> crate::common::LogFollower {
    crate::common::LogFollower::start_timestamped(client, namespace, pod, Some("worker"))
}

/// The whole log of a followed container, as lines, once it has exited.
pub async fn finished_lines(follower: &crate::common::LogFollower, timeout: std::time::Duration) -> Vec<String> {
    follower.wait_finished(timeout).await.lines().map(str::to_string).collect()
}

/// Checks that every message a worker started, it also ended.
pub fn assert_no_message_cut(pod: &str, lines: &[String]) {
    for line in lines.iter().filter(|l| l.ends_with(" start") && l.contains("message ")) {
        let started = &line[line.rfind("message ").unwrap()..];
        let ended = started.replace(" start", " end");
        assert!(
            lines.iter().any(|l| l.ends_with(&ended)),
            "{pod}: {started:?} has no {ended:?}; the log:\n{}",
            lines.join("\n")
        );
    }
}

/// The kubelet timestamp at the start of a `timestamps: true` log line.
pub fn line_time(line: &str) -> k8s_openapi::jiff::Timestamp {
    line.split_whitespace().next().and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("no timestamp in {line:?}"))
}
