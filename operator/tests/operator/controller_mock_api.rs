//! The controller against an in-process fake API server (`fake_api`): the exact API calls of each pass, the
//! objects it sends, a second pass that changes nothing, events, errors and the backoff, and the real kube-rs
//! Controller (watches and all) running until the servers exist.
use std::sync::Arc;
use std::time::Duration;

use crate::fake_api::*;
use blockmesh_operator::controller::{self, backoff, Context, BACKOFF_BASE, BACKOFF_MAX};
use blockmesh_operator::crd::BlockmeshCluster;
use blockmesh_operator::metrics::Metrics;
use blockmesh_operator::resources::Settings;
use http::Method;
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

const CLUSTER: &str = "/apis/blockmesh.io/v1alpha1/namespaces/blockmesh/blockmeshclusters/blockmesh";
const CLUSTER_STATUS: &str = "/apis/blockmesh.io/v1alpha1/namespaces/blockmesh/blockmeshclusters/blockmesh/status";
const T0: i64 = 1_800_000_000;

fn context(api: &FakeApi, now: Arc<std::sync::atomic::AtomicI64>) -> Context {
    let mut ctx = Context::new(api.client(), Settings::default(), Arc::new(Metrics::new()), Some("operator-0".into()));
    ctx.clock = Box::new(move || Timestamp::from_second(now.load(std::sync::atomic::Ordering::Relaxed)).unwrap());
    ctx
}

fn clock() -> Arc<std::sync::atomic::AtomicI64> {
    Arc::new(std::sync::atomic::AtomicI64::new(T0))
}

/// The reads every pass starts with (the cluster object exists).
fn reads() -> Vec<String> {
    vec![
        format!("GET {CLUSTER}"),
        format!("GET {CONFIGMAPS}/blockmesh"),
        format!("GET {NODES}"),
        format!("GET {PODS}"),
        format!("GET {PVCS}"),
    ]
}

fn with(mut calls: Vec<String>, more: &[String]) -> Vec<String> {
    calls.extend_from_slice(more);
    calls
}

fn post(coll: &str) -> String {
    format!("POST {coll}")
}

fn event_reasons(bodies: &[(String, Value)]) -> Vec<(String, String)> {
    bodies
        .iter()
        .filter(|(c, _)| c.starts_with("POST") && c.ends_with("/events"))
        .map(|(_, b)| (b["type"].as_str().unwrap().to_string(), b["reason"].as_str().unwrap().to_string()))
        .collect()
}

fn seeded(nodes: &[&str], config: &[(&str, &str)]) -> FakeApi {
    let api = FakeApi::new();
    for n in nodes {
        api.put(NODES, node(n));
    }
    api.put(CONFIGMAPS, config_map(config));
    api
}

#[tokio::test]
async fn fresh_cluster_local_mode_exact_calls_then_a_pass_that_changes_nothing() {
    let api = seeded(&["node-a", "node-b"], &[]);
    let ctx = context(&api, clock());
    let out = controller::reconcile_once(&ctx).await.unwrap();
    assert!(out.status_written);
    let mut want = vec![format!("GET {CLUSTER}"), post(CLUSTERS)];
    want.extend(reads().into_iter().skip(1));
    want.extend([post(PODS), post(EVENTS), post(PODS), post(EVENTS), format!("PATCH {CLUSTER_STATUS}")]);
    assert_eq!(api.take_calls(), want);

    // the pods sent: names, node pinning, host path pool, API key from the Secret, probes
    let bodies = api.take_bodies();
    let pods: Vec<&Value> = bodies.iter().filter(|(c, _)| *c == post(PODS)).map(|(_, b)| b).collect();
    assert_eq!(pods[0]["metadata"]["name"], "server-node-a");
    assert_eq!(pods[1]["metadata"]["name"], "server-node-b");
    let spec = &pods[0]["spec"];
    assert_eq!(
        spec.pointer("/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms/0/matchFields/0/values/0"),
        Some(&Value::from("node-a"))
    );
    assert_eq!(spec.pointer("/volumes/0/hostPath/path"), Some(&Value::from("/var/lib/blockmesh")));
    assert_eq!(spec.pointer("/volumes/1/secret/secretName"), Some(&Value::from("blockmesh")));
    assert_eq!(
        spec.pointer("/containers/0/volumeMounts/1/mountPath"),
        Some(&Value::from("/var/lib/blockmesh/api-key"))
    );
    assert_eq!(spec.pointer("/containers/0/volumeMounts/1/subPath"), Some(&Value::from("api-key")));
    assert_eq!(spec.pointer("/containers/0/readinessProbe/tcpSocket/port"), Some(&Value::from("nbd")));
    assert_eq!(spec.pointer("/containers/0/livenessProbe/httpGet/path"), Some(&Value::from("/healthz")));
    assert_eq!(spec.pointer("/containers/0/startupProbe/httpGet/port"), Some(&Value::from("health")));
    let args: Vec<&str> =
        spec["containers"][0]["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(
        args,
        [
            "serve",
            "--pool-size",
            "10737418240",
            "--nbd-listen",
            "0.0.0.0:10809",
            "--api-listen",
            "0.0.0.0:32607",
            "--health-listen",
            "0.0.0.0:32608"
        ]
    );
    assert_eq!(event_reasons(&bodies), vec![("Normal".into(), "NodeWithoutServer".into()); 2]);
    let status: Value = bodies.iter().find(|(c, _)| c.starts_with("PATCH")).map(|(_, b)| b.clone()).unwrap();
    assert_eq!(status["status"]["servers"], 2);
    assert_eq!(status["status"]["storageMode"], "local");

    // a second pass over what the first made: reads only
    let out = controller::reconcile_once(&ctx).await.unwrap();
    assert!(!out.status_written);
    assert!(out.plan.actions.is_empty());
    let calls = api.take_calls();
    assert_eq!(calls, reads());
    assert!(calls.iter().all(|c| c.starts_with("GET ")), "{calls:?}");

    // the pods become ready: the status changes once, then nothing again
    for p in api.names(PODS) {
        api.patch(PODS, &p, serde_json::json!({ "status": { "phase": "Running", "conditions": [ { "type": "Ready", "status": "True" } ] } }));
    }
    assert!(controller::reconcile_once(&ctx).await.unwrap().status_written);
    assert_eq!(api.take_calls(), with(reads(), &[format!("PATCH {CLUSTER_STATUS}")]));
    controller::reconcile_once(&ctx).await.unwrap();
    assert_eq!(api.take_calls(), reads());
    let cluster: BlockmeshCluster = serde_json::from_value(api.get(CLUSTERS, "blockmesh").unwrap()).unwrap();
    assert_eq!(cluster.status.map(|s| s.ready_servers), Some(2));
}

