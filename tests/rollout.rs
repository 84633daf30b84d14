//! Graceful rollouts on the local cluster: no message cut in half by a deploy.

mod common;
mod pool;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use pool::*;
use workerpool::api::WorkerPool;

const MINUTE: Duration = Duration::from_secs(60);

fn bump_image(image: &str) -> serde_json::Value {
    // A merge patch replaces the whole containers list: send the full container.
    serde_json::json!({"template": {"spec": {"containers": [{
        "name": "worker", "image": image, "imagePullPolicy": "Never", "command": ["/test-worker"],
        "env": [{"name": "MESSAGE_SECONDS", "value": "5"}],
    }]}}})
}

async fn wait_rollout_complete(client: &Client, ns: &str, name: &str, timeout: Duration) -> WorkerPool {
    common::wait_for(timeout, "condition RolloutComplete", || async {
        let pool = get_pool(client, ns, name).await;
        rollout_complete(&pool).then_some(pool)
    })
    .await
}

async fn events(client: &Client, ns: &str, reason: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

/// Follows the worker logs of `pods` until each has exited.
fn follow_all(client: &Client, ns: &str, pods: &[String]) -> Vec<(String, common::LogFollower)> {
    pods.iter().map(|p| (p.clone(), follow_logs(client, ns, p))).collect()
}

/// Every followed log, once its worker has exited.
async fn finished_logs(followers: Vec<(String, common::LogFollower)>) -> BTreeMap<String, Vec<String>> {
    let mut logs = BTreeMap::new();
    for (pod, follower) in followers {
        logs.insert(pod, finished_lines(&follower, 3 * MINUTE).await);
    }
    logs
}

/// 1. Image bump while every worker is mid-message: each started message ends, every old pod
///    ends Succeeded by draining, none is deleted while working, new pods run the new image.
#[tokio::test]
async fn image_bump_drains_every_worker_after_its_message() {
    let (client, ns, _controller) = start_pool_test("bump").await;
    let history = PodHistory::start(&client, ns.name());
    create_pool(&client, ns.name(), &test_pool("emails", 3, WORKER_V1, 5.0, serde_json::json!({}))).await;
    let old = wait_busy(&client, ns.name(), "emails", 3).await;
    let old_revision = get_pool(&client, ns.name(), "emails").await.status.unwrap().update_revision.unwrap();
    let followers = follow_all(&client, ns.name(), &old);
    tokio::time::sleep(Duration::from_millis(500)).await;

    patch_spec(&client, ns.name(), "emails", bump_image(WORKER_V2)).await;
    let pool = wait_rollout_complete(&client, ns.name(), "emails", 3 * MINUTE).await;
    let status = pool.status.unwrap();
    assert_ne!(status.update_revision.as_deref(), Some(old_revision.as_str()));
    assert_eq!((status.updated_replicas, status.ready_replicas, status.draining_replicas), (3, 3, 0));

    for (pod, lines) in finished_logs(followers).await {
        assert_no_message_cut(&pod, &lines);
        assert!(
            lines.iter().any(|l| l.contains("stopping after current message")),
            "{pod} did not stop gracefully:\n{}",
            lines.join("\n")
        );
    }
    let seen = history.snapshot();
    for pod in &old {
        let record = &seen[pod];
        assert!(record.phases.contains(&"Succeeded".to_string()), "{pod} did not end Succeeded: {record:?}");
        assert!(!record.deleted_while_running, "{pod} was deleted while still working");
    }
    let current: Vec<Pod> =
        pool_pods(&client, ns.name(), "emails").await.into_iter().filter(is_running_and_ready).collect();
    assert_eq!(current.len(), 3);
    for pod in &current {
        assert_eq!(revision_of(pod), status.update_revision.clone().unwrap());
        assert_eq!(pod.spec.as_ref().unwrap().containers[0].image.as_deref(), Some(WORKER_V2));
    }
    assert!(events(&client, ns.name(), "DrainTimeout").await.is_empty());
    assert!(!events(&client, ns.name(), "RolloutStarted").await.is_empty());
    assert!(!events(&client, ns.name(), "RolloutComplete").await.is_empty());
    ns.delete().await;
}

/// 2. A worker still busy after `drainTimeoutSeconds` is deleted, with a Warning Event.
#[tokio::test]
async fn drain_timeout_deletes_a_busy_worker_with_an_event() {
    let (client, ns, _controller) = start_pool_test("timeout").await;
    let history = PodHistory::start(&client, ns.name());
    let rollout = serde_json::json!({"rollout": {"drainTimeoutSeconds": 5}});
    create_pool(&client, ns.name(), &test_pool("slow", 1, WORKER_V1, 60.0, rollout)).await;
    let old = wait_busy(&client, ns.name(), "slow", 1).await;
    let mut spec = bump_image(WORKER_V2);
    spec["template"]["spec"]["containers"][0]["env"][0]["value"] = "60".into();
    let bumped = std::time::Instant::now();
    patch_spec(&client, ns.name(), "slow", spec).await;

    let event = common::wait_for(MINUTE, "a DrainTimeout event", || async {
        events(&client, ns.name(), "DrainTimeout").await.pop()
    })
    .await;
    let waited = bumped.elapsed();
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let note = event.note.unwrap_or_default();
    assert!(note.contains(&old[0]), "the event does not name the pod: {note}");
    assert!(note.contains("drainTimeoutSeconds: 5"), "{note}");
    assert!(waited >= Duration::from_secs(5), "deleted after {waited:?}, before the drain timeout");
    assert!(waited < Duration::from_secs(50), "deleted after {waited:?}: the 60 s message would have ended by itself");
    common::wait_for(MINUTE, "the old pod's deletion", || async {
        history.snapshot()[&old[0]].deleted_while_running.then_some(())
    })
    .await;
    wait_rollout_complete(&client, ns.name(), "slow", 2 * MINUTE).await;
    ns.delete().await;
}

/// 3. Recreate: no new-revision message starts before the last old one has ended.
#[tokio::test]
async fn recreate_never_runs_two_versions_at_once() {
    let (client, ns, _controller) = start_pool_test("recreate").await;
    let strategy = serde_json::json!({"rollout": {"strategy": "Recreate"}});
    create_pool(&client, ns.name(), &test_pool("orders", 2, WORKER_V1, 5.0, strategy)).await;
    let old = wait_busy(&client, ns.name(), "orders", 2).await;
    let followers = follow_all(&client, ns.name(), &old);
    tokio::time::sleep(Duration::from_millis(500)).await;
    patch_spec(&client, ns.name(), "orders", bump_image(WORKER_V2)).await;
    wait_rollout_complete(&client, ns.name(), "orders", 3 * MINUTE).await;

    let old_logs = finished_logs(followers).await;
    let last_old_end =
        old_logs.values().flatten().filter(|l| l.contains("message ")).map(|l| line_time(l)).max().unwrap();
    let new_pods: Vec<Pod> =
        pool_pods(&client, ns.name(), "orders").await.into_iter().filter(is_running_and_ready).collect();
    assert_eq!(new_pods.len(), 2);
    for pod in new_pods {
        let name = pod.name_any();
        let first_start = common::wait_for(MINUTE, "a new message", || async {
            let params =
                kube::api::LogParams { timestamps: true, container: Some("worker".into()), ..Default::default() };
            let text = Api::<Pod>::namespaced(client.clone(), ns.name()).logs(&name, &params).await.ok()?;
            text.lines().find(|l| l.ends_with("message 1 start")).map(line_time)
        })
        .await;
        assert!(
            first_start > last_old_end,
            "{name} started a message at {first_start} before the old workers finished at {last_old_end}"
        );
    }
    ns.delete().await;
}

/// 4. Surge: the count of Ready workers never drops below `replicas` during the rollout.
#[tokio::test]
async fn surge_keeps_every_slot_ready() {
    let (client, ns, _controller) = start_pool_test("surge").await;
    let strategy = serde_json::json!({"rollout": {"strategy": "Surge", "maxSurge": 1}});
    create_pool(&client, ns.name(), &test_pool("mail", 2, WORKER_V1, 2.0, strategy)).await;
    wait_busy(&client, ns.name(), "mail", 2).await;
    let mut spec = bump_image(WORKER_V2);
    spec["template"]["spec"]["containers"][0]["env"][0]["value"] = "2".into();
    patch_spec(&client, ns.name(), "mail", spec).await;

    let mut lowest = usize::MAX;
    let mut samples = 0;
    let deadline = tokio::time::Instant::now() + 3 * MINUTE;
    loop {
        let pool = get_pool(&client, ns.name(), "mail").await;
        let ready = pool_pods(&client, ns.name(), "mail").await.iter().filter(|p| is_running_and_ready(p)).count();
        lowest = lowest.min(ready);
        samples += 1;
        if rollout_complete(&pool) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the surge rollout did not complete");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(lowest >= 2, "Ready workers dropped to {lowest} during a Surge rollout ({samples} samples)");
    ns.delete().await;
}

/// 5. The controller killed mid-rollout and started again finishes the rollout, draining
///    nothing twice and losing no slot.
#[tokio::test]
async fn rollout_survives_a_controller_crash() {
    let (client, ns, mut controller) = start_pool_test("crash").await;
    let history = PodHistory::start(&client, ns.name());
    create_pool(&client, ns.name(), &test_pool("jobs", 3, WORKER_V1, 4.0, serde_json::json!({}))).await;
    let old = wait_busy(&client, ns.name(), "jobs", 3).await;
    let mut spec = bump_image(WORKER_V2);
    spec["template"]["spec"]["containers"][0]["env"][0]["value"] = "4".into();
    patch_spec(&client, ns.name(), "jobs", spec).await;
    common::wait_for(MINUTE, "the rollout to start draining", || async {
        let pool = get_pool(&client, ns.name(), "jobs").await;
        pool.status.as_ref().is_some_and(|s| s.draining_replicas > 0).then_some(())
    })
    .await;
    controller.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _controller = ControllerProcess::start(ns.name());
    let pool = wait_rollout_complete(&client, ns.name(), "jobs", 3 * MINUTE).await;
    let new_revision = pool.status.unwrap().update_revision.unwrap();

    let seen = history.snapshot();
    for pod in &old {
        assert!(seen[pod].phases.contains(&"Succeeded".to_string()), "{pod}: {:?}", seen[pod]);
        assert!(!seen[pod].deleted_while_running, "{pod} was deleted while working");
    }
    let new_pods: Vec<&String> = seen.iter().filter(|(_, r)| r.revision == new_revision).map(|(n, _)| n).collect();
    assert_eq!(new_pods.len(), 3, "exactly one new pod per slot, got {new_pods:?}");
    for pod in &old {
        let drains = events(&client, ns.name(), "Draining")
            .await
            .into_iter()
            .filter(|e| e.related.as_ref().and_then(|r| r.name.as_deref()) == Some(pod.as_str()))
            .map(|e| e.series.map_or(1, |s| s.count))
            .sum::<i32>();
        assert!(drains <= 1, "{pod} was drained {drains} times");
    }
    ns.delete().await;
}

/// 6. Scale-in from 4 to 2 while busy: the removed workers finish their messages first.
#[tokio::test]
async fn scale_in_drains_the_removed_workers() {
    let (client, ns, _controller) = start_pool_test("scalein").await;
    let history = PodHistory::start(&client, ns.name());
    create_pool(&client, ns.name(), &test_pool("bulk", 4, WORKER_V1, 5.0, serde_json::json!({}))).await;
    let all = wait_busy(&client, ns.name(), "bulk", 4).await;
    let followers = follow_all(&client, ns.name(), &all);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Api::<WorkerPool>::namespaced(client.clone(), ns.name())
        .patch_scale("bulk", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"replicas": 2}})))
        .await
        .expect("scale in");
    common::wait_for(2 * MINUTE, "2 workers left", || running_pods(&client, ns.name(), "bulk", 2)).await;
    let remaining: Vec<String> = pool_pods(&client, ns.name(), "bulk").await.iter().map(|p| p.name_any()).collect();
    let removed: Vec<&String> = all.iter().filter(|p| !remaining.contains(p)).collect();
    assert_eq!(removed.len(), 2, "removed {removed:?}");
    for (pod, follower) in followers {
        if !removed.contains(&&pod) {
            continue;
        }
        let lines = finished_lines(&follower, MINUTE).await;
        assert_no_message_cut(&pod, &lines);
        assert!(lines.iter().any(|l| l.contains("stopping after current message")), "{pod}:\n{}", lines.join("\n"));
        let record = &history.snapshot()[&pod];
        assert!(record.phases.contains(&"Succeeded".to_string()) && !record.deleted_while_running, "{pod}: {record:?}");
    }
    ns.delete().await;
}

