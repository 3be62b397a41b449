//! The example bounce handler (`examples/bounces_consumer.rs`) against the real service and a
//! real JetStream: what docs/consume.md tells consumers to do must keep working.
//!
//! The example is compiled into this test binary, so the test runs the very function the
//! example's `main` calls, without building and spawning the example.

use async_nats::HeaderMap;
use bytes::Bytes;

use crate::helpers::{spawn_app, Enc, NatsServer, WAIT};

// Its `main` is the example's entry point and unused here.
#[allow(dead_code)]
#[path = "../../examples/bounces_consumer.rs"]
mod bounces_consumer;

use bounces_consumer::{consume, Bounce, STREAM};

#[tokio::test]
async fn durable_bounce_consumer_prints_acks_and_resumes_after_the_last_ack() {
    // Arrange: a delivery and a bounce in the stream; only the bounce matches the filter.
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let js = app.jetstream();
    for fixture in ["deliveries-queued", "bounces-user-unknown"] {
        let response = app.post_fixture(fixture, Enc::Form).await;
        assert_eq!(response.status(), 200, "{fixture}");
    }

    // Act
    let mut lines = Vec::new();
    let handled = tokio::time::timeout(
        WAIT,
        consume(&js, "bounces-test", Some(1), |b| lines.push(b.to_string())),
    )
    .await
    .expect("the bounce arrives in time")
    .expect("consumer runs");

    // Assert: printed with address, code name and reason, and acknowledged.
    assert_eq!(handled, 1);
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].starts_with("no-user@example.jp\tuser_unknown (2)\t550 5.1.1 The email account"),
        "{}",
        lines[0]
    );
    let stream = js.get_stream(STREAM).await.unwrap();
    let info = stream.consumer_info("bounces-test").await.unwrap();
    assert_eq!(info.delivered.consumer_sequence, 1);
    assert_eq!(info.ack_floor.consumer_sequence, 1);
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0, "the delivery is filtered out");

    // Act again: a new bounce, and a new run of the same durable consumer.
    let response = app.post_fixture("bounces-host-unknown", Enc::Json).await;
    assert_eq!(response.status(), 200);
    let mut lines = Vec::new();
    tokio::time::timeout(
        WAIT,
        consume(&js, "bounces-test", Some(1), |b| lines.push(b.to_string())),
    )
    .await
    .expect("the second bounce arrives in time")
    .expect("consumer runs");

    // Assert: only the new bounce, not the acknowledged one again.
    assert_eq!(lines, ["user@example\thost_unknown (1)\thost unknown"]);
    let info = stream.consumer_info("bounces-test").await.unwrap();
    assert_eq!(info.delivered.consumer_sequence, 2);
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_redelivered, 0);
}

fn message(headers: &[(&str, &str)], body: &str) -> async_nats::Message {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.insert(*name, *value);
    }
    async_nats::Message {
        subject: "cmc.bounces.2".into(),
        reply: None,
        payload: Bytes::copy_from_slice(body.as_bytes()),
        headers: Some(map),
        status: None,
        description: None,
        length: body.len(),
    }
}

#[test]
fn bounce_code_comes_from_the_header_else_from_the_string_or_integer_status() {
    let shown = |headers: &[(&str, &str)], body: &str| {
        Bounce::from_message(&message(headers, body))
            .unwrap()
            .to_string()
    };
    assert_eq!(
        shown(
            &[("Cmc-Status", "2")],
            r#"{"to":"a@x.jp","status":"9","reason":"550"}"#
        ),
        "a@x.jp\tuser_unknown (2)\t550"
    );
    for (status, expected) in [
        (r#""3""#, "retry_timeout (3)"),
        ("11", "unsubscribed (11)"),
        (r#""99""#, "other (99)"),
        (r#""42""#, "other (42)"),
    ] {
        let body = format!(r#"{{"to":"a@x.jp","status":{status}}}"#);
        assert_eq!(shown(&[], &body), format!("a@x.jp\t{expected}\t"), "{body}");
    }
    assert_eq!(
        shown(&[], r#"{"envelopeTo":"v1@x.jp","status":"1"}"#),
        "v1@x.jp\thost_unknown (1)\t",
        "version-1 payloads name the address envelopeTo"
    );
}

#[test]
fn messages_without_address_status_or_json_body_are_not_bounces() {
    for body in [r#"{"status":"2"}"#, r#"{"to":"a@example.jp"}"#, "not json"] {
        assert!(Bounce::from_message(&message(&[], body)).is_err(), "{body}");
    }
}
