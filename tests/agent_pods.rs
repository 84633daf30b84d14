//! The in-pod agent on the local cluster: Supervisor's job without CrashLoopBackOff.

mod common;
mod pool;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use pool::*;

const MINUTE: Duration = Duration::from_secs(60);

fn restart_count(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |c| c.iter().map(|c| c.restart_count).sum())
}

/// A worker that exits 0 after every message (`--limit=1`, 1 s each) keeps running for a
/// minute in the same container: restartCount stays 0 and the consumer ran ≥ 40 times.
#[tokio::test]
async fn clean_exits_are_restarted_at_once_without_back_off() {
    let (client, ns, _controller) = start_pool_test("recycle").await;
    let limits = serde_json::json!({"consumer": {"limits": {"messages": 1}}});
    create_pool(&client, ns.name(), &test_pool("ticks", 1, WORKER_V1, 1.0, limits)).await;
    let pod = wait_running(&client, ns.name(), "ticks", 1).await.remove(0);
    tokio::time::sleep(MINUTE).await;

    let pods = pool_pods(&client, ns.name(), "ticks").await;
    let now = pods.iter().find(|p| p.uid() == pod.uid()).expect("the same pod still runs");
    assert_eq!(restart_count(now), 0, "the kubelet restarted the container");
    let log = logs(&client, ns.name(), &pod.name_any()).await;
    let runs = log.lines().filter(|l| l.starts_with("worker started")).count();
    assert!(runs >= 40, "only {runs} consumer runs in a minute:\n{log}");
    assert!(log.contains("argv: --limit=1"), "{log}");
    ns.delete().await;
}

/// `workerpool stop-workers` restarts every consumer in place (same pod, new process) after
/// its current message.
#[tokio::test]
async fn stop_workers_restarts_consumers_in_place_after_their_message() {
    let (client, ns, _controller) = start_pool_test("stopworkers").await;
    create_pool(&client, ns.name(), &test_pool("emails", 2, WORKER_V1, 3.0, serde_json::json!({}))).await;
    let before = wait_running(&client, ns.name(), "emails", 2).await;
    for pod in &before {
        let name = pod.name_any();
        common::wait_for(MINUTE, "a first message", || async {
            logs(&client, ns.name(), &name).await.contains("message 1 start").then_some(())
        })
        .await;
    }

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_workerpool"))
        .args(["stop-workers", "emails", "-n", ns.name()])
        .env("KUBECONFIG", common::kubeconfig_path())
        .output()
        .expect("run workerpool stop-workers");
    assert!(out.status.success(), "stop-workers failed: {}", String::from_utf8_lossy(&out.stderr));

    for pod in &before {
        let name = pod.name_any();
        let log = common::wait_for(MINUTE, "a second consumer process in the same pod", || async {
            let log = logs(&client, ns.name(), &name).await;
            (log.lines().filter(|l| l.starts_with("worker started")).count() >= 2).then_some(log)
        })
        .await;
        let lines: Vec<String> = log.lines().map(str::to_string).collect();
        let stop = lines.iter().position(|l| l.contains("stopping after current message")).expect("a graceful stop");
        let restart = lines.iter().rposition(|l| l.starts_with("worker started")).unwrap();
        assert!(stop < restart, "{name} restarted before it stopped:\n{log}");
        assert_no_message_cut(&name, &lines[..restart]);
        let pids: Vec<&String> = lines.iter().filter(|l| l.starts_with("worker started")).collect();
        assert_ne!(pids[0], pids[pids.len() - 1], "{name}: same process");
    }
    let after = pool_pods(&client, ns.name(), "emails").await;
    for pod in &before {
        let same =
            after.iter().find(|p| p.uid() == pod.uid()).unwrap_or_else(|| panic!("{} was replaced", pod.name_any()));
        assert_eq!(restart_count(same), 0);
    }
    ns.delete().await;
}

/// `memory: auto` is resolved by the agent from the container's real memory limit (cgroup).
#[tokio::test]
async fn memory_auto_is_a_share_of_the_container_limit() {
    let (client, ns, _controller) = start_pool_test("memauto").await;
    let mut pool =
        test_pool("auto", 1, WORKER_V1, 1.0, serde_json::json!({"consumer": {"limits": {"memory": "auto"}}}));
    let container = &mut pool.spec.template.spec.as_mut().unwrap().containers[0];
    container.resources = Some(serde_json::from_value(serde_json::json!({"limits": {"memory": "256Mi"}})).unwrap());
    create_pool(&client, ns.name(), &pool).await;
    let pod = wait_running(&client, ns.name(), "auto", 1).await.remove(0);
    let name = pod.name_any();
    let argv = common::wait_for(MINUTE, "the argv line", || async {
        logs(&client, ns.name(), &name).await.lines().find(|l| l.starts_with("argv:")).map(str::to_string)
    })
    .await;
    // 80 % of 256 MiB, rounded down to whole MiB
    assert_eq!(argv, "argv: --limit=1000 --memory-limit=204M");
    ns.delete().await;
}
