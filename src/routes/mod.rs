//! HTTP routes: the public webhooks (events and inbound mail) and the admin endpoints, as warp
//! filters. The error rendering shared by all lives in [`error`]; the checks both public routes
//! run first, in SPEC §3's order, live in [`Gate`]; how both count and log a refusal, in
//! [`record_refusal`].

pub mod admin;
pub mod error;
pub mod inbound;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;

use crate::auth::Auth;
use crate::server::RequestInfo;
use error::ApiError;

/// The checks every public webhook runs before it reads a byte of the body, in SPEC §3's
/// order: method, client IP, Basic credentials, then a slot of `server.max_in_flight` (held
/// until the request is answered; none free is `503` at once). One gate is shared by both
/// routes, built once at start-up.
#[derive(Clone)]
pub struct Gate {
    pub auth: Auth,
    /// Permits for `server.max_in_flight`.
    pub in_flight: Arc<Semaphore>,
    /// `Retry-After` of 503 answers.
    pub retry_after: Duration,
}

impl Gate {
    pub fn admit(
        &self,
        method: &Method,
        headers: &HeaderMap,
        info: Option<&RequestInfo>,
    ) -> Result<OwnedSemaphorePermit, ApiError> {
        if method != Method::POST {
            return Err(ApiError::MethodNotAllowed);
        }
        self.auth.check_client(info.map(|i| i.peer), headers)?;
        self.auth.check_basic(headers)?;
        self.in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Busy {
                retry_after: self.retry_after,
            })
    }
}

/// Counts and logs a refused request (`what`: "request", "inbound mail"). A refusal of the
/// service's own making (5xx) is a warning with its reason; a sender's mistake is information,
/// by its error code only, so that what a sender posted is not echoed into the log.
pub fn record_refusal(
    what: &str,
    status: StatusCode,
    code: &str,
    reason: &dyn std::fmt::Debug,
    elapsed_ms: f64,
) {
    crate::metrics::request(status.as_u16());
    if status.is_server_error() {
        tracing::warn!(status = status.as_u16(), error = code, reason = ?reason, elapsed_ms, "{what} refused");
    } else {
        tracing::info!(
            status = status.as_u16(),
            error = code,
            elapsed_ms,
            "{what} refused"
        );
    }
}

/// The response with the request's batch id as `X-Request-Id`, so that a sender's log and the
/// service's (and the bus's `Cmc-Batch-Id`) meet.
pub fn with_request_id(mut response: Response, batch_id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(batch_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}
