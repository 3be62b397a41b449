//! The Inbound webhook (SPEC §7) against a real nats-server: objects in the bucket, one
//! message per mail, bad inputs refused with nothing stored, the spool when NATS goes away
//! mid-upload, and the service's memory while it takes a 20 MiB attachment.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream::object_store::ObjectStore;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::helpers::*;

const BOUNDARY: &str = "----CMCInboundBoundary7MA4YWxkTrZu0gW";
const JPEG_SHA: &str = "0dabdfed83aa31edbc1d1293bd50d51dbf306c359a0e969e9ab4a245d1e08f29";
const PDF_SHA: &str = "79370862c6cb54e96ed3125464c11e4ce3e8b08fb5048723695b6b9e9728d701";

fn inbound_fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/inbound")
            .join(name),
    )
    .unwrap()
}

fn multipart_type(boundary: &str) -> String {
    format!("multipart/form-data; boundary={boundary}")
}

/// One part of a multipart body: name, filename, content type, bytes.
pub(crate) type Part<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

fn multipart_body(boundary: &str, parts: &[Part]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, filename, content_type, data) in parts {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let mut disposition = format!("Content-Disposition: form-data; name=\"{name}\"");
        if let Some(f) = filename {
            disposition.push_str(&format!("; filename=\"{f}\""));
        }
        out.extend_from_slice(disposition.as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(ct) = content_type {
            out.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

const HEADERS: &[u8] =
    br#"[{"name":"From","value":"a@example.com"},{"name":"To","value":"in@example.com"}]"#;

/// A mail with the required parameters and the given extra parts.
pub(crate) fn mail_with(extra: &[Part]) -> Vec<u8> {
    let mut parts: Vec<Part> = vec![
        ("server_composition", None, None, b"sandbox"),
        ("filter", None, None, b"in@example.com"),
        ("headers", None, None, HEADERS),
        ("subject", None, None, "件名".as_bytes()),
    ];
    parts.extend_from_slice(extra);
    multipart_body("XyZ", &parts)
}

fn inbound_url(app: &TestApp) -> String {
    format!("{}{}", app.address, app.settings.inbound.path)
}

async fn post_inbound(app: &TestApp, content_type: &str, body: Vec<u8>) -> reqwest::Response {
    app.http
        .post(inbound_url(app))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("request sent")
}

async fn bucket(app: &TestApp) -> ObjectStore {
    app.jetstream()
        .get_object_store(&app.settings.inbound.bucket)
        .await
        .expect("the bucket exists")
}

/// Messages in the object store's stream (chunks and metadata).
async fn object_stream_messages(app: &TestApp) -> u64 {
    let stream = app
        .jetstream()
        .get_stream(format!("OBJ_{}", app.settings.inbound.bucket))
        .await
        .unwrap();
    stream.get_info().await.unwrap().state.messages
}

async fn object_bytes(
    store: &ObjectStore,
    name: &str,
) -> (Vec<u8>, std::collections::HashMap<String, String>) {
    let mut object = store
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("object {name}: {e}"));
    let metadata = object.info().metadata.clone();
    let mut bytes = Vec::new();
    object.read_to_end(&mut bytes).await.unwrap();
    (bytes, metadata)
}

pub(crate) fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[tokio::test]
async fn the_json_fixture_becomes_one_message_with_the_spec_body() {
    // Arrange
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let mut sub = app.subscribe("cmc.inbound.>").await;
    let fixture: serde_json::Value = serde_json::from_slice(&inbound_fixture("json.json")).unwrap();

    // Act
    let response = post_inbound(&app, "application/json", inbound_fixture("json.json")).await;

    // Assert
    assert_eq!(response.status(), 200);
    assert_eq!(
        json(response).await,
        serde_json::json!({"result": "ok", "published": 1, "attachments": 0})
    );
    let message = receive(&mut sub, 1).await.remove(0);
    assert_eq!(message.subject.as_str(), "cmc.inbound.info%40smtps%2Ejp");
    let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(body["event_type"], "inbound");
    for key in [
        "server_composition",
        "filter",
        "subject",
        "envelope-from",
        "envelope-to",
        "text",
        "html",
    ] {
        assert_eq!(body[key], fixture[key], "{key}");
    }
    assert_eq!(body["headers"], fixture["headers"]);
    assert_eq!(body["attachments"], serde_json::json!([]));
    // Members in SPEC §7's order, read from the raw body.
    let raw = String::from_utf8(message.payload.to_vec()).unwrap();
    let positions: Vec<usize> = [
        "event_type",
        "server_composition",
        "filter",
        "subject",
        "envelope-from",
        "envelope-to",
        "headers",
        "text",
        "html",
        "attachments",
    ]
    .iter()
    .map(|k| {
        raw.find(&format!("\"{k}\":"))
            .unwrap_or_else(|| panic!("{k} missing"))
    })
    .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{raw}");
    let headers = message.headers.as_ref().unwrap();
    assert_eq!(header(headers, "Cmc-Event-Type"), "inbound");
    assert_eq!(header(headers, "Cmc-Filter"), "info@smtps.jp");
    assert_eq!(header(headers, "Cmc-Server-Composition"), "sandbox");
    assert_eq!(header(headers, "Cmc-Attachments"), "0");
    assert_eq!(header(headers, "Content-Type"), "application/json");
    assert_eq!(header(headers, "Nats-Msg-Id").len(), 64);
    assert_eq!(app.stream_messages().await.len(), 1);
}

#[tokio::test]
async fn headers_sent_as_a_string_go_out_as_an_array_and_the_same_mail_is_a_duplicate() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let mut sub = app.subscribe("cmc.inbound.>").await;
    let mut fixture: serde_json::Value =
        serde_json::from_slice(&inbound_fixture("json.json")).unwrap();
    let as_array = fixture["headers"].clone();
    fixture["headers"] = serde_json::Value::String(as_array.to_string());

    let first = post_inbound(&app, "application/json", fixture.to_string().into_bytes()).await;
    let again = post_inbound(&app, "application/json", inbound_fixture("json.json")).await;

    assert_eq!(json(first).await["published"], 1);
    assert_eq!(
        json(again).await,
        serde_json::json!({"result": "ok", "published": 1, "attachments": 0, "duplicates": 1})
    );
    let messages = receive(&mut sub, 2).await;
    let body: serde_json::Value = serde_json::from_slice(&messages[0].payload).unwrap();
    assert_eq!(body["headers"], as_array);
    let id = |m: &async_nats::Message| header(m.headers.as_ref().unwrap(), "Nats-Msg-Id");
    assert_eq!(id(&messages[0]), id(&messages[1]));
    assert_eq!(app.stream_messages().await.len(), 1, "JetStream kept one");
}

#[tokio::test]
async fn the_multipart_fixture_stores_both_attachments_and_a_retry_stores_nothing_new() {
    // Arrange
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let mut sub = app.subscribe("cmc.inbound.>").await;
    let body = inbound_fixture("multipart.txt");

    // Act
    let response = post_inbound(&app, &multipart_type(BOUNDARY), body.clone()).await;

    // Assert
    assert_eq!(
        json(response).await,
        serde_json::json!({"result": "ok", "published": 1, "attachments": 2})
    );
    let store = bucket(&app).await;
    let (jpeg, jpeg_meta) = object_bytes(&store, JPEG_SHA).await;
    assert_eq!(sha(&jpeg), JPEG_SHA);
    assert!(jpeg.starts_with(&[0xff, 0xd8, 0xff, 0xe0]) && jpeg.ends_with(&[0xff, 0xd9]));
    assert_eq!(jpeg_meta["filename"], "画像1.jpg");
    assert_eq!(jpeg_meta["content_type"], "image/jpeg");
    let (pdf, pdf_meta) = object_bytes(&store, PDF_SHA).await;
    assert_eq!(sha(&pdf), PDF_SHA);
    assert!(pdf.starts_with(b"%PDF-1.4\n") && pdf.ends_with(b"%%EOF\n"));
    assert_eq!(pdf_meta["filename"], "report.pdf");

    let message = receive(&mut sub, 1).await.remove(0);
    assert_eq!(message.subject.as_str(), "cmc.inbound.attach%40smtps%2Ejp");
    let sent: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(
        sent["attachments"],
        serde_json::json!([
            {"field": "attachment1", "filename": "画像1.jpg", "content_type": "image/jpeg",
             "size": jpeg.len(), "sha256": JPEG_SHA, "bucket": "CMC_INBOUND", "object": JPEG_SHA},
            {"field": "attachment2", "filename": "report.pdf", "content_type": "application/pdf",
             "size": pdf.len(), "sha256": PDF_SHA, "bucket": "CMC_INBOUND", "object": PDF_SHA},
        ])
    );
    assert_eq!(sent["subject"], "添付ファイルテスト");
    assert!(sent["headers"].is_array());
    assert_eq!(
        header(message.headers.as_ref().unwrap(), "Cmc-Attachments"),
        "2"
    );

    // The same mail again: nothing uploaded, the message is a duplicate.
    let stored = object_stream_messages(&app).await;
    let again = post_inbound(&app, &multipart_type(BOUNDARY), body).await;
    assert_eq!(
        json(again).await,
        serde_json::json!({"result": "ok", "published": 1, "attachments": 2, "duplicates": 1})
    );
    assert_eq!(
        object_stream_messages(&app).await,
        stored,
        "no object stored twice"
    );
    assert_eq!(app.stream_messages().await.len(), 1);
}

#[tokio::test]
async fn a_2_mib_html_body_is_stored_as_an_object_and_referenced() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let mut sub = app.subscribe("cmc.inbound.>").await;
    let line = "<p>メール本文</p>\n";
    let html = line.repeat(2 * 1024 * 1024 / line.len() + 1);
    assert!(html.len() >= 2 * 1024 * 1024);
    let body = mail_with(&[
        (
            "html",
            None,
            Some("text/html; charset=UTF-8"),
            html.as_bytes(),
        ),
        ("text", None, None, b"short"),
    ]);

    let response = post_inbound(&app, &multipart_type("XyZ"), body).await;

    assert_eq!(
        json(response).await,
        serde_json::json!({"result": "ok", "published": 1, "attachments": 0})
    );
    let message = receive(&mut sub, 1).await.remove(0);
    assert!(message.payload.len() < 64 * 1024, "the message stays small");
    let sent: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    let name = sha(html.as_bytes());
    assert_eq!(
        sent["html"],
        serde_json::json!({"object": name, "size": html.len(), "sha256": name, "bucket": "CMC_INBOUND"})
    );
    assert_eq!(sent["text"], "short");
    let (stored, meta) = object_bytes(&bucket(&app).await, &name).await;
    assert_eq!(stored, html.as_bytes());
    assert_eq!(meta["field"], "html");
}

