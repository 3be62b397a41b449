//! What goes out for one mail, in SPEC §7's order: every object into the bucket
//! `inbound.bucket`, then the message (JetStream PubAck awaited, or a core flush).
//!
//! An object is named by its content's SHA-256; when the bucket already holds that name with
//! the same digest and size, nothing is uploaded again, so a retried (or drained) mail stores
//! nothing twice, and its message repeats the same `Nats-Msg-Id`, which JetStream drops.
//! Objects are put from their file (or, for an inline body, from memory) in the client's
//! 128 KiB chunks, each acknowledged, so an upload holds one chunk at a time. Every NATS call
//! is bounded: a stalled server gives an error in time, never a hang.
//!
//! Every NATS call goes through the [`Publish`] seam (objects too), so tests script them with
//! the in-memory fake.

use std::path::Path;
use std::sync::Arc;

use async_nats::jetstream::stream::StorageType;
use thiserror::Error;
use tokio::sync::Mutex;

use super::mail::Mail;
use super::message::{plan, ObjectToStore, Source, TooLarge};
use crate::objects::{digest_of, BucketSpec, ObjectMeta, CHUNK};
use crate::publish::{publish_run, NatsMessage, Publish, PublishError, Publisher};
use crate::settings::{Settings, Storage};
use crate::subject::InboundSubject;

/// Why a mail is not (entirely) out.
#[derive(Debug, Error)]
pub enum SinkError {
    /// Waiting can fix it (no connection, no answer in time): the mail may be spooled.
    #[error("{0}")]
    Temporary(String),
    /// The message cannot fit the server's `max_payload` (413; never spooled).
    #[error(transparent)]
    TooLarge(TooLarge),
    /// NATS refused for good (permissions, no stream for the subject, bucket unusable).
    #[error("{0}")]
    Refused(String),
    /// JetStream gave no answer in time (a cluster without a meta leader, say): temporary,
    /// and at start-up no reason to stop, unlike a refusal.
    #[error("{0}")]
    Unanswered(String),
}

impl SinkError {
    pub fn is_temporary(&self) -> bool {
        matches!(self, SinkError::Temporary(_) | SinkError::Unanswered(_))
    }
}

/// What a delivered mail did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sent {
    /// JetStream already had the message (same `Nats-Msg-Id`).
    pub duplicate: bool,
    /// Objects uploaded now, and those the bucket already held.
    pub uploaded: usize,
    pub already_stored: usize,
    /// Bytes uploaded now.
    pub uploaded_bytes: u64,
}

/// The object store and the publisher, shared by the route and the inbound drainer.
pub struct InboundSink<P: Publish = Arc<Publisher>> {
    publisher: P,
    bucket: BucketSpec,
    template: InboundSubject,
    /// The bucket, once created or found.
    store: Mutex<Option<P::Bucket>>,
}

impl InboundSink {
    pub fn new(settings: &Settings, publisher: Publisher) -> InboundSink {
        InboundSink::with_publisher(settings, Arc::new(publisher))
    }
}

