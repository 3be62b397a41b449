//! Publishing to NATS: the connection, the JetStream stream, and one call that puts a whole
//! batch on the bus or says honestly that it could not.
//!
//! Owns every `async_nats` type in the crate. A batch is sent in entry order on the one shared
//! connection; in `jetstream` mode all PubAcks are then awaited concurrently, in `core` mode
//! the connection is flushed. The whole call is bounded by `nats.publish_timeout`, so a slow or
//! absent NATS yields an error in time, never a hang.

use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::header::HeaderName;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_nats::{Client, ConnectOptions, HeaderMap};
use bytes::Bytes;
use thiserror::Error;

use crate::settings::{Mode, NatsSettings, Storage};
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

/// Why the connection or the stream could not be set up.
#[derive(Debug, Error)]
pub enum SetupError {
    #[error("cannot read NATS credentials: {0}")]
    Credentials(String),
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    #[error("stream {name}: {message}")]
    Stream { name: String, message: String },
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
}

impl Publisher {
    /// Connects, waiting up to `connect_timeout` for the first connection; if NATS is not
    /// reachable by then, returns anyway and keeps connecting in the background.
    pub async fn connect(settings: &NatsSettings) -> Result<Publisher, SetupError> {
        let options = connect_options(settings).await?;
        let servers: Vec<&str> = settings
            .servers
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        // Each URL separately: async-nats parses a string as ONE URL (a comma-joined list
        // fails with "invalid port number"), so several `nats.servers` need the slice form.
        let client = options
            .connect(servers.as_slice())
            .await
            .map_err(|e| SetupError::Connect(e.to_string()))?;
        let deadline = Instant::now() + settings.connect_timeout.get();
        while client.connection_state() != State::Connected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let timeout = settings.publish_timeout.get();
        let jetstream = (settings.mode == Mode::Jetstream).then(|| {
            jetstream::ContextBuilder::new()
                .timeout(timeout)
                .max_ack_inflight(65_536)
                .backpressure_on_inflight(true)
                .build(client.clone())
        });
        Ok(Publisher {
            stream_ready: Arc::new(AtomicBool::new(jetstream.is_none())),
            client,
            jetstream,
            timeout,
            settings: Arc::new(settings.clone()),
            dead_letter: None,
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
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if !self.is_connected() {
            Some("NATS is not connected")
        } else if !self.stream_ready.load(Ordering::Acquire) {
            Some("the JetStream stream is not usable yet")
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
        let s = &self.settings.stream;
        let err = |message: String| SetupError::Stream {
            name: s.name.clone(),
            message,
        };
        if s.create {
            let config = stream::Config {
                name: s.name.clone(),
                subjects: s.subjects.clone(),
                storage: match s.storage {
                    Storage::File => stream::StorageType::File,
                    Storage::Memory => stream::StorageType::Memory,
                },
                num_replicas: s.replicas,
                max_age: s.max_age.get(),
                duplicate_window: s.duplicate_window.get(),
                ..Default::default()
            };
            js.create_or_update_stream(config)
                .await
                .map_err(|e| err(format!("cannot create or update: {e}")))?;
        } else {
            let mut found = js
                .get_stream(&s.name)
                .await
                .map_err(|e| err(format!("cannot be used (nats.stream.create = false): {e}")))?;
            let info = found
                .info()
                .await
                .map_err(|e| err(format!("cannot read its configuration: {e}")))?;
            let template = crate::subject::SubjectTemplate::parse(&self.settings.subject)
                .map_err(|e| err(e.to_string()))?;
            if !template.is_covered_by(&info.config.subjects) {
                return Err(err(format!(
                    "its subjects {:?} do not cover the template {:?}",
                    info.config.subjects, self.settings.subject
                )));
            }
            if let Some(dead_letter) = &self.dead_letter {
                if !dead_letter.is_covered_by(&info.config.subjects) {
                    return Err(err(format!(
                        "its subjects {:?} do not cover the dead-letter template {:?}",
                        info.config.subjects,
                        dead_letter.as_str()
                    )));
                }
            }
        }
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
        let sending = async {
            for (index, message) in messages.into_iter().enumerate() {
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
        let outcome = tokio::time::timeout_at(deadline, collecting).await;
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

async fn connect_options(settings: &NatsSettings) -> Result<ConnectOptions, SetupError> {
    let mut options = match &settings.creds_file {
        Some(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| SetupError::Credentials(format!("{}: {e}", path.display())))?,
        None => ConnectOptions::new(),
    };
    if settings.token.is_set() {
        options = options.token(settings.token.expose().to_owned());
    }
    if !settings.username.is_empty() {
        options = options.user_and_password(
            settings.username.clone(),
            settings.password.expose().to_owned(),
        );
    }
    if settings.nkey_seed.is_set() {
        options = options.nkey(settings.nkey_seed.expose().to_owned());
    }
    if let Some(ca) = &settings.tls_ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&settings.tls_cert_file, &settings.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options
        .name(&settings.name)
        .connection_timeout(settings.connect_timeout.get())
        .retry_on_initial_connect()
        .max_reconnects(None)
        // Reconnect quickly after a NATS restart: the default backs off to 4 s.
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100u64 << attempts.min(4)).min(1_000))
        })
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                async_nats::Event::Disconnected => tracing::warn!("NATS disconnected"),
                other => tracing::warn!(event = %other, "NATS event"),
            }
        }))
}
