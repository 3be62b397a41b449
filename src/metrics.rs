//! Metric names, labels and the Prometheus exposition, in one place.
//!
//! Label values are bounded: event types and statuses CMC documents keep their name,
//! anything else is counted as `other`, so a hostile sender cannot grow the series set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::webhook::OutgoingBatch;

pub const HTTP_REQUESTS: &str = "cmc_forwarder_http_requests_total";
pub const EVENTS: &str = "cmc_forwarder_events_total";
pub const DUPLICATES: &str = "cmc_forwarder_duplicates_total";
pub const SPOOL_DRAINED: &str = "cmc_forwarder_spool_drained_total";
pub const PUBLISH_SECONDS: &str = "cmc_forwarder_publish_duration_seconds";
pub const BATCH_SIZE: &str = "cmc_forwarder_batch_size";
pub const SPOOL_MESSAGES: &str = "cmc_forwarder_spool_messages";
pub const SPOOL_BYTES: &str = "cmc_forwarder_spool_bytes";
pub const RETAINED_BYTES: &str = "cmc_forwarder_retained_bytes";
pub const RETAINED_REPLAYED: &str = "cmc_forwarder_retained_replayed_total";
pub const RETAINED_CHECKS: &str = "cmc_forwarder_retained_checks_total";
pub const NATS_CONNECTED: &str = "cmc_forwarder_nats_connected";
pub const READY: &str = "cmc_forwarder_ready";
pub const CREATED_UNPARSED: &str = "cmc_forwarder_created_unparsed_total";
pub const INVALID_ENTRIES: &str = "cmc_forwarder_invalid_entries_total";
pub const SPOOL_QUARANTINED: &str = "cmc_forwarder_spool_quarantined_messages";
pub const SPOOL_BACKLOG_AGE: &str = "cmc_forwarder_spool_backlog_age_seconds";
pub const PUBLISH_DENIED: &str = "cmc_forwarder_nats_publish_denied_total";
pub const INBOUND_MAILS: &str = "cmc_forwarder_inbound_mails_total";
pub const INBOUND_ATTACHMENTS: &str = "cmc_forwarder_inbound_attachments_total";
pub const INBOUND_ATTACHMENT_BYTES: &str = "cmc_forwarder_inbound_attachment_bytes_total";
pub const CONFIG_RELOADS: &str = "cmc_forwarder_config_reloads_total";
pub const API_KEY_REQUESTS: &str = "cmc_forwarder_api_key_requests_total";

/// The outcomes of a configuration reload, the values of [`CONFIG_RELOADS`]' `result` label.
pub const RELOAD_RESULTS: [&str; 3] = ["ok", "error", "restart_needed"];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(PUBLISH_SECONDS.into()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(BATCH_SIZE.into()),
                        &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0],
                    )
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests embedding the library);
            // the handle then renders an empty page rather than failing start-up.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            initialise();
            handle
        })
        .clone()
}

/// The status codes the webhooks answer with, the values of [`HTTP_REQUESTS`]' `code` label.
pub const STATUS_CODES: [u16; 11] = [200, 400, 401, 403, 404, 405, 408, 413, 415, 422, 503];

/// The event types with a label of their own, and `other` for the rest.
const EVENT_TYPES: [&str; 4] = ["deliveries", "bounces", "blocks", "other"];

/// The outcomes of an accepted event, the values of [`EVENTS`]' `outcome` label.
const EVENT_OUTCOMES: [&str; 2] = ["published", "spooled"];

/// The outcomes of an inbound mail ([`INBOUND_MAILS`]) and of its objects
/// ([`INBOUND_ATTACHMENTS`], [`INBOUND_ATTACHMENT_BYTES`]).
const MAIL_OUTCOMES: [&str; 5] = ["published", "duplicate", "spooled", "drained", "rejected"];
const OBJECT_OUTCOMES: [&str; 3] = ["uploaded", "already_stored", "spooled"];

