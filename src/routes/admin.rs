//! The admin listener: `/healthz` (alive), `/readyz` (publishing now). Kept off the public
//! port so probes and scrapes never mix with webhook traffic.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Filter;

use super::error::json_response;
use crate::publish::Publisher;

/// The admin routes.
pub fn routes(
    publisher: Publisher,
    shutting_down: Arc<AtomicBool>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| json_response(StatusCode::OK, &json!({"status": "ok"})));
    let readyz = warp::path!("readyz").and(warp::get()).map(move || {
        let reason = if shutting_down.load(Ordering::Acquire) {
            Some("shutting down")
        } else {
            publisher.not_ready_reason()
        };
        match reason {
            None => json_response(StatusCode::OK, &json!({"status": "ready"})),
            Some(reason) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "not_ready", "reason": reason}),
            ),
        }
    });
    healthz
        .or(readyz)
        .unify()
        .or(warp::any().map(|| {
            json_response(
                StatusCode::NOT_FOUND,
                &json!({"result": "error", "error": "not_found", "message": "no such path"}),
            )
        }))
        .unify()
}
