//! The WorkerPool controller: observe → validate → plan (pure) → apply → status.
//!
//! The pure steps live in `validate`, `pods`, `plan` and `status`; this module is the thin I/O
//! edge around them.

pub mod plan;
pub mod pods;
pub mod status;
pub mod validate;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::api::{FIELD_MANAGER, WorkerPool, WorkerPoolStatus, condition, labels};
use crate::leader;
use crate::metrics::{Health, Metrics, PoolLabels, ResultLabels, WorkerLabels};
use crate::stopflag::StopFlag;
use plan::{DeleteReason, Phase, Plan, Settings, WorkerPod};

#[derive(clap::Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Image that holds the `workerpool` binary, copied into worker pods as their agent.
    #[arg(long, env = "WORKERPOOL_AGENT_IMAGE", default_value = "workerpool-operator:dev")]
    pub agent_image: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WORKERPOOL_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address for /metrics, /healthz and /readyz; empty to disable.
    #[arg(long, env = "WORKERPOOL_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: String,
    /// Run only while holding a Lease, so several replicas can run (one reconciles).
    #[arg(long, env = "WORKERPOOL_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Namespace of the leader Lease (default: the pod's namespace, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "workerpool-operator-leader")]
    pub lease_name: String,
}

#[derive(clap::Args, Debug, Clone)]
pub struct StopWorkersArgs {
    /// The WorkerPool's name.
    pub pool: String,
    /// Its namespace (default: the kubeconfig's).
    #[arg(short, long)]
    pub namespace: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("WorkerPool has no namespace")]
    NoNamespace,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub agent_image: String,
    /// Who reports the events. A fresh Recorder per event: kube's Recorder folds events of the
    /// same reason into a series and keeps the first note, and ours say which revision or pod.
    pub reporter: Reporter,
    pub metrics: Arc<Metrics>,
    /// Crash back-off for replacing Failed pods, per pool (`namespace/name`).
    backoff: Mutex<HashMap<String, FailureBackoff>>,
}

#[derive(Clone, Copy)]
struct FailureBackoff {
    failures: u32,
    until: Timestamp,
}

impl Context {
    pub fn new(client: Client, agent_image: String, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Self { reporter, client, agent_image, metrics, backoff: Mutex::default() }
    }

    fn blocked_until(&self, key: &str) -> Option<Timestamp> {
        self.backoff.lock().unwrap().get(key).map(|b| b.until)
    }

    fn record_failure(&self, key: &str, now: Timestamp) {
        let mut map = self.backoff.lock().unwrap();
        let next = next_backoff(map.get(key).copied(), now);
        map.insert(key.into(), next);
    }

    fn healthy(&self, key: &str) {
        self.backoff.lock().unwrap().remove(key);
    }
}

/// A worker pod failed: its replacement waits 5 s, doubling to 5 min, so a broken image never hot-loops.
fn next_backoff(previous: Option<FailureBackoff>, now: Timestamp) -> FailureBackoff {
    let failures = previous.map_or(0, |p| p.failures) + 1;
    let delay = 5i64.saturating_mul(1 << failures.min(7).saturating_sub(1)).min(300);
    FailureBackoff { failures, until: now + SignedDuration::from_secs(delay) }
}

