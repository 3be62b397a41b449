//! Reading an inbound body: JSON and form bodies whole (under the size cap), multipart bodies
//! part by part with `multer`, each file part streamed to a file of the request's own
//! [`WorkDir`] while its SHA-256 is computed. `text`/`html` parts larger than
//! [`INLINE_LIMIT`] are spilled to disk the same way; other text parameters stay in memory,
//! within small caps. So a request holds a few chunks of its attachments in memory at a
//! time, never a whole one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::io::AsyncWriteExt;

use super::filename::decode_filename;
use super::mail::{attachment_number, Field, FieldSet, FilePart, StoredFile};
use super::message::INLINE_LIMIT;
use crate::webhook::PayloadError;

/// Largest text parameter other than `text`/`html` kept in memory (`headers` included).
pub const MAX_FIELD_BYTES: usize = 1024 * 1024;
/// Largest sum of the text parameters other than `text`/`html`.
pub const MAX_FIELDS_BYTES: usize = 2 * 1024 * 1024;

/// Why a body could not be read.
#[derive(Debug, Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("the body is larger than inbound.max_body_bytes ({limit} bytes)")]
    BodyTooLarge { limit: u64 },
    #[error("{0}")]
    FieldTooLarge(String),
    #[error("the body could not be read: {0}")]
    Unreadable(String),
    #[error("cannot write the attachment to disk: {0}")]
    Disk(#[from] std::io::Error),
}

/// A request's own directory for its file parts; removed on drop unless it was handed to the
/// spool with [`WorkDir::into_path`].
#[derive(Debug)]
pub struct WorkDir {
    path: Option<PathBuf>,
}

impl WorkDir {
    /// Creates a fresh directory under `root`.
    pub fn create(root: &Path) -> std::io::Result<WorkDir> {
        let path = root.join(uuid::Uuid::new_v4().to_string());
        std::fs::create_dir_all(&path)?;
        Ok(WorkDir { path: Some(path) })
    }

    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Keeps the directory: the caller now owns it.
    pub fn into_path(mut self) -> PathBuf {
        self.path.take().unwrap_or_default()
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove an inbound work directory");
            }
        }
    }
}

/// The body stream's own error: cut off at the limit, or the connection failed.
#[derive(Debug, Error)]
enum BodyError {
    #[error("body over the limit")]
    TooLarge,
    #[error("{0}")]
    Read(String),
}

/// Counts the body as it arrives and ends it with an error past `limit`.
fn limited<S, B, E>(
    body: S,
    limit: u64,
    over: Arc<AtomicBool>,
) -> impl Stream<Item = Result<Bytes, BodyError>> + Send
where
    S: Stream<Item = Result<B, E>> + Send,
    B: Buf,
    E: std::fmt::Display,
{
    let mut seen = 0u64;
    body.map(move |chunk| {
        let mut chunk = chunk.map_err(|e| BodyError::Read(e.to_string()))?;
        seen += chunk.remaining() as u64;
        if seen > limit {
            over.store(true, Ordering::Release);
            return Err(BodyError::TooLarge);
        }
        Ok(chunk.copy_to_bytes(chunk.remaining()))
    })
}

/// Reads a whole (JSON or form) body, up to `limit` bytes.
pub async fn read_all<S, B, E>(
    body: S,
    declared: Option<u64>,
    limit: u64,
) -> Result<Bytes, ReceiveError>
where
    S: Stream<Item = Result<B, E>> + Send,
    B: Buf,
    E: std::fmt::Display,
{
    let over = Arc::new(AtomicBool::new(false));
    let mut body = std::pin::pin!(limited(body, limit, over));
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(8192).min(limit) as usize);
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => buf.extend_from_slice(&chunk),
            Err(BodyError::TooLarge) => return Err(ReceiveError::BodyTooLarge { limit }),
            Err(BodyError::Read(e)) => return Err(ReceiveError::Unreadable(e)),
        }
    }
    Ok(buf.freeze())
}

/// What reading a multipart body produced.
pub struct Received {
    pub fields: FieldSet,
    /// Bytes of parameters held in memory (for the in-flight byte budget).
    pub held_bytes: u64,
}

