//! Publishing to NATS: one call that puts a whole batch on the bus or says honestly that it
//! could not. The connection and the stream are set up by [`crate::nats`].
//!
//! [`Publish`] is the seam delivery works through: begin a publication, put its messages on
//! the connection in order, and take their acknowledgements in that order, or, in `core`
//! mode, immediate ones plus a final flush. Delivery (`deliver.rs`) decides the window, the
//! deadline and what a failure means; tests drive it with an in-memory fake instead of a
//! nats-server.
//!
//! In `jetstream` mode a publication subscribes to an inbox of its own and each message asks
//! for its PubAck there (`<inbox>.<n>`), instead of going through the client's JetStream
//! `publish`: that one made an inbox string, a oneshot channel, a semaphore permit and two
//! timers per message and read each PubAck through an untagged enum (8% of the service's
//! instructions, 19% of its CPU per event; `docs/performance.md`). The publication's deadline
//! bounds the wait for all of them.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::header::HeaderName;
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, HeaderMap, StatusCode, Subject, Subscriber};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use serde::Deserialize;
use thiserror::Error;

use crate::nats::Health;
pub use crate::nats::SetupError;
use crate::objects::{self, ObjectFailure};
pub use crate::objects::{BucketSpec, ObjectMeta, StoredObject};
use crate::settings::NatsSettings;
use crate::webhook::{Outgoing, OutgoingBatch};
pub use crate::wire::{NatsMessage, StoredMark};
use tokio::io::AsyncRead;

/// The acknowledgement of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ack {
    /// JetStream already stored a message with this `Nats-Msg-Id`.
    pub duplicate: bool,
    /// Where the stream stored it (0 in core mode).
    pub sequence: u64,
}

/// What the stream says of itself when asked ([`Publish::stream_state`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamState {
    /// When it was created: another value means it was deleted and created again.
    pub created: String,
    /// The sequence of the last message it holds.
    pub last_sequence: u64,
}

/// The future of one message's acknowledgement, boxed (the in-memory fake's).
#[cfg(test)]
pub type AckFuture = std::pin::Pin<Box<dyn Future<Output = Result<Ack, PublishError>> + Send>>;