pub async fn run(args: ControllerArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await.map_err(|e| anyhow::anyhow!("cannot reach Kubernetes: {e}"))?;
    let pools: Api<WorkerPool> = scoped(&client, args.namespace.as_deref());
    if let Err(e) = pools.list(&ListParams::default().limit(1)).await {
        anyhow::bail!("cannot list WorkerPools ({e}); is the CRD installed? `kubectl apply -f crds/`");
    }
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    if !args.metrics_addr.is_empty() {
        let address =
            args.metrics_addr.parse().map_err(|e| anyhow::anyhow!("--metrics-addr {:?}: {e}", args.metrics_addr))?;
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(address, metrics, health).await {
                warn!("metrics server on {address} stopped: {e}");
            }
        });
    }
    health.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    let ctx = Arc::new(Context::new(client.clone(), args.agent_image.clone(), metrics.clone()));

    if !args.leader_elect {
        run_controller(pools, &args, ctx).await;
        return Ok(());
    }
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| format!("workerpool-{}", std::process::id()));
    let elector = leader::Elector::new(client.clone(), &args.lease_namespace, &args.lease_name, identity);
    info!(lease = %args.lease_name, "waiting to become the leader");
    tokio::select! {
        _ = elector.acquire() => {}
        _ = shutdown_signal() => return Ok(()),
    }
    metrics.leader.set(1);
    tokio::select! {
        _ = run_controller(pools, &args, ctx) => {
            elector.release().await;
            Ok(())
        }
        // Losing the lease stops every write at once (the controller future is dropped); the
        // process exits so that its pod restarts as a candidate.
        _ = elector.hold() => anyhow::bail!("lost the leader lease; stopping"),
    }
}

