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
//! - [`subject`]: the `inbound.subject` template.
//!
//! I/O modules:
//! - [`receive`]: a multipart body streamed part by part (multer); file parts go to disk while
//!   their SHA-256 is computed, so an attachment is never held in memory whole;
//! - [`store`]: the object store and the message's publication, in that order;
//! - [`spool`]: mails NATS could not take in time, whole, on disk, and their drainer.

pub mod filename;
pub mod mail;
pub mod message;
pub mod receive;
pub mod spool;
pub mod store;
pub mod subject;

pub use mail::{FieldSet, Mail};
pub use subject::InboundSubject;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::publish::Publisher;
use crate::settings::{Mode, Settings};
use crate::spool::SpoolStats;
use spool::InboundSpool;
use store::InboundSink;

/// Why the inbound endpoint could not be set up at start-up.
#[derive(Debug, Error)]
pub enum SetupError {
    #[error("invalid configuration: {0}")]
    Settings(String),
    #[error("inbound object store {bucket} (stream OBJ_{bucket}): {message}")]
    Bucket { bucket: String, message: String },
    #[error("cannot open the inbound spool in {dir}: {message}")]
    Spool { dir: PathBuf, message: String },
}

/// What the inbound route and its drainer share, built at start-up.
pub struct InboundParts {
    pub sink: Arc<InboundSink>,
    /// With `spool.enabled`.
    pub spool: Option<Arc<InboundSpool>>,
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
    event_spool: Option<Arc<SpoolStats>>,
) -> Result<Option<InboundParts>, SetupError> {
    if settings.inbound.path.is_empty() {
        return Ok(None);
    }
    let sink =
        Arc::new(InboundSink::new(settings, publisher.clone()).map_err(SetupError::Settings)?);
    if publisher.is_connected() {
        match sink.ensure_bucket().await {
            Ok(_) => {}
            Err(e) if settings.nats.stream.create => {
                return Err(SetupError::Bucket {
                    bucket: settings.inbound.bucket.clone(),
                    message: e.to_string(),
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "inbound object store not usable; inbound mails cannot be stored until it exists")
            }
        }
    } else {
        let sink = sink.clone();
        tokio::spawn(async move {
            while sink.ensure_bucket().await.is_err() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            tracing::info!(bucket = %sink.bucket(), "inbound object store ready");
        });
    }
    let (spool, work_root) = if settings.spool.enabled {
        let spool_error = |message: String| SetupError::Spool {
            dir: settings.spool.dir.join("inbound"),
            message,
        };
        let shared = event_spool.ok_or_else(|| {
            spool_error("the event spool of the same directory is not open (its lock)".into())
        })?;
        let spool = InboundSpool::open(&settings.spool.dir, settings.spool.max_bytes, shared)
            .map_err(|e| spool_error(e.to_string()))?;
        if !spool.is_empty() {
            tracing::info!(
                mails = spool.len(),
                "inbound spool holds mails from an earlier run; they are sent first"
            );
        }
        let root = spool.work_root().to_owned();
        (Some(Arc::new(spool)), root)
    } else {
        let root = std::env::temp_dir().join("cmc-forwarder-inbound");
        std::fs::create_dir_all(&root).map_err(|e| SetupError::Spool {
            dir: root.clone(),
            message: e.to_string(),
        })?;
        (None, root)
    };
    Ok(Some(InboundParts {
        sink,
        spool,
        work_root,
    }))
}

/// The checks of the `[inbound]` section that serde cannot do: path, template (covered by
/// the events stream in `jetstream` mode), bucket name, and a stream that leaves the object
/// store's subjects alone. Returns the key at fault and why.
pub fn check_settings(settings: &Settings) -> Result<(), (&'static str, String)> {
    let inbound = &settings.inbound;
    if inbound.path.is_empty() {
        return Ok(());
    }
    if !inbound.path.starts_with('/') {
        return Err((
            "inbound.path",
            "must start with '/' (or be \"\" to disable)".into(),
        ));
    }
    if inbound.path == settings.server.path {
        return Err(("inbound.path", "must differ from server.path".into()));
    }
    if inbound.max_body_bytes == 0 {
        return Err(("inbound.max_body_bytes", "must be greater than 0".into()));
    }
    if inbound.bucket.is_empty()
        || !inbound
            .bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err((
            "inbound.bucket",
            format!(
                "{:?} is not a valid bucket name ([A-Za-z0-9_-]+)",
                inbound.bucket
            ),
        ));
    }
    let template =
        InboundSubject::parse(&inbound.subject).map_err(|e| ("inbound.subject", e.to_string()))?;
    if settings.nats.mode == Mode::Jetstream {
        let subjects = &settings.nats.stream.subjects;
        if !template.is_covered_by(subjects) {
            return Err((
                "inbound.subject",
                format!(
                    "subjects of the template {:?} (i.e. {}) do not all fall under nats.stream.subjects {:?}",
                    template.as_str(),
                    template.as_filter(),
                    subjects
                ),
            ));
        }
        let objects = format!("$O.{}.>", inbound.bucket);
        if let Some(s) = subjects
            .iter()
            .find(|s| subject::filters_overlap(s, &objects))
        {
            return Err((
                "nats.stream.subjects",
                format!("{s:?} overlaps the object store's subjects {objects:?} (inbound.bucket)"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::settings::Settings;

    #[test]
    fn inbound_defaults_and_checks() {
        let s = Settings::from_toml("").unwrap();
        assert_eq!(s.inbound.path, "/webhooks/cmc/inbound");
        assert_eq!(s.inbound.subject, "cmc.inbound.{filter}");
        assert_eq!(s.inbound.max_body_bytes, 33554432);
        assert_eq!(s.inbound.bucket, "CMC_INBOUND");
        for (toml, key) in [
            ("[inbound]\nsubject = \"mail.{filter}\"", "inbound.subject"),
            ("[inbound]\nsubject = \"cmc.{status}\"", "inbound.subject"),
            ("[inbound]\npath = \"inbound\"", "inbound.path"),
            ("[inbound]\npath = \"/webhooks/cmc\"", "inbound.path"),
            ("[inbound]\nbucket = \"a.b\"", "inbound.bucket"),
            ("[nats.stream]\nsubjects = [\">\"]", "nats.stream.subjects"),
        ] {
            let err = Settings::from_toml(toml).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
        // Disabled: nothing else is checked; core mode needs no covering stream.
        assert!(Settings::from_toml("[inbound]\npath = \"\"\nsubject = \"x.{nope}\"").is_ok());
        assert!(Settings::from_toml(
            "[nats]\nmode = \"core\"\n[inbound]\nsubject = \"mail.{filter}\""
        )
        .is_ok());
    }
}
