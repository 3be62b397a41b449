//! Delivery: what stands behind a `200`. A validated batch is published; what NATS cannot
//! take in time (a temporary failure) is appended to the spool instead, and [`drain`]
//! publishes the spool in arrival order once NATS is back.
//!
//! While the spool holds anything, new batches go behind it, so the stream keeps arrival
//! order. Permanent refusals (oversized message, permissions, limits) are answered without
//! spooling, so they can never block it.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::watch;

use crate::metrics;
use crate::publish::{NatsMessage, Outbound, Oversized, PublishError, PublishReport, Publisher};
use crate::spool::{Spool, SpoolError};
use crate::webhook::OutgoingBatch;

/// What happened to a batch that was accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Acknowledged by NATS.
    pub published: usize,
    /// Of those, reported by JetStream as already stored.
    pub duplicates: usize,
    /// Durably written to the spool, to be published later.
    pub spooled: usize,
}

/// Why a batch was not accepted; nothing of it needs to be assumed stored.
#[derive(Debug, Error)]
pub enum DeliveryError {
    #[error(transparent)]
    TooLarge(Oversized),
    #[error("{0}")]
    Unavailable(String),
}

/// The publisher, and the spool when enabled.
#[derive(Clone)]
pub struct Delivery {
    publisher: Publisher,
    spool: Option<Arc<Spool>>,
}

impl Delivery {
    pub fn new(publisher: Publisher, spool: Option<Arc<Spool>>) -> Self {
        Delivery { publisher, spool }
    }

    pub async fn deliver(&self, batch: &OutgoingBatch) -> Result<DeliveryReport, DeliveryError> {
        // All-or-nothing: refuse an oversized entry before anything is sent or spooled.
        let max = self.publisher.max_payload();
        for message in &batch.messages {
            let size = batch.wire_size(message);
            if size > max {
                return Err(DeliveryError::TooLarge(Oversized {
                    index: message.index,
                    size: Some(size),
                    max,
                }));
            }
        }
        if let Some(spool) = &self.spool {
            if !spool.is_empty() {
                let messages = NatsMessage::from_batch(batch, 0);
                return self.spool(spool, messages, PublishReport::default()).await;
            }
        }
        match self.publisher.publish(Outbound::from_batch(batch)).await {
            Ok(report) => Ok(DeliveryReport {
                published: report.published,
                duplicates: report.duplicates,
                spooled: 0,
            }),
            Err(failure) => match failure.error {
                PublishError::TooLarge(oversized) => Err(DeliveryError::TooLarge(oversized)),
                error if error.is_temporary() => match &self.spool {
                    Some(spool) => {
                        tracing::warn!(%error, acked = failure.acked, "NATS did not take the batch; spooling the rest");
                        let rest = NatsMessage::from_batch(batch, failure.acked);
                        let done = PublishReport {
                            published: failure.acked,
                            duplicates: 0,
                        };
                        self.spool(spool, rest, done).await
                    }
                    None => Err(DeliveryError::Unavailable(format!(
                        "the batch could not be published, nothing is lost by retrying: {error}"
                    ))),
                },
                error => {
                    tracing::error!(%error, "NATS refused the batch");
                    Err(DeliveryError::Unavailable(format!(
                        "NATS refused the batch: {error}"
                    )))
                }
            },
        }
    }

    async fn spool(
        &self,
        spool: &Arc<Spool>,
        messages: Vec<NatsMessage>,
        done: PublishReport,
    ) -> Result<DeliveryReport, DeliveryError> {
        let count = messages.len();
        let spool = spool.clone();
        let appended = tokio::task::spawn_blocking(move || spool.append(&messages))
            .await
            .map_err(|e| SpoolError::Io(std::io::Error::other(e)));
        match appended.and_then(|r| r) {
            Ok(()) => Ok(DeliveryReport {
                published: done.published,
                duplicates: done.duplicates,
                spooled: count,
            }),
            Err(e) => {
                if !matches!(e, SpoolError::Full(_)) {
                    tracing::error!(error = %e, "cannot write to the spool");
                }
                Err(DeliveryError::Unavailable(format!(
                    "NATS cannot take the batch now and it could not be spooled ({e}); nothing is lost by retrying"
                )))
            }
        }
    }
}

/// Publishes the spool's messages in order whenever NATS is ready, until `stop` turns true.
pub async fn drain(spool: Arc<Spool>, publisher: Publisher, mut stop: watch::Receiver<bool>) {
    const BATCH: usize = 512;
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        metrics::spool_depth(spool.len(), spool.bytes());
        let pause = if spool.is_empty() {
            Some(Duration::from_secs(1))
        } else if !publisher.is_ready() {
            Some(Duration::from_millis(100))
        } else {
            None
        };
        if let Some(pause) = pause {
            tokio::select! {
                () = spool.appended.notified() => {}
                () = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let reader = spool.clone();
        let batch = match tokio::task::spawn_blocking(move || reader.read(BATCH)).await {
            Ok(Ok(batch)) => batch,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the spool");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "spool reader failed");
                continue;
            }
        };
        let outbound = batch
            .messages
            .iter()
            .map(NatsMessage::to_outbound)
            .collect();
        let (acked, result) = match publisher.publish(outbound).await {
            Ok(report) => {
                metrics::spool_drained(report.published, report.duplicates);
                (report.published, Ok(()))
            }
            Err(failure) => (failure.acked, Err(failure.error)),
        };
        if acked > 0 {
            let committer = spool.clone();
            let commit = tokio::task::spawn_blocking(move || committer.commit(&batch, acked)).await;
            if let Ok(Err(e)) | Err(e) =
                commit.map_err(|e| SpoolError::Io(std::io::Error::other(e)))
            {
                tracing::error!(error = %e, "cannot record spool progress");
            }
        }
        match result {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(remaining = spool.len(), "spool draining again");
                }
                failures = 0;
            }
            Err(error) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(60) {
                    if error.is_temporary() {
                        tracing::warn!(%error, remaining = spool.len(), "spool drain paused");
                    } else {
                        tracing::error!(%error, remaining = spool.len(), "NATS refuses a spooled message; retrying");
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
