//! HTTP routes: the public webhooks (events and inbound mail) and the admin endpoints, as warp
//! filters. The error rendering shared by all lives in [`error`]; the checks both public routes
//! run first, in SPEC §3's order, live in [`Gate`], which also holds the settings a
//! configuration reload replaces ([`RequestPolicy`]); how both count and log a refusal, in
//! [`record_refusal`].

pub mod admin;
pub mod error;
pub mod inbound;
pub mod webhook;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use warp::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;

use crate::auth::Auth;
use crate::server::RequestInfo;
use crate::settings::Settings;
use error::ApiError;

/// The settings a public request runs under that a configuration reload may replace:
/// `[auth]` and the request limits. A request takes them once, when it is admitted, and keeps
/// them to its answer, so a reload never changes the rules in the middle of one.
pub struct RequestPolicy {
    pub auth: Auth,
    /// Permits for `server.max_in_flight`. A reload that changes the limit brings a new
    /// semaphore: requests admitted before it hold the old one's permits until answered.
    in_flight: Arc<Semaphore>,
    /// `server.max_in_flight`: the size `in_flight` was made with.
    max_in_flight: usize,
    /// `server.max_body_bytes`.
    pub max_body_bytes: u64,
    /// `server.max_entries`.
    pub max_entries: usize,
    /// `inbound.max_body_bytes`.
    pub inbound_max_body_bytes: u64,
}

impl RequestPolicy {
    /// The policy of `settings`, taking over `previous`'s in-flight count when the limit is
    /// unchanged.
    fn new(settings: &Settings, previous: Option<&RequestPolicy>) -> RequestPolicy {
        let limit = settings.server.max_in_flight;
        let in_flight = match previous {
            Some(p) if p.max_in_flight == limit => p.in_flight.clone(),
            _ => Arc::new(Semaphore::new(limit)),
        };
        let auth = Auth::from_settings(&settings.auth);
        crate::metrics::api_keys_configured(auth.api_keys());
        RequestPolicy {
            auth,
            in_flight,
            max_in_flight: limit,
            max_body_bytes: settings.server.max_body_bytes,
            max_entries: settings.server.max_entries,
            inbound_max_body_bytes: settings.inbound.max_body_bytes,
        }
    }
}

/// The checks every public webhook runs before it reads a byte of the body, in SPEC §3's
/// order: method, client IP, Basic credentials, then a slot of `server.max_in_flight` (held
/// until the request is answered; none free is `503` at once). One gate is shared by both
/// routes, built once at start-up; its [`RequestPolicy`] is swapped whole by a reload.
#[derive(Clone)]
pub struct Gate {
    policy: Arc<ArcSwap<RequestPolicy>>,
    /// `Retry-After` of 503 answers.
    pub retry_after: Duration,
}

/// An admitted request: the policy it runs under and its `server.max_in_flight` slot.
pub struct Admitted {
    pub policy: Arc<RequestPolicy>,
    _slot: OwnedSemaphorePermit,
}

impl Gate {
    pub fn new(settings: &Settings, retry_after: Duration) -> Gate {
        Gate {
            policy: Arc::new(ArcSwap::from_pointee(RequestPolicy::new(settings, None))),
            retry_after,
        }
    }

    /// The policy requests admitted from now on run under.
    pub fn policy(&self) -> Arc<RequestPolicy> {
        self.policy.load_full()
    }

    /// Makes `settings`' policy the one of every request admitted from now on.
    pub fn replace(&self, settings: &Settings) {
        let previous = self.policy.load();
        self.policy
            .store(Arc::new(RequestPolicy::new(settings, Some(&previous))));
    }