/// Streams a `multipart/form-data` body into `work`; every part must have a name and no name
/// may repeat.
pub async fn multipart<S, B, E>(
    body: S,
    content_type: &str,
    limit: u64,
    work: &WorkDir,
) -> Result<Received, ReceiveError>
where
    S: Stream<Item = Result<B, E>> + Send + 'static,
    B: Buf + 'static,
    E: std::fmt::Display + 'static,
{
    let boundary = multer::parse_boundary(content_type).map_err(|e| {
        PayloadError::MalformedForm(format!(
            "multipart Content-Type without a usable boundary: {e}"
        ))
    })?;
    let over = Arc::new(AtomicBool::new(false));
    let mut parts = multer::Multipart::new(limited(body, limit, over.clone()), boundary);
    let malformed = |e: multer::Error| {
        if over.load(Ordering::Acquire) {
            return ReceiveError::BodyTooLarge { limit };
        }
        match e {
            multer::Error::StreamReadFailed(e) => ReceiveError::Unreadable(e.to_string()),
            other => ReceiveError::Payload(PayloadError::MalformedForm(format!(
                "malformed multipart body: {other}"
            ))),
        }
    };
    let mut set = FieldSet::default();
    let mut held = 0usize;
    let mut index = 0usize;
    while let Some(mut part) = parts.next_field().await.map_err(malformed)? {
        index += 1;
        let name = part
            .name()
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| {
                PayloadError::MalformedForm(format!("multipart part {index} has no name"))
            })?;
        if set.fields.iter().any(|(n, _)| *n == name) {
            return Err(
                PayloadError::MalformedForm(format!("field {name:?} is given twice")).into(),
            );
        }
        let is_file = part.file_name().is_some() || attachment_number(&name).is_some();
        let field = if is_file {
            let filename = decode_filename(
                part.headers()
                    .get(warp::http::header::CONTENT_DISPOSITION)
                    .map(|v| v.as_bytes()),
                part.file_name(),
            )
            .unwrap_or_default();
            let content_type = part
                .content_type()
                .map(|m| m.to_string())
                .unwrap_or_else(|| "application/octet-stream".into());
            let mut sink = FileSink::create(work.path(), format!("part-{index}")).await?;
            while let Some(chunk) = part.chunk().await.map_err(malformed)? {
                sink.write(&chunk).await?;
            }
            Field::File(FilePart {
                filename,
                content_type,
                data: sink.finish().await?,
            })
        } else {
            let body = name == "text" || name == "html";
            let charset = part
                .content_type()
                .and_then(|m| m.get_param(mime::CHARSET).map(|c| c.to_string()));
            let mut buf: Vec<u8> = Vec::new();
            let mut spill: Option<FileSink> = None;
            while let Some(chunk) = part.chunk().await.map_err(malformed)? {
                if let Some(sink) = &mut spill {
                    sink.write(&chunk).await?;
                    continue;
                }
                buf.extend_from_slice(&chunk);
                if body && buf.len() as u64 > INLINE_LIMIT {
                    let mut sink = FileSink::create(work.path(), format!("part-{index}")).await?;
                    sink.write(&buf).await?;
                    buf = Vec::new();
                    spill = Some(sink);
                } else if !body && buf.len() > MAX_FIELD_BYTES {
                    return Err(ReceiveError::FieldTooLarge(format!(
                        "parameter {name:?} is larger than {MAX_FIELD_BYTES} bytes"
                    )));
                }
            }
            match spill {
                Some(sink) => Field::Spilled(sink.finish().await?),
                None => {
                    held += buf.len();
                    if !body && held > MAX_FIELDS_BYTES + 2 * INLINE_LIMIT as usize {
                        return Err(ReceiveError::FieldTooLarge(format!(
                            "the text parameters are larger than {MAX_FIELDS_BYTES} bytes together"
                        )));
                    }
                    Field::Text(decode_text(&name, buf, charset.as_deref())?)
                }
            }
        };
        set.push(name, field)?;
    }
    Ok(Received {
        fields: set,
        held_bytes: held as u64,
    })
}

/// A text part in its declared charset (UTF-8 when none is declared).
fn decode_text(name: &str, bytes: Vec<u8>, charset: Option<&str>) -> Result<String, PayloadError> {
    let not_text = || PayloadError::MalformedForm(format!("field {name:?} is not valid UTF-8"));
    match charset.and_then(|c| encoding_rs::Encoding::for_label(c.as_bytes())) {
        Some(encoding) if encoding != encoding_rs::UTF_8 => {
            Ok(encoding.decode_without_bom_handling(&bytes).0.into_owned())
        }
        _ => String::from_utf8(bytes).map_err(|_| not_text()),
    }
}

/// A file being written, and the digest of what went in.
struct FileSink {
    file: tokio::io::BufWriter<tokio::fs::File>,
    name: String,
    hasher: Sha256,
    size: u64,
}

impl FileSink {
    async fn create(dir: &Path, name: String) -> std::io::Result<FileSink> {
        let file = tokio::fs::File::create(dir.join(&name)).await?;
        Ok(FileSink {
            file: tokio::io::BufWriter::with_capacity(64 * 1024, file),
            name,
            hasher: Sha256::new(),
            size: 0,
        })
    }