#[tokio::test]
async fn every_bad_input_gets_its_status_and_code_and_nothing_is_stored() {
    // Arrange
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.inbound.max_body_bytes = 64 * 1024;
    let app = spawn_app_with(settings).await;
    let mut sub = app.subscribe(">").await;
    let fixture: serde_json::Value = serde_json::from_slice(&inbound_fixture("json.json")).unwrap();
    let without = |key: &str| {
        let mut v = fixture.clone();
        v.as_object_mut().unwrap().remove(key);
        v.to_string().into_bytes()
    };
    let with = |key: &str, value: serde_json::Value| {
        let mut v = fixture.clone();
        v[key] = value;
        v.to_string().into_bytes()
    };
    let fixture_mp = String::from_utf8_lossy(&inbound_fixture("multipart.txt")).into_owned();
    let raw_mp = inbound_fixture("multipart.txt");
    let json_ct = "application/json".to_owned();
    let mp_ct = multipart_type(BOUNDARY);
    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        (
            "missing server_composition",
            json_ct.clone(),
            without("server_composition"),
            422,
            "invalid_payload",
        ),
        (
            "missing filter",
            json_ct.clone(),
            without("filter"),
            422,
            "invalid_payload",
        ),
        (
            "empty filter",
            json_ct.clone(),
            with("filter", "".into()),
            422,
            "invalid_payload",
        ),
        (
            "headers not a list",
            json_ct.clone(),
            with("headers", serde_json::json!({"From": "x"})),
            422,
            "invalid_payload",
        ),
        (
            "headers without values",
            json_ct.clone(),
            with("headers", serde_json::json!([{"name": "From"}])),
            422,
            "invalid_payload",
        ),
        (
            "headers string not pairs",
            json_ct.clone(),
            with("headers", "From: x".into()),
            422,
            "invalid_payload",
        ),
        (
            "attachments in JSON",
            json_ct.clone(),
            with("attachments", 1.into()),
            422,
            "invalid_payload",
        ),
        (
            "attachments count mismatch",
            mp_ct.clone(),
            fixture_mp
                .replacen("\r\n\r\n2\r\n", "\r\n\r\n3\r\n", 1)
                .into_bytes(),
            422,
            "invalid_payload",
        ),
        (
            "bad boundary",
            multipart_type("NotTheBoundary"),
            raw_mp.clone(),
            400,
            "malformed_form",
        ),
        (
            "no boundary",
            "multipart/form-data".into(),
            raw_mp.clone(),
            400,
            "malformed_form",
        ),
        (
            "truncated part",
            mp_ct.clone(),
            raw_mp[..raw_mp.len() - 300].to_vec(),
            400,
            "malformed_form",
        ),
        (
            "repeated field",
            mp_ct.clone(),
            fixture_mp
                .replacen("name=\"subject\"", "name=\"filter\"", 1)
                .into_bytes(),
            400,
            "malformed_form",
        ),
        (
            "part without a name",
            mp_ct.clone(),
            fixture_mp
                .replacen("form-data; name=\"envelope-to\"", "form-data", 1)
                .into_bytes(),
            400,
            "malformed_form",
        ),
        (
            "repeated JSON key",
            json_ct.clone(),
            br#"{"filter":"a","filter":"b"}"#.to_vec(),
            400,
            "malformed_json",
        ),
        (
            "not JSON",
            json_ct.clone(),
            b"{".to_vec(),
            400,
            "malformed_json",
        ),
        (
            "body over inbound.max_body_bytes",
            mp_ct.clone(),
            mail_with(&[
                ("attachments", None, None, b"1"),
                ("attachment1", Some("big.bin"), None, &vec![7u8; 100 * 1024]),
            ]),
            413,
            "payload_too_large",
        ),
        (
            "unsupported media type",
            "text/plain".into(),
            b"hello".to_vec(),
            415,
            "unsupported_media_type",
        ),
    ];

    for (what, content_type, body, status, code) in cases {
        // Act
        let response = post_inbound(&app, &content_type, body).await;

        // Assert
        assert_eq!(response.status(), status, "{what}");
        let answer = json(response).await;
        assert_eq!(answer["result"], "error", "{what}");
        assert_eq!(answer["error"], code, "{what}: {answer}");
        assert!(!answer["message"].as_str().unwrap().is_empty(), "{what}");
    }
    assert_silent(&mut sub).await;
    assert!(app.stream_messages().await.is_empty());
    assert_eq!(object_stream_messages(&app).await, 0, "no object stored");
}

