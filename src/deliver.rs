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
//! - otherwise the batch is published directly (in a task of its own, so batches progress
//!   side by side); what NATS cannot take in time (a temporary failure) goes back to the actor
//!   and is appended to the spool, and a permanent refusal is answered without spooling
//!   (`413` for an oversized message, else `503`), so it can never block the spool.
//!
//! Publishing ([`publish_run`]) sends a batch in entry order with at most `window` messages
//! unacknowledged and consumes acknowledgements as they arrive, within `publish_timeout`:
//! any batch completes in time proportional to its size, and a large batch holds no more of
//! the connection than its window, so concurrent batches share it fairly.
//!
//! The drainer ([`drain`]) publishes the spool in order whenever NATS is ready. A message NATS
//! refuses for good is moved to the quarantine and the drain goes on; temporary failures and
//! failing disks are retried with exponential back-off capped at `spool.retry_max_interval`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};

use crate::budget::Permit;
use crate::metrics;
use crate::publish::{NatsMessage, Outbound, Oversized, Publish, PublishError};
use crate::spool::{encode_record, Records, SpoolError, SpoolHandle};
use crate::webhook::OutgoingBatch;

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
            window: 1024,
            retry_max_interval: Duration::from_secs(5),
        }
    }
}

type Reply = oneshot::Sender<Result<DeliveryReport, DeliveryError>>;

enum Command {
    Deliver {
        batch: OutgoingBatch,
        permit: Permit,
        reply: Reply,
    },
    /// A direct publication failed temporarily: spool what was not acknowledged.
    SpoolRest {
        batch: OutgoingBatch,
        done: Progress,
        permit: Permit,
        reply: Reply,
    },
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

