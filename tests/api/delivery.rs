//! Delivery semantics: all-or-nothing, deduplication, core mode, NATS down, readiness.

use std::time::{Duration, Instant};

use cmc_forwarder::settings::Mode;

use crate::helpers::*;

#[tokio::test]
async fn the_same_batch_posted_twice_is_stored_once() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;

    let first = json(app.post_fixture("deliveries-mixed-100", Enc::Json).await).await;
    let second = json(app.post_fixture("deliveries-mixed-100", Enc::Form).await).await;

    assert_eq!(first, serde_json::json!({"result": "ok", "published": 100}));
    assert_eq!(
        second,
        serde_json::json!({"result": "ok", "published": 100, "duplicates": 100})
    );
    assert_eq!(app.stream_messages().await.len(), 100);
}

#[tokio::test]
async fn an_invalid_entry_in_the_middle_publishes_nothing() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let mut sub = app.subscribe(">").await;
    let (mut batch, _) = fixture_entries("deliveries-mixed-100");
    batch["event"]["deliveries"][57]["status"] = serde_json::json!(true);

    let response = app.post("application/json", batch.to_string()).await;

    assert_eq!(response.status(), 422);
    let body = json(response).await;
    assert_eq!(body["result"], "error");
    assert_eq!(body["error"], "invalid_payload");
    assert_eq!(body["index"], 57);
    assert!(
        body["message"].as_str().unwrap().contains("status"),
        "{body}"
    );
    assert_silent(&mut sub).await;
    assert!(app.stream_messages().await.is_empty());
}

#[tokio::test]
async fn core_mode_delivers_the_same_messages() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.nats.mode = Mode::Core;
    let app = spawn_app_with(settings).await;
    let mut sub = app.subscribe(">").await;
    let (_, entries) = fixture_entries("deliveries-mixed-100");

    let response = app.post_fixture("deliveries-mixed-100", Enc::Form).await;

    assert_eq!(response.status(), 200);
    assert_eq!(json(response).await["published"], 100);
    let messages = receive(&mut sub, 100).await;
    for (i, (m, entry)) in messages.iter().zip(&entries).enumerate() {
        assert_eq!(
            m.subject.as_str(),
            format!("cmc.deliveries.{}", entry["status"].as_str().unwrap())
        );
        let headers = m.headers.as_ref().unwrap();
        assert_eq!(header(headers, "Cmc-Batch-Index"), i.to_string());
        assert_eq!(header(headers, "Nats-Msg-Id").len(), 64);
    }
    assert_silent(&mut sub).await;
    // Core mode neither needs nor creates a stream.
    assert!(app.jetstream().get_stream("CMC_EVENTS").await.is_err());
}

#[tokio::test]
async fn nats_stopped_answers_503_with_retry_after_in_time() {
    let mut nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    assert_eq!(
        app.post_fixture("deliveries-queued", Enc::Json)
            .await
            .status(),
        200
    );
    nats.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let response = app.post_fixture("deliveries-failed", Enc::Json).await;
    let elapsed = started.elapsed();

    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some());
    let limit = app.settings.nats.publish_timeout + Duration::from_secs(1);
    assert!(elapsed < limit, "took {elapsed:?}");
    let body = json(response).await;
    assert_eq!(body["error"], "unavailable");
}

#[tokio::test]
async fn a_stream_that_does_not_cover_the_subject_answers_503_in_time() {
    // NATS is up, but nothing stores these subjects: JetStream has no responder for them,
    // so the ack cannot come. The answer must still be fast and honest.
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.nats.stream.create = false;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "CMC_EVENTS".into(),
        subjects: vec!["cmc.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let app = spawn_app_with(settings).await;
    js.delete_stream("CMC_EVENTS").await.unwrap();

    let started = Instant::now();
    let response = app.post_fixture("deliveries-queued", Enc::Form).await;

    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some());
    assert!(started.elapsed() < app.settings.nats.publish_timeout + Duration::from_secs(1));
}

#[tokio::test]
async fn readiness_follows_the_nats_connection() {
    let mut nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let readyz = format!("{}/readyz", app.admin_address.as_ref().unwrap());
    let healthz = format!("{}/healthz", app.admin_address.as_ref().unwrap());
    assert_eq!(app.http.get(&readyz).send().await.unwrap().status(), 200);

    nats.stop();
    let deadline = Instant::now() + WAIT;
    loop {
        let response = app.http.get(&readyz).send().await.unwrap();
        if response.status() == 503 {
            assert!(json(response).await["reason"]
                .as_str()
                .unwrap()
                .contains("NATS"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readyz stayed 200 with NATS down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.http.get(&healthz).send().await.unwrap().status(), 200);

    nats.restart().await;
    let deadline = Instant::now() + WAIT;
    while app.http.get(&readyz).send().await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "readyz did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.post_fixture("deliveries-queued", Enc::Json)
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn start_up_fails_when_the_required_stream_is_missing() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.nats.stream.create = false;

    let result = cmc_forwarder::startup::Application::build(&settings).await;

    let error = result.err().expect("start-up must fail").to_string();
    assert!(error.contains("CMC_EVENTS"), "{error}");
}
