//! The JetStream object store as the inbound path uses it (SPEC §7): the bucket found or
//! created, what it holds under a name, and an upload in the store's own format. The
//! `Publish` seam (`publish.rs`) puts these behind its object calls; errors here are the
//! client's own, described, and the seam classifies them.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::object_store::{self, InfoErrorKind, ObjectStore};
use async_nats::jetstream::stream::StorageType;
use base64::Engine;

/// How the inbound bucket is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSpec {
    /// `inbound.bucket`.
    pub name: String,
    /// `nats.stream.create`: create it (an existing one is used as it is), else only find it.
    pub create: bool,
    /// `nats.stream.storage` and `nats.stream.replicas`.
    pub storage: StorageType,
    pub replicas: usize,
}

/// An open bucket: the client's handle and its name.
#[derive(Clone)]
pub struct Bucket {
    store: ObjectStore,
    name: String,
}

impl Bucket {
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What a bucket holds under one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub size: u64,
    /// `SHA-256=<base64url>`, as the object store records it.
    pub digest: Option<String>,
    pub deleted: bool,
}

/// One object to put: its name (the content's SHA-256 in hex) and its description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub name: String,
    /// The attachment's file name (the object's description too).
    pub filename: String,
    pub content_type: String,
    /// The form field it came in.
    pub field: String,
}

/// Why an object call failed, and whether NATS answered at all.
#[derive(Debug)]
pub enum ObjectFailure {
    /// No answer within the bound.
    Timeout(Duration),
    /// The client or the server said no (the text says why).
    Failed(String),
    /// JetStream cannot do it yet: a cluster electing its meta leader (10008) or without the
    /// peers to place the bucket's stream (10005). Waiting can fix it.
    NotYet(String),
}

/// The object store's digest of `sha256` (its raw bytes): `SHA-256=<base64url>`.
pub fn digest_of(sha256: &[u8]) -> String {
    format!(
        "SHA-256={}",
        base64::engine::general_purpose::URL_SAFE.encode(sha256)
    )
}

/// Creates the bucket (`spec.create`; one that exists with another configuration, set by an
/// operator, is used as it is) or finds it, within `bound`.
pub async fn open_bucket(
    js: &async_nats::jetstream::Context,
    spec: &BucketSpec,
    bound: Duration,
) -> Result<Bucket, ObjectFailure> {
    let found = async {
        if spec.create {
            let config = object_store::Config {
                bucket: spec.name.clone(),
                description: Some("cmc-forwarder: attachments of inbound mail".into()),
                storage: spec.storage,
                num_replicas: spec.replicas,
                ..Default::default()
            };
            match js.create_object_store(config).await {
                Ok(store) => Ok(store),
                Err(create) => js
                    .get_object_store(&spec.name)
                    .await
                    .map_err(|_| create.to_string()),
            }
        } else {
            js.get_object_store(&spec.name)
                .await
                .map_err(|e| format!("{e} (nats.stream.create = false: it must exist)"))
        }
    };
    match tokio::time::timeout(bound, found).await {
        Ok(Ok(store)) => Ok(Bucket {
            store,
            name: spec.name.clone(),
        }),
        // The client's error keeps the JetStream code only in its text.
        Ok(Err(e)) if e.contains("error code 10005") || e.contains("error code 10008") => Err(
            ObjectFailure::NotYet(format!("object store {} not yet: {e}", spec.name)),
        ),
        Ok(Err(e)) => Err(ObjectFailure::Failed(format!(
            "object store {} not usable: {e}",
            spec.name
        ))),
        Err(_) => Err(ObjectFailure::Timeout(bound)),
    }
}

/// What `bucket` holds under `name` (none when nothing), within `bound`. An object counts as
/// held only when its description and every chunk it names are in the bucket's stream: a
/// description whose chunks are missing (an upload whose description was stored although it
/// was taken for failed, or chunks an operator purged) reads as none, so the attachment is
/// uploaded again.
pub async fn info(
    js: &async_nats::jetstream::Context,
    bucket: &Bucket,
    name: &str,
    bound: Duration,
) -> Result<Option<StoredObject>, ObjectFailure> {
    let look = async {
        let info = match bucket.store.info(name).await {
            Ok(info) => info,
            Err(e) if e.kind() == InfoErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ObjectFailure::Failed(format!("object {name}: {e}"))),
        };
        if !info.deleted && info.chunks > 0 {
            let subject = format!("$O.{}.C.{}", bucket.name, info.nuid);
            let held = chunks_held(js, &bucket.name, &subject)
                .await
                .map_err(|e| ObjectFailure::Failed(format!("object {name}: {e}")))?;
            if held < info.chunks as u64 {
                tracing::warn!(object = %name, chunks = info.chunks, held, "an object's description names chunks its bucket does not hold; it is uploaded again");
                return Ok(None);
            }
        }
        Ok(Some(StoredObject {
            size: info.size as u64,
            digest: info.digest,
            deleted: info.deleted,
        }))
    };
    tokio::time::timeout(bound, look)
        .await
        .unwrap_or(Err(ObjectFailure::Timeout(bound)))
}

