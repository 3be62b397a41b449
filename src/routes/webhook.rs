//! `POST {server.path}`: the checks of SPEC §3 in their fixed order (path, method, client IP,
//! Basic credentials, body size, media type, decoding, `api_key`, validation, publishing),
//! each refusal rendered by [`ApiError`]. Nothing is published unless every check passed.
//!
//! Memory is bounded here (SPEC §1 "Limits on one request"): the body is read under
//! `server.max_body_bytes` (after decompression, for `gzip` and `deflate` bodies); its bytes
//! are reserved in the in-flight budget before it is decoded; the entries are counted on the
//! raw `event` text (by validation, in its nesting pass) and more than `server.max_entries` is
//! refused before any tree is built; body, decoded parameters and entry trees are dropped as
//! soon as the outgoing messages exist, and the budget then holds the batch's outgoing size
//! until it is answered.

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use tracing::Instrument;
use warp::filters::path::FullPath;
use warp::http::{header, HeaderMap, Method, StatusCode};
use warp::reply::Response;
use warp::Filter;

use super::error::{json_response, ApiError};
use crate::budget::{Budget, Reservation};
use crate::deliver::{Delivery, DeliveryReport};
use crate::metrics;
use crate::server::RequestInfo;
use crate::subject::SubjectTemplate;
use crate::{telemetry, webhook};

/// What the webhook route needs, built once at start-up.
pub struct WebhookState {
    /// The only path that accepts webhooks.
    pub path: String,
    pub template: SubjectTemplate,
    /// `validation.dead_letter_subject` in dead-letter mode; `None`: all-or-nothing.
    pub dead_letter: Option<SubjectTemplate>,
    /// `cmc.timezone`: adds `created_at` to bodies when set.
    pub timezone: Option<jiff::tz::TimeZone>,
    /// `nats.headers`.
    pub header_shape: webhook::HeaderShape,
    /// Auth, the request limits, `server.max_in_flight` and `Retry-After`, shared with the
    /// inbound route.
    pub gate: super::Gate,
    pub delivery: Delivery,
    /// `server.max_in_flight_bytes`, shared with every route holding request data.
    pub budget: Budget,
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
    let (body, body_end) = super::track_end(&headers, body);
    let result = process(&path, &method, &headers, info, body, &state, ids)
        .instrument(span.clone())
        .await;
    let _entered = span.enter();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let response = match result {
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
            super::record_refusal("request", status, code, &error, elapsed_ms);
            super::close_if_unread(error.into_response(), &body_end)
        }
    };
    super::with_request_id(response, &batch_id)
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
    let admitted = state.gate.admit(method, headers, info.as_ref())?;
    let policy = &admitted.policy;
    let coding = content_coding(headers)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not ASCII)"));
    let json = content_type.is_some_and(|t| {
        t.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("application/json")
    });
    // The body and the copy decoding makes of `event` are reserved in the byte budget as the
    // body arrives, before either exists in full: exactly twice the length Content-Length
    // announces, else in steps as a chunked body grows (never past twice the body limit); the
    // entry trees are short-lived and bounded by max_entries.
    let over_budget = |_| ApiError::OverBudget {
        retry_after: state.gate.retry_after,
    };
    let mut reserved = Reservation::up_to(2 * policy.max_body_bytes);
    let read = read_body(headers, body, policy.max_body_bytes, json, |n, known| {
        if known {
            reserved.grow_exactly(&state.budget, 2 * n)
        } else {
            reserved.grow_to(&state.budget, 2 * n)
        }
        .map_err(over_budget)
    });
    let body = match info {
        // The connection's deadline: a client trickling its body cannot hold it longer.
        Some(info) => tokio::time::timeout_at(info.deadline.into(), read)
            .await
            .map_err(|_| ApiError::RequestTimeout)??,
        None => read.await?,
    };
    // `reserved` covers twice the body as read (one reservation, grown as it arrived); a
    // compressed body's reservation grows to twice its plain text.
    let body = match coding {
        Coding::Identity => body,
        compressed => {
            let plain = decompress(compressed, &body, policy.max_body_bytes, json)?;
            drop(body);
            reserved
                .grow_exactly(&state.budget, 2 * plain.len() as u64)
                .map_err(over_budget)?;
            plain
        }
    };
    let decoded = webhook::decode(content_type, &body).map_err(ApiError::Payload)?;
    // Decoding copied what it keeps (`event` included): the body is no longer needed.
    drop(body);
    metrics::api_key_request(policy.auth.check_api_key(decoded.api_key())?);
    let mode = match state.dead_letter {
        Some(_) => webhook::InvalidEntries::DeadLetter,
        None => webhook::InvalidEntries::Reject,
    };
    let batch = decoded
        .validate_within(mode, policy.max_entries)
        .map_err(ApiError::Payload)?;
    let render = webhook::Render {
        template: &state.template,
        dead_letter: state.dead_letter.as_ref(),
        zone: state.timezone.as_ref(),
        traceparent: ids.traceparent,
        shape: state.header_shape,
    };
    let outgoing = batch
        .render(&render, ids.batch_id)
        .map_err(ApiError::Payload)?;
    drop(batch);
    drop(decoded);
    metrics::created_unparsed(outgoing.created_unparsed);
    let events = outgoing.messages.len();
    let invalid = outgoing.invalid;
    let bytes: usize = outgoing
        .messages
        .iter()
        .map(|m| outgoing.wire_size(m))
        .sum();
    // From here on the batch's outgoing size is what this request holds.
    drop(reserved);
    let permit = state
        .budget
        .try_acquire(bytes as u64)
        .map_err(over_budget)?;
    let started = Instant::now();
    // Counted before the batch moves into the pipeline.
    let counts = metrics::BatchCounts::of(&outgoing);
    let report = state
        .delivery
        .deliver(outgoing, permit)
        .await
        .map_err(|error| ApiError::Delivery {
            error,
            retry_after: state.gate.retry_after,
        })?;
    counts.accepted(report.published, report.duplicates, started.elapsed());
    Ok((events, invalid, report))
}

