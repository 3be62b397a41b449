//! What goes out for one mail, in SPEC §7's order: every object into the bucket
//! `inbound.bucket`, then the message (JetStream PubAck awaited, or a core flush).
//!
//! An object is named by its content's SHA-256; when the bucket already holds that name with
//! the same digest and size, nothing is uploaded again, so a retried (or drained) mail stores
//! nothing twice, and its message repeats the same `Nats-Msg-Id`, which JetStream drops.
//! Objects are put from their file (or, for an inline body, from memory) in the client's
//! 128 KiB chunks, each acknowledged, so an upload holds one chunk at a time. Every NATS call
//! is bounded: a stalled server gives an error in time, never a hang.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::object_store::{self, InfoErrorKind, ObjectMetadata, ObjectStore};
use async_nats::jetstream::stream::StorageType;
use base64::Engine;
use thiserror::Error;
use tokio::sync::Mutex;

use super::mail::Mail;
use super::message::{plan, ObjectToStore, Source, TooLarge};
use crate::deliver::publish_run;
use crate::publish::{NatsMessage, PublishError, Publisher};
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
pub struct InboundSink {
    publisher: Arc<Publisher>,
    bucket: String,
    template: InboundSubject,
    create: bool,
    storage: StorageType,
    replicas: usize,
    /// The bucket, once created or found.
    store: Mutex<Option<ObjectStore>>,
}

