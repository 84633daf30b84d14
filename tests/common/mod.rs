//! Helpers shared by the integration tests. They run against the local cluster
//! (`make cluster-up`, images from `make images`); `make test` does all of it.
//!
//! * [`client`]: a client for `$KUBECONFIG` (default [`DEFAULT_KUBECONFIG`]) that fails within
//!   about 10 s, saying what to do, when no cluster answers;
//! * [`TestNamespace`]: a fresh namespace per test, deleted by [`TestNamespace::delete`] or on drop;
//! * [`wait_for`]: poll until something holds, panic with a description on timeout;
//! * [`wait_for_pod_running`], [`pod_logs`], [`try_pod_logs`], [`LogFollower`]: pods and their logs.
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncBufReadExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, LogParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Where `hack/cluster.sh up` writes the kubeconfig of the local cluster.
pub const DEFAULT_KUBECONFIG: &str = "/tmp/workerpool-cluster/kubeconfig";
/// Label on every namespace the tests create.
pub const TEST_LABEL: &str = "workerpool.dev/test";
/// Set to 1 to keep the namespaces of failed (panicking) tests for inspection.
pub const KEEP_ENV: &str = "WP_TEST_KEEP_NAMESPACES";

const HINT: &str =
    "start the local cluster with `make cluster-up` (and `make images`), or point KUBECONFIG at a cluster";

/// The kubeconfig the tests use: `$KUBECONFIG`, or the local cluster's.
pub fn kubeconfig_path() -> String {
    match std::env::var("KUBECONFIG") {
        Ok(path) if !path.is_empty() => path,
        _ => DEFAULT_KUBECONFIG.to_string(),
    }
}

async fn connect() -> Result<Client, String> {
    let path = kubeconfig_path();
    let kubeconfig = if path.contains(':') {
        // a list of files, as kubectl merges them
        Kubeconfig::from_env().map_err(|e| format!("cannot read the kubeconfig files {path}: {e}"))?.unwrap_or_default()
    } else {
        Kubeconfig::read_from(&path).map_err(|e| format!("cannot read the kubeconfig {path}: {e}"))?
    };
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("invalid kubeconfig {path}: {e}"))?;
    config.connect_timeout = Some(Duration::from_secs(5));
    Client::try_from(config).map_err(|e| format!("cannot build a client from {path}: {e}"))
}

/// A client for the test cluster. Panics within about 10 s, with a message saying what to do,
/// when the kubeconfig is missing or no API server answers.
pub async fn client() -> Client {
    let path = kubeconfig_path();
    let client = match connect().await {
        Ok(client) => client,
        Err(e) => panic!("no test cluster: {e}\n  {HINT}"),
    };
    match tokio::time::timeout(Duration::from_secs(10), client.apiserver_version()).await {
        Ok(Ok(_)) => client,
        Ok(Err(e)) => panic!("no test cluster: the API server in {path} is not reachable: {e}\n  {HINT}"),
        Err(_) => panic!("no test cluster: the API server in {path} did not answer within 10 s\n  {HINT}"),
    }
}

