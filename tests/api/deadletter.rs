//! Dead-letter mode (SPEC §1 "Validation is all-or-nothing (by default)"): invalid entries of
//! a well-formed request go out on the dead-letter subject with the error and the entry as
//! sent; the default mode still refuses the whole request and publishes nothing.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::helpers::*;

/// Ten deliveries; entry 3 is not an object and entry 7 has no status.
fn ten_with_two_invalid() -> (Value, Vec<Value>) {
    let statuses = ["queued", "succeeded", "failed", "deferred"];
    let entries: Vec<Value> = (0..10)
        .map(|i| match i {
            3 => json!("not an object"),
            7 => json!({"to": format!("u{i}@example.com"), "messageId": "<m7@x>", "n": 7}),
            _ => json!({
                "status": statuses[i % 4],
                "to": format!("u{i}@example.com"),
                "messageId": format!("<m{i}@x>"),
            }),
        })
        .collect();
    let body = json!({
        "event_type": "deliveries",
        "server_composition": "pro",
        "event": {"deliveries": entries},
    });
    (body, entries)
}

fn dead_letter_settings(nats: &NatsServer) -> cmc_forwarder::settings::Settings {
    let mut settings = test_settings(nats);
    settings.validation.invalid_entries = cmc_forwarder::webhook::InvalidEntries::DeadLetter;
    settings
}

#[tokio::test]
async fn invalid_entries_go_to_the_dead_letter_subject_and_the_rest_as_usual() {
    let nats = NatsServer::start().await;
    let app = spawn_app_with(dead_letter_settings(&nats)).await;
    let mut sub = app.subscribe("cmc.>").await;
    let (body, entries) = ten_with_two_invalid();

    let response = app.post("application/json", body.to_string()).await;
    let batch_id = request_id_of_200(&response);
    // published + spooled is still the number of entries; `invalid` says how many were bad.
    assert_eq!(
        json(response).await,
        json!({"result": "ok", "published": 10, "invalid": 2})
    );

    let messages = receive(&mut sub, 10).await;
    let subjects: Vec<&str> = messages.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "cmc.deliveries.queued",
            "cmc.deliveries.succeeded",
            "cmc.deliveries.failed",
            "cmc.invalid.deliveries",
            "cmc.deliveries.queued",
            "cmc.deliveries.succeeded",
            "cmc.deliveries.failed",
            "cmc.invalid.deliveries",
            "cmc.deliveries.queued",
            "cmc.deliveries.succeeded",
        ]
    );
    for (i, message) in messages.iter().enumerate() {
        let headers = message.headers.as_ref().unwrap();
        assert_eq!(header(headers, "Cmc-Batch-Id"), batch_id);
        assert_eq!(header(headers, "Cmc-Batch-Index"), i.to_string());
    }
    for (index, error) in [
        (3, "must be a JSON object, not a string"),
        (7, "status is missing"),
    ] {
        let message = &messages[index];
        let headers = message.headers.as_ref().unwrap();
        let dead: Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(
            dead,
            json!({
                "event_type": "deliveries",
                "server_composition": "pro",
                "index": index,
                "error": error,
                "entry": entries[index],
            })
        );
        assert_eq!(header(headers, "Cmc-Error"), error);
        assert!(headers.get("Cmc-Status").is_none());
        // SHA-256 of server_composition NUL event_type NUL "invalid" NUL canonical entry.
        let canonical = match index {
            3 => r#""not an object""#.to_owned(),
            _ => r#"{"messageId":"<m7@x>","n":7,"to":"u7@example.com"}"#.to_owned(),
        };
        let expected = hex::encode(Sha256::digest(
            [
                b"pro\0deliveries\0invalid\0".as_slice(),
                canonical.as_bytes(),
            ]
            .concat(),
        ));
        assert_eq!(header(headers, "Nats-Msg-Id"), expected);
    }

    // Stored in the stream like any message; the same batch again is all duplicates.
    assert_eq!(app.stream_messages().await.len(), 10);
    let again = app.post("application/json", body.to_string()).await;
    assert_eq!(
        json(again).await,
        json!({"result": "ok", "published": 10, "duplicates": 10, "invalid": 2})
    );
    assert_eq!(app.stream_messages().await.len(), 10);

    let page = get_text(
        &app.http,
        &format!("{}/metrics", app.admin_address.as_ref().unwrap()),
    )
    .await;
    let invalid = page
        .lines()
        .find_map(|l| {
            l.strip_prefix("cmc_forwarder_invalid_entries_total{event_type=\"deliveries\"} ")
        })
        .unwrap_or_else(|| panic!("no invalid-entries series in\n{page}"));
    // The process-wide recorder is shared by every test of this binary: at least these 4.
    assert!(invalid.parse::<u64>().unwrap() >= 4, "{invalid}");
}