impl InboundSink {
    pub fn new(settings: &Settings, publisher: Publisher) -> InboundSink {
        InboundSink {
            publisher: Arc::new(publisher),
            bucket: settings.inbound.bucket.to_string(),
            template: settings.inbound.subject.clone(),
            create: settings.nats.stream.create,
            storage: match settings.nats.stream.storage {
                Storage::File => StorageType::File,
                Storage::Memory => StorageType::Memory,
            },
            replicas: settings.nats.stream.replicas,
            store: Mutex::new(None),
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn timeout(&self) -> Duration {
        self.publisher.timeout()
    }

    /// Creates the bucket (`nats.stream.create`) or finds it; cached once it succeeded.
    pub async fn ensure_bucket(&self) -> Result<ObjectStore, SinkError> {
        let mut cached = self.store.lock().await;
        if let Some(store) = &*cached {
            return Ok(store.clone());
        }
        if !self.publisher.is_connected() {
            return Err(SinkError::Temporary("NATS is not connected".into()));
        }
        let js = self.publisher.jetstream_context();
        let found = async {
            if self.create {
                let config = object_store::Config {
                    bucket: self.bucket.clone(),
                    description: Some("cmc-forwarder: attachments of inbound mail".into()),
                    storage: self.storage,
                    num_replicas: self.replicas,
                    ..Default::default()
                };
                match js.create_object_store(config).await {
                    Ok(store) => Ok(store),
                    // Already there with another configuration (set by an operator): use it.
                    Err(create) => js
                        .get_object_store(&self.bucket)
                        .await
                        .map_err(|_| create.to_string()),
                }
            } else {
                js.get_object_store(&self.bucket)
                    .await
                    .map_err(|e| format!("{e} (nats.stream.create = false: it must exist)"))
            }
        };
        let store = match tokio::time::timeout(self.timeout(), found).await {
            Ok(Ok(store)) => store,
            Ok(Err(e)) => {
                return Err(SinkError::Temporary(format!(
                    "object store {} not usable: {e}",
                    self.bucket
                )))
            }
            Err(_) => {
                return Err(SinkError::Unanswered(format!(
                    "object store {}: no answer within {:?}",
                    self.bucket,
                    self.timeout()
                )))
            }
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
        let planned = plan(mail, &self.template, &self.bucket, batch_id, max_payload)
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
        store: &ObjectStore,
        object: &ObjectToStore<'_>,
        dir: &Path,
    ) -> Result<bool, SinkError> {
        let timeout = self.timeout();
        let digest = hex::decode(&object.name)
            .map(|d| {
                format!(
                    "SHA-256={}",
                    base64::engine::general_purpose::URL_SAFE.encode(d)
                )
            })
            .map_err(|_| SinkError::Refused(format!("{:?} is not a SHA-256", object.name)))?;
        match tokio::time::timeout(timeout, store.info(&object.name)).await {
            Ok(Ok(info))
                if !info.deleted
                    && info.size as u64 == object.size
                    && info.digest.as_deref() == Some(digest.as_str()) =>
            {
                return Ok(false);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == InfoErrorKind::NotFound => {}
            Ok(Err(e)) => return Err(SinkError::Temporary(format!("object {}: {e}", object.name))),
            Err(_) => {
                return Err(SinkError::Temporary(format!(
                    "object {}: no answer within {timeout:?}",
                    object.name
                )))
            }
        }
        let meta = ObjectMetadata {
            name: object.name.clone(),
            description: Some(object.filename.clone()),
            metadata: HashMap::from([
                ("filename".to_owned(), object.filename.clone()),
                ("content_type".to_owned(), object.content_type.clone()),
                ("field".to_owned(), object.field.clone()),
            ]),
            ..Default::default()
        };
        // Each 128 KiB chunk is acknowledged within `timeout` by the client; the whole upload
        // gets that per chunk, plus one for the metadata.
        let chunks = object.size.div_ceil(CHUNK as u64) as u32;
        let bound = timeout * (chunks + 2);
        let js = self.publisher.jetstream_context();
        let info = match object.source {
            Source::File(name) => {
                let mut file = tokio::fs::File::open(dir.join(name))
                    .await
                    .map_err(|e| SinkError::Refused(format!("attachment file {name}: {e}")))?;
                put_object(&js, store, &self.bucket, meta, &mut file, bound).await
            }
            Source::Memory(bytes) => {
                let mut reader = bytes;
                put_object(&js, store, &self.bucket, meta, &mut reader, bound).await
            }
        }?;
        if info.digest.as_deref() != Some(digest.as_str()) {
            // The file changed under us: never reference an object whose content differs.
            return Err(SinkError::Refused(format!(
                "object {}: stored content has digest {:?}",
                object.name, info.digest
            )));
        }
        Ok(true)
    }
}

/// The object store's chunk size (the client's default).
const CHUNK: usize = 128 * 1024;

/// Puts one object into `bucket` from `data`, within `bound`, in the object store's own
/// format: its chunks on `$O.<bucket>.C.<nuid>`, then its description on
/// `$O.<bucket>.M.<name in base64url>`, rolling up the one before.
///
/// Not the client's `put`, for one reason: here the nuid is known, so when the upload fails
/// or runs out of time its chunks are purged. The client's `put` leaves them in the bucket,
/// and each retry of a large attachment against a slow NATS added another partial copy.
pub async fn put_object(
    js: &async_nats::jetstream::Context,
    store: &ObjectStore,
    bucket: &str,
    meta: ObjectMetadata,
    data: &mut (impl tokio::io::AsyncRead + Unpin),
    bound: Duration,
) -> Result<object_store::ObjectInfo, SinkError> {
    let name = meta.name.clone();
    let nuid = uuid::Uuid::new_v4().simple().to_string();
    let chunks = format!("$O.{bucket}.C.{nuid}");
    let upload = upload(js, store, bucket, meta, data, &chunks, &nuid);
    let failure = match tokio::time::timeout(bound, upload).await {
        Ok(Ok(info)) => return Ok(info),
        Ok(Err(e)) => e,
        Err(_) => format!("upload not done within {bound:?}"),
    };
    if let Err(e) = purge(js, bucket, &chunks, bound).await {
        tracing::warn!(object = %name, subject = %chunks, error = %e, "cannot purge the chunks of a failed upload; they stay in the bucket until purged");
    }
    Err(SinkError::Temporary(format!("object {name}: {failure}")))
}

/// Purges the messages of `subject` from the bucket's stream, within `bound`.
async fn purge(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    subject: &str,
    bound: Duration,
) -> Result<(), String> {
    let purge = async {
        let stream = js
            .get_stream(format!("OBJ_{bucket}"))
            .await
            .map_err(|e| e.to_string())?;
        stream
            .purge()
            .filter(subject)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(bound, purge)
        .await
        .map_err(|_| format!("no answer within {bound:?}"))?
}

async fn upload(
    js: &async_nats::jetstream::Context,
    store: &ObjectStore,
    bucket: &str,
    meta: ObjectMetadata,
    data: &mut (impl tokio::io::AsyncRead + Unpin),
    chunk_subject: &str,
    nuid: &str,
) -> Result<object_store::ObjectInfo, String> {
    use sha2::Digest;
    use tokio::io::AsyncReadExt;
    let previous = store.info(&meta.name).await.ok();
    let mut digest = sha2::Sha256::new();
    let (mut size, mut chunks) = (0usize, 0usize);
    let mut buf = bytes::BytesMut::with_capacity(CHUNK);
    let mut end = false;
    while !end {
        while buf.len() < CHUNK {
            let room = (CHUNK - buf.len()) as u64;
            let n = (&mut *data)
                .take(room)
                .read_buf(&mut buf)
                .await
                .map_err(|e| format!("reading the attachment: {e}"))?;
            if n == 0 {
                end = true;
                break;
            }
        }
        if buf.is_empty() {
            break;
        }
        let payload = buf.split().freeze();
        digest.update(&payload);
        size += payload.len();
        chunks += 1;
        js.publish(chunk_subject.to_owned(), payload)
            .await
            .map_err(|e| format!("chunk {chunks}: {e}"))?
            .await
            .map_err(|e| format!("chunk {chunks}: {e}"))?;
    }
    let info = object_store::ObjectInfo {
        name: meta.name.clone(),
        description: meta.description,
        metadata: meta.metadata,
        headers: None,
        options: Some(object_store::ObjectOptions {
            link: None,
            max_chunk_size: Some(CHUNK),
        }),
        bucket: bucket.to_owned(),
        nuid: nuid.to_owned(),
        size,
        chunks,
        modified: None,
        digest: Some(format!(
            "SHA-256={}",
            base64::engine::general_purpose::URL_SAFE.encode(digest.finalize())
        )),
        deleted: false,
    };
    let mut description = serde_json::to_value(&info).map_err(|e| e.to_string())?;
    description["mtime"] = jiff::Timestamp::now().to_string().into();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_ROLLUP, "sub");
    let subject = format!(
        "$O.{bucket}.M.{}",
        base64::engine::general_purpose::URL_SAFE.encode(&meta.name)
    );
    let description = serde_json::to_vec(&description).map_err(|e| e.to_string())?;
    js.publish_with_headers(subject, headers, description.into())
        .await
        .map_err(|e| format!("description: {e}"))?
        .await
        .map_err(|e| format!("description: {e}"))?;
    // A replaced version's chunks are no longer referenced.
    if let Some(old) = previous.filter(|old| !old.deleted && old.nuid != nuid) {
        let old_chunks = format!("$O.{bucket}.C.{}", old.nuid);
        if let Err(e) = purge(js, bucket, &old_chunks, Duration::from_secs(5)).await {
            tracing::warn!(subject = %old_chunks, error = %e, "cannot purge the chunks of a replaced object");
        }
    }
    Ok(info)
}