/// The acknowledgements of one publication, taken in the order its messages were sent.
pub trait Acks: Send {
    /// The acknowledgement of the oldest message sent and not yet acknowledged. Only called
    /// while one is outstanding; returning `Pending` loses nothing (a caller may stop
    /// polling and come back).
    fn poll_next_ack(&mut self, cx: &mut Context<'_>) -> Poll<Result<Ack, PublishError>>;
}

/// The network seam: what delivery needs from NATS, and nothing more.
///
/// A publication is begun ([`Publish::begin`]), its messages are put on the connection in the
/// order of the `send` calls, and their acknowledgements are taken in that order.
pub trait Publish: Clone + Send + Sync + 'static {
    /// One publication's acknowledgements.
    type Run: Acks;
    /// Begins a publication (in `jetstream` mode: the inbox its PubAcks come back to).
    fn begin(&self) -> impl Future<Output = Result<Self::Run, PublishError>> + Send;
    /// The largest message (headers and payload) the server takes.
    fn max_payload(&self) -> usize;
    /// Whether publishing can succeed now (connected, stream usable).
    fn is_ready(&self) -> bool;
    /// `nats.publish_timeout`: the time one batch may take.
    fn timeout(&self) -> Duration;
    /// Whether each acknowledgement confirms its message (JetStream). When false (core mode)
    /// nothing sent is confirmed until [`Publish::settle`] has succeeded.
    fn confirms_each(&self) -> bool;
    /// Puts `message` (the `index`-th of its batch, for error reports) on the connection, its
    /// acknowledgement to come to `run`.
    fn send(
        &self,
        run: &mut Self::Run,
        message: Outbound,
        index: usize,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
    /// Resolves once everything sent so far has reached the server (core mode's flush).
    fn settle(&self) -> impl Future<Output = Result<(), PublishError>> + Send;
    /// A mark of the publish denials seen so far (the server answers a message it does not
    /// let this user publish with an error, never with an acknowledgement).
    fn denial_mark(&self) -> u64;
    /// Resolves with the subject of the first denial after `mark`, and that denial's mark.
    fn next_denial(&self, mark: u64) -> impl Future<Output = (String, u64)> + Send;
    /// Told of every failed publication, so the publisher can act on what it says about the
    /// server (a stream that stopped answering is set up again).
    fn failed(&self, _error: &PublishError) {}
    /// The id of the server the connection is on: a new one after that server restarted
    /// (or the connection moved to another), when it may have lost what it acknowledged.
    fn server_id(&self) -> Option<String> {
        None
    }
    /// Resolves when the connection is next (re-)established (never, where nothing tells).
    fn reconnected(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
    /// Told of the last message of every publication JetStream acknowledged in full (once per
    /// publication, not per message).
    fn note_stored(&self, _sequence: u64, _msg_id: &str) {}
    /// The latest message [`Publish::note_stored`] was told of.
    fn last_stored(&self) -> Option<StoredMark> {
        None
    }
    /// Whether the stream still holds `mark`'s message at its sequence (false when it holds
    /// another there, or nothing, or the stream is gone).
    fn stream_holds(
        &self,
        _mark: &StoredMark,
    ) -> impl Future<Output = Result<bool, PublishError>> + Send {
        std::future::ready(Ok(false))
    }

    /// Asks the stream for its state, within [`Publish::timeout`]: an answer shows that the
    /// server holding it is alive and has a leader for it. `None`: the stream does not exist.
    fn stream_state(
        &self,
    ) -> impl Future<Output = Result<Option<StreamState>, PublishError>> + Send {
        std::future::ready(Ok(Some(StreamState::default())))
    }
    /// The highest stream sequence JetStream acknowledged (as [`Publish::note_stored`] was
    /// told) since [`Publish::forget_stored`].
    fn high_sequence(&self) -> u64 {
        0
    }
    /// Forgets what [`Publish::note_stored`] was told (the stream was found to have lost
    /// messages, and its sequences are its own again): [`Publish::high_sequence`] starts
    /// again from `sequence` (the stream's last), and there is no last stored message.
    fn forget_stored(&self, _sequence: u64) {}

    /// Whether the connection is up, whatever the stream's state (the inbound path stores
    /// objects, which need no stream of events).
    fn is_connected(&self) -> bool {
        self.is_ready()
    }
    /// A usable handle on an object store bucket.
    type Bucket: Clone + Send + Sync + 'static;
    /// Creates or finds the bucket (see [`BucketSpec`]), within [`Publish::timeout`].
    fn open_bucket(
        &self,
        spec: &BucketSpec,
    ) -> impl Future<Output = Result<Self::Bucket, PublishError>> + Send;
    /// What `bucket` holds under `name` (none when nothing), within [`Publish::timeout`].
    fn object_info(
        &self,
        bucket: &Self::Bucket,
        name: &str,
    ) -> impl Future<Output = Result<Option<StoredObject>, PublishError>> + Send;
    /// Puts one object from `data` into `bucket`, all of it within `bound`; what was stored.
    /// A failed upload leaves nothing of itself in the bucket.
    fn put_object<R: AsyncRead + Unpin + Send>(
        &self,
        bucket: &Self::Bucket,
        meta: ObjectMeta,
        data: &mut R,
        bound: Duration,
    ) -> impl Future<Output = Result<StoredObject, PublishError>> + Send;
}

/// The cause of a [`PublishError`]: the client's own error, or the server's answer.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a batch is not (entirely) on the bus. The variant is the kind of failure, which
/// decides what delivery does ([`PublishError::is_temporary`]); the cause is kept as its
/// `source`. The message repeats the cause's text, so a one-line log still says what NATS
/// answered.
#[derive(Debug, Error)]
pub enum PublishError {
    #[error("NATS is not connected")]
    NotConnected,
    #[error("NATS did not acknowledge the batch within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    TooLarge(Oversized),
    #[error("no JetStream stream answered: {0}")]
    NoStream(#[source] Cause),
    #[error("NATS connection failed: {0}")]
    Connection(#[source] Cause),
    /// JetStream answered, but could not store the message now (insufficient resources, a
    /// stream at its limits with `discard: new`, no leader, …): waiting can fix it.
    #[error("JetStream could not store the message now: {0}")]
    NotStored(#[source] Cause),
    #[error("NATS refused the batch: {0}")]
    Refused(#[source] Cause),
    /// The object store did not take an object (or its bucket is not usable) now.
    #[error("object store: {0}")]
    Object(#[source] Cause),
}

/// The server's `-ERR` for a message this NATS user may not publish: the cause of a
/// [`PublishError::Refused`].
#[derive(Debug, Error)]
#[error("permission denied: this NATS user may not publish to {subject:?}")]
pub struct Denied {
    pub subject: String,
}

/// One entry's message is larger than the server's `max_payload`: a permanent refusal (413).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oversized {
    pub index: usize,
    /// The message's wire size, when known (the client's own check does not report it).
    pub size: Option<usize>,
    pub max: usize,
}

impl std::fmt::Display for Oversized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "entry {}: its message is ", self.index)?;
        if let Some(size) = self.size {
            write!(f, "{size} bytes, ")?;
        }
        write!(f, "over the NATS max_payload of {} bytes", self.max)
    }
}

impl std::error::Error for Oversized {}

impl PublishError {
    /// Whether NATS refused the message for good: spooling it could only block the spool.
    pub fn is_permanent(&self) -> bool {
        !self.is_temporary()
    }

    /// Whether waiting can fix it (so the batch may be spooled): no connection, no answer
    /// in time, no stream serving the subject for now. Refusals (permissions, limits,
    /// oversized messages) are permanent and must never be spooled, or they would block it.
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            PublishError::NotConnected
                | PublishError::Timeout(_)
                | PublishError::NoStream(_)
                | PublishError::Connection(_)
                | PublishError::NotStored(_)
                | PublishError::Object(_)
        )
    }
}

/// What JetStream answered to one published message, read from the reply: its PubAck, or why
/// the message is not stored. `no_responders`: the reply is the server's 503 status.
pub(crate) fn read_pub_ack(no_responders: bool, payload: &[u8]) -> Result<Ack, PublishError> {
    // "No responders": no stream is serving the subject right now, as during a leader
    // election or while a stream is being restored. Worth waiting for.
    if no_responders {
        return Err(PublishError::NoStream(
            "no responders: no stream serves the subject now".into(),
        ));
    }
    /// A PubAck, or an API error (the fields of `jetstream::publish::PublishAck` read here).
    #[derive(Deserialize)]
    struct Reply {
        #[serde(default)]
        seq: u64,
        #[serde(default)]
        duplicate: bool,
        #[serde(default)]
        error: Option<jetstream::Error>,
    }
    match serde_json::from_slice::<Reply>(payload) {
        Ok(Reply {
            error: Some(error), ..
        }) => Err(api_refusal(error)),
        Ok(reply) => Ok(Ack {
            duplicate: reply.duplicate,
            sequence: reply.seq,
        }),
        Err(e) => Err(PublishError::NotStored(Box::new(UnreadableAck(e)))),
    }
}

/// A reply to a published message that is neither a PubAck nor an API error.
#[derive(Debug, Error)]
#[error("unreadable PubAck: {0}")]
pub struct UnreadableAck(#[source] serde_json::Error);

/// An API error in a PubAck, by its JetStream error code: only what can never be stored for
/// this message is a refusal (quarantined, or answered without spooling). A permission denied
/// on the subject never comes as a PubAck: the server answers it with `-ERR`, which
/// `next_denial` watches.
/// Whether `error` is JetStream's answer that the stream does not exist.
fn is_stream_not_found(error: &(dyn std::error::Error + 'static)) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .is_some_and(|api| api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

fn api_refusal(error: jetstream::Error) -> PublishError {
    if error.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM {
        PublishError::Refused(Box::new(error))
    } else {
        PublishError::NotStored(Box::new(error))
    }
}

/// What an object call's failure means for delivery: waiting can fix it.
fn object_error(failure: ObjectFailure) -> PublishError {
    match failure {
        ObjectFailure::Timeout(bound) => PublishError::Timeout(bound),
        ObjectFailure::Failed(message) => PublishError::Object(message.into()),
        ObjectFailure::NotYet(message) => PublishError::NotStored(message.into()),
    }
}

/// The acknowledgements of one publication of [`Publisher`]: the inbox its PubAcks come back
/// to (`jetstream` mode), or nothing to wait for (`core` mode: a count of immediate ones).
pub enum NatsRun {
    Core,
    JetStream(InboxAcks),
}

impl Acks for NatsRun {
    fn poll_next_ack(&mut self, cx: &mut Context<'_>) -> Poll<Result<Ack, PublishError>> {
        match self {
            NatsRun::Core => Poll::Ready(Ok(Ack::default())),
            NatsRun::JetStream(inbox) => inbox.poll_next_ack(cx),
        }
    }
}

/// A publication's own inbox: message `n` of the publication asks for its PubAck on
/// `<prefix><n>`; replies are kept until their turn comes (a stream acknowledges in order, but
/// nothing here depends on it).
pub struct InboxAcks {
    subscriber: Subscriber,
    /// `<inbox>.`, the inbox subscribed to as `<inbox>.*`.
    prefix: String,
    /// The number of the oldest message whose acknowledgement was not taken yet.
    base: usize,
    /// From `base` on, each message sent: its acknowledgement once it came.
    waiting: VecDeque<Option<Result<Ack, PublishError>>>,
}

impl InboxAcks {
    /// The reply subject of the next message sent.
    fn next_reply(&self) -> String {
        use std::fmt::Write;
        let mut reply = String::with_capacity(self.prefix.len() + 8);
        reply.push_str(&self.prefix);
        let _ = write!(reply, "{}", self.base + self.waiting.len());
        reply
    }

    /// Files a reply where it belongs; one for no message of this publication (or a second
    /// for the same) is dropped.
    fn file(&mut self, message: async_nats::Message) {
        let Some(number) = message
            .subject
            .as_str()
            .strip_prefix(self.prefix.as_str())
            .and_then(|n| n.parse::<usize>().ok())
        else {
            return;
        };
        let Some(slot) = number
            .checked_sub(self.base)
            .and_then(|at| self.waiting.get_mut(at))
        else {
            return;
        };
        if slot.is_none() {
            let no_responders = message.status == Some(StatusCode::NO_RESPONDERS);
            *slot = Some(read_pub_ack(no_responders, &message.payload));
        }
    }

    fn poll_next_ack(&mut self, cx: &mut Context<'_>) -> Poll<Result<Ack, PublishError>> {
        loop {
            if let Some(Some(_)) = self.waiting.front() {
                self.base += 1;
                let ack = self
                    .waiting
                    .pop_front()
                    .flatten()
                    .expect("an acknowledgement");
                return Poll::Ready(ack);
            }
            match self.subscriber.poll_next_unpin(cx) {
                Poll::Ready(Some(message)) => self.file(message),
                // The client is gone (the service is shutting down).
                Poll::Ready(None) => return Poll::Ready(Err(PublishError::NotConnected)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The shared publisher: one NATS connection, and the JetStream context in `jetstream` mode.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    jetstream: Option<jetstream::Context>,
    timeout: Duration,
    /// Set once the stream has been created or found (always true in core mode): readiness
    /// needs it, because publishing to a missing stream can only fail.
    stream_ready: Arc<AtomicBool>,
    /// Why the stream is not usable (the last set-up error), for `/readyz`.
    stream_problem: Arc<std::sync::Mutex<Option<String>>>,
    /// A background task is setting the stream up: one at a time.
    recovering: Arc<AtomicBool>,
    settings: Arc<NatsSettings>,
    /// `validation.dead_letter_subject` in dead-letter mode: an existing stream must cover it
    /// too.
    dead_letter: Option<Arc<crate::subject::SubjectTemplate>>,
    /// The connection's health as its events tell it (last failure, denied subjects).
    health: Arc<Health>,
    /// The latest message JetStream acknowledged ([`Publish::note_stored`]).
    last_stored: Arc<std::sync::Mutex<Option<StoredMark>>>,
    /// [`Publish::high_sequence`].
    high_sequence: Arc<AtomicU64>,
}

impl Publisher {
    /// Connects, waiting up to `connect_timeout` for the first connection; if NATS is not
    /// reachable by then, returns anyway and keeps connecting in the background.
    pub async fn connect(settings: &NatsSettings) -> Result<Publisher, SetupError> {
        let (client, health) = crate::nats::connect(settings).await?;
        let jetstream = crate::nats::jetstream(&client, settings);
        Ok(Publisher {
            stream_ready: Arc::new(AtomicBool::new(jetstream.is_none())),
            stream_problem: Arc::default(),
            recovering: Arc::default(),
            client,
            jetstream,
            timeout: settings.publish_timeout,
            settings: Arc::new(settings.clone()),
            dead_letter: None,
            health,
            last_stored: Arc::default(),
            high_sequence: Arc::default(),
        })
    }

    /// Makes [`Publisher::ensure_stream`] check that an existing stream also covers the
    /// dead-letter subjects.
    pub fn with_dead_letter(mut self, template: Option<crate::subject::SubjectTemplate>) -> Self {
        self.dead_letter = template.map(Arc::new);
        self
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Whether a batch can be published now: connected, and the stream is usable.
    pub fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// Why the publisher is not ready, for `/readyz`.
    pub fn not_ready_reason(&self) -> Option<String> {
        if !self.is_connected() {
            Some(match self.health.last_error() {
                Some(cause) => format!("NATS is not connected: {cause}"),
                None => "NATS is not connected".into(),
            })
        } else if !self.stream_ready.load(Ordering::Acquire) {
            let problem = self.stream_problem.lock().expect("not poisoned").clone();
            Some(match problem {
                Some(problem) => format!(
                    "the JetStream stream {} is not usable: {problem}",
                    self.settings.stream.name
                ),
                None => format!(
                    "the JetStream stream {} is not usable yet",
                    self.settings.stream.name
                ),
            })
        } else {
            None
        }
    }

    /// Creates or updates the stream (`nats.stream.create`), or checks that it exists and
    /// covers the subjects. A no-op in core mode.
    pub async fn ensure_stream(&self) -> Result<(), SetupError> {
        let Some(js) = &self.jetstream else {
            return Ok(());
        };
        let ensured =
            crate::nats::ensure_stream(js, &self.settings, self.dead_letter.as_deref()).await;
        *self.stream_problem.lock().expect("not poisoned") =
            ensured.as_ref().err().map(|e| e.to_string());
        ensured?;
        self.stream_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Keeps trying [`Publisher::ensure_stream`] until it succeeds (used when NATS was not
    /// reachable at start-up, and when the stream stopped answering). One at a time.
    pub async fn ensure_stream_in_background(self) {
        if self.recovering.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut logged = false;
        loop {
            if self.is_connected() {
                match self.ensure_stream().await {
                    Ok(()) => {
                        tracing::info!(stream = %self.settings.stream.name, "stream ready");
                        break;
                    }
                    Err(e) if !logged => {
                        tracing::error!(error = %e, "stream not usable yet; retrying");
                        logged = true;
                    }
                    Err(_) => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.recovering.store(false, Ordering::Release);
    }

    /// A publication found no stream answering its subject: the stream was deleted (or is
    /// electing a leader). Marks it unusable, so `/readyz` says so and batches go to the spool
    /// (or get `503`) instead of failing one by one, and sets it up again in the background:
    /// created anew with `nats.stream.create = true`, waited for otherwise.
    fn stream_lost(&self, reason: &str) {
        if self.jetstream.is_none() || !self.stream_ready.swap(false, Ordering::AcqRel) {
            return;
        }
        tracing::error!(stream = %self.settings.stream.name, %reason, "the stream stopped answering; setting it up again");
        *self.stream_problem.lock().expect("not poisoned") =
            Some(format!("no stream answers its subjects ({reason})"));
        tokio::spawn(self.clone().ensure_stream_in_background());
    }

    /// A JetStream context on the shared connection whatever `nats.mode`: the inbound
    /// object store needs one even when events go out as core messages.
    pub fn jetstream_context(&self) -> jetstream::Context {
        self.jetstream.clone().unwrap_or_else(|| {
            jetstream::ContextBuilder::new()
                .timeout(self.timeout)
                .build(self.client.clone())
        })
    }

    /// `nats.publish_timeout`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The `max_payload` the server announced.
    pub fn max_payload(&self) -> usize {
        self.client.max_payload()
    }

    /// Flushes what the connection still buffers (at shutdown), within `publish_timeout`.
    ///
    /// Bounded because async-nats completes a flush only once the buffer is written to a
    /// connected server: with NATS down it waits for the reconnection, with NATS frozen for
    /// the socket to drain, i.e. forever, and SIGTERM would never end the process. Nothing
    /// promised is at stake: every `200` already has its PubAck, its spool record, or (core
    /// mode) its own flush.
    pub async fn flush(&self) {
        if !self.is_connected() {
            tracing::warn!("NATS not connected at shutdown; nothing to flush");
            return;
        }
        match tokio::time::timeout(self.timeout, self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "final NATS flush failed"),
            Err(_) => tracing::warn!(timeout = ?self.timeout, "final NATS flush timed out"),
        }
    }
}

/// Implemented on a shared publisher: delivery, the drainer and the inbound path hold one
/// reference count rather than a copy of the client and the JetStream context.
impl Publish for Arc<Publisher> {
    type Run = NatsRun;

    async fn begin(&self) -> Result<NatsRun, PublishError> {
        if self.jetstream.is_none() {
            return Ok(NatsRun::Core);
        }
        // Subscribed before any message is sent: the client puts the SUB on the connection
        // before them, so the server knows the inbox when the first PubAck leaves.
        let inbox = self.client.new_inbox();
        let subscriber = self
            .client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| PublishError::Connection(e.into()))?;
        Ok(NatsRun::JetStream(InboxAcks {
            subscriber,
            prefix: format!("{inbox}."),
            base: 0,
            waiting: VecDeque::new(),
        }))
    }

    fn max_payload(&self) -> usize {
        self.client.max_payload()
    }

    fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn confirms_each(&self) -> bool {
        self.jetstream.is_some()
    }

    async fn send(
        &self,
        run: &mut NatsRun,
        message: Outbound,
        index: usize,
    ) -> Result<(), PublishError> {
        let max = self.client.max_payload();
        let size = message.wire_size();
        if size > max {
            return Err(PublishError::TooLarge(Oversized {
                index,
                size: Some(size),
                max,
            }));
        }
        match run {
            NatsRun::JetStream(inbox) => {
                let reply = inbox.next_reply();
                self.client
                    .publish_with_reply_and_headers(
                        message.subject,
                        reply,
                        message.headers,
                        message.payload,
                    )
                    .await
                    .map_err(|e| PublishError::Connection(e.into()))?;
                inbox.waiting.push_back(None);
            }
            NatsRun::Core => {
                if !self.is_connected() {
                    return Err(PublishError::NotConnected);
                }
                self.client
                    .publish_with_headers(message.subject, message.headers, message.payload)
                    .await
                    .map_err(|e| PublishError::Connection(e.into()))?;
            }
        }
        Ok(())
    }

    fn denial_mark(&self) -> u64 {
        self.health.denial_mark()
    }

    async fn next_denial(&self, mark: u64) -> (String, u64) {
        self.health.next_denial(mark).await
    }

    fn failed(&self, error: &PublishError) {
        if let PublishError::NoStream(reason) = error {
            self.stream_lost(&reason.to_string());
        }
    }

    fn is_connected(&self) -> bool {
        Publisher::is_connected(self)
    }

    fn server_id(&self) -> Option<String> {
        let id = self.client.server_info().server_id;
        (!id.is_empty()).then_some(id)
    }

    async fn reconnected(&self) {
        self.health.reconnected().await
    }

    fn note_stored(&self, sequence: u64, msg_id: &str) {
        self.high_sequence.fetch_max(sequence, Ordering::Relaxed);
        // Never waits: a publication that finds another noting skips it, and the mark is a
        // little older (the keeper checks an earlier message).
        let Ok(mut last) = self.last_stored.try_lock() else {
            return;
        };
        match &mut *last {
            Some(mark) => {
                mark.sequence = sequence;
                mark.msg_id.clear();
                mark.msg_id.push_str(msg_id);
            }
            None => {
                *last = Some(StoredMark {
                    sequence,
                    msg_id: msg_id.to_owned(),
                })
            }
        }
    }

    fn last_stored(&self) -> Option<StoredMark> {
        self.last_stored.lock().ok()?.clone()
    }

    async fn stream_holds(&self, mark: &StoredMark) -> Result<bool, PublishError> {
        let Some(js) = &self.jetstream else {
            return Ok(false);
        };
        let name = &self.settings.stream.name;
        let look = async {
            // A handle only: no request is made until the message is asked for.
            let stream = js
                .get_stream_no_info(name.as_str())
                .await
                .map_err(|e| PublishError::NoStream(Box::new(e)))?;
            match stream.get_raw_message(mark.sequence).await {
                Ok(message) => Ok(message
                    .headers
                    .get("Nats-Msg-Id")
                    .is_some_and(|id| id.as_str() == mark.msg_id)),
                Err(e) => match e.kind() {
                    jetstream::stream::RawMessageErrorKind::NoMessageFound => Ok(false),
                    jetstream::stream::RawMessageErrorKind::JetStream(api)
                        if api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                    {
                        Ok(false)
                    }
                    _ => Err(PublishError::NoStream(Box::new(e))),
                },
            }
        };
        tokio::time::timeout(self.timeout, look)
            .await
            .unwrap_or(Err(PublishError::Timeout(self.timeout)))
    }

    async fn stream_state(&self) -> Result<Option<StreamState>, PublishError> {
        let Some(js) = &self.jetstream else {
            return Ok(Some(StreamState::default()));
        };
        let name = &self.settings.stream.name;
        let ask = async {
            let stream = js
                .get_stream_no_info(name.as_str())
                .await
                .map_err(|e| PublishError::NoStream(Box::new(e)))?;
            let info = match stream.get_info().await {
                Ok(info) => info,
                Err(e) if is_stream_not_found(&e) => return Ok(None),
                Err(e) => return Err(PublishError::NoStream(Box::new(e))),
            };
            Ok(Some(StreamState {
                created: info.created.to_string(),
                last_sequence: info.state.last_sequence,
            }))
        };
        tokio::time::timeout(self.timeout, ask)
            .await
            .unwrap_or(Err(PublishError::Timeout(self.timeout)))
    }

    fn high_sequence(&self) -> u64 {
        self.high_sequence.load(Ordering::Relaxed)
    }

    fn forget_stored(&self, sequence: u64) {
        self.high_sequence.store(sequence, Ordering::Relaxed);
        if let Ok(mut last) = self.last_stored.lock() {
            *last = None;
        }
    }

    type Bucket = objects::Bucket;

    async fn open_bucket(&self, spec: &BucketSpec) -> Result<objects::Bucket, PublishError> {
        if !Publisher::is_connected(self) {
            return Err(PublishError::NotConnected);
        }
        objects::open_bucket(&self.jetstream_context(), spec, self.timeout)
            .await
            .map_err(object_error)
    }

    async fn object_info(
        &self,
        bucket: &objects::Bucket,
        name: &str,
    ) -> Result<Option<StoredObject>, PublishError> {
        objects::info(&self.jetstream_context(), bucket, name, self.timeout)
            .await
            .map_err(object_error)
    }

    async fn put_object<R: AsyncRead + Unpin + Send>(
        &self,
        bucket: &objects::Bucket,
        meta: ObjectMeta,
        data: &mut R,
        bound: Duration,
    ) -> Result<StoredObject, PublishError> {
        objects::put(&self.jetstream_context(), bucket, meta, data, bound)
            .await
            .map_err(object_error)
    }

    async fn settle(&self) -> Result<(), PublishError> {
        if self.jetstream.is_some() {
            return Ok(());
        }
        self.client
            .flush()
            .await
            .map_err(|e| PublishError::Connection(e.into()))
    }
}

/// Messages of a batch built ahead and sent back to back.
const SEND_CHUNK: usize = 128;

/// A sequence of messages that can be published.
pub trait Source: Sync {
    fn len(&self) -> usize;
    /// The messages as handed to the client: `builder()(i)` is message `i`. Made once per
    /// publication, so that what all messages share is prepared once.
    fn builder(&self) -> impl FnMut(usize) -> Outbound + Send + '_;
}

impl Source for OutgoingBatch {
    fn len(&self) -> usize {
        self.messages.len()
    }

    fn builder(&self) -> impl FnMut(usize) -> Outbound + Send + '_ {
        Outbound::builder(self)
    }
}

impl Source for Vec<NatsMessage> {
    fn len(&self) -> usize {
        <[NatsMessage]>::len(self)
    }

    fn builder(&self) -> impl FnMut(usize) -> Outbound + Send + '_ {
        |i| self[i].to_outbound()
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
    publish_run_noting(publisher, messages, window, |_, _| {}).await
}

/// [`publish_run`], telling `note` of each message's acknowledgement (its index and the ack).
pub async fn publish_run_noting<P: Publish, S: Source + ?Sized>(
    publisher: &P,
    messages: &S,
    window: usize,
    mut note: impl FnMut(usize, &Ack) + Send,
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
    let mut build = messages.builder();
    // The subjects this run sent to (a batch has a handful), to tell its denials from those
    // of other batches.
    let mut subjects: Vec<String> = Vec::new();
    // Each sent message's subject (its place in `subjects`), to pin a denial on its message.
    let mut sent_subjects: Vec<usize> = Vec::with_capacity(n);
    // A denial pinned on message `k`: the messages before it are still acknowledged first.
    let mut denied: Option<(usize, PublishError)> = None;
    let confirms_each = publisher.confirms_each();
    // The last message's `Nats-Msg-Id` and the sequence of the last acknowledgement: noted
    // once the whole run is acknowledged (see `Publish::note_stored`).
    let mut last_id: Option<String> = None;
    let mut last_sequence = 0;
    let work = async {
        // One watch over denials for the whole run, not one per message.
        let mut mark = publisher.denial_mark();
        let denial = publisher.next_denial(mark);
        tokio::pin!(denial);
        // Acknowledgements in send order: the acknowledged prefix is what they tell, and a
        // stream acknowledges in that order anyway.
        let mut run = match publisher.begin().await {
            Ok(run) => run,
            Err(error) => {
                failed = Some((0, error));
                return;
            }
        };
        // Messages sent and not yet acknowledged.
        let mut outstanding = 0usize;
        let mut chunk = Vec::with_capacity(SEND_CHUNK.min(n));
        let mut next = 0;
        loop {
            if let Some((k, _)) = &denied {
                if done.acked >= *k || outstanding == 0 {
                    failed = denied.take();
                    return;
                }
            }
            // Take every acknowledgement that is already there before sending more.
            while outstanding > 0 {
                let Some(ack) = std::future::poll_fn(|cx| run.poll_next_ack(cx)).now_or_never()
                else {
                    break;
                };
                outstanding -= 1;
                match ack {
                    Ok(ack) => count(&mut done, &mut last_sequence, ack, &mut note),
                    Err(error) => {
                        failed = Some((done.acked, error));
                        return;
                    }
                }
            }
            if next < n && outstanding < window && failed.is_none() && denied.is_none() {
                // Built before any of them is sent, so that they reach the client's
                // connection task back to back and leave in few socket writes: building
                // each between two sends let that task write (and wake) once per handful.
                let end = n.min(next + (window - outstanding)).min(next + SEND_CHUNK);
                chunk.extend((next..end).map(&mut build));
                for message in chunk.drain(..) {
                    if next + 1 == n && confirms_each {
                        last_id = message
                            .headers
                            .get("Nats-Msg-Id")
                            .map(|id| id.as_str().to_owned());
                    }
                    let place = match subjects.iter().position(|s| *s == *message.subject) {
                        Some(place) => place,
                        None => {
                            subjects.push(message.subject.to_string());
                            subjects.len() - 1
                        }
                    };
                    sent_subjects.push(place);
                    match publisher.send(&mut run, message, next).await {
                        Ok(()) => {
                            outstanding += 1;
                            next += 1;
                        }
                        // Stop sending, but collect the acknowledgements of what went before,
                        // so the acknowledged prefix reaches the failed message.
                        Err(error) => {
                            failed = Some((next, error));
                            break;
                        }
                    }
                }
                continue;
            }
            if outstanding == 0 {
                break;
            }
            let event = tokio::select! {
                biased;
                ack = std::future::poll_fn(|cx| run.poll_next_ack(cx)) => Ok(ack),
                denied = &mut denial => Err(denied),
            };
            match event {
                Ok(Ok(ack)) => {
                    outstanding -= 1;
                    count(&mut done, &mut last_sequence, ack, &mut note);
                }
                Ok(Err(error)) => {
                    failed = Some((done.acked, error));
                    return;
                }
                Err((subject, seen)) => {
                    // The first message of that subject not yet known to be stored: the one
                    // before it may still be acknowledged (and must not be quarantined), the
                    // denied one must not be counted as delivered.
                    let unconfirmed = if confirms_each { done.acked } else { 0 };
                    let pinned = subjects
                        .iter()
                        .position(|s| *s == subject)
                        .and_then(|place| {
                            (unconfirmed..sent_subjects.len()).find(|&i| sent_subjects[i] == place)
                        });
                    // (None: another batch's denial.)
                    if let Some(k) = pinned {
                        if denied.as_ref().is_none_or(|(first, _)| k < *first) {
                            denied = Some((
                                k,
                                PublishError::Refused(Box::new(Denied {
                                    subject: subject.to_string(),
                                })),
                            ));
                        }
                    }
                    mark = seen;
                    denial.set(publisher.next_denial(mark));
                }
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
        None => {
            if let (Some(id), true) = (&last_id, last_sequence > 0) {
                publisher.note_stored(last_sequence, id);
            }
            Ok(done)
        }
        Some((at, error)) => {
            publisher.failed(&error);
            if !confirms_each {
                // Nothing sent is known to be on the server before a flush succeeded.
                done = Progress::default();
                // Before a permanent failure, messages 0..at were put on the connection: a
                // flush confirms them, so they are not published again (core mode has no
                // de-duplication) and the failed message can be set aside.
                if error.is_permanent() && at > 0 {
                    if let Ok(Ok(())) = tokio::time::timeout(timeout, publisher.settle()).await {
                        done.acked = at;
                    }
                }
            }
            Err(Failure { error, done, at })
        }
    }
}

fn count(
    done: &mut Progress,
    last_sequence: &mut u64,
    ack: Ack,
    note: &mut impl FnMut(usize, &Ack),
) {
    note(done.acked, &ack);
    done.acked += 1;
    done.duplicates += usize::from(ack.duplicate);
    *last_sequence = ack.sequence;
}

/// A message as handed to the NATS client, which takes ownership of its parts.
#[derive(Debug)]
pub struct Outbound {
    /// The client's own subject type: messages of one subject share its bytes (a `String`
    /// would be copied into a new one by the client for every message).
    pub subject: Subject,
    pub headers: HeaderMap,
    pub payload: Bytes,
    /// The size NATS counts against `max_payload`, known where the message was made.
    wire_size: usize,
}

/// The most subjects, and header maps, a builder keeps per batch; a batch has a handful.
const BUILDER_CACHE: usize = 16;

impl Outbound {
    /// The messages of a webhook batch, built straight into the client's header type.
    ///
    /// Names are made with `HeaderName::from_static` (no validation, no allocation) and values
    /// moved in as owned strings: building header maps by parsing `&str` names and formatting
    /// values was a seventh of the service's CPU time in a JetStream profile.
    pub fn from_message(batch: &OutgoingBatch, m: &Outgoing) -> Outbound {
        let mut headers = HeaderMap::new();
        for (name, value) in batch.headers(m) {
            headers.insert(HeaderName::from_static(name), value.to_owned_string());
        }
        Outbound {
            subject: Subject::from(m.subject.clone()),
            headers,
            payload: m.payload.clone(),
            wire_size: batch.wire_size(m),
        }
    }

    /// Whether header `name` differs between two messages of one batch that have the same
    /// `Cmc-Status` and are not dead letters.
    fn per_message(name: &str) -> bool {
        matches!(name, "Nats-Msg-Id" | "Cmc-Batch-Index")
    }

    /// Builds the messages of `batch` in order, preparing once what they share. Per status,
    /// the header map of its first message, with the headers that differ from message to
    /// message ([`Outbound::per_message`]) left empty, is cloned for each message and those
    /// set: a clone hashes nothing and never grows its table (a map built header by header
    /// hashed each name up to three times as it grew), and one map per status leaves two
    /// headers to set instead of three. Messages of one subject share its bytes.
    pub fn builder(batch: &OutgoingBatch) -> impl FnMut(usize) -> Outbound + Send + '_ {
        let mut templates: Vec<(&str, HeaderMap)> = Vec::new();
        let mut subjects: Vec<Subject> = Vec::new();
        move |i| {
            let m = &batch.messages[i];
            if m.is_dead_letter() {
                // Rare, and with a header of its own (`Cmc-Error`): built whole.
                return Outbound::from_message(batch, m);
            }
            let subject = match subjects.iter().find(|s| ***s == *m.subject) {
                Some(subject) => subject.clone(),
                None => {
                    let subject = Subject::from(m.subject.clone());
                    if subjects.len() < BUILDER_CACHE {
                        subjects.push(subject.clone());
                    }
                    subject
                }
            };
            let status = m.status_header.as_str();
            let mut headers = match templates.iter().find(|(s, _)| *s == status) {
                Some((_, template)) => template.clone(),
                None => {
                    let mut template = HeaderMap::new();
                    for (name, value) in batch.headers(m) {
                        let value = if Outbound::per_message(name) {
                            String::new()
                        } else {
                            value.to_owned_string()
                        };
                        template.insert(HeaderName::from_static(name), value);
                    }
                    if templates.len() < BUILDER_CACHE {
                        templates.push((status, template.clone()));
                    }
                    template
                }
            };
            for (name, value) in batch.headers(m) {
                if Outbound::per_message(name) {
                    headers.insert(HeaderName::from_static(name), value.to_owned_string());
                }
            }
            Outbound {
                subject,
                headers,
                payload: m.payload.clone(),
                wire_size: batch.wire_size(m),
            }
        }
    }

    /// The size NATS counts against `max_payload` ([`crate::wire::wire_size`]).
    pub fn wire_size(&self) -> usize {
        self.wire_size
    }

    /// The size of what the message holds now, counted from its header map.
    #[cfg(test)]
    fn counted_wire_size(&self) -> usize {
        crate::wire::wire_size(
            self.headers.iter().flat_map(|(name, values)| {
                let name = AsRef::<str>::as_ref(name).len();
                values.iter().map(move |v| (name, v.as_str().len()))
            }),
            self.payload.len(),
        )
    }
}

impl NatsMessage {
    /// One message of a webhook batch.
    pub fn from_message(batch: &OutgoingBatch, m: &Outgoing) -> NatsMessage {
        NatsMessage {
            subject: m.subject.clone(),
            headers: batch
                .headers(m)
                .iter()
                .map(|(name, value)| ((*name).to_owned(), value.to_string()))
                .collect(),
            payload: m.payload.clone(),
        }
    }

    /// The message as handed to the client.
    pub fn to_outbound(&self) -> Outbound {
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            headers.append(name.as_str(), value.as_str());
        }
        Outbound {
            subject: Subject::from(self.subject.as_str()),
            headers,
            payload: self.payload.clone(),
            wire_size: self.wire_size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subject::SubjectTemplate;
    use crate::webhook::{decode, InvalidEntries, Render};

    fn sorted(headers: &HeaderMap) -> Vec<(String, Vec<String>)> {
        let mut all: Vec<(String, Vec<String>)> = headers
            .iter()
            .map(|(name, values)| {
                let name: &str = name.as_ref();
                let values = values.iter().map(|v| v.as_str().to_owned()).collect();
                (name.to_owned(), values)
            })
            .collect();
        all.sort();
        all
    }

    fn pub_ack_error(code: u64) -> PublishError {
        let reply = serde_json::json!({
            "error": {"code": 503, "err_code": code, "description": "from the server"}
        });
        read_pub_ack(false, reply.to_string().as_bytes()).expect_err("an API error")
    }

    /// A PubAck is read for what delivery counts (duplicate, sequence); fields it does not
    /// know are ignored, and the 503 status is "no stream now", not an API error.
    #[test]
    fn pub_acks_are_read_from_the_reply() {
        let ack = read_pub_ack(false, br#"{"stream":"CMC","seq":42,"domain":"hub"}"#).unwrap();
        assert_eq!(
            ack,
            Ack {
                duplicate: false,
                sequence: 42
            }
        );
        let dup = read_pub_ack(false, br#"{"stream":"CMC","seq":7,"duplicate":true}"#).unwrap();
        assert!(dup.duplicate);
        assert_eq!(dup.sequence, 7);
        let none = read_pub_ack(true, b"").unwrap_err();
        assert!(matches!(none, PublishError::NoStream(_)), "{none:?}");
        assert!(none.is_temporary(), "{none}");
    }

    /// Only what can never be stored is permanent; resources and limits are waited for.
    #[test]
    fn pub_ack_api_errors_are_classified_by_their_jetstream_code() {
        for code in [10023, 10028, 10047, 10077, 10008, 10002, 10999] {
            let error = pub_ack_error(code);
            assert!(error.is_temporary(), "{code}: {error}");
            assert!(error.to_string().contains(&code.to_string()), "{error}");
        }
        let error = pub_ack_error(10054);
        assert!(error.is_permanent(), "{error}");
        assert!(matches!(error, PublishError::Refused(_)), "{error:?}");
        // Not an API error at all (the ack could not be parsed): not a refusal either.
        let other = read_pub_ack(false, b"garbled").unwrap_err();
        assert!(other.is_temporary(), "{other}");
        assert!(other.to_string().contains("unreadable PubAck"), "{other}");
    }

    /// JetStream's API error stays the cause, not a copy of its text: what JetStream answered
    /// can be read back from the error chain.
    #[test]
    fn a_publish_error_keeps_the_api_error_as_its_source() {
        for (code, temporary) in [(10054, false), (10047, true)] {
            let error = pub_ack_error(code);
            let source = std::error::Error::source(&error).expect("a source");
            let api = source
                .downcast_ref::<jetstream::Error>()
                .expect("the API error");
            assert_eq!(api.error_code().0, code);
            assert_eq!(error.is_temporary(), temporary);
        }
        let denied = PublishError::Refused(Box::new(Denied {
            subject: "cmc.x".into(),
        }));
        let source = std::error::Error::source(&denied).unwrap();
        assert_eq!(source.downcast_ref::<Denied>().unwrap().subject, "cmc.x");
        assert!(denied.to_string().contains("\"cmc.x\""), "{denied}");
    }

    /// The per-batch template gives every message exactly the headers it would get built
    /// whole: several statuses, indexes of several widths, dead letters in between, both
    /// shapes.
    #[test]
    fn the_builder_gives_each_message_its_own_headers() {
        let entries: Vec<String> = (0..120)
            .map(|i| match i % 7 {
                3 => r#""not an object""#.to_owned(),
                k => format!(r#"{{"status":"s{k}","n":{i}}}"#),
            })
            .collect();
        let body = format!(
            r#"{{"event_type":"deliveries","server_composition":"pro","event":{{"deliveries":[{}]}}}}"#,
            entries.join(",")
        );
        let decoded = decode(Some("application/json"), body.as_bytes()).unwrap();
        let batch = decoded.validate_with(InvalidEntries::DeadLetter).unwrap();
        let template = SubjectTemplate::parse("cmc.{event_type}.{status}").unwrap();
        let dead = SubjectTemplate::parse("cmc.invalid.{event_type}").unwrap();
        for shape in [
            crate::webhook::HeaderShape::Full,
            crate::webhook::HeaderShape::Minimal,
        ] {
            let how = Render {
                dead_letter: Some(&dead),
                traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                shape,
                ..Render::new(&template)
            };
            let out = batch.render(&how, "batch-1").unwrap();
            assert!(out.invalid > 0);
            let mut build = Outbound::builder(&out);
            for (i, m) in out.messages.iter().enumerate() {
                let built = build(i);
                let whole = Outbound::from_message(&out, m);
                assert_eq!(
                    sorted(&built.headers),
                    sorted(&whole.headers),
                    "message {i}"
                );
                assert_eq!(built.subject, whole.subject);
                assert_eq!(built.payload, whole.payload);
                assert_eq!(built.wire_size(), out.wire_size(m));
                assert_eq!(built.counted_wire_size(), built.wire_size());
            }
        }
    }
}

/// An in-memory [`Publish`] whose behaviour a test scripts message by message, with
/// JetStream's de-duplication by `Nats-Msg-Id`.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::{HashSet, VecDeque};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use std::collections::HashMap;

    use tokio::io::{AsyncRead, AsyncReadExt};

    use super::{Ack, AckFuture, Acks, BucketSpec, ObjectMeta, Oversized, Publish, PublishError};
    use super::{Outbound, StoredMark, StoredObject, StreamState};

    /// What happens to one sent message.
    #[derive(Debug, Clone, Copy)]
    pub enum Step {
        /// Stored and acknowledged at once.
        Ack,
        /// Stored and acknowledged after a while.
        AckAfter(Duration),
        /// Refused for good (as a permission error is).
        Refuse,
        /// Never acknowledged (NATS frozen).
        Hang,
        /// The send fails: no connection, and not ready from now on.
        Disconnect,
        /// The send fails with a temporary error; readiness is unchanged.
        Fail,
        /// The server denies the subject: never acknowledged, a denial recorded.
        Deny,
        /// JetStream answers with an API error of this code (e.g. 10047, storage resources
        /// exceeded), classified as the real publisher classifies it.
        Api(u64),
    }

    #[derive(Debug)]
    struct State {
        script: VecDeque<Step>,
        default: Step,
        ready: bool,
        max_payload: usize,
        timeout: Duration,
        /// `Cmc-Batch-Id:Cmc-Batch-Index` of each stored message, in the order stored.
        stored: Vec<String>,
        ids: HashSet<String>,
        duplicates: usize,
        sent: usize,
        outstanding: usize,
        max_outstanding: usize,
        send_times: Vec<std::time::Instant>,
        /// Denied subjects with their marks.
        denials: Vec<(String, u64)>,
        /// `core` mode: no acknowledgements to wait for, no de-duplication.
        core: bool,
        /// How the next object uploads behave (`Ack`, `AckAfter`, `Hang`, `Refuse`,
        /// `Disconnect`, `Fail`), then `object_default`.
        object_script: VecDeque<Step>,
        object_default: Step,
        /// The bucket's objects by name, and the names uploaded, in order.
        objects: HashMap<String, StoredObject>,
        uploads: Vec<String>,
        /// The bucket cannot be opened (missing, `nats.stream.create = false`).
        bucket_missing: bool,
        server_id: Option<String>,
        /// The id of each message in `stored`.
        stored_ids: Vec<String>,
        last_stored: Option<StoredMark>,
        /// The highest sequence noted ([`Publish::high_sequence`]).
        high_sequence: u64,
        /// The stream's creation (a new value when it is created again).
        created: u64,
        /// The stream does not answer a check (a silent host death).
        silent: bool,
        /// How many times the stream answered [`Publish::stream_state`].
        checks: usize,
        /// Each check's answer is followed by another publisher's message, acknowledged
        /// and noted before the check is over.
        ack_during_check: bool,
    }

    #[derive(Debug, Clone)]
    pub struct FakePublisher(
        Arc<Mutex<State>>,
        Arc<tokio::sync::Notify>,
        /// Ticks when the server changes ([`FakePublisher::set_server_id`]).
        Arc<tokio::sync::Notify>,
    );

    impl FakePublisher {
        pub fn new(timeout: Duration) -> FakePublisher {
            FakePublisher(
                Arc::new(Mutex::new(State {
                    script: VecDeque::new(),
                    default: Step::Ack,
                    ready: true,
                    max_payload: 1 << 20,
                    timeout,
                    stored: Vec::new(),
                    ids: HashSet::new(),
                    duplicates: 0,
                    sent: 0,
                    outstanding: 0,
                    max_outstanding: 0,
                    send_times: Vec::new(),
                    denials: Vec::new(),
                    core: false,
                    object_script: VecDeque::new(),
                    object_default: Step::Ack,
                    objects: HashMap::new(),
                    uploads: Vec::new(),
                    bucket_missing: false,
                    server_id: Some("first".into()),
                    stored_ids: Vec::new(),
                    last_stored: None,
                    high_sequence: 0,
                    created: 1,
                    silent: false,
                    checks: 0,
                    ack_during_check: false,
                })),
                Arc::default(),
                Arc::default(),
            )
        }

        fn state(&self) -> std::sync::MutexGuard<'_, State> {
            self.0.lock().unwrap()
        }

        /// The next sends behave as `steps`, then as the default.
        pub fn script(&self, steps: impl IntoIterator<Item = Step>) {
            self.state().script.extend(steps);
        }

        pub fn set_default(&self, step: Step) {
            self.state().default = step;
        }

        pub fn set_ready(&self, ready: bool) {
            self.state().ready = ready;
        }

        /// Records a denial of `subject`, as if another batch had been refused.
        pub fn record_denial(&self, subject: &str) {
            {
                let mut s = self.state();
                let mark = s.denials.len() as u64 + 1;
                s.denials.push((subject.to_owned(), mark));
            }
            self.1.notify_waiters();
        }

        /// Behaves as `core` mode does: every send is stored, nothing is de-duplicated, and
        /// nothing is confirmed before the final flush.
        pub fn set_core(&self, core: bool) {
            self.state().core = core;
        }

        /// The server the fake is connected to: a new id stands for a restarted server.
        pub fn set_server_id(&self, id: &str) {
            self.state().server_id = Some(id.to_owned());
            self.2.notify_waiters();
        }

        /// The stream stops (or starts again) answering checks while the connection still
        /// looks up: a host that died silently.
        pub fn set_silent(&self, silent: bool) {
            self.state().silent = silent;
        }

        /// How many times the stream answered a check.
        pub fn checks(&self) -> usize {
            self.state().checks
        }

        /// See [`State::ack_during_check`].
        pub fn ack_during_checks(&self, on: bool) {
            self.state().ack_during_check = on;
        }

        /// Stores a message of another publisher, labelled `label`.
        pub fn store_other(&self, label: &str) {
            self.store(format!("id-{label}"), label.to_owned());
        }

        /// Deletes the stream and creates it again, empty.
        pub fn recreate_stream(&self) {
            self.lose_after(0);
            self.state().created += 1;
        }

        /// Forgets what it stored since `kept` messages (a power cut of the server).
        pub fn lose_after(&self, kept: usize) {
            let mut s = self.state();
            s.stored.truncate(kept);
            let lost: Vec<String> = s.stored_ids.drain(kept..).collect();
            for id in lost {
                s.ids.remove(&id);
            }
        }

        pub fn set_max_payload(&self, max: usize) {
            self.state().max_payload = max;
        }

        pub fn stored(&self) -> Vec<String> {
            self.state().stored.clone()
        }

        /// The next object uploads behave as `steps`, then as the default.
        pub fn script_objects(&self, steps: impl IntoIterator<Item = Step>) {
            self.state().object_script.extend(steps);
        }

        pub fn set_object_default(&self, step: Step) {
            self.state().object_default = step;
        }

        pub fn set_bucket_missing(&self, missing: bool) {
            self.state().bucket_missing = missing;
        }

        /// The names of the objects uploaded (stored or not yet), in order.
        pub fn uploads(&self) -> Vec<String> {
            self.state().uploads.clone()
        }

        /// The names of the objects the bucket holds.
        pub fn objects(&self) -> Vec<String> {
            let mut names: Vec<String> = self.state().objects.keys().cloned().collect();
            names.sort();
            names
        }

        pub fn duplicates(&self) -> usize {
            self.state().duplicates
        }

        pub fn sent(&self) -> usize {
            self.state().sent
        }

        pub fn max_outstanding(&self) -> usize {
            self.state().max_outstanding
        }

        pub fn send_times(&self) -> Vec<std::time::Instant> {
            self.state().send_times.clone()
        }

        /// Stores the message (once per id); whether it was a duplicate.
        /// Stores the message (or finds it stored: a duplicate), as its acknowledgement says.
        fn store(&self, id: String, label: String) -> Ack {
            let mut s = self.state();
            if s.ids.insert(id.clone()) || s.core {
                s.stored.push(label);
                s.stored_ids.push(id);
                Ack {
                    duplicate: false,
                    sequence: s.stored_ids.len() as u64,
                }
            } else {
                s.duplicates += 1;
                let at = s.stored_ids.iter().position(|stored| *stored == id);
                Ack {
                    duplicate: true,
                    sequence: at.map_or(0, |at| at as u64 + 1),
                }
            }
        }
    }

    fn header(m: &Outbound, name: &str) -> String {
        m.headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    }

    impl FakePublisher {
        /// Takes `message` as the script says: its acknowledgement to come, or the send's
        /// own failure.
        async fn scripted_ack(
            &self,
            message: Outbound,
            index: usize,
        ) -> Result<AckFuture, PublishError> {
            let subject = message.subject.clone();
            let id = header(&message, "Nats-Msg-Id");
            let label = format!(
                "{}:{}",
                header(&message, "Cmc-Batch-Id"),
                header(&message, "Cmc-Batch-Index")
            );
            let step = {
                let mut s = self.state();
                s.sent += 1;
                s.send_times.push(std::time::Instant::now());
                if !s.ready {
                    return Err(PublishError::NotConnected);
                }
                let size = message.wire_size();
                if size > s.max_payload {
                    return Err(PublishError::TooLarge(Oversized {
                        index,
                        size: Some(size),
                        max: s.max_payload,
                    }));
                }
                let default = s.default;
                s.script.pop_front().unwrap_or(default)
            };
            // Give other tasks a turn, as a real socket write would.
            tokio::task::yield_now().await;
            match step {
                Step::Ack => {
                    let ack = self.store(id, label);
                    Ok(Box::pin(async move { Ok(ack) }))
                }
                Step::AckAfter(delay) => {
                    // Due from the send, as a server's answer is, however late it is polled.
                    let due = tokio::time::Instant::now() + delay;
                    let this = self.clone();
                    {
                        let mut s = self.state();
                        s.outstanding += 1;
                        s.max_outstanding = s.max_outstanding.max(s.outstanding);
                    }
                    Ok(Box::pin(async move {
                        tokio::time::sleep_until(due).await;
                        this.state().outstanding -= 1;
                        Ok(this.store(id, label))
                    }))
                }
                Step::Refuse => Ok(Box::pin(async {
                    Err(PublishError::Refused("permissions violation (fake)".into()))
                })),
                Step::Hang => Ok(Box::pin(std::future::pending())),
                Step::Disconnect => {
                    self.state().ready = false;
                    Err(PublishError::NotConnected)
                }
                Step::Fail => Err(PublishError::Connection("connection reset (fake)".into())),
                Step::Deny => {
                    self.record_denial(&subject);
                    Ok(Box::pin(std::future::pending()))
                }
                Step::Api(code) => {
                    let api: async_nats::jetstream::Error = serde_json::from_value(
                        serde_json::json!({"code": 503, "err_code": code, "description": "scripted"}),
                    )
                    .expect("an API error");
                    let error = super::api_refusal(api);
                    Ok(Box::pin(async move { Err(error) }))
                }
            }
        }
    }

    /// The fake's publication: each message's scripted acknowledgement, in send order.
    #[derive(Default)]
    pub struct FakeRun(VecDeque<AckFuture>);

    impl Acks for FakeRun {
        fn poll_next_ack(&mut self, cx: &mut Context<'_>) -> Poll<Result<Ack, PublishError>> {
            let Some(front) = self.0.front_mut() else {
                return Poll::Pending;
            };
            let ack = std::task::ready!(front.as_mut().poll(cx));
            self.0.pop_front();
            Poll::Ready(ack)
        }
    }

    impl Publish for FakePublisher {
        type Run = FakeRun;

        async fn begin(&self) -> Result<FakeRun, PublishError> {
            Ok(FakeRun::default())
        }

        fn server_id(&self) -> Option<String> {
            self.state().server_id.clone()
        }

        fn note_stored(&self, sequence: u64, msg_id: &str) {
            let mut s = self.state();
            s.high_sequence = s.high_sequence.max(sequence);
            s.last_stored = Some(StoredMark {
                sequence,
                msg_id: msg_id.to_owned(),
            });
        }

        async fn stream_state(&self) -> Result<Option<StreamState>, PublishError> {
            let mut s = self.state();
            if !s.ready {
                return Err(PublishError::NotConnected);
            }
            if s.silent {
                return Err(PublishError::Timeout(s.timeout));
            }
            s.checks += 1;
            let state = StreamState {
                created: s.created.to_string(),
                last_sequence: s.stored_ids.len() as u64,
            };
            if s.ack_during_check {
                let id = format!("late-{}", s.checks);
                drop(s);
                let ack = self.store(id.clone(), id.clone());
                self.note_stored(ack.sequence, &id);
            }
            Ok(Some(state))
        }

        fn high_sequence(&self) -> u64 {
            self.state().high_sequence
        }

        fn forget_stored(&self, sequence: u64) {
            let mut s = self.state();
            s.high_sequence = sequence;
            s.last_stored = None;
        }

        fn last_stored(&self) -> Option<StoredMark> {
            self.state().last_stored.clone()
        }

        async fn stream_holds(&self, mark: &StoredMark) -> Result<bool, PublishError> {
            let s = self.state();
            if !s.ready {
                return Err(PublishError::NotConnected);
            }
            if s.silent {
                return Err(PublishError::Timeout(s.timeout));
            }
            let at = (mark.sequence as usize).checked_sub(1);
            Ok(at.and_then(|at| s.stored_ids.get(at)) == Some(&mark.msg_id))
        }

        async fn reconnected(&self) {
            self.2.notified().await
        }

        fn max_payload(&self) -> usize {
            self.state().max_payload
        }

        fn is_ready(&self) -> bool {
            self.state().ready
        }

        fn timeout(&self) -> Duration {
            self.state().timeout
        }

        fn confirms_each(&self) -> bool {
            !self.state().core
        }

        async fn send(
            &self,
            run: &mut FakeRun,
            message: Outbound,
            index: usize,
        ) -> Result<(), PublishError> {
            let ack = self.scripted_ack(message, index).await?;
            run.0.push_back(ack);
            Ok(())
        }

        async fn settle(&self) -> Result<(), PublishError> {
            Ok(())
        }

        type Bucket = String;

        async fn open_bucket(&self, spec: &BucketSpec) -> Result<String, PublishError> {
            let s = self.state();
            if !s.ready {
                return Err(PublishError::NotConnected);
            }
            if s.bucket_missing {
                return Err(PublishError::Object(
                    format!("object store {} not usable: not found (fake)", spec.name).into(),
                ));
            }
            Ok(spec.name.clone())
        }

        async fn object_info(
            &self,
            _bucket: &String,
            name: &str,
        ) -> Result<Option<StoredObject>, PublishError> {
            let s = self.state();
            if !s.ready {
                return Err(PublishError::NotConnected);
            }
            Ok(s.objects.get(name).cloned())
        }

        async fn put_object<R: AsyncRead + Unpin + Send>(
            &self,
            _bucket: &String,
            meta: ObjectMeta,
            data: &mut R,
            bound: std::time::Duration,
        ) -> Result<StoredObject, PublishError> {
            let step = {
                let mut s = self.state();
                if !s.ready {
                    return Err(PublishError::NotConnected);
                }
                s.uploads.push(meta.name.clone());
                let default = s.object_default;
                s.object_script.pop_front().unwrap_or(default)
            };
            let delay = match step {
                Step::Ack => Duration::ZERO,
                Step::AckAfter(delay) => delay,
                Step::Hang => bound,
                Step::Disconnect => {
                    self.state().ready = false;
                    return Err(PublishError::NotConnected);
                }
                Step::Fail => return Err(PublishError::Object("connection reset (fake)".into())),
                Step::Refuse | Step::Deny | Step::Api(_) => {
                    return Err(PublishError::Object("refused (fake)".into()))
                }
            };
            // Within its bound, as the real upload is; nothing of a failed one stays.
            if delay >= bound {
                tokio::time::sleep(bound).await;
                return Err(PublishError::Timeout(bound));
            }
            tokio::time::sleep(delay).await;
            let mut bytes = Vec::new();
            data.read_to_end(&mut bytes)
                .await
                .map_err(|e| PublishError::Object(e.into()))?;
            use sha2::Digest;
            let stored = StoredObject {
                size: bytes.len() as u64,
                digest: Some(crate::objects::digest_of(&sha2::Sha256::digest(&bytes))),
                deleted: false,
            };
            self.state().objects.insert(meta.name, stored.clone());
            Ok(stored)
        }

        fn denial_mark(&self) -> u64 {
            self.state().denials.len() as u64
        }

        async fn next_denial(&self, mark: u64) -> (String, u64) {
            loop {
                let tick = self.1.notified();
                let found = self
                    .state()
                    .denials
                    .iter()
                    .find(|(_, at)| *at > mark)
                    .cloned();
                if let Some(found) = found {
                    return found;
                }
                tick.await;
            }
        }
    }
}