/// Exposes, at 0, every series whose labels are known before anything happens (Prometheus's
/// advice for labelled metrics): a dashboard panel or an alert rule then reads 0 on a service
/// nobody has posted to yet, never "no data", and `rate()`/`increase()` see the first event.
/// The series of the configured API keys are added by [`api_keys_configured`].
fn initialise() {
    gauge!(SPOOL_MESSAGES).set(0.0);
    gauge!(SPOOL_BYTES).set(0.0);
    gauge!(SPOOL_QUARANTINED).set(0.0);
    gauge!(SPOOL_BACKLOG_AGE).set(0.0);
    gauge!(RETAINED_BYTES).set(0.0);
    // The connection task sets both as soon as it knows; until then the service is neither.
    gauge!(NATS_CONNECTED).set(0.0);
    gauge!(READY).set(0.0);
    for name in [
        DUPLICATES,
        SPOOL_DRAINED,
        RETAINED_REPLAYED,
        CREATED_UNPARSED,
        PUBLISH_DENIED,
    ] {
        counter!(name).absolute(0);
    }
    for code in STATUS_CODES {
        counter!(HTTP_REQUESTS, "code" => code.to_string()).absolute(0);
    }
    for event_type in EVENT_TYPES {
        counter!(INVALID_ENTRIES, "event_type" => event_type).absolute(0);
        for status in status_labels(event_type) {
            for outcome in EVENT_OUTCOMES {
                counter!(EVENTS, "event_type" => event_type, "status" => *status, "outcome" => outcome)
                    .absolute(0);
            }
        }
    }
    for result in RELOAD_RESULTS {
        counter!(CONFIG_RELOADS, "result" => result).absolute(0);
    }
    for result in RETAINED_CHECK_RESULTS {
        counter!(RETAINED_CHECKS, "result" => result).absolute(0);
    }
    for outcome in MAIL_OUTCOMES {
        counter!(INBOUND_MAILS, "outcome" => outcome).absolute(0);
    }
    for outcome in OBJECT_OUTCOMES {
        counter!(INBOUND_ATTACHMENTS, "outcome" => outcome).absolute(0);
        counter!(INBOUND_ATTACHMENT_BYTES, "outcome" => outcome).absolute(0);
    }
    // Registered without a sample: exposed with empty buckets.
    let _ = histogram!(PUBLISH_SECONDS);
    let _ = histogram!(BATCH_SIZE);
}

/// Exposes [`API_KEY_REQUESTS`] at 0 for each of the `keys` configured API keys (at start-up
/// and after a reload that adds keys); a series already counting keeps its count.
pub fn api_keys_configured(keys: usize) {
    for position in 0..keys {
        counter!(API_KEY_REQUESTS, "key" => position.to_string()).increment(0);
    }
}

/// Drains the recorded histogram samples into their buckets every few seconds, for as long as
/// the runtime runs. With `build_recorder` that is the caller's job: without it every sample
/// stays queued until `/metrics` is scraped, and an unscraped service grows by ~8 bytes per
/// recorded value (the slow climb a 10-minute soak showed).
pub fn spawn_upkeep() {
    let handle = install();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            handle.run_upkeep();
        }
    });
}

fn describe() {
    metrics::describe_counter!(HTTP_REQUESTS, "Webhook requests answered, by status code");
    metrics::describe_counter!(
        EVENTS,
        "Events accepted, by event type, status and outcome (published or spooled)"
    );
    metrics::describe_counter!(DUPLICATES, "Events JetStream reported as already stored");
    metrics::describe_counter!(SPOOL_DRAINED, "Spooled events published by the drainer");
    metrics::describe_histogram!(PUBLISH_SECONDS, "Time to publish (or spool) one batch");
    metrics::describe_histogram!(BATCH_SIZE, "Entries per accepted batch");
    metrics::describe_gauge!(
        SPOOL_MESSAGES,
        "Records waiting in the spool: each event one, each Inbound mail one"
    );
    metrics::describe_gauge!(SPOOL_BYTES, "Bytes waiting in the spool");
    metrics::describe_gauge!(
        RETAINED_BYTES,
        "Bytes of the retained log: records NATS acknowledged, kept for spool.retain in case a power cut loses them"
    );
    metrics::describe_counter!(
        RETAINED_REPLAYED,
        "Retained records published again after NATS restarted or this service started"
    );
    metrics::describe_gauge!(NATS_CONNECTED, "1 while the NATS connection is up");
    metrics::describe_gauge!(READY, "1 while /readyz answers 200");
    metrics::describe_counter!(
        INVALID_ENTRIES,
        "Invalid entries sent to the dead-letter subject, by event type"
    );
    metrics::describe_gauge!(
        SPOOL_QUARANTINED,
        "Spooled messages NATS refused permanently, moved to the spool's quarantine"
    );
    metrics::describe_gauge!(
        SPOOL_BACKLOG_AGE,
        "Seconds since the spool was last empty (0 when empty): an upper bound on the age of its oldest message"
    );
    metrics::describe_counter!(
        CREATED_UNPARSED,
        "Entries whose `created` could not be converted to created_at (cmc.timezone set)"
    );
    metrics::describe_counter!(
        PUBLISH_DENIED,
        "Publishes the NATS server refused for lack of permission on the subject"
    );
    metrics::describe_counter!(
        INBOUND_MAILS,
        "Inbound mails, by outcome (published, duplicate, spooled, drained, rejected)"
    );
    metrics::describe_counter!(
        INBOUND_ATTACHMENTS,
        "Inbound attachment objects, by outcome (uploaded, already_stored, spooled)"
    );
    metrics::describe_counter!(
        CONFIG_RELOADS,
        "Configuration reloads (SIGHUP), by result: ok, error (nothing changed), restart_needed (applied but for settings that need a restart)"
    );
    metrics::describe_counter!(
        API_KEY_REQUESTS,
        "Requests whose api_key matched, by the key's position in auth.api_key (0, 1, …)"
    );
    metrics::describe_counter!(
        INBOUND_ATTACHMENT_BYTES,
        "Bytes of inbound attachment objects, by outcome (uploaded, already_stored, spooled)"
    );
}

