//! Benchmarks on the local cluster (`make bench`): printed figures, not assertions.
//! Run with `cargo test --test bench -- --ignored --nocapture --test-threads=1`.

mod common;
mod pool;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use pool::*;

const MINUTE: Duration = Duration::from_secs(60);

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn summary(name: &str, mut samples: Vec<f64>, unit: &str) {
    samples.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{name}: n={} median={:.3}{unit} p99={:.3}{unit} min={:.3}{unit} max={:.3}{unit}",
        samples.len(),
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples.first().copied().unwrap_or(f64::NAN),
        samples.last().copied().unwrap_or(f64::NAN),
    );
}

/// When the bench itself first saw each revision in the stop flag (over its own API watch).
fn watch_flag_revisions(client: &Client, ns: &str, name: &str) -> Arc<Mutex<BTreeMap<String, Timestamp>>> {
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let record = seen.clone();
    tokio::spawn(async move {
        let mut events = watcher(api, config).applied_objects().boxed();
        while let Some(Ok(cm)) = events.next().await {
            if let Some(revision) = cm.data.unwrap_or_default().get("revision") {
                record.lock().unwrap().entry(revision.clone()).or_insert_with(Timestamp::now);
            }
        }
    });
    seen
}

/// A consumer that reports its stop signal the moment it arrives (busybox `wait` is interruptible).
fn signal_reporter(env_value: &str) -> serde_json::Value {
    serde_json::json!({"template": {"spec": {"containers": [{
        "name": "worker", "image": WORKER_V1, "imagePullPolicy": "Never",
        "command": ["/bin/sh", "-c", "trap 'echo stop-signal; exit 0' TERM; echo consumer-ready; while :; do sleep 1 & wait $!; done"],
        "env": [{"name": "BENCH_ROUND", "value": env_value}],
    }]}}})
}