impl<P: Publish> InboundSink<P> {
    /// The sink over any publisher (tests give it the in-memory fake).
    pub fn with_publisher(settings: &Settings, publisher: P) -> InboundSink<P> {
        InboundSink {
            publisher,
            bucket: BucketSpec {
                name: settings.inbound.bucket.to_string(),
                create: settings.nats.stream.create,
                storage: match settings.nats.stream.storage {
                    Storage::File => StorageType::File,
                    Storage::Memory => StorageType::Memory,
                },
                replicas: settings.nats.stream.replicas,
            },
            template: settings.inbound.subject.clone(),
            store: Mutex::new(None),
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket.name
    }

    /// Creates the bucket (`nats.stream.create`) or finds it; cached once it succeeded.
    pub async fn ensure_bucket(&self) -> Result<P::Bucket, SinkError> {
        let mut cached = self.store.lock().await;
        if let Some(store) = &*cached {
            return Ok(store.clone());
        }
        if !self.publisher.is_connected() {
            return Err(SinkError::Temporary("NATS is not connected".into()));
        }
        let store = match self.publisher.open_bucket(&self.bucket).await {
            Ok(store) => store,
            Err(PublishError::Timeout(bound)) => {
                return Err(SinkError::Unanswered(format!(
                    "object store {}: no answer within {bound:?}",
                    self.bucket.name
                )))
            }
            Err(e @ PublishError::NotStored(_)) => {
                return Err(SinkError::Unanswered(cause_text(e)))
            }
            Err(e) => return Err(SinkError::Temporary(cause_text(e))),
        };
        *cached = Some(store.clone());
        Ok(store)
    }

    /// Stores the objects of `mail` (files under `dir`), then publishes its message.
    pub async fn deliver(
        &self,
        mail: &Mail,
        dir: &Path,
        batch_id: &str,
    ) -> Result<Sent, SinkError> {
        if !self.publisher.is_connected() {
            return Err(SinkError::Temporary("NATS is not connected".into()));
        }
        let max_payload = self.publisher.max_payload();
        if max_payload == 0 {
            return Err(SinkError::Temporary(
                "NATS has not announced max_payload yet".into(),
            ));
        }
        let planned = plan(
            mail,
            &self.template,
            &self.bucket.name,
            batch_id,
            max_payload,
        )
        .map_err(SinkError::TooLarge)?;
        let store = self.ensure_bucket().await?;
        let mut sent = Sent::default();
        for object in &planned.objects {
            let put = self.put(&store, object, dir).await;
            if put.is_err() {
                // The bucket may be gone (deleted while the service runs): find it, or
                // create it again (`nats.stream.create`), on the next attempt.
                *self.store.lock().await = None;
            }
            if put? {
                sent.uploaded += 1;
                sent.uploaded_bytes += object.size;
            } else {
                sent.already_stored += 1;
            }
        }
        let message = planned.message;
        let message = vec![NatsMessage {
            subject: message.subject,
            headers: message
                .headers
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value))
                .collect(),
            payload: message.payload.into(),
        }];
        let report = publish_run(&self.publisher, &message, 1)
            .await
            .map_err(|failure| match failure.error {
                PublishError::TooLarge(o) => SinkError::TooLarge(TooLarge {
                    size: o.size.unwrap_or(0),
                    max: o.max,
                }),
                e if e.is_temporary() => SinkError::Temporary(e.to_string()),
                e => SinkError::Refused(e.to_string()),
            })?;
        sent.duplicate = report.duplicates > 0;
        Ok(sent)
    }

    /// Puts one object unless the bucket already has it; returns whether it uploaded.
    async fn put(
        &self,
        store: &P::Bucket,
        object: &ObjectToStore<'_>,
        dir: &Path,
    ) -> Result<bool, SinkError> {
        let timeout = self.publisher.timeout();
        let digest = hex::decode(&object.name)
            .map(|d| digest_of(&d))
            .map_err(|_| SinkError::Refused(format!("{:?} is not a SHA-256", object.name)))?;
        let temporary = |e: PublishError| match e {
            PublishError::Timeout(bound) => SinkError::Temporary(format!(
                "object {}: no answer within {bound:?}",
                object.name
            )),
            e => SinkError::Temporary(cause_text(e)),
        };
        let held = self
            .publisher
            .object_info(store, &object.name)
            .await
            .map_err(temporary)?;
        if held.is_some_and(|held| {
            !held.deleted
                && held.size == object.size
                && held.digest.as_deref() == Some(digest.as_str())
        }) {
            return Ok(false);
        }
        let meta = ObjectMeta {
            name: object.name.clone(),
            filename: object.filename.clone(),
            content_type: object.content_type.clone(),
            field: object.field.clone(),
        };
        // Each 128 KiB chunk is acknowledged within `timeout` by the client; the whole upload
        // gets that per chunk, plus one for the metadata.
        let chunks = object.size.div_ceil(CHUNK as u64) as u32;
        let bound = timeout * (chunks + 2);
        let stored = match object.source {
            Source::File(name) => {
                let mut file = tokio::fs::File::open(dir.join(name))
                    .await
                    .map_err(|e| SinkError::Refused(format!("attachment file {name}: {e}")))?;
                self.publisher
                    .put_object(store, meta, &mut file, bound)
                    .await
            }
            Source::Memory(bytes) => {
                let mut reader = bytes;
                self.publisher
                    .put_object(store, meta, &mut reader, bound)
                    .await
            }
        }
        .map_err(|e| match e {
            PublishError::Timeout(bound) => SinkError::Temporary(format!(
                "object {}: upload not done within {bound:?}",
                object.name
            )),
            e => SinkError::Temporary(cause_text(e)),
        })?;
        if stored.digest.as_deref() != Some(digest.as_str()) {
            // The file changed under us: never reference an object whose content differs.
            return Err(SinkError::Refused(format!(
                "object {}: stored content has digest {:?}",
                object.name, stored.digest
            )));
        }
        Ok(true)
    }
}

/// An object call's failure as the mail's reason: the object store's own words (they name
/// the bucket or the object), else the publish error's.
fn cause_text(error: PublishError) -> String {
    match error {
        PublishError::Object(cause) => cause.to_string(),
        error => error.to_string(),
    }
}
