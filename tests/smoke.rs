//! Smoke test of the local cluster and the test-worker image: a plain pod of
//! `workerpool-test-worker:v1` runs, logs through the API, and when the pod is deleted the
//! worker's SIGTERM handler lets the current message finish and exits by itself.
//! Needs `make cluster-up` and `make images` (`make test` does both).

mod common;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};

const POD: &str = "worker";

#[tokio::test]
async fn test_worker_pod_logs_and_stops_gracefully_on_sigterm() {
    let client = common::client().await;
    let ns = common::TestNamespace::create(&client, "smoke").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());

    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": POD},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 30,
            "containers": [{
                "name": "worker",
                "image": "workerpool-test-worker:v1",
                "imagePullPolicy": "Never",
                "command": ["/test-worker", "--limit=1000"],
                "env": [{"name": "MESSAGE_SECONDS", "value": "1"}],
            }],
        },
    }))
    .expect("a valid pod");
    pods.create(&PostParams::default(), &pod).await.expect("create the test-worker pod");
    common::wait_for_pod_running(&client, ns.name(), POD, Duration::from_secs(60)).await;

    // Follow the log from the start: what the worker writes while it is being deleted must
    // still be readable after the pod is gone.
    let follower = common::LogFollower::start(&client, ns.name(), POD, None);

    // The logs API (not following) shows the worker at work.
    let logs = common::wait_for(Duration::from_secs(30), "\"message 1 start\" in the pod's logs", || async {
        let logs = common::try_pod_logs(&client, ns.name(), POD, None).await.ok()?;
        logs.contains("message 1 start").then_some(logs)
    })
    .await;
    assert!(logs.contains("argv: --limit=1000"), "no argv line in the logs:\n{logs}");
    assert!(logs.contains("worker started pid="), "no start line in the logs:\n{logs}");
    follower.wait_for_text(Duration::from_secs(30), "message 1 start").await;

    // Graceful deletion: the kubelet sends SIGTERM and waits up to 30 s.
    let deleted_at = Instant::now();
    pods.delete(POD, &DeleteParams { grace_period_seconds: Some(30), ..Default::default() })
        .await
        .expect("delete the pod");
    let log = follower.wait_finished(Duration::from_secs(45)).await;
    let stopped_after = deleted_at.elapsed();
    eprintln!("log of the worker (stopped {stopped_after:?} after the delete):\n{log}");

    let received = log.find("received SIGTERM").unwrap_or_else(|| panic!("no \"received SIGTERM\" in the log:\n{log}"));
    let stopping = log
        .find("stopping after current message")
        .unwrap_or_else(|| panic!("no \"stopping after current message\" in the log:\n{log}"));
    assert!(received < stopping, "the worker stopped before it received SIGTERM:\n{log}");
    // the message in progress when SIGTERM came was finished, not cut short
    let last_start = log[..received].rfind(" start\n").expect("a message had started before SIGTERM");
    let n = log[..last_start].rsplit("message ").next().expect("a message number").to_string();
    assert!(
        log[..stopping].contains(&format!("message {n} end\n")),
        "message {n}, in progress at SIGTERM, did not end before the worker stopped:\n{log}"
    );
    // it exited by itself, long before the grace period would have ended in SIGKILL
    assert!(stopped_after < Duration::from_secs(15), "the worker took {stopped_after:?} to stop:\n{log}");

    common::wait_for(Duration::from_secs(60), "the deleted pod to be gone", || async {
        matches!(pods.get_opt(POD).await, Ok(None)).then_some(())
    })
    .await;
    ns.delete().await;
}
