//! The controller: one reconcile pass lists what is there (the `BlockmeshCluster` object, the ConfigMap, the nodes,
//! the server pods, the pool PVCs), asks [`plan::decide`] what to do, does it, emits events and writes the status
//! when it changed. Watches on all five kinds of objects start passes (debounced); an orphan's grace period ending
//! starts one too, and a pass runs at least every [`RESYNC_INTERVAL`].
//!
//! A pass lists fresh instead of reading watch caches: the singleton pass needs one consistent view, the lists are
//! scoped (pods and PVCs by label in one namespace), and a pass over a stale cache could create twice what the
//! previous pass just created.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference, PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action as Requeue, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::config::CONFIG_MAP_NAME;
use crate::crd::{BlockmeshCluster, BlockmeshClusterSpec, CLUSTER_OBJECT_NAME};
use crate::metrics::Metrics;
use crate::plan::{self, Action, Observed, Plan};
use crate::report::{self, EventSpec, Severity};
use crate::resources::{self, Settings};
use crate::{Error, Result};

/// Field manager of the operator's server-side applies.
pub const FIELD_MANAGER: &str = "blockmesh-operator";
/// A pass runs at least this often, even when nothing is seen to change.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(300);
/// Changes seen within this time of each other start one pass.
pub const DEBOUNCE: Duration = Duration::from_secs(1);
/// First retry after a failed pass...
pub const BACKOFF_BASE: Duration = Duration::from_secs(2);
/// ...doubling with each failure in a row, up to this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What a pass needs.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The operator's settings.
    pub settings: Settings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Event recorder.
    pub recorder: Recorder,
    /// The clock (a fixed one in tests).
    pub clock: Box<dyn Fn() -> Timestamp + Send + Sync>,
    /// Failed passes in a row (the backoff grows with it).
    pub failures: AtomicU32,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl Context {
    /// A context with the system clock; events name `instance` (the operator pod) as their reporter.
    pub fn new(client: Client, settings: Settings, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            clock: Box::new(Timestamp::now),
            failures: AtomicU32::new(0),
        }
    }
}

/// What a pass did.
#[derive(Debug)]
pub struct PassOutcome {
    /// The plan it carried out.
    pub plan: Plan,
    /// Whether it wrote the status.
    pub status_written: bool,
    /// When to run again without any change seen.
    pub requeue_after: Duration,
}

/// The HTTP code of an API server's error answer (`None` for transport and other errors).
pub(crate) fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// The `BlockmeshCluster` object, created when it does not exist.
pub async fn ensure_cluster_object(client: &Client, namespace: &str) -> Result<BlockmeshCluster> {
    let api: Api<BlockmeshCluster> = Api::namespaced(client.clone(), namespace);
    if let Some(obj) = api.get_opt(CLUSTER_OBJECT_NAME).await.map_err(|e| Error::kube("get blockmeshcluster", e))? {
        return Ok(obj);
    }
    let mut obj = BlockmeshCluster::new(CLUSTER_OBJECT_NAME, BlockmeshClusterSpec {});
    obj.metadata.namespace = Some(namespace.to_string());
    match api.create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }, &obj).await {
        Ok(o) => Ok(o),
        Err(e) if api_code(&e) == Some(409) => {
            api.get(CLUSTER_OBJECT_NAME).await.map_err(|e| Error::kube("get blockmeshcluster", e))
        }
        Err(e) => Err(Error::kube("create blockmeshcluster", e)),
    }
}

/// Lists what the planner decides from.
async fn observe(ctx: &Context, cluster: &BlockmeshCluster) -> Result<Observed> {
    let ns = ctx.settings.namespace.as_str();
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let config_map = cms
        .get_opt(CONFIG_MAP_NAME)
        .await
        .map_err(|e| Error::kube("get configmap blockmesh", e))?
        .map(|cm| cm.data.unwrap_or_default());
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let nodes = nodes.list(&ListParams::default()).await.map_err(|e| Error::kube("list nodes", e))?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let pods = pods
        .list(&ListParams::default().labels(resources::SERVER_POD_SELECTOR))
        .await
        .map_err(|e| Error::kube("list server pods", e))?;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let pvcs = pvcs
        .list(&ListParams::default().labels(resources::POOL_PVC_SELECTOR))
        .await
        .map_err(|e| Error::kube("list pool PVCs", e))?;
    // Whole seconds: what the status records reads back the same.
    let now = Timestamp::from_second((ctx.clock)().as_second()).unwrap_or(Timestamp::UNIX_EPOCH);
    Ok(Observed {
        now,
        config_map,
        nodes: nodes.items.iter().map(resources::node_info).collect(),
        pods: pods.items.iter().map(resources::pod_info).collect(),
        pvcs: pvcs.items.iter().map(resources::pvc_info).collect(),
        previous: report::previous_from_status(cluster.status.as_ref()),
    })
}