/// Polls `check` until it returns `Some`, and returns that value. Panics with `what` when
/// `timeout` passes first (also when a single `check` hangs).
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let poll = async {
        loop {
            if let Some(value) = check().await {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    match tokio::time::timeout(timeout, poll).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// A namespace of its own for one test, named `wp-test-<name>-<random>`.
///
/// Delete it with [`TestNamespace::delete`] at the end of the test; if the test panics first,
/// `Drop` deletes it (from a thread of its own with a fresh client, since `Drop` cannot await).
/// With `WP_TEST_KEEP_NAMESPACES=1` the namespaces of failed tests are kept.
pub struct TestNamespace {
    name: String,
    client: Client,
    deleted: AtomicBool,
}

impl TestNamespace {
    /// Creates the namespace and waits for its default service account (pods need it).
    pub async fn create(client: &Client, name: &str) -> Self {
        let name = unique_name(name);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(TEST_LABEL.to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("cannot create the test namespace {name}: {e}"));
        let this = Self { name, client: client.clone(), deleted: AtomicBool::new(false) };
        // Before Kubernetes 1.24 a pod is refused until the account's token secret exists too.
        let token_secret = match client.apiserver_version().await {
            Ok(version) => version.minor.trim_end_matches('+').parse::<u32>().is_ok_and(|minor| minor < 24),
            Err(_) => true,
        };
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &this.name);
        wait_for(
            Duration::from_secs(30),
            &format!("the default service account of namespace {}", this.name),
            || async {
                let account = accounts.get_opt("default").await.ok()??;
                (!token_secret || account.secrets.as_ref().is_some_and(|s| !s.is_empty())).then_some(())
            },
        )
        .await;
        this
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deletes the namespace (and so everything in it) without waiting for it to be gone.
    pub async fn delete(&self) {
        if self.deleted.swap(true, Ordering::SeqCst) {
            return;
        }
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        match tokio::time::timeout(Duration::from_secs(10), namespaces.delete(&self.name, &DeleteParams::background()))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(kube::Error::Api(status))) if status.code == 404 => {}
            Ok(Err(e)) => eprintln!("warning: deleting the test namespace {}: {e}", self.name),
            Err(_) => eprintln!("warning: deleting the test namespace {} timed out", self.name),
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.deleted.load(Ordering::SeqCst) {
            return;
        }
        if std::thread::panicking() && std::env::var(KEEP_ENV).is_ok_and(|v| v == "1") {
            eprintln!("{KEEP_ENV}=1: keeping the namespace {} of the failed test", self.name);
            return;
        }
        // The test's runtime is blocked in this drop, and the client's connection task lives on
        // it: use a fresh runtime and client in a thread of their own.
        let name = self.name.clone();
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let client = connect().await.ok()?;
                let namespaces: Api<Namespace> = Api::all(client);
                tokio::time::timeout(Duration::from_secs(10), namespaces.delete(&name, &DeleteParams::background()))
                    .await
                    .ok()?
                    .ok()
            })
        })
        .join();
        if !matches!(deleted, Ok(Some(_))) {
            eprintln!("warning: could not delete the test namespace {}", self.name);
        }
    }
}

/// `wp-test-<name>-<6 random characters>`, a valid namespace name.
fn unique_name(name: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher
        .write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    hasher.write_u32(std::process::id());
    let mut bits = hasher.finish();
    let suffix: String = (0..6)
        .map(|_| {
            let c = b"0123456789abcdefghijklmnopqrstuvwxyz"[(bits % 36) as usize] as char;
            bits /= 36;
            c
        })
        .collect();
    let mut clean: String =
        name.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(40).collect();
    clean = clean.trim_matches('-').to_string();
    if clean.is_empty() { format!("wp-test-{suffix}") } else { format!("wp-test-{clean}-{suffix}") }
}

/// Waits until the pod is Running. Fails at once, with the reason, when it cannot get there:
/// an image missing from the node (run `make images`), a container that crashed, a pod that ended.
pub async fn wait_for_pod_running(client: &Client, namespace: &str, pod: &str, timeout: Duration) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    wait_for(timeout, &format!("pod {namespace}/{pod} to be Running"), || async {
        let current = pods.get_opt(pod).await.ok()??;
        let status = current.status.clone().unwrap_or_default();
        let statuses =
            status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten());
        for container in statuses {
            let waiting = container.state.as_ref().and_then(|s| s.waiting.as_ref());
            if let Some(reason) = waiting.and_then(|w| w.reason.as_deref()) {
                let message = waiting.and_then(|w| w.message.as_deref()).unwrap_or_default();
                match reason {
                    "ErrImageNeverPull" | "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" => panic!(
                        "pod {namespace}/{pod}: container {} cannot get its image ({reason}: {message}); \
                         build and import the images with `make images`",
                        container.name
                    ),
                    "CrashLoopBackOff"
                    | "CreateContainerError"
                    | "CreateContainerConfigError"
                    | "RunContainerError" => {
                        panic!("pod {namespace}/{pod}: container {} fails: {reason}: {message}", container.name)
                    }
                    _ => {}
                }
            }
        }
        match status.phase.as_deref() {
            Some("Running") => Some(current),
            Some(phase @ ("Succeeded" | "Failed")) => {
                panic!("pod {namespace}/{pod} ended ({phase}) instead of running")
            }
            _ => None,
        }
    })
    .await
}

