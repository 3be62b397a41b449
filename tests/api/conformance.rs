//! What arrives on the bus for real CMC payloads, in both encodings.

use serde_json::Value;

use crate::helpers::*;

/// Checks one message against the entry it came from (SPEC §2: subject, body, headers).
fn assert_message_matches(
    message: &async_nats::Message,
    batch: &Value,
    entry: &Value,
    entry_keys: &[String],
    index: usize,
    expected_subject: &str,
) {
    assert_eq!(message.subject.as_str(), expected_subject);
    let body: Value = serde_json::from_slice(&message.payload).unwrap();
    let body = body.as_object().unwrap();
    let keys = ordered_keys(&message.payload);
    assert_eq!(keys[0], "event_type");
    assert_eq!(keys[1], "server_composition");
    assert_eq!(body["event_type"], batch["event_type"]);
    assert_eq!(body["server_composition"], batch["server_composition"]);
    // Every entry field, verbatim and in the original order, after the two added ones.
    let entry = entry.as_object().unwrap();
    assert_eq!(&keys[2..], entry_keys);
    for (k, v) in entry {
        assert_eq!(&body[k], v, "field {k}");
    }
    assert!(!body.contains_key("api_key"));

    let headers = message.headers.as_ref().expect("headers");
    let msg_id = header(headers, "Nats-Msg-Id");
    assert_eq!(msg_id.len(), 64);
    assert!(msg_id
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(header(headers, "Content-Type"), "application/json");
    assert_eq!(
        header(headers, "Cmc-Event-Type"),
        batch["event_type"].as_str().unwrap()
    );
    assert_eq!(header(headers, "Cmc-Batch-Index"), index.to_string());
    assert!(!header(headers, "Cmc-Batch-Id").is_empty());
}

fn status_token(entry: &Value) -> String {
    match &entry["status"] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[tokio::test]
async fn captured_examples_publish_one_message_per_entry_in_both_encodings() {
    // Arrange
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let mut sub = app.subscribe(">").await;
    let names = [
        "deliveries-queued",
        "deliveries-succeeded",
        "deliveries-failed",
        "bounces-host-unknown",
        "bounces-user-unknown",
    ];
    for enc in [Enc::Json, Enc::Form] {
        for name in names {
            let (batch, entries) = fixture_entries(name);
            let entry_keys = fixture_entry_keys(name);

            // Act
            let response = app.post_fixture(name, enc).await;

            // Assert
            assert_eq!(response.status(), 200, "{name} {enc:?}");
            let request_id = response
                .headers()
                .get("x-request-id")
                .expect("X-Request-Id")
                .to_str()
                .unwrap()
                .to_owned();
            // The form twin repeats the JSON original: same ids, so JetStream reports
            // every event as a duplicate.
            let expected = match enc {
                Enc::Json => serde_json::json!({"result": "ok", "published": entries.len()}),
                Enc::Form => serde_json::json!({
                    "result": "ok", "published": entries.len(), "duplicates": entries.len()
                }),
            };
            assert_eq!(json(response).await, expected, "{name} {enc:?}");
            let messages = receive(&mut sub, entries.len()).await;
            for (i, (m, entry)) in messages.iter().zip(&entries).enumerate() {
                let subject = format!(
                    "cmc.{}.{}",
                    batch["event_type"].as_str().unwrap(),
                    status_token(entry)
                );
                assert_message_matches(m, &batch, entry, &entry_keys[i], i, &subject);
                let headers = m.headers.as_ref().unwrap();
                assert_eq!(header(headers, "Cmc-Batch-Id"), request_id);
                assert_eq!(header(headers, "Cmc-Status"), status_token(entry));
                assert_eq!(header(headers, "Cmc-Server-Composition"), "pro");
            }
        }
    }
    assert_silent(&mut sub).await;
    // Each event is stored once: the form twins carry the same ids as the JSON originals.
    let stored = app.stream_messages().await;
    assert_eq!(stored.len(), names.len());
    let subjects: Vec<&str> = stored.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "cmc.deliveries.queued",
            "cmc.deliveries.succeeded",
            "cmc.deliveries.failed",
            "cmc.bounces.1",
            "cmc.bounces.2"
        ]
    );
}

#[tokio::test]
async fn json_and_form_twins_carry_the_same_message_id() {
    let nats = NatsServer::start().await;
    let app = spawn_app_with({
        let mut s = test_settings(&nats);
        s.nats.mode = cmc_forwarder::settings::Mode::Core;
        s
    })
    .await;
    let mut sub = app.subscribe("cmc.>").await;
    for name in ["deliveries-failed", "bounces-user-unknown", "deliveries-v1"] {
        assert_eq!(app.post_fixture(name, Enc::Json).await.status(), 200);
        assert_eq!(app.post_fixture(name, Enc::Form).await.status(), 200);
        let (_, entries) = fixture_entries(name);
        let json_msgs = receive(&mut sub, entries.len()).await;
        let form_msgs = receive(&mut sub, entries.len()).await;
        for (a, b) in json_msgs.iter().zip(&form_msgs) {
            let (ha, hb) = (a.headers.as_ref().unwrap(), b.headers.as_ref().unwrap());
            assert_eq!(
                header(ha, "Nats-Msg-Id"),
                header(hb, "Nats-Msg-Id"),
                "{name}"
            );
            assert_eq!(a.payload, b.payload, "{name}");
        }
    }
}

