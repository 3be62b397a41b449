//! The Inbound webhook (SPEC §7): each mail CMC receives becomes objects in a JetStream
//! object store (its attachments, and bodies too large to travel inline) and then one NATS
//! message.
//!
//! Pure modules (no socket, no file, no NATS):
//! - [`mail`]: JSON and form-urlencoded parsing, the [`FieldSet`] every encoding produces,
//!   and its all-or-nothing validation into a typed [`Mail`];
//! - [`filename`]: RFC 2047 / RFC 2231 filename decoding;
//! - [`message`]: which bodies become objects, and the message's subject, body, headers and
//!   `Nats-Msg-Id`;
//! - the `inbound.subject` template is [`crate::subject::InboundSubject`].
//!
//! I/O modules:
//! - [`receive`]: a multipart body streamed part by part (multer); file parts go to disk while
//!   their SHA-256 is computed, so an attachment is never held in memory whole;
//! - [`store`]: the object store and the message's publication, in that order;
//!
//! Mails NATS cannot take in time go to the one spool ([`crate::spool`], a mail record
//! naming the mail's directory) and out with its drainer (`deliver.rs`).

pub mod filename;
pub mod mail;
pub mod message;
pub mod receive;
pub mod store;

pub use crate::subject::InboundSubject;
pub use mail::{FieldSet, Mail};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::publish::Publisher;
use crate::settings::Settings;
use store::{InboundSink, SinkError};

/// Why the inbound endpoint could not be set up at start-up.
#[derive(Debug, Error)]
pub enum SetupError {
    #[error("inbound object store {bucket} (stream OBJ_{bucket}): {message}")]
    Bucket { bucket: String, message: String },
    #[error("cannot open the inbound spool in {dir}: {message}")]
    Spool { dir: PathBuf, message: String },
}

/// What the inbound route and its drainer share, built at start-up.
pub struct InboundParts {
    pub sink: Arc<InboundSink>,
    /// Where requests write their file parts: the spool's work area (spooling is then a
    /// rename), else a directory under the system's temporary one.
    pub work_root: PathBuf,
}

/// Builds the inbound parts when `inbound.path` is set. The bucket is created (or found) now
/// when NATS is reachable, else in the background. Creation refused is a configuration error,
/// like an unusable events stream; a bucket that is merely missing (`nats.stream.create =
/// false`) leaves events unaffected, and inbound mails wait for it (503 or spool).
///
/// `event_spool` is the counts of the event spool, opened (and so locked) on the same
/// `spool.dir` before: the inbound spool shares its lock and its `spool.max_bytes`.
pub async fn setup(
    settings: &Settings,
    publisher: &Publisher,
) -> Result<Option<InboundParts>, SetupError> {
    if settings.inbound.path.is_empty() {
        return Ok(None);
    }
    let sink = Arc::new(InboundSink::new(settings, publisher.clone()));
    let in_background = |sink: Arc<InboundSink>| {
        tokio::spawn(async move {
            while sink.ensure_bucket().await.is_err() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            tracing::info!(bucket = %sink.bucket(), "inbound object store ready");
        })
    };
    if publisher.is_connected() {
        match sink.ensure_bucket().await {
            Ok(_) => {}
            Err(e @ SinkError::Unanswered(_)) => {
                tracing::warn!(error = %e, "JetStream not answering yet; setting the inbound object store up in the background");
                in_background(sink.clone());
            }
            Err(e) if settings.nats.stream.create => {
                return Err(SetupError::Bucket {
                    bucket: settings.inbound.bucket.to_string(),
                    message: e.to_string(),
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "inbound object store not usable; inbound mails cannot be stored until it exists")
            }
        }
    } else {
        in_background(sink.clone());
    }
    // With the spool on, files are written next to it (spooling moves them in); what an
    // earlier run left there was never answered 200.
    let root = if settings.spool.enabled {
        let root = settings.spool.dir.join("mail-tmp");
        let _ = std::fs::remove_dir_all(&root);
        root
    } else {
        std::env::temp_dir().join("cmc-forwarder-inbound")
    };
    std::fs::create_dir_all(&root).map_err(|e| SetupError::Spool {
        dir: root.clone(),
        message: e.to_string(),
    })?;
    let work_root = root;
    Ok(Some(InboundParts { sink, work_root }))
}
