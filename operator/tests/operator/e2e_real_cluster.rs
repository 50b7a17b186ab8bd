//! End to end, against a real cluster (none can run on the project's machines or in its CI): set
//! `BLOCKMESH_E2E_KUBECONFIG` to a kubeconfig whose cluster has blockmesh installed (`kubectl apply -f
//! operator/deploy/`, the API key Secret created, the images pullable). Without it the test says it skipped, unless
//! `BLOCKMESH_E2E_REQUIRED=1`, which makes it fail. It checks that every node matching `nodeSelector` gets a ready
//! server pod of the expected name, that an invalid ConfigMap is reported and changes nothing, and restores the
//! ConfigMap it found.
use std::time::Duration;

use blockmesh_operator::config::{ClusterConfig, StorageMode, CONFIG_MAP_NAME};
use blockmesh_operator::crd::{BlockmeshCluster, CLUSTER_OBJECT_NAME};
use blockmesh_operator::resources::{self, DEFAULT_NAMESPACE};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};

/// How long the cluster may take to get every server ready.
const E2E_TIMEOUT: Duration = Duration::from_secs(600);
/// Between two looks.
const POLL: Duration = Duration::from_secs(5);

async fn client() -> Option<Client> {
    let Ok(path) = std::env::var("BLOCKMESH_E2E_KUBECONFIG") else {
        assert!(
            std::env::var("BLOCKMESH_E2E_REQUIRED").as_deref() != Ok("1"),
            "BLOCKMESH_E2E_REQUIRED=1 but BLOCKMESH_E2E_KUBECONFIG is not set"
        );
        eprintln!("SKIPPED: set BLOCKMESH_E2E_KUBECONFIG to run the end-to-end test against a real cluster");
        return None;
    };
    let kc = Kubeconfig::read_from(&path).expect("a readable kubeconfig");
    let config =
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("a usable kubeconfig");
    Some(Client::try_from(config).expect("a client"))
}

async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + E2E_TIMEOUT;
    loop {
        match check().await {
            Ok(()) => return,
            Err(why) if tokio::time::Instant::now() >= deadline => panic!("{what}: not after {E2E_TIMEOUT:?}: {why}"),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

#[tokio::test]
async fn operator_runs_one_ready_server_per_selected_node() {
    let Some(client) = client().await else { return };
    let ns = DEFAULT_NAMESPACE;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let original = cms.get(CONFIG_MAP_NAME).await.expect("the blockmesh ConfigMap (kubectl apply -f operator/deploy/)");
    let config =
        ClusterConfig::from_data(&original.data.clone().unwrap_or_default()).expect("a valid ConfigMap to start");
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let clusters: Api<BlockmeshCluster> = Api::namespaced(client.clone(), ns);

    wait_for("every selected node has a ready server pod", || async {
        let selected: Vec<String> = nodes
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .iter()
            .map(resources::node_info)
            .filter(|n| config.node_selector.matches(&n.labels))
            .map(|n| n.name)
            .collect();
        let servers: Vec<_> = pods
            .list(&ListParams::default().labels(resources::SERVER_POD_SELECTOR))
            .await
            .map_err(|e| e.to_string())?
            .items
            .iter()
            .map(resources::pod_info)
            .collect();
        for node in &selected {
            let name_ok = |p: &blockmesh_operator::plan::PodInfo| match config.storage_mode {
                StorageMode::Local => p.name == resources::local_pod_name(node),
                StorageMode::PvcPerNode => p.pvc.as_deref().is_some_and(|c| p.name == resources::pvc_pod_name(c, node)),
            };
            if !servers.iter().any(|p| p.node == *node && p.ready && name_ok(p)) {
                return Err(format!("node {node} has no ready server pod yet"));
            }
        }
        let status = clusters.get(CLUSTER_OBJECT_NAME).await.map_err(|e| e.to_string())?.status.ok_or("no status")?;
        if status.ready_servers != status.servers || status.servers < i32::try_from(selected.len()).unwrap_or(i32::MAX)
        {
            return Err(format!("status: {} of {} ready", status.ready_servers, status.servers));
        }
        Ok(())
    })
    .await;
    let before: Vec<String> = pods
        .list(&ListParams::default().labels(resources::SERVER_POD_SELECTOR))
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect();

    // an invalid value is reported and changes nothing
    let bad = serde_json::json!({ "data": { "storageMode": "not-a-mode" } });
    cms.patch(CONFIG_MAP_NAME, &PatchParams::default(), &Patch::Merge(&bad)).await.unwrap();
    wait_for("the ConfigValid condition turns False", || async {
        let status = clusters.get(CLUSTER_OBJECT_NAME).await.map_err(|e| e.to_string())?.status.ok_or("no status")?;
        let c = status.conditions.iter().find(|c| c.type_ == "ConfigValid").ok_or("no condition")?;
        if c.status == "False" && c.message.contains("storageMode") {
            Ok(())
        } else {
            Err(c.message.clone())
        }
    })
    .await;
    let after: Vec<String> = pods
        .list(&ListParams::default().labels(resources::SERVER_POD_SELECTOR))
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect();
    // restore what was there
    let restore = serde_json::json!({ "data": { "storageMode": config.storage_mode.as_str() } });
    cms.patch(CONFIG_MAP_NAME, &PatchParams::default(), &Patch::Merge(&restore)).await.unwrap();
    assert_eq!(before, after, "an invalid ConfigMap changed the server pods");
}
