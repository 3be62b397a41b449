//! Bodies as they arrive (issue 10): `Content-Encoding` (gzip and deflate decoded and counted
//! against `max_body_bytes`, other codings 415), `max_entries`, the error code of an
//! unreadable body, and the admin listener's request timeout.

use std::io::Write;
use std::time::{Duration, Instant};

use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
use flate2::Compression;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

async fn post_encoded(app: &TestApp, coding: &str, body: Vec<u8>) -> reqwest::Response {
    app.http
        .post(app.webhook_url())
        .header("content-type", "application/json")
        .header("content-encoding", coding)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn gzip_and_deflate_bodies_are_decoded_and_published() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let mut sub = app.subscribe("cmc.>").await;
    let body = fixture("deliveries-queued", Enc::Json);
    let zlib = {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(&body).unwrap();
        e.finish().unwrap()
    };
    let raw = {
        let mut e = DeflateEncoder::new(Vec::new(), Compression::default());
        e.write_all(&body).unwrap();
        e.finish().unwrap()
    };
    for (coding, data) in [("gzip", gzip(&body)), ("deflate", zlib), ("deflate", raw)] {
        let response = post_encoded(&app, coding, data).await;
        assert_eq!(response.status(), 200, "{coding}");
        assert_eq!(json(response).await["result"], "ok");
    }
    let messages = receive(&mut sub, 3).await;
    assert_eq!(messages[0].payload, messages[1].payload);
    assert_eq!(messages[1].payload, messages[2].payload);
}

#[tokio::test]
async fn a_decompression_bomb_stops_at_the_body_cap_and_publishes_nothing() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let mut sub = app.subscribe("cmc.>").await;
    // 64 MiB of JSON whitespace inside a valid envelope, compressed to a few tens of KiB.
    let mut plain =
        br#"{"event_type":"deliveries","server_composition":"pro","event":{"deliveries":[]}"#
            .to_vec();
    plain.extend(std::iter::repeat_n(b' ', 64 << 20));
    plain.push(b'}');
    let bomb = gzip(&plain);
    assert!(bomb.len() < 1 << 20);
    let started = Instant::now();
    let response = post_encoded(&app, "gzip", bomb).await;
    assert_eq!(response.status(), 413);
    assert_eq!(json(response).await["error"], "payload_too_large");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_silent(&mut sub).await;
}

#[tokio::test]
async fn other_codings_are_415_naming_the_coding() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    for coding in ["br", "compress", "gzip, br"] {
        let response = post_encoded(&app, coding, b"{}".to_vec()).await;
        assert_eq!(response.status(), 415, "{coding}");
        let body = json(response).await;
        assert_eq!(body["error"], "unsupported_media_type");
        let named = coding.split(", ").last().unwrap();
        assert!(body["message"].as_str().unwrap().contains(named), "{body}");
    }
}

#[tokio::test]
async fn a_body_that_cannot_be_decompressed_has_the_code_of_its_media_type() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let response = post_encoded(&app, "gzip", b"not gzip at all".to_vec()).await;
    assert_eq!(response.status(), 400);
    assert_eq!(json(response).await["error"], "malformed_json");
    let response = app
        .http
        .post(app.webhook_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-encoding", "gzip")
        .body(b"not gzip at all".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(json(response).await["error"], "malformed_form");
}

#[tokio::test]
async fn more_entries_than_max_entries_is_413_and_publishes_nothing() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.server.max_entries = 5;
    let app = spawn_app_with(settings).await;
    let mut sub = app.subscribe("cmc.>").await;
    let entries = |n: usize| -> Vec<serde_json::Value> {
        (0..n)
            .map(|i| json!({"status": "queued", "i": i}))
            .collect()
    };
    let body = |n| {
        json!({"event_type": "deliveries", "server_composition": "pro", "event": {"deliveries": entries(n)}})
            .to_string()
    };
    let response = app.post("application/json", body(6)).await;
    assert_eq!(response.status(), 413);
    let answer = json(response).await;
    assert_eq!(answer["error"], "payload_too_large");
    assert!(answer["message"].as_str().unwrap().contains("max_entries"));
    assert_silent(&mut sub).await;
    let response = app.post("application/json", body(5)).await;
    assert_eq!(response.status(), 200);
    receive(&mut sub, 5).await;
}

#[tokio::test]
async fn the_admin_listener_closes_a_connection_that_does_not_send_its_request_in_time() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.server.request_timeout = Duration::from_secs(1);
    let app = spawn_app_with(settings).await;
    let admin = app.admin_address.clone().unwrap();
    let addr = admin.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the admin listener kept a trickling client open"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    // A complete request is still answered.
    let ok = app
        .http
        .get(format!("{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}
