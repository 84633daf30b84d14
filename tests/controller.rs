//! The WorkerPool API and its controller on the local cluster, with real pods.

mod common;
mod pool;

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use pool::*;
use workerpool::api::WorkerPool;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn pool_runs_workers_with_limit_arguments_and_follows_scale() {
    let (client, ns, _controller) = start_pool_test("scale").await;
    let limits = serde_json::json!({"consumer": {"limits": {
        "messages": 1000, "timeLimitSeconds": 3600, "memory": "64Mi", "failures": 3
    }}});
    create_pool(&client, ns.name(), &test_pool("emails", 2, WORKER_V1, 0.5, limits)).await;

    let pods = wait_running(&client, ns.name(), "emails", 2).await;
    for pod in &pods {
        let name = pod.name_any();
        let line = common::wait_for(MINUTE, "the worker's argv line", || async {
            logs(&client, ns.name(), &name).await.lines().find(|l| l.starts_with("argv:")).map(str::to_string)
        })
        .await;
        assert_eq!(line, "argv: --limit=1000 --time-limit=3600 --memory-limit=64M --failure-limit=3", "pod {name}");
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("OnFailure"));
    }
    let pool = common::wait_for(MINUTE, "status with 2 ready workers", || async {
        let pool = get_pool(&client, ns.name(), "emails").await;
        (pool.status.as_ref().is_some_and(|s| s.ready_replicas == 2) && rollout_complete(&pool)).then_some(pool)
    })
    .await;
    let status = pool.status.unwrap();
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/managed-by=workerpool-operator,workerpool.dev/pool=emails")
    );
    assert_eq!(status.current_revision, status.update_revision);

    // The stop flag exists and carries the revision.
    let flag = Api::<ConfigMap>::namespaced(client.clone(), ns.name()).get("emails-stop-flag").await.unwrap();
    assert_eq!(flag.data.unwrap()["revision"], status.update_revision.clone().unwrap());

    // `kubectl scale` goes through the /scale subresource.
    let pools: Api<WorkerPool> = Api::namespaced(client.clone(), ns.name());
    let scale = |n: i32| serde_json::json!({"spec": {"replicas": n}});
    pools.patch_scale("emails", &PatchParams::default(), &Patch::Merge(scale(3))).await.expect("scale up");
    common::wait_for(2 * MINUTE, "3 running pods after scale up", || running_pods(&client, ns.name(), "emails", 3))
        .await;
    pools.patch_scale("emails", &PatchParams::default(), &Patch::Merge(scale(1))).await.expect("scale down");
    common::wait_for(2 * MINUTE, "1 pod after scale down", || running_pods(&client, ns.name(), "emails", 1)).await;

    // A deleted pod is replaced.
    let survivor = pool_pods(&client, ns.name(), "emails").await.into_iter().find(is_running_and_ready).unwrap();
    Api::<Pod>::namespaced(client.clone(), ns.name())
        .delete(&survivor.name_any(), &DeleteParams::default())
        .await
        .expect("delete a worker pod");
    common::wait_for(2 * MINUTE, "a replacement pod", || async {
        let pods = running_pods(&client, ns.name(), "emails", 1).await?;
        (pods[0].uid() != survivor.uid()).then_some(())
    })
    .await;

    // At steady state the controller writes nothing.
    common::wait_for(MINUTE, "a settled status", || async {
        let pool = get_pool(&client, ns.name(), "emails").await;
        (rollout_complete(&pool) && pool.status.as_ref().is_some_and(|s| s.replicas == 1)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = get_pool(&client, ns.name(), "emails").await.resource_version();
    let flag_before = Api::<ConfigMap>::namespaced(client.clone(), ns.name()).get("emails-stop-flag").await.unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = get_pool(&client, ns.name(), "emails").await.resource_version();
    let flag_after = Api::<ConfigMap>::namespaced(client.clone(), ns.name()).get("emails-stop-flag").await.unwrap();
    assert_eq!(before, after, "the WorkerPool changed at steady state");
    assert_eq!(flag_before.resource_version(), flag_after.resource_version(), "the stop flag changed at steady state");
    ns.delete().await;
}

#[tokio::test]
async fn invalid_spec_gets_a_condition_and_an_event_and_no_pods() {
    let (client, ns, _controller) = start_pool_test("invalid").await;

    let mut broken = test_pool("broken", 2, WORKER_V1, 0.5, serde_json::json!({}));
    broken.spec.template.spec.as_mut().unwrap().containers[0].command = None;
    create_pool(&client, ns.name(), &broken).await;
    let laravel = test_pool(
        "laravel",
        1,
        WORKER_V1,
        0.5,
        serde_json::json!({"consumer": {"preset": "laravel", "limits": {"failures": 3}}}),
    );
    create_pool(&client, ns.name(), &laravel).await;
    // A valid pool beside them still runs: one bad spec never stalls the controller.
    create_pool(&client, ns.name(), &test_pool("fine", 1, WORKER_V1, 0.5, serde_json::json!({}))).await;

    for (name, field) in
        [("broken", "spec.template.spec.containers[worker].command"), ("laravel", "spec.consumer.limits.failures")]
    {
        let (status, reason, message) = common::wait_for(MINUTE, "a Ready=False condition", || async {
            condition_status(&get_pool(&client, ns.name(), name).await, "Ready").filter(|(s, _, _)| s == "False")
        })
        .await;
        assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidSpec"));
        assert!(message.contains(field), "{name}: {message}");
        let event = common::wait_for(MINUTE, "a Warning event", || async {
            let events: Api<Event> = Api::namespaced(client.clone(), ns.name());
            events.list(&ListParams::default()).await.ok()?.items.into_iter().find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    && e.reason.as_deref() == Some("InvalidSpec")
            })
        })
        .await;
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert!(event.note.unwrap_or_default().contains(field));
    }
    common::wait_for(2 * MINUTE, "the valid pool's pod", || running_pods(&client, ns.name(), "fine", 1)).await;
    assert!(pool_pods(&client, ns.name(), "broken").await.is_empty(), "an invalid pool created pods");
    assert!(pool_pods(&client, ns.name(), "laravel").await.is_empty(), "an invalid pool created pods");

    // Fixing the spec brings the pool up.
    patch_spec(
        &client,
        ns.name(),
        "broken",
        serde_json::json!({"template": {"spec": {"containers": [{
            "name": "worker", "image": WORKER_V1, "imagePullPolicy": "Never", "command": ["/test-worker"]
        }]}}}),
    )
    .await;
    common::wait_for(2 * MINUTE, "the fixed pool's pods", || running_pods(&client, ns.name(), "broken", 2)).await;
    ns.delete().await;
}