async fn run_controller(pools: Api<WorkerPool>, args: &ControllerArgs, ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let owned = watcher::Config::default().labels(&format!("{}={}", labels::MANAGED_BY, labels::MANAGED_BY_VALUE));
    info!(agent_image = %args.agent_image, namespace = args.namespace.as_deref().unwrap_or("<all>"), "controller started");
    let controller = Controller::new(pools, watcher::Config::default());
    let store = controller.store();
    let metrics = ctx.metrics.clone();
    controller
        .owns(scoped::<Pod>(&client, args.namespace.as_deref()), owned.clone())
        .owns(scoped::<ConfigMap>(&client, args.namespace.as_deref()), owned)
        .shutdown_on_signal()
        .run(reconcile_measured, error_policy, ctx)
        .for_each(|result| {
            metrics.pools.set(store.state().len() as i64);
            async move {
                if let Err(e) = result {
                    warn!("reconcile failed: {e}");
                }
            }
        })
        .await;
    info!("controller stopped");
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn reconcile_measured(pool: Arc<WorkerPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile(pool, ctx.clone()).await;
    ctx.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics.reconciles.get_or_create(&ResultLabels { result: label.into() }).inc();
    result
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn error_policy(pool: Arc<WorkerPool>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(pool = %pool.name_any(), "reconcile error: {error}; retrying in 5s");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(pool: Arc<WorkerPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    if pool.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change()); // owner references let the garbage collector remove the rest
    }
    let namespace = pool.namespace().ok_or(Error::NoNamespace)?;
    let name = pool.name_any();
    let key = format!("{namespace}/{name}");
    let now = Timestamp::now();
    let generation = pool.meta().generation;
    let selector = pods::selector_string(&pool);
    let reference = pool.object_ref(&());

    let valid = match validate::validate(&pool.spec) {
        Ok(valid) => valid,
        Err(error) => {
            let new_status =
                status::build(status::Outcome::Invalid(&error), generation, selector, pool.status.as_ref(), now);
            if condition_message(pool.status.as_ref(), condition::READY)
                != condition_message(Some(&new_status), condition::READY)
            {
                warn!(pool = %key, "invalid spec: {error}");
                publish(&ctx, &reference, EventType::Warning, "InvalidSpec", "Validate", error.to_string(), None).await;
            }
            write_status(&ctx, &pool, new_status).await?;
            return Ok(Action::await_change());
        }
    };
    let revision = pods::revision(&pool);

    // Observe.
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let cm_api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let uid = pool.uid();
    let mine =
        |p: &Pod| p.owner_references().iter().any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref());
    let owned_pods: Vec<Pod> = pod_api
        .list(&ListParams::default().labels(&format!("{}={}", labels::POOL, name)))
        .await?
        .into_iter()
        .filter(mine)
        .collect();
    let flag_cm = cm_api.get_opt(&pool.stop_flag_name()).await?;
    let current_flag = match flag_cm.as_ref().map(|cm| StopFlag::from_data(&cm.data.clone().unwrap_or_default())) {
        None => StopFlag::default(),
        Some(Ok(flag)) => flag,
        Some(Err(e)) => {
            publish(
                &ctx,
                &reference,
                EventType::Warning,
                "BadStopFlag",
                "ReadStopFlag",
                format!("{e}; rewriting it"),
                None,
            )
            .await;
            StopFlag::default()
        }
    };
    ensure_flag_reader_access(&ctx, &pool, &namespace).await?;

    // Plan.
    let settings = Settings {
        replicas: usize::try_from(pool.spec.replicas).unwrap_or(0),
        revision: revision.clone(),
        strategy: pool.spec.rollout.strategy,
        max_surge: usize::try_from(pool.spec.rollout.max_surge).unwrap_or(1),
        drain_timeout: SignedDuration::from_secs(pool.spec.rollout.drain_timeout_seconds),
    };
    let workers: Vec<WorkerPod> = owned_pods.iter().map(|p| worker_pod(p, now)).collect();
    let plan = plan::plan(&settings, &workers, &current_flag, now, ctx.blocked_until(&key));

    // Apply: the flag first, so no old worker starts a new message after pods move.
    if flag_cm.is_none() || plan.flag != current_flag {
        if current_flag.revision.as_ref().is_some_and(|r| *r != revision) {
            let note = format!(
                "rolling out revision {revision} ({:?}): outdated workers finish their current message, then exit",
                settings.strategy
            );
            info!(pool = %key, "{note}");
            publish(&ctx, &reference, EventType::Normal, "RolloutStarted", "Rollout", note, None).await;
        }
        write_flag(&ctx, &pool, &plan.flag, flag_cm.as_ref()).await?;
    }
    apply_pod_actions(&ctx, &pool, &valid, &plan, &owned_pods, &key, now).await?;
    if plan.counts.updated_ready == settings.replicas {
        ctx.healthy(&key);
    }

    record_pool_metrics(&ctx, &namespace, &name, &plan);

    // Status.
    let new_status = status::build(
        status::Outcome::Planned { plan: &plan, settings: &settings },
        generation,
        selector,
        pool.status.as_ref(),
        now,
    );
    let was_complete = condition_status(pool.status.as_ref(), condition::ROLLOUT_COMPLETE) == Some("True");
    if plan.rollout_complete(&settings)
        && !was_complete
        && pool.status.as_ref().is_some_and(|s| s.update_revision.is_some())
    {
        if let Some(since) = find_condition(pool.status.as_ref(), condition::PROGRESSING).filter(|c| c.status == "True")
        {
            ctx.metrics.rollout_duration.observe(now.duration_since(since.last_transition_time.0).as_secs_f64());
        }
        let note = format!("all {} workers run revision {revision}", settings.replicas);
        publish(&ctx, &reference, EventType::Normal, "RolloutComplete", "Rollout", note, None).await;
    }
    write_status(&ctx, &pool, new_status).await?;
    Ok(plan.requeue_after.map_or_else(|| Action::requeue(Duration::from_secs(300)), Action::requeue))
}