    pub fn admit(
        &self,
        method: &Method,
        headers: &HeaderMap,
        info: Option<&RequestInfo>,
    ) -> Result<Admitted, ApiError> {
        if method != Method::POST {
            return Err(ApiError::MethodNotAllowed);
        }
        let policy = self.policy();
        policy.auth.check_client(info.map(|i| i.peer), headers)?;
        policy.auth.check_basic(headers)?;
        let slot = policy
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Busy {
                retry_after: self.retry_after,
            })?;
        Ok(Admitted {
            policy,
            _slot: slot,
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

/// Whether a request's body has been read to its end, for [`close_if_unread`].
#[derive(Clone)]
pub struct BodyEnd {
    reached: Arc<AtomicBool>,
    /// The request has a body at all (`Content-Length` above 0, or chunked).
    announced: bool,
}

/// `body`, noting in the returned [`BodyEnd`] when its end is reached.
pub fn track_end<S, B>(
    headers: &HeaderMap,
    body: S,
) -> (impl Stream<Item = Result<B, warp::Error>>, BodyEnd)
where
    S: Stream<Item = Result<B, warp::Error>>,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let announced =
        headers.contains_key(header::TRANSFER_ENCODING) || declared.is_some_and(|n| n > 0);
    let reached = Arc::new(AtomicBool::new(false));
    let end = BodyEnd {
        reached: reached.clone(),
        announced,
    };
    let tracked = body.chain(futures_util::stream::poll_fn(move |_| {
        reached.store(true, Ordering::Relaxed);
        std::task::Poll::Ready(None)
    }));
    (tracked, end)
}

/// A refusal sent before its request's body was read (413, 401, 415, 503…) says
/// `Connection: close`: the rest of the body is not worth reading as a next request, and the
/// listener then closes the connection lingering (it reads and drops what the client still
/// sends, within bounds: [`crate::server::LINGER_BYTES`], [`crate::server::LINGER_TIME`]), so
/// a client that writes its whole body before it reads gets the answer, not a reset.
pub fn close_if_unread(mut response: Response, end: &BodyEnd) -> Response {
    if end.announced && !end.reached.load(Ordering::Relaxed) && !response.status().is_success() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The response with the request's batch id as `X-Request-Id`, so that a sender's log and the
/// service's (and the bus's `Cmc-Batch-Id`) meet.
pub fn with_request_id(mut response: Response, batch_id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(batch_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(api_key: &str, max_in_flight: usize) -> Settings {
        Settings::from_toml(&format!(
            "[auth]\napi_key = {api_key:?}\n[server]\nmax_in_flight = {max_in_flight}"
        ))
        .unwrap()
    }

    fn admit(gate: &Gate) -> Result<Admitted, ApiError> {
        gate.admit(&Method::POST, &HeaderMap::new(), None)
    }

    #[tokio::test]
    async fn only_a_refusal_sent_before_the_body_was_read_says_connection_close() {
        let refusal = || ApiError::MethodNotAllowed.into_response();
        let closes = |r: &Response| r.headers().get(header::CONNECTION).is_some();
        let body = || {
            futures_util::stream::iter(vec![Ok::<_, warp::Error>(bytes::Bytes::from_static(b"{}"))])
        };
        let mut announced = HeaderMap::new();
        announced.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));

        // Unread: the refusal closes; an answer of success never does.
        let (_unread, end) = track_end(&announced, body());
        assert!(closes(&close_if_unread(refusal(), &end)));
        let ok = warp::Reply::into_response(warp::reply());
        assert!(!closes(&close_if_unread(ok, &end)));
        // Read to its end: the connection can serve the next request.
        let (read, end) = track_end(&announced, body());
        assert_eq!(read.collect::<Vec<_>>().await.len(), 1);
        assert!(!closes(&close_if_unread(refusal(), &end)));
        // No body at all: nothing is left unread.
        let (_unread, end) = track_end(&HeaderMap::new(), body());
        assert!(!closes(&close_if_unread(refusal(), &end)));
    }

    #[test]
    fn a_replaced_policy_applies_from_the_next_admission_on() {
        let gate = Gate::new(&settings("a", 1), Duration::from_secs(1));
        let first = admit(&gate).unwrap();
        assert!(matches!(admit(&gate), Err(ApiError::Busy { .. })));
        gate.replace(&settings("b", 1));
        // The request admitted before keeps its policy; the limit, unchanged, still counts it.
        assert_eq!(first.policy.auth.check_api_key(Some("a")), Ok(Some(0)));
        assert!(matches!(admit(&gate), Err(ApiError::Busy { .. })));
        drop(first);
        let second = admit(&gate).unwrap();
        assert!(second.policy.auth.check_api_key(Some("a")).is_err());
        assert_eq!(second.policy.auth.check_api_key(Some("b")), Ok(Some(0)));
        // A new limit starts a count of its own; the request admitted before holds the old.
        gate.replace(&settings("b", 2));
        let third = admit(&gate).unwrap();
        let fourth = admit(&gate).unwrap();
        assert!(matches!(admit(&gate), Err(ApiError::Busy { .. })));
        drop((second, third, fourth));
    }
}