fn object_ref(kind: &str, name: &str, namespace: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some(kind.into()),
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        ..Default::default()
    }
}

/// Emits an event about the cluster object; a failure is logged, not fatal (events are best effort).
async fn emit(ctx: &Context, regarding: &ObjectReference, spec: &EventSpec) {
    let event = Event {
        type_: match spec.severity {
            Severity::Normal => EventType::Normal,
            Severity::Warning => EventType::Warning,
        },
        reason: spec.reason.clone(),
        note: Some(spec.note.clone()),
        action: spec.action.clone(),
        secondary: spec.related.as_ref().map(|(kind, name)| object_ref(kind, name, &ctx.settings.namespace)),
    };
    if let Err(e) = ctx.recorder.publish(&event, regarding).await {
        tracing::warn!(error = %e, reason = %spec.reason, "could not publish an event");
    }
}

/// Carries out one change; `AlreadyExists` on a create and `NotFound` on a delete count as done (a pass on a view
/// older than the last pass's changes).
async fn act(ctx: &Context, plan: &Plan, action: &Action) -> Result<()> {
    let ns = ctx.settings.namespace.as_str();
    let Some(config) = plan.config.as_ref() else { return Ok(()) };
    let post = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    match action {
        Action::CreatePvc { name, node, zone } => {
            let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
            let pvc = resources::pool_pvc(&ctx.settings, config, name, node, zone.as_deref())?;
            match api.create(&post, &pvc).await {
                Ok(_) => Ok(()),
                Err(e) if api_code(&e) == Some(409) => {
                    // Ours from a previous pass, or someone else's PVC by that name (then say so).
                    let existing = api.get(name).await.map_err(|e| Error::kube(format!("get pvc {name}"), e))?;
                    let ours = existing.labels().get("app.kubernetes.io/managed-by").map(String::as_str)
                        == Some(resources::MANAGED_BY);
                    if ours {
                        Ok(())
                    } else {
                        Err(Error::Settings(format!(
                            "PVC {name} exists in namespace {ns} and was not made by the operator: rename or remove it"
                        )))
                    }
                }
                Err(e) => Err(Error::kube(format!("create pvc {name}"), e)),
            }
        }
        Action::CreatePod { server, .. } => {
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
            let pod = resources::server_pod(&ctx.settings, config, server)?;
            match api.create(&post, &pod).await {
                Ok(_) => Ok(()),
                Err(e) if api_code(&e) == Some(409) => Ok(()),
                Err(e) => Err(Error::kube(format!("create pod {}", server.name), e)),
            }
        }
        Action::DeletePod { server, .. } => {
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
            match api.delete(&server.name, &DeleteParams::default()).await {
                Ok(_) => Ok(()),
                Err(e) if api_code(&e) == Some(404) => Ok(()),
                Err(e) => Err(Error::kube(format!("delete pod {}", server.name), e)),
            }
        }
    }
}

fn log_plan(plan: &Plan) {
    if let plan::ConfigState::Invalid { errors, kept_previous } = &plan.config_state {
        tracing::warn!(
            problems = %crate::config::describe_errors(errors),
            kept_last_good = kept_previous,
            "the blockmesh ConfigMap is invalid"
        );
    }
    if let Some(m) = plan.mode_switch {
        tracing::warn!("{}", report::mode_switch_message(m.requested, m.running));
    }
    if !plan.foreign_pods.is_empty() {
        tracing::warn!(pods = ?plan.foreign_pods, "server pods of the other storage mode are left alone");
    }
    for w in &plan.waiting {
        tracing::info!("{w}");
    }
}