async fn apply_pod_actions(
    ctx: &Context,
    pool: &WorkerPool,
    valid: &validate::Valid<'_>,
    plan: &Plan,
    owned: &[Pod],
    key: &str,
    now: Timestamp,
) -> Result<(), Error> {
    let namespace = pool.namespace().ok_or(Error::NoNamespace)?;
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let reference = pool.object_ref(&());
    let pod_ref = |name: &str| owned.iter().find(|p| p.name_any() == name).map(|p| p.object_ref(&()));

    for name in &plan.mark_draining {
        let patch = serde_json::json!({"metadata": {"annotations": {labels::DRAIN_STARTED_AT: now.to_string()}}});
        match pod_api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => continue,
            Err(e) => return Err(e.into()),
        }
        let note = format!("{name} finishes its current message, then exits");
        info!(pool = %key, "draining {name}");
        publish(ctx, &reference, EventType::Normal, "Draining", "Drain", note, pod_ref(name)).await;
    }
    for (name, reason) in &plan.delete {
        match reason {
            DeleteReason::DrainTimeout { draining_for } => {
                let note = format!(
                    "{name} still busy after draining for {}s (drainTimeoutSeconds: {}): deleting it (SIGTERM, grace period, SIGKILL)",
                    draining_for.as_secs(),
                    pool.spec.rollout.drain_timeout_seconds
                );
                warn!(pool = %key, "{note}");
                let labels = PoolLabels { namespace: namespace.clone(), pool: pool.name_any() };
                ctx.metrics.drain_timeouts.get_or_create(&labels).inc();
                publish(ctx, &reference, EventType::Warning, "DrainTimeout", "Delete", note, pod_ref(name)).await;
            }
            DeleteReason::Ended(Phase::Failed) => {
                ctx.record_failure(key, now);
                let note = format!("worker {name} failed; replacing it with back-off");
                publish(ctx, &reference, EventType::Warning, "WorkerFailed", "Replace", note, pod_ref(name)).await;
            }
            DeleteReason::Ended(_) => {}
        }
        match pod_api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if plan.create > 0 {
        let pod = pods::build_pod(pool, valid, &plan.flag.revision.clone().unwrap_or_default(), &ctx.agent_image);
        for _ in 0..plan.create {
            pod_api
                .create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }, &pod)
                .await?;
        }
        let note = format!(
            "created {} worker pod(s) of revision {}",
            plan.create,
            plan.flag.revision.as_deref().unwrap_or("")
        );
        info!(pool = %key, "{note}");
        publish(ctx, &reference, EventType::Normal, "WorkersCreated", "Create", note, None).await;
    }
    Ok(())
}

fn record_pool_metrics(ctx: &Context, namespace: &str, pool: &str, plan: &Plan) {
    let workers = |state: &str| WorkerLabels { namespace: namespace.into(), pool: pool.into(), state: state.into() };
    let counts = &plan.counts;
    ctx.metrics.workers.get_or_create(&workers("running")).set((counts.replicas - counts.draining) as i64);
    ctx.metrics.workers.get_or_create(&workers("draining")).set(counts.draining as i64);
    let labels = PoolLabels { namespace: namespace.into(), pool: pool.into() };
    ctx.metrics.rollouts_in_progress.get_or_create(&labels).set(i64::from(counts.outdated > 0));
}

/// The pod as the planner sees it.
fn worker_pod(pod: &Pod, now: Timestamp) -> WorkerPod {
    let status = pod.status.as_ref();
    let phase = if pod.meta().deletion_timestamp.is_some() {
        Phase::Terminating
    } else {
        match status.and_then(|s| s.phase.as_deref()) {
            Some("Succeeded") => Phase::Succeeded,
            Some("Failed") => Phase::Failed,
            _ => Phase::Live,
        }
    };
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    WorkerPod {
        name: pod.name_any(),
        revision: pod.labels().get(labels::REVISION).cloned().unwrap_or_default(),
        phase,
        ready,
        created: pod.meta().creation_timestamp.as_ref().map_or(now, |t| t.0),
        drain_started_at: pod.annotations().get(labels::DRAIN_STARTED_AT).and_then(|t| t.parse().ok()),
    }
}

/// Server-side apply of the stop flag, conditional on the version read, so a concurrent
/// `stop-workers` is never overwritten (the conflict makes the reconcile retry).
async fn write_flag(
    ctx: &Context,
    pool: &WorkerPool,
    flag: &StopFlag,
    current: Option<&ConfigMap>,
) -> Result<(), Error> {
    let mut cm = pods::build_stop_flag(pool, flag);
    cm.metadata.resource_version = current.and_then(|c| c.resource_version());
    apply(ctx, pool, cm).await
}