#[tokio::test]
async fn the_default_mode_refuses_the_same_batch_and_publishes_nothing() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let mut sub = app.subscribe(">").await;
    let (body, _) = ten_with_two_invalid();

    let response = app.post("application/json", body.to_string()).await;
    assert_eq!(response.status(), 422);
    let answer = json(response).await;
    assert_eq!(answer["error"], "invalid_payload");
    assert_eq!(answer["index"], 3);
    assert_silent(&mut sub).await;
    assert!(app.stream_messages().await.is_empty());
}

#[tokio::test]
async fn a_request_that_is_malformed_as_a_whole_is_refused_in_dead_letter_mode_too() {
    let nats = NatsServer::start().await;
    let app = spawn_app_with(dead_letter_settings(&nats)).await;
    let mut sub = app.subscribe(">").await;
    for body in [
        json!({"event_type": "deliveries", "event": {"deliveries": [1]}}),
        json!({"event_type": "deliveries", "server_composition": "pro", "event": {"deliveries": {}}}),
    ] {
        let response = app.post("application/json", body.to_string()).await;
        assert_eq!(response.status(), 422, "{body}");
        assert_eq!(json(response).await["index"], Value::Null);
    }
    assert_silent(&mut sub).await;
}

#[tokio::test]
async fn start_up_checks_that_an_existing_stream_covers_the_dead_letter_subject() {
    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    async_nats::jetstream::new(client)
        .create_stream(async_nats::jetstream::stream::Config {
            name: "CMC_EVENTS".into(),
            subjects: vec!["cmc.events.*".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut settings = dead_letter_settings(&nats);
    settings.nats.subject = "cmc.events.{status}".parse().unwrap();
    settings.nats.stream.create = false;
    let error = match cmc_forwarder::startup::Application::build(&settings).await {
        Ok(_) => panic!("started with a stream that cannot hold dead letters"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("dead-letter"), "{error}");

    settings.validation.dead_letter_subject = "cmc.events.invalid_{event_type}".parse().unwrap();
    assert!(cmc_forwarder::startup::Application::build(&settings)
        .await
        .is_ok());
}

#[tokio::test]
async fn dead_letters_are_spooled_and_drained_like_any_message() {
    let mut nats = NatsServer::start().await;
    let spool = tempfile::tempdir().unwrap();
    let mut settings = dead_letter_settings(&nats);
    settings.spool.enabled = true;
    settings.spool.dir = spool.path().join("spool");
    let app = spawn_app_with(settings).await;
    // The stream exists (created at start-up); NATS then goes away.
    nats.stop();
    let (body, entries) = ten_with_two_invalid();
    let response = app.post("application/json", body.to_string()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        json(response).await,
        json!({"result": "ok", "published": 0, "spooled": 10, "invalid": 2})
    );

    nats.restart().await;
    let deadline = std::time::Instant::now() + WAIT;
    let stored = loop {
        let stored = match app.jetstream().get_stream("CMC_EVENTS").await {
            Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
            Err(_) => 0,
        };
        if stored >= 10 || std::time::Instant::now() > deadline {
            break stored;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(stored, 10);
    let messages = app.stream_messages().await;
    let dead: Vec<Value> = messages
        .iter()
        .filter(|m| m.subject.as_str() == "cmc.invalid.deliveries")
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0]["entry"], entries[3]);
    assert_eq!(dead[1]["entry"], entries[7]);
    assert!(messages
        .iter()
        .filter(|m| m.subject.as_str() == "cmc.invalid.deliveries")
        .all(|m| m.headers.get("Cmc-Error").is_some() && m.headers.get("traceparent").is_some()));
}