/// Stop flag → consumer receives its stop signal, beside the ConfigMap-volume path (a pod that
/// polls the same flag mounted as a file) in the same run:
///  * 20 rollouts x 2 workers: image bump (the WorkerPool patch) → stop signal, end to end
///    through the controller;
///  * 20 `restartRequestedAt` writes x 2 workers: the bench writes the flag itself → stop signal.
#[tokio::test]
#[ignore = "benchmark: make bench"]
async fn drain_signal_latency() {
    let (client, ns, _controller) = start_pool_test("bench-signal").await;
    let flag_seen = watch_flag_revisions(&client, ns.name(), "bench-stop-flag");
    let mut pool = test_pool("bench", 2, WORKER_V1, 1.0, serde_json::json!({}));
    pool.spec.template = serde_json::from_value(signal_reporter("0")["template"].clone()).unwrap();
    create_pool(&client, ns.name(), &pool).await;

    // The volume path: a pod reading the same flag from a ConfigMap volume, printing each change.
    let volume_pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "volume-reader"},
        "spec": {
            "containers": [{"name": "worker", "image": WORKER_V1, "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", "last=; while :; do r=\"$(cat /flag/revision 2>/dev/null)/$(cat /flag/restartRequestedAt 2>/dev/null)\"; if [ \"$r\" != \"$last\" ]; then echo \"flag $r\"; last=$r; fi; sleep 0.1; done"],
                "volumeMounts": [{"name": "flag", "mountPath": "/flag"}]}],
            "volumes": [{"name": "flag", "configMap": {"name": "bench-stop-flag", "optional": true}}]
        }
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    pods.create(&PostParams::default(), &volume_pod).await.unwrap();
    // Every state the flag went through (as the volume reader prints it), with when it was written.
    let mut states: Vec<(Timestamp, String)> = Vec::new();

    let mut rollout_latencies = Vec::new();
    let rounds = 20;
    let mut revision = String::new();
    for round in 1..=rounds {
        let old = ready_workers(&client, ns.name(), 1).await;
        let followers: Vec<_> = old.iter().map(|p| follow_logs(&client, ns.name(), p)).collect();
        for follower in &followers {
            follower.wait_for_text(MINUTE, "consumer-ready").await; // attached before the worker can exit
        }
        let bumped = Timestamp::now();
        patch_spec(&client, ns.name(), "bench", signal_reporter(&round.to_string())).await;
        revision = common::wait_for(MINUTE, "the new revision", || async {
            let pool = get_pool(&client, ns.name(), "bench").await;
            let status = pool.status?;
            (status.observed_generation == pool.metadata.generation).then_some(status.update_revision?)
        })
        .await;
        for follower in followers {
            let lines = finished_lines(&follower, MINUTE).await;
            if let Some(line) = lines.iter().find(|l| l.ends_with("stop-signal")) {
                rollout_latencies.push(line_time(line).duration_since(bumped).as_secs_f64() * 1000.0);
            }
        }
        let written =
            common::wait_for(MINUTE, "the flag write", || async { flag_seen.lock().unwrap().get(&revision).copied() })
                .await;
        states.push((written, format!("{revision}/")));
    }
    summary(
        &format!("image bump -> stop signal, end to end ({rounds} rollouts x 2 workers)"),
        rollout_latencies,
        " ms",
    );

    let workers = ready_workers(&client, ns.name(), 1).await;
    let flags: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    let mut flag_latencies = Vec::new();
    for round in 1..=rounds {
        let written = Timestamp::now();
        let patch = serde_json::json!({"data": {"restartRequestedAt": written.to_string()}});
        flags
            .patch("bench-stop-flag", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
            .await
            .unwrap();
        states.push((written, format!("{revision}/{written}")));
        for worker in &workers {
            let line = common::wait_for(MINUTE, "the stop signal", || async {
                let params =
                    kube::api::LogParams { timestamps: true, container: Some("worker".into()), ..Default::default() };
                let text = pods.logs(worker, &params).await.ok()?;
                text.lines().filter(|l| l.ends_with("stop-signal")).nth(round - 1).map(str::to_string)
            })
            .await;
            flag_latencies.push(line_time(&line).duration_since(written).as_secs_f64() * 1000.0);
        }
        ready_workers(&client, ns.name(), round + 1).await;
    }
    summary(
        &format!("stop flag written -> stop signal, over the API watch ({rounds} writes x 2 workers)"),
        flag_latencies,
        " ms",
    );

    // The volume path: for each write, when the reader first showed it (or a later state).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let params = kube::api::LogParams { timestamps: true, ..Default::default() };
    let text = pods.logs("volume-reader", &params).await.unwrap_or_default();
    let seen: Vec<(Timestamp, usize)> = text
        .lines()
        .filter_map(|l| {
            let state = l.rsplit_once("flag ")?.1.trim();
            Some((line_time(l), states.iter().position(|(_, s)| s == state)?))
        })
        .collect();
    let volume: Vec<f64> = states
        .iter()
        .enumerate()
        .filter_map(|(i, (written, _))| {
            let (at, _) = seen.iter().find(|(at, j)| *j >= i && at >= written)?;
            Some(at.duration_since(*written).as_secs_f64())
        })
        .collect();
    let missed = states.len() - volume.len();
    summary(&format!("the same flag through a ConfigMap volume ({missed} writes never seen in the run)"), volume, " s");
    ns.delete().await;
}

/// Waits until both workers of the bench pool run a consumer that has printed `consumer-ready`
/// at least `starts` times; returns their names.
async fn ready_workers(client: &Client, ns: &str, starts: usize) -> Vec<String> {
    common::wait_for(2 * MINUTE, "2 ready workers", || async {
        let all = pool_pods(client, ns, "bench").await;
        let mut ready = Vec::new();
        for pod in all.iter().filter(|p| is_running_and_ready(p)) {
            if logs(client, ns, &pod.name_any()).await.matches("consumer-ready").count() >= starts {
                ready.push(pod.name_any());
            }
        }
        (ready.len() == 2 && all.len() == 2).then_some(ready)
    })
    .await
}