/// The Role and RoleBinding that let this pool's agents watch their stop flag (and nothing else).
async fn ensure_flag_reader_access(ctx: &Context, pool: &WorkerPool, namespace: &str) -> Result<(), Error> {
    let role = pods::build_flag_reader_role(pool);
    let binding = pods::build_flag_reader_binding(pool);
    let roles: Api<Role> = Api::namespaced(ctx.client.clone(), namespace);
    let bindings: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), namespace);
    if roles.get_opt(&role.name_any()).await?.is_none_or(|r| r.rules != role.rules) {
        apply(ctx, pool, role).await?;
    }
    if bindings
        .get_opt(&binding.name_any())
        .await?
        .is_none_or(|b| b.subjects != binding.subjects || b.role_ref != binding.role_ref)
    {
        apply(ctx, pool, binding).await?;
    }
    Ok(())
}

async fn apply<K>(ctx: &Context, pool: &WorkerPool, object: K) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let namespace = pool.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut value = serde_json::to_value(&object).expect("object serializes");
    value["apiVersion"] = K::api_version(&()).into();
    value["kind"] = K::kind(&()).into();
    api.patch(&object.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(value)).await?;
    Ok(())
}

/// Writes the status only when it changed: nothing at steady state.
async fn write_status(ctx: &Context, pool: &WorkerPool, status: WorkerPoolStatus) -> Result<(), Error> {
    if pool.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<WorkerPool> = Api::namespaced(ctx.client.clone(), &pool.namespace().ok_or(Error::NoNamespace)?);
    let patch = serde_json::json!({
        "apiVersion": WorkerPool::api_version(&()),
        "kind": WorkerPool::kind(&()),
        "status": status,
    });
    api.patch_status(&pool.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(patch)).await?;
    Ok(())
}

/// Events are best effort: a failure to record one never fails the reconcile.
async fn publish(
    ctx: &Context,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
    secondary: Option<ObjectReference>,
) {
    let event = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary };
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    if let Err(e) = recorder.publish(&event, reference).await {
        warn!("cannot record event {reason}: {e}");
    }
}

fn find_condition<'a>(
    status: Option<&'a WorkerPoolStatus>,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

fn condition_status<'a>(status: Option<&'a WorkerPoolStatus>, type_: &str) -> Option<&'a str> {
    find_condition(status, type_).map(|c| c.status.as_str())
}

fn condition_message<'a>(status: Option<&'a WorkerPoolStatus>, type_: &str) -> Option<&'a str> {
    find_condition(status, type_).map(|c| c.message.as_str())
}

/// `workerpool stop-workers`: every consumer of the pool finishes its current message and is
/// restarted in place (Symfony's `messenger:stop-workers`).
pub async fn stop_workers(args: StopWorkersArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await.map_err(|e| anyhow::anyhow!("cannot reach Kubernetes: {e}"))?;
    let namespace = args.namespace.unwrap_or_else(|| client.default_namespace().to_string());
    let pools: Api<WorkerPool> = Api::namespaced(client.clone(), &namespace);
    let pool = pools
        .get_opt(&args.pool)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no WorkerPool {:?} in namespace {namespace:?}", args.pool))?;
    let now = Timestamp::now();
    let patch = serde_json::json!({"data": {crate::stopflag::RESTART_REQUESTED_AT: now.to_string()}});
    Api::<ConfigMap>::namespaced(client, &namespace)
        .patch(&pool.stop_flag_name(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| anyhow::anyhow!("cannot write the stop flag {}: {e}", pool.stop_flag_name()))?;
    println!("asked every worker of {namespace}/{} to restart after its current message ({now})", args.pool);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_back_off_doubles_to_five_minutes() {
        let now = Timestamp::UNIX_EPOCH;
        let mut state = None;
        let delays: Vec<i64> = (0..9)
            .map(|_| {
                let next = next_backoff(state, now);
                state = Some(next);
                next.until.duration_since(now).as_secs()
            })
            .collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }
}
