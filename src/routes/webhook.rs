//! `POST {server.path}`: the checks of SPEC §3 in their fixed order (path, method, client IP,
//! Basic credentials, body size, media type, decoding, `api_key`, validation, publishing),
//! each refusal rendered by [`ApiError`]. Nothing is published unless every check passed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::Semaphore;
use tracing::Instrument;
use warp::filters::path::FullPath;
use warp::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::Filter;

use super::error::{json_response, ApiError};
use crate::auth::Auth;
use crate::deliver::{Delivery, DeliveryReport};
use crate::metrics;
use crate::server::RequestInfo;
use crate::subject::SubjectTemplate;
use crate::{telemetry, webhook};

/// What the webhook route needs, built once at start-up.
pub struct WebhookState {
    /// The only path that accepts webhooks.
    pub path: String,
    pub max_body_bytes: u64,
    pub template: SubjectTemplate,
    /// `validation.dead_letter_subject` in dead-letter mode; `None`: all-or-nothing.
    pub dead_letter: Option<SubjectTemplate>,
    /// `cmc.timezone`: adds `created_at` to bodies when set.
    pub timezone: Option<jiff::tz::TimeZone>,
    pub auth: Auth,
    pub delivery: Delivery,
    /// Permits for `server.max_in_flight`; a request that finds none is answered 503 at once.
    pub in_flight: Arc<Semaphore>,
    /// `Retry-After` of 503 answers.
    pub retry_after: Duration,
}

#[derive(Serialize)]
struct OkBody {
    result: &'static str,
    published: usize,
    #[serde(skip_serializing_if = "is_zero")]
    spooled: usize,
    #[serde(skip_serializing_if = "is_zero")]
    duplicates: usize,
    /// Entries sent to the dead-letter subject (dead-letter mode).
    #[serde(skip_serializing_if = "is_zero")]
    invalid: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The webhook route; it answers every request, so it never rejects.
pub fn routes(
    state: Arc<WebhookState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path::full()
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<RequestInfo>())
        .and(warp::body::stream())
        .and(warp::any().map(move || state.clone()))
        .then(handle)
}

async fn handle<S, B>(
    path: FullPath,
    method: Method,
    headers: HeaderMap,
    info: Option<RequestInfo>,
    body: S,
    state: Arc<WebhookState>,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let started = Instant::now();
    let batch_id = uuid::Uuid::new_v4().to_string();
    let span = tracing::info_span!(
        "webhook",
        batch_id = %batch_id,
        trace_id = tracing::field::Empty,
        traceparent = tracing::field::Empty
    );
    // One traceparent per request, carried by every message of its batch.
    let trace = telemetry::request_trace(
        &span,
        headers.get_all("traceparent").iter().map(|v| v.as_bytes()),
    );
    let traceparent = trace.to_string();
    span.record("trace_id", trace.trace_id_hex());
    span.record("traceparent", traceparent.as_str());
    let ids = RequestIds {
        batch_id: &batch_id,
        traceparent: &traceparent,
    };
    let result = process(&path, &method, &headers, info, body, &state, ids)
        .instrument(span.clone())
        .await;
    let _entered = span.enter();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut response = match result {
        Ok((events, invalid, report)) => {
            metrics::request(200);
            tracing::info!(
                status = 200,
                events,
                invalid,
                published = report.published,
                spooled = report.spooled,
                duplicates = report.duplicates,
                elapsed_ms,
                "batch accepted"
            );
            json_response(
                StatusCode::OK,
                &OkBody {
                    result: "ok",
                    published: report.published,
                    spooled: report.spooled,
                    duplicates: report.duplicates,
                    invalid,
                },
            )
        }
        Err(error) => {
            let (status, code) = error.status();
            metrics::request(status.as_u16());
            if status.is_server_error() {
                tracing::warn!(status = status.as_u16(), error = code, reason = ?error, elapsed_ms, "request refused");
            } else {
                tracing::info!(
                    status = status.as_u16(),
                    error = code,
                    elapsed_ms,
                    "request refused"
                );
            }
            error.into_response()
        }
    };
    if let Ok(value) = HeaderValue::from_str(&batch_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// What identifies one request on the bus: `Cmc-Batch-Id` and the batch's `traceparent`.
#[derive(Clone, Copy)]
struct RequestIds<'a> {
    batch_id: &'a str,
    traceparent: &'a str,
}

async fn process<S, B>(
    path: &FullPath,
    method: &Method,
    headers: &HeaderMap,
    info: Option<RequestInfo>,
    body: S,
    state: &WebhookState,
    ids: RequestIds<'_>,
) -> Result<(usize, usize, DeliveryReport), ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    if path.as_str() != state.path {
        return Err(ApiError::NotFound);
    }
    if method != Method::POST {
        return Err(ApiError::MethodNotAllowed);
    }
    state.auth.check_client(info.map(|i| i.peer), headers)?;
    state.auth.check_basic(headers)?;
    let _permit = state
        .in_flight
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Busy {
            retry_after: state.retry_after,
        })?;
    let read = read_body(headers, body, state.max_body_bytes);
    let body = match info {
        // The connection's deadline: a client trickling its body cannot hold it longer.
        Some(info) => tokio::time::timeout_at(info.deadline.into(), read)
            .await
            .map_err(|_| ApiError::RequestTimeout)??,
        None => read.await?,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not ASCII)"));
    let decoded = webhook::decode(content_type, &body).map_err(ApiError::Payload)?;
    state.auth.check_api_key(decoded.api_key())?;
    let mode = match state.dead_letter {
        Some(_) => webhook::InvalidEntries::DeadLetter,
        None => webhook::InvalidEntries::Reject,
    };
    let batch = decoded.validate_with(mode).map_err(ApiError::Payload)?;
    drop(body);
    let render = webhook::Render {
        template: &state.template,
        dead_letter: state.dead_letter.as_ref(),
        zone: state.timezone.as_ref(),
        traceparent: ids.traceparent,
    };
    let outgoing = batch
        .render(&render, ids.batch_id)
        .map_err(ApiError::Payload)?;
    metrics::created_unparsed(outgoing.created_unparsed);
    let events = outgoing.messages.len();
    let started = Instant::now();
    let report = state
        .delivery
        .deliver(&outgoing)
        .await
        .map_err(|error| ApiError::Delivery {
            error,
            retry_after: state.retry_after,
        })?;
    metrics::batch_accepted(
        &outgoing,
        report.published,
        report.duplicates,
        started.elapsed(),
    );
    Ok((events, outgoing.invalid, report))
}

/// Reads the body up to `limit` bytes, refusing early when `Content-Length` already says it
/// is larger; a chunked body is counted as it arrives and cut off at the limit.
async fn read_body<S, B>(headers: &HeaderMap, body: S, limit: u64) -> Result<BytesMut, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(8 * 1024).min(limit) as usize);
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| ApiError::BodyUnreadable(e.to_string()))?;
        if (buf.len() + chunk.remaining()) as u64 > limit {
            return Err(ApiError::BodyTooLarge { limit });
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            let n = part.len();
            buf.extend_from_slice(part);
            chunk.advance(n);
        }
    }
    Ok(buf)
}
