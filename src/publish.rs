//! Publishing to NATS: one call that puts a whole batch on the bus or says honestly that it
//! could not. The connection and the stream are set up by [`crate::nats`].
//!
//! A batch is sent in entry order on the one shared
//! connection; in `jetstream` mode all PubAcks are then awaited concurrently, in `core` mode
//! the connection is flushed. The whole call is bounded by `nats.publish_timeout`, so a slow or
//! absent NATS yields an error in time, never a hang.

use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::header::HeaderName;
use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use thiserror::Error;

use crate::nats::Health;
pub use crate::nats::SetupError;
use crate::settings::NatsSettings;
use crate::webhook::{HeaderValue, OutgoingBatch};

/// What a batch's publication achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PublishReport {
    /// Messages acknowledged by NATS (stored by JetStream, or flushed in core mode).
    pub published: usize,
    /// Of those, the ones JetStream reported as duplicates of an earlier message id.
    pub duplicates: usize,
}

/// Why a batch is not (entirely) on the bus.
#[derive(Debug, Error)]
pub enum PublishError {
    #[error("NATS is not connected")]
    NotConnected,
    #[error("NATS did not acknowledge the batch within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    TooLarge(Oversized),
    #[error("no JetStream stream answered: {0}")]
    NoStream(String),
    #[error("NATS connection failed: {0}")]
    Connection(String),
    #[error("NATS refused the batch: {0}")]
    Refused(String),
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
        )
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
    settings: Arc<NatsSettings>,
    /// `validation.dead_letter_subject` in dead-letter mode: an existing stream must cover it
    /// too.
    dead_letter: Option<Arc<crate::subject::SubjectTemplate>>,
    /// The connection's health as its events tell it (last failure, denied subjects).
    health: Arc<Health>,
}

