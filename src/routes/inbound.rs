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
use crate::deliver::{Delivery, MailTurn};
use crate::inbound::mail::{parse_form, parse_json};
use crate::inbound::receive::{self, WorkDir};
use crate::inbound::store::{InboundSink, SinkError};
use crate::metrics;
use crate::publish::{Publish, Publisher};
use crate::server::RequestInfo;
use crate::spool::{MailAppend, SpoolError, SpoolHandle};
use crate::webhook::PayloadError;

/// What the inbound route needs, built once at start-up.
pub struct InboundState<P: Publish = Arc<Publisher>> {
    /// `inbound.path`.
    pub path: String,
    /// Shared with the event webhook: auth, the request limits (`inbound.max_body_bytes`
    /// among them), `server.max_in_flight`, `Retry-After`.
    pub gate: super::Gate,
    pub sink: Arc<InboundSink<P>>,
    /// The spool (the event webhook's, one for both), when `spool.enabled`, and its
    /// directory.
    pub spool: Option<SpoolHandle>,
    pub spool_dir: PathBuf,
    /// `spool.max_bytes`: it bounds the spooled mails' files too.
    pub spool_max_bytes: u64,
    /// Where requests write their file parts: the spool's work area when the spool is on
    /// (spooling is then a rename), else a directory under the system's temporary one.
    pub work_root: PathBuf,
    /// Shared with the event webhook: `server.max_in_flight_bytes`.
    pub budget: Budget,
    /// Shared with the event webhook: the one delivery actor, which decides each mail's turn.
    pub delivery: Delivery,
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
pub fn routes<P: Publish>(
    state: Arc<InboundState<P>>,
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

async fn handle<S, B, P: Publish>(
    method: Method,
    headers: HeaderMap,
    info: Option<RequestInfo>,
    body: S,
    state: Arc<InboundState<P>>,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: Buf + 'static,
{
    let started = Instant::now();
    let batch_id = uuid::Uuid::new_v4().to_string();
    let span = tracing::info_span!("inbound", batch_id = %batch_id);
    let (body, body_end) = super::track_end(&headers, body);
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
            super::close_if_unread(error.into_response(), &body_end)
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

async fn process<S, B, P: Publish>(
    method: &Method,
    headers: &HeaderMap,
    info: Option<RequestInfo>,
    body: S,
    state: &InboundState<P>,
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

    let retry_after = state.gate.retry_after;
    let spool_error = |error| ApiError::Spool { error, retry_after };
    // The mail's directory (its files, and its record once spooled or retained): the
    // request's work directory, or a new one for a mail without file parts.
    let work = match work {
        Some(work) => work,
        None => WorkDir::create(&state.work_root).map_err(|e| spool_error(SpoolError::Io(e)))?,
    };
    let files = mail.file_bytes();
    let append = MailAppend {
        work: work.into_path(),
        spool_dir: state.spool_dir.clone(),
        mail_json: serde_json::to_vec(&mail).expect("a mail serializes"),
        batch_id: batch_id.to_owned(),
        reserved: files,
    };
    // The delivery actor decides, in arrival order with the event batches: behind a
    // non-empty spool, or now.
    let append = match &state.spool {
        None => append,
        Some(spool) => {
            if !spool.stats().reserve_inbound(files, state.spool_max_bytes) {
                return Err(spool_error(SpoolError::Full(state.spool_max_bytes)));
            }
            let turn = state.delivery.mail_turn(append).await;
            match turn {
                Ok(MailTurn::Spooled(written)) => {
                    let written = written.await.unwrap_or(Err(SpoolError::Stopped));
                    return spooled(spool, written, files, attachments).map_err(spool_error);
                }
                Ok(MailTurn::Direct(append)) => {
                    spool.stats().release_inbound(files);
                    append
                }
                Err(_) => {
                    spool.stats().release_inbound(files);
                    return Err(spool_error(SpoolError::Stopped));
                }
            }
        }
    };
    match state.sink.deliver(&mail, &append.work, batch_id).await {
        Ok(sent) => {
            // NATS acknowledged the mail and its objects before syncing them: keep the mail
            // on disk for `spool.retain`, to send again if NATS loses it.
            if let Some(spool) = state.spool.as_ref().filter(|s| s.retains()) {
                retain(state, spool, append).await?;
            }
            metrics::inbound_mail(if sent.duplicate {
                "duplicate"
            } else {
                "published"
            });
            metrics::inbound_attachments("uploaded", sent.uploaded, sent.uploaded_bytes);
            let skipped_bytes = mail.file_bytes().saturating_sub(sent.uploaded_bytes);
            metrics::inbound_attachments("already_stored", sent.already_stored, skipped_bytes);
            Ok(Accepted {
                attachments,
                published: 1,
                spooled: 0,
                duplicates: usize::from(sent.duplicate),
            })
        }
        Err(e) if e.is_temporary() && state.spool.is_some() => {
            tracing::warn!(error = %e, "NATS cannot take the mail now; spooling it");
            let spool = state.spool.as_ref().expect("checked above");
            if !spool.stats().reserve_inbound(files, state.spool_max_bytes) {
                return Err(spool_error(SpoolError::Full(state.spool_max_bytes)));
            }
            let written = state.delivery.spool_mail(append).await;
            spooled(spool, written, files, attachments).map_err(spool_error)
        }
        Err(e) => {
            if !e.is_temporary() {
                tracing::error!(error = %e, "NATS refused the mail");
            }
            let error = if state.spool.is_none() && e.is_temporary() {
                SinkError::Temporary(format!("{e}; the spool is not enabled"))
            } else {
                e
            };
            Err(ApiError::Sink { error, retry_after })
        }
    }
}

/// The answer for a mail handed to the spool: `written` is the writer's.
fn spooled(
    spool: &SpoolHandle,
    written: Result<(), SpoolError>,
    files: u64,
    attachments: usize,
) -> Result<Accepted, SpoolError> {
    if let Err(error) = written {
        spool.stats().release_inbound(files);
        return Err(error);
    }
    metrics::inbound_mail("spooled");
    metrics::inbound_attachments("spooled", attachments, files);
    Ok(Accepted {
        attachments,
        published: 0,
        spooled: 1,
        duplicates: 0,
    })
}

/// Keeps a mail published directly in the retained log, with its files: durably, before its
/// `200`. A disk that cannot take it gets `503` (the mail is on the bus; a retry is
/// de-duplicated).
async fn retain<P: Publish>(
    state: &InboundState<P>,
    spool: &SpoolHandle,
    append: MailAppend,
) -> Result<(), ApiError> {
    let retry_after = state.gate.retry_after;
    let files = append.reserved;
    if !spool.stats().reserve_inbound(files, state.spool_max_bytes) {
        return Err(ApiError::Spool {
            error: SpoolError::Full(state.spool_max_bytes),
            retry_after,
        });
    }
    let kept = spool
        .begin_retain(Box::new(append))
        .await
        .unwrap_or(Err(SpoolError::Stopped));
    if let Err(error) = kept {
        spool.stats().release_inbound(files);
        tracing::error!(%error, "cannot keep a published mail in the retained log");
        return Err(ApiError::Spool { error, retry_after });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::deliver::{self, DeliveryOptions, DrainError, DrainSummary, Mails};
    use crate::publish::fake::{FakePublisher, Step};
    use crate::settings::Settings;
    use crate::spool::{self, Spool};

    const TIMEOUT: Duration = Duration::from_millis(200);

    struct Fixture {
        fake: FakePublisher,
        state: Arc<InboundState<FakePublisher>>,
        root: tempfile::TempDir,
    }

    /// The route over the fake publisher, with the spool on or off.
    fn fixture(spooled: bool) -> Fixture {
        let root = tempfile::tempdir().unwrap();
        let settings = Settings::default();
        let fake = FakePublisher::new(TIMEOUT);
        let sink = Arc::new(InboundSink::with_publisher(&settings, fake.clone()));
        let spool = spooled
            .then(|| SpoolHandle::start(Spool::open(root.path(), 1 << 30).unwrap()).unwrap());
        let work_root = root.path().join("mail-tmp");
        std::fs::create_dir_all(&work_root).unwrap();
        let delivery = Delivery::start(fake.clone(), spool.clone(), DeliveryOptions::default());
        let state = Arc::new(InboundState {
            path: settings.inbound.path.to_string(),
            gate: super::super::Gate::new(&settings, Duration::from_secs(3)),
            sink,
            spool,
            spool_dir: root.path().to_owned(),
            spool_max_bytes: 1 << 30,
            work_root,
            budget: Budget::new(1 << 30),
            delivery,
        });
        Fixture { fake, state, root }
    }

    /// A multipart mail whose one attachment holds `attachment`.
    fn mail(subject: &str, attachment: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let headers = r#"[{"name":"From","value":"a@example.com"}]"#;
        for (name, filename, data) in [
            ("server_composition", None, b"sandbox".as_slice()),
            ("filter", None, b"in@example.com"),
            ("headers", None, headers.as_bytes()),
            ("subject", None, subject.as_bytes()),
            ("attachments", None, b"1"),
            ("attachment1", Some("a.bin"), attachment),
        ] {
            out.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\"");
            if let Some(f) = filename {
                out.extend_from_slice(format!("; filename=\"{f}\"").as_bytes());
            }
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--XyZ--\r\n");
        out
    }

    /// Runs the one drainer (`spool drain`'s loop) over the fixture's spool.
    async fn drain(f: &Fixture, attempts: u32, cap: Duration) -> Result<DrainSummary, DrainError> {
        let mails = Mails {
            sink: f.state.sink.clone(),
            spool_dir: f.root.path().to_owned(),
        };
        let options = DeliveryOptions {
            window: 4,
            retry_max_interval: cap,
        };
        let spool = f.state.spool.as_ref().unwrap();
        deliver::drain_to_empty(spool, &f.fake, Some(&mails), options, attempts).await
    }

    async fn post(
        state: &InboundState<FakePublisher>,
        body: Vec<u8>,
        batch_id: &str,
    ) -> Result<Accepted, ApiError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "multipart/form-data; boundary=XyZ".parse().unwrap(),
        );
        let body = futures_util::stream::iter([Ok::<_, warp::Error>(bytes::Bytes::from(body))]);
        process(&Method::POST, &headers, None, body, state, batch_id).await
    }

    fn status(result: &Result<Accepted, ApiError>) -> u16 {
        match result {
            Ok(_) => 200,
            Err(e) => e.status().0.as_u16(),
        }
    }

    #[tokio::test]
    async fn a_mail_is_published_after_its_object_and_an_object_held_is_not_uploaded_again() {
        let f = fixture(true);

        let first = post(&f.state, mail("one", b"the attachment"), "b-1").await;
        let again = post(&f.state, mail("two", b"the attachment"), "b-2").await;

        let (first, again) = (first.unwrap(), again.unwrap());
        assert_eq!((first.published, first.spooled), (1, 0));
        assert_eq!((again.published, again.spooled), (1, 0));
        assert_eq!(f.fake.stored(), ["b-1:", "b-2:"]);
        assert_eq!(f.fake.uploads().len(), 1, "the same content is stored once");
        assert_eq!(f.fake.objects().len(), 1);
        assert!(f.state.spool.as_ref().unwrap().stats().is_empty());
    }

    #[tokio::test]
    async fn a_slow_upload_within_the_timeout_is_published() {
        let f = fixture(false);
        f.fake.script_objects([Step::AckAfter(TIMEOUT / 2)]);

        let result = post(&f.state, mail("one", b"data"), "b-1").await;

        assert_eq!(status(&result), 200);
        assert_eq!(f.fake.stored(), ["b-1:"]);
    }

    /// Whatever stops the upload (no answer, a lost connection, a failed chunk), the mail is
    /// spooled whole with the spool on, and its message never goes out before its object.
    #[tokio::test]
    async fn an_upload_nats_cannot_take_spools_the_mail_and_sends_no_message() {
        for step in [Step::Hang, Step::Disconnect, Step::Fail, Step::Refuse] {
            let f = fixture(true);
            f.fake.script_objects([step]);

            let result = post(&f.state, mail("one", b"data"), "b-1").await;

            let accepted = result.unwrap_or_else(|e| panic!("{step:?}: {:?}", e.status()));
            assert_eq!((accepted.published, accepted.spooled), (0, 1), "{step:?}");
            assert!(
                f.fake.stored().is_empty(),
                "{step:?}: a message without its object"
            );
            assert_eq!(
                f.state.spool.as_ref().unwrap().stats().messages(),
                1,
                "{step:?}"
            );
        }
    }

    #[tokio::test]
    async fn without_the_spool_nats_unable_to_take_the_mail_is_503_with_retry_after() {
        for step in [Step::Hang, Step::Disconnect] {
            let f = fixture(false);
            f.fake.script_objects([step]);

            let result = post(&f.state, mail("one", b"data"), "b-1").await;

            assert_eq!(status(&result), 503, "{step:?}");
            let response = result.err().unwrap().into_response();
            assert_eq!(response.headers()[header::RETRY_AFTER], "3");
            assert!(f.fake.stored().is_empty());
        }
        // A message NATS refuses for good (a denied subject) is answered 503 at once, and
        // never spooled, where it would only block the mails behind it.
        let f = fixture(true);
        f.fake.script([Step::Refuse]);
        let result = post(&f.state, mail("one", b"data"), "b-1").await;
        assert_eq!(status(&result), 503);
        assert!(f.state.spool.as_ref().unwrap().stats().is_empty());
        assert!(f.fake.stored().is_empty());
    }

    /// A bucket that cannot be found yet (`nats.stream.create = false`, not made) is waited
    /// for: the mail is spooled, and sent once the bucket is there.
    #[tokio::test]
    async fn a_missing_bucket_is_waited_for() {
        let f = fixture(true);
        f.fake.set_bucket_missing(true);

        let accepted = post(&f.state, mail("one", b"data"), "b-1").await.unwrap();
        let waiting = drain(&f, 2, TIMEOUT).await;
        f.fake.set_bucket_missing(false);
        let drained = drain(&f, 2, TIMEOUT).await;

        assert_eq!(accepted.spooled, 1);
        assert!(waiting.is_err(), "sent without its bucket");
        assert_eq!(drained.unwrap().mails, 1);
        assert_eq!(f.fake.stored(), ["b-1:"]);
    }

    /// Behind a non-empty spool a mail waits its turn, though NATS could take it now; the
    /// drainer sends them in arrival order, each message after its object.
    #[tokio::test]
    async fn a_mail_goes_behind_an_event_batch_the_actor_spooled() {
        let f = fixture(true);
        f.fake.set_ready(false);
        let body = r#"{"event_type":"deliveries","server_composition":"sc","event":{"deliveries":[{"status":"queued"}]}}"#;
        let template = crate::subject::SubjectTemplate::parse("cmc.{event_type}.{status}").unwrap();
        let batch = crate::webhook::decode(Some("application/json"), body.as_bytes())
            .unwrap()
            .validate()
            .unwrap()
            .to_outgoing(&template, "events")
            .unwrap();
        let permit = Budget::new(1 << 20).try_acquire(1).unwrap();
        let events = f.state.delivery.deliver(batch, permit).await.unwrap();
        assert_eq!(events.spooled, 1);
        f.fake.set_ready(true);

        let mail = post(&f.state, mail("one", b"first"), "b-1").await.unwrap();

        assert_eq!(mail.spooled, 1, "the mail overtook the spooled batch");
        assert!(f.fake.stored().is_empty());
        drain(&f, 3, TIMEOUT).await.unwrap();
        assert_eq!(f.fake.stored(), ["events:0", "b-1:"]);
    }

    #[tokio::test]
    async fn mails_keep_their_order_behind_the_spool() {
        let f = fixture(true);
        f.fake.set_ready(false);
        let first = post(&f.state, mail("one", b"first"), "b-1").await.unwrap();
        f.fake.set_ready(true);

        let second = post(&f.state, mail("two", b"second"), "b-2").await.unwrap();

        assert_eq!((first.spooled, second.spooled), (1, 1));
        assert!(f.fake.stored().is_empty(), "the second overtook the first");
        let spool = f.state.spool.clone().unwrap();
        let summary = drain(&f, 3, TIMEOUT).await.unwrap();
        assert_eq!((summary.mails, summary.mails_quarantined), (2, 0));
        assert_eq!(f.fake.stored(), ["b-1:", "b-2:"]);
        assert_eq!(f.fake.objects().len(), 2);
        assert!(spool.stats().is_empty());
    }

    /// A spooled mail NATS refuses for good is quarantined with its reason, and the mail
    /// behind it goes out.
    #[tokio::test]
    async fn a_spooled_mail_refused_for_good_is_quarantined_and_the_next_one_sent() {
        let f = fixture(true);
        f.fake.set_ready(false);
        post(&f.state, mail("one", b"first"), "b-1").await.unwrap();
        post(&f.state, mail("two", b"second"), "b-2").await.unwrap();
        f.fake.set_ready(true);
        f.fake.script([Step::Refuse]);

        let spool = f.state.spool.clone().unwrap();
        let summary = drain(&f, 3, TIMEOUT).await.unwrap();

        assert_eq!((summary.mails, summary.mails_quarantined), (1, 1));
        assert_eq!(f.fake.stored(), ["b-2:"]);
        let status = spool::full_status(f.root.path()).unwrap();
        assert_eq!(status.mails.quarantined.len(), 1, "{status:?}");
        assert_eq!(status.mails.quarantined[0].subject, "one");
        assert!(spool.stats().is_empty());
    }

    /// The drainer backs off, doubling from 100 ms, capped by `spool.retry_max_interval`.
    #[tokio::test]
    async fn the_drainer_backs_off_up_to_the_configured_cap() {
        let f = fixture(true);
        f.fake.set_ready(false);
        post(&f.state, mail("one", b"first"), "b-1").await.unwrap();
        f.fake.set_ready(true);
        f.fake.set_object_default(Step::Fail);
        let spool = f.state.spool.clone().unwrap();
        let cap = Duration::from_millis(150);

        let started = std::time::Instant::now();
        let result = drain(&f, 5, cap).await;
        let elapsed = started.elapsed();

        assert!(result.is_err(), "nothing could be sent");
        assert_eq!(f.fake.uploads().len(), 5, "one upload per attempt");
        // Pauses 100 + 150 + 150 + 150 ms; uncapped they would be 100 + 200 + 400 + 800.
        assert!(elapsed >= Duration::from_millis(550), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(1400), "{elapsed:?}");
        assert_eq!(spool.stats().messages(), 1);
    }
}
