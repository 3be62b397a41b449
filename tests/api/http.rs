//! The HTTP error contract (SPEC §3): status, `error` code, JSON body, and nothing published.

use futures_util::stream;

use crate::helpers::*;

async fn assert_refused(
    app: &TestApp,
    sub: &mut async_nats::Subscriber,
    response: reqwest::Response,
    status: u16,
    code: &str,
) -> serde_json::Value {
    assert_eq!(response.status(), status, "expected {code}");
    assert!(response.headers().get("x-request-id").is_some());
    let body = json(response).await;
    assert_eq!(body["result"], "error", "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(!body["message"].as_str().unwrap().is_empty());
    assert_silent(sub).await;
    assert!(app.stream_messages().await.is_empty());
    body
}

#[tokio::test]
async fn refusals_carry_the_spec_codes_and_publish_nothing() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.server.max_body_bytes = 64 * 1024;
    let app = spawn_app_with(settings).await;
    let mut sub = app.subscribe(">").await;
    let url = app.webhook_url();
    let queued = fixture("deliveries-queued", Enc::Json);

    let r = app
        .http
        .post(format!("{}/other", app.address))
        .body(queued.clone())
        .send()
        .await
        .unwrap();
    assert_refused(&app, &mut sub, r, 404, "not_found").await;

    let r = app.http.get(&url).send().await.unwrap();
    assert_eq!(r.headers().get("allow").unwrap(), "POST");
    assert_refused(&app, &mut sub, r, 405, "method_not_allowed").await;

    let r = app.post("text/plain", queued.clone()).await;
    assert_refused(&app, &mut sub, r, 415, "unsupported_media_type").await;

    let r = app
        .http
        .post(&url)
        .body(queued.clone())
        .send()
        .await
        .unwrap();
    assert_refused(&app, &mut sub, r, 415, "unsupported_media_type").await;

    let r = app
        .post("application/json", queued[..queued.len() - 3].to_vec())
        .await;
    assert_refused(&app, &mut sub, r, 400, "malformed_json").await;

    let r = app
        .post(
            "application/x-www-form-urlencoded",
            "event_type=deliveries&event_type=bounces",
        )
        .await;
    assert_refused(&app, &mut sub, r, 400, "malformed_form").await;

    let r = app
        .post(
            "application/x-www-form-urlencoded",
            "event_type=deliveries&server_composition=pro&event=%7Bnot-json",
        )
        .await;
    assert_refused(&app, &mut sub, r, 400, "malformed_json").await;

    let r = app
        .post(
            "application/json",
            r#"{"event_type":"deliveries","server_composition":"pro","event":{"bounces":[]}}"#,
        )
        .await;
    assert_refused(&app, &mut sub, r, 422, "invalid_payload").await;

    let big = vec![b' '; 64 * 1024 + 1];
    let r = app.post("application/json", big.clone()).await;
    assert_refused(&app, &mut sub, r, 413, "payload_too_large").await;

    // The same without Content-Length: a chunked body is counted while read.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(1000).map(|c| Ok(c.to_vec())).collect();
    let r = app
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_refused(&app, &mut sub, r, 413, "payload_too_large").await;

    // A query string does not change the path.
    let r = app
        .http
        .post(format!("{url}?x=1"))
        .header("content-type", "application/json")
        .body(queued)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn empty_batch_is_ok_with_nothing_published() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let mut sub = app.subscribe(">").await;

    let r = app
        .post(
            "application/json",
            r#"{"event_type":"deliveries","server_composition":"pro","event":{"deliveries":[]}}"#,
        )
        .await;

    assert_eq!(r.status(), 200);
    assert_eq!(
        json(r).await,
        serde_json::json!({"result": "ok", "published": 0})
    );
    assert_silent(&mut sub).await;
}

#[tokio::test]
async fn an_entry_over_max_payload_answers_413_with_its_index() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let mut sub = app.subscribe(">").await;
    let (mut batch, _) = fixture_entries("deliveries-mixed-100");
    // nats-server's default max_payload is 1 MiB.
    batch["event"]["deliveries"][3]["subject"] = serde_json::json!("x".repeat(1024 * 1024));

    let r = app.post("application/json", batch.to_string()).await;

    let body = assert_refused(&app, &mut sub, r, 413, "payload_too_large").await;
    assert_eq!(body["index"], 3);
}

#[tokio::test]
async fn api_key_and_basic_credentials_are_enforced() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.auth.api_key = cmc_forwarder::settings::Secret::new("s3cret").into();
    settings.auth.basic_username = "cmc".into();
    settings.auth.basic_password = cmc_forwarder::settings::Secret::new("pw");
    let app = spawn_app_with(settings).await;
    let mut sub = app.subscribe(">").await;
    let url = app.webhook_url();
    let form = String::from_utf8(fixture("deliveries-queued", Enc::Form)).unwrap();
    let send = |body: String, basic: Option<(&str, &str)>| {
        let mut request = app
            .http
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some((user, password)) = basic {
            request = request.basic_auth(user, Some(password));
        }
        request.send()
    };

    let r = send(format!("{form}&api_key=s3cret"), None).await.unwrap();
    assert_eq!(
        r.headers().get("www-authenticate").unwrap(),
        "Basic realm=\"cmc-forwarder\""
    );
    assert_refused(&app, &mut sub, r, 401, "unauthorized").await;
    let r = send(format!("{form}&api_key=s3cret"), Some(("cmc", "wrong")))
        .await
        .unwrap();
    assert_refused(&app, &mut sub, r, 401, "unauthorized").await;
    let r = send(form.clone(), Some(("cmc", "pw"))).await.unwrap();
    assert_refused(&app, &mut sub, r, 401, "unauthorized").await;
    let r = send(format!("{form}&api_key=wrong"), Some(("cmc", "pw")))
        .await
        .unwrap();
    // Basic is configured, so this 401 carries the challenge too (RFC 9110).
    assert_eq!(
        r.headers().get("www-authenticate").unwrap(),
        "Basic realm=\"cmc-forwarder\""
    );
    let body = assert_refused(&app, &mut sub, r, 401, "unauthorized").await;
    assert!(!body.to_string().contains("s3cret"));

    let r = send(format!("{form}&api_key=s3cret"), Some(("cmc", "pw")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let message = &receive(&mut sub, 1).await[0];
    assert!(!String::from_utf8_lossy(&message.payload).contains("s3cret"));
}

#[tokio::test]
async fn clients_outside_allowed_ips_are_forbidden() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.auth.allowed_ips = vec!["203.0.113.0/24".parse().unwrap()];
    let app = spawn_app_with(settings).await;
    let mut sub = app.subscribe(">").await;

    // 127.0.0.1 is not allowed, and it is no trusted proxy, so its X-Forwarded-For is ignored.
    let r = app
        .http
        .post(app.webhook_url())
        .header("content-type", "application/json")
        .header("x-forwarded-for", "203.0.113.5")
        .body(fixture("deliveries-queued", Enc::Json))
        .send()
        .await
        .unwrap();

    assert_refused(&app, &mut sub, r, 403, "forbidden").await;
}