#[tokio::test]
async fn schema_rejects_bad_input_naming_the_field() {
    let client = common::client().await;
    install_crd(&client).await;
    let ns = common::TestNamespace::create(&client, "schema").await;
    let pools: Api<WorkerPool> = Api::namespaced(client.clone(), ns.name());
    let cases = [
        ("/spec/replicas", serde_json::json!(-1), "spec.replicas"),
        ("/spec/consumer/limits/messages", serde_json::json!(0), "spec.consumer.limits.messages"),
        ("/spec/consumer/preset", serde_json::json!("zend"), "spec.consumer.preset"),
        ("/spec/rollout/strategy", serde_json::json!("BlueGreen"), "spec.rollout.strategy"),
        ("/spec/consumer/limits/memory", serde_json::json!("lots"), "spec.consumer.limits.memory"),
        ("/spec/consumer/stopSignal", serde_json::json!("SIGKILL"), "spec.consumer.stopSignal"),
        ("/spec/rollout/drainTimeoutSeconds", serde_json::json!(0), "spec.rollout.drainTimeoutSeconds"),
    ];
    // Sent as raw JSON: some bad values do not even fit the Rust types.
    let raw: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns.name(), &ApiResource::erase::<WorkerPool>(&()));
    for (i, (pointer, value, field)) in cases.into_iter().enumerate() {
        let mut body =
            serde_json::to_value(test_pool(&format!("bad-{i}"), 1, WORKER_V1, 1.0, serde_json::json!({}))).unwrap();
        set(&mut body, pointer, value.clone());
        let object: DynamicObject = serde_json::from_value(body).unwrap();
        let error = raw
            .create(&PostParams::default(), &object)
            .await
            .expect_err(&format!("the API server accepted {pointer} = {value}"))
            .to_string();
        assert!(error.contains(field), "the rejection of {pointer} = {value} does not name {field}: {error}");
    }
    assert!(pools.list(&ListParams::default()).await.unwrap().items.is_empty());
    ns.delete().await;
}

/// Sets the value at a JSON pointer, creating the objects on the way.
fn set(body: &mut serde_json::Value, pointer: &str, value: serde_json::Value) {
    let mut here = body;
    for key in pointer.trim_start_matches('/').split('/') {
        if !here.is_object() {
            *here = serde_json::json!({});
        }
        here = here.as_object_mut().unwrap().entry(key).or_insert(serde_json::Value::Null);
    }
    *here = value;
}

#[tokio::test]
async fn deleting_the_pool_removes_its_pods_and_stop_flag() {
    let (client, ns, _controller) = start_pool_test("gc").await;
    create_pool(&client, ns.name(), &test_pool("gone", 2, WORKER_V1, 0.5, serde_json::json!({}))).await;
    common::wait_for(2 * MINUTE, "2 running pods", || running_pods(&client, ns.name(), "gone", 2)).await;
    Api::<WorkerPool>::namespaced(client.clone(), ns.name())
        .delete("gone", &DeleteParams::foreground())
        .await
        .expect("delete the pool");
    common::wait_for(2 * MINUTE, "the pods and the stop flag to be garbage-collected", || async {
        let pods = pool_pods(&client, ns.name(), "gone").await;
        let flag = Api::<ConfigMap>::namespaced(client.clone(), ns.name()).get_opt("gone-stop-flag").await.ok()?;
        (pods.is_empty() && flag.is_none()).then_some(())
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
async fn crd_applies_with_client_side_kubectl() {
    // GitOps tools and users apply CRDs client-side; the last-applied annotation caps it at 256 KiB.
    // (Installed first so that other tests creating it at the same moment cannot race kubectl's create.)
    install_crd(&common::client().await).await;
    let kubeconfig = common::kubeconfig_path();
    let out = std::process::Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig, "apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/crds/")])
        .output()
        .expect("run kubectl");
    assert!(out.status.success(), "kubectl apply -f crds/ failed: {}", String::from_utf8_lossy(&out.stderr));
    // The API server publishes a new CRD's OpenAPI schema a few seconds after it is established.
    let text = common::wait_for(Duration::from_secs(60), "kubectl explain to describe the limits", || async {
        let explain = std::process::Command::new("kubectl")
            .args(["--kubeconfig", &kubeconfig, "explain", "workerpool.spec.consumer.limits"])
            .output()
            .expect("run kubectl");
        let text = String::from_utf8_lossy(&explain.stdout).to_string();
        text.contains("Exit after this many messages").then_some(text)
    })
    .await;
    assert!(text.contains("timeLimitSeconds"), "{text}");
}