#[tokio::test]
async fn a_wrong_api_key_or_missing_basic_credentials_get_401_and_store_nothing() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.auth.api_key = cmc_forwarder::settings::Secret::new("k-123").into();
    settings.auth.basic_username = "cmc".into();
    settings.auth.basic_password = cmc_forwarder::settings::Secret::new("p-456");
    let app = spawn_app_with(settings).await;
    let fixture = String::from_utf8_lossy(&inbound_fixture("multipart.txt")).into_owned();
    let with_key = |key: &str| {
        fixture
            .replacen(
                &format!("--{BOUNDARY}\r\n"),
                &format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"api_key\"\r\n\r\n{key}\r\n--{BOUNDARY}\r\n"),
                1,
            )
            .into_bytes()
    };
    let post = |body: Vec<u8>, basic: bool| {
        let mut request = app
            .http
            .post(inbound_url(&app))
            .header("content-type", multipart_type(BOUNDARY))
            .body(body);
        if basic {
            request = request.basic_auth("cmc", Some("p-456"));
        }
        request.send()
    };

    let wrong_key = post(with_key("wrong"), true).await.unwrap();
    let no_key = post(fixture.clone().into_bytes(), true).await.unwrap();
    let no_basic = post(with_key("k-123"), false).await.unwrap();

    for (what, response) in [
        ("wrong api_key", wrong_key),
        ("no api_key", no_key),
        ("no Basic", no_basic),
    ] {
        assert_eq!(response.status(), 401, "{what}");
        assert!(
            response.headers().contains_key("www-authenticate"),
            "{what}"
        );
        assert_eq!(json(response).await["error"], "unauthorized", "{what}");
    }
    assert_eq!(object_stream_messages(&app).await, 0);
    assert!(app.stream_messages().await.is_empty());

    let right = post(with_key("k-123"), true).await.unwrap();
    assert_eq!(right.status(), 200);
    let message = app.stream_messages().await.remove(0);
    let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert!(body.get("api_key").is_none(), "api_key is never forwarded");
}