#[tokio::test]
async fn version_1_batch_is_accepted_and_routed_by_status() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let mut sub = app.subscribe(">").await;
    let (batch, entries) = fixture_entries("deliveries-v1");
    let entry_keys = fixture_entry_keys("deliveries-v1");
    assert!(entries[0].get("envelopeFrom").is_some() && entries[0].get("apiData").is_none());

    let response = app.post_fixture("deliveries-v1", Enc::Form).await;

    assert_eq!(response.status(), 200);
    let messages = receive(&mut sub, entries.len()).await;
    for (i, (m, entry)) in messages.iter().zip(&entries).enumerate() {
        let subject = format!("cmc.deliveries.{}", status_token(entry));
        assert_message_matches(m, &batch, entry, &entry_keys[i], i, &subject);
    }
    assert_silent(&mut sub).await;
}

#[tokio::test]
async fn hundred_entry_mixed_batch_keeps_cmc_order_in_the_stream() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let (batch, entries) = fixture_entries("deliveries-mixed-100");
    assert_eq!(entries.len(), 100);

    let response = app.post_fixture("deliveries-mixed-100", Enc::Json).await;

    assert_eq!(response.status(), 200);
    assert_eq!(json(response).await["published"], 100);
    let stored = app.stream_messages().await;
    assert_eq!(stored.len(), 100);
    for (i, (m, entry)) in stored.iter().zip(&entries).enumerate() {
        assert_eq!(
            m.subject.as_str(),
            format!("cmc.deliveries.{}", status_token(entry))
        );
        assert_eq!(header(&m.headers, "Cmc-Batch-Index"), i.to_string());
        let body: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(body["messageId"], entry["messageId"]);
        assert_eq!(body["server_composition"], batch["server_composition"]);
    }
}

#[tokio::test]
async fn japanese_server_composition_is_escaped_in_subject_and_header() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.nats.subject = "cmc.{server_composition}.{event_type}.{status}"
        .parse()
        .unwrap();
    let app = spawn_app_with(settings).await;
    let mut sub = app.subscribe(">").await;

    for enc in [Enc::Json, Enc::Form] {
        let response = app
            .post_fixture("deliveries-japanese-composition", enc)
            .await;

        assert_eq!(response.status(), 200, "{enc:?}");
        let message = &receive(&mut sub, 1).await[0];
        // 本番環境 as UTF-8, each byte %XX.
        assert_eq!(
            message.subject.as_str(),
            "cmc.%E6%9C%AC%E7%95%AA%E7%92%B0%E5%A2%83.deliveries.succeeded"
        );
        let headers = message.headers.as_ref().unwrap();
        assert_eq!(
            header(headers, "Cmc-Server-Composition"),
            "%E6%9C%AC%E7%95%AA%E7%92%B0%E5%A2%83"
        );
        let body: Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(body["server_composition"], "本番環境");
    }
}

#[tokio::test]
async fn status_name_template_uses_readable_bounce_codes() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.nats.subject = "cmc.{event_type}.{status_name}".parse().unwrap();
    let app = spawn_app_with(settings).await;
    let mut sub = app.subscribe(">").await;

    assert_eq!(
        app.post_fixture("bounces-user-unknown", Enc::Form)
            .await
            .status(),
        200
    );
    assert_eq!(
        app.post_fixture("deliveries-failed", Enc::Form)
            .await
            .status(),
        200
    );

    let messages = receive(&mut sub, 2).await;
    assert_eq!(messages[0].subject.as_str(), "cmc.bounces.user_unknown");
    assert_eq!(messages[1].subject.as_str(), "cmc.deliveries.failed");
}

#[tokio::test]
async fn cmc_timezone_adds_created_at_after_server_composition() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.cmc.timezone = Some(cmc_forwarder::settings::Zone::parse("Asia/Tokyo").unwrap());
    let app = spawn_app_with(settings).await;
    let mut sub = app.subscribe("cmc.>").await;

    let response = app.post_fixture("deliveries-queued", Enc::Form).await;

    assert_eq!(response.status(), 200);
    let message = &receive(&mut sub, 1).await[0];
    let body: Value = serde_json::from_slice(&message.payload).unwrap();
    let keys = ordered_keys(&message.payload);
    assert_eq!(
        keys[..3],
        ["event_type", "server_composition", "created_at"]
    );
    assert_eq!(body["created_at"], "2023-01-25T14:03:06+09:00");
    assert_eq!(body["created"], "2023-01-25 14:03:06");
}