/// The server refused a publish: this user may not publish to the subject.
pub fn publish_denied() {
    counter!(PUBLISH_DENIED).increment(1);
}

/// A request's `api_key` matched the key at this position of `auth.api_key` (`None`: no key
/// is required, nothing to count). The label is the position, bounded by the configuration,
/// never the key.
pub fn api_key_request(position: Option<usize>) {
    if let Some(position) = position {
        counter!(API_KEY_REQUESTS, "key" => position.to_string()).increment(1);
    }
}

/// A configuration reload ended with `result`, one of [`RELOAD_RESULTS`].
pub fn config_reload(result: &'static str) {
    counter!(CONFIG_RELOADS, "result" => result).increment(1);
}

pub fn request(status: u16) {
    counter!(HTTP_REQUESTS, "code" => status.to_string()).increment(1);
}

fn event_type_label(event_type: &str) -> &'static str {
    match event_type {
        "deliveries" => "deliveries",
        "bounces" => "bounces",
        "blocks" => "blocks",
        _ => "other",
    }
}

/// The status labels of an event type's label (`event_type_label`): the documented statuses,
/// `none` (no status) and `other`.
fn status_labels(event_type: &str) -> &'static [&'static str] {
    const DELIVERY: [&str; 6] = ["queued", "succeeded", "failed", "deferred", "none", "other"];
    const BOUNCE: [&str; 14] = [
        "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "99", "none", "other",
    ];
    const OTHER: [&str; 2] = ["none", "other"];
    match event_type {
        "deliveries" => &DELIVERY,
        "bounces" => &BOUNCE,
        _ => &OTHER,
    }
}

fn status_label(event_type: &str, status: &str) -> &'static str {
    status_labels(event_type)
        .iter()
        .find(|k| **k == status)
        .copied()
        .unwrap_or("other")
}

/// The metric labels of a batch's events, taken before the batch is handed to delivery
/// (which keeps it), so the batch itself need not outlive its publication.
#[derive(Debug, Clone)]
pub struct BatchCounts {
    event_type: &'static str,
    /// Each message's status label; `None` for a dead letter.
    statuses: Vec<Option<&'static str>>,
    invalid: usize,
}

impl BatchCounts {
    pub fn of(batch: &OutgoingBatch) -> BatchCounts {
        let event_type = event_type_label(&batch.event_type_header);
        BatchCounts {
            event_type,
            statuses: batch
                .messages
                .iter()
                .map(|m| (!m.is_dead_letter()).then(|| status_label(event_type, &m.status_header)))
                .collect(),
            invalid: batch.invalid,
        }
    }

    /// Records the batch: the first `published` events went to NATS, the rest to the spool.
    pub fn accepted(&self, published: usize, duplicates: usize, took: Duration) {
        let event_type = self.event_type;
        // One registry lookup per label set rather than per event (it was 3-4 % of the CPU in
        // core mode); the label sets are few, so a list beats a map.
        let mut counts: Vec<(&'static str, &'static str, u64)> = Vec::new();
        for (i, status) in self.statuses.iter().enumerate() {
            let Some(status) = *status else { continue };
            let outcome = if i < published {
                "published"
            } else {
                "spooled"
            };
            match counts
                .iter_mut()
                .find(|(s, o, _)| *s == status && *o == outcome)
            {
                Some((_, _, n)) => *n += 1,
                None => counts.push((status, outcome, 1)),
            }
        }
        for (status, outcome, n) in counts {
            counter!(EVENTS, "event_type" => event_type, "status" => status, "outcome" => outcome)
                .increment(n);
        }
        if self.invalid > 0 {
            counter!(INVALID_ENTRIES, "event_type" => event_type).increment(self.invalid as u64);
        }
        counter!(DUPLICATES).increment(duplicates as u64);
        histogram!(PUBLISH_SECONDS).record(took.as_secs_f64());
        histogram!(BATCH_SIZE).record(self.statuses.len() as f64);
    }
}