#[tokio::test]
async fn nats_down_mid_upload_spools_the_whole_mail_and_the_drainer_sends_it_once() {
    // Arrange: three 3 MiB attachments; NATS is killed as soon as the first is stored.
    let mut nats = NatsServer::start().await;
    let spool = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&nats);
    settings.spool.enabled = true;
    settings.spool.dir = spool.path().to_owned();
    settings.spool.retain = Duration::from_secs(2);
    let app = spawn_app_with(settings).await;
    let files: Vec<Vec<u8>> = (0..3u8)
        .map(|k| {
            (0..3 * 1024 * 1024u32)
                .map(|i| (i % 251) as u8 ^ k)
                .collect()
        })
        .collect();
    let body = mail_with(&[
        ("attachments", None, None, b"3"),
        ("attachment1", Some("a.bin"), None, &files[0]),
        ("attachment2", Some("b.bin"), None, &files[1]),
        ("attachment3", Some("c.bin"), None, &files[2]),
    ]);
    let mut first_stored = app.subscribe("$O.CMC_INBOUND.M.>").await;
    let (http, url, ct) = (app.http.clone(), inbound_url(&app), multipart_type("XyZ"));
    let request = tokio::spawn(async move {
        http.post(url)
            .header("content-type", ct)
            .body(body)
            .send()
            .await
    });

    // Act
    tokio::time::timeout(Duration::from_secs(30), first_stored.next())
        .await
        .expect("the first object was stored");
    nats.stop();
    let response = request.await.unwrap().unwrap();

    // Assert: spooled whole, then drained after NATS is back.
    let request_id = request_id_of_200(&response);
    assert_eq!(
        json(response).await,
        serde_json::json!({"result": "ok", "published": 0, "attachments": 3, "spooled": 1})
    );
    nats.restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let messages = loop {
        let messages = match app.jetstream().get_stream("CMC_EVENTS").await {
            Ok(_) => app.stream_messages().await,
            Err(_) => Vec::new(),
        };
        if !messages.is_empty() || Instant::now() > deadline {
            break messages;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(messages.len(), 1, "exactly one message");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.stream_messages().await.len(), 1, "and still one");
    let sent: serde_json::Value = serde_json::from_slice(&messages[0].payload).unwrap();
    assert_eq!(header(&messages[0].headers, "Cmc-Batch-Id"), request_id);
    let store = bucket(&app).await;
    for (i, file) in files.iter().enumerate() {
        assert_eq!(sent["attachments"][i]["sha256"], sha(file));
        let (bytes, _) = object_bytes(&store, &sha(file)).await;
        assert!(bytes == *file, "attachment{} byte for byte", i + 1);
    }
    // A spooled mail's directory (`mail/<request id>`) goes once it is sent and NATS can no
    // longer lose it (`spool.retain` after its acknowledgement).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let queued = std::fs::read_dir(spool.path().join("mail"))
            .map(|dir| dir.count())
            .unwrap_or(0);
        if queued == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no spooled mail is left");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the real binary (`CMC_FORWARDER_BIN`, e.g. a release build, else this build's) and
/// posts one mail with a 20 MiB attachment; the service's peak RSS must stay under 64 MiB.
#[tokio::test]
async fn a_20_mib_attachment_is_stored_and_the_service_peak_rss_stays_under_64_mib() {
    // Arrange
    let nats = NatsServer::start().await;
    let spool = tempfile::tempdir().unwrap();
    let binary = forwarder_bin();
    let dir = tempfile::tempdir().unwrap();
    let service = Launch::service(&dir.path().join("service.log"))
        .nats(&nats.url())
        .spool(spool.path())
        .start();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{}/webhooks/cmc/inbound", service.port);
    let deadline = Instant::now() + Duration::from_secs(15);
    while http.get(&url).send().await.is_err() {
        assert!(Instant::now() < deadline, "the service did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let child = &service.child;
    let before = vm_hwm_kib(child.id());
    let attachment: Vec<u8> = (0..20 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let body = mail_with(&[
        ("attachments", None, None, b"1"),
        (
            "attachment1",
            Some("big.bin"),
            Some("application/octet-stream"),
            &attachment,
        ),
    ]);

    // Act
    let response = http
        .post(&url)
        .header("content-type", multipart_type("XyZ"))
        .body(body)
        .send()
        .await
        .unwrap();

    // Assert
    let status = response.status();
    let answer: serde_json::Value = response.json().await.unwrap();
    let peak = vm_hwm_kib(child.id());
    drop(service);
    println!(
        "inbound 20 MiB attachment: service VmHWM {before} KiB before, {peak} KiB peak ({binary})"
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["attachments"], 1);
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB is not under 64 MiB");
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let store = js.get_object_store("CMC_INBOUND").await.unwrap();
    let (stored, _) = object_bytes(&store, &sha(&attachment)).await;
    assert!(stored == attachment, "stored byte for byte");
    let stream = js.get_stream("CMC_EVENTS").await.unwrap();
    let message = stream.get_raw_message(1).await.unwrap();
    let sent: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(sent["attachments"][0]["object"], sha(&attachment));
    assert_eq!(sent["attachments"][0]["size"], attachment.len());
}

// Its `main` is the example's entry point and unused here.
#[allow(dead_code)]
#[path = "../../examples/inbound_attachments.rs"]
mod inbound_attachments;

#[tokio::test]
async fn the_example_consumer_fetches_both_attachments_of_the_multipart_fixture() {
    // Arrange
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let response = post_inbound(
        &app,
        &multipart_type(BOUNDARY),
        inbound_fixture("multipart.txt"),
    )
    .await;
    assert_eq!(response.status(), 200);
    let dir = tempfile::tempdir().unwrap();

    // Act
    let handled = tokio::time::timeout(
        WAIT,
        inbound_attachments::consume(&app.jetstream(), "inbound-test", dir.path(), Some(1)),
    )
    .await
    .expect("the mail arrives in time")
    .expect("consumer runs");

    // Assert
    assert_eq!(handled, 1);
    let jpeg = std::fs::read(dir.path().join(JPEG_SHA).join("画像1.jpg")).unwrap();
    assert_eq!(sha(&jpeg), JPEG_SHA);
    let pdf = std::fs::read(dir.path().join(PDF_SHA).join("report.pdf")).unwrap();
    assert_eq!(sha(&pdf), PDF_SHA);
}

#[tokio::test]
async fn with_nats_down_and_the_spool_off_a_mail_gets_503_with_retry_after() {
    let mut nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    nats.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let response = post_inbound(
        &app,
        &multipart_type(BOUNDARY),
        inbound_fixture("multipart.txt"),
    )
    .await;

    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(json(response).await["error"], "unavailable");
    assert!(started.elapsed() < app.settings.nats.publish_timeout + Duration::from_secs(1));
}

#[tokio::test]
async fn the_derived_form_and_rfc2231_fixtures_are_the_same_mails() {
    // Arrange
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let mut sub = app.subscribe("cmc.inbound.>").await;

    // Act: each derived body after its original.
    let json_mail = post_inbound(&app, "application/json", inbound_fixture("json.json")).await;
    let form_mail = post_inbound(
        &app,
        "application/x-www-form-urlencoded",
        inbound_fixture("form.txt"),
    )
    .await;
    let rfc2047 = post_inbound(
        &app,
        &multipart_type(BOUNDARY),
        inbound_fixture("multipart.txt"),
    )
    .await;
    let rfc2231 = post_inbound(
        &app,
        &multipart_type(BOUNDARY),
        inbound_fixture("multipart-rfc2231.txt"),
    )
    .await;

    // Assert: the same two mails, whatever the encoding.
    assert_eq!(json(json_mail).await["published"], 1);
    assert_eq!(
        json(form_mail).await["duplicates"],
        1,
        "form twin of json.json"
    );
    assert_eq!(json(rfc2047).await["attachments"], 2);
    assert_eq!(
        json(rfc2231).await["duplicates"],
        1,
        "RFC 2231 twin of multipart.txt"
    );
    let messages = receive(&mut sub, 4).await;
    let body =
        |i: usize| serde_json::from_slice::<serde_json::Value>(&messages[i].payload).unwrap();
    assert_eq!(body(0), body(1));
    assert_eq!(body(3)["attachments"][0]["filename"], "画像1.jpg");
    assert_eq!(body(2), body(3));
    assert_eq!(app.stream_messages().await.len(), 2);
}

/// An upload that stalls after some chunks (a slow or frozen NATS, a reader that stops):
/// nothing of it may stay in the bucket, or every retry adds another partial copy.
#[tokio::test]
async fn a_failed_object_upload_leaves_no_chunks_in_the_bucket() {
    // Arrange
    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let spec = cmc_forwarder::objects::BucketSpec {
        name: "PARTIAL".into(),
        create: true,
        storage: async_nats::jetstream::stream::StorageType::File,
        replicas: 1,
    };
    let bucket = cmc_forwarder::objects::open_bucket(&js, &spec, Duration::from_secs(5))
        .await
        .unwrap();
    // Three chunks' worth of data, then nothing more, ever.
    let head = std::io::Cursor::new(vec![7u8; 3 * 128 * 1024]);
    let mut reader = head.chain(Stalled);
    let meta = cmc_forwarder::objects::ObjectMeta {
        name: "a".repeat(64),
        filename: "a.bin".into(),
        content_type: "application/octet-stream".into(),
        field: "attachment1".into(),
    };

    // Act
    let result =
        cmc_forwarder::objects::put(&js, &bucket, meta, &mut reader, Duration::from_secs(1)).await;

    // Assert
    assert!(result.is_err(), "the upload cannot have completed");
    let mut stream = js.get_stream("OBJ_PARTIAL").await.unwrap();
    let messages = stream.info().await.unwrap().state.messages;
    assert_eq!(
        messages, 0,
        "chunks of the failed upload are left in the bucket"
    );
}

/// A reader that never yields another byte.
struct Stalled;

impl tokio::io::AsyncRead for Stalled {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Pending
    }
}

/// The bucket deleted while the service runs: the next upload fails, the mail is spooled, and
/// the bucket is created again (`nats.stream.create = true`) for the drainer to send it.
#[tokio::test]
async fn a_bucket_deleted_while_the_service_runs_is_created_again_and_the_mail_delivered() {
    // Arrange
    let nats = NatsServer::start().await;
    let spool = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&nats);
    settings.spool.enabled = true;
    settings.spool.dir = spool.path().to_owned();
    let app = spawn_app_with(settings).await;
    let first = mail_with(&[
        ("attachments", None, None, b"1"),
        ("attachment1", Some("a.bin"), None, b"the first attachment"),
    ]);
    let response = post_inbound(&app, &multipart_type("XyZ"), first).await;
    assert_eq!(response.status().as_u16(), 200);

    // Act
    app.jetstream()
        .delete_object_store(&app.settings.inbound.bucket)
        .await
        .unwrap();
    let file = b"the second attachment, sent after the bucket was deleted".to_vec();
    let second = mail_with(&[
        ("attachments", None, None, b"1"),
        ("attachment1", Some("b.bin"), None, &file),
    ]);
    let response = post_inbound(&app, &multipart_type("XyZ"), second).await;
    assert_eq!(response.status().as_u16(), 200);

    // Assert: both messages on the stream, the second one's object in the new bucket.
    let deadline = Instant::now() + Duration::from_secs(15);
    while app.stream_messages().await.len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        app.stream_messages().await.len(),
        2,
        "the second mail was not delivered"
    );
    let store = bucket(&app).await;
    let (bytes, _) = object_bytes(&store, &sha(&file)).await;
    assert_eq!(bytes, file);
}

/// The inbound drainer backs off as the event drainer does, up to `spool.retry_max_interval`:
/// with 200 ms, a mail spooled while NATS was down for 7 s is sent soon after NATS is back
/// (a drainer capped at 5 s instead would sleep until about 11 s).
#[tokio::test]
async fn the_inbound_drainer_retries_at_spool_retry_max_interval() {
    // Arrange: NATS down, one mail spooled.
    let mut nats = NatsServer::start().await;
    let spool = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&nats);
    settings.spool.enabled = true;
    settings.spool.dir = spool.path().to_owned();
    settings.spool.retry_max_interval = Duration::from_millis(200);
    let app = spawn_app_with(settings).await;
    nats.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let response = post_inbound(&app, "application/json", inbound_fixture("json.json")).await;
    assert_eq!(json(response).await["spooled"], 1);

    // Act: NATS comes back once a 5 s cap would have been reached.
    tokio::time::sleep(Duration::from_secs(7)).await;
    nats.restart().await;
    let back = Instant::now();

    // Assert
    let deadline = back + Duration::from_secs(10);
    loop {
        let stored = match app.jetstream().get_stream("CMC_EVENTS").await {
            Ok(_) => app.stream_messages().await.len(),
            Err(_) => 0,
        };
        if stored == 1 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = back.elapsed();
    assert_eq!(app.stream_messages().await.len(), 1);
    assert!(
        took < Duration::from_millis(2500),
        "sent {took:?} after NATS was back"
    );
}

/// An object whose description is in the bucket but whose chunks are not (an upload taken
/// for failed whose description was stored late, or chunks purged by hand) does not count
/// as stored: the mail sent again uploads it again, and the bucket serves it whole.
#[tokio::test]
async fn an_object_whose_chunks_are_missing_is_uploaded_again() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let body = inbound_fixture("multipart.txt");
    let first = post_inbound(&app, &multipart_type(BOUNDARY), body.clone()).await;
    assert_eq!(first.status(), 200);
    let store = bucket(&app).await;
    let nuid = store.info(JPEG_SHA).await.unwrap().nuid;
    let stream = app
        .jetstream()
        .get_stream(format!("OBJ_{}", app.settings.inbound.bucket))
        .await
        .unwrap();
    stream
        .purge()
        .filter(format!("$O.{}.C.{nuid}", app.settings.inbound.bucket))
        .await
        .unwrap();
    assert!(
        object_bytes_checked(&store, JPEG_SHA).await.is_err(),
        "the purge left the object readable"
    );

    let again = post_inbound(&app, &multipart_type(BOUNDARY), body).await;

    assert_eq!(again.status(), 200);
    let jpeg = object_bytes_checked(&bucket(&app).await, JPEG_SHA).await;
    assert!(jpeg.is_ok(), "not uploaded again: {jpeg:?}");
}

/// The bytes of `name`, or why they cannot be read whole (within 5 s).
async fn object_bytes_checked(store: &ObjectStore, name: &str) -> Result<Vec<u8>, String> {
    let read = async {
        let mut object = store.get(name).await.map_err(|e| e.to_string())?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(bytes)
    };
    let bytes = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| "not read within 5 s".to_owned())??;
    if sha(&bytes) != name {
        return Err(format!("{} bytes, another digest", bytes.len()));
    }
    Ok(bytes)
}
