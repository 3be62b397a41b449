//! `nats.headers` (issue 14): the headers stored in the stream in each shape, for valid
//! entries and dead letters, with subjects and bodies the same in both.

use std::collections::BTreeMap;

use cmc_forwarder::webhook::{HeaderShape, InvalidEntries};
use serde_json::json;

use crate::helpers::*;

/// Every header of a stored message, name to value, in name order.
fn headers_of(m: &async_nats::jetstream::message::StreamMessage) -> BTreeMap<String, String> {
    m.headers
        .iter()
        .map(|(name, values)| {
            assert_eq!(values.len(), 1, "{name:?} repeated");
            (
                AsRef::<str>::as_ref(name).to_owned(),
                values[0].as_str().to_owned(),
            )
        })
        .collect()
}

/// Posts three deliveries, the second without a status (a dead letter), and returns the
/// batch id with what the stream stored.
async fn stored_with(
    shape: HeaderShape,
) -> (
    String,
    Vec<(String, BTreeMap<String, String>, serde_json::Value)>,
) {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.nats.headers = shape;
    settings.validation.invalid_entries = InvalidEntries::DeadLetter;
    let app = spawn_app_with(settings).await;
    let body = json!({
        "event_type": "deliveries",
        "server_composition": "pro",
        "event": {"deliveries": [
            {"status": "queued", "to": "a@example.com"},
            {"to": "b@example.com"},
            {"status": "failed", "to": "c@example.com"},
        ]},
    });
    let response = app.post("application/json", body.to_string()).await;
    let batch_id = request_id_of_200(&response);
    let stored = app
        .stream_messages()
        .await
        .iter()
        .map(|m| {
            (
                m.subject.to_string(),
                headers_of(m),
                serde_json::from_slice(&m.payload).unwrap(),
            )
        })
        .collect();
    app.stop().await;
    (batch_id, stored)
}

#[tokio::test]
async fn minimal_headers_keep_the_id_and_batch_id_and_the_dead_letter_error() {
    let (full_id, full) = stored_with(HeaderShape::Full).await;
    let (min_id, minimal) = stored_with(HeaderShape::Minimal).await;
    assert_eq!(full.len(), 3);
    assert_eq!(minimal.len(), 3);

    let names = |h: &BTreeMap<String, String>| h.keys().cloned().collect::<Vec<_>>();
    // Full: every SPEC §2 header; Cmc-Error instead of Cmc-Status on the dead letter.
    let full_valid = [
        "Cmc-Batch-Id",
        "Cmc-Batch-Index",
        "Cmc-Event-Type",
        "Cmc-Server-Composition",
        "Cmc-Status",
        "Content-Type",
        "Nats-Msg-Id",
        "traceparent",
    ];
    assert_eq!(names(&full[0].1), full_valid);
    assert_eq!(names(&full[2].1), full_valid);
    assert_eq!(
        names(&full[1].1),
        [
            "Cmc-Batch-Id",
            "Cmc-Batch-Index",
            "Cmc-Error",
            "Cmc-Event-Type",
            "Cmc-Server-Composition",
            "Content-Type",
            "Nats-Msg-Id",
            "traceparent",
        ]
    );
    assert_eq!(full[0].1["Cmc-Status"], "queued");

    // Minimal: the id and the batch id, and the error on the dead letter; no traceparent.
    assert_eq!(names(&minimal[0].1), ["Cmc-Batch-Id", "Nats-Msg-Id"]);
    assert_eq!(names(&minimal[2].1), ["Cmc-Batch-Id", "Nats-Msg-Id"]);
    assert_eq!(
        names(&minimal[1].1),
        ["Cmc-Batch-Id", "Cmc-Error", "Nats-Msg-Id"]
    );
    assert_eq!(minimal[1].1["Cmc-Error"], full[1].1["Cmc-Error"]);
    for (i, m) in minimal.iter().enumerate() {
        assert_eq!(m.1["Cmc-Batch-Id"], min_id);
        assert_eq!(full[i].1["Cmc-Batch-Id"], full_id);
        // The same event has the same id in both shapes, so de-duplication is unchanged.
        assert_eq!(m.1["Nats-Msg-Id"], full[i].1["Nats-Msg-Id"]);
        // What the dropped headers said is in the subject and the body.
        assert_eq!(m.0, full[i].0);
        assert_eq!(m.2, full[i].2);
        assert_eq!(m.2["event_type"], "deliveries");
        assert_eq!(m.2["server_composition"], "pro");
    }
    assert_eq!(minimal[0].0, "cmc.deliveries.queued");
    assert_eq!(minimal[1].0, "cmc.invalid.deliveries");
    assert_eq!(minimal[1].2["index"], 1);
}