/// The logs of a pod's container (`None`: its only container) so far.
pub async fn try_pod_logs(
    client: &Client,
    namespace: &str,
    pod: &str,
    container: Option<&str>,
) -> Result<String, kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.logs(pod, &LogParams { container: container.map(str::to_string), ..Default::default() }).await
}

/// The logs of a pod's only container so far; panics when they cannot be read.
pub async fn pod_logs(client: &Client, namespace: &str, pod: &str) -> String {
    try_pod_logs(client, namespace, pod, None)
        .await
        .unwrap_or_else(|e| panic!("cannot read the logs of pod {namespace}/{pod}: {e}"))
}

/// Follows a container's log in the background from its first line, so that what a container
/// writes while it is being deleted is still there after the pod is gone.
///
/// It (re)tries to attach until the container has started; once attached it reads until the
/// container exits (the stream ends then) and does not attach again.
pub struct LogFollower {
    what: String,
    text: Arc<Mutex<String>>,
    finished: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LogFollower {
    pub fn start(client: &Client, namespace: &str, pod: &str, container: Option<&str>) -> Self {
        Self::start_with(client, namespace, pod, container, false)
    }

    /// Like `start`, with the kubelet's RFC 3339 timestamp at the start of every line.
    pub fn start_timestamped(client: &Client, namespace: &str, pod: &str, container: Option<&str>) -> Self {
        Self::start_with(client, namespace, pod, container, true)
    }

    fn start_with(client: &Client, namespace: &str, pod: &str, container: Option<&str>, timestamps: bool) -> Self {
        let text = Arc::new(Mutex::new(String::new()));
        let finished = Arc::new(AtomicBool::new(false));
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let params =
            LogParams { follow: true, timestamps, container: container.map(str::to_string), ..Default::default() };
        let (pod_name, sink, done) = (pod.to_string(), text.clone(), finished.clone());
        let task = tokio::spawn(async move {
            let stream = loop {
                match pods.log_stream(&pod_name, &params).await {
                    Ok(stream) => break stream,
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            let mut lines = stream.lines();
            while let Ok(Some(line)) = lines.try_next().await {
                // the 1.20 kubelet ends a followed stream of a removed container with this line
                if line.contains("rpc error: code = NotFound desc = an error occurred when try to find container") {
                    continue;
                }
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
            done.store(true, Ordering::SeqCst);
        });
        let what = match container {
            Some(container) => format!("{namespace}/{pod} ({container})"),
            None => format!("{namespace}/{pod}"),
        };
        Self { what, text, finished, task }
    }

    /// Everything read so far.
    pub fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Whether the stream has ended (the container exited).
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    /// Waits until the log contains `needle`; returns the whole log. Panics with the log on timeout.
    pub async fn wait_for_text(&self, timeout: Duration, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let text = self.text();
            if text.contains(needle) {
                return text;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {:?} in the log of {}; log so far:\n{text}",
                    needle, self.what
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the container has exited and its log is complete; returns the whole log.
    pub async fn wait_finished(&self, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.finished() {
            if tokio::time::Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for {} to exit; log so far:\n{}", self.what, self.text());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.text()
    }
}

impl Drop for LogFollower {
    fn drop(&mut self) {
        self.task.abort();
    }
}
