//! `blockmesh-operator`: runs the controller (`blockmesh-operator run`, the default) with its metrics and health
//! endpoints, or prints the CustomResourceDefinition generated from the Rust types (`blockmesh-operator crd`).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use blockmesh_operator::controller::{self, Context};
use blockmesh_operator::metrics::Metrics;
use blockmesh_operator::resources::{self, Settings};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "blockmesh-operator", version, about = "Kubernetes operator for blockmesh server pods")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller (the default).
    Run,
    /// Print the BlockmeshCluster CustomResourceDefinition (YAML), as checked in under deploy/.
    Crd,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Namespace of the ConfigMap, the server pods, the PVCs and the BlockmeshCluster object.
    #[arg(long, env = "BLOCKMESH_NAMESPACE", default_value = resources::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Image of the server pods (with `blockmesh` on its PATH).
    #[arg(long, env = "BLOCKMESH_SERVER_IMAGE", default_value = resources::DEFAULT_SERVER_IMAGE)]
    server_image: String,
    /// Secret with the admin API key (key `api-key`), created by the user.
    #[arg(long, env = "BLOCKMESH_API_KEY_SECRET", default_value = resources::DEFAULT_SECRET_NAME)]
    api_key_secret: String,
    /// ServiceAccount of the server pods.
    #[arg(long, env = "BLOCKMESH_SERVER_SERVICE_ACCOUNT", default_value = resources::DEFAULT_SERVER_SERVICE_ACCOUNT)]
    server_service_account: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "BLOCKMESH_OPERATOR_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    metrics_listen: SocketAddr,
    /// Name of this operator pod (reported in events).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "BLOCKMESH_OPERATOR_LOG_JSON")]
    log_json: bool,
}

async fn serve_http(listen: SocketAddr, metrics: Arc<Metrics>) -> Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.encode())
                        .into_response()
                }
            }),
        )
        .route("/healthz", get(|| async { (StatusCode::OK, "ok") }))
        .route("/readyz", get(|| async { (StatusCode::OK, "ok") }));
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    tracing::info!(%listen, "metrics and health endpoints");
    // Plain axum::serve: the endpoint answers scrapes and probes on the cluster network, nothing else.
    axum::serve(listener, app).await.context("metrics endpoint")
}

async fn run(args: RunArgs) -> Result<()> {
    let settings = Settings {
        namespace: args.namespace,
        server_image: args.server_image,
        secret_name: args.api_key_secret,
        service_account: args.server_service_account,
    };
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(Metrics::new());
    let ctx = Arc::new(Context::new(client, settings, metrics.clone(), args.pod_name));
    tracing::info!(namespace = %ctx.settings.namespace, image = %ctx.settings.server_image, "blockmesh operator starting");
    tokio::select! {
        r = serve_http(args.metrics_listen, metrics) => r,
        r = controller::run(ctx) => r.context("controller"),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "blockmesh_operator=info,kube=warn,warn".into());
    if cli.run.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    match cli.command {
        Some(Command::Crd) => {
            print!("{}", blockmesh_operator::crd::crd_yaml()?);
            Ok(())
        }
        None | Some(Command::Run) => {
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(cli.run))
        }
    }
}