    /// Delivers `batch`, holding `permit` (its share of the byte budget) until it is on the
    /// bus, spooled, or refused.
    pub async fn deliver(
        &self,
        batch: OutgoingBatch,
        permit: Permit,
    ) -> Result<DeliveryReport, DeliveryError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || DeliveryError::Unavailable("the service is stopping".into());
        self.tx
            .send(Command::Deliver {
                batch,
                permit,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
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
                    let _ = reply.send(Err(DeliveryError::TooLarge(oversized)));
                    continue;
                }
                match &spool {
                    Some(spool) if !spool.stats().is_empty() => {
                        spool_rest(spool, batch, Progress::default(), permit, reply);
                    }
                    _ => {
                        let Some(back) = back.upgrade() else { return };
                        tokio::spawn(direct(
                            publisher.clone(),
                            batch,
                            permit,
                            reply,
                            spool.is_some().then_some(back),
                            options.window,
                        ));
                    }
                }
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
async fn direct<P: Publish>(
    publisher: P,
    batch: OutgoingBatch,
    permit: Permit,
    reply: Reply,
    back: Option<mpsc::Sender<Command>>,
    window: usize,
) {
    let failure = match publish_run(&publisher, &batch, window).await {
        Ok(done) => {
            let _ = reply.send(Ok(DeliveryReport {
                published: done.acked,
                duplicates: done.duplicates,
                spooled: 0,
            }));
            return;
        }
        Err(failure) => failure,
    };
    let answer = match failure.error {
        PublishError::TooLarge(oversized) => Err(DeliveryError::TooLarge(oversized)),
        error if error.is_temporary() => match back {
            Some(back) => {
                tracing::warn!(%error, acked = failure.done.acked, "NATS did not take the batch; spooling the rest");
                let command = Command::SpoolRest {
                    batch,
                    done: failure.done,
                    permit,
                    reply,
                };
                if let Err(mpsc::error::SendError(Command::SpoolRest { reply, .. })) =
                    back.send(command).await
                {
                    let _ = reply.send(Err(unpublished()));
                }
                return;
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
    };
    let _ = reply.send(answer);
}

/// Hands the unacknowledged rest of `batch` to the spool writer (in the actor, so in arrival
/// order) and answers `reply` once it is durable.
fn spool_rest(
    spool: &SpoolHandle,
    batch: OutgoingBatch,
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
    batch: OutgoingBatch,
    start: usize,
}

impl Records for BatchRest {
    fn encode(&self, out: &mut Vec<u8>, at_ms: u64) -> Result<u64, SpoolError> {
        let messages = self.batch.messages.get(self.start..).unwrap_or_default();
        for m in messages {
            let headers = self.batch.headers(m);
            let values: Vec<String> = headers.iter().map(|(_, v)| v.to_string()).collect();
            encode_record(
                out,
                &m.subject,
                headers
                    .iter()
                    .zip(&values)
                    .map(|((name, _), value)| (*name, value.as_str())),
                &m.payload,
                at_ms,
            )?;
        }
        Ok(messages.len() as u64)
    }
}

/// A sequence of messages that can be published.
pub trait Source: Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Message `i`, as handed to the client.
    fn outbound(&self, i: usize) -> Outbound;
}

impl Source for OutgoingBatch {
    fn len(&self) -> usize {
        self.messages.len()
    }

    fn outbound(&self, i: usize) -> Outbound {
        Outbound::from_message(self, &self.messages[i])
    }
}

impl Source for Vec<NatsMessage> {
    fn len(&self) -> usize {
        <[NatsMessage]>::len(self)
    }

    fn outbound(&self, i: usize) -> Outbound {
        self[i].to_outbound()
    }
}

/// How far a publication got: the acknowledged prefix.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub acked: usize,
    pub duplicates: usize,
}

/// A publication that did not complete.
#[derive(Debug)]
pub struct Failure {
    pub error: PublishError,
    /// The acknowledged prefix; message `done.acked` is the first not known to be stored.
    pub done: Progress,
    /// The message the error is about.
    pub at: usize,
}

/// Publishes `messages` in order within the publisher's timeout, at most `window` of them
/// unacknowledged at a time, consuming acknowledgements as they arrive.
pub async fn publish_run<P: Publish, S: Source + ?Sized>(
    publisher: &P,
    messages: &S,
    window: usize,
) -> Result<Progress, Failure> {
    let n = messages.len();
    if n == 0 {
        return Ok(Progress::default());
    }
    if !publisher.is_ready() {
        return Err(Failure {
            error: PublishError::NotConnected,
            done: Progress::default(),
            at: 0,
        });
    }
    let timeout = publisher.timeout();
    let deadline = tokio::time::Instant::now() + timeout;
    let window = window.max(1);
    let mut done = Progress::default();
    // (position, error) of the first failure.
    let mut failed: Option<(usize, PublishError)> = None;
    let work = async {
        let mut acks = FuturesOrdered::new();
        let mut next = 0;
        loop {
            // Take every acknowledgement that is already there before sending more.
            while let Some(Some(ack)) = acks.next().now_or_never() {
                match ack {
                    Ok(ack) => count(&mut done, ack),
                    Err(error) => {
                        failed = Some((done.acked, error));
                        return;
                    }
                }
            }
            if next < n && acks.len() < window && failed.is_none() {
                match publisher.send(messages.outbound(next), next).await {
                    Ok(ack) => {
                        acks.push_back(ack);
                        next += 1;
                    }
                    // Stop sending, but collect the acknowledgements of what went before,
                    // so the acknowledged prefix reaches the failed message.
                    Err(error) => failed = Some((next, error)),
                }
                continue;
            }
            match acks.next().await {
                Some(Ok(ack)) => count(&mut done, ack),
                Some(Err(error)) => {
                    failed = Some((done.acked, error));
                    return;
                }
                None => break,
            }
        }
        if failed.is_none() {
            if let Err(error) = publisher.settle().await {
                failed = Some((0, error));
            }
        }
    };
    if tokio::time::timeout_at(deadline, work).await.is_err() && failed.is_none() {
        failed = Some((done.acked, PublishError::Timeout(timeout)));
    }
    match failed {
        None => Ok(done),
        Some((at, error)) => {
            if !publisher.confirms_each() {
                // Nothing sent is known to be on the server before a flush succeeded.
                done = Progress::default();
            }
            Err(Failure { error, done, at })
        }
    }
}

fn count(done: &mut Progress, ack: crate::publish::Ack) {
    done.acked += 1;
    done.duplicates += usize::from(ack.duplicate);
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
    /// Messages left the spool (published or quarantined).
    Progressed {
        published: usize,
        quarantined: usize,
    },
    /// Nothing could be done now; retry after a pause.
    Failed(String),
}

/// Publishes the spool in order: one step of at most [`DRAIN_BATCH`] messages.
pub async fn drain_step<P: Publish>(spool: &SpoolHandle, publisher: &P, window: usize) -> Step {
    if spool.stats().len() == 0 {
        return Step::Empty;
    }
    if !publisher.is_ready() {
        return Step::NotReady;
    }
    let batch = match spool.read(DRAIN_BATCH).await {
        Ok(batch) if batch.messages.is_empty() => return Step::Empty,
        Ok(batch) => Arc::new(batch),
        Err(e) => return Step::Failed(format!("cannot read the spool: {e}")),
    };
    let (done, failure) = match publish_run(publisher, &batch.messages, window).await {
        Ok(done) => (done, None),
        Err(failure) => (failure.done, Some(failure)),
    };
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
        };
    };
    if failure.error.is_temporary() || failure.at != done.acked {
        return Step::Failed(failure.error.to_string());
    }
    let reason = failure.error.to_string();
    let message = &batch.messages[failure.at];
    let (subject, msg_id) = (
        message.subject.clone(),
        message.header("Nats-Msg-Id").unwrap_or("").to_owned(),
    );
    match spool
        .quarantine(batch.clone(), failure.at, reason.clone())
        .await
    {
        Ok(()) => {
            tracing::error!(%subject, %msg_id, %reason, "NATS refuses a spooled message for good; moved to the quarantine");
            metrics::spool_quarantined(spool.stats().quarantined());
            Step::Progressed {
                published: done.acked,
                quarantined: 1,
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot move a refused message to the quarantine");
            Step::Failed(format!("cannot quarantine a refused message: {e}"))
        }
    }
}

/// Publishes the spool's messages in order whenever NATS is ready, until `stop` turns true.
pub async fn drain<P: Publish>(
    spool: SpoolHandle,
    publisher: P,
    mut stop: watch::Receiver<bool>,
    options: DeliveryOptions,
) {
    let mut backoff = Backoff::new(options.retry_max_interval);
    let mut failures = 0u32;
    metrics::spool_quarantined(spool.stats().quarantined());
    loop {
        if *stop.borrow() {
            return;
        }
        metrics::spool_depth(spool.stats().len(), spool.stats().bytes());
        let pause = match drain_step(&spool, &publisher, options.window).await {
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
                    tracing::info!(remaining = spool.stats().len(), "spool draining again");
                }
                failures = 0;
                backoff.reset();
                continue;
            }
            Step::Failed(reason) => {
                failures += 1;
                let pause = backoff.next_pause();
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(%reason, remaining = spool.stats().len(), retry_in = ?pause, "spool drain paused");
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
}

/// Drains the spool until it is empty (`cmc-forwarder spool drain`); gives up after
/// `max_failures` failed attempts in a row, saying why.
pub async fn drain_to_empty<P: Publish>(
    spool: &SpoolHandle,
    publisher: &P,
    options: DeliveryOptions,
    max_failures: u32,
) -> Result<DrainSummary, DrainError> {
    let mut summary = DrainSummary::default();
    let mut backoff = Backoff::new(options.retry_max_interval);
    let mut failures = 0;
    loop {
        let step = drain_step(spool, publisher, options.window).await;
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
            } => {
                summary.published += published;
                summary.quarantined += quarantined;
                failures = 0;
                backoff.reset();
            }
            Step::NotReady | Step::Failed(_) if failures + 1 >= max_failures => {
                return Err(DrainError(format!(
                    "{} messages left in the spool after {} attempts: {reason}",
                    spool.stats().len(),
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
