//! Delivery: what stands behind a `200`, as one pipeline with one owner.
//!
//! Routes hand a validated batch to [`Delivery::deliver`] (a cheap handle holding the sender
//! of a bounded channel) together with its share of the in-flight byte budget, and wait for
//! the answer. One task, the delivery actor, receives every batch in arrival order and
//! decides, alone, where it goes:
//!
//! - while the spool holds anything, or anything is on its way into it, the batch is appended
//!   behind it: the decision and the hand-over to the spool writer happen in that one task, so
//!   no later batch can overtake a spooled one;
//! - otherwise the batch is published directly, in the request's own task (so batches
//!   progress side by side); what NATS cannot take in time (a temporary failure) goes back to the actor
//!   and is appended to the spool, and a permanent refusal is answered without spooling
//!   (`413` for an oversized message, else `503`), so it can never block the spool.
//!
//! Publishing ([`crate::publish::publish_run`]) sends a batch in entry order with at most `window` messages
//! unacknowledged and consumes acknowledgements as they arrive, within `publish_timeout`:
//! any batch completes in time proportional to its size, and a large batch holds no more of
//! the connection than its window, so concurrent batches share it fairly.
//!
//! The drainer ([`drain`]) publishes the spool in order whenever NATS is ready. A message NATS
//! refuses for good is moved to the quarantine and the drain goes on; temporary failures and
//! failing disks are retried with exponential back-off capped at `spool.retry_max_interval`.

use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;

use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};

use std::path::PathBuf;

use crate::budget::Permit;
use crate::inbound::store::InboundSink;
use crate::inbound::Mail;
use crate::metrics;
use crate::publish::{
    publish_run, Oversized, Progress, Publish, PublishError, StoredMark, StreamState,
};
use crate::spool::{
    encode_record, MailAppend, ReadBatch, Records, SpoolError, SpoolHandle, WRITE_PIECE,
};
use crate::webhook::{HeaderValue, OutgoingBatch};

/// Messages read from the spool per drain step.
const DRAIN_BATCH: usize = 512;
/// First pause after a failure; it doubles up to `spool.retry_max_interval`.
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// What happened to a batch that was accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Acknowledged by NATS.
    pub published: usize,
    /// Of those, reported by JetStream as already stored.
    pub duplicates: usize,
    /// Durably written to the spool, to be published later.
    pub spooled: usize,
}

/// Why a batch was not accepted; nothing of it needs to be assumed stored.
#[derive(Debug, Error)]
pub enum DeliveryError {
    #[error(transparent)]
    TooLarge(Oversized),
    #[error("{0}")]
    Unavailable(String),
}

/// How the pipeline runs.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryOptions {
    /// Messages of one batch sent and not yet acknowledged, at most.
    pub window: usize,
    /// Cap of the drainer's back-off.
    pub retry_max_interval: Duration,
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        DeliveryOptions {
            window: 4096,
            retry_max_interval: Duration::from_secs(5),
        }
    }
}

type Outcome = Result<DeliveryReport, DeliveryError>;
type Reply = oneshot::Sender<Outcome>;

/// What the actor decided for a batch.
enum Verdict {
    /// Answered at once (refused).
    Done(Outcome),
    /// The publication (or the wait for the spool) the caller runs to get its answer.
    Await(Pin<Box<dyn Future<Output = Outcome> + Send>>),
}

enum Command {
    Deliver {
        batch: OutgoingBatch,
        permit: Permit,
        reply: oneshot::Sender<Verdict>,
    },
    /// A mail: its turn, behind the spool or now.
    Mail {
        append: MailAppend,
        reply: oneshot::Sender<MailTurn>,
    },
    /// A mail NATS could not take in time: to the spool, in arrival order.
    SpoolMail {
        append: MailAppend,
        reply: oneshot::Sender<oneshot::Receiver<Result<(), SpoolError>>>,
    },
    /// A direct publication failed temporarily: spool what was not acknowledged.
    SpoolRest {
        batch: Arc<OutgoingBatch>,
        done: Progress,
        permit: Permit,
        reply: Reply,
    },
}

/// Where an Inbound mail goes, as the delivery actor decided in arrival order with the event
/// batches: one owner of the "behind the spool" rule for both kinds of job.
pub enum MailTurn {
    /// Nothing waits in the spool: the route publishes it now, and hands it back with
    /// [`Delivery::spool_mail`] if NATS cannot take it.
    Direct(MailAppend),
    /// Behind the spool: handed to its writer; durable once this resolves.
    Spooled(oneshot::Receiver<Result<(), SpoolError>>),
}

/// The handle routes deliver through; cheap to clone.
#[derive(Clone)]
pub struct Delivery {
    tx: mpsc::Sender<Command>,
}

impl Delivery {
    /// Starts the delivery actor owning `publisher` and the spool (when enabled).
    pub fn start<P: Publish>(
        publisher: P,
        spool: Option<SpoolHandle>,
        options: DeliveryOptions,
    ) -> Delivery {
        let (tx, rx) = mpsc::channel(1024);
        let back = tx.downgrade();
        tokio::spawn(actor(rx, back, publisher, spool, options));
        Delivery { tx }
    }

    /// The turn of a mail (see [`MailTurn`]); its directory and record are in `append`.
    pub async fn mail_turn(&self, append: MailAppend) -> Result<MailTurn, DeliveryError> {
        let (reply, turn) = oneshot::channel();
        self.tx
            .send(Command::Mail { append, reply })
            .await
            .map_err(|_| stopped())?;
        turn.await.map_err(|_| stopped())
    }

    /// Spools a mail NATS could not take in time (after [`MailTurn::Direct`]); resolves once
    /// it is durable.
    pub async fn spool_mail(&self, append: MailAppend) -> Result<(), SpoolError> {
        let (reply, written) = oneshot::channel();
        self.tx
            .send(Command::SpoolMail { append, reply })
            .await
            .map_err(|_| SpoolError::Stopped)?;
        let written = written.await.map_err(|_| SpoolError::Stopped)?;
        written.await.unwrap_or(Err(SpoolError::Stopped))
    }

