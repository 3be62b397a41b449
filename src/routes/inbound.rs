//! `POST {inbound.path}`: CMC's Inbound webhook (SPEC §7). The checks run in SPEC §3's order
//! (path, method, client IP, Basic credentials, body size, media type, decoding, `api_key`,
//! validation), with the event webhook's auth and error rendering; then the mail's objects
//! are stored and its message published, or, when NATS cannot take it in time and the spool
//! is on, the whole mail is spooled. Nothing goes out unless every check passed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Buf;
use futures_util::Stream;
use serde::Serialize;
use tracing::Instrument;
use warp::filters::path::FullPath;
use warp::http::{header, HeaderMap, Method, StatusCode};
use warp::reply::Response;
use warp::Filter;

use super::error::{json_response, ApiError};
use crate::budget::Budget;
use crate::inbound::mail::{parse_form, parse_json, Mail};
use crate::inbound::receive::{self, WorkDir};
use crate::inbound::spool::{Appending, InboundSpool, InboundSpoolError};
use crate::inbound::store::{InboundSink, SinkError};
use crate::metrics;
use crate::server::RequestInfo;
use crate::webhook::PayloadError;

/// What the inbound route needs, built once at start-up.
pub struct InboundState {
    /// `inbound.path`.
    pub path: String,
    /// Shared with the event webhook: auth, the request limits (`inbound.max_body_bytes`
    /// among them), `server.max_in_flight`, `Retry-After`.
    pub gate: super::Gate,
    pub sink: Arc<InboundSink>,
    /// The inbound spool, when `spool.enabled`.
    pub spool: Option<Arc<InboundSpool>>,
    /// Where requests write their file parts: the spool's work area when the spool is on
    /// (spooling is then a rename), else a directory under the system's temporary one.
    pub work_root: PathBuf,
    /// Shared with the event webhook: `server.max_in_flight_bytes`.
    pub budget: Budget,
}

#[derive(Serialize)]
struct OkBody {
    result: &'static str,
    published: usize,
    attachments: usize,
    #[serde(skip_serializing_if = "is_zero")]
    spooled: usize,
    #[serde(skip_serializing_if = "is_zero")]
    duplicates: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The inbound route: it rejects (so the event webhook answers) every other path.
pub fn routes(
    state: Arc<InboundState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let path = state.path.clone();
    warp::path::full()
        .and_then(move |p: FullPath| {
            let matches = p.as_str() == path;
            async move {
                if matches {
                    Ok(())
                } else {
                    Err(warp::reject::not_found())
                }
            }
        })
        .untuple_one()
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<RequestInfo>())
        .and(warp::body::stream())
        .and(warp::any().map(move || state.clone()))
        .then(handle)
}

struct Accepted {
    attachments: usize,
    published: usize,
    spooled: usize,
    duplicates: usize,
}