#[tokio::test]
async fn pvc_per_node_fresh_cluster_creates_pvcs_before_their_pods() {
    let api = seeded(&["node-a"], &[("storageMode", "pvcPerNode"), ("pvcPerNode.storageClass", "fast")]);
    let ctx = context(&api, clock());
    controller::reconcile_once(&ctx).await.unwrap();
    let calls = api.take_calls();
    assert_eq!(&calls[6..], &[post(PVCS), post(EVENTS), post(PODS), post(EVENTS), format!("PATCH {CLUSTER_STATUS}")]);
    let bodies = api.take_bodies();
    let pvc = &bodies.iter().find(|(c, _)| *c == post(PVCS)).unwrap().1;
    let pvc_name = pvc["metadata"]["name"].as_str().unwrap().to_string();
    assert!(pvc_name.starts_with("pvc-"));
    assert_eq!(pvc["spec"]["storageClassName"], "fast");
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "10Gi");
    assert_eq!(pvc["metadata"]["annotations"]["blockmesh.io/created-for-node"], "node-a");
    let pod = &bodies.iter().find(|(c, _)| *c == post(PODS)).unwrap().1;
    assert_eq!(pod["metadata"]["name"], format!("server-{pvc_name}-node-node-a"));
    assert_eq!(pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"], pvc_name.as_str());
    assert_eq!(event_reasons(&bodies), vec![("Normal".into(), "NodeWithoutServer".into()); 2]);
    controller::reconcile_once(&ctx).await.unwrap();
    assert_eq!(api.take_calls(), reads());
}

#[tokio::test]
async fn node_removed_then_orphan_served_after_the_grace_period() {
    let api = seeded(&["node-a", "node-b"], &[("storageMode", "pvcPerNode")]);
    let now = clock();
    let ctx = context(&api, now.clone());
    controller::reconcile_once(&ctx).await.unwrap();
    api.take_calls();
    api.take_bodies();
    let pod_b = api.names(PODS).into_iter().find(|n| n.ends_with("-node-node-b")).unwrap();
    let pvc_b = api.get(PODS, &pod_b).unwrap()["metadata"]["labels"]["blockmesh.io/pvc"].as_str().unwrap().to_string();
    api.remove(NODES, "node-b");
    controller::reconcile_once(&ctx).await.unwrap();
    // the orphan condition's event (its PVC is without a server from now on), the delete and its event, the status
    assert_eq!(
        api.take_calls(),
        with(
            reads(),
            &[post(EVENTS), format!("DELETE {PODS}/{pod_b}"), post(EVENTS), format!("PATCH {CLUSTER_STATUS}")]
        )
    );
    let bodies = api.take_bodies();
    assert_eq!(
        event_reasons(&bodies),
        vec![("Normal".into(), "WithinGracePeriod".into()), ("Normal".into(), "NodeGone".into())]
    );
    // released: nothing is written within the grace period
    controller::reconcile_once(&ctx).await.unwrap();
    assert_eq!(api.take_calls(), reads());
    now.fetch_add(599, std::sync::atomic::Ordering::Relaxed);
    let out = controller::reconcile_once(&ctx).await.unwrap();
    assert_eq!(out.requeue_after, Duration::from_secs(1), "the next pass is due when the grace period ends");
    assert_eq!(api.take_calls(), reads());
    now.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    api.take_bodies();
    controller::reconcile_once(&ctx).await.unwrap();
    assert_eq!(
        api.take_calls(),
        with(reads(), &[post(EVENTS), post(PODS), post(EVENTS), format!("PATCH {CLUSTER_STATUS}")])
    );
    let bodies = api.take_bodies();
    assert_eq!(
        event_reasons(&bodies),
        vec![("Normal".into(), "AllServed".into()), ("Normal".into(), "ServeOrphan".into())]
    );
    assert!(api.names(PODS).contains(&format!("server-{pvc_b}-node-node-a")));
}