    /// Delivers `batch`, holding `permit` (its share of the byte budget) until it is on the
    /// bus, spooled, or refused.
    pub async fn deliver(
        &self,
        batch: OutgoingBatch,
        permit: Permit,
    ) -> Result<DeliveryReport, DeliveryError> {
        let (reply, verdict) = oneshot::channel();
        self.tx
            .send(Command::Deliver {
                batch,
                permit,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        match verdict.await.map_err(|_| stopped())? {
            Verdict::Done(outcome) => outcome,
            // Run in the request's own task: no task hop more (a spawned publication cost a
            // sixth more CPU per event at one connection). A request that goes away mid-batch
            // got no answer either way, so its sender retries, and JetStream de-duplicates
            // what the first attempt stored.
            Verdict::Await(work) => work.await,
        }
    }
}

async fn actor<P: Publish>(
    mut rx: mpsc::Receiver<Command>,
    back: mpsc::WeakSender<Command>,
    publisher: P,
    spool: Option<SpoolHandle>,
    options: DeliveryOptions,
) {
    while let Some(command) = rx.recv().await {
        match command {
            Command::Deliver {
                batch,
                permit,
                reply,
            } => {
                // All-or-nothing: refuse an oversized entry before anything is sent or spooled.
                if let Some(oversized) = oversized(&batch, publisher.max_payload()) {
                    let _ = reply.send(Verdict::Done(Err(DeliveryError::TooLarge(oversized))));
                    continue;
                }
                let work: Pin<Box<dyn Future<Output = Outcome> + Send>> = match &spool {
                    Some(spool) if !spool.stats().is_empty() => {
                        let (written, answer) = oneshot::channel();
                        spool_rest(spool, Arc::new(batch), Progress::default(), permit, written);
                        Box::pin(async move { answer.await.unwrap_or_else(|_| Err(stopped())) })
                    }
                    _ => {
                        let Some(back) = back.upgrade() else { return };
                        Box::pin(direct(
                            publisher.clone(),
                            batch,
                            permit,
                            spool.is_some().then_some(back),
                            spool.as_ref().filter(|s| s.retains()).cloned(),
                            options.window,
                        ))
                    }
                };
                let _ = reply.send(Verdict::Await(work));
            }
            Command::Mail { append, reply } => {
                let turn = match &spool {
                    Some(spool) if !spool.stats().is_empty() => {
                        MailTurn::Spooled(spool.begin_append(Box::new(append)))
                    }
                    _ => MailTurn::Direct(append),
                };
                let _ = reply.send(turn);
            }
            Command::SpoolMail { append, reply } => {
                let written = match &spool {
                    Some(spool) => spool.begin_append(Box::new(append)),
                    None => {
                        let (tx, rx) = oneshot::channel();
                        let _ = tx.send(Err(SpoolError::Stopped));
                        rx
                    }
                };
                let _ = reply.send(written);
            }
            Command::SpoolRest {
                batch,
                done,
                permit,
                reply,
            } => match &spool {
                Some(spool) => spool_rest(spool, batch, done, permit, reply),
                None => {
                    let _ = reply.send(Err(unpublished()));
                }
            },
        }
    }
}

fn oversized(batch: &OutgoingBatch, max: usize) -> Option<Oversized> {
    batch.messages.iter().find_map(|m| {
        let size = batch.wire_size(m);
        (size > max).then_some(Oversized {
            index: m.index,
            size: Some(size),
            max,
        })
    })
}

fn unpublished() -> DeliveryError {
    DeliveryError::Unavailable("NATS cannot take the batch now; nothing is lost by retrying".into())
}

/// Publishes one batch directly; a temporary failure goes back to the actor to be spooled
/// (`back`, when the spool is enabled).
///
/// With the retained log (`retain`), the batch is written there while it is published, and
/// the answer waits for both: NATS acknowledges before it syncs, so what it acknowledged is
/// only safe from a power cut once this service holds it durably too.
async fn direct<P: Publish>(
    publisher: P,
    batch: OutgoingBatch,
    permit: Permit,
    back: Option<mpsc::Sender<Command>>,
    retain: Option<SpoolHandle>,
    window: usize,
) -> Outcome {
    let batch = Arc::new(batch);
    let kept = retain.map(|spool| {
        spool.begin_retain(Box::new(BatchRest {
            batch: batch.clone(),
            start: 0,
        }))
    });
    let kept = async move {
        match kept {
            Some(written) => written.await.unwrap_or(Err(SpoolError::Stopped)),
            None => Ok(()),
        }
    };
    let (published, kept) = tokio::join!(publish_run(&publisher, &*batch, window), kept);
    if let Err(e) = &kept {
        if !matches!(e, SpoolError::Full(_)) {
            tracing::error!(error = %e, "cannot write to the retained log");
        }
    }
    let failure = match (published, kept) {
        (Ok(done), Ok(())) => {
            return Ok(DeliveryReport {
                published: done.acked,
                duplicates: done.duplicates,
                spooled: 0,
            });
        }
        (Ok(_), Err(e)) => {
            return Err(DeliveryError::Unavailable(format!(
                "the batch was published but could not be kept on disk against a NATS power loss ({e}); nothing is duplicated by retrying"
            )));
        }
        // What NATS acknowledged is safe only in the retained log: when that failed, the
        // spool takes the whole batch.
        (Err(mut failure), Err(_)) => {
            failure.done = Progress::default();
            failure
        }
        (Err(failure), Ok(())) => failure,
    };
    match failure.error {
        PublishError::TooLarge(oversized) => Err(DeliveryError::TooLarge(oversized)),
        error if error.is_temporary() => match back {
            Some(back) => {
                tracing::warn!(%error, acked = failure.done.acked, "NATS did not take the batch; spooling the rest");
                let (reply, answer) = oneshot::channel();
                let command = Command::SpoolRest {
                    batch,
                    done: failure.done,
                    permit,
                    reply,
                };
                if back.send(command).await.is_err() {
                    return Err(unpublished());
                }
                answer.await.unwrap_or_else(|_| Err(unpublished()))
            }
            None => Err(DeliveryError::Unavailable(format!(
                "the batch could not be published, nothing is lost by retrying: {error}"
            ))),
        },
        error => {
            tracing::error!(%error, "NATS refused the batch");
            Err(DeliveryError::Unavailable(format!(
                "NATS refused the batch: {error}"
            )))
        }
    }
}

fn stopped() -> DeliveryError {
    DeliveryError::Unavailable("the service is stopping".into())
}

/// Hands the unacknowledged rest of `batch` to the spool writer (in the actor, so in arrival
/// order) and answers `reply` once it is durable.
fn spool_rest(
    spool: &SpoolHandle,
    batch: Arc<OutgoingBatch>,
    done: Progress,
    permit: Permit,
    reply: Reply,
) {
    let count = batch.messages.len() - done.acked;
    let written = spool.begin_append(Box::new(BatchRest {
        batch,
        start: done.acked,
    }));
    tokio::spawn(async move {
        let answer = match written.await.unwrap_or(Err(SpoolError::Stopped)) {
            Ok(()) => Ok(DeliveryReport {
                published: done.acked,
                duplicates: done.duplicates,
                spooled: count,
            }),
            Err(e) => {
                if !matches!(e, SpoolError::Full(_)) {
                    tracing::error!(error = %e, "cannot write to the spool");
                }
                Err(DeliveryError::Unavailable(format!(
                    "NATS cannot take the batch now and it could not be spooled ({e}); nothing is lost by retrying"
                )))
            }
        };
        let _ = reply.send(answer);
        drop(permit);
    });
}

/// The messages of a batch from `start` on, as spool records.
struct BatchRest {
    batch: Arc<OutgoingBatch>,
    start: usize,
}

impl Records for BatchRest {
    fn encode(&self, out: &mut Vec<u8>, at_ms: u64) -> Result<u64, SpoolError> {
        self.encode_from(self.start, out, at_ms, usize::MAX)
            .map(|(n, _)| n)
    }

    fn write_to(
        &self,
        out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
        at_ms: u64,
    ) -> Result<u64, SpoolError> {
        let (mut from, mut count) = (self.start, 0);
        let mut buf = Vec::with_capacity(WRITE_PIECE.min(64 * 1024));
        while from < self.batch.messages.len() {
            buf.clear();
            let (n, next) = self.encode_from(from, &mut buf, at_ms, WRITE_PIECE)?;
            out(&buf)?;
            count += n;
            from = next;
        }
        Ok(count)
    }
}

impl BatchRest {
    /// Encodes messages from `from` on until `out` holds `piece` bytes or more; how many,
    /// and where the next piece starts.
    fn encode_from(
        &self,
        from: usize,
        out: &mut Vec<u8>,
        at_ms: u64,
        piece: usize,
    ) -> Result<(u64, usize), SpoolError> {
        let messages = self.batch.messages.get(from..).unwrap_or_default();
        let mut n = 0;
        for m in messages {
            if out.len() >= piece {
                break;
            }
            n += 1;
            // Only the index is not a string already: one small allocation per message.
            let headers = self.batch.headers(m);
            encode_record(
                out,
                &m.subject,
                headers.iter().map(|(name, value)| {
                    let value: std::borrow::Cow<'_, str> = match value {
                        HeaderValue::Str(s) => (*s).into(),
                        HeaderValue::Index(i) => i.to_string().into(),
                    };
                    (*name, value)
                }),
                &m.payload,
                at_ms,
            )?;
        }
        Ok((n as u64, from + n))
    }
}

/// Exponential back-off: 100 ms, doubling, capped.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Backoff {
        Backoff {
            next: FIRST_RETRY.min(max),
            max,
        }
    }

    /// The pause before the next retry.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }

    pub fn reset(&mut self) {
        self.next = FIRST_RETRY.min(self.max);
    }
}

/// What one drain step did.
#[derive(Debug)]
pub enum Step {
    /// Nothing to publish.
    Empty,
    /// NATS is not ready.
    NotReady,
    /// Records left the spool (published or quarantined); `mails` of them were mails.
    Progressed {
        published: usize,
        quarantined: usize,
        mails: usize,
    },
    /// Nothing could be done now; retry after a pause.
    Failed(String),
}

/// A message NATS refused for good that the disk could not take into the quarantine yet: the
/// next step retries the quarantine, not the publication (the cursor stands just before it).
pub struct Refused {
    batch: Arc<ReadBatch>,
    at: usize,
    reason: String,
}

/// Publishes the spool in order: one step of at most [`DRAIN_BATCH`] messages. `refused` is
/// the drainer's own: a quarantine that failed is retried from there first.
pub async fn drain_step<P: Publish>(
    spool: &SpoolHandle,
    publisher: &P,
    mails: Option<&Mails<P>>,
    window: usize,
    refused: &mut Option<Refused>,
) -> Step {
    if let Some(pending) = refused.take() {
        return set_aside(spool, pending, 0, refused).await;
    }
    if spool.stats().messages() == 0 {
        if !spool.stats().cursor_pending() {
            return Step::Empty;
        }
        // Everything is published but the cursor file is behind (a full disk): write it
        // now, or a restart would publish it all again, long after the dedup window.
        return match spool.commit(Arc::new(Default::default()), 0).await {
            Ok(()) => Step::Progressed {
                published: 0,
                quarantined: 0,
                mails: 0,
            },
            Err(e) => Step::Failed(format!("cannot record spool progress: {e}")),
        };
    }
    if !publisher.is_ready() {
        return Step::NotReady;
    }
    let batch = match spool.read(DRAIN_BATCH).await {
        Ok(batch) if batch.messages.is_empty() && batch.mail.is_none() => return Step::Empty,
        Ok(batch) => Arc::new(batch),
        Err(e) => return Step::Failed(format!("cannot read the spool: {e}")),
    };
    if batch.mail.is_some() {
        return drain_mail(spool, mails, batch).await;
    }
    let server = spool.stats().server_changes();
    let run = publish_run(publisher, &batch.messages, window).await;
    let (done, failure) = match run {
        Ok(done) => (done, None),
        Err(failure) => (failure.done, Some(failure)),
    };
    if spool.stats().server_changes() != server {
        // NATS went away, and came back as another server, while this step was published:
        // what it acknowledged may be lost with it, and the replay for that server is taken
        // already. The step stays in the spool and is published again to the new server.
        tracing::warn!(
            acked = done.acked,
            "NATS changed while a spool step was published; publishing it again"
        );
        return Step::Failed("NATS changed while a spool step was published".into());
    }
    if let Err(e) = spool.commit(batch.clone(), done.acked).await {
        // The cursor has moved in memory: nothing is published twice; its file is written
        // again at the next commit.
        tracing::error!(error = %e, "cannot record spool progress");
        metrics::spool_drained(done.acked, done.duplicates);
        return Step::Failed(format!("cannot record spool progress: {e}"));
    }
    metrics::spool_drained(done.acked, done.duplicates);
    let Some(failure) = failure else {
        return Step::Progressed {
            published: done.acked,
            quarantined: 0,
            mails: 0,
        };
    };
    if failure.error.is_temporary() || failure.at != done.acked {
        return Step::Failed(failure.error.to_string());
    }
    let reason = match &failure.error {
        // The index in the drain's read batch would mean nothing to a reader.
        PublishError::TooLarge(o) => format!(
            "the message is {} over the NATS max_payload of {} bytes",
            o.size.map_or("now".into(), |s| format!("{s} bytes,")),
            o.max
        ),
        error => error.to_string(),
    };
    let pending = Refused {
        batch,
        at: failure.at,
        reason,
    };
    set_aside(spool, pending, done.acked, refused).await
}

