//! `POST {inbound.path}`: CMC's Inbound webhook (SPEC §7). The checks run in SPEC §3's order
//! (path, method, client IP, Basic credentials, body size, media type, decoding, `api_key`,
//! validation), with the event webhook's auth and error rendering; then the mail's objects
//! are stored and its message published, or, when NATS cannot take it in time and the spool
//! is on, the whole mail is spooled. Nothing goes out unless every check passed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Buf;
use futures_util::Stream;
use serde::Serialize;
use tracing::Instrument;
use warp::filters::path::FullPath;
use warp::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::Filter;

use super::error::{json_response, ApiError};
use crate::budget::Budget;
use crate::inbound::mail::{parse_form, parse_json, Mail};
use crate::inbound::receive::{self, ReceiveError, WorkDir};
use crate::inbound::spool::{InboundSpool, InboundSpoolError};
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

/// Everything the inbound route can refuse a request for, beyond [`ApiError`].
#[derive(Debug)]
enum Refusal {
    Api(ApiError),
    Receive(ReceiveError),
    Sink(SinkError),
    Spool(InboundSpoolError),
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Refusal::Api(e)
    }
}

impl From<crate::auth::AuthError> for Refusal {
    fn from(e: crate::auth::AuthError) -> Self {
        Refusal::Api(ApiError::Auth(e))
    }
}

impl From<PayloadError> for Refusal {
    fn from(e: PayloadError) -> Self {
        Refusal::Api(ApiError::Payload(e))
    }
}

impl From<ReceiveError> for Refusal {
    fn from(e: ReceiveError) -> Self {
        match e {
            ReceiveError::Payload(p) => Refusal::Api(ApiError::Payload(p)),
            ReceiveError::Unreadable(message) => Refusal::Api(ApiError::BodyUnreadable {
                json: false,
                message,
            }),
            other => Refusal::Receive(other),
        }
    }
}

impl Refusal {
    fn status(&self) -> (StatusCode, &'static str) {
        match self {
            Refusal::Api(e) => e.status(),
            Refusal::Receive(
                ReceiveError::BodyTooLarge { .. } | ReceiveError::FieldTooLarge(_),
            )
            | Refusal::Sink(SinkError::TooLarge(_)) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            Refusal::Receive(_) | Refusal::Sink(_) | Refusal::Spool(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
        }
    }

    fn into_response(self, retry_after: Duration) -> Response {
        let (status, code) = self.status();
        let message = match self {
            Refusal::Api(e) => return e.into_response(),
            Refusal::Receive(ReceiveError::Disk(e)) => {
                format!("cannot keep the attachments on disk: {e}")
            }
            Refusal::Receive(e) => e.to_string(),
            Refusal::Sink(SinkError::TooLarge(e)) => e.to_string(),
            Refusal::Sink(e) => format!("NATS cannot take the mail: {e}"),
            Refusal::Spool(e) => format!("the mail could not be spooled: {e}"),
        };
        let mut response = json_response(
            status,
            &serde_json::json!({"result": "error", "error": code, "message": message}),
        );
        let headers = response.headers_mut();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after.as_secs().max(1)),
            );
        }
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body may be unread: the connection cannot be reused.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
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
        Err(refusal) => {
            let (status, code) = refusal.status();
            metrics::inbound_mail("rejected");
            super::record_refusal("inbound mail", status, code, &refusal, elapsed_ms);
            refusal.into_response(state.gate.retry_after)
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
) -> Result<Accepted, Refusal>
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
        return Err(Refusal::Receive(ReceiveError::BodyTooLarge { limit }));
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
        .map_err(|_| ApiError::Busy {
            retry_after: state.gate.retry_after,
        })?;

    let read = async {
        match media.as_str() {
            "multipart/form-data" => {
                let work = WorkDir::create(&state.work_root).map_err(ReceiveError::Disk)?;
                let received = receive::multipart(body, content_type, limit, &work).await?;
                Ok::<_, Refusal>((received.fields, Some(work)))
            }
            "application/json" => {
                // An unreadable body is reported with the JSON encoding's code.
                let bytes = receive::read_all(body, declared, limit)
                    .await
                    .map_err(|e| match e {
                        ReceiveError::Unreadable(message) => {
                            Refusal::Api(ApiError::BodyUnreadable {
                                json: true,
                                message,
                            })
                        }
                        other => other.into(),
                    })?;
                Ok((parse_json(&bytes)?, None))
            }
            "application/x-www-form-urlencoded" => {
                let bytes = receive::read_all(body, declared, limit).await?;
                Ok((parse_form(&bytes)?, None))
            }
            _ => Err(PayloadError::UnsupportedMediaType(format!(
                "Content-Type {content_type:?} is not application/json, multipart/form-data or application/x-www-form-urlencoded"
            ))
            .into()),
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
    let mail = fields.validate()?;
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
                return Err(Refusal::Sink(e));
            }
        }
    }
    let Some(spool) = state.spool.clone() else {
        return Err(Refusal::Sink(SinkError::Temporary(
            "the spool is not enabled".into(),
        )));
    };
    spool_mail(spool, work, mail, batch_id.to_owned()).await?;
    Ok(Accepted {
        attachments,
        published: 0,
        spooled: 1,
        duplicates: 0,
    })
}

async fn spool_mail(
    spool: Arc<InboundSpool>,
    work: Option<WorkDir>,
    mail: Mail,
    batch_id: String,
) -> Result<(), Refusal> {
    let files = mail.file_bytes();
    let count = mail.attachments.len();
    tokio::task::spawn_blocking(move || {
        let work = match work {
            Some(w) => w,
            None => WorkDir::create(spool.work_root())?,
        };
        spool.append(work, &mail, &batch_id)
    })
    .await
    .map_err(|e| Refusal::Spool(InboundSpoolError::Io(std::io::Error::other(e.to_string()))))?
    .map_err(Refusal::Spool)?;
    metrics::inbound_mail("spooled");
    metrics::inbound_attachments("spooled", count, files);
    Ok(())
}