    async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
        self.file.write_all(chunk).await
    }

    async fn finish(mut self) -> std::io::Result<StoredFile> {
        self.file.flush().await?;
        Ok(StoredFile {
            file: self.name,
            size: self.size,
            sha256: hex::encode(self.hasher.finalize()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MULTIPART: &[u8] = include_bytes!("../../fixtures/inbound/multipart.txt");
    const CT: &str = "multipart/form-data; boundary=----CMCInboundBoundary7MA4YWxkTrZu0gW";

    fn chunks(
        body: Vec<u8>,
        size: usize,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
        let pieces: Vec<Result<Bytes, std::io::Error>> = body
            .chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures_util::stream::iter(pieces)
    }

    async fn read(
        body: Vec<u8>,
        ct: &str,
        limit: u64,
    ) -> (Result<Received, ReceiveError>, WorkDir) {
        let root = tempfile::tempdir().unwrap().keep();
        let work = WorkDir::create(&root).unwrap();
        (multipart(chunks(body, 7), ct, limit, &work).await, work)
    }

    #[tokio::test]
    async fn the_multipart_fixture_streams_both_attachments_to_disk() {
        let (received, work) = read(MULTIPART.to_vec(), CT, 1 << 20).await;
        let mail = received.unwrap().fields.validate().unwrap();
        assert_eq!(mail.filter, "attach@smtps.jp");
        assert_eq!(mail.headers[0].value, "<admin@smtps.jp>");
        assert_eq!(mail.attachments.len(), 2);
        let a = &mail.attachments[0];
        assert_eq!(a.filename, "画像1.jpg");
        assert_eq!(a.content_type, "image/jpeg");
        assert_eq!(
            a.data.sha256,
            "0dabdfed83aa31edbc1d1293bd50d51dbf306c359a0e969e9ab4a245d1e08f29"
        );
        let on_disk = std::fs::read(work.path().join(&a.data.file)).unwrap();
        assert_eq!(on_disk.len() as u64, a.data.size);
        assert_eq!(hex::encode(Sha256::digest(&on_disk)), a.data.sha256);
        let b = &mail.attachments[1];
        assert_eq!(b.filename, "report.pdf");
        assert_eq!(
            b.data.sha256,
            "79370862c6cb54e96ed3125464c11e4ce3e8b08fb5048723695b6b9e9728d701"
        );
        let dir = work.path().to_owned();
        drop(work);
        assert!(!dir.exists(), "the work directory is removed on drop");
    }

    #[tokio::test]
    async fn malformed_multipart_bodies_are_refused() {
        let text = String::from_utf8_lossy(MULTIPART).into_owned();
        let cut = MULTIPART.len() - 200;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "wrong boundary",
                MULTIPART.to_vec(),
                "multipart/form-data; boundary=nope",
            ),
            ("no boundary", MULTIPART.to_vec(), "multipart/form-data"),
            ("truncated part", MULTIPART[..cut].to_vec(), CT),
            (
                "repeated field",
                text.replacen("name=\"subject\"", "name=\"filter\"", 1)
                    .into_bytes(),
                CT,
            ),
            (
                "part without a name",
                text.replacen("form-data; name=\"subject\"", "form-data", 1)
                    .into_bytes(),
                CT,
            ),
        ];
        for (what, body, ct) in cases {
            match read(body, ct, 1 << 20).await.0 {
                Err(ReceiveError::Payload(PayloadError::MalformedForm(m))) => {
                    eprintln!("{what}: {m}")
                }
                Err(other) => panic!("{what}: {other:?}"),
                Ok(_) => panic!("{what}: accepted"),
            }
        }
        assert!(matches!(
            read(MULTIPART.to_vec(), CT, 1000).await.0,
            Err(ReceiveError::BodyTooLarge { limit: 1000 })
        ));
    }

    #[tokio::test]
    async fn a_large_html_part_is_spilled_to_disk() {
        let html = "<b>x</b>".repeat(300_000);
        let body = format!(
            "--B\r\nContent-Disposition: form-data; name=\"html\"\r\n\r\n{html}\r\n--B--\r\n"
        );
        let (received, work) = read(
            body.into_bytes(),
            "multipart/form-data; boundary=B",
            1 << 24,
        )
        .await;
        let received = received.unwrap();
        assert!(received.held_bytes < 1024);
        match &received.fields.fields[0].1 {
            Field::Spilled(f) => {
                assert_eq!(f.size, html.len() as u64);
                assert_eq!(
                    std::fs::read(work.path().join(&f.file)).unwrap(),
                    html.as_bytes()
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