/// What the drainer needs for the spool's mail records: the sink their objects and message
/// go out through, and the spool directory their directories are under.
pub struct Mails<P: Publish> {
    pub sink: Arc<InboundSink<P>>,
    pub spool_dir: PathBuf,
}

/// Sends the mail at the cursor: its objects, then its message; then removes its directory
/// and moves the cursor past it. A mail NATS refuses for good goes to the quarantine with its
/// directory.
async fn drain_mail<P: Publish>(
    spool: &SpoolHandle,
    mails: Option<&Mails<P>>,
    batch: Arc<ReadBatch>,
) -> Step {
    let record = batch.mail.clone().expect("a batch of one mail");
    let Some(mails) = mails else {
        return Step::Failed("the spool holds an inbound mail and inbound.path is not set".into());
    };
    let path = mails.spool_dir.join(&record.dir);
    let server = spool.stats().server_changes();
    let done = batch.clone();
    let committed = |published: usize| async move {
        match spool.commit(done, 1).await {
            Ok(()) => Step::Progressed {
                published,
                quarantined: 0,
                mails: 1,
            },
            Err(e) => Step::Failed(format!("cannot record spool progress: {e}")),
        }
    };
    if !path.exists() {
        // Sent, and its directory removed, before a crash kept the cursor from moving on.
        tracing::warn!(dir = %path.display(), batch_id = %record.batch_id, "a spooled mail's directory is gone; it was sent before the last stop");
        return committed(0).await;
    }
    let mail = std::fs::read(path.join("mail.json"))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<Mail>(&b).map_err(|e| e.to_string()));
    let refused = match mail {
        Err(e) => format!("the mail's record is unreadable: {e}"),
        Ok(mail) => match mails.sink.deliver(&mail, &path, &record.batch_id).await {
            // As for a step of events: NATS changed meanwhile, so the mail goes out again.
            Ok(_) if spool.stats().server_changes() != server => {
                return Step::Failed("NATS changed while a spooled mail was sent".into());
            }
            Ok(sent) => {
                tracing::info!(batch_id = %record.batch_id, attachments = mail.attachments.len(), uploaded = sent.uploaded, duplicate = sent.duplicate, "spooled inbound mail published");
                metrics::inbound_mail("drained");
                metrics::inbound_attachments("uploaded", sent.uploaded, sent.uploaded_bytes);
                // With the retained log on, the commit keeps the mail's record there, and its
                // directory stays until the record expires: NATS may lose the mail yet.
                if spool.retains() {
                    return committed(1).await;
                }
                // Its directory first: a crash before the commit then finds it gone (sent).
                if let Err(e) = std::fs::remove_dir_all(&path) {
                    return Step::Failed(format!("cannot remove a sent mail's directory: {e}"));
                }
                spool.stats().release_inbound(record.file_bytes);
                return committed(1).await;
            }
            Err(e) if e.is_temporary() => return Step::Failed(e.to_string()),
            Err(e) => e.to_string(),
        },
    };
    tracing::error!(batch_id = %record.batch_id, reason = %refused, "spooled inbound mail refused by NATS; quarantined");
    match spool.quarantine(batch, 0, refused).await {
        Ok(()) => {
            metrics::spool_quarantined(spool.stats().quarantined());
            Step::Progressed {
                published: 0,
                quarantined: 1,
                mails: 1,
            }
        }
        Err(e) => Step::Failed(format!("cannot quarantine a refused mail: {e}")),
    }
}

/// Moves a refused message to the quarantine; when the disk cannot take it, keeps it in
/// `refused` for the next step.
async fn set_aside(
    spool: &SpoolHandle,
    pending: Refused,
    published: usize,
    refused: &mut Option<Refused>,
) -> Step {
    let message = &pending.batch.messages[pending.at];
    let (subject, msg_id) = (
        message.subject.clone(),
        message.header("Nats-Msg-Id").unwrap_or("").to_owned(),
    );
    let reason = pending.reason.clone();
    match spool
        .quarantine(pending.batch.clone(), pending.at, reason.clone())
        .await
    {
        Ok(()) => {
            tracing::error!(%subject, %msg_id, %reason, "NATS refuses a spooled message for good; moved to the quarantine");
            metrics::spool_quarantined(spool.stats().quarantined());
            Step::Progressed {
                published,
                quarantined: 1,
                mails: 0,
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot move a refused message to the quarantine");
            *refused = Some(pending);
            if published > 0 {
                // What was published is recorded; the quarantine is retried next.
                return Step::Progressed {
                    published,
                    quarantined: 0,
                    mails: 0,
                };
            }
            Step::Failed(format!("cannot quarantine a refused message: {e}"))
        }
    }
}

/// Publishes the spool's messages in order whenever NATS is ready, until `stop` turns true.
pub async fn drain<P: Publish>(
    spool: SpoolHandle,
    publisher: P,
    mails: Option<Mails<P>>,
    mut stop: watch::Receiver<bool>,
    options: DeliveryOptions,
) {
    let mut backoff = Backoff::new(options.retry_max_interval);
    let mut failures = 0u32;
    let mut refused = None;
    metrics::spool_quarantined(spool.stats().quarantined());
    loop {
        if *stop.borrow() {
            return;
        }
        metrics::spool_depth(spool.stats().messages(), spool.stats().bytes());
        let step = drain_step(
            &spool,
            &publisher,
            mails.as_ref(),
            options.window,
            &mut refused,
        );
        let pause = match step.await {
            Step::Empty => {
                backoff.reset();
                tokio::select! {
                    () = spool.appended() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            Step::NotReady => Duration::from_millis(100),
            Step::Progressed { .. } => {
                if failures > 0 {
                    tracing::info!(remaining = spool.stats().messages(), "spool draining again");
                }
                failures = 0;
                backoff.reset();
                continue;
            }
            Step::Failed(reason) => {
                failures += 1;
                let pause = backoff.next_pause();
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(%reason, remaining = spool.stats().messages(), retry_in = ?pause, "spool drain paused");
                }
                pause
            }
        };
        sleep_or_stop(pause, &mut stop).await;
    }
}

async fn sleep_or_stop(pause: Duration, stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        () = tokio::time::sleep(pause) => {}
        _ = stop.changed() => {}
    }
}

/// Why `cmc-forwarder spool drain` could not empty the spool.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct DrainError(pub String);

/// What a completed drain did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainSummary {
    pub published: usize,
    pub quarantined: usize,
    /// Mails sent, and mails quarantined.
    pub mails: usize,
    pub mails_quarantined: usize,
}

/// Drains the spool until it is empty (`cmc-forwarder spool drain`); gives up after
/// `max_failures` failed attempts in a row, saying why.
pub async fn drain_to_empty<P: Publish>(
    spool: &SpoolHandle,
    publisher: &P,
    mails: Option<&Mails<P>>,
    options: DeliveryOptions,
    max_failures: u32,
) -> Result<DrainSummary, DrainError> {
    let mut summary = DrainSummary::default();
    let mut backoff = Backoff::new(options.retry_max_interval);
    let mut failures = 0;
    let mut refused = None;
    loop {
        let step = drain_step(spool, publisher, mails, options.window, &mut refused).await;
        let reason = match &step {
            Step::NotReady => "NATS is not connected, or the stream is not usable".to_owned(),
            Step::Failed(reason) => reason.clone(),
            _ => String::new(),
        };
        match step {
            Step::Empty => return Ok(summary),
            Step::Progressed {
                published,
                quarantined,
                mails,
            } => {
                if mails > 0 {
                    summary.mails += mails - quarantined;
                    summary.mails_quarantined += quarantined;
                } else {
                    summary.published += published;
                    summary.quarantined += quarantined;
                }
                failures = 0;
                backoff.reset();
            }
            Step::NotReady | Step::Failed(_) if failures + 1 >= max_failures => {
                return Err(DrainError(format!(
                    "{} messages left in the spool after {} attempts: {reason}",
                    spool.stats().messages(),
                    failures + 1
                )));
            }
            Step::NotReady | Step::Failed(_) => {
                failures += 1;
                tokio::time::sleep(backoff.next_pause()).await;
            }
        }
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").finish_non_exhaustive()
    }
}

