//! Prometheus metrics of the controller, and the small HTTP server for `/metrics`, `/healthz`
//! and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub namespace: String,
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub namespace: String,
    pub pool: String,
    /// `running` (consuming) or `draining` (finishing its message before it exits).
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: String,
}

pub struct Metrics {
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub pools: Gauge,
    pub workers: Family<WorkerLabels, Gauge>,
    pub rollouts_in_progress: Family<PoolLabels, Gauge>,
    pub rollout_duration: Histogram,
    pub drain_timeouts: Family<PoolLabels, Counter>,
    pub leader: Gauge,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("workerpool");
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register("reconciles", "Reconciles of WorkerPools, by result", reconciles.clone());
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register("reconcile_duration_seconds", "Time one reconcile took", reconcile_duration.clone());
        let pools = Gauge::default();
        registry.register("pools", "WorkerPools this controller manages", pools.clone());
        let workers = Family::<WorkerLabels, Gauge>::default();
        registry.register("workers", "Worker pods by state (running, draining)", workers.clone());
        let rollouts_in_progress = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "rollouts_in_progress",
            "1 while a pool is rolling out a new revision",
            rollouts_in_progress.clone(),
        );
        let rollout_duration = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register(
            "rollout_duration_seconds",
            "Time from a rollout's start to its completion",
            rollout_duration.clone(),
        );
        let drain_timeouts = Family::<PoolLabels, Counter>::default();
        registry.register(
            "drain_timeouts",
            "Workers deleted because they were still busy after drainTimeoutSeconds",
            drain_timeouts.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 when this replica holds the leader lease", leader.clone());
        Self {
            reconciles,
            reconcile_duration,
            pools,
            workers,
            rollouts_in_progress,
            rollout_duration,
            drain_timeouts,
            leader,
            registry,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

/// Health of the process, for the probes.
#[derive(Default)]
pub struct Health {
    /// Set once the API server answered and the CRD is installed.
    pub ready: AtomicBool,
}

#[derive(Clone)]
struct Shared {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends.
pub async fn serve(address: SocketAddr, metrics: Arc<Metrics>, health: Arc<Health>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(Shared { metrics, health });
    let listener = tokio::net::TcpListener::bind(address).await?;
    axum::serve(listener, app).await
}

async fn metrics_handler(State(shared): State<Shared>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], shared.metrics.encode())
}

async fn ready_handler(State(shared): State<Shared>) -> impl IntoResponse {
    if shared.health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_exposed() {
        let metrics = Metrics::default();
        let labels = PoolLabels { namespace: "ns".into(), pool: "p".into() };
        metrics.drain_timeouts.get_or_create(&labels).inc();
        metrics.reconciles.get_or_create(&ResultLabels { result: "ok".into() }).inc();
        let text = metrics.encode();
        for series in [
            "workerpool_reconciles_total",
            "workerpool_reconcile_duration_seconds",
            "workerpool_pools",
            "workerpool_drain_timeouts_total{namespace=\"ns\",pool=\"p\"} 1",
            "workerpool_rollout_duration_seconds",
            "workerpool_leader",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }
}
