//! A consumer of inbound mail: a durable JetStream pull consumer on `cmc.inbound.>` that, for
//! each mail, fetches its attachments from the object store into a directory (streamed to
//! disk, checked against their SHA-256), prints one line per mail, then acknowledges it.
//!
//! ```text
//! cargo run --example inbound_attachments                         # nats://127.0.0.1:4222, ./attachments, forever
//! cargo run --example inbound_attachments -- nats://a:4222 /srv/mail 10
//!                                             SERVERS      DIRECTORY  stop after N mails
//! ```
//!
//! Each attachment is written as `<directory>/<sha256>/<filename>`: the object's name is the
//! content's SHA-256, so the same file sent twice is fetched into the same place. A message
//! is acknowledged only after all its attachments are on disk.

use std::path::{Path, PathBuf};

use async_nats::jetstream::{self, consumer, AckKind};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The stream the forwarder writes to (`nats.stream.name`).
pub const STREAM: &str = "CMC_EVENTS";
/// Every inbound mail (`inbound.subject` = `cmc.inbound.{filter}`).
pub const FILTER: &str = "cmc.inbound.>";

/// Fetches every attachment a mail message lists into `dir`; returns the files written.
pub async fn fetch_attachments(
    js: &jetstream::Context,
    payload: &[u8],
    dir: &Path,
) -> Result<Vec<PathBuf>, async_nats::Error> {
    let mail: serde_json::Value = serde_json::from_slice(payload)?;
    let mut written = Vec::new();
    for attachment in mail["attachments"].as_array().into_iter().flatten() {
        let text = |key: &str| attachment[key].as_str().unwrap_or_default().to_owned();
        let (bucket, object, sha) = (text("bucket"), text("object"), text("sha256"));
        // The filename is the sender's: keep only its last path component.
        let filename = Path::new(&text("filename"))
            .file_name()
            .map(|n| n.to_owned())
            .unwrap_or_else(|| "attachment".into());
        let store = js.get_object_store(&bucket).await?;
        let mut reader = store.get(&object).await?;
        let target_dir = dir.join(&object);
        tokio::fs::create_dir_all(&target_dir).await?;
        let target = target_dir.join(filename);
        let mut file = tokio::fs::File::create(&target).await?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).await?;
        }
        file.flush().await?;
        let digest = hex::encode(hasher.finalize());
        if digest != sha {
            return Err(format!("{object}: content has SHA-256 {digest}, expected {sha}").into());
        }
        written.push(target);
    }
    Ok(written)
}

/// Handles mails from the durable consumer `name` until `max` were handled (or forever).
pub async fn consume(
    js: &jetstream::Context,
    name: &str,
    dir: &Path,
    max: Option<usize>,
) -> Result<usize, async_nats::Error> {
    let stream = js.get_stream(STREAM).await?;
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            name,
            consumer::pull::Config {
                durable_name: Some(name.to_owned()),
                filter_subject: FILTER.into(),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    let mut handled = 0;
    while max.is_none_or(|max| handled < max) {
        let Some(message) = messages.next().await else {
            break;
        };
        let message = message?;
        match fetch_attachments(js, &message.payload, dir).await {
            Ok(files) => {
                println!("{}\t{} attachment(s)", message.subject, files.len());
                message.double_ack().await?;
            }
            Err(e) => {
                // Not acknowledged: delivered again after ack_wait, e.g. once the store is back.
                eprintln!("{}: {e}", message.subject);
                message.ack_with(AckKind::Nak(None)).await?;
            }
        }
        handled += 1;
    }
    Ok(handled)
}

#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let mut args = std::env::args().skip(1);
    let servers = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "attachments".into()));
    let max = args.next().map(|n| n.parse()).transpose()?;
    let client = async_nats::connect(servers.split(',').collect::<Vec<_>>().as_slice()).await?;
    let js = jetstream::new(client);
    consume(&js, "inbound-attachments", &dir, max).await?;
    Ok(())
}