/// How often the retained log is looked after (and the stream checked).
const KEEP_EVERY: Duration = Duration::from_secs(1);

/// What the keeper knows of the stream between two checks.
#[derive(Debug, Default)]
struct Known {
    /// Server processes NATS has answered from: a new one has started since (a restart, or a
    /// power cut), or the connection moved.
    servers: std::collections::HashSet<String>,
    /// The stream as the last successful check found it.
    stream: Option<StreamState>,
    /// The latest message JetStream had acknowledged when the stream last answered: the
    /// next check asks whether the stream still holds it, at its sequence.
    mark: Option<StoredMark>,
    /// When ([`crate::spool::mono_ms`]) the stream last answered a check; `0` before the
    /// first (at start-up: everything retained counts as acknowledged just before it).
    answered_at: u64,
    /// A replay is owed to a server process seen for the first time, from the moment it
    /// appeared (what was retained then), until the stream answers and it is done.
    owed: Option<Suspicion>,
}

/// Why the keeper publishes the retained log again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suspicion {
    /// NATS answers from a server process never seen before.
    NewServer,
    /// The stream was created again (another creation time).
    Recreated,
    /// The stream's last sequence is below one it acknowledged: it lost its tail.
    RolledBack,
    /// The stream no longer holds the message last seen acknowledged, at its sequence.
    MarkLost,
    /// The stream does not exist (a power cut took it before its first sync, or it was
    /// deleted): it is created again when the replay is published.
    Gone,
}

/// Asks the stream whether it may have lost what it acknowledged since the last check: its
/// state, and why it may have (none when nothing says so); `Err` when it did not answer (then
/// nothing may expire). No state when it does not exist.
async fn check_stream<P: Publish>(
    publisher: &P,
    known: &Known,
) -> Result<(Option<StreamState>, Option<Suspicion>), PublishError> {
    // Read before the stream is asked: every sequence noted by then was stored before it
    // answers, while acknowledgements noted during the request may be of messages stored
    // after its answer was made.
    let high = publisher.high_sequence();
    let Some(state) = publisher.stream_state().await? else {
        return Ok((None, Some(Suspicion::Gone)));
    };
    let held = match &known.mark {
        Some(mark) => publisher.stream_holds(mark).await?,
        None => true,
    };
    let suspicion = if known.owed.is_some() {
        known.owed
    } else if known
        .stream
        .as_ref()
        .is_some_and(|before| before.created != state.created)
    {
        Some(Suspicion::Recreated)
    } else if state.last_sequence < high {
        Some(Suspicion::RolledBack)
    } else if !held {
        Some(Suspicion::MarkLost)
    } else {
        None
    };
    Ok((Some(state), suspicion))
}