impl Publisher {
    /// Connects, waiting up to `connect_timeout` for the first connection; if NATS is not
    /// reachable by then, returns anyway and keeps connecting in the background.
    pub async fn connect(settings: &NatsSettings) -> Result<Publisher, SetupError> {
        let (client, health) = crate::nats::connect(settings).await?;
        let jetstream = crate::nats::jetstream(&client, settings);
        Ok(Publisher {
            stream_ready: Arc::new(AtomicBool::new(jetstream.is_none())),
            client,
            jetstream,
            timeout: settings.publish_timeout,
            settings: Arc::new(settings.clone()),
            dead_letter: None,
            health,
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
            Some("the JetStream stream is not usable yet".into())
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
        crate::nats::ensure_stream(js, &self.settings, self.dead_letter.as_deref()).await?;
        self.stream_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Keeps trying [`Publisher::ensure_stream`] until it succeeds (used when NATS was not
    /// reachable at start-up).
    pub async fn ensure_stream_in_background(self) {
        let mut logged = false;
        loop {
            if self.is_connected() {
                match self.ensure_stream().await {
                    Ok(()) => {
                        tracing::info!(stream = %self.settings.stream.name, "stream ready");
                        return;
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

    /// Publishes `messages` in order within `publish_timeout`. On failure, says how many
    /// leading messages were acknowledged anyway.
    pub async fn publish(&self, messages: Vec<Outbound>) -> Result<PublishReport, PublishFailure> {
        if messages.is_empty() {
            return Ok(PublishReport::default());
        }
        if !self.is_connected() {
            return Err(PublishFailure::none(PublishError::NotConnected));
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        match &self.jetstream {
            Some(js) => self.publish_jetstream(js, messages, deadline).await,
            None => self.publish_core(messages, deadline).await,
        }
    }

    async fn publish_jetstream(
        &self,
        js: &jetstream::Context,
        messages: Vec<Outbound>,
        deadline: tokio::time::Instant,
    ) -> Result<PublishReport, PublishFailure> {
        // Send everything first, in order, so the acks are outstanding concurrently; then
        // collect them in order, which tells how long the acknowledged prefix is. One deadline
        // for each phase rather than a timer per message: the client already bounds each call.
        let mut acks = Vec::with_capacity(messages.len());
        // The batch's distinct subjects (few in practice), to recognise a permission denial:
        // the server answers a denied publish with an error event, never with an ack.
        let started = Instant::now();
        let mut subjects: Vec<String> = Vec::new();
        let sending = async {
            for (index, message) in messages.into_iter().enumerate() {
                if !subjects.contains(&message.subject) {
                    subjects.push(message.subject.clone());
                }
                let ack = js
                    .publish_with_headers(message.subject, message.headers, message.payload)
                    .await
                    .map_err(|e| self.map_error(e.kind(), index, e.to_string()))?;
                acks.push(ack.into_future());
            }
            Ok(())
        };
        match tokio::time::timeout_at(deadline, sending).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(PublishFailure::none(error)),
            Err(_) => return Err(PublishFailure::none(PublishError::Timeout(self.timeout))),
        }
        let mut report = PublishReport::default();
        let collecting = async {
            for (index, ack) in acks.into_iter().enumerate() {
                let ack = ack
                    .await
                    .map_err(|e| self.map_error(e.kind(), index, e.to_string()))?;
                report.published += 1;
                report.duplicates += usize::from(ack.duplicate);
            }
            Ok(())
        };
        let outcome = tokio::select! {
            outcome = tokio::time::timeout_at(deadline, collecting) => outcome,
            subject = self.health.wait_denied(&subjects, started) => Ok(Err(
                PublishError::Refused(format!("permission denied: this NATS user may not publish to {subject:?}")),
            )),
        };
        let error = match outcome {
            Ok(Ok(())) => return Ok(report),
            Ok(Err(error)) => error,
            Err(_) => PublishError::Timeout(self.timeout),
        };
        Err(PublishFailure {
            error,
            acked: report.published,
        })
    }

    async fn publish_core(
        &self,
        messages: Vec<Outbound>,
        deadline: tokio::time::Instant,
    ) -> Result<PublishReport, PublishFailure> {
        let count = messages.len();
        let work = async {
            for message in messages {
                self.client
                    .publish_with_headers(message.subject, message.headers, message.payload)
                    .await
                    .map_err(|e| PublishError::Connection(e.to_string()))?;
            }
            self.client
                .flush()
                .await
                .map_err(|e| PublishError::Connection(e.to_string()))
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(Ok(())) => Ok(PublishReport {
                published: count,
                duplicates: 0,
            }),
            Ok(Err(error)) => Err(PublishFailure::none(error)),
            Err(_) => Err(PublishFailure::none(PublishError::Timeout(self.timeout))),
        }
    }

    fn map_error(&self, kind: PublishErrorKind, index: usize, message: String) -> PublishError {
        match kind {
            PublishErrorKind::TimedOut => PublishError::Timeout(self.timeout),
            PublishErrorKind::MaxPayloadExceeded => PublishError::TooLarge(Oversized {
                index,
                size: None,
                max: self.max_payload(),
            }),
            PublishErrorKind::BrokenPipe => PublishError::NotConnected,
            // "No responders": no stream is serving the subject right now, as during a
            // leader election or while a stream is being restored. Worth waiting for.
            PublishErrorKind::StreamNotFound => PublishError::NoStream(message),
            _ => PublishError::Refused(message),
        }
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

/// One message to publish (and, when NATS cannot take it, to spool): subject, headers and
/// body exactly as they go on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsMessage {
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

/// A message as handed to the NATS client, which takes ownership of its parts.
#[derive(Debug)]
pub struct Outbound {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

impl Outbound {
    /// The messages of a webhook batch, built straight into the client's header type.
    ///
    /// Names are made with `HeaderName::from_static` (no validation, no allocation) and values
    /// moved in as owned strings: building header maps by parsing `&str` names and formatting
    /// values was a seventh of the service's CPU time in a JetStream profile.
    pub fn from_batch(batch: &OutgoingBatch) -> Vec<Outbound> {
        batch
            .messages
            .iter()
            .map(|m| {
                let mut headers = HeaderMap::new();
                for (name, value) in batch.headers(m) {
                    let value = match value {
                        HeaderValue::Str(s) => s.to_owned(),
                        HeaderValue::Index(i) => i.to_string(),
                    };
                    headers.insert(HeaderName::from_static(name), value);
                }
                Outbound {
                    subject: m.subject.clone(),
                    headers,
                    payload: m.payload.clone(),
                }
            })
            .collect()
    }
}

impl NatsMessage {
    /// The messages of a webhook batch from position `start` on (to spool what NATS did not
    /// acknowledge).
    pub fn from_batch(batch: &OutgoingBatch, start: usize) -> Vec<NatsMessage> {
        batch
            .messages
            .iter()
            .skip(start)
            .map(|m| NatsMessage {
                subject: m.subject.clone(),
                headers: batch
                    .headers(m)
                    .iter()
                    .map(|(name, value)| ((*name).to_owned(), value.to_string()))
                    .collect(),
                payload: m.payload.clone(),
            })
            .collect()
    }

    /// The message as handed to the client.
    pub fn to_outbound(&self) -> Outbound {
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            headers.append(name.as_str(), value.as_str());
        }
        Outbound {
            subject: self.subject.clone(),
            headers,
            payload: self.payload.clone(),
        }
    }
}

/// A batch that is not (entirely) on the bus.
#[derive(Debug)]
pub struct PublishFailure {
    pub error: PublishError,
    /// How many leading messages were acknowledged before the failure.
    pub acked: usize,
}

impl PublishFailure {
    fn none(error: PublishError) -> Self {
        PublishFailure { error, acked: 0 }
    }
}