/// Reads the body up to `limit` bytes, refusing early when `Content-Length` already says it
/// is larger; a chunked body is counted as it arrives and cut off at the limit.
///
/// `reserve(n, known)` is called before the body grows to `n` bytes (`known`: `n` is the
/// whole length, announced by `Content-Length`), and refuses when the in-flight budget cannot
/// cover it.
async fn read_body<S, B>(
    headers: &HeaderMap,
    body: S,
    limit: u64,
    json: bool,
    mut reserve: impl FnMut(u64, bool) -> Result<(), ApiError>,
) -> Result<BytesMut, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::BodyTooLarge {
            key: "server.max_body_bytes",
            limit,
        });
    }
    let mut body = std::pin::pin!(body);
    if let Some(n) = declared {
        if let Err(refused) = reserve(n, true) {
            return Err(discard(body.as_mut(), limit, refused).await);
        }
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(8 * 1024).min(limit) as usize);
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| ApiError::BodyUnreadable {
            json,
            message: e.to_string(),
        })?;
        let grown = (buf.len() + chunk.remaining()) as u64;
        if grown > limit {
            return Err(ApiError::BodyTooLarge {
                key: "server.max_body_bytes",
                limit,
            });
        }
        if let Err(refused) = reserve(grown, declared.is_some()) {
            let read = buf.len() as u64 + chunk.remaining() as u64;
            drop(buf);
            return Err(discard(body.as_mut(), limit.saturating_sub(read), refused).await);
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

/// Reads and drops the rest of a body that is refused (503: the budget cannot hold it), so
/// the sender sees the answer instead of a broken pipe; keeps nothing, stops past `limit`.
async fn discard<S, B>(mut body: std::pin::Pin<&mut S>, limit: u64, refused: ApiError) -> ApiError
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut read = 0u64;
    while let Some(Ok(chunk)) = body.next().await {
        read += chunk.remaining() as u64;
        if read > limit {
            break;
        }
    }
    refused
}

/// A `Content-Encoding` the service decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Identity,
    Gzip,
    Deflate,
}