/// Looks after the retained log until `stop` turns true. Every [`KEEP_EVERY`], and at once
/// when the connection comes back, it checks the stream ([`check_stream`]):
///
/// - when the stream answered and nothing says it lost anything, the records written more
///   than the hold before the check began are deleted (the stream has had `spool.retain` to
///   sync them, and answered since);
/// - when NATS answers from a server process never seen before, the stream was created
///   again, its last sequence is below one it acknowledged, or it no longer holds the last
///   message it acknowledged at the previous check, every record acknowledged in the hold
///   before the stream last answered is published again (`Nats-Msg-Id` drops what it kept);
/// - when the stream does not answer (disconnected, a silent host death that still looks
///   connected, no leader, no responders), nothing is deleted.
///
/// Ages are on the monotonic clock, and what an earlier run retained counts as written at
/// start-up: a step of the wall clock changes nothing. The heartbeat names the last server
/// process seen, so a restart of the service in front of the same NATS process replays
/// nothing, and a restart of both replays everything retained.
pub async fn keep_retained<P: Publish>(
    spool: SpoolHandle,
    publisher: P,
    mut stop: watch::Receiver<bool>,
) {
    let mut known = Known::default();
    if let Some(heartbeat) = spool.last_connected() {
        known.servers.insert(heartbeat.server);
    }
    loop {
        if *stop.borrow() {
            return;
        }
        if let (true, Some(server)) = (publisher.is_connected(), publisher.server_id()) {
            let began = crate::spool::mono_ms();
            if known.servers.insert(server.clone()) {
                // Before the replay is taken: a drain step published meanwhile does not
                // count as acknowledged (see `drain_step`).
                spool.stats().note_server_change();
                // Nothing retained, nothing owed: what is acknowledged from now on is this
                // server's own (and a replay of it would send the batches of that moment
                // behind it into the spool).
                if spool.stats().retained_bytes() > 0 {
                    known.owed = Some(Suspicion::NewServer);
                }
            }
            match check_stream(&publisher, &known).await {
                Ok((state, suspicion)) => {
                    let last_sequence = state.as_ref().map_or(0, |s| s.last_sequence);
                    let replayed = match suspicion {
                        Some(why) => replay(&spool, &publisher, &known, last_sequence, why).await,
                        None => true,
                    };
                    if replayed {
                        known.owed = None;
                    }
                    if replayed && state.is_none() {
                        // Nothing to expire against, and nothing to compare the stream
                        // created again with.
                        known.stream = None;
                        known.mark = None;
                    } else if replayed {
                        // The mark is taken only now, and only while the connection is still
                        // on the server that answered: a mark of the next server's would
                        // pass its own check.
                        let mark = publisher.last_stored();
                        if publisher.server_id().as_deref() == Some(server.as_str()) {
                            known.mark = mark;
                        }
                        known.stream = state;
                        known.answered_at = began;
                        metrics::retained_check(true);
                        spool.answered_at(&server, began);
                    }
                }
                Err(e) => {
                    metrics::retained_check(false);
                    tracing::debug!(error = %e, "the stream did not answer the retained log's check; nothing expires");
                }
            }
        }
        metrics::retained_bytes(spool.stats().retained_bytes());
        // Woken at once by a reconnection, so a replay comes before the drainer publishes
        // much to the new server (what it does publish first is replayed too: a duplicate,
        // de-duplicated).
        tokio::select! {
            () = tokio::time::sleep(KEEP_EVERY) => {}
            () = publisher.reconnected() => {
                // The client takes in the new server's INFO just after it reports the
                // connection.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ = stop.changed() => {}
        }
    }
}

/// Publishes again what the stream may have lost (see [`keep_retained`]); whether it is
/// done (else the keeper tries again at its next turn).
async fn replay<P: Publish>(
    spool: &SpoolHandle,
    publisher: &P,
    known: &Known,
    last_sequence: u64,
    why: Suspicion,
) -> bool {
    // Nothing retained, nothing to replay: not even a moment of the spool counting as
    // non-empty (which would send the batches of that moment behind it).
    if spool.stats().retained_bytes() > 0 {
        match spool.replay_retained(known.answered_at).await {
            Ok(replayed) => {
                metrics::retained_replayed(replayed);
                if replayed > 0 {
                    tracing::warn!(
                        messages = replayed,
                        reason = ?why,
                        "NATS may have lost what it acknowledged: the retained log is published again"
                    );
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot replay the retained log; will retry");
                return false;
            }
        }
    }
    // Sequences from here on are the stream's as it is now; the mark of the next check
    // is taken from what is acknowledged after this.
    publisher.forget_stored(last_sequence);
    true
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::budget::Budget;
    use crate::publish::fake::{FakePublisher, Step};
    use crate::spool::Spool;
    use crate::subject::SubjectTemplate;

    const TIMEOUT: Duration = Duration::from_millis(300);

    /// A batch built the way the route builds it, each entry's `Cmc-Batch-Id:index` label
    /// being `tag:i`.
    fn batch(tag: &str, n: usize) -> OutgoingBatch {
        batch_with(tag, n, 0)
    }

    fn batch_with(tag: &str, n: usize, padding: usize) -> OutgoingBatch {
        let pad = "x".repeat(padding);
        let entries: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"status":"queued","tag":"{tag}","i":{i},"pad":"{pad}"}}"#))
            .collect();
        let body = format!(
            r#"{{"event_type":"deliveries","server_composition":"sc","event":{{"deliveries":[{}]}}}}"#,
            entries.join(",")
        );
        let decoded = crate::webhook::decode(Some("application/json"), body.as_bytes()).unwrap();
        let template = SubjectTemplate::parse("cmc.{event_type}.{status}").unwrap();
        decoded
            .validate()
            .unwrap()
            .to_outgoing(&template, tag)
            .unwrap()
    }

    /// A batch with one entry per status, in order (so one subject per status).
    fn batch_of_statuses(tag: &str, statuses: &[&str]) -> OutgoingBatch {
        let entries: Vec<String> = statuses
            .iter()
            .enumerate()
            .map(|(i, status)| format!(r#"{{"status":"{status}","tag":"{tag}","i":{i}}}"#))
            .collect();
        let body = format!(
            r#"{{"event_type":"deliveries","server_composition":"sc","event":{{"deliveries":[{}]}}}}"#,
            entries.join(",")
        );
        let decoded = crate::webhook::decode(Some("application/json"), body.as_bytes()).unwrap();
        let template = SubjectTemplate::parse("cmc.{event_type}.{status}").unwrap();
        decoded
            .validate()
            .unwrap()
            .to_outgoing(&template, tag)
            .unwrap()
    }

    fn labels(tag: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{tag}:{i}")).collect()
    }

    fn permit() -> Permit {
        Budget::new(1 << 30).try_acquire(1).unwrap()
    }

    struct Rig {
        fake: FakePublisher,
        delivery: Delivery,
        spool: Option<SpoolHandle>,
        _dir: tempfile::TempDir,
        options: DeliveryOptions,
    }

    fn rig(spool: bool, window: usize) -> Rig {
        rig_with(spool, window, TIMEOUT)
    }

    fn rig_with(spool: bool, window: usize, timeout: Duration) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let opened = spool.then(|| Spool::open(dir.path(), 1 << 30).unwrap());
        rig_on(dir, opened, window, timeout)
    }

    /// A rig on a spool a test prepared (with scripted storage failures, say).
    fn rig_on(
        dir: tempfile::TempDir,
        spool: Option<Spool>,
        window: usize,
        timeout: Duration,
    ) -> Rig {
        let fake = FakePublisher::new(timeout);
        let spool = spool.map(|spool| SpoolHandle::start(spool).unwrap());
        let options = DeliveryOptions {
            window,
            retry_max_interval: Duration::from_millis(400),
        };
        let delivery = Delivery::start(fake.clone(), spool.clone(), options);
        Rig {
            fake,
            delivery,
            spool,
            _dir: dir,
            options,
        }
    }

    /// A rig whose spool keeps a retained log.
    fn retaining_rig() -> Rig {
        retaining_rig_for(Duration::from_secs(60))
    }

    /// A rig whose spool keeps retained records `hold` after they were written.
    fn retaining_rig_for(hold: Duration) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
        spool.retain(hold).unwrap();
        rig_on(dir, Some(spool), 64, TIMEOUT)
    }

    /// A running keeper ([`Rig::keep`]).
    struct Keeper {
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Keeper {
        async fn stop(self) {
            let _ = self.stop.send(true);
            self.task.await.unwrap();
        }
    }

    impl Rig {
        async fn deliver(&self, b: OutgoingBatch) -> Result<DeliveryReport, DeliveryError> {
            self.delivery.deliver(b, permit()).await
        }

        /// Starts the retained log's keeper.
        fn keep(&self) -> Keeper {
            let (stop, stopped) = watch::channel(false);
            let spool = self.spool.clone().unwrap();
            let task = tokio::spawn(keep_retained(spool, self.fake.clone(), stopped));
            Keeper { stop, task }
        }

        fn start_drain(&self) -> watch::Sender<bool> {
            let (tx, rx) = watch::channel(false);
            tokio::spawn(drain(
                self.spool.clone().unwrap(),
                self.fake.clone(),
                None,
                rx,
                self.options,
            ));
            tx
        }

        /// Waits until the keeper has seen the server (its heartbeat is written): what is
        /// delivered from then on was acknowledged by that server.
        async fn wait_kept(&self) {
            let heartbeat = self._dir.path().join("retained/connected");
            let until = Instant::now() + Duration::from_secs(10);
            while !heartbeat.exists() {
                assert!(Instant::now() < until, "the keeper did not start");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        /// Waits until the keeper has checked the stream once more after what was sent
        /// until now (its mark then names the last message acknowledged).
        async fn wait_checked(&self) {
            let checks = self.fake.checks();
            let until = Instant::now() + Duration::from_secs(10);
            while self.fake.checks() < checks + 2 {
                assert!(
                    Instant::now() < until,
                    "the keeper did not check the stream"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        /// Waits until `sent` messages have been sent and the spool is empty, then a while
        /// longer, for anything more to show.
        async fn wait_sent_and_settled(&self, sent: usize) {
            let spool = self.spool.as_ref().unwrap();
            let until = Instant::now() + Duration::from_secs(5);
            while self.fake.sent() < sent || !spool.stats().is_empty() {
                assert!(
                    Instant::now() < until,
                    "sent {} of {sent}",
                    self.fake.sent()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }

        async fn wait_drained(&self) {
            let spool = self.spool.as_ref().unwrap();
            let until = Instant::now() + Duration::from_secs(10);
            while !spool.stats().is_empty() {
                assert!(Instant::now() < until, "the spool did not drain");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    #[tokio::test]
    async fn healthy_nats_gets_every_message_in_order_and_200() {
        let rig = rig(true, 8);
        let report = rig.deliver(batch("a", 100)).await.unwrap();
        assert_eq!(
            report,
            DeliveryReport {
                published: 100,
                duplicates: 0,
                spooled: 0
            }
        );
        assert_eq!(rig.fake.stored(), labels("a", 100));
        assert!(rig.spool.as_ref().unwrap().stats().is_empty());
    }

    #[tokio::test]
    async fn a_timeout_spools_the_unacknowledged_rest_which_drains_in_order_once() {
        let rig = rig(true, 4);
        rig.fake.script([Step::Ack, Step::Ack, Step::Ack]);
        rig.fake.set_default(Step::Hang);
        let started = Instant::now();
        let report = rig.deliver(batch("a", 10)).await.unwrap();
        assert!(started.elapsed() < TIMEOUT + Duration::from_millis(500));
        assert_eq!((report.published, report.spooled), (3, 7));
        assert_eq!(rig.spool.as_ref().unwrap().stats().messages(), 7);
        rig.fake.set_default(Step::Ack);
        let _stop = rig.start_drain();
        rig.wait_drained().await;
        assert_eq!(rig.fake.stored(), labels("a", 10));
    }

    #[tokio::test]
    async fn a_disconnect_after_k_messages_spools_the_rest() {
        let rig = rig(true, 4);
        rig.fake.script([Step::Ack; 5]);
        rig.fake.script([Step::Disconnect]);
        let report = rig.deliver(batch("a", 12)).await.unwrap();
        assert_eq!((report.published, report.spooled), (5, 7));
        rig.fake.set_ready(true);
        let _stop = rig.start_drain();
        rig.wait_drained().await;
        assert_eq!(rig.fake.stored(), labels("a", 12));
        assert_eq!(rig.fake.duplicates(), 0);
    }

    #[tokio::test]
    async fn without_a_spool_a_temporary_failure_is_an_honest_503_in_time() {
        let rig = rig(false, 4);
        rig.fake.set_default(Step::Hang);
        let started = Instant::now();
        let err = rig.deliver(batch("a", 10)).await.unwrap_err();
        assert!(matches!(err, DeliveryError::Unavailable(_)), "{err}");
        assert!(started.elapsed() < TIMEOUT + Duration::from_millis(500));
        rig.fake.set_ready(false);
        assert!(matches!(
            rig.deliver(batch("b", 1)).await,
            Err(DeliveryError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn a_permanent_refusal_is_answered_without_spooling() {
        let rig = rig(true, 4);
        rig.fake.script([Step::Ack, Step::Refuse]);
        let err = rig.deliver(batch("a", 5)).await.unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
        assert!(rig.spool.as_ref().unwrap().stats().is_empty());
        // The spool is not blocked: the next batch goes straight through.
        rig.fake.set_default(Step::Ack);
        assert_eq!(rig.deliver(batch("b", 3)).await.unwrap().published, 3);
    }

    #[tokio::test]
    async fn a_denied_subject_fails_its_batch_at_once_without_spooling() {
        let rig = rig(true, 4);
        rig.fake.script([Step::Ack, Step::Ack, Step::Deny]);
        let started = Instant::now();
        let err = rig.deliver(batch("a", 6)).await.unwrap_err();
        assert!(err.to_string().contains("permission denied"), "{err}");
        // Answered by the denial, not by the publish timeout.
        assert!(started.elapsed() < TIMEOUT / 2, "{:?}", started.elapsed());
        assert!(rig.spool.as_ref().unwrap().stats().is_empty());
    }

    #[tokio::test]
    async fn a_denial_of_another_subject_leaves_a_batch_alone() {
        let rig = rig(true, 4);
        rig.fake
            .set_default(Step::AckAfter(Duration::from_millis(20)));
        let fake = rig.fake.clone();
        let other = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            fake.record_denial("cmc.someone.else");
        });
        let report = rig.deliver(batch("a", 6)).await.unwrap();
        other.await.unwrap();
        assert_eq!((report.published, report.spooled), (6, 0));
    }

    #[tokio::test]
    async fn an_oversized_entry_is_refused_before_anything_is_sent() {
        let rig = rig(true, 4);
        rig.fake.set_max_payload(1000);
        let mut b = batch_with("a", 3, 10);
        let big = batch_with("big", 1, 2000).messages.remove(0);
        b.messages[1].payload = big.payload;
        match rig.deliver(b).await {
            Err(DeliveryError::TooLarge(o)) => assert_eq!((o.index, o.max), (1, 1000)),
            other => panic!("expected 413, got {other:?}"),
        }
        assert_eq!(rig.fake.sent(), 0);
        assert!(rig.spool.as_ref().unwrap().stats().is_empty());
    }

    /// A spool the previous build left: event segments, and its separate inbound queue
    /// (`inbound/<n>/mail.json` with `batch_id`). Adopted at start-up, it drains with the one
    /// drainer: the events as they were, then the mail, objects first; nothing is left.
    #[tokio::test]
    async fn a_spool_and_inbound_queue_of_the_previous_layout_drain_with_one_drainer() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let events = batch("old", 3);
        let messages: Vec<crate::publish::NatsMessage> = events
            .messages
            .iter()
            .map(|m| crate::publish::NatsMessage::from_message(&events, m))
            .collect();
        let mut records = Vec::new();
        for m in &messages {
            crate::spool::encode_message(&mut records, m, 0).unwrap();
        }
        spool.append(records, 3).unwrap();
        let queued = dir.path().join("inbound/00000000000000000004");
        std::fs::create_dir_all(&queued).unwrap();
        let mail =
            crate::inbound::mail::parse_json(include_bytes!("../fixtures/inbound/json.json"))
                .unwrap()
                .validate()
                .unwrap();
        std::fs::write(queued.join("mail.json"), serde_json::to_vec(&mail).unwrap()).unwrap();
        std::fs::write(queued.join("batch_id"), "old-mail").unwrap();
        assert_eq!(spool.adopt_mails().unwrap(), 1);
        let handle = SpoolHandle::start(spool).unwrap();
        let fake = FakePublisher::new(TIMEOUT);
        let mails = Mails {
            sink: Arc::new(InboundSink::with_publisher(
                &crate::settings::Settings::default(),
                fake.clone(),
            )),
            spool_dir: dir.path().to_owned(),
        };
        let options = DeliveryOptions {
            window: 4,
            retry_max_interval: Duration::from_millis(400),
        };

        let summary = drain_to_empty(&handle, &fake, Some(&mails), options, 3)
            .await
            .unwrap();

        assert_eq!((summary.published, summary.quarantined), (3, 0));
        assert_eq!((summary.mails, summary.mails_quarantined), (1, 0));
        assert_eq!(
            fake.stored(),
            [labels("old", 3), vec!["old-mail:".to_owned()]].concat()
        );
        assert!(handle.stats().is_empty());
        assert!(!dir.path().join("mail/00000000000000000001").exists());
    }

    #[tokio::test]
    async fn while_anything_is_spooled_new_batches_go_behind_it() {
        let rig = rig(true, 4);
        rig.fake.set_ready(false);
        let a = rig.deliver(batch("a", 5)).await.unwrap();
        assert_eq!(a.spooled, 5);
        // NATS is back, but no drain has run yet: new batches must not overtake "a".
        rig.fake.set_ready(true);
        let b = rig.deliver(batch("b", 5)).await.unwrap();
        assert_eq!((b.published, b.spooled), (0, 5));
        // Many at once, none of them direct.
        let mut tasks = Vec::new();
        for i in 0..20 {
            let delivery = rig.delivery.clone();
            tasks.push(tokio::spawn(async move {
                delivery
                    .deliver(batch(&format!("c{i:02}"), 3), permit())
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().published, 0);
        }
        assert_eq!(
            rig.fake.sent(),
            0,
            "nothing was sent while the spool held anything"
        );
        let _stop = rig.start_drain();
        rig.wait_drained().await;
        let stored = rig.fake.stored();
        assert_eq!(
            &stored[..10],
            &[labels("a", 5), labels("b", 5)].concat()[..]
        );
        assert_eq!(stored.len(), 10 + 60);
        // Once the spool is empty, batches go direct again.
        let d = rig.deliver(batch("d", 2)).await.unwrap();
        assert_eq!((d.published, d.spooled), (2, 0));
    }

    #[tokio::test]
    async fn a_message_nats_refuses_for_good_is_quarantined_and_the_drain_goes_on() {
        let rig = rig(true, 4);
        rig.fake.set_ready(false);
        rig.deliver(batch("a", 3)).await.unwrap();
        rig.deliver(batch_with("big", 1, 5000)).await.unwrap();
        rig.deliver(batch("c", 3)).await.unwrap();
        // NATS comes back with a smaller max_payload.
        rig.fake.set_max_payload(2000);
        rig.fake.set_ready(true);
        let _stop = rig.start_drain();
        rig.wait_drained().await;
        assert_eq!(rig.fake.stored(), [labels("a", 3), labels("c", 3)].concat());
        let spool = rig.spool.as_ref().unwrap();
        assert_eq!(spool.stats().quarantined(), 1);
        let status = crate::spool::status(rig._dir.path()).unwrap();
        assert_eq!(status.messages, 0);
        assert_eq!(status.quarantined.len(), 1);
        assert_eq!(status.quarantined[0].subject, "cmc.deliveries.queued");
        assert!(
            status.quarantined[0].reason.contains("max_payload"),
            "{}",
            status.quarantined[0].reason
        );
        // New batches are accepted again, directly.
        assert_eq!(rig.deliver(batch("d", 2)).await.unwrap().published, 2);
    }

    #[tokio::test]
    async fn a_refused_ack_in_the_spool_is_quarantined_too() {
        let rig = rig(true, 4);
        rig.fake.set_ready(false);
        rig.deliver(batch("a", 4)).await.unwrap();
        rig.fake.set_ready(true);
        rig.fake.script([Step::Ack, Step::Refuse]);
        let _stop = rig.start_drain();
        rig.wait_drained().await;
        let stored = rig.fake.stored();
        assert_eq!(stored, ["a:0", "a:2", "a:3"]);
        assert_eq!(rig.spool.as_ref().unwrap().stats().quarantined(), 1);
    }

    /// Insufficient resources, a stream at its limits with `discard: new`: waiting can fix
    /// them, so the drain waits; it never empties the spool into the quarantine.
    #[tokio::test]
    async fn a_stream_out_of_resources_is_waited_for_never_quarantined() {
        let rig = rig(true, 4);
        rig.fake.set_ready(false);
        rig.deliver(batch("a", 4)).await.unwrap();
        rig.fake.set_ready(true);
        // Storage resources exceeded, insufficient resources, store failed (maximum
        // messages exceeded), memory resources exceeded.
        rig.fake.script([
            Step::Api(10047),
            Step::Api(10023),
            Step::Api(10077),
            Step::Api(10028),
        ]);
        let _stop = rig.start_drain();
        rig.wait_drained().await;
        assert_eq!(rig.fake.stored(), labels("a", 4));
        assert_eq!(rig.spool.as_ref().unwrap().stats().quarantined(), 0);
    }

    /// A message over the stream's own maximum message size can never be stored: it is
    /// quarantined and the drain goes on.
    #[tokio::test]
    async fn a_message_over_the_streams_maximum_size_is_quarantined() {
        let rig = rig(true, 4);
        rig.fake.set_ready(false);
        rig.deliver(batch("a", 3)).await.unwrap();
        rig.fake.set_ready(true);
        rig.fake.script([Step::Ack, Step::Api(10054)]);
        let _stop = rig.start_drain();
        rig.wait_drained().await;
        assert_eq!(rig.fake.stored(), ["a:0", "a:2"]);
        assert_eq!(rig.spool.as_ref().unwrap().stats().quarantined(), 1);
    }

    /// In `core` mode nothing is de-duplicated: a permanent failure must not make the drain
    /// publish the messages before it again and again.
    #[tokio::test]
    async fn in_core_mode_a_permanent_failure_is_quarantined_and_nothing_is_sent_twice() {
        let rig = rig(true, 4);
        rig.fake.set_core(true);
        rig.fake.set_ready(false);
        rig.deliver(batch("a", 2)).await.unwrap();
        rig.deliver(batch_with("big", 1, 5000)).await.unwrap();
        rig.deliver(batch("c", 2)).await.unwrap();
        rig.fake.set_max_payload(2000);
        rig.fake.set_ready(true);
        let _stop = rig.start_drain();
        rig.wait_drained().await;
        assert_eq!(rig.fake.stored(), ["a:0", "a:1", "c:0", "c:1"]);
        assert_eq!(rig.spool.as_ref().unwrap().stats().quarantined(), 1);
    }

    /// A denial names a subject, not a message: it belongs to the first unacknowledged
    /// message of that subject, not to the oldest one waiting for its acknowledgement.
    #[tokio::test]
    async fn a_denial_is_pinned_on_the_message_of_the_denied_subject() {
        let rig = rig(true, 4);
        rig.fake.set_ready(false);
        rig.deliver(batch_of_statuses(
            "a",
            &["queued", "denied", "queued", "queued"],
        ))
        .await
        .unwrap();
        rig.fake.set_ready(true);
        // The first message's acknowledgement is slow; the second is denied meanwhile.
        rig.fake
            .script([Step::AckAfter(Duration::from_millis(50)), Step::Deny]);
        let _stop = rig.start_drain();
        rig.wait_drained().await;
        // (The fake stores a late-acknowledged message when its ack comes.)
        let mut stored = rig.fake.stored();
        stored.sort();
        assert_eq!(stored, ["a:0", "a:2", "a:3"]);
        let status = crate::spool::status(rig._dir.path()).unwrap();
        let quarantined: Vec<&str> = status
            .quarantined
            .iter()
            .map(|e| e.subject.as_str())
            .collect();
        assert_eq!(quarantined, ["cmc.deliveries.denied"]);
    }

    /// A full disk while the cursor is written: the drain writes it again once it can, even
    /// when nothing is left to publish, so a restart does not replay what was published.
    #[tokio::test]
    async fn a_cursor_a_full_disk_kept_from_being_written_is_written_later() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
        spool.inject(crate::spool::Fault::CursorWrite, 1);
        let path = dir.path().to_owned();
        let rig = rig_on(dir, Some(spool), 4, TIMEOUT);
        rig.fake.set_ready(false);
        rig.deliver(batch("a", 3)).await.unwrap();
        rig.fake.set_ready(true);
        let _stop = rig.start_drain();
        rig.wait_drained().await;
        assert_eq!(rig.fake.stored(), labels("a", 3));
        let until = Instant::now() + Duration::from_secs(3);
        loop {
            let status = crate::spool::status(&path).unwrap();
            if status.messages == 0 {
                break;
            }
            assert!(
                Instant::now() < until,
                "the cursor file still says {} messages wait: a restart would publish them again",
                status.messages
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A quarantine the disk cannot take yet: the disk operation is retried, not the
    /// publication of the refused message (sent again, it is refused again, or, in `core`
    /// mode, can even be delivered twice).
    #[tokio::test]
    async fn a_quarantine_a_full_disk_refused_is_retried_without_publishing_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
        spool.inject(crate::spool::Fault::QuarantineDescription, 2);
        let rig = rig_on(dir, Some(spool), 4, TIMEOUT);
        rig.fake.set_ready(false);
        rig.deliver(batch("a", 1)).await.unwrap();
        rig.deliver(batch_with("big", 1, 5000)).await.unwrap();
        rig.deliver(batch("c", 1)).await.unwrap();
        rig.fake.set_max_payload(2000);
        rig.fake.set_ready(true);
        let before = rig.fake.sent();
        let _stop = rig.start_drain();
        rig.wait_drained().await;
        assert_eq!(rig.fake.stored(), ["a:0", "c:0"]);
        assert_eq!(rig.spool.as_ref().unwrap().stats().quarantined(), 1);
        // a:0, big:0 once, c:0.
        assert_eq!(
            rig.fake.sent() - before,
            3,
            "the refused message was sent again"
        );
    }

    #[tokio::test]
    async fn temporary_failures_back_off_exponentially_up_to_the_cap() {
        let rig = rig(true, 4);
        rig.fake.set_ready(false);
        rig.deliver(batch("a", 1)).await.unwrap();
        rig.fake.set_ready(true);
        rig.fake.set_default(Step::Fail);
        let before = rig.fake.sent();
        let stop = rig.start_drain();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        stop.send(true).unwrap();
        let times = rig.fake.send_times()[before..].to_vec();
        // 100, 200, 400, 400, 400... ms: about 7 attempts in 2.5 s, never a hot loop.
        assert!(
            (4..=9).contains(&times.len()),
            "{} attempts in 2.5 s",
            times.len()
        );
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps[0] >= Duration::from_millis(90), "{gaps:?}");
        assert!(gaps[1] >= Duration::from_millis(190), "{gaps:?}");
        for gap in &gaps[2..] {
            assert!(*gap >= Duration::from_millis(390), "{gaps:?}");
            assert!(*gap < Duration::from_millis(700), "capped: {gaps:?}");
        }
        // Nothing was lost meanwhile.
        assert_eq!(rig.spool.as_ref().unwrap().stats().messages(), 1);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let mut b = Backoff::new(Duration::from_secs(1));
        let pauses: Vec<u64> = (0..6).map(|_| b.next_pause().as_millis() as u64).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_pause(), Duration::from_millis(100));
    }

    #[tokio::test]
    async fn acks_are_consumed_as_they_arrive_within_the_window_and_batches_share_fairly() {
        let rig = rig_with(true, 16, Duration::from_secs(20));
        rig.fake
            .set_default(Step::AckAfter(Duration::from_millis(2)));
        let delivery = rig.delivery.clone();
        // Far more messages than the window, so acks must be consumed while sending.
        let large = tokio::spawn(async move {
            let started = Instant::now();
            let r = delivery.deliver(batch("large", 3000), permit()).await;
            (r, started.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        let small = rig.deliver(batch("small", 10)).await.unwrap();
        let small_took = started.elapsed();
        assert_eq!(small.published, 10);
        let (large, large_took) = large.await.unwrap();
        let large = large.unwrap();
        assert_eq!(large.published, 3000);
        assert!(
            small_took * 5 < large_took,
            "the small batch waited for the large one: {small_took:?} vs {large_took:?}"
        );
        assert!(
            rig.fake.max_outstanding() <= 32,
            "{} acks outstanding",
            rig.fake.max_outstanding()
        );
    }

    #[tokio::test]
    async fn concurrent_large_batches_all_complete() {
        let rig = rig_with(true, 64, Duration::from_secs(20));
        rig.fake
            .set_default(Step::AckAfter(Duration::from_millis(1)));
        let mut tasks = Vec::new();
        for i in 0..4 {
            let delivery = rig.delivery.clone();
            tasks.push(tokio::spawn(async move {
                delivery
                    .deliver(batch(&format!("b{i}"), 2000), permit())
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().published, 2000);
        }
        assert_eq!(rig.fake.stored().len(), 8000);
    }

    #[tokio::test]
    async fn the_budget_is_held_until_the_batch_is_answered() {
        let rig = rig(false, 4);
        let budget = Budget::new(100 * 1024);
        rig.fake
            .set_default(Step::AckAfter(Duration::from_millis(40)));
        let b = batch("a", 10);
        let bytes: usize = b.messages.iter().map(|m| b.wire_size(m)).sum();
        let held = budget.try_acquire(bytes as u64).unwrap();
        let delivery = rig.delivery.clone();
        let task = tokio::spawn(async move { delivery.deliver(b, held).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(budget.available() < budget.total());
        // A request that does not fit in what is left is refused at once.
        assert!(budget.try_acquire(budget.total()).is_err());
        task.await.unwrap().unwrap();
        assert_eq!(budget.available(), budget.total());
    }

    #[tokio::test]
    async fn drain_to_empty_publishes_everything_or_says_why_not() {
        let rig = rig(true, 4);
        rig.fake.set_ready(false);
        rig.deliver(batch("a", 7)).await.unwrap();
        let spool = rig.spool.clone().unwrap();
        let err = drain_to_empty(&spool, &rig.fake, None, rig.options, 2)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("7 messages left"), "{err}");
        rig.fake.set_ready(true);
        let summary = drain_to_empty(&spool, &rig.fake, None, rig.options, 2)
            .await
            .unwrap();
        assert_eq!(summary.published, 7);
        assert_eq!(rig.fake.stored(), labels("a", 7));
        assert!(spool.stats().is_empty());
    }

    /// What NATS acknowledged and then lost in a power cut comes back: the batches answered
    /// `200` were kept in the retained log, and when the connection comes back to a restarted
    /// server they are published again, once each (what it kept is de-duplicated).
    #[tokio::test]
    async fn a_restarted_server_gets_again_what_it_acknowledged_and_lost() {
        let r = retaining_rig();
        let spool = r.spool.clone().unwrap();
        let keeper = r.keep();
        r.wait_kept().await;
        for tag in ["a", "b", "c"] {
            let report = r.deliver(batch(tag, 5)).await.unwrap();
            assert_eq!((report.published, report.spooled), (5, 0));
        }
        assert!(
            spool.stats().is_empty(),
            "published batches wait for nothing"
        );
        assert!(spool.stats().retained_bytes() > 0, "but they are retained");
        let _drain = r.start_drain();

        // A power cut: the server kept the first batch only, and comes back as a new process.
        r.fake.lose_after(5);
        r.fake.set_server_id("restarted");
        let until = Instant::now() + Duration::from_secs(5);
        while r.fake.stored().len() < 15 {
            assert!(
                Instant::now() < until,
                "not replayed: {:?}",
                r.fake.stored()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        r.wait_drained().await;

        let mut stored = r.fake.stored();
        stored.sort();
        let mut expected = [labels("a", 5), labels("b", 5), labels("c", 5)].concat();
        expected.sort();
        assert_eq!(stored, expected, "every event once");
        assert_eq!(
            r.fake.duplicates(),
            5,
            "what the server kept was de-duplicated"
        );
        keeper.stop().await;
    }

    /// A replay publishes again only what the restarted server acknowledged in the retention
    /// before it was last seen: older records it had synced are dropped, not sent (they would
    /// be stored twice once older than the stream's duplicate window).
    #[tokio::test]
    async fn a_replay_sends_only_what_the_lost_server_may_not_have_synced() {
        let r = retaining_rig_for(Duration::from_millis(300));
        let keeper = r.keep();
        r.wait_kept().await;
        r.deliver(batch("old", 5)).await.unwrap();
        // Older than the retention and its margin (1 s) by the time the server was last seen
        // (the keeper looks every second).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        r.deliver(batch("new", 5)).await.unwrap();
        let _drain = r.start_drain();

        r.fake.lose_after(0);
        r.fake.set_server_id("restarted");
        let until = Instant::now() + Duration::from_secs(5);
        while r.fake.stored().len() < 5 {
            assert!(Instant::now() < until, "not replayed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        r.wait_drained().await;
        tokio::time::sleep(Duration::from_millis(200)).await;

        let mut stored = r.fake.stored();
        stored.sort();
        assert_eq!(
            stored,
            labels("new", 5),
            "the synced batch is not sent again"
        );
        keeper.stop().await;
    }

    /// NATS lost power while a drain step was published to it: what it acknowledged is lost
    /// with it, and the replay for that server was taken before the step finished. The step
    /// must not count as published: it is published again to the new server.
    #[tokio::test]
    async fn a_drain_step_that_spans_a_restart_of_nats_is_published_again() {
        let r = retaining_rig();
        let spool = r.spool.clone().unwrap();
        let keeper = r.keep();
        r.wait_kept().await;
        r.fake.set_ready(false);
        assert_eq!(r.deliver(batch("a", 10)).await.unwrap().spooled, 10);
        r.fake.set_ready(true);
        r.fake.script(std::iter::repeat_n(
            Step::AckAfter(Duration::from_millis(250)),
            10,
        ));
        let _drain = r.start_drain();

        // While the step waits for its acknowledgements, the connection comes back to a
        // restarted server; then the acknowledged messages turn out lost with the old one.
        tokio::time::sleep(Duration::from_millis(50)).await;
        r.fake.set_server_id("restarted");
        tokio::time::sleep(Duration::from_millis(230)).await;
        r.fake.lose_after(0);
        let until = Instant::now() + Duration::from_secs(10);
        while r.fake.stored().len() < 10 || !spool.stats().is_empty() {
            assert!(Instant::now() < until, "lost: stored {:?}", r.fake.stored());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let mut stored = r.fake.stored();
        stored.sort();
        assert_eq!(stored, labels("a", 10));
        keeper.stop().await;
    }

    /// A move back to a server process seen before (a node of the cluster that was up all
    /// along) replays nothing; only a server never seen (started since) does.
    #[tokio::test]
    async fn a_move_to_a_server_seen_before_replays_nothing() {
        let r = retaining_rig();
        let spool = r.spool.clone().unwrap();
        let keeper = r.keep();
        r.wait_kept().await;
        let _drain = r.start_drain();
        r.deliver(batch("a", 5)).await.unwrap();
        r.fake.set_server_id("other-node");
        let until = Instant::now() + Duration::from_secs(5);
        while r.fake.sent() < 10 || !spool.stats().is_empty() {
            assert!(Instant::now() < until, "a new server got no replay");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        r.fake.set_server_id("first");
        tokio::time::sleep(Duration::from_millis(1500)).await;

        assert_eq!(r.fake.sent(), 10, "a server seen before got a replay");
        keeper.stop().await;
    }

    /// With the keeper and the drainer running, batches `a` and `b` are delivered and the
    /// keeper checks the stream (taking its mark, the last message of `b`, sequence 10);
    /// then `fault` hits the stream, with the connection still on the same server (a hub
    /// behind a leaf node, or the other nodes of a cluster, lost power). Returns once `sent`
    /// messages have been sent and the spool is empty, the keeper stopped.
    async fn replay_after(fault: impl FnOnce(&Rig), sent: usize) -> Rig {
        let r = retaining_rig();
        let keeper = r.keep();
        r.wait_kept().await;
        let _drain = r.start_drain();
        r.deliver(batch("a", 5)).await.unwrap();
        r.deliver(batch("b", 5)).await.unwrap();
        r.wait_checked().await;

        fault(&r);

        r.wait_sent_and_settled(sent).await;
        keeper.stop().await;
        r
    }

    /// The stream lost its tail (its last sequence is below one it acknowledged), with no
    /// new server process in sight: what it lost is stored again, once.
    #[tokio::test]
    async fn a_stream_that_lost_its_tail_on_the_same_server_gets_it_again() {
        let r = replay_after(|r| r.fake.lose_after(3), 20).await;
        assert_eq!(r.fake.stored().len(), 10, "every message stored once");
        assert_eq!(r.fake.duplicates(), 3);
    }

    /// The stream lost its tail, and other messages took the lost sequences before the
    /// keeper looked (its last sequence is past every one acknowledged): the message at the
    /// keeper's mark has another id, and what was lost is stored again, once.
    #[tokio::test]
    async fn a_stream_that_regrew_past_its_loss_is_caught_by_the_mark() {
        let r = replay_after(
            |r| {
                r.fake.lose_after(3);
                // Another publisher's messages, stored at sequences 4 to 13.
                for i in 0..10 {
                    r.fake.store_other(&format!("other-{i}"));
                }
            },
            20,
        )
        .await;
        let mut ours: Vec<String> = r
            .fake
            .stored()
            .into_iter()
            .filter(|label| !label.starts_with("other"))
            .collect();
        ours.sort();
        let mut expected = [labels("a", 5), labels("b", 5)].concat();
        expected.sort();
        assert_eq!(ours, expected, "every message stored once");
    }

    /// Messages acknowledged while a check is under way (stored after the stream's answer
    /// was made) are no sign of a loss: nothing is published again.
    #[tokio::test]
    async fn acknowledgements_during_a_check_are_no_loss() {
        let r = retaining_rig();
        let spool = r.spool.clone().unwrap();
        let keeper = r.keep();
        r.wait_kept().await;
        let _drain = r.start_drain();
        r.deliver(batch("a", 5)).await.unwrap();
        r.fake.ack_during_checks(true);

        r.wait_checked().await;
        r.wait_checked().await;

        assert_eq!(r.fake.sent(), 5, "published again");
        assert!(spool.stats().is_empty());
        keeper.stop().await;
    }

    /// The stream was deleted and created again: everything retained is stored again.
    #[tokio::test]
    async fn a_stream_created_again_gets_everything_retained() {
        let r = replay_after(|r| r.fake.recreate_stream(), 20).await;
        assert_eq!(r.fake.stored().len(), 10);
    }

    /// A server that stops answering while the connection still looks up (a host that lost
    /// power silently) expires nothing, however long: its unsynced messages may be lost.
    /// Once the stream answers again, the records expire.
    #[tokio::test]
    async fn nothing_expires_while_the_stream_does_not_answer() {
        let r = retaining_rig_for(Duration::from_millis(100));
        let spool = r.spool.clone().unwrap();
        let keeper = r.keep();
        r.wait_kept().await;
        r.fake.set_silent(true);
        r.deliver(batch("a", 5)).await.unwrap();

        // Three checks, well past the hold and its margin.
        tokio::time::sleep(Duration::from_millis(3200)).await;
        assert!(spool.stats().retained_bytes() > 0, "expired unanswered");

        r.fake.set_silent(false);
        let until = Instant::now() + Duration::from_secs(5);
        while spool.stats().retained_bytes() > 0 {
            assert!(Instant::now() < until, "not expired once answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(r.fake.sent(), 5, "nothing replayed");
        keeper.stop().await;
    }

    /// Without a restart (the same server after a blip) nothing is replayed.
    #[tokio::test]
    async fn the_same_server_after_a_blip_gets_nothing_again() {
        let r = retaining_rig();
        let spool = r.spool.clone().unwrap();
        let keeper = r.keep();
        r.wait_kept().await;
        r.deliver(batch("a", 5)).await.unwrap();
        r.fake.set_ready(false);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        r.fake.set_ready(true);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(r.fake.sent(), 5, "nothing sent again");
        assert!(spool.stats().is_empty());
        keeper.stop().await;
    }

    /// A batch NATS took but the retained log could not keep (a full disk) is not `200`:
    /// a power cut could lose it. The sender's retry is de-duplicated.
    #[tokio::test]
    async fn a_batch_the_retained_log_cannot_keep_is_not_200() {
        let dir = tempfile::tempdir().unwrap();
        let (one, _) = {
            let mut buf = Vec::new();
            let n = BatchRest {
                batch: Arc::new(batch("a", 5)),
                start: 0,
            }
            .encode(&mut buf, 0)
            .unwrap();
            (buf, n)
        };
        let mut spool = Spool::open(dir.path(), one.len() as u64 + 10).unwrap();
        spool.retain(Duration::from_secs(60)).unwrap();
        let r = rig_on(dir, Some(spool), 64, TIMEOUT);
        r.deliver(batch("a", 5)).await.unwrap();

        let refused = r.deliver(batch("b", 5)).await;

        assert!(
            matches!(&refused, Err(DeliveryError::Unavailable(m)) if m.contains("could not be kept")),
            "{refused:?}"
        );
    }
}
