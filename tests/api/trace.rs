//! Trace context (SPEC §2 `traceparent`): every message of a batch carries the request's
//! trace continued as a child span, or a new trace; with `telemetry.otlp_endpoint` the request
//! span reaches an OTLP/HTTP receiver (a real HTTP server started by the test).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::helpers::*;

const PARENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

/// A `traceparent` split into trace id, span id and flags, after checking its shape.
fn fields(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00", "{value}");
    assert!(
        parts[1].len() == 32 && parts[2].len() == 16 && parts[3].len() == 2,
        "{value}"
    );
    assert!(
        value
            .bytes()
            .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{value}"
    );
    assert_ne!(parts[1], "0".repeat(32));
    assert_ne!(parts[2], "0".repeat(16));
    (parts[1].into(), parts[2].into(), parts[3].into())
}

/// Posts three deliveries with the given `traceparent` headers; the `traceparent` all their
/// messages carry (checked to be one value).
async fn post_and_trace(app: &TestApp, traceparents: &[&str]) -> String {
    let mut sub = app.subscribe("cmc.>").await;
    let body = r#"{"event_type":"deliveries","server_composition":"pro","event":{"deliveries":[{"status":"queued"},{"status":"succeeded"},{"status":"failed"}]}}"#;
    let mut request = app
        .http
        .post(app.webhook_url())
        .header("content-type", "application/json")
        .body(body);
    for t in traceparents {
        request = request.header("traceparent", *t);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let messages = receive(&mut sub, 3).await;
    let values: Vec<String> = messages
        .iter()
        .map(|m| header(m.headers.as_ref().unwrap(), "traceparent"))
        .collect();
    assert!(values.iter().all(|v| *v == values[0]), "{values:?}");
    values[0].clone()
}

#[tokio::test]
async fn a_request_traceparent_is_continued_as_a_child_span() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    for flags in ["01", "00"] {
        let parent = format!("00-{PARENT_TRACE}-{PARENT_SPAN}-{flags}");
        let (trace, span, kept) = fields(&post_and_trace(&app, &[&parent]).await);
        assert_eq!(trace, PARENT_TRACE);
        assert_ne!(span, PARENT_SPAN, "a child has a span of its own");
        assert_eq!(kept, flags);
    }
    // Two requests with the same parent are two different child spans.
    let parent = format!("00-{PARENT_TRACE}-{PARENT_SPAN}-01");
    let a = post_and_trace(&app, &[&parent]).await;
    let b = post_and_trace(&app, &[&parent]).await;
    assert_ne!(a, b);
}

#[tokio::test]
async fn a_request_without_a_valid_traceparent_starts_a_new_trace() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let parent = format!("00-{PARENT_TRACE}-{PARENT_SPAN}-01");
    let mut seen = std::collections::HashSet::new();
    for headers in [
        vec![],
        vec!["garbage"],
        vec!["00-00000000000000000000000000000000-00f067aa0ba902b7-01"],
        vec![parent.as_str(), parent.as_str()],
    ] {
        let (trace, _, flags) = fields(&post_and_trace(&app, &headers).await);
        assert_ne!(trace, PARENT_TRACE, "{headers:?}");
        // No spans are exported here, so the new trace is not marked sampled (SPEC §2).
        assert_eq!(flags, "00", "{headers:?}");
        assert!(seen.insert(trace), "a trace id used twice");
    }
}

/// A minimal OTLP/HTTP receiver: stores the body of every `POST /v1/traces`, answers 200.
async fn otlp_receiver() -> (u16, Arc<Mutex<Vec<Bytes>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(Mutex::new(Vec::new()));
    let store = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let store = store.clone();
                    async move {
                        let path = request.uri().path().to_owned();
                        let body = request.into_body().collect().await.map(|b| b.to_bytes());
                        if let (true, Ok(body)) = (path == "/v1/traces", body) {
                            store.lock().unwrap().push(body);
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, received)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn request_spans_reach_an_otlp_receiver() {
    spans_reach_an_otlp_receiver(&[("RUST_LOG", "info")]).await;
}

/// Export does not depend on how verbose the log is: with `log.level = "warn"` no request
/// is logged, and its span is exported all the same.
#[tokio::test]
async fn request_spans_are_exported_whatever_the_log_level() {
    spans_reach_an_otlp_receiver(&[("CMC_FORWARDER__LOG__LEVEL", "warn")]).await;
}

/// Starts the binary exporting to a fake collector (with `env` added), posts one traced
/// request, and waits for its span to arrive.
async fn spans_reach_an_otlp_receiver(env: &[(&str, &str)]) {
    let nats = NatsServer::start().await;
    let (otlp_port, received) = otlp_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("service.log");
    let mut service = Launch::service(&log)
        .env_remove("RUST_LOG")
        .nats(&nats.url())
        .setting("SPOOL__ENABLED", "false")
        .setting(
            "TELEMETRY__OTLP_ENDPOINT",
            &format!("http://127.0.0.1:{otlp_port}"),
        )
        .envs(env)
        .start();
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    service.wait_ready(&http).await;
    let port = service.port;

    let nats_client = async_nats::connect(nats.url()).await.unwrap();
    let mut sub = subscribe_registered(&nats_client, "cmc.>").await;
    let parent = format!("00-{PARENT_TRACE}-{PARENT_SPAN}-01");
    let response = http
        .post(format!("http://127.0.0.1:{port}/webhooks/cmc"))
        .header("content-type", "application/json")
        .header("traceparent", &parent)
        .body(r#"{"event_type":"deliveries","server_composition":"pro","event":{"deliveries":[{"status":"queued"}]}}"#)
        .send()
        .await
        .unwrap();
    let batch_id = request_id_of_200(&response);
    let message = receive(&mut sub, 1).await.remove(0);
    let (trace, span, _) = fields(&header(message.headers.as_ref().unwrap(), "traceparent"));
    assert_eq!(trace, PARENT_TRACE);

    // The exported span is the one the messages name: its trace id, its own span id, the
    // request's span as parent, and the batch id as an attribute (protobuf carries ids as raw
    // bytes and strings as UTF-8, so they can be found in the body as they are).
    let wanted = [
        hex::decode(PARENT_TRACE).unwrap(),
        hex::decode(&span).unwrap(),
        hex::decode(PARENT_SPAN).unwrap(),
        batch_id.clone().into_bytes(),
        b"webhook".to_vec(),
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = received
            .lock()
            .unwrap()
            .iter()
            .any(|body| wanted.iter().all(|w| contains(body, w)));
        if found {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no span of batch {batch_id} reached the receiver ({} posts); log:\n{}",
            received.lock().unwrap().len(),
            service.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
