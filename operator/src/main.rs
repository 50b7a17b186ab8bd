//! `blockmesh-operator`: runs the controller (`blockmesh-operator run`, the default; the controller only while this
//! replica holds the leader lease) with its metrics and health endpoints, or prints the CustomResourceDefinition
//! generated from the Rust types (`blockmesh-operator crd`).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use blockmesh_operator::controller::{self, Context};
use blockmesh_operator::leader::{self, Elector, LeaseTimings};
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
    /// Name of this operator pod (reported in events, and its identity in the leader lease; without it, the
    /// hostname and a random suffix).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Seconds the leader lease holds without a renewal (how long a successor waits for a leader that vanished).
    #[arg(long, env = "BLOCKMESH_OPERATOR_LEASE_DURATION_SECONDS")]
    #[arg(default_value_t = leader::DEFAULT_LEASE_DURATION_SECONDS)]
    lease_duration_seconds: u32,
    /// Seconds between the leader's renewals (shorter than the lease duration).
    #[arg(long, env = "BLOCKMESH_OPERATOR_LEASE_RENEW_INTERVAL_SECONDS")]
    #[arg(default_value_t = leader::DEFAULT_RENEW_INTERVAL_SECONDS)]
    lease_renew_interval_seconds: u32,
    /// Seconds between a follower's tries to take the lease (and the leader's retries of a failed renewal).
    #[arg(long, env = "BLOCKMESH_OPERATOR_LEASE_RETRY_INTERVAL_SECONDS")]
    #[arg(default_value_t = leader::DEFAULT_RETRY_INTERVAL_SECONDS)]
    lease_retry_interval_seconds: u32,
    /// Log as JSON lines.
    #[arg(long, env = "BLOCKMESH_OPERATOR_LOG_JSON")]
    log_json: bool,
}

/// `/readyz`: every replica is ready (a follower is a healthy standby); the body says whether this one leads.
async fn readyz(metrics: Arc<Metrics>) -> (StatusCode, &'static str) {
    (StatusCode::OK, if metrics.is_leader() { "ok: leader" } else { "ok: follower" })
}

async fn serve_http(listen: SocketAddr, metrics: Arc<Metrics>) -> Result<()> {
    let leading = metrics.clone();
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
        .route("/readyz", get(move || readyz(leading.clone())));
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    tracing::info!(%listen, "metrics and health endpoints");
    // Plain axum::serve: the endpoint answers scrapes and probes on the cluster network, nothing else.
    axum::serve(listener, app).await.context("metrics endpoint")
}

/// Completes on SIGTERM or Ctrl-C (what stops a follower; the controller watches for the same signals itself).
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            futures::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch for SIGTERM");
                futures::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = futures::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let timings = LeaseTimings::from_seconds(
        args.lease_duration_seconds,
        args.lease_renew_interval_seconds,
        args.lease_retry_interval_seconds,
    )?;
    let settings = Settings {
        namespace: args.namespace,
        server_image: args.server_image,
        secret_name: args.api_key_secret,
        service_account: args.server_service_account,
    };
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(Metrics::new());
    let identity = args.pod_name.clone().unwrap_or_else(leader::default_identity);
    let elector = Elector::new(client.clone(), &settings.namespace, identity, timings, metrics.clone());
    let ctx = Arc::new(Context::new(client, settings, metrics.clone(), args.pod_name));
    tracing::info!(namespace = %ctx.settings.namespace, image = %ctx.settings.server_image, "blockmesh operator starting");
    // A lost lease ends `lead` with an error: the process exits non-zero and restarts as a follower.
    tokio::select! {
        r = serve_http(args.metrics_listen, metrics) => r,
        r = elector.lead(controller::run(ctx), shutdown_signal()) => r.context("controller"),
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