#[tokio::test]
async fn invalid_config_map_warns_once_and_changes_nothing() {
    let api = seeded(&["node-a"], &[]);
    let ctx = context(&api, clock());
    controller::reconcile_once(&ctx).await.unwrap();
    api.take_calls();
    api.take_bodies();
    api.put(CONFIGMAPS, config_map(&[("storageMode", "zfs")]));
    controller::reconcile_once(&ctx).await.unwrap();
    assert_eq!(api.take_calls(), with(reads(), &[post(EVENTS), format!("PATCH {CLUSTER_STATUS}")]));
    assert_eq!(event_reasons(&api.take_bodies()), vec![("Warning".into(), "Invalid".into())]);
    controller::reconcile_once(&ctx).await.unwrap();
    assert_eq!(api.take_calls(), reads(), "reported once, not every pass");
    assert_eq!(api.names(PODS), vec!["server-node-a"]);
}

#[tokio::test]
async fn mode_switch_is_refused_with_a_warning_event() {
    let api = seeded(&["node-a"], &[]);
    let ctx = context(&api, clock());
    controller::reconcile_once(&ctx).await.unwrap();
    api.take_calls();
    api.take_bodies();
    api.put(CONFIGMAPS, config_map(&[("storageMode", "pvcPerNode")]));
    controller::reconcile_once(&ctx).await.unwrap();
    assert_eq!(api.take_calls(), with(reads(), &[post(EVENTS), format!("PATCH {CLUSTER_STATUS}")]));
    let bodies = api.take_bodies();
    assert_eq!(event_reasons(&bodies), vec![("Warning".into(), "ModeSwitchRefused".into())]);
    assert!(api.names(PVCS).is_empty());
}

#[tokio::test]
async fn already_exists_counts_as_done_and_other_errors_fail_the_pass_with_backoff() {
    let api = seeded(&["node-a"], &[]);
    let ctx = Arc::new(context(&api, clock()));
    controller::reconcile_once(&ctx).await.unwrap(); // creates the cluster object
    api.remove(PODS, "server-node-a");
    api.take_calls();
    // a stale view: the pod exists by the time it is created
    api.inject(Method::POST, PODS, 409);
    controller::reconcile_once(&ctx).await.unwrap();
    // a failing API: the pass fails, the error names the call, the backoff grows and resets on success
    api.inject(Method::POST, PODS, 500);
    let err = controller::reconcile_once(&ctx).await.unwrap_err();
    assert!(err.to_string().contains("create pod server-node-a"), "{err}");
    let obj = Arc::new(BlockmeshCluster::new("blockmesh", Default::default()));
    let first = controller::error_policy(obj.clone(), &err, ctx.clone());
    let second = controller::error_policy(obj.clone(), &err, ctx.clone());
    assert_eq!(first, kube::runtime::controller::Action::requeue(BACKOFF_BASE));
    assert_eq!(second, kube::runtime::controller::Action::requeue(BACKOFF_BASE * 2));
    assert_eq!(backoff(1), BACKOFF_BASE);
    assert_eq!(backoff(3), BACKOFF_BASE * 4);
    assert_eq!(backoff(30), BACKOFF_MAX);
    assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    let metrics = ctx.metrics.encode();
    assert!(metrics.contains("blockmesh_operator_consecutive_failures 2"), "{metrics}");
}

#[tokio::test]
async fn the_controller_runs_on_watches_until_shut_down() {
    let api = seeded(&["node-a", "node-b"], &[]);
    let ctx = Arc::new(context(&api, clock()));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(controller::run_until(
        ctx.clone(),
        async move {
            let _ = rx.await;
        },
        false,
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while api.names(PODS).len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no pods after 20 s: {:?}", api.take_calls());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(20), task).await.expect("stops").expect("joins").expect("runs");
    let calls = api.take_calls();
    for watched in [CLUSTERS, CONFIGMAPS, NODES, PODS, PVCS] {
        assert!(calls.iter().any(|c| *c == format!("GET (watch) {watched}")), "no watch on {watched}: {calls:?}");
    }
    assert_eq!(api.names(PODS), vec!["server-node-a", "server-node-b"]);
    assert!(ctx.metrics.encode().contains("blockmesh_operator_reconciles_total{result=\"ok\"}"));
}
