//! The admin listener: `/healthz` (alive), `/readyz` (publishing now), `/metrics`
//! (Prometheus text). Kept off the public port so probes and scrapes never mix with webhook
//! traffic.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Filter;

use super::error::json_response;
use crate::metrics;
use crate::publish::Publisher;
use crate::spool::SpoolHandle;

/// What the admin routes look at.
#[derive(Clone)]
pub struct AdminState {
    pub publisher: Publisher,
    pub spool: Option<SpoolHandle>,
    /// Set as soon as shutdown begins: readiness turns false before the listener closes.
    pub shutting_down: Arc<AtomicBool>,
    pub metrics: PrometheusHandle,
}

impl AdminState {
    fn not_ready_reason(&self) -> Option<String> {
        if self.shutting_down.load(Ordering::Acquire) {
            Some("shutting down".into())
        } else {
            self.publisher.not_ready_reason()
        }
    }
}

/// The admin routes.
pub fn routes(
    state: AdminState,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| json_response(StatusCode::OK, &json!({"status": "ok"})));
    let ready_state = state.clone();
    let readyz =
        warp::path!("readyz")
            .and(warp::get())
            .map(move || match ready_state.not_ready_reason() {
                None => json_response(StatusCode::OK, &json!({"status": "ready"})),
                Some(reason) => json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "not_ready", "reason": reason}),
                ),
            });
    let metrics_route = warp::path!("metrics").and(warp::get()).map(move || {
        // Gauges that describe a state are read when scraped, so they are never stale.
        metrics::connection(
            state.publisher.is_connected(),
            state.not_ready_reason().is_none(),
        );
        if let Some(spool) = &state.spool {
            metrics::spool_depth(spool.stats().messages(), spool.stats().bytes());
            metrics::spool_quarantined(spool.stats().quarantined());
        }
        let mut response = Response::new(state.metrics.render().into());
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    });
    // Through `and_then` so the filter's error type is warp's `Rejection`, which the shared
    // accept loop (`server::serve`) takes; it never rejects.
    let not_found = warp::any().and_then(|| async {
        Ok::<_, warp::Rejection>(json_response(
            StatusCode::NOT_FOUND,
            &json!({"result": "error", "error": "not_found", "message": "no such path"}),
        ))
    });
    healthz
        .or(readyz)
        .unify()
        .or(metrics_route)
        .unify()
        .or(not_found)
        .unify()
}
