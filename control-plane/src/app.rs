//! The service: PostgreSQL, the data plane link, the drainers and the pusher, and the
//! HTTP server with the API, `/metrics`, `/healthz` and `/readyz`.
//!
//! `/healthz` says the process serves HTTP; `/readyz` says PostgreSQL answers and the
//! data plane has been reached (503 with the reason otherwise).

use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::Notify;

use crate::config::Config;
use crate::dataplane::Link;
use crate::db::Db;

/// What every part of the service shares.
#[derive(Clone)]
pub struct App {
    /// PostgreSQL.
    pub db: Db,
    /// The data plane, once reached.
    pub link: Link,
    /// The configuration.
    pub config: Arc<Config>,
    /// Wakes the pusher when a change is recorded, so it need not wait for its next round.
    pub push_wake: Arc<Notify>,
}

impl App {
    /// Connects to PostgreSQL (running the migrations) and starts reaching the data plane.
    pub async fn start(config: Config) -> anyhow::Result<App> {
        let db = Db::connect(&config.database.url, config.database.connections, config.database.statement_timeout_ms)
            .await?;
        let link = Link::start(config.dataplane.clone(), db.clone());
        Ok(App { db, link, config: Arc::new(config), push_wake: Arc::new(Notify::new()) })
    }

    /// Runs the drainers and the pusher in the background.
    pub fn spawn_sync(&self) {
        crate::sync::spawn(self.clone());
    }

    /// The HTTP router: the API, the OpenAPI document, metrics and health.
    pub fn router(&self, metrics: Option<PrometheusHandle>) -> Router {
        let ops = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(self.clone());
        let ops = match metrics {
            Some(handle) => ops.route("/metrics", get(move || std::future::ready(handle.render()))),
            None => ops,
        };
        ops.merge(crate::api::router(self.clone()))
    }

    /// Serves HTTP on the configured address until `shutdown` resolves.
    pub async fn serve(
        &self,
        metrics: Option<PrometheusHandle>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.config.listen)
            .await
            .with_context(|| format!("listen on {}", self.config.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "control plane serving");
        println!("serving on http://{addr}");
        axum::serve(listener, self.router(metrics)).with_graceful_shutdown(shutdown).await.context("serve HTTP")
    }
}

/// Installs the Prometheus recorder (once per process).
pub fn metrics_install() -> anyhow::Result<PrometheusHandle> {
    PrometheusBuilder::new().install_recorder().context("install the metrics recorder")
}

async fn readyz(State(app): State<App>) -> impl IntoResponse {
    if !app.db.ping().await {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: PostgreSQL does not answer\n");
    }
    if app.link.get().is_none() {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: the data plane has not been reached\n");
    }
    (StatusCode::OK, "ready\n")
}