/// A second change during a rollout (the image bumped again before the first finished) rolls
/// to the newest revision and strands no pod of the middle one.
#[tokio::test]
async fn second_change_mid_rollout_rolls_to_the_newest() {
    let (client, ns, _controller) = start_pool_test("twice").await;
    let history = PodHistory::start(&client, ns.name());
    create_pool(&client, ns.name(), &test_pool("twice", 2, WORKER_V1, 5.0, serde_json::json!({}))).await;
    wait_busy(&client, ns.name(), "twice", 2).await;
    patch_spec(&client, ns.name(), "twice", bump_image(WORKER_V2)).await;
    let middle = common::wait_for(MINUTE, "the middle revision", || async {
        let status = get_pool(&client, ns.name(), "twice").await.status?;
        (status.observed_generation == Some(2)).then_some(status.update_revision?)
    })
    .await;
    // Bump again once a middle-revision worker is busy with a message.
    common::wait_for(2 * MINUTE, "a busy middle-revision worker", || async {
        for pod in pool_pods(&client, ns.name(), "twice").await {
            if revision_of(&pod) == middle
                && logs(&client, ns.name(), &pod.name_any()).await.contains("message 1 start")
            {
                return Some(());
            }
        }
        None
    })
    .await;
    let mut third = bump_image(WORKER_V1);
    third["template"]["spec"]["containers"][0]["env"][0]["value"] = "4".into();
    patch_spec(&client, ns.name(), "twice", third).await;

    let pool = wait_rollout_complete(&client, ns.name(), "twice", 3 * MINUTE).await;
    let newest = pool.status.unwrap().update_revision.unwrap();
    assert_ne!(newest, middle);
    let left: Vec<Pod> = pool_pods(&client, ns.name(), "twice").await;
    assert_eq!(left.len(), 2, "{:?}", left.iter().map(|p| p.name_any()).collect::<Vec<_>>());
    assert!(left.iter().all(|p| revision_of(p) == newest && is_running_and_ready(p)));
    let mut middle_seen = 0;
    for (pod, record) in history.snapshot() {
        assert!(!record.deleted_while_running, "{pod} was deleted while working: {record:?}");
        if record.revision == middle {
            middle_seen += 1;
            assert!(
                record.phases.contains(&"Succeeded".to_string()),
                "middle-revision {pod} did not drain: {record:?}"
            );
        }
    }
    assert!(middle_seen > 0, "no middle-revision pod ever ran");
    ns.delete().await;
}