/// The body's `Content-Encoding`: none, `identity`, `gzip` (or `x-gzip`) or `deflate`; any
/// other coding, or several, is refused with 415 naming it.
fn content_coding(headers: &HeaderMap) -> Result<Coding, ApiError> {
    let mut codings = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("(not ASCII)").split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"));
    let Some(first) = codings.next() else {
        return Ok(Coding::Identity);
    };
    if let Some(second) = codings.next() {
        return Err(ApiError::UnsupportedEncoding(format!("{first}, {second}")));
    }
    if first.eq_ignore_ascii_case("gzip") || first.eq_ignore_ascii_case("x-gzip") {
        Ok(Coding::Gzip)
    } else if first.eq_ignore_ascii_case("deflate") {
        Ok(Coding::Deflate)
    } else {
        Err(ApiError::UnsupportedEncoding(
            first.chars().take(100).collect(),
        ))
    }
}

/// Decompresses `body`, refusing (413) as soon as the output passes `limit`: a
/// decompression bomb stops at the cap, having cost at most `limit` bytes.
fn decompress(coding: Coding, body: &[u8], limit: u64, json: bool) -> Result<BytesMut, ApiError> {
    use flate2::read::{DeflateDecoder, GzDecoder, ZlibDecoder};
    let reader: Box<dyn Read + '_> = match coding {
        Coding::Identity => return Ok(BytesMut::from(body)),
        Coding::Gzip => Box::new(GzDecoder::new(body)),
        // RFC 9110's "deflate" is the zlib format; some clients send raw deflate, told apart
        // by the zlib header check (CM = 8, header a multiple of 31).
        Coding::Deflate
            if body.len() >= 2
                && body[0] & 0x0f == 8
                && (u16::from(body[0]) << 8 | u16::from(body[1])) % 31 == 0 =>
        {
            Box::new(ZlibDecoder::new(body))
        }
        Coding::Deflate => Box::new(DeflateDecoder::new(body)),
    };
    let mut out = Vec::with_capacity((body.len() * 4).min(limit as usize));
    reader
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| ApiError::BodyUnreadable {
            json,
            message: format!("cannot decompress the body: {e}"),
        })?;
    if out.len() as u64 > limit {
        return Err(ApiError::BodyTooLarge {
            key: "server.max_body_bytes",
            limit,
        });
    }
    Ok(BytesMut::from(&out[..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use warp::http::HeaderValue;

    fn headers(coding: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_str(coding).unwrap(),
        );
        h
    }

    #[test]
    fn content_codings() {
        assert_eq!(content_coding(&HeaderMap::new()).unwrap(), Coding::Identity);
        assert_eq!(
            content_coding(&headers("identity")).unwrap(),
            Coding::Identity
        );
        assert_eq!(content_coding(&headers("GZIP")).unwrap(), Coding::Gzip);
        assert_eq!(
            content_coding(&headers("deflate")).unwrap(),
            Coding::Deflate
        );
        let err = content_coding(&headers("br")).unwrap_err();
        assert_eq!(err.status().0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(err.into_response().status() == StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(content_coding(&headers("gzip, gzip")).is_err());
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_cap() {
        use flate2::write::GzEncoder;
        use std::io::Write;
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![b'a'; 8 << 20]).unwrap();
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 64 << 10);
        let err = decompress(Coding::Gzip, &bomb, 1 << 20, true).unwrap_err();
        assert!(matches!(err, ApiError::BodyTooLarge { .. }));
        let ok = decompress(Coding::Gzip, &bomb, 8 << 20, true).unwrap();
        assert_eq!(ok.len(), 8 << 20);
        // zlib and raw deflate are both accepted as "deflate".
        for raw in [false, true] {
            let data = if raw {
                let mut e = flate2::write::DeflateEncoder::new(Vec::new(), Default::default());
                e.write_all(b"{}").unwrap();
                e.finish().unwrap()
            } else {
                let mut e = flate2::write::ZlibEncoder::new(Vec::new(), Default::default());
                e.write_all(b"{}").unwrap();
                e.finish().unwrap()
            };
            assert_eq!(
                &decompress(Coding::Deflate, &data, 100, true).unwrap()[..],
                b"{}"
            );
        }
        let garbage = decompress(Coding::Gzip, b"not gzip", 100, true).unwrap_err();
        assert_eq!(garbage.status().1, "malformed_json");
    }
}