async fn handle<S, B>(
    method: Method,
    headers: HeaderMap,
    info: Option<RequestInfo>,
    body: S,
    state: Arc<InboundState>,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: Buf + 'static,
{
    let started = Instant::now();
    let batch_id = uuid::Uuid::new_v4().to_string();
    let span = tracing::info_span!("inbound", batch_id = %batch_id);
    let result = process(&method, &headers, info, body, &state, &batch_id)
        .instrument(span.clone())
        .await;
    let _entered = span.enter();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let response = match result {
        Ok(ok) => {
            metrics::request(200);
            tracing::info!(
                status = 200,
                attachments = ok.attachments,
                published = ok.published,
                spooled = ok.spooled,
                duplicates = ok.duplicates,
                elapsed_ms,
                "inbound mail accepted"
            );
            json_response(
                StatusCode::OK,
                &OkBody {
                    result: "ok",
                    published: ok.published,
                    attachments: ok.attachments,
                    spooled: ok.spooled,
                    duplicates: ok.duplicates,
                },
            )
        }
        Err(error) => {
            let (status, code) = error.status();
            metrics::inbound_mail("rejected");
            super::record_refusal("inbound mail", status, code, &error, elapsed_ms);
            error.into_response()
        }
    };
    super::with_request_id(response, &batch_id)
}

/// What an inbound request may hold in memory, reserved from `server.max_in_flight_bytes`
/// before its body is read: a JSON or form body is read whole (its declared length, or the
/// cap when none is declared); a multipart body keeps only its text parameters in memory
/// (file parts and large bodies stream to disk), at most [`receive::MAX_FIELDS_BYTES`] plus
/// one part's read buffer.
fn memory_reserved(media: &str, declared: Option<u64>, limit: u64) -> u64 {
    let whole = declared.unwrap_or(limit).min(limit);
    match media {
        "multipart/form-data" => whole.min(receive::MAX_FIELDS_BYTES as u64 + 256 * 1024),
        _ => whole,
    }
}

async fn process<S, B>(
    method: &Method,
    headers: &HeaderMap,
    info: Option<RequestInfo>,
    body: S,
    state: &InboundState,
    batch_id: &str,
) -> Result<Accepted, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: Buf + 'static,
{
    let admitted = state.gate.admit(method, headers, info.as_ref())?;
    let policy = &admitted.policy;
    let limit = policy.inbound_max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::BodyTooLarge {
            key: "inbound.max_body_bytes",
            limit,
        });
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not ASCII)"))
        .unwrap_or("");
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let _memory = state
        .budget
        .try_acquire(memory_reserved(&media, declared, limit))
        .map_err(|_| ApiError::OverBudget {
            retry_after: state.gate.retry_after,
        })?;

    let retry_after = state.gate.retry_after;
    // An unreadable body is reported with its encoding's code (JSON's, else the form's).
    let receiving = |json| move |e| ApiError::receiving(e, json, retry_after);
    let read = async {
        match media.as_str() {
            "multipart/form-data" => {
                let work = WorkDir::create(&state.work_root)
                    .map_err(|error| ApiError::Disk { error, retry_after })?;
                let received = receive::multipart(body, content_type, limit, &work)
                    .await
                    .map_err(receiving(false))?;
                Ok::<_, ApiError>((received.fields, Some(work)))
            }
            "application/json" => {
                let bytes = receive::read_all(body, declared, limit)
                    .await
                    .map_err(receiving(true))?;
                Ok((parse_json(&bytes).map_err(ApiError::Payload)?, None))
            }
            "application/x-www-form-urlencoded" => {
                let bytes = receive::read_all(body, declared, limit)
                    .await
                    .map_err(receiving(false))?;
                Ok((parse_form(&bytes).map_err(ApiError::Payload)?, None))
            }
            _ => Err(ApiError::Payload(PayloadError::UnsupportedMediaType(format!(
                "Content-Type {content_type:?} is not application/json, multipart/form-data or application/x-www-form-urlencoded"
            )))),
        }
    };
    let (fields, work) = match info {
        // The connection's deadline: a client trickling its body cannot hold it longer.
        Some(info) => tokio::time::timeout_at(info.deadline.into(), read)
            .await
            .map_err(|_| ApiError::RequestTimeout)??,
        None => read.await?,
    };
    metrics::api_key_request(policy.auth.check_api_key(fields.api_key().as_deref())?);
    let mail = fields.validate().map_err(ApiError::Payload)?;
    let attachments = mail.attachments.len();

    // Behind a non-empty spool, so mails keep their order.
    let behind_spool = state.spool.as_ref().is_some_and(|s| !s.is_empty());
    if !behind_spool {
        let dir = work
            .as_ref()
            .map(|w| w.path().to_owned())
            .unwrap_or_default();
        match state.sink.deliver(&mail, &dir, batch_id).await {
            Ok(sent) => {
                metrics::inbound_mail(if sent.duplicate {
                    "duplicate"
                } else {
                    "published"
                });
                metrics::inbound_attachments("uploaded", sent.uploaded, sent.uploaded_bytes);
                let skipped_bytes = mail.file_bytes().saturating_sub(sent.uploaded_bytes);
                metrics::inbound_attachments("already_stored", sent.already_stored, skipped_bytes);
                return Ok(Accepted {
                    attachments,
                    published: 1,
                    spooled: 0,
                    duplicates: usize::from(sent.duplicate),
                });
            }
            Err(e) if e.is_temporary() && state.spool.is_some() => {
                tracing::warn!(error = %e, "NATS cannot take the mail now; spooling it");
            }
            Err(e) => {
                if !e.is_temporary() {
                    tracing::error!(error = %e, "NATS refused the mail");
                }
                return Err(ApiError::Sink {
                    error: e,
                    retry_after,
                });
            }
        }
    }
    let Some(spool) = state.spool.clone() else {
        return Err(ApiError::Sink {
            error: SinkError::Temporary("the spool is not enabled".into()),
            retry_after,
        });
    };
    // Queued from this moment, before any await: a mail arriving while this one's files
    // are synced goes behind it.
    let appending = spool.begin_append();
    spool_mail(spool, appending, work, mail, batch_id.to_owned())
        .await
        .map_err(|error| ApiError::Spool { error, retry_after })?;
    Ok(Accepted {
        attachments,
        published: 0,
        spooled: 1,
        duplicates: 0,
    })
}

async fn spool_mail(
    spool: Arc<InboundSpool>,
    appending: Appending,
    work: Option<WorkDir>,
    mail: Mail,
    batch_id: String,
) -> Result<(), InboundSpoolError> {
    let files = mail.file_bytes();
    let count = mail.attachments.len();
    tokio::task::spawn_blocking(move || {
        let work = match work {
            Some(w) => w,
            None => WorkDir::create(spool.work_root())?,
        };
        let appended = spool.append(work, &mail, &batch_id);
        drop(appending);
        appended
    })
    .await
    .map_err(|e| InboundSpoolError::Io(std::io::Error::other(e.to_string())))??;
    metrics::inbound_mail("spooled");
    metrics::inbound_attachments("spooled", count, files);
    Ok(())
}