/// One inbound mail: `published`, `duplicate`, `spooled`, `drained` or `rejected`.
pub fn inbound_mail(outcome: &'static str) {
    counter!(INBOUND_MAILS, "outcome" => outcome).increment(1);
}

/// Inbound objects (attachments and stored bodies): `uploaded`, `already_stored` or `spooled`.
pub fn inbound_attachments(outcome: &'static str, count: usize, bytes: u64) {
    if count > 0 {
        counter!(INBOUND_ATTACHMENTS, "outcome" => outcome).increment(count as u64);
        counter!(INBOUND_ATTACHMENT_BYTES, "outcome" => outcome).increment(bytes);
    }
}

pub fn created_unparsed(count: usize) {
    if count > 0 {
        counter!(CREATED_UNPARSED).increment(count as u64);
    }
}

pub fn spool_drained(published: usize, duplicates: usize) {
    counter!(SPOOL_DRAINED).increment(published as u64);
    counter!(DUPLICATES).increment(duplicates as u64);
}

/// When the spool last went from empty to non-empty (milliseconds since the Unix epoch; 0
/// while empty), for [`SPOOL_BACKLOG_AGE`].
static SPOOL_NONEMPTY_SINCE_MS: AtomicU64 = AtomicU64::new(0);

/// The size of the retained log.
pub fn retained_bytes(bytes: u64) {
    gauge!(RETAINED_BYTES).set(bytes as f64);
}

/// Retained records moved into the spool to be published again.
pub fn retained_replayed(messages: u64) {
    counter!(RETAINED_REPLAYED).increment(messages);
}

/// The values of [`RETAINED_CHECKS`]' `result` label.
pub const RETAINED_CHECK_RESULTS: [&str; 2] = ["ok", "failed"];

/// A check of the stream by the retained log's keeper: answered (`ok`) or not (`failed`:
/// nothing expires while the stream does not answer).
pub fn retained_check(answered: bool) {
    let result = RETAINED_CHECK_RESULTS[usize::from(!answered)];
    counter!(RETAINED_CHECKS, "result" => result).increment(1);
}

pub fn spool_depth(messages: u64, bytes: u64) {
    gauge!(SPOOL_MESSAGES).set(messages as f64);
    gauge!(SPOOL_BYTES).set(bytes as f64);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        .max(1);
    let age_ms = if messages == 0 {
        SPOOL_NONEMPTY_SINCE_MS.store(0, Ordering::Relaxed);
        0
    } else {
        let since = match SPOOL_NONEMPTY_SINCE_MS.compare_exchange(
            0,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => now,
            Err(since) => since,
        };
        now.saturating_sub(since)
    };
    gauge!(SPOOL_BACKLOG_AGE).set(age_ms as f64 / 1000.0);
}

/// Messages in the spool's quarantine (for the drainer to call when it moves one there; the
/// gauge is exposed at 0 from start-up, so the alert on it can never miss its series).
pub fn spool_quarantined(messages: u64) {
    gauge!(SPOOL_QUARANTINED).set(messages as f64);
}

