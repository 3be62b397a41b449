//! HTTP routes: the public webhooks (events and inbound mail) and the admin endpoints, as warp
//! filters. The error rendering shared by all lives in [`error`]; the checks both public routes
//! run first, in SPEC §3's order, live in [`admit`].

pub mod admin;
pub mod error;
pub mod inbound;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use warp::http::{HeaderMap, Method};

use crate::auth::Auth;
use crate::server::RequestInfo;
use error::ApiError;

/// The checks every public webhook runs before it reads a byte of the body, in SPEC §3's
/// order: method, client IP, Basic credentials, then a slot of `server.max_in_flight` (held
/// until the request is answered; none free is `503` at once).
pub fn admit(
    method: &Method,
    headers: &HeaderMap,
    info: Option<&RequestInfo>,
    auth: &Auth,
    in_flight: &Arc<Semaphore>,
    retry_after: Duration,
) -> Result<OwnedSemaphorePermit, ApiError> {
    if method != Method::POST {
        return Err(ApiError::MethodNotAllowed);
    }
    auth.check_client(info.map(|i| i.peer), headers)?;
    auth.check_basic(headers)?;
    in_flight
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Busy { retry_after })
}