/// Rollout overhead for a pool of 10: rollout duration minus the longest in-flight message's
/// remaining time.
#[tokio::test]
#[ignore = "benchmark: make bench"]
async fn rollout_overhead_pool_of_ten() {
    let (client, ns, _controller) = start_pool_test("bench-rollout").await;
    create_pool(&client, ns.name(), &test_pool("ten", 10, WORKER_V1, 8.0, serde_json::json!({}))).await;
    let old = wait_busy(&client, ns.name(), "ten", 10).await;
    let followers: Vec<_> = old.iter().map(|p| follow_logs(&client, ns.name(), p)).collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let bumped = Timestamp::now();
    patch_spec(
        &client,
        ns.name(),
        "ten",
        serde_json::json!({"template": {"spec": {"containers": [{
            "name": "worker", "image": WORKER_V2, "imagePullPolicy": "Never", "command": ["/test-worker"],
            "env": [{"name": "MESSAGE_SECONDS", "value": "8"}],
        }]}}}),
    )
    .await;
    common::wait_for(5 * MINUTE, "RolloutComplete", || async {
        rollout_complete(&get_pool(&client, ns.name(), "ten").await).then_some(())
    })
    .await;
    let done = Timestamp::now();
    let mut last_message_end = bumped;
    let mut exits = Vec::new();
    for follower in followers {
        let lines = finished_lines(&follower, MINUTE).await;
        if let Some(end) =
            lines.iter().filter(|l| l.contains("message ") && l.ends_with(" end")).map(|l| line_time(l)).max()
        {
            last_message_end = last_message_end.max(end);
        }
        exits.extend(lines.last().map(|l| line_time(l)));
    }
    // Pod start time of the new workers, for the "plus pod start" part of the target.
    let pods = pool_pods(&client, ns.name(), "ten").await;
    let mut starts: Vec<f64> = pods
        .iter()
        .filter_map(|p| {
            let created = p.metadata.creation_timestamp.as_ref()?.0;
            let ready = p
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "Ready")?
                .last_transition_time
                .as_ref()?
                .0;
            Some(ready.duration_since(created).as_secs_f64())
        })
        .collect();
    starts.sort_by(|a, b| a.total_cmp(b));
    // How long a freed slot waited for its new pod: the k-th old worker's exit (its agent's last
    // log line) against the k-th new pod's creation.
    exits.sort();
    let mut created: Vec<Timestamp> =
        pods.iter().filter_map(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0)).collect();
    created.sort();
    let mut slot_waits: Vec<f64> =
        exits.iter().zip(&created).map(|(exit, new)| new.duration_since(*exit).as_secs_f64()).collect();
    slot_waits.sort_by(|a, b| a.total_cmp(b));
    let duration = done.duration_since(bumped).as_secs_f64();
    let in_flight = last_message_end.duration_since(bumped).as_secs_f64();
    println!(
        "rollout of 10 workers: {duration:.1} s in all; the longest in-flight message needed {in_flight:.1} s more; \
         overhead {:.1} s (pod start median {:.1} s, max {:.1} s; old worker exit -> its slot's new pod created \
         median {:.1} s, max {:.1} s)",
        duration - in_flight,
        percentile(&starts, 50.0),
        starts.last().copied().unwrap_or(f64::NAN),
        percentile(&slot_waits, 50.0),
        slot_waits.last().copied().unwrap_or(f64::NAN),
    );
    ns.delete().await;
}

/// The share of a minute a 1-second worker (`--limit=1`) spends working: under the agent vs.
/// under a plain Deployment (CrashLoopBackOff), side by side in one run.
#[tokio::test]
#[ignore = "benchmark: make bench"]
async fn clean_exit_worker_agent_vs_deployment() {
    let (client, ns, _controller) = start_pool_test("bench-recycle").await;
    let limits = serde_json::json!({"consumer": {"limits": {"messages": 1}}});
    create_pool(&client, ns.name(), &test_pool("agent", 1, WORKER_V1, 1.0, limits)).await;
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "plain"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "plain"}},
            "template": {"metadata": {"labels": {"app": "plain"}}, "spec": {"containers": [{
                "name": "worker", "image": WORKER_V1, "imagePullPolicy": "Never",
                "command": ["/test-worker", "--limit=1"], "env": [{"name": "MESSAGE_SECONDS", "value": "1"}],
            }]}}
        }
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), ns.name()).create(&PostParams::default(), &deployment).await.unwrap();
    let window = Duration::from_secs(120);
    tokio::time::sleep(window).await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let agent_pod = pool_pods(&client, ns.name(), "agent").await.remove(0);
    let agent_runs = logs(&client, ns.name(), &agent_pod.name_any())
        .await
        .lines()
        .filter(|l| l.starts_with("worker started"))
        .count();
    let plain = pods.list(&kube::api::ListParams::default().labels("app=plain")).await.unwrap().items.remove(0);
    let status = plain.status.unwrap().container_statuses.unwrap().remove(0);
    let plain_runs = status.restart_count as usize + 1;
    let secs = window.as_secs_f64();
    println!(
        "1-second worker over {secs:.0} s: agent {agent_runs} runs ({:.0} % working, restartCount {}), \
         Deployment {plain_runs} runs ({:.0} % working, state {:?})",
        100.0 * agent_runs as f64 / secs,
        agent_pod.status.and_then(|s| s.container_statuses).map_or(0, |c| c[0].restart_count),
        100.0 * plain_runs as f64 / secs,
        status.state.and_then(|s| s.waiting).and_then(|w| w.reason),
    );
    ns.delete().await;
}