/// One pass, on the cluster object's current state.
pub async fn reconcile_once(ctx: &Context) -> Result<PassOutcome> {
    let ns = ctx.settings.namespace.clone();
    let cluster = ensure_cluster_object(&ctx.client, &ns).await?;
    let observed = observe(ctx, &cluster).await?;
    let plan = plan::decide(&observed, &ctx.settings);
    log_plan(&plan);
    let status = report::build_status(&plan, &observed, cluster.status.as_ref());
    let mut regarding = cluster.object_ref(&());
    regarding.namespace.get_or_insert_with(|| ns.clone());

    for e in report::condition_events(&status, cluster.status.as_ref()) {
        emit(ctx, &regarding, &e).await;
    }
    for action in &plan.actions {
        act(ctx, &plan, action).await?;
        ctx.metrics.action(action);
        let e = report::action_event(action);
        tracing::info!(action = %e.action, reason = %e.reason, "{}", e.note);
        emit(ctx, &regarding, &e).await;
    }
    let status_written = cluster.status.as_ref() != Some(&status);
    if status_written {
        let api: Api<BlockmeshCluster> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({
            "apiVersion": "blockmesh.io/v1alpha1",
            "kind": "BlockmeshCluster",
            "status": status,
        });
        api.patch_status(CLUSTER_OBJECT_NAME, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
            .await
            .map_err(|e| Error::kube("patch blockmeshcluster status", e))?;
    }
    let m = &ctx.metrics;
    m.config_valid.set(i64::from(matches!(plan.config_state, plan::ConfigState::Valid)));
    m.mode_switch_refused.set(i64::from(plan.mode_switch.is_some()));
    m.nodes.set(i64::from(status.nodes));
    m.servers.set(i64::from(status.servers));
    m.ready_servers.set(i64::from(status.ready_servers));
    m.orphaned_pvcs.set(i64::from(status.orphaned_pvcs));
    let requeue_after = plan.requeue_after.map_or(RESYNC_INTERVAL, |d| d.min(RESYNC_INTERVAL));
    Ok(PassOutcome { plan, status_written, requeue_after })
}

/// Backoff after `failures` failed passes in a row: [`BACKOFF_BASE`] doubling, at most [`BACKOFF_MAX`].
pub fn backoff(failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.saturating_sub(1)).unwrap_or(u32::MAX);
    BACKOFF_BASE.checked_mul(factor).map_or(BACKOFF_MAX, |d| d.min(BACKOFF_MAX))
}

async fn reconcile(_cluster: Arc<BlockmeshCluster>, ctx: Arc<Context>) -> Result<Requeue> {
    let started = Instant::now();
    let result = reconcile_once(&ctx).await;
    ctx.metrics.pass(result.is_ok(), started.elapsed().as_secs_f64());
    let outcome = result?;
    ctx.failures.store(0, Ordering::Relaxed);
    ctx.metrics.consecutive_failures.set(0);
    Ok(Requeue::requeue(outcome.requeue_after))
}

/// Retries a failed pass after a backoff that grows with the failures in a row.
pub fn error_policy(_cluster: Arc<BlockmeshCluster>, error: &Error, ctx: Arc<Context>) -> Requeue {
    let failures = ctx.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
    ctx.metrics.consecutive_failures.set(i64::from(failures));
    let wait = backoff(failures);
    tracing::error!(error = %error, failures, retry_in_seconds = wait.as_secs(), "reconcile failed");
    Requeue::requeue(wait)
}

/// Runs the controller until SIGTERM or Ctrl-C.
pub async fn run(ctx: Arc<Context>) -> Result<()> {
    run_until(ctx, futures::future::pending(), true).await
}

/// Runs the controller until `shutdown` completes (and, with `on_signal`, until SIGTERM or Ctrl-C): the passes
/// under way finish first.
pub async fn run_until(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    on_signal: bool,
) -> Result<()> {
    let ns = ctx.settings.namespace.clone();
    let client = ctx.client.clone();
    ensure_cluster_object(&client, &ns).await?;
    let root = ObjectRef::<BlockmeshCluster>::new(CLUSTER_OBJECT_NAME).within(&ns);
    let (r1, r2, r3, r4) = (root.clone(), root.clone(), root.clone(), root);
    let clusters: Api<BlockmeshCluster> = Api::namespaced(client.clone(), &ns);
    let controller =
        Controller::new(clusters, watcher::Config::default().fields(&format!("metadata.name={CLUSTER_OBJECT_NAME}")))
            .watches(
                Api::<ConfigMap>::namespaced(client.clone(), &ns),
                watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP_NAME}")),
                move |_| std::iter::once(r1.clone()),
            )
            .watches(Api::<Node>::all(client.clone()), watcher::Config::default(), move |_| std::iter::once(r2.clone()))
            .watches(
                Api::<Pod>::namespaced(client.clone(), &ns),
                watcher::Config::default().labels(resources::SERVER_POD_SELECTOR),
                move |_| std::iter::once(r3.clone()),
            )
            .watches(
                Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns),
                watcher::Config::default().labels(resources::POOL_PVC_SELECTOR),
                move |_| std::iter::once(r4.clone()),
            )
            .with_config(controller::Config::default().debounce(DEBOUNCE))
            .graceful_shutdown_on(shutdown);
    let controller = if on_signal { controller.shutdown_on_signal() } else { controller };
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller");
            }
        })
        .await;
    Ok(())
}