pub fn connection(connected: bool, ready: bool) {
    gauge!(NATS_CONNECTED).set(if connected { 1.0 } else { 0.0 });
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(event_type_label("deliveries"), "deliveries");
        assert_eq!(event_type_label("opens"), "other");
        assert_eq!(status_label("deliveries", "queued"), "queued");
        assert_eq!(status_label("deliveries", "%E6"), "other");
        assert_eq!(status_label("bounces", "2"), "2");
        assert_eq!(status_label("bounces", "42"), "other");
        assert_eq!(status_label("blocks", "none"), "none");
        assert_eq!(status_label("blocks", "x"), "other");
    }

    #[test]
    fn accepted_events_are_counted_per_status_and_outcome() {
        use crate::webhook::{Outgoing, OutgoingBatch};
        let messages = [
            "queued",
            "queued",
            "failed",
            "queued",
            "succeeded",
            "queued",
        ]
        .iter()
        .enumerate()
        .map(|(index, status)| Outgoing {
            subject: format!("cmc.deliveries.{status}"),
            payload: bytes::Bytes::from_static(b"{}"),
            msg_id: index.to_string(),
            status_header: (*status).to_owned(),
            error: None,
            index,
        })
        .collect();
        let batch = OutgoingBatch {
            batch_id: "b".into(),
            event_type_header: "deliveries".into(),
            server_composition_header: "pro".into(),
            traceparent: String::new(),
            shape: crate::webhook::HeaderShape::Full,
            messages,
            created_unparsed: 0,
            invalid: 0,
        };
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // The first three were published, the last three spooled.
        metrics::with_local_recorder(&recorder, || {
            BatchCounts::of(&batch).accepted(3, 1, Duration::from_millis(5))
        });
        let page = handle.render();
        let count = |status: &str, outcome: &str| {
            let series = format!(
                "{EVENTS}{{event_type=\"deliveries\",status=\"{status}\",outcome=\"{outcome}\"}} "
            );
            page.lines()
                .find_map(|line| line.strip_prefix(&series))
                .unwrap_or_else(|| panic!("no {series} in\n{page}"))
                .to_owned()
        };
        assert_eq!(count("queued", "published"), "2");
        assert_eq!(count("failed", "published"), "1");
        assert_eq!(count("queued", "spooled"), "2");
        assert_eq!(count("succeeded", "spooled"), "1");
        assert!(
            !page.contains("status=\"failed\",outcome=\"spooled\""),
            "{page}"
        );
        assert!(page.contains(&format!("{DUPLICATES} 1")), "{page}");
    }

    #[test]
    fn dead_letters_count_as_invalid_entries_not_as_events() {
        use crate::webhook::{Outgoing, OutgoingBatch};
        let message = |index: usize, error: Option<&str>| Outgoing {
            subject: "s".into(),
            payload: bytes::Bytes::from_static(b"{}"),
            msg_id: index.to_string(),
            status_header: if error.is_some() { "" } else { "queued" }.into(),
            error: error.map(str::to_owned),
            index,
        };
        let batch = OutgoingBatch {
            batch_id: "b".into(),
            event_type_header: "deliveries".into(),
            server_composition_header: "pro".into(),
            traceparent: String::new(),
            shape: crate::webhook::HeaderShape::Full,
            messages: vec![
                message(0, None),
                message(1, Some("status is missing")),
                message(2, None),
                message(3, Some("must be a JSON object, not null")),
            ],
            created_unparsed: 0,
            invalid: 2,
        };
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            BatchCounts::of(&batch).accepted(4, 0, Duration::from_millis(1))
        });
        let page = handle.render();
        assert!(
            page.contains(&format!("{INVALID_ENTRIES}{{event_type=\"deliveries\"}} 2")),
            "{page}"
        );
        assert!(
            page.contains(&format!(
                "{EVENTS}{{event_type=\"deliveries\",status=\"queued\",outcome=\"published\"}} 2"
            )),
            "{page}"
        );
        assert!(!page.contains("status=\"other\""), "{page}");
    }

    #[test]
    fn spool_backlog_age_counts_from_when_the_spool_stopped_being_empty() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let age = || {
            let page = handle.render();
            page.lines()
                .find_map(|l| l.strip_prefix(&format!("{SPOOL_BACKLOG_AGE} ")))
                .unwrap_or_else(|| panic!("no {SPOOL_BACKLOG_AGE} in\n{page}"))
                .parse::<f64>()
                .unwrap()
        };
        metrics::with_local_recorder(&recorder, || spool_depth(0, 0));
        assert_eq!(age(), 0.0);
        metrics::with_local_recorder(&recorder, || spool_depth(3, 300));
        std::thread::sleep(Duration::from_millis(120));
        // Draining part of it does not reset the clock; only an empty spool does.
        metrics::with_local_recorder(&recorder, || spool_depth(1, 100));
        assert!(age() >= 0.1, "{}", age());
        metrics::with_local_recorder(&recorder, || spool_depth(0, 0));
        assert_eq!(age(), 0.0);
    }

    #[test]
    fn inbound_mails_and_attachments_are_counted_by_outcome() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            inbound_mail("published");
            inbound_mail("published");
            inbound_mail("spooled");
            inbound_attachments("uploaded", 2, 1500);
            inbound_attachments("already_stored", 0, 0);
        });
        let page = handle.render();
        for line in [
            format!("{INBOUND_MAILS}{{outcome=\"published\"}} 2"),
            format!("{INBOUND_MAILS}{{outcome=\"spooled\"}} 1"),
            format!("{INBOUND_ATTACHMENTS}{{outcome=\"uploaded\"}} 2"),
            format!("{INBOUND_ATTACHMENT_BYTES}{{outcome=\"uploaded\"}} 1500"),
        ] {
            assert!(page.lines().any(|l| l == line), "{line} not in\n{page}");
        }
        assert!(
            !page.contains("already_stored"),
            "zero counts add no series: {page}"
        );
    }
}