/// How many messages the bucket's stream holds on `subject` (one object's chunks).
async fn chunks_held(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    subject: &str,
) -> Result<u64, String> {
    use futures_util::TryStreamExt;
    let stream = js
        .get_stream_no_info(format!("OBJ_{bucket}"))
        .await
        .map_err(|e| e.to_string())?;
    let mut subjects = stream
        .info_with_subjects(subject)
        .await
        .map_err(|e| e.to_string())?;
    let mut held = 0;
    while let Some((_, count)) = subjects.try_next().await.map_err(|e| e.to_string())? {
        held += count as u64;
    }
    Ok(held)
}

/// The object store's chunk size (the client's default).
pub const CHUNK: usize = 128 * 1024;

/// Puts one object into `bucket` from `data`, within `bound`, in the object store's own
/// format: its chunks on `$O.<bucket>.C.<nuid>`, then its description on
/// `$O.<bucket>.M.<name in base64url>`, rolling up the one before.
///
/// Not the client's `put`, for one reason: here the nuid is known, so when the upload fails
/// or runs out of time its chunks are purged. The client's `put` leaves them in the bucket,
/// and each retry of a large attachment against a slow NATS added another partial copy.
pub async fn put(
    js: &async_nats::jetstream::Context,
    bucket: &Bucket,
    meta: ObjectMeta,
    data: &mut (impl tokio::io::AsyncRead + Unpin),
    bound: Duration,
) -> Result<StoredObject, ObjectFailure> {
    let name = meta.name.clone();
    let nuid = uuid::Uuid::new_v4().simple().to_string();
    let chunks = format!("$O.{}.C.{nuid}", bucket.name);
    let described = std::sync::atomic::AtomicBool::new(false);
    let upload = upload(
        js,
        &bucket.store,
        &bucket.name,
        meta,
        data,
        &chunks,
        &nuid,
        &described,
    );
    let failure = match tokio::time::timeout(bound, upload).await {
        Ok(Ok(info)) => return Ok(info),
        Ok(Err(e)) => ObjectFailure::Failed(format!("object {name}: {e}")),
        Err(_) => ObjectFailure::Timeout(bound),
    };
    if described.load(std::sync::atomic::Ordering::SeqCst) {
        // The description may have been stored (its PubAck was only late): purged, the
        // chunks it names would be gone while it says the object is there. They stay; a
        // retry that finds the description checks that they are all there
        // ([`info`]).
        tracing::warn!(object = %name, subject = %chunks, "an upload failed after its description was sent; its chunks are kept");
        return Err(failure);
    }
    if let Err(e) = purge(js, &bucket.name, &chunks, bound).await {
        tracing::warn!(object = %name, subject = %chunks, error = %e, "cannot purge the chunks of a failed upload; they stay in the bucket until purged");
    }
    Err(failure)
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

/// Uploads the chunks, then the description; `described` turns true just before the
/// description is sent (from then on the object may be stored whatever happens next).
#[allow(clippy::too_many_arguments)]
async fn upload(
    js: &async_nats::jetstream::Context,
    store: &ObjectStore,
    bucket: &str,
    meta: ObjectMeta,
    data: &mut (impl tokio::io::AsyncRead + Unpin),
    chunk_subject: &str,
    nuid: &str,
    described: &std::sync::atomic::AtomicBool,
) -> Result<StoredObject, String> {
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
    let digest = digest_of(&digest.finalize());
    let info = object_store::ObjectInfo {
        name: meta.name.clone(),
        description: Some(meta.filename.clone()),
        metadata: HashMap::from([
            ("filename".to_owned(), meta.filename),
            ("content_type".to_owned(), meta.content_type),
            ("field".to_owned(), meta.field),
        ]),
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
        digest: Some(digest.clone()),
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
    described.store(true, std::sync::atomic::Ordering::SeqCst);
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
    Ok(StoredObject {
        size: size as u64,
        digest: Some(digest),
        deleted: false,
    })
}
